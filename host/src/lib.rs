//! crm-event-handler: receives CRM deal webhooks and delivers the actions
//! they trigger (Meta Conversions API events, Brevo e-mails) through
//! sandboxed WebAssembly plugins.
//!
//! An event flows: `api` (HTTP) → `intake` (auth, source plugin parse,
//! receipts) → `store` (receipt, dedupe) → `queue` (one job per action) →
//! `worker` (destination plugin, retry policy, dead letters) → delivery
//! recorded on the receipt. This file wires those parts together.

pub mod alerts;
pub mod api;
mod batch;
pub mod config;
pub mod deploy;
pub mod dry_run;
pub mod event;
pub mod intake;
pub mod plugins;
pub mod queue;
pub mod retention;
pub mod routing;
pub mod scaffold;
pub mod store;
pub mod telemetry;
pub mod worker;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};

use anyhow::{Context, bail};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::config::{Config, QueueBackend, StoreBackend};
use crate::plugins::{CacheSettings, EngineOptions, Kind, PluginEngine, PoolShares, Registry};
use crate::queue::JobQueue;
use crate::routing::Routes;
use crate::store::ReceiptStore;
use crate::telemetry::Metrics;

/// Everything the API and the workers share.
pub struct App {
    pub config: Config,
    pub store: Arc<dyn ReceiptStore>,
    pub queue: Arc<dyn JobQueue>,
    /// With both embedded backends (one file): the queue, for writes that
    /// span a receipt and its jobs in one transaction.
    pub joint: Option<queue::embedded::EmbeddedQueue>,
    pub plugins: Arc<Registry>,
    routes: RwLock<Arc<Routes>>,
    pub metrics: Metrics,
    /// Failures in a row per destination, for the circuit breaker.
    pub breaker: worker::breaker::Breaker,
    /// Per-destination concurrency caps and rates (routes file).
    pub limiter: worker::limits::Limiter,
    /// The webhook and operator keys, as the API checks them.
    pub keys: api::Keys,
    /// Set on SIGTERM: webhooks are refused (503) and `/ready` is false
    /// while the deliveries in flight finish.
    stopping: AtomicBool,
}

impl App {
    /// Open the backends, load plugins and routes, and report what is not
    /// configured. Fails with a message naming the problem.
    pub async fn build(config: Config) -> anyhow::Result<Arc<App>> {
        // The embedded backends share one file.
        let file = match (&config.store, &config.queue) {
            (StoreBackend::MongoDb(_), QueueBackend::Redis(_)) => None,
            _ => Some(
                store::redb_file::open_embedded(&config.data_dir, config.queue == QueueBackend::Embedded).map_err(
                    |e| {
                        anyhow::anyhow!("cannot open the embedded store in DATA_DIR={}: {e}", config.data_dir.display())
                    },
                )?,
            ),
        };
        let store: Arc<dyn ReceiptStore> = match &config.store {
            StoreBackend::Embedded => {
                Arc::new(store::embedded::EmbeddedStore::new(file.clone().context("the embedded file is open")?))
            }
            StoreBackend::MongoDb(uri) => Arc::new(
                store::mongo::MongoStore::connect(uri, &config.db_collection)
                    .await
                    .with_context(|| format!("cannot use MongoDB at DB_URI={}", config::redact_uri(uri)))?,
            ),
        };
        let mut joint = None;
        let queue: Arc<dyn JobQueue> = match &config.queue {
            QueueBackend::Embedded => {
                let queue = queue::embedded::EmbeddedQueue::new(file.context("the embedded file is open")?)
                    .with_context(|| {
                        format!("cannot load the embedded queue in DATA_DIR={}", config.data_dir.display())
                    })?;
                if matches!(config.store, StoreBackend::Embedded) {
                    joint = Some(queue.clone());
                }
                Arc::new(queue)
            }
            QueueBackend::Redis(uri) => Arc::new(
                queue::redis::RedisQueue::connect(
                    uri,
                    &config.redis_key_prefix,
                    config.worker_id.as_deref(),
                    config.visibility_timeout,
                )
                .await
                .with_context(|| format!("cannot use Redis at REDIS_URI={}", config::redact_uri(uri)))?,
            ),
        };

        let routes = match &config.routes_file {
            Some(path) => Routes::load(path)?,
            None => Routes::default_table(),
        };

        let workers = config.workers as u32;
        let engine = Arc::new(PluginEngine::new(EngineOptions {
            cache: Some(CacheSettings {
                dir: config.plugin_cache_dir.clone(),
                key_file: config.data_dir.join("plugin-cache.key"),
            }),
            pool: PoolShares { parses: config.plugin_instances - workers, deliveries: workers },
        })?);
        let mut registry = Registry::new(engine, config.plugin_env.clone());
        let bundled = config.plugin_cache_dir.join("bundled");
        match plugins::bundled::write_out(&bundled) {
            Ok(()) => registry = registry.with_bundled(bundled, config.bundled_plugins.clone()),
            Err(e) => {
                tracing::warn!(dir = %bundled.display(), error = %e, "cannot write out the bundled plugins; only PLUGINS_DIR's load")
            }
        }
        let registry = Arc::new(registry);
        let metrics = Metrics::new();
        if registry.folders(&config.plugins_dir).is_empty() {
            bail!(
                "PLUGINS_DIR={} holds no plugin folder (a folder with a plugin.toml), and no plugin is bundled: \
                 every webhook would be refused",
                config.plugins_dir.display()
            );
        }
        let plugins_dir = config.plugins_dir.clone();
        let loader = registry.clone();
        let changes = tokio::task::spawn_blocking(move || loader.sync(&plugins_dir, false)).await?;
        report_changes(&metrics, &changes, false);
        let set = registry.snapshot();
        if set.sources.is_empty() {
            tracing::error!(
                plugins_dir = %config.plugins_dir.display(),
                "no source plugin loaded: webhooks are answered 503 until one loads (see GET /api/v1/plugins)"
            );
        }
        for p in set.all() {
            if !p.config.short_secrets.is_empty() {
                tracing::warn!(
                    plugin = p.name(),
                    variables = %p.config.short_secrets.join(", "),
                    "{} is shorter than {} characters: a test value? It is redacted only where it stands whole",
                    p.config.short_secrets.join(" and "),
                    plugins::manifest::SHORT_SECRET
                );
            }
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

        if config.admin_key.is_none() {
            tracing::warn!("ADMIN_API_KEY is not set: the operator routes accept API_KEY, from this machine only");
        }
        Ok(Arc::new(App {
            keys: api::Keys::new(&config),
            config,
            store,
            queue,
            joint,
            plugins: registry,
            routes: RwLock::new(Arc::new(routes)),
            metrics,
            breaker: Default::default(),
            limiter: Default::default(),
            stopping: AtomicBool::new(false),
        }))
    }

    /// Whether the process is stopping (see `serve_as`).
    pub fn stopping(&self) -> bool {
        self.stopping.load(Ordering::Relaxed)
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

/// Log what a plugin sync changed, and count failures.
fn report_changes(metrics: &Metrics, changes: &[plugins::Change], reload: bool) {
    for change in changes {
        match change {
            plugins::Change::Loaded { name, version, digest, replaced } => {
                let what = if *replaced { "plugin replaced" } else { "plugin loaded" };
                tracing::info!(plugin = %name, %version, digest = &digest[..12], reload, "{what}");
            }
            plugins::Change::Unloaded { name } => {
                tracing::warn!(plugin = %name, "plugin folder removed: plugin unloaded; its jobs will fail until it is back");
            }
            plugins::Change::Failed { dir, error } => {
                metrics.plugin_load_failures.inc();
                if reload {
                    tracing::error!(plugin_dir = %dir.display(), %error, "plugin change refused; the previous version keeps running");
                } else {
                    tracing::error!(plugin_dir = %dir.display(), %error, "plugin failed to load");
                }
            }
        }
    }
}

/// Poll PLUGINS_DIR and ROUTES_FILE; apply changes that validate, keep the
/// running version (and say why) when they do not.
async fn watch(app: Arc<App>, every: std::time::Duration, mut shutdown: watch::Receiver<bool>) {
    let stat = |p: &std::path::Path| std::fs::metadata(p).ok().map(|m| (m.len(), m.modified().ok()));
    let mut routes_seen = app.config.routes_file.as_deref().and_then(stat);
    // Like plugin folders, a changed file is read once it is the same on two polls.
    let mut routes_settling = routes_seen;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = shutdown.changed() => return,
        }
        let (registry, dir) = (app.plugins.clone(), app.config.plugins_dir.clone());
        match tokio::task::spawn_blocking(move || registry.sync(&dir, true)).await {
            Ok(changes) => report_changes(&app.metrics, &changes, true),
            Err(e) => tracing::error!(error = %e, "plugin reload task failed"),
        }
        if let Some(path) = &app.config.routes_file {
            let now = stat(path);
            let settled = now == routes_settling;
            routes_settling = now;
            if now != routes_seen && settled {
                routes_seen = now;
                match Routes::load(path) {
                    Ok(routes) => {
                        app.set_routes(routes);
                        tracing::info!(path = %path.display(), "routing table reloaded");
                    }
                    Err(error) => {
                        app.metrics.routes_reload_failures.inc();
                        tracing::error!(%error, "routing change refused; the previous table stays in force");
                    }
                }
            }
        }
    }
}

/// What a process runs. Several processes can share one MongoDB + Redis,
/// each with any role; with the embedded store there is one process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Role {
    /// Accept webhooks.
    pub api: bool,
    /// Deliver jobs.
    pub workers: bool,
}

impl Role {
    pub const BOTH: Role = Role { api: true, workers: true };
}

/// Run the service as `crm-event-handler serve` does: configuration from the
/// environment, logging, the API and the workers, until SIGINT or SIGTERM.
pub async fn run(role: Role) -> anyhow::Result<()> {
    let config = Config::from_env()?;
    let _log_writer = telemetry::init_logging(config.log_format);
    let addr = std::net::SocketAddr::new(config.host, config.port);
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr} (set PORT / HOST)"))?;
    let app = App::build(config).await?;
    let (stop, stopped) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        shutdown_signal().await;
        let _ = stop.send(true);
    });
    serve_as(app, listener, role, stopped).await
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = ctrl_c => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = ctrl_c.await;
            }
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

/// Run the API and the workers until `shutdown` turns true.
pub async fn serve(app: Arc<App>, listener: TcpListener, shutdown: watch::Receiver<bool>) -> anyhow::Result<()> {
    serve_as(app, listener, Role::BOTH, shutdown).await
}

/// Run what `role` says on `listener` until `shutdown` turns true. Health,
/// readiness, metrics and the operator endpoints are served in every role.
pub async fn serve_as(
    app: Arc<App>,
    listener: TcpListener,
    role: Role,
    shutdown: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    intake::recover_unqueued(&app).await;
    let mut workers = if role.workers { worker::spawn(app.clone(), shutdown.clone()) } else { Vec::new() };
    if role.workers {
        tokio::spawn(alerts::watch(app.clone(), shutdown.clone()));
        tokio::spawn(retention::run(app.clone(), shutdown.clone()));
    }
    if let Some(every) = app.config.reload_interval {
        tokio::spawn(watch(app.clone(), every, shutdown.clone()));
    }
    let router = if role.api { api::router(app.clone()) } else { api::operations_router(app.clone()) };
    let addr = listener.local_addr()?;
    let workers_running = if role.workers { app.config.workers } else { 0 };
    tracing::info!(%addr, api = role.api, workers = workers_running, "crm-event-handler listening");
    let limits = api::server::Limits {
        header_timeout: app.config.header_timeout,
        request_timeout: app.config.request_timeout,
        max_connections: app.config.max_connections,
    };
    let (close, closed) = watch::channel(false);
    let server = tokio::spawn(api::server::run(listener, router, limits, closed));
    let mut stop = shutdown.clone();
    let _ = stop.wait_for(|stop| *stop).await;

    // Intake stops first (webhooks 503, not ready) while the server still
    // answers, so a load balancer sees it; then the deliveries in flight
    // finish, up to the timeout; jobs still held are handed back at once.
    app.stopping.store(true, Ordering::Relaxed);
    let timeout = app.config.shutdown_timeout;
    tracing::info!(
        timeout_ms = timeout.as_millis() as u64,
        "shutting down: intake stopped, finishing deliveries in hand"
    );
    let finished = tokio::time::timeout(timeout, async {
        for w in workers.iter_mut() {
            let _ = w.await;
        }
    });
    if finished.await.is_err() {
        let cut = workers.iter().filter(|w| !w.is_finished()).count();
        tracing::warn!(deliveries = cut, "deliveries still running after SHUTDOWN_TIMEOUT_MS were cut off");
        for w in workers.into_iter().filter(|w| !w.is_finished()) {
            w.abort();
            let _ = w.await;
        }
    }
    match if role.workers { app.queue.release_held().await } else { Ok(0) } {
        Ok(0) => {}
        Ok(n) => tracing::info!(jobs = n, "jobs held by this process handed back to the queue"),
        Err(e) => {
            tracing::warn!(error = %e, "could not hand back the jobs this process held; they are taken over after QUEUE_VISIBILITY_TIMEOUT_MS")
        }
    }
    let _ = close.send(true);
    let _ = server.await;
    tracing::info!("stopped");
    Ok(())
}
