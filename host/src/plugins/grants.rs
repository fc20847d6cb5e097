//! Which host environment variables each plugin may read: the operator's
//! grants.
//!
//! A plugin may read
//! - variables prefixed with its own name in upper snake case (`HUBSPOT_*`
//!   for `hubspot`, `META_CAPI_*` for `meta-capi`), without any grant, but
//!   never one that `PLUGIN_GRANTS` (or the defaults) grant another plugin
//!   (a plugin named `meta` does not get meta-capi's `META_ACCESS_TOKEN`);
//! - what `PLUGIN_GRANTS` grants it: `name=PATTERN[,PATTERN…][;name=…]`,
//!   where a pattern is a variable name or a prefix ending in `*`
//!   (`meta-capi=META_*`). Without the variable, the defaults keep the
//!   bundled plugins on the original service's names (`meta-capi=META_*`;
//!   `brevo` reads `BREVO_*` by its own name). An entry for a plugin replaces
//!   that plugin's default.
//!
//! The host's own settings ([`crate::config::HOST_VARS`]) are never granted:
//! naming one in `PLUGIN_GRANTS` is a start-up error, a prefix never matches
//! one, and they are removed from the environment plugins resolve from
//! before any grant is looked at.

use std::collections::BTreeMap;
use std::fmt;

use crate::config::{Environment, HOST_VARS, is_host_var};

/// Grants in force when `PLUGIN_GRANTS` is unset (or does not name the plugin).
pub const DEFAULT_GRANTS: &str = "meta-capi=META_*";

/// One granted variable or family of variables.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Pattern {
    Exact(String),
    /// `PREFIX*`: every variable starting with `PREFIX`.
    Prefix(String),
}

impl Pattern {
    fn parse(text: &str) -> Result<Pattern, String> {
        let (name, prefix) = match text.strip_suffix('*') {
            Some(p) => (p, true),
            None => (text, false),
        };
        let valid = !name.is_empty()
            && name.bytes().all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_')
            && !name.as_bytes()[0].is_ascii_digit();
        if !valid {
            return Err(format!(
                "{text:?} is not a variable name or prefix (upper-case letters, digits and _, optionally ending in *)"
            ));
        }
        if !prefix && is_host_var(name) {
            return Err(format!("{name} is one of the host's own settings and cannot be granted to a plugin"));
        }
        Ok(if prefix { Pattern::Prefix(name.to_string()) } else { Pattern::Exact(name.to_string()) })
    }

    fn matches(&self, var: &str) -> bool {
        match self {
            Pattern::Exact(name) => name == var,
            Pattern::Prefix(prefix) => var.starts_with(prefix.as_str()),
        }
    }
}

impl fmt::Display for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Pattern::Exact(name) => f.write_str(name),
            Pattern::Prefix(prefix) => write!(f, "{prefix}*"),
        }
    }
}

/// The grants of every plugin.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grants {
    by_plugin: BTreeMap<String, Vec<Pattern>>,
}

impl Default for Grants {
    fn default() -> Self {
        Grants::parse(DEFAULT_GRANTS).unwrap_or(Grants { by_plugin: BTreeMap::new() })
    }
}

/// The upper-snake-case prefix a plugin may read without a grant.
pub fn own_prefix(plugin: &str) -> String {
    let mut prefix: String = plugin.chars().map(|c| if c == '-' { '_' } else { c.to_ascii_uppercase() }).collect();
    prefix.push('_');
    prefix
}

impl Grants {
    /// Parse `PLUGIN_GRANTS`; entries replace the defaults of the plugins
    /// they name.
    pub fn with_overrides(spec: &str) -> Result<Grants, String> {
        let mut grants = Grants::default();
        grants.by_plugin.extend(Grants::parse(spec)?.by_plugin);
        Ok(grants)
    }

    fn parse(spec: &str) -> Result<Grants, String> {
        let mut by_plugin = BTreeMap::new();
        for entry in spec.split(';').map(str::trim).filter(|e| !e.is_empty()) {
            let (plugin, patterns) = entry
                .split_once('=')
                .ok_or_else(|| format!("{entry:?} must look like plugin-name=VAR_NAME,PREFIX_*"))?;
            let plugin = plugin.trim();
            if plugin.is_empty() || !plugin.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-') {
                return Err(format!("{plugin:?} is not a plugin name (a-z, 0-9 and -)"));
            }
            let patterns = patterns
                .split(',')
                .map(str::trim)
                .filter(|p| !p.is_empty())
                .map(Pattern::parse)
                .collect::<Result<Vec<_>, _>>()?;
            if by_plugin.insert(plugin.to_string(), patterns).is_some() {
                return Err(format!("plugin {plugin} is named twice"));
            }
        }
        Ok(Grants { by_plugin })
    }

    /// What `plugin` may read, for listings: its own prefix first.
    pub fn describe(&self, plugin: &str) -> Vec<String> {
        let mut out = vec![format!("{}* (own name)", own_prefix(plugin))];
        out.extend(self.by_plugin.get(plugin).into_iter().flatten().map(|p| p.to_string()));
        out
    }

    /// The grant that lets `plugin` read `var`, or why it may not.
    pub fn check(&self, plugin: &str, var: &str) -> Result<String, NotGranted> {
        if is_host_var(var) {
            return Err(NotGranted::HostSetting { var: var.to_string() });
        }
        let own = own_prefix(plugin);
        if var.starts_with(&own) {
            let granted_elsewhere = self
                .by_plugin
                .iter()
                .find(|(name, patterns)| *name != plugin && patterns.iter().any(|p| p.matches(var)));
            if let Some((other, _)) = granted_elsewhere {
                return Err(NotGranted::OthersGrant { var: var.to_string(), other: other.clone() });
            }
            return Ok(format!("{own}* (own name)"));
        }
        match self.by_plugin.get(plugin).into_iter().flatten().find(|p| p.matches(var)) {
            Some(pattern) => Ok(pattern.to_string()),
            None => Err(NotGranted::NoGrant { plugin: plugin.to_string(), var: var.to_string(), own }),
        }
    }
}

/// Why a plugin may not read a variable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NotGranted {
    #[error("{var} is one of the host's own settings and is never given to a plugin")]
    HostSetting { var: String },
    #[error("{var} is granted to plugin {other:?}; a plugin's own name does not reach another plugin's grant")]
    OthersGrant { var: String, other: String },
    #[error(
        "{var} is not granted to plugin {plugin:?}: it may read {own}* by its name, or what the operator grants \
         with PLUGIN_GRANTS=\"{plugin}={var}\""
    )]
    NoGrant { plugin: String, var: String, own: String },
}

/// The environment as plugins may see it: the host's own settings removed,
/// and every read checked against the grants.
#[derive(Debug, Clone, Default)]
pub struct PluginEnv {
    env: Environment,
    grants: Grants,
    /// `PLUGIN_SHADOWS`: (candidate, live destination) pairs the operator
    /// allows; a candidate reads the live plugin's settings.
    shadows: Vec<(String, String)>,
    /// Variables holding a dry run's placeholder: shown, never checked.
    placeholders: Vec<String>,
}

impl PluginEnv {
    pub fn new(env: &Environment, grants: Grants) -> PluginEnv {
        PluginEnv { env: env.without(HOST_VARS), grants, shadows: Vec::new(), placeholders: Vec::new() }
    }

    /// What plugins may read of `env`, with the grants its `PLUGIN_GRANTS`
    /// says (the defaults without it). The error names the variable.
    pub fn from_environment(env: &Environment) -> Result<PluginEnv, String> {
        let grants = match env.get("PLUGIN_GRANTS") {
            Some(spec) => Grants::with_overrides(spec).map_err(|e| format!("PLUGIN_GRANTS: {e}"))?,
            None => Grants::default(),
        };
        let mut shadows = Vec::new();
        for entry in env.get("PLUGIN_SHADOWS").unwrap_or_default().split(',').map(str::trim).filter(|e| !e.is_empty()) {
            match entry.split_once('=') {
                Some((candidate, live)) if !candidate.trim().is_empty() && !live.trim().is_empty() => {
                    shadows.push((candidate.trim().to_string(), live.trim().to_string()))
                }
                _ => return Err(format!("PLUGIN_SHADOWS: {entry:?} must look like candidate=destination")),
            }
        }
        Ok(PluginEnv { shadows, ..PluginEnv::new(env, grants) })
    }

    /// Whether the operator lets plugin `candidate` shadow `live`.
    pub fn may_shadow(&self, candidate: &str, live: &str) -> bool {
        self.shadows.iter().any(|(c, l)| c == candidate && l == live)
    }

    pub fn grants(&self) -> &Grants {
        &self.grants
    }

    /// `var`'s value for `plugin` (None if unset), and the grant that allows it.
    pub fn get(&self, plugin: &str, var: &str) -> Result<(Option<&str>, String), NotGranted> {
        let grant = self.grants.check(plugin, var)?;
        Ok((self.env.get(var), grant))
    }

    /// This environment with dry-run placeholders set on top: values shown
    /// as they are and exempt from the manifest's checks. Host settings
    /// among them are dropped as always.
    pub fn with_placeholders(&self, vars: std::collections::HashMap<String, String>) -> PluginEnv {
        let mut placeholders: Vec<String> = vars.keys().cloned().collect();
        placeholders.extend(self.placeholders.iter().cloned());
        PluginEnv {
            env: self.env.overlay(vars).without(HOST_VARS),
            grants: self.grants.clone(),
            shadows: self.shadows.clone(),
            placeholders,
        }
    }

    /// Whether `var` holds a dry run's placeholder.
    pub fn is_placeholder(&self, var: &str) -> bool {
        self.placeholders.iter().any(|p| p == var)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_plugin_reads_its_own_prefix_without_a_grant() {
        let g = Grants::default();
        assert_eq!(g.check("hubspot", "HUBSPOT_CLIENT_SECRET").unwrap(), "HUBSPOT_* (own name)");
        assert_eq!(g.check("pipedrive", "PIPEDRIVE_WEBHOOK_USER").unwrap(), "PIPEDRIVE_* (own name)");
        assert_eq!(g.check("meta-capi", "META_CAPI_X").unwrap(), "META_CAPI_* (own name)");
        assert!(matches!(g.check("hubspot", "BREVO_API_KEY"), Err(NotGranted::NoGrant { .. })));
    }

    #[test]
    fn a_plugins_own_name_does_not_reach_another_plugins_grant() {
        let g = Grants::default();
        // "meta" squats on meta-capi's META_* grant: refused.
        let err = g.check("meta", "META_ACCESS_TOKEN").unwrap_err();
        assert_eq!(err, NotGranted::OthersGrant { var: "META_ACCESS_TOKEN".into(), other: "meta-capi".into() });
        // What no one was granted, its own name still covers.
        assert_eq!(
            Grants::with_overrides("meta-capi=META_ACCESS_TOKEN").unwrap().check("meta", "META_X").unwrap(),
            "META_* (own name)"
        );
    }

    #[test]
    fn the_defaults_keep_the_bundled_plugins_on_the_original_names() {
        let g = Grants::default();
        assert_eq!(g.check("meta-capi", "META_ACCESS_TOKEN").unwrap(), "META_*");
        assert_eq!(g.check("brevo", "BREVO_API_KEY").unwrap(), "BREVO_* (own name)");
        assert!(g.check("brevo", "META_ACCESS_TOKEN").is_err());
    }

    #[test]
    fn host_settings_are_never_granted() {
        let g = Grants::with_overrides("evil=API_*,DB_*,REDIS_*,ADMIN_*").unwrap();
        for var in ["API_KEY", "ADMIN_API_KEY", "DB_URI", "REDIS_URI", "API_KEY_PREVIOUS"] {
            assert!(matches!(g.check("evil", var), Err(NotGranted::HostSetting { .. })), "{var}");
        }
        // A plugin named after a host prefix gets nothing of the host's either.
        assert!(g.check("api", "API_KEY").is_err());
        assert!(g.check("db", "DB_URI").is_err());
        let err = Grants::with_overrides("evil=API_KEY").unwrap_err();
        assert_eq!(err, "API_KEY is one of the host's own settings and cannot be granted to a plugin");
    }

    #[test]
    fn overrides_replace_a_plugins_default_and_add_others() {
        let g = Grants::with_overrides("meta-capi=FB_TOKEN; hubspot=CRM_SHARED_SECRET,SHARED_*").unwrap();
        assert!(g.check("meta-capi", "META_ACCESS_TOKEN").is_err());
        assert_eq!(g.check("meta-capi", "FB_TOKEN").unwrap(), "FB_TOKEN");
        assert_eq!(g.check("hubspot", "SHARED_X").unwrap(), "SHARED_*");
        assert_eq!(g.describe("hubspot"), ["HUBSPOT_* (own name)", "CRM_SHARED_SECRET", "SHARED_*"]);
    }

    #[test]
    fn bad_specs_say_what_is_wrong() {
        assert!(Grants::with_overrides("meta-capi").unwrap_err().contains("must look like"));
        assert!(Grants::with_overrides("Meta=X").unwrap_err().contains("not a plugin name"));
        assert!(Grants::with_overrides("a=lower").unwrap_err().contains("not a variable name"));
        assert!(Grants::with_overrides("a=*").unwrap_err().contains("not a variable name"));
        assert!(Grants::with_overrides("a=X;a=Y").unwrap_err().contains("named twice"));
    }

    #[test]
    fn the_plugin_environment_holds_no_host_setting() {
        let env: Environment = [("API_KEY", "k"), ("META_PIXEL_ID", "1")]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect::<std::collections::HashMap<_, _>>()
            .into();
        let pe = PluginEnv::new(&env, Grants::default());
        assert_eq!(pe.get("meta-capi", "META_PIXEL_ID").unwrap().0, Some("1"));
        assert!(pe.get("meta-capi", "API_KEY").is_err());
        assert_eq!(pe.env.get("API_KEY"), None);
    }
}
