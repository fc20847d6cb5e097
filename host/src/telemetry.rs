//! Logging and metrics. Logs are JSON in production (or when stderr is not a
//! terminal) and human-readable in a terminal. Metrics follow
//! `crm_<subsystem>_<name>_<unit>[_total]` with low-cardinality labels only:
//! never a deal id, e-mail or key.

use std::io::IsTerminal;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use tracing_appender::non_blocking::{NonBlockingBuilder, WorkerGuard};
use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;
use crate::queue::QueueDepth;

/// Install the global tracing subscriber (once per process). Lines are
/// written to stderr by a thread of their own, many per write when they come
/// fast; a request waits only when 128,000 lines are waiting for a stalled
/// stderr (no line is dropped). Keep the guard until the end: dropping it
/// writes out what is left.
pub fn init_logging(format: LogFormat) -> WorkerGuard {
    let filter = EnvFilter::try_from_env("LOG").unwrap_or_else(|_| EnvFilter::new("info,wasmtime=warn,cranelift=warn"));
    let json = match format {
        LogFormat::Json => true,
        LogFormat::Pretty => false,
        LogFormat::Auto => !std::io::stderr().is_terminal(),
    };
    let (writer, guard) = NonBlockingBuilder::default()
        .lossy(false)
        .thread_name("log-writer")
        .finish(std::io::BufWriter::new(std::io::stderr()));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(writer);
    let _ = if json { builder.json().flatten_event(true).try_init() } else { builder.compact().try_init() };
    guard
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WebhookLabels {
    pub provider: String,
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DeliveryLabels {
    pub destination: String,
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DestinationLabels {
    pub destination: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PluginLabels {
    pub plugin: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PluginFailureLabels {
    pub plugin: String,
    pub kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct QueueLabels {
    pub queue: &'static str,
    pub state: &'static str,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.0005, 2.0, 20))
}

/// Every metric the service exports.
pub struct Metrics {
    registry: Registry,
    pub webhooks: Family<WebhookLabels, Counter>,
    pub deliveries: Family<DeliveryLabels, Counter>,
    pub delivery_latency: HistogramFamily<DestinationLabels>,
    pub plugin_duration: HistogramFamily<PluginLabels>,
    pub plugin_failures: Family<PluginFailureLabels, Counter>,
    pub plugin_load_failures: Counter,
    pub routes_reload_failures: Counter,
    pub queue_depth: Family<QueueLabels, Gauge>,
    pub alerts: Family<AlertLabels, Counter>,
    pub breaker_trips: Family<DestinationLabels, Counter>,
    pub destination_paused: Family<DestinationLabels, Gauge>,
    pub retention_removed: Family<RetentionLabels, Counter>,
    pub shadow_comparisons: Family<ShadowLabels, Counter>,
    pub shadow_mismatches: Family<ShadowLabels, Counter>,
    round_trips: Family<BackendLabels, Counter>,
    /// Two scrapes at once must not both add the same difference, nor
    /// both rebuild `destination_paused`.
    scrape_sync: std::sync::Mutex<()>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AlertLabels {
    /// `queue_backlog` or `dead_letter`.
    pub kind: &'static str,
    /// `sent`, `failed` (the e-mail), or `logged` (no recipients).
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ShadowLabels {
    /// The live destination plugin...
    pub destination: String,
    /// ...and the candidate shadowing it.
    pub candidate: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RetentionLabels {
    /// `receipts`, `dead_letters` (removed) or `request_bodies` (purged).
    pub what: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BackendLabels {
    pub backend: &'static str,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::default();
        let webhooks = Family::default();
        let deliveries = Family::default();
        let delivery_latency: HistogramFamily<DestinationLabels> = Family::new_with_constructor(latency_histogram);
        let plugin_duration: HistogramFamily<PluginLabels> = Family::new_with_constructor(latency_histogram);
        let plugin_failures = Family::default();
        let plugin_load_failures = Counter::default();
        let routes_reload_failures = Counter::default();
        let queue_depth = Family::default();
        let round_trips = Family::default();
        let alerts = Family::default();
        let breaker_trips = Family::default();
        let destination_paused = Family::default();
        let retention_removed = Family::default();
        let shadow_comparisons = Family::default();
        let shadow_mismatches = Family::default();
        registry.register(
            "crm_shadow_comparisons",
            "Attempts a shadow candidate ran beside, compared with the live version",
            shadow_comparisons.clone(),
        );
        registry.register(
            "crm_shadow_mismatches",
            "Comparisons where a shadow candidate's requests or outcome differed from the live version's",
            shadow_mismatches.clone(),
        );
        registry.register(
            "crm_retention",
            "Receipts and dead letters removed, and requests purged, by retention (RETENTION_DAYS, REQUEST_BODY_RETENTION_DAYS)",
            retention_removed.clone(),
        );
        registry.register(
            "crm_breaker_trips",
            "Times the circuit breaker paused a destination after failures in a row",
            breaker_trips.clone(),
        );
        registry.register(
            "crm_destination_paused",
            "1 while a destination is paused (by an operator or the circuit breaker), else 0",
            destination_paused.clone(),
        );
        registry.register(
            "crm_alerts",
            "Alerts raised (queue backlog, dead letters), by kind and what became of the e-mail",
            alerts.clone(),
        );
        registry.register(
            "crm_backend_round_trips",
            "Requests sent to the database or queue server (MongoDB, Redis); pipelined commands count once",
            round_trips.clone(),
        );
        registry.register("crm_webhooks_received", "Webhooks received, by provider and outcome", webhooks.clone());
        registry.register("crm_deliveries", "Delivery attempts, by destination and outcome", deliveries.clone());
        registry.register(
            "crm_delivery_latency_seconds",
            "Time from accepting a webhook to its action being delivered",
            delivery_latency.clone(),
        );
        registry.register(
            "crm_plugin_invocation_duration_seconds",
            "Wall time of one plugin call, host HTTP included",
            plugin_duration.clone(),
        );
        registry.register(
            "crm_plugin_failures",
            "Plugin calls that trapped or hit a limit, by kind",
            plugin_failures.clone(),
        );
        registry.register(
            "crm_plugin_load_failures",
            "Plugins that failed to load or validate",
            plugin_load_failures.clone(),
        );
        registry.register(
            "crm_routes_reload_failures",
            "Routing table changes refused as invalid",
            routes_reload_failures.clone(),
        );
        registry.register("crm_queue_depth", "Jobs in the queue, by state", queue_depth.clone());
        Metrics {
            registry,
            webhooks,
            deliveries,
            delivery_latency,
            plugin_duration,
            plugin_failures,
            plugin_load_failures,
            routes_reload_failures,
            queue_depth,
            alerts,
            breaker_trips,
            destination_paused,
            retention_removed,
            shadow_comparisons,
            shadow_mismatches,
            round_trips,
            scrape_sync: std::sync::Mutex::new(()),
        }
    }

    /// Bring a backend's round-trip counter up to the total it reports.
    pub fn set_round_trips(&self, backend: &'static str, total: u64) {
        if total > 0 {
            let _one_at_a_time = self.scrape_sync.lock().unwrap_or_else(|e| e.into_inner());
            let counter = self.round_trips.get_or_create(&BackendLabels { backend });
            counter.inc_by(total.saturating_sub(counter.get()));
        }
    }

    pub fn webhook(&self, provider: &str, outcome: &'static str) {
        self.webhooks.get_or_create(&WebhookLabels { provider: provider.to_string(), outcome }).inc();
    }

    pub fn delivery(&self, destination: &str, outcome: &'static str) {
        self.deliveries.get_or_create(&DeliveryLabels { destination: destination.to_string(), outcome }).inc();
    }

    /// Time one plugin call took.
    pub fn plugin_call(&self, plugin: &str, took: std::time::Duration) {
        self.plugin_duration.get_or_create(&PluginLabels { plugin: plugin.to_string() }).observe(took.as_secs_f64());
    }

    pub fn set_queue_depth(&self, depth: QueueDepth) {
        for (state, n) in [
            ("ready", depth.ready),
            ("delayed", depth.delayed),
            ("in_flight", depth.in_flight),
            ("dead", depth.dead),
            ("paused", depth.paused),
        ] {
            self.queue_depth.get_or_create(&QueueLabels { queue: "jobs", state }).set(n as i64);
        }
    }

    /// 1 for each paused destination, 0 for the other destinations loaded.
    pub fn set_paused<'a>(&self, loaded: &[String], paused: impl Iterator<Item = &'a str>) {
        let _one_at_a_time = self.scrape_sync.lock().unwrap_or_else(|e| e.into_inner());
        self.destination_paused.clear();
        for destination in loaded {
            self.destination_paused.get_or_create(&DestinationLabels { destination: destination.clone() }).set(0);
        }
        for destination in paused {
            self.destination_paused.get_or_create(&DestinationLabels { destination: destination.into() }).set(1);
        }
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}
