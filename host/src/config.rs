//! Typed configuration, loaded once from the environment (and `.env`) and
//! validated at start-up. Every error names the variable and what it expects.
//! Secrets are wrapped in [`Secret`], whose `Debug` prints `«redacted»`.

use std::collections::HashMap;
use std::fmt;
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};

use crate::plugins::grants::PluginEnv;
use crate::worker::retry::RetryPolicy;

/// A value that must never reach a log.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }
    /// The secret itself, for the one place that needs it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("«redacted»")
    }
}

/// Where receipts are stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreBackend {
    /// Durable single-node store in `DATA_DIR`.
    Embedded,
    /// `DB_URI=mongodb://…`.
    MongoDb(String),
}

/// Where jobs are queued.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QueueBackend {
    /// Durable single-node queue in `DATA_DIR`.
    Embedded,
    /// `REDIS_URI=redis://…`.
    Redis(String),
}

/// How logs are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Json,
    Pretty,
    /// JSON unless stderr is a terminal.
    Auto,
}

/// The whole service configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub host: IpAddr,
    pub port: u16,
    pub base_url: Option<String>,
    /// Keys a CRM may send in `x-api-key`: `API_KEY`, and `API_KEY_PREVIOUS`
    /// while a rotation is under way.
    pub webhook_keys: Vec<Secret>,
    /// `ADMIN_API_KEY`: opens the operator routes. Unset: the webhook keys
    /// open them, from loopback addresses only.
    pub admin_key: Option<Secret>,
    /// Status answered for a missing or wrong `x-api-key` (202 as the original
    /// documented, or 401).
    pub auth_failure_status: u16,
    pub max_body_bytes: usize,
    /// Request heads must arrive within this; idle keep-alive connections
    /// are closed after it too.
    pub header_timeout: Duration,
    /// A whole request (head, body and answer) must be done within this.
    pub request_timeout: Duration,
    /// Connections open at once; more are closed as they arrive.
    pub max_connections: usize,
    /// Inbound requests per client address per window; `None` turns the
    /// limit off.
    pub rate_limit: Option<RateLimit>,
    pub store: StoreBackend,
    pub queue: QueueBackend,
    /// MongoDB collection for receipts.
    pub db_collection: String,
    /// Prefix of every Redis key, so deployments can share a Redis.
    pub redis_key_prefix: String,
    /// A reserved Redis job idle this long is taken over by another worker.
    pub visibility_timeout: Duration,
    /// `WORKER_ID`: this process's name among the Redis queue's consumers,
    /// stable across restarts so a restarted process takes back at once the
    /// jobs it held when it was killed. Unset: a fresh name per start.
    pub worker_id: Option<String>,
    /// After SIGTERM, deliveries in flight may take this long to finish.
    pub shutdown_timeout: Duration,
    pub data_dir: PathBuf,
    pub plugins_dir: PathBuf,
    /// Compiled plugins are cached here (default `DATA_DIR/plugin-cache`).
    pub plugin_cache_dir: PathBuf,
    /// `BUNDLED_PLUGINS`: the plugins built into the binary that load where
    /// no folder in PLUGINS_DIR provides one of that name (default: all;
    /// `none`: only PLUGINS_DIR's).
    pub bundled_plugins: Vec<String>,
    /// How often PLUGINS_DIR and ROUTES_FILE are checked for changes;
    /// `None` turns hot reload off.
    pub reload_interval: Option<Duration>,
    /// Routing table file; `None` means the built-in default table.
    pub routes_file: Option<PathBuf>,
    pub retry: RetryPolicy,
    pub alerts: AlertSettings,
    pub breaker: BreakerSettings,
    pub retention: RetentionSettings,
    /// Concurrent deliveries per process.
    pub workers: usize,
    /// Plugin instances that may run at once (parses and deliveries); the
    /// workers' share is reserved for them.
    pub plugin_instances: u32,
    pub log_format: LogFormat,
    /// The environment as plugins may see it: host settings removed, reads
    /// checked against `PLUGIN_GRANTS`.
    pub plugin_env: PluginEnv,
}

/// The original service's alert settings (`ALERT_*`), working here.
#[derive(Debug, Clone, PartialEq)]
pub struct AlertSettings {
    pub enabled: bool,
    /// Alert when more jobs than this wait (ready or due for retry)...
    pub waiting_threshold: u64,
    /// ...for longer than this.
    pub backlog: Duration,
    /// At most one alert e-mail per this.
    pub cooldown: Duration,
    /// `ALERT_RECIPIENTS`; none: alerts are only logged and counted.
    pub recipients: Vec<String>,
}

/// The circuit breaker: `BREAKER_FAILURES` deliveries to one destination
/// failing in a row (retryable failures, in one process) pause it; every
/// `BREAKER_PROBE_AFTER_MS` one waiting job probes it, and the first
/// delivered resumes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BreakerSettings {
    /// 0 turns the breaker off.
    pub failures: u32,
    pub probe_after: Duration,
}

/// How long what was received is kept (None: for ever).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetentionSettings {
    /// `RETENTION_DAYS`: settled receipts and dead letters older than this
    /// are removed.
    pub receipts: Option<Duration>,
    /// `REQUEST_BODY_RETENTION_DAYS`: what the CRM sent (headers, body,
    /// and the request bodies in attempt logs) is purged after this.
    pub request_bodies: Option<Duration>,
}

/// `RATE_LIMIT_MAX` requests per `RATE_LIMIT_WINDOW_MS`, per client address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimit {
    pub max: u32,
    pub window: Duration,
}

/// The environment variables as loaded. `Debug` lists no values: many are
/// secrets.
#[derive(Clone, Default)]
pub struct Environment(HashMap<String, String>);

impl Environment {
    /// The process environment, after reading `.env` if present.
    pub fn load() -> anyhow::Result<Environment> {
        match dotenvy::dotenv() {
            Ok(_) => {}
            Err(e) if e.not_found() => {}
            Err(e) => return Err(e).context("could not read .env"),
        }
        Ok(Environment(std::env::vars().collect()))
    }

    /// This environment without the named variables.
    pub fn without(&self, names: &[&str]) -> Environment {
        Environment(
            self.0.iter().filter(|(k, _)| !names.contains(&k.as_str())).map(|(k, v)| (k.clone(), v.clone())).collect(),
        )
    }

    /// This environment with `vars` set on top.
    pub fn overlay(&self, vars: HashMap<String, String>) -> Environment {
        let mut all = self.0.clone();
        all.extend(vars);
        Environment(all)
    }

    /// A variable's value, if set and not blank.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0.get(name).map(|v| v.trim()).filter(|v| !v.is_empty())
    }
}

impl fmt::Debug for Environment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Environment({} variables)", self.0.len())
    }
}

impl From<HashMap<String, String>> for Environment {
    fn from(vars: HashMap<String, String>) -> Self {
        Environment(vars)
    }
}

/// Every variable the host itself reads. None of them is ever given to a
/// plugin (see `plugins::grants`); the loader below may read no other.
pub const HOST_VARS: &[&str] = &[
    "ADMIN_API_KEY",
    "ALERT_QUEUE_BACKLOG_MINUTES",
    "ALERT_QUEUE_COOLDOWN_MINUTES",
    "ALERT_QUEUE_ENABLED",
    "ALERT_QUEUE_WAITING_THRESHOLD",
    "ALERT_RECIPIENTS",
    "API_KEY",
    "API_KEY_PREVIOUS",
    "AUTH_FAILURE_STATUS",
    "BASE_URL",
    "BREAKER_FAILURES",
    "BREAKER_PROBE_AFTER_MS",
    "BUNDLED_PLUGINS",
    "DATA_DIR",
    "DB_COLLECTION",
    "DB_URI",
    "HOST",
    "HTTP_HEADER_TIMEOUT_MS",
    "HTTP_MAX_CONNECTIONS",
    "HTTP_REQUEST_TIMEOUT_MS",
    "LOG",
    "LOG_FORMAT",
    "MAX_BODY_BYTES",
    "PLUGINS_DIR",
    "PLUGIN_CACHE_DIR",
    "PLUGIN_GRANTS",
    "PLUGIN_SHADOWS",
    "PLUGIN_INSTANCES",
    "PLUGIN_RELOAD_MS",
    "PORT",
    "QUEUE_VISIBILITY_TIMEOUT_MS",
    "RATE_LIMIT_MAX",
    "RATE_LIMIT_WINDOW_MS",
    "REDIS_KEY_PREFIX",
    "REDIS_URI",
    "REQUEST_BODY_RETENTION_DAYS",
    "RETENTION_DAYS",
    "RETRY_BASE_DELAY_MS",
    "RETRY_MAX_ATTEMPTS",
    "ROUTES_FILE",
    "SHUTDOWN_TIMEOUT_MS",
    "WORKERS",
    "WORKER_ID",
];

/// Whether `name` is one of the host's own settings.
pub fn is_host_var(name: &str) -> bool {
    HOST_VARS.contains(&name)
}

impl Config {
    /// Load from the process environment, after reading `.env` if present.
    pub fn from_env() -> anyhow::Result<Config> {
        Config::from_vars(Environment::load()?.0)
    }

    /// Build and validate from an explicit set of variables.
    pub fn from_vars(env: HashMap<String, String>) -> anyhow::Result<Config> {
        let get = |name: &str| {
            debug_assert!(is_host_var(name), "{name} is read by the host but missing from HOST_VARS");
            env.get(name).map(|v| v.trim().to_string()).filter(|v| !v.is_empty())
        };

        let api_key = match get("API_KEY") {
            Some(k) => Secret::new(k),
            None => bail!(
                "API_KEY is not set: set it to the key your CRM sends in the x-api-key header \
                 (every webhook would be refused without it)"
            ),
        };
        let mut webhook_keys = vec![api_key];
        webhook_keys.extend(get("API_KEY_PREVIOUS").map(Secret::new));
        let admin_key = get("ADMIN_API_KEY").map(Secret::new);
        if admin_key.as_ref().is_some_and(|admin| webhook_keys.contains(admin)) {
            bail!(
                "ADMIN_API_KEY must differ from API_KEY and API_KEY_PREVIOUS: the CRM's key must not open the operator routes"
            );
        }
        let port = parse(&get, "PORT", 3000u16, "a TCP port number (0-65535)")?;
        let host = parse(&get, "HOST", IpAddr::from([0, 0, 0, 0]), "an IP address to listen on, e.g. 127.0.0.1")?;
        let auth_failure_status = parse(&get, "AUTH_FAILURE_STATUS", 202u16, "202 or 401")?;
        if !matches!(auth_failure_status, 202 | 401) {
            bail!("AUTH_FAILURE_STATUS must be 202 or 401, got {auth_failure_status}");
        }
        let max_body_bytes = parse(&get, "MAX_BODY_BYTES", 1_048_576usize, "a size in bytes")?;
        let header_ms = parse(&get, "HTTP_HEADER_TIMEOUT_MS", 10_000u64, "a duration in milliseconds")?;
        let request_ms = parse(&get, "HTTP_REQUEST_TIMEOUT_MS", 30_000u64, "a duration in milliseconds")?;
        if header_ms == 0 || request_ms == 0 {
            bail!("HTTP_HEADER_TIMEOUT_MS and HTTP_REQUEST_TIMEOUT_MS must be at least 1");
        }
        let max_connections = parse(&get, "HTTP_MAX_CONNECTIONS", 10_000usize, "a number of connections, at least 1")?;
        if max_connections == 0 {
            bail!("HTTP_MAX_CONNECTIONS must be at least 1");
        }
        let rate_max = parse(&get, "RATE_LIMIT_MAX", 60_000u32, "a number of requests (0 turns the limit off)")?;
        let rate_window_ms = parse(&get, "RATE_LIMIT_WINDOW_MS", 60_000u64, "a duration in milliseconds, at least 1")?;
        if rate_window_ms == 0 {
            bail!("RATE_LIMIT_WINDOW_MS must be at least 1");
        }
        let rate_limit =
            (rate_max > 0).then(|| RateLimit { max: rate_max, window: Duration::from_millis(rate_window_ms) });

        let store = match get("DB_URI") {
            None => StoreBackend::Embedded,
            Some(uri) if uri.starts_with("mongodb://") || uri.starts_with("mongodb+srv://") => {
                StoreBackend::MongoDb(uri)
            }
            Some(_) => bail!("DB_URI must start with mongodb:// or mongodb+srv:// (unset it for the embedded store)"),
        };
        let queue = match get("REDIS_URI") {
            None => QueueBackend::Embedded,
            Some(uri) if uri.starts_with("redis://") || uri.starts_with("rediss://") => QueueBackend::Redis(uri),
            Some(_) => bail!("REDIS_URI must start with redis:// or rediss:// (unset it for the embedded queue)"),
        };

        let max_attempts = parse(&get, "RETRY_MAX_ATTEMPTS", 5u32, "a whole number of attempts, at least 1")?;
        if max_attempts == 0 {
            bail!("RETRY_MAX_ATTEMPTS must be at least 1");
        }
        let base_delay_ms = parse(&get, "RETRY_BASE_DELAY_MS", 5000u64, "a delay in milliseconds")?;
        let workers = parse(&get, "WORKERS", 64usize, "a whole number of concurrent deliveries, at least 1")?;
        if workers == 0 {
            bail!("WORKERS must be at least 1");
        }
        let plugin_instances = parse(&get, "PLUGIN_INSTANCES", 1000u32, "a number of plugin instances")?;
        if (plugin_instances as usize) <= workers || plugin_instances > 10_000 {
            bail!("PLUGIN_INSTANCES must be more than WORKERS ({workers}) and at most 10000, got {plugin_instances}");
        }
        debug_assert!(is_host_var("PLUGIN_GRANTS"));
        let plugin_env = PluginEnv::from_environment(&Environment(env.clone())).map_err(|e| anyhow::anyhow!(e))?;

        let log_format = match get("LOG_FORMAT").as_deref() {
            None | Some("auto") => LogFormat::Auto,
            Some("json") => LogFormat::Json,
            Some("pretty") => LogFormat::Pretty,
            Some(other) => bail!("LOG_FORMAT must be json, pretty or auto, got {other:?}"),
        };

        let data_dir = get("DATA_DIR").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("data"));
        let reload_ms =
            parse(&get, "PLUGIN_RELOAD_MS", 500u64, "a poll interval in milliseconds (0 turns hot reload off)")?;

        let visibility_ms = parse(&get, "QUEUE_VISIBILITY_TIMEOUT_MS", 120_000u64, "a duration in milliseconds")?;
        if visibility_ms < 1000 {
            bail!("QUEUE_VISIBILITY_TIMEOUT_MS must be at least 1000");
        }

        let alerts = AlertSettings {
            enabled: match get("ALERT_QUEUE_ENABLED").as_deref().map(str::trim) {
                None | Some("true" | "1" | "yes") => true,
                Some("false" | "0" | "no") => false,
                Some(other) => bail!("ALERT_QUEUE_ENABLED must be true or false, got {other:?}"),
            },
            waiting_threshold: parse(&get, "ALERT_QUEUE_WAITING_THRESHOLD", 50u64, "a whole number of jobs")?,
            backlog: minutes(&get, "ALERT_QUEUE_BACKLOG_MINUTES", 5.0)?,
            cooldown: minutes(&get, "ALERT_QUEUE_COOLDOWN_MINUTES", 30.0)?,
            recipients: get("ALERT_RECIPIENTS")
                .map(|list| list.split(',').map(str::trim).filter(|a| !a.is_empty()).map(String::from).collect())
                .unwrap_or_default(),
        };
        if alerts.cooldown < Duration::from_secs(60) {
            bail!("ALERT_QUEUE_COOLDOWN_MINUTES must be at least 1 (one alert e-mail per cooldown)");
        }
        if let Some(bad) = alerts.recipients.iter().find(|a| !a.contains('@')) {
            bail!("ALERT_RECIPIENTS must be e-mail addresses separated by commas, got {bad:?}");
        }
        let known = crate::plugins::bundled::names();
        let bundled_plugins: Vec<String> = match get("BUNDLED_PLUGINS").as_deref().map(str::trim) {
            None => known.iter().map(|n| n.to_string()).collect(),
            Some("none") => Vec::new(),
            Some(list) => list.split(',').map(|n| n.trim().to_string()).filter(|n| !n.is_empty()).collect(),
        };
        if let Some(unknown) = bundled_plugins.iter().find(|n| !known.contains(&n.as_str())) {
            bail!("BUNDLED_PLUGINS names {unknown:?}; the bundled plugins are {} (or none)", known.join(", "));
        }
        let shutdown_ms = parse(&get, "SHUTDOWN_TIMEOUT_MS", 20_000u64, "a duration in milliseconds")?;
        let breaker = BreakerSettings {
            failures: parse(&get, "BREAKER_FAILURES", 10u32, "a whole number of failures in a row (0: off)")?,
            probe_after: Duration::from_millis(parse(
                &get,
                "BREAKER_PROBE_AFTER_MS",
                30_000u64,
                "a duration in milliseconds",
            )?),
        };
        if breaker.probe_after < Duration::from_millis(100) {
            bail!("BREAKER_PROBE_AFTER_MS must be at least 100");
        }
        let receipts = days(&get, "RETENTION_DAYS", 30.0)?;
        let retention = RetentionSettings {
            receipts,
            request_bodies: match get("REQUEST_BODY_RETENTION_DAYS") {
                None => receipts,
                Some(_) => days(&get, "REQUEST_BODY_RETENTION_DAYS", 0.0)?,
            },
        };
        if let (Some(receipts), Some(bodies)) = (retention.receipts, retention.request_bodies)
            && bodies > receipts
        {
            bail!("REQUEST_BODY_RETENTION_DAYS must not exceed RETENTION_DAYS (request bodies go with their receipts)");
        }
        let worker_id = get("WORKER_ID");
        if let Some(id) = &worker_id
            && (id.is_empty() || id.len() > 200 || id.chars().any(|c| c.is_whitespace() || c.is_control()))
        {
            bail!("WORKER_ID must be 1 to 200 characters without spaces, got {id:?}");
        }

        Ok(Config {
            alerts,
            breaker,
            retention,
            worker_id,
            shutdown_timeout: Duration::from_millis(shutdown_ms),
            db_collection: get("DB_COLLECTION").unwrap_or_else(|| "webhook_receipts".to_string()),
            redis_key_prefix: get("REDIS_KEY_PREFIX").unwrap_or_else(|| "crm".to_string()),
            visibility_timeout: Duration::from_millis(visibility_ms),
            bundled_plugins,
            plugin_cache_dir: get("PLUGIN_CACHE_DIR")
                .map(PathBuf::from)
                .unwrap_or_else(|| data_dir.join("plugin-cache")),
            reload_interval: (reload_ms > 0).then(|| Duration::from_millis(reload_ms)),
            host,
            port,
            base_url: get("BASE_URL"),
            webhook_keys,
            admin_key,
            auth_failure_status,
            max_body_bytes,
            header_timeout: Duration::from_millis(header_ms),
            request_timeout: Duration::from_millis(request_ms),
            max_connections,
            rate_limit,
            store,
            queue,
            data_dir,
            plugins_dir: get("PLUGINS_DIR").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("plugins")),
            routes_file: get("ROUTES_FILE").map(PathBuf::from),
            retry: RetryPolicy { max_attempts, base_delay: Duration::from_millis(base_delay_ms) },
            workers,
            plugin_instances,
            log_format,
            plugin_env,
        })
    }
}

/// A connection URI with any `user:password@` replaced, for messages.
pub fn redact_uri(uri: &str) -> String {
    match (uri.find("://"), uri.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            format!("{}«credentials»{}", &uri[..scheme + 3], &uri[at..])
        }
        _ => uri.to_string(),
    }
}

fn parse<T: std::str::FromStr>(
    get: &impl Fn(&str) -> Option<String>,
    name: &str,
    default: T,
    expected: &str,
) -> anyhow::Result<T> {
    match get(name) {
        None => Ok(default),
        Some(v) => v.parse().map_err(|_| anyhow::anyhow!("{name} must be {expected}, got {v:?}")),
    }
}

/// A number of days, fractions allowed; 0: for ever (None).
fn days(get: &impl Fn(&str) -> Option<String>, name: &str, default: f64) -> anyhow::Result<Option<Duration>> {
    let value = parse(get, name, default, "a number of days (fractions allowed; 0: keep for ever)")?;
    if value == 0.0 {
        return Ok(None);
    }
    Duration::try_from_secs_f64(value * 86_400.0)
        .ok()
        .filter(|d| *d >= Duration::from_millis(100))
        .map(Some)
        .ok_or_else(|| {
            anyhow::anyhow!(
                "{name} must be 0 (keep for ever) or a number of days from 0.000002 (0.1 s) to 10^13; got {value}"
            )
        })
}

/// A number of minutes, fractions allowed.
fn minutes(get: &impl Fn(&str) -> Option<String>, name: &str, default: f64) -> anyhow::Result<Duration> {
    let value = parse(get, name, default, "a number of minutes (fractions allowed)")?;
    Duration::try_from_secs_f64(value * 60.0)
        .map_err(|_| anyhow::anyhow!("{name} must be a number of minutes, 0 or more, got {value}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn defaults_run_embedded() {
        let c = Config::from_vars(vars(&[("API_KEY", "k")])).unwrap();
        assert_eq!(c.port, 3000);
        assert_eq!(c.store, StoreBackend::Embedded);
        assert_eq!(c.queue, QueueBackend::Embedded);
        assert_eq!(c.retry.max_attempts, 5);
        assert_eq!(c.retry.base_delay, Duration::from_millis(5000));
        assert_eq!(c.auth_failure_status, 202);
        assert_eq!(c.admin_key, None);
        assert_eq!(c.rate_limit, Some(RateLimit { max: 60_000, window: Duration::from_secs(60) }));
        assert_eq!((c.header_timeout, c.request_timeout), (Duration::from_secs(10), Duration::from_secs(30)));
    }

    #[test]
    fn a_rotation_accepts_the_previous_key_too() {
        let c = Config::from_vars(vars(&[("API_KEY", "new"), ("API_KEY_PREVIOUS", "old")])).unwrap();
        assert_eq!(c.webhook_keys, [Secret::new("new"), Secret::new("old")]);
    }

    #[test]
    fn errors_name_the_variable() {
        let err = |pairs: &[(&str, &str)]| Config::from_vars(vars(pairs)).unwrap_err().to_string();
        assert!(err(&[]).starts_with("API_KEY is not set"));
        assert!(err(&[("API_KEY", "k"), ("PORT", "http")]).contains("PORT must be a TCP port"));
        assert!(err(&[("API_KEY", "k"), ("DB_URI", "postgres://x")]).starts_with("DB_URI must start with mongodb://"));
        assert!(err(&[("API_KEY", "k"), ("RETRY_MAX_ATTEMPTS", "0")]).contains("RETRY_MAX_ATTEMPTS"));
        assert!(err(&[("API_KEY", "k"), ("AUTH_FAILURE_STATUS", "403")]).contains("202 or 401"));
        assert!(err(&[("API_KEY", "k"), ("ADMIN_API_KEY", "k")]).starts_with("ADMIN_API_KEY must differ from API_KEY"));
        assert!(
            err(&[("API_KEY", "k"), ("PLUGIN_GRANTS", "evil=DB_URI")])
                .contains("DB_URI is one of the host's own settings")
        );
        assert!(err(&[("API_KEY", "k"), ("RATE_LIMIT_WINDOW_MS", "0")]).contains("RATE_LIMIT_WINDOW_MS"));
        assert!(err(&[("API_KEY", "k"), ("PLUGIN_INSTANCES", "64")]).contains("more than WORKERS (64)"));
        assert!(err(&[("API_KEY", "k"), ("WORKER_ID", "host a")]).contains("WORKER_ID must be"));
        assert!(
            err(&[("API_KEY", "k"), ("ALERT_QUEUE_BACKLOG_MINUTES", "-1")]).contains("ALERT_QUEUE_BACKLOG_MINUTES")
        );
        assert!(err(&[("API_KEY", "k"), ("ALERT_RECIPIENTS", "ops@x.test, ops")]).contains("\"ops\""));
        assert!(err(&[("API_KEY", "k"), ("ALERT_QUEUE_ENABLED", "maybe")]).contains("true or false"));
        assert!(err(&[("API_KEY", "k"), ("ALERT_QUEUE_COOLDOWN_MINUTES", "0")]).contains("at least 1"));
        assert!(err(&[("API_KEY", "k"), ("SHUTDOWN_TIMEOUT_MS", "soon")]).contains("SHUTDOWN_TIMEOUT_MS"));
        assert!(
            err(&[("API_KEY", "k"), ("BREAKER_FAILURES", "-1")]).contains("BREAKER_FAILURES must be a whole number")
        );
        assert!(err(&[("API_KEY", "k"), ("BREAKER_PROBE_AFTER_MS", "5")]).contains("at least 100"));
        assert!(
            err(&[("API_KEY", "k"), ("RETENTION_DAYS", "-1")]).contains("RETENTION_DAYS must be 0 (keep for ever)")
        );
        assert!(
            err(&[("API_KEY", "k"), ("RETENTION_DAYS", "7"), ("REQUEST_BODY_RETENTION_DAYS", "30")])
                .contains("must not exceed RETENTION_DAYS")
        );
    }

    #[test]
    fn uris_lose_their_credentials_in_messages() {
        assert_eq!(redact_uri("mongodb://app:s3cret@db:27017/crm"), "mongodb://«credentials»@db:27017/crm");
        assert_eq!(redact_uri("redis://127.0.0.1:6379"), "redis://127.0.0.1:6379");
    }

    #[test]
    fn secrets_are_redacted_in_debug() {
        let c = Config::from_vars(vars(&[("API_KEY", "hunter2"), ("ADMIN_API_KEY", "opensesame")])).unwrap();
        let shown = format!("{:?}", c.webhook_keys[0]);
        assert_eq!(shown, "«redacted»");
        let all = format!("{c:?}");
        assert!(!all.contains("hunter2") && !all.contains("opensesame"));
    }
}
