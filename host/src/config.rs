//! Typed configuration, loaded once from the environment (and `.env`) and
//! validated at start-up. Every error names the variable and what it expects.
//! Secrets are wrapped in [`Secret`], whose `Debug` prints `«redacted»`.

use std::collections::HashMap;
use std::fmt;
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};

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
    pub api_key: Secret,
    /// Status answered for a missing or wrong `x-api-key` (202 as the original
    /// documented, or 401).
    pub auth_failure_status: u16,
    pub max_body_bytes: usize,
    pub store: StoreBackend,
    pub queue: QueueBackend,
    /// MongoDB collection for receipts.
    pub db_collection: String,
    /// Prefix of every Redis key, so deployments can share a Redis.
    pub redis_key_prefix: String,
    /// A reserved Redis job idle this long is taken over by another worker.
    pub visibility_timeout: Duration,
    pub data_dir: PathBuf,
    pub plugins_dir: PathBuf,
    /// Compiled plugins are cached here (default `DATA_DIR/plugin-cache`).
    pub plugin_cache_dir: PathBuf,
    /// How often PLUGINS_DIR and ROUTES_FILE are checked for changes;
    /// `None` turns hot reload off.
    pub reload_interval: Option<Duration>,
    /// Routing table file; `None` means the built-in default table.
    pub routes_file: Option<PathBuf>,
    pub retry: RetryPolicy,
    /// Concurrent deliveries per process.
    pub workers: usize,
    pub log_format: LogFormat,
    /// The environment as loaded, from which plugin manifests resolve the
    /// variables their `[config]` keys name (e.g. `META_ACCESS_TOKEN`).
    pub env: Environment,
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

/// Variables the built-in plugins read; validated here so a typo fails at
/// start-up, not on the first delivery.
const URL_VARS: [&str; 2] = ["META_GRAPH_URL", "BREVO_API_URL"];

impl Config {
    /// Load from the process environment, after reading `.env` if present.
    pub fn from_env() -> anyhow::Result<Config> {
        Config::from_vars(Environment::load()?.0)
    }

    /// Build and validate from an explicit set of variables.
    pub fn from_vars(env: HashMap<String, String>) -> anyhow::Result<Config> {
        let get = |name: &str| env.get(name).map(|v| v.trim().to_string()).filter(|v| !v.is_empty());

        let api_key = match get("API_KEY") {
            Some(k) => Secret::new(k),
            None => bail!(
                "API_KEY is not set: set it to the key your CRM sends in the x-api-key header \
                 (every webhook would be refused without it)"
            ),
        };
        let port = parse(&get, "PORT", 3000u16, "a TCP port number (0-65535)")?;
        let host = parse(&get, "HOST", IpAddr::from([0, 0, 0, 0]), "an IP address to listen on, e.g. 127.0.0.1")?;
        let auth_failure_status = parse(&get, "AUTH_FAILURE_STATUS", 202u16, "202 or 401")?;
        if !matches!(auth_failure_status, 202 | 401) {
            bail!("AUTH_FAILURE_STATUS must be 202 or 401, got {auth_failure_status}");
        }
        let max_body_bytes = parse(&get, "MAX_BODY_BYTES", 1_048_576usize, "a size in bytes")?;

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
        let workers = parse(&get, "WORKERS", 8usize, "a whole number of concurrent deliveries, at least 1")?;
        if workers == 0 {
            bail!("WORKERS must be at least 1");
        }

        if let Some(v) = get("META_API_VERSION") {
            let ok = v.strip_prefix('v').is_some_and(|rest| {
                rest.split('.').count() == 2
                    && rest.split('.').all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
            });
            if !ok {
                bail!("META_API_VERSION must look like v21.0, got {v:?}");
            }
        }
        for var in URL_VARS {
            if let Some(v) = get(var) {
                let url =
                    url::Url::parse(&v).with_context(|| format!("{var} must be an absolute http(s) URL, got {v:?}"))?;
                if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
                    bail!("{var} must be an absolute http(s) URL, got {v:?}");
                }
            }
        }

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

        Ok(Config {
            db_collection: get("DB_COLLECTION").unwrap_or_else(|| "webhook_receipts".to_string()),
            redis_key_prefix: get("REDIS_KEY_PREFIX").unwrap_or_else(|| "crm".to_string()),
            visibility_timeout: Duration::from_millis(visibility_ms),
            plugin_cache_dir: get("PLUGIN_CACHE_DIR")
                .map(PathBuf::from)
                .unwrap_or_else(|| data_dir.join("plugin-cache")),
            reload_interval: (reload_ms > 0).then(|| Duration::from_millis(reload_ms)),
            host,
            port,
            base_url: get("BASE_URL"),
            api_key,
            auth_failure_status,
            max_body_bytes,
            store,
            queue,
            data_dir,
            plugins_dir: get("PLUGINS_DIR").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("plugins")),
            routes_file: get("ROUTES_FILE").map(PathBuf::from),
            retry: RetryPolicy { max_attempts, base_delay: Duration::from_millis(base_delay_ms) },
            workers,
            log_format,
            env: Environment(env),
        })
    }
}

/// A connection URI with any `user:password@` replaced, for messages.
pub fn redact_uri(uri: &str) -> String {
    match (uri.find("://"), uri.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => format!("{}«credentials»{}", &uri[..scheme + 3], &uri[at..]),
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
    }

    #[test]
    fn errors_name_the_variable() {
        let err = |pairs: &[(&str, &str)]| Config::from_vars(vars(pairs)).unwrap_err().to_string();
        assert!(err(&[]).starts_with("API_KEY is not set"));
        assert!(err(&[("API_KEY", "k"), ("PORT", "http")]).contains("PORT must be a TCP port"));
        assert!(err(&[("API_KEY", "k"), ("DB_URI", "postgres://x")]).starts_with("DB_URI must start with mongodb://"));
        assert!(err(&[("API_KEY", "k"), ("RETRY_MAX_ATTEMPTS", "0")]).contains("RETRY_MAX_ATTEMPTS"));
        assert!(err(&[("API_KEY", "k"), ("META_API_VERSION", "21")]).contains("META_API_VERSION must look like v21.0"));
        assert!(err(&[("API_KEY", "k"), ("META_GRAPH_URL", "graph.facebook.com")]).contains("META_GRAPH_URL"));
        assert!(err(&[("API_KEY", "k"), ("AUTH_FAILURE_STATUS", "403")]).contains("202 or 401"));
    }

    #[test]
    fn uris_lose_their_credentials_in_messages() {
        assert_eq!(redact_uri("mongodb://app:s3cret@db:27017/crm"), "mongodb://«credentials»@db:27017/crm");
        assert_eq!(redact_uri("redis://127.0.0.1:6379"), "redis://127.0.0.1:6379");
    }

    #[test]
    fn secrets_are_redacted_in_debug() {
        let c = Config::from_vars(vars(&[("API_KEY", "hunter2")])).unwrap();
        let shown = format!("{:?}", c.api_key);
        assert_eq!(shown, "«redacted»");
        assert!(!format!("{c:?}").contains("hunter2"));
    }
}
