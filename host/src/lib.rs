//! crm-event-handler: receives CRM deal webhooks and delivers the actions
//! they trigger (Meta Conversions API events, Brevo e-mails) through
//! sandboxed WebAssembly plugins.
//!
//! An event flows: `api` (auth, source plugin parse) → `store` (receipt,
//! dedupe) → `queue` (one job per action) → `worker` (destination plugin,
//! retry policy, dead letters) → delivery recorded on the receipt. This file
//! wires those parts together.

pub mod api;
pub mod config;
pub mod dry_run;
pub mod event;
pub mod plugins;
pub mod queue;
pub mod routing;
pub mod store;
pub mod telemetry;
pub mod worker;

use std::sync::{Arc, RwLock};

use anyhow::{Context, bail};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::config::{Config, QueueBackend, StoreBackend};
use crate::plugins::{Kind, PluginEngine, Registry};
use crate::queue::JobQueue;
use crate::routing::Routes;
use crate::store::ReceiptStore;
use crate::telemetry::Metrics;

/// Everything the API and the workers share.
pub struct App {
    pub config: Config,
    pub store: Arc<dyn ReceiptStore>,
    pub queue: Arc<dyn JobQueue>,
    pub plugins: Arc<Registry>,
    routes: RwLock<Arc<Routes>>,
    pub metrics: Metrics,
}

impl App {
    /// Open the backends, load plugins and routes, and report what is not
    /// configured. Fails with a message naming the problem.
    pub async fn build(config: Config) -> anyhow::Result<Arc<App>> {
        let (store, queue): (Arc<dyn ReceiptStore>, Arc<dyn JobQueue>) = match (&config.store, &config.queue) {
            (StoreBackend::Embedded, QueueBackend::Embedded) => {
                let store = store::embedded::EmbeddedStore::open(&config.data_dir)
                    .with_context(|| format!("cannot open the embedded store in DATA_DIR={}", config.data_dir.display()))?;
                let queue = queue::embedded::EmbeddedQueue::open(&config.data_dir)
                    .with_context(|| format!("cannot open the embedded queue in DATA_DIR={}", config.data_dir.display()))?;
                (Arc::new(store), Arc::new(queue))
            }
            _ => bail!(
                "DB_URI / REDIS_URI are set, but this build only has the embedded store and queue; \
                 unset them to run on DATA_DIR"
            ),
        };

        let routes = match &config.routes_file {
            Some(path) => Routes::load(path)?,
            None => Routes::default_table(),
        };

        let engine = Arc::new(PluginEngine::new()?);
        let registry = Arc::new(Registry::new(engine, config.env.clone()));
        let metrics = Metrics::new();
        let plugins_dir = config.plugins_dir.clone();
        let loader = registry.clone();
        let failures = tokio::task::spawn_blocking(move || loader.load_dir(&plugins_dir)).await?;
        for (dir, error) in &failures {
            metrics.plugin_load_failures.inc();
            tracing::error!(plugin_dir = %dir.display(), %error, "plugin failed to load");
        }
        let set = registry.snapshot();
        if set.sources.is_empty() {
            bail!(
                "no source plugin loaded from PLUGINS_DIR={}: every webhook would be refused",
                config.plugins_dir.display()
            );
        }
        for p in set.sources.values().chain(set.destinations.values()) {
            tracing::info!(
                plugin = p.name(),
                version = %p.manifest.version,
                kind = %p.manifest.kind,
                digest = &p.digest[..12],
                "plugin loaded"
            );
            if p.manifest.kind == Kind::Destination && !p.config.missing.is_empty() {
                tracing::warn!(
                    plugin = p.name(),
                    missing = %p.config.missing.join(", "),
                    "destination {} is not configured: set {}; its jobs will fail with that reason",
                    p.name(),
                    p.config.missing.join(" and ")
                );
            }
        }
        for destination in routes.destinations() {
            if !set.destinations.contains_key(&destination) {
                tracing::warn!(%destination, "a route names destination {destination}, but no such plugin is loaded");
            }
        }

        Ok(Arc::new(App { config, store, queue, plugins: registry, routes: RwLock::new(Arc::new(routes)), metrics }))
    }

    /// The routing table in force.
    pub fn routes(&self) -> Arc<Routes> {
        self.routes.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Replace the routing table.
    pub fn set_routes(&self, routes: Routes) {
        *self.routes.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(routes);
    }
}

/// Run the API on `listener` and the workers until `shutdown` turns true.
pub async fn serve(app: Arc<App>, listener: TcpListener, mut shutdown: watch::Receiver<bool>) -> anyhow::Result<()> {
    worker::recover_unqueued(&app).await;
    let workers = worker::spawn(app.clone(), shutdown.clone());
    let router = api::router(app.clone());
    let addr = listener.local_addr()?;
    tracing::info!(%addr, workers = app.config.workers, "crm-event-handler listening");
    axum::serve(listener, router)
        .with_graceful_shutdown(async move {
            let _ = shutdown.wait_for(|stop| *stop).await;
        })
        .await?;
    for w in workers {
        let _ = w.await;
    }
    tracing::info!("stopped");
    Ok(())
}
