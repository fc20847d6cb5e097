//! `plugin.toml`: what a plugin is, what it may reach and read, and its
//! limits. Parsed strictly: an unknown field is an error, so a typo never
//! silently loosens the sandbox.
//!
//! ```toml
//! name = "meta-capi"              # also the destination / provider name
//! version = "0.1.0"
//! kind = "destination"            # or "source"
//! component = "meta-capi.wasm"    # relative to this file's folder
//! description = "…"               # optional
//! allowed_outbound_hosts = ["{graph_url}"]  # origins; "{key}" = a config key's URL
//!
//! [config.access_token]           # a key the plugin may read with config.get
//! env = "META_ACCESS_TOKEN"       # the host variable it comes from
//! secret = true                   # never logged or printed
//! required = true                 # the plugin is "not configured" without it
//!
//! [config.graph_url]
//! env = "META_GRAPH_URL"
//! default = "https://graph.facebook.com"
//!
//! [limits]
//! time_per_call_ms = 10000        # wall time per call, host HTTP included
//! memory_mb = 32                  # linear memory cap
//! ```

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::allow::{AllowList, AllowListError};
use crate::config::Environment;

/// Which world a plugin implements.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Source,
    Destination,
}

impl std::fmt::Display for Kind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Kind::Source => "source",
            Kind::Destination => "destination",
        })
    }
}

/// One configuration key a plugin may read.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigKey {
    /// Host environment variable holding the value.
    pub env: Option<String>,
    /// Value when the variable is unset.
    pub default: Option<String>,
    /// Redact the value from logs and dry-run output.
    #[serde(default)]
    pub secret: bool,
    /// The plugin cannot work without it.
    #[serde(default)]
    pub required: bool,
}

/// Resource limits per call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    #[serde(default = "default_time_ms")]
    pub time_per_call_ms: u64,
    #[serde(default = "default_memory_mb")]
    pub memory_mb: u64,
}

fn default_time_ms() -> u64 {
    5_000
}
fn default_memory_mb() -> u64 {
    32
}

impl Default for Limits {
    fn default() -> Self {
        Limits { time_per_call_ms: default_time_ms(), memory_mb: default_memory_mb() }
    }
}

/// Largest limits a manifest may ask for (the engine's pool is sized for them).
pub const MAX_TIME_PER_CALL_MS: u64 = 60_000;
pub const MAX_MEMORY_MB: u64 = 256;

/// A parsed `plugin.toml`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub name: String,
    pub version: String,
    pub kind: Kind,
    pub component: PathBuf,
    #[serde(default)]
    pub description: Option<String>,
    #[serde(default)]
    pub allowed_outbound_hosts: Vec<String>,
    #[serde(default)]
    pub config: BTreeMap<String, ConfigKey>,
    #[serde(default)]
    pub limits: Limits,
}

/// Why a manifest was refused.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("cannot read {path}: {error}")]
    Read { path: PathBuf, error: std::io::Error },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

impl Manifest {
    /// Read and validate `dir/plugin.toml`.
    pub fn load(dir: &Path) -> Result<Manifest, ManifestError> {
        let path = dir.join("plugin.toml");
        let text = std::fs::read_to_string(&path).map_err(|error| ManifestError::Read { path: path.clone(), error })?;
        Manifest::parse(&text).map_err(|e| match e {
            ManifestError::Parse { message, .. } => ManifestError::Parse { path: path.clone(), message },
            ManifestError::Invalid { message, .. } => ManifestError::Invalid { path: path.clone(), message },
            other => other,
        })
    }

    /// Parse and validate manifest text.
    pub fn parse(text: &str) -> Result<Manifest, ManifestError> {
        let m: Manifest = toml::from_str(text)
            .map_err(|e| ManifestError::Parse { path: PathBuf::new(), message: e.message().to_string() })?;
        m.validate().map_err(|message| ManifestError::Invalid { path: PathBuf::new(), message })?;
        Ok(m)
    }

    fn validate(&self) -> Result<(), String> {
        let name_ok = !self.name.is_empty()
            && self.name.len() <= 64
            && self.name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !self.name.starts_with('-');
        if !name_ok {
            return Err(format!("name {:?} must be 1-64 characters of a-z, 0-9 and '-'", self.name));
        }
        if self.version.trim().is_empty() {
            return Err("version must not be empty".into());
        }
        if self.component.is_absolute()
            || self.component.components().any(|c| matches!(c, std::path::Component::ParentDir))
        {
            return Err(format!("component {:?} must be a path inside the plugin's folder", self.component));
        }
        let l = self.limits;
        if l.time_per_call_ms == 0 || l.time_per_call_ms > MAX_TIME_PER_CALL_MS {
            return Err(format!("limits.time_per_call_ms must be between 1 and {MAX_TIME_PER_CALL_MS}"));
        }
        if l.memory_mb == 0 || l.memory_mb > MAX_MEMORY_MB {
            return Err(format!("limits.memory_mb must be between 1 and {MAX_MEMORY_MB}"));
        }
        if self.kind == Kind::Source && !self.allowed_outbound_hosts.is_empty() {
            return Err("allowed_outbound_hosts: source plugins make no outbound calls".into());
        }
        for (key, c) in &self.config {
            if c.env.is_none() && c.default.is_none() {
                return Err(format!("config.{key} needs `env`, `default` or both"));
            }
        }
        // Check the allow-list's shape now; `{key}` entries resolve later.
        for entry in &self.allowed_outbound_hosts {
            if let Some(key) = entry.strip_prefix('{').and_then(|e| e.strip_suffix('}')) {
                if !self.config.contains_key(key) {
                    return Err(format!("allowed_outbound_hosts: {entry} names no key under [config]"));
                }
            } else {
                AllowList::parse([entry.as_str()]).map_err(|e| format!("allowed_outbound_hosts: {e}"))?;
            }
        }
        Ok(())
    }

    /// Resolve config values from the environment (defaults applied).
    pub fn resolve_config(&self, env: &Environment) -> ResolvedConfig {
        let mut values = HashMap::new();
        let mut secrets = Vec::new();
        let mut missing = Vec::new();
        for (key, c) in &self.config {
            let value = c.env.as_deref().and_then(|v| env.get(v)).map(str::to_string).or_else(|| c.default.clone());
            match value {
                Some(v) => {
                    if c.secret {
                        secrets.push(v.clone());
                    }
                    values.insert(key.clone(), v);
                }
                None if c.required => missing.push(c.env.clone().unwrap_or_else(|| key.clone())),
                None => {}
            }
        }
        ResolvedConfig { values, secrets, missing }
    }

    /// The allow-list with `{key}` entries replaced by the configured URLs.
    pub fn allow_list(&self, config: &ResolvedConfig) -> Result<AllowList, AllowListError> {
        let entries: Vec<String> = self
            .allowed_outbound_hosts
            .iter()
            .filter_map(|e| match e.strip_prefix('{').and_then(|e| e.strip_suffix('}')) {
                // A configured base URL allows its origin (scheme, host, port).
                Some(key) => config.values.get(key).map(|v| match url::Url::parse(v) {
                    Ok(u) if u.has_host() => u.origin().ascii_serialization(),
                    _ => v.clone(),
                }),
                None => Some(e.clone()),
            })
            .collect();
        AllowList::parse(entries.iter().map(String::as_str))
    }
}

/// A manifest's config keys with their values for this host.
#[derive(Clone, Default)]
pub struct ResolvedConfig {
    pub values: HashMap<String, String>,
    /// Values to redact wherever they might be shown.
    pub secrets: Vec<String>,
    /// Variables of required keys that are not set.
    pub missing: Vec<String>,
}

impl std::fmt::Debug for ResolvedConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResolvedConfig")
            .field("keys", &self.values.keys().collect::<Vec<_>>())
            .field("missing", &self.missing)
            .finish()
    }
}

impl ResolvedConfig {
    /// Replace every secret value in `text` with `«redacted»`.
    pub fn redact(&self, text: &str) -> String {
        let mut out = text.to_string();
        for s in self.secrets.iter().filter(|s| !s.is_empty()) {
            out = out.replace(s.as_str(), "«redacted»");
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const META: &str = r#"
        name = "meta-capi"
        version = "0.1.0"
        kind = "destination"
        component = "meta-capi.wasm"
        allowed_outbound_hosts = ["{graph_url}", "https://*.fbcdn.net"]

        [config.access_token]
        env = "META_ACCESS_TOKEN"
        secret = true
        required = true

        [config.graph_url]
        env = "META_GRAPH_URL"
        default = "https://graph.facebook.com"

        [limits]
        time_per_call_ms = 10000
        memory_mb = 32
    "#;

    fn env(pairs: &[(&str, &str)]) -> Environment {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect::<HashMap<_, _>>().into()
    }

    #[test]
    fn parses_a_full_manifest() {
        let m = Manifest::parse(META).unwrap();
        assert_eq!(m.name, "meta-capi");
        assert_eq!(m.kind, Kind::Destination);
        assert_eq!(m.limits.memory_mb, 32);
        assert!(m.config["access_token"].secret);
    }

    #[test]
    fn unknown_field_is_an_error() {
        let err = Manifest::parse(&format!("{META}\nallowed_hosts = []")).unwrap_err().to_string();
        assert!(err.contains("unknown field `allowed_hosts`"), "{err}");
        let err = Manifest::parse(&META.replace("memory_mb = 32", "memory_mb = 32\ncpu = 2")).unwrap_err().to_string();
        assert!(err.contains("unknown field `cpu`"), "{err}");
    }

    #[test]
    fn invalid_values_are_explained() {
        let err = |text: String| Manifest::parse(&text).unwrap_err().to_string();
        assert!(err(META.replace("meta-capi\"", "Meta CAPI\"")).contains("must be 1-64 characters"));
        assert!(err(META.replace("kind = \"destination\"", "kind = \"sink\"")).contains("unknown variant `sink`"));
        assert!(err(META.replace("memory_mb = 32", "memory_mb = 4096")).contains("limits.memory_mb"));
        assert!(err(META.replace("\"meta-capi.wasm\"", "\"../x.wasm\"")).contains("inside the plugin's folder"));
        assert!(err(META.replace("{graph_url}", "{nope}")).contains("names no key"));
        assert!(err(META.replace("https://*.fbcdn.net", "graph.facebook.com")).contains("allowed_outbound_hosts"));
    }

    #[test]
    fn config_resolves_from_env_with_defaults_and_reports_missing() {
        let m = Manifest::parse(META).unwrap();
        let c = m.resolve_config(&env(&[]));
        assert_eq!(c.values["graph_url"], "https://graph.facebook.com");
        assert_eq!(c.missing, ["META_ACCESS_TOKEN"]);
        let c = m
            .resolve_config(&env(&[("META_ACCESS_TOKEN", "EAAB-secret"), ("META_GRAPH_URL", "http://127.0.0.1:8080")]));
        assert!(c.missing.is_empty());
        assert_eq!(c.redact("access_token=EAAB-secret"), "access_token=«redacted»");
        let allow = m.allow_list(&c).unwrap();
        assert!(allow.allows(&url::Url::parse("http://127.0.0.1:8080/v21.0/1/events").unwrap()));
        assert!(!allow.allows(&url::Url::parse("https://graph.facebook.com/v21.0/1/events").unwrap()));
        assert!(allow.allows(&url::Url::parse("https://static.fbcdn.net/").unwrap()));
    }
}
