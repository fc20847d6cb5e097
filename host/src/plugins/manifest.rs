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
//! env = "META_ACCESS_TOKEN"       # the host variable it comes from (must be granted)
//! secret = true                   # never logged or printed
//! required = true                 # the plugin is "not configured" without it
//!
//! [config.graph_url]
//! env = "META_GRAPH_URL"
//! default = "https://graph.facebook.com"
//! format = "url"                  # checked at load: url, integer, boolean or email
//!
//! [config.api_version]
//! env = "META_API_VERSION"
//! default = "v21.0"
//! pattern = 'v[0-9]+\.[0-9]+'          # checked at load: the whole value must match
//! example = "v21.0"               # shown when it does not
//! # one_of = ["a", "b"]           # or: one of these values
//!
//! [limits]
//! time_per_call_ms = 10000        # wall time per call, host HTTP included
//! memory_mb = 32                  # linear memory cap
//! max_requests_per_call = 20      # http.send calls, denied ones included
//! max_request_bytes_per_call = 4194304  # request body bytes, all calls together
//! ```
//!
//! A `[config]` key's variable must be granted to the plugin by the operator
//! (see `grants`); a manifest asking for one that is not is refused, naming
//! the variable.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::allow::{AllowList, AllowListError};
use super::grants::{NotGranted, PluginEnv};

/// Who authenticates a source's webhooks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Auth {
    /// The host, with `x-api-key` (the default); the plugin never sees the
    /// credential headers.
    #[default]
    Host,
    /// The plugin itself (signatures, Basic auth…): no `x-api-key` is
    /// needed, and the plugin gets every header.
    Plugin,
}

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
    /// What the value must look like; checked when the plugin is loaded.
    #[serde(default)]
    pub format: Option<Format>,
    /// A regular expression the whole value must match; checked when the
    /// plugin is loaded.
    #[serde(default)]
    pub pattern: Option<String>,
    /// The values allowed, if only some are.
    #[serde(default)]
    pub one_of: Option<Vec<String>>,
    /// A value that passes the checks, shown when one fails.
    #[serde(default)]
    pub example: Option<String>,
}

/// A shape a config value must have.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// An absolute http(s) URL.
    Url,
    /// A whole number (digits, an optional sign).
    Integer,
    /// `true`, `false`, `1` or `0`.
    Boolean,
    /// An e-mail address (`local@domain.tld`).
    Email,
}

/// Resource limits per call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    #[serde(default = "default_time_ms")]
    pub time_per_call_ms: u64,
    #[serde(default = "default_memory_mb")]
    pub memory_mb: u64,
    /// `http.send` calls per call of the plugin, denied ones included.
    #[serde(default = "default_max_requests")]
    pub max_requests_per_call: u32,
    /// Request body bytes per call of the plugin, all requests together.
    #[serde(default = "default_max_request_bytes")]
    pub max_request_bytes_per_call: u64,
}

fn default_time_ms() -> u64 {
    5_000
}
fn default_memory_mb() -> u64 {
    32
}
fn default_max_requests() -> u32 {
    20
}
fn default_max_request_bytes() -> u64 {
    4 << 20
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            time_per_call_ms: default_time_ms(),
            memory_mb: default_memory_mb(),
            max_requests_per_call: default_max_requests(),
            max_request_bytes_per_call: default_max_request_bytes(),
        }
    }
}

/// Largest limits a manifest may ask for (the engine's pool is sized for them).
pub const MAX_TIME_PER_CALL_MS: u64 = 60_000;
pub const MAX_MEMORY_MB: u64 = 256;
pub const MAX_REQUESTS_PER_CALL: u32 = 1_000;
pub const MAX_REQUEST_BYTES_PER_CALL: u64 = 64 << 20;

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
    /// Sources only: who authenticates their webhooks.
    #[serde(default)]
    pub auth: Option<Auth>,
    /// Destinations only: how long the downstream deduplicates a repeated
    /// delivery (same event id or idempotency key); a replay after that may
    /// be delivered twice, and its answer says so.
    #[serde(default)]
    pub dedupe_window_secs: Option<u64>,
    /// Destinations only: this folder is a candidate version of that
    /// destination. It runs beside every job of the live plugin, with the
    /// live plugin's grants, and its requests are compared with the live
    /// version's and never sent (shadow mode).
    #[serde(default)]
    pub shadow_of: Option<String>,
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
    #[error("{path}: config.{key}: {source}")]
    NotGranted { path: PathBuf, key: String, source: NotGranted },
}

impl Manifest {
    /// Read and validate `dir/plugin.toml`.
    pub fn load(dir: &Path) -> Result<Manifest, ManifestError> {
        let path = dir.join("plugin.toml");
        let text = std::fs::read_to_string(&path).map_err(|error| ManifestError::Read { path: path.clone(), error })?;
        Manifest::parse(&text).map_err(|e| e.at(&path))
    }

    /// The name and kind a manifest declares, even if it is otherwise
    /// invalid (to say which provider a refused folder was meant to serve).
    pub fn load_lenient(dir: &Path) -> Option<(String, Kind)> {
        let table: toml::Table = std::fs::read_to_string(dir.join("plugin.toml")).ok()?.parse().ok()?;
        let name = table.get("name")?.as_str()?.to_string();
        let kind = match table.get("kind")?.as_str()? {
            "source" => Kind::Source,
            "destination" => Kind::Destination,
            _ => return None,
        };
        Some((name, kind))
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
        if l.max_requests_per_call > MAX_REQUESTS_PER_CALL {
            return Err(format!("limits.max_requests_per_call must be at most {MAX_REQUESTS_PER_CALL}"));
        }
        if l.max_request_bytes_per_call > MAX_REQUEST_BYTES_PER_CALL {
            return Err(format!("limits.max_request_bytes_per_call must be at most {MAX_REQUEST_BYTES_PER_CALL}"));
        }
        if self.kind == Kind::Destination && self.auth.is_some() {
            return Err("auth: only a source's webhooks are authenticated".into());
        }
        if self.kind == Kind::Source && self.dedupe_window_secs.is_some() {
            return Err("dedupe_window_secs: only a destination's deliveries are deduplicated downstream".into());
        }
        match &self.shadow_of {
            Some(_) if self.kind == Kind::Source => {
                return Err("shadow_of: only a destination can shadow another (its requests are compared)".into());
            }
            Some(live) if *live == self.name => {
                return Err(format!("shadow_of: {live:?} is this plugin's own name; name the candidate differently"));
            }
            _ => {}
        }
        for (key, c) in &self.config {
            if c.env.is_none() && c.default.is_none() {
                return Err(format!("config.{key} needs `env`, `default` or both"));
            }
            if let Some(pattern) = &c.pattern {
                whole(pattern)
                    .map_err(|e| format!("config.{key}: pattern {pattern:?} is not a regular expression: {e}"))?;
            }
            for (what, value) in [("default", &c.default), ("example", &c.example)] {
                if let Some(value) = value {
                    c.check(value, value).map_err(|e| format!("config.{key}: the {what} {e}"))?;
                }
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

    /// Who authenticates this source's webhooks.
    pub fn auth(&self) -> Auth {
        self.auth.unwrap_or_default()
    }

    /// Whose grants this plugin reads its settings under: its own, or, for a
    /// shadow candidate, the live plugin's.
    pub fn grantee(&self) -> &str {
        self.shadow_of.as_deref().unwrap_or(&self.name)
    }

    /// Resolve config values for this plugin from what it is granted
    /// (defaults applied). A key whose variable is not granted refuses the
    /// whole manifest, naming the variable; a value of the wrong format too.
    pub fn resolve_config(&self, env: &PluginEnv) -> Result<ResolvedConfig, ManifestError> {
        if let Some(live) = &self.shadow_of
            && !env.may_shadow(&self.name, live)
        {
            let name = &self.name;
            return Err(ManifestError::Invalid {
                path: PathBuf::new(),
                message: format!(
                    "shadow_of = {live:?}: a candidate reads {live}'s settings, so the operator must allow it: \
                     PLUGIN_SHADOWS=\"{name}={live}\""
                ),
            });
        }
        let mut resolved = ResolvedConfig::default();
        for (key, c) in &self.config {
            let (from_env, granted_by) =
                match &c.env {
                    Some(var) => {
                        let (value, grant) = env.get(self.grantee(), var).map_err(|source| {
                            ManifestError::NotGranted { path: PathBuf::new(), key: key.clone(), source }
                        })?;
                        (value.map(str::to_string), Some(grant))
                    }
                    None => (None, None),
                };
            let set = from_env.is_some();
            if let Some(v) = from_env.as_ref().filter(|_| !c.env.as_deref().is_some_and(|v| env.is_placeholder(v))) {
                // A secret's value is never echoed, even when it is wrong.
                let shown = if c.secret { "«redacted»" } else { v.as_str() };
                c.check(v, shown).map_err(|e| ManifestError::Invalid {
                    path: PathBuf::new(),
                    message: format!("config.{key}: {} {e}", c.env.as_deref().unwrap_or(key)),
                })?;
            }
            match from_env.or_else(|| c.default.clone()) {
                Some(v) => {
                    if c.secret {
                        if is_short(&v) {
                            resolved.short_secrets.push(c.env.clone().unwrap_or_else(|| key.clone()));
                        }
                        resolved.secrets.push(v.clone());
                    }
                    if set {
                        resolved.operator_set.push(key.clone());
                    }
                    resolved.values.insert(key.clone(), v);
                }
                None if c.required => resolved.missing.push(c.env.clone().unwrap_or_else(|| key.clone())),
                None => {}
            }
            resolved.vars.push(ConfigVar {
                key: key.clone(),
                env: c.env.clone(),
                granted_by,
                set,
                secret: c.secret,
                required: c.required,
            });
        }
        Ok(resolved)
    }

    /// The allow-list with `{key}` entries replaced by the configured URLs.
    /// Entries whose value the operator set (not a manifest default) are the
    /// operator's: only they may name a private or loopback address.
    pub fn allow_list(&self, config: &ResolvedConfig) -> Result<AllowList, AllowListError> {
        let entries: Vec<(String, bool)> = self
            .allowed_outbound_hosts
            .iter()
            .filter_map(|e| match e.strip_prefix('{').and_then(|e| e.strip_suffix('}')) {
                // A configured base URL allows its origin (scheme, host, port).
                Some(key) => config.values.get(key).map(|v| {
                    let origin = match url::Url::parse(v) {
                        Ok(u) if u.has_host() => u.origin().ascii_serialization(),
                        _ => v.clone(),
                    };
                    (origin, config.operator_set.iter().any(|k| k == key))
                }),
                None => Some((e.clone(), false)),
            })
            .collect();
        AllowList::parse_entries(entries.iter().map(|(e, operator)| (e.as_str(), *operator)))
    }
}

impl ManifestError {
    /// The same error, said of the manifest at `path`.
    pub(crate) fn at(self, path: &Path) -> ManifestError {
        let path = path.to_path_buf();
        match self {
            ManifestError::Parse { message, .. } => ManifestError::Parse { path, message },
            ManifestError::Invalid { message, .. } => ManifestError::Invalid { path, message },
            ManifestError::NotGranted { key, source, .. } => ManifestError::NotGranted { path, key, source },
            other => other,
        }
    }
}

impl ConfigKey {
    /// Check `value` as the manifest declares (`format`, `pattern`,
    /// `one_of`); the error quotes `shown` (the value, or a redaction) and
    /// the `example`.
    fn check(&self, value: &str, shown: &str) -> Result<(), String> {
        let example = self.example.as_deref().map(|e| format!(" such as {e:?}")).unwrap_or_default();
        if let Some(format) = self.format
            && !format.admits(value)
        {
            return Err(format!("must be {}{example}, got {shown:?}", format.described()));
        }
        if let Some(pattern) = &self.pattern
            && !whole(pattern).is_ok_and(|re| re.is_match(value))
        {
            return Err(format!("must match the pattern `{pattern}`{example}, got {shown:?}"));
        }
        if let Some(allowed) = &self.one_of
            && !allowed.iter().any(|a| a == value)
        {
            return Err(format!("must be one of {}, got {shown:?}", allowed.join(", ")));
        }
        Ok(())
    }
}

/// `pattern` compiled to match a whole value.
fn whole(pattern: &str) -> Result<regex::Regex, regex::Error> {
    regex::Regex::new(&format!("^(?:{pattern})$"))
}

impl Format {
    fn admits(self, value: &str) -> bool {
        match self {
            Format::Url => url::Url::parse(value).is_ok_and(|u| matches!(u.scheme(), "http" | "https") && u.has_host()),
            Format::Integer => value.parse::<i64>().is_ok(),
            Format::Boolean => matches!(value, "true" | "false" | "1" | "0"),
            Format::Email => value.split_once('@').is_some_and(|(local, domain)| {
                !local.is_empty()
                    && domain.contains('.')
                    && !domain.starts_with('.')
                    && !domain.ends_with('.')
                    && !value.chars().any(|c| c.is_whitespace() || c == '<' || c == '>')
                    && !domain.contains('@')
            }),
        }
    }

    fn described(self) -> &'static str {
        match self {
            Format::Url => "an absolute http(s) URL",
            Format::Integer => "a whole number",
            Format::Boolean => "true, false, 1 or 0",
            Format::Email => "an e-mail address",
        }
    }
}

/// Secrets shorter than this are warned about: a real token is longer.
pub const SHORT_SECRET: usize = 8;

/// A manifest's config keys with their values for this host.
#[derive(Clone, Default)]
pub struct ResolvedConfig {
    pub values: HashMap<String, String>,
    /// Values to redact wherever they might be shown.
    pub secrets: Vec<String>,
    /// Variables (or keys) of secrets shorter than `SHORT_SECRET` characters:
    /// redacted only where they stand whole, so likely test values.
    pub short_secrets: Vec<String>,
    /// Variables of required keys that are not set.
    pub missing: Vec<String>,
    /// Keys whose value came from the environment (the operator), not from
    /// a manifest default.
    pub operator_set: Vec<String>,
    /// Every key, its variable and grant, for listings (no values).
    pub vars: Vec<ConfigVar>,
}

/// What a plugin reads, for `plugin check` and `GET /api/v1/plugins`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ConfigVar {
    pub key: String,
    pub env: Option<String>,
    /// The grant that lets the plugin read `env`.
    pub granted_by: Option<String>,
    /// Whether `env` is set on this host.
    pub set: bool,
    pub secret: bool,
    pub required: bool,
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
    /// Replace every secret value in `text` with `«redacted»`: everywhere
    /// it appears, but a short one (under `SHORT_SECRET` characters, a test
    /// value) only where it stands whole, not inside a longer word, so it
    /// does not garble the answers it happens to occur in.
    pub fn redact(&self, text: &str) -> String {
        let mut out = text.to_string();
        for s in self.secrets.iter().filter(|s| !s.is_empty()) {
            // As written, and as a JSON string or a URL would carry it.
            let quoted = serde_json::to_string(s).unwrap_or_default();
            let json = quoted.strip_prefix('"').and_then(|j| j.strip_suffix('"')).unwrap_or(s);
            let url: String = url::form_urlencoded::byte_serialize(s.as_bytes()).collect();
            let short = is_short(s);
            for form in [s.as_str(), json, url.as_str()] {
                out = if short { replace_whole(&out, form, "«redacted»") } else { out.replace(form, "«redacted»") };
            }
        }
        out
    }

    /// `redact` for an excerpt cut at its end (marked `…`): a secret cut
    /// there is redacted too, down to its first 4 characters.
    pub fn redact_excerpt(&self, text: &str) -> String {
        let out = self.redact(text);
        let Some(body) = out.strip_suffix('…') else { return out };
        for secret in self.secrets.iter().filter(|s| s.len() > 4) {
            let cut = (4..secret.len()).rev().filter(|&n| secret.is_char_boundary(n)).find(|&n| {
                body.ends_with(&secret[..n])
                    && (!is_short(secret) || starts_whole(&body[..body.len() - n], &secret[..n]))
            });
            if let Some(n) = cut {
                return format!("{}«redacted»…", &body[..body.len() - n]);
            }
        }
        out
    }
}

/// Whether `secret` is short enough to be a test value, redacted only
/// where it stands whole.
fn is_short(secret: &str) -> bool {
    secret.chars().count() < SHORT_SECRET
}

/// Whether two characters side by side are of one word (a token, an
/// identifier, a key), so that a value ending or starting there does not
/// stand whole.
fn joined(left: Option<char>, right: Option<char>) -> bool {
    let word = |c: char| c.is_alphanumeric() || c == '_' || c == '-';
    left.is_some_and(word) && right.is_some_and(word)
}

/// Whether `value`, written right after `before`, starts a word of its own.
fn starts_whole(before: &str, value: &str) -> bool {
    !joined(before.chars().next_back(), value.chars().next())
}

/// `text` with each occurrence of `value` that stands whole replaced by
/// `with`.
fn replace_whole(text: &str, value: &str, with: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut copied = 0;
    for (at, _) in text.match_indices(value) {
        let end = at + value.len();
        if starts_whole(&text[..at], value) && !joined(value.chars().next_back(), text[end..].chars().next()) {
            out.push_str(&text[copied..at]);
            out.push_str(with);
            copied = end;
        }
    }
    out.push_str(&text[copied..]);
    out
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
        format = "url"

        [limits]
        time_per_call_ms = 10000
        memory_mb = 32
    "#;

    fn env(pairs: &[(&str, &str)]) -> PluginEnv {
        let env: crate::config::Environment =
            pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect::<HashMap<_, _>>().into();
        PluginEnv::new(&env, crate::plugins::grants::Grants::default())
    }

    #[test]
    fn an_excerpt_cut_inside_a_secret_shows_none_of_it() {
        let config = ResolvedConfig { secrets: vec!["s3cr3t-token-value".into()], ..Default::default() };
        assert_eq!(config.redact_excerpt("a=s3cr3t-token-value&b"), "a=«redacted»&b");
        assert_eq!(config.redact_excerpt("{\"access_token\":\"s3cr3t-to…"), "{\"access_token\":\"«redacted»…");
        // Not cut: an ending that looks like the start of a secret stays.
        assert_eq!(config.redact_excerpt("ends with s3cr"), "ends with s3cr");
        // Encoded as a URL or a JSON string would carry it.
        let config = ResolvedConfig { secrets: vec!["a/b+c \"d\"".into()], ..Default::default() };
        assert_eq!(config.redact("?token=a%2Fb%2Bc+%22d%22&x"), "?token=«redacted»&x");
        assert_eq!(config.redact(r#"{"k":"a/b+c \"d\""}"#), r#"{"k":"«redacted»"}"#);
    }

    /// A short test value is redacted where it stands whole, not inside
    /// every word of Meta's or Brevo's answers that happens to contain it.
    #[test]
    fn a_secret_is_redacted_only_where_it_stands_whole() {
        let config = ResolvedConfig { secrets: vec!["race".into(), "tok-1".into()], ..Default::default() };
        let answer = r#"{"events_received":1,"fbtrace_id":"AbRaceX","trace":"race"}"#;
        assert_eq!(config.redact(answer), r#"{"events_received":1,"fbtrace_id":"AbRaceX","trace":"«redacted»"}"#);
        assert_eq!(config.redact("fbtrace_id race_id racer"), "fbtrace_id race_id racer");
        assert_eq!(config.redact("Bearer race, ?k=race&x=tok-1."), "Bearer «redacted», ?k=«redacted»&x=«redacted».");
        assert_eq!(config.redact("tok-10 xtok-1 tok-1"), "tok-10 xtok-1 «redacted»");
        // A real secret goes wherever it appears, even run into a word
        // (Telegram's bot<TOKEN>), and cut at the end of an excerpt.
        let long = ResolvedConfig { secrets: vec!["1234567:AAH-secret".into()], ..Default::default() };
        assert_eq!(long.redact("/bot1234567:AAH-secret/sendMessage"), "/bot«redacted»/sendMessage");
        assert_eq!(long.redact_excerpt("token=1234567:AA…"), "token=«redacted»…");
        assert_eq!(long.redact_excerpt("bot1234567:AA…"), "bot«redacted»…");
        // A short one cut there is left where it would not stand whole.
        assert_eq!(config.redact_excerpt("xtok-…"), "xtok-…");
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
        assert!(
            err(META.replace("memory_mb = 32", "max_requests_per_call = 5000"))
                .contains("limits.max_requests_per_call")
        );
        assert!(
            err(META.replace("https://graph.facebook.com\"", "graph\""))
                .contains("config.graph_url: the default must be an absolute")
        );
        assert!(err(META.replace("format = \"url\"", "format = \"ipv4\"")).contains("unknown variant `ipv4`"));
    }

    #[test]
    fn a_variable_not_granted_refuses_the_manifest_and_names_it() {
        let stolen = META.replace("env = \"META_ACCESS_TOKEN\"", "env = \"API_KEY\"");
        let err = Manifest::parse(&stolen).unwrap().resolve_config(&env(&[("API_KEY", "k")])).unwrap_err().to_string();
        assert!(err.contains("config.access_token: API_KEY is one of the host's own settings"), "{err}");
        let other = META.replace("env = \"META_ACCESS_TOKEN\"", "env = \"BREVO_API_KEY\"");
        let err = Manifest::parse(&other).unwrap().resolve_config(&env(&[])).unwrap_err().to_string();
        assert!(err.contains("BREVO_API_KEY is not granted to plugin \"meta-capi\""), "{err}");
        assert!(err.contains("PLUGIN_GRANTS=\"meta-capi=BREVO_API_KEY\""), "{err}");
    }

    #[test]
    fn a_shadow_candidate_reads_under_the_live_plugins_grants_and_no_further() {
        let candidate = META.replace("name = \"meta-capi\"", "name = \"meta-next\"\nshadow_of = \"meta-capi\"");
        let m = Manifest::parse(&candidate).unwrap();
        let err = m.resolve_config(&env(&[("META_ACCESS_TOKEN", "EAAB-secret")])).unwrap_err().to_string();
        assert!(err.contains("PLUGIN_SHADOWS=\"meta-next=meta-capi\""), "not without the operator's say: {err}");
        let allowed = |pairs: &[(&str, &str)]| {
            let mut vars: HashMap<String, String> = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
            vars.insert("PLUGIN_SHADOWS".into(), "meta-next=meta-capi".into());
            PluginEnv::from_environment(&vars.into()).unwrap()
        };
        // META_* is meta-capi's grant, not meta-next's: read through the plugin it shadows.
        let c = m
            .resolve_config(&allowed(&[("META_ACCESS_TOKEN", "EAAB-secret"), ("PLUGIN_GRANTS", "meta-capi=META_*")]))
            .unwrap();
        assert_eq!(c.values["access_token"], "EAAB-secret");
        let stolen = candidate.replace("env = \"META_ACCESS_TOKEN\"", "env = \"API_KEY\"");
        let err =
            Manifest::parse(&stolen).unwrap().resolve_config(&allowed(&[("API_KEY", "k")])).unwrap_err().to_string();
        assert!(err.contains("API_KEY is one of the host's own settings"), "{err}");
        let err = |text: String| Manifest::parse(&text).unwrap_err().to_string();
        assert!(
            err(META.replace("name = \"meta-capi\"", "name = \"meta-capi\"\nshadow_of = \"meta-capi\""))
                .contains("own name")
        );
        let source = candidate.replace("kind = \"destination\"", "kind = \"source\"");
        assert!(err(source).contains("only a destination can shadow"));
    }

    #[test]
    fn listed_vars_carry_their_grant_and_never_a_value() {
        let m = Manifest::parse(META).unwrap();
        let c = m.resolve_config(&env(&[("META_ACCESS_TOKEN", "EAAB-secret")])).unwrap();
        let token = c.vars.iter().find(|v| v.key == "access_token").unwrap();
        assert_eq!(
            (token.env.as_deref(), token.granted_by.as_deref(), token.set),
            (Some("META_ACCESS_TOKEN"), Some("META_*"), true)
        );
        assert!(!serde_json::to_string(&c.vars).unwrap().contains("EAAB-secret"));
    }

    #[test]
    fn a_url_setting_of_the_wrong_shape_is_refused() {
        let m = Manifest::parse(META).unwrap();
        let err = m.resolve_config(&env(&[("META_GRAPH_URL", "graph.facebook.com")])).unwrap_err().to_string();
        assert!(err.contains("config.graph_url: META_GRAPH_URL must be an absolute http(s) URL"), "{err}");
    }

    /// The bundled plugins declare their own checks; the host knows none of
    /// their settings. A wrong value refuses the plugin at load, naming the
    /// variable, what was expected and, but for a secret, what it got.
    #[test]
    fn the_bundled_manifests_check_their_own_values() {
        let bundled = |name: &str| {
            let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../plugins").join(name);
            Manifest::load(&dir).unwrap()
        };
        let refused = |m: &Manifest, var: &str, value: &str| {
            m.resolve_config(&env(&[(var, value)])).map(|_| ()).unwrap_err().to_string()
        };
        let meta = bundled("meta-capi");
        for (var, bad, expected) in [
            (
                "META_API_VERSION",
                "21",
                r#"META_API_VERSION must match the pattern `v[0-9]+\.[0-9]+` such as "v21.0", got "21""#,
            ),
            ("META_API_VERSION", "../v21.0", "META_API_VERSION must match"),
            ("META_PIXEL_ID", "my-pixel", r#"such as "1234567890", got "my-pixel""#),
            ("META_ACTION_SOURCE", "crm", "META_ACTION_SOURCE must be one of email, website, app"),
            ("META_DEFAULT_COUNTRY_CODE", "one", r#"such as "44", got "one""#),
            ("META_LIMITED_DATA_USE", "yes", "META_LIMITED_DATA_USE must be true, false, 1 or 0"),
            ("META_LDU_STATE", "CA", "META_LDU_STATE must be a whole number"),
            ("META_EVENT_SOURCE_URL", "example.com", "must be an absolute http(s) URL"),
        ] {
            let err = refused(&meta, var, bad);
            assert!(err.contains(expected), "{var}={bad}: {err}");
        }
        for (var, good) in
            [("META_API_VERSION", "v22.0"), ("META_DEFAULT_COUNTRY_CODE", "+1"), ("META_LDU_STATE", "1000")]
        {
            assert!(meta.resolve_config(&env(&[(var, good)])).is_ok(), "{var}={good}");
        }
        let brevo = bundled("brevo");
        assert!(refused(&brevo, "BREVO_SENDER_EMAIL", "deals").contains("must be an e-mail address, got \"deals\""));
        assert!(refused(&brevo, "BREVO_TEMPLATE_ID", "0").contains(r#"such as "12", got "0""#));
        assert!(brevo.resolve_config(&env(&[("BREVO_SENDER_EMAIL", "deals@example.com")])).is_ok());
    }

    /// A destination whose URL is its credential (Slack, Teams, Discord):
    /// the allow-list holds its origin, listings show only that, and the
    /// whole URL is redacted wherever it is shown.
    #[test]
    fn a_secret_url_is_reachable_and_shown_only_as_its_origin() {
        let slack = r#"
            name = "slack"
            version = "0.1.0"
            kind = "destination"
            component = "slack.wasm"
            allowed_outbound_hosts = ["{webhook_url}"]

            [config.webhook_url]
            env = "SLACK_WEBHOOK_URL"
            secret = true
            required = true
            format = "url"
        "#;
        let url = "https://hooks.slack.com/services/T0001/B0002/XXXXsecretXXXX";
        let m = Manifest::parse(slack).unwrap();
        let c = m.resolve_config(&env(&[("SLACK_WEBHOOK_URL", url)])).unwrap();
        let allow = m.allow_list(&c).unwrap();
        assert!(allow.allows(&url::Url::parse(url).unwrap()));
        assert!(!allow.allows(&url::Url::parse("https://evil.example.com/services/x").unwrap()));
        assert_eq!(allow.describe(), ["https://hooks.slack.com:443"]);
        assert_eq!(c.redact(&format!("POST {url}\n")), "POST «redacted»\n");
        assert!(!format!("{:?}", c.vars).contains("XXXXsecret"));
    }

    #[test]
    fn a_pattern_must_compile_and_a_secret_is_never_echoed() {
        let bad = format!("{META}\n[config.region]\nenv = \"META_REGION\"\npattern = \"(eu\"\n");
        let err = Manifest::parse(&bad).unwrap_err().to_string();
        assert!(err.contains("config.region: pattern \"(eu\" is not a regular expression"), "{err}");
        let wrong_example =
            format!("{META}\n[config.region]\nenv = \"META_REGION\"\none_of = [\"eu\"]\nexample = \"us\"\n");
        let err = Manifest::parse(&wrong_example).unwrap_err().to_string();
        assert!(err.contains("config.region: the example must be one of eu, got \"us\""), "{err}");
        let checked = META.replace("secret = true", "secret = true\npattern = 'EAAB\\w+'");
        let m = Manifest::parse(&checked).unwrap();
        let err = m.resolve_config(&env(&[("META_ACCESS_TOKEN", "wrong-token-value")])).unwrap_err().to_string();
        assert!(err.contains("got \"«redacted»\"") && !err.contains("wrong-token-value"), "{err}");
    }

    #[test]
    fn config_resolves_from_env_with_defaults_and_reports_missing() {
        let m = Manifest::parse(META).unwrap();
        let c = m.resolve_config(&env(&[])).unwrap();
        assert_eq!(c.values["graph_url"], "https://graph.facebook.com");
        assert_eq!(c.missing, ["META_ACCESS_TOKEN"]);
        let c = m
            .resolve_config(&env(&[("META_ACCESS_TOKEN", "EAAB-secret"), ("META_GRAPH_URL", "http://127.0.0.1:8080")]))
            .unwrap();
        assert!(c.missing.is_empty());
        assert_eq!(c.redact("access_token=EAAB-secret"), "access_token=«redacted»");
        let allow = m.allow_list(&c).unwrap();
        assert!(allow.allows(&url::Url::parse("http://127.0.0.1:8080/v21.0/1/events").unwrap()));
        assert!(!allow.allows(&url::Url::parse("https://graph.facebook.com/v21.0/1/events").unwrap()));
        assert!(allow.allows(&url::Url::parse("https://static.fbcdn.net/").unwrap()));
    }
}
