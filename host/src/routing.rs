//! Routing: which destination actions a deal status triggers, and how hard
//! each destination may be driven. Configuration, not code: a TOML table
//! (`ROUTES_FILE`, default `routes.default.toml`), parsed strictly.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::event::normalize_status;

/// The built-in table: Qualified → Meta Lead; Committed → Meta Purchase +
/// Brevo property-details e-mail.
pub const DEFAULT_ROUTES: &str = include_str!("routes.default.toml");

/// One action a route asks for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ActionSpec {
    pub destination: String,
    pub action: String,
    #[serde(default)]
    pub params: BTreeMap<String, String>,
}

/// A status (and optionally provider) and its actions.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Route {
    pub status: String,
    #[serde(default)]
    pub provider: Option<String>,
    pub actions: Vec<ActionSpec>,
}

/// How hard one destination may be driven, per process (`[destination.NAME]`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DestinationLimits {
    /// Deliveries to it at once.
    pub max_concurrency: Option<u32>,
    /// Deliveries to it started per second (fractions allowed).
    pub max_per_second: Option<f64>,
}

/// The routing table.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Routes {
    #[serde(rename = "route", default)]
    routes: Vec<Route>,
    #[serde(rename = "destination", default)]
    limits: BTreeMap<String, DestinationLimits>,
}

/// A routing table that could not be used.
#[derive(Debug, thiserror::Error)]
pub enum RoutesError {
    #[error("cannot read routes file {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("routes file {path}: {message}")]
    Invalid { path: String, message: String },
}

impl Routes {
    /// The built-in default table.
    pub fn default_table() -> Routes {
        Routes::parse(DEFAULT_ROUTES, "built-in").unwrap_or(Routes { routes: Vec::new(), limits: BTreeMap::new() })
    }

    /// Load from a file.
    pub fn load(path: &Path) -> Result<Routes, RoutesError> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| RoutesError::Read { path: shown.clone(), source })?;
        Routes::parse(&text, &shown)
    }

    /// Parse and validate table text.
    pub fn parse(text: &str, origin: &str) -> Result<Routes, RoutesError> {
        let invalid = |message: String| RoutesError::Invalid { path: origin.to_string(), message };
        let routes: Routes = toml::from_str(text).map_err(|e| invalid(e.message().to_string()))?;
        for (i, r) in routes.routes.iter().enumerate() {
            if r.status.trim().is_empty() {
                return Err(invalid(format!("route {} has an empty status", i + 1)));
            }
            for a in &r.actions {
                if a.destination.trim().is_empty() || a.action.trim().is_empty() {
                    return Err(invalid(format!(
                        "route {} ({}) has an action without destination or action name",
                        i + 1,
                        r.status
                    )));
                }
            }
        }
        for (name, limits) in &routes.limits {
            if limits.max_concurrency == Some(0) {
                return Err(invalid(format!("destination.{name}.max_concurrency must be at least 1")));
            }
            if limits.max_per_second.is_some_and(|rate| !(rate.is_finite() && rate >= 0.01)) {
                return Err(invalid(format!("destination.{name}.max_per_second must be a number, at least 0.01")));
            }
        }
        Ok(routes)
    }

    /// The limits set for a destination (none: unlimited).
    pub fn limits(&self, destination: &str) -> DestinationLimits {
        self.limits.get(destination).copied().unwrap_or_default()
    }

    /// The actions for a provider's event with this status, in table order,
    /// without repeats (one job per destination action).
    pub fn actions_for(&self, provider: &str, status: &str) -> Vec<ActionSpec> {
        let status = normalize_status(status);
        let mut out: Vec<ActionSpec> = Vec::new();
        for route in &self.routes {
            let provider_ok = route.provider.as_deref().is_none_or(|p| p == provider);
            if provider_ok && normalize_status(&route.status) == status {
                for a in &route.actions {
                    if !out.iter().any(|o| o.destination == a.destination && o.action == a.action) {
                        out.push(a.clone());
                    }
                }
            }
        }
        out
    }

    /// Every destination the table names.
    pub fn destinations(&self) -> Vec<String> {
        let mut d: Vec<String> =
            self.routes.iter().flat_map(|r| r.actions.iter().map(|a| a.destination.clone())).collect();
        d.sort();
        d.dedup();
        d
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(actions: &[ActionSpec]) -> Vec<String> {
        actions.iter().map(|a| format!("{}:{}", a.destination, a.action)).collect()
    }

    #[test]
    fn default_table_matches_the_original_service() {
        let r = Routes::default_table();
        assert_eq!(names(&r.actions_for("crm", "Qualified")), ["meta-capi:Lead"]);
        assert_eq!(names(&r.actions_for("crm", "committed ")), ["meta-capi:Purchase", "brevo:property-details-email"]);
        assert!(r.actions_for("crm", "Lost").is_empty());
        assert_eq!(r.destinations(), ["brevo", "meta-capi"]);
    }

    #[test]
    fn provider_specific_routes_and_no_duplicates() {
        let r = Routes::parse(
            r#"
            [[route]]
            status = "Won"
            provider = "hubspot"
            actions = [{ destination = "meta-capi", action = "Purchase", params = { note = "x" } }]
            [[route]]
            status = "won"
            actions = [{ destination = "meta-capi", action = "Purchase" }]
            "#,
            "test",
        )
        .unwrap();
        assert_eq!(r.actions_for("hubspot", "Won").len(), 1);
        assert_eq!(r.actions_for("hubspot", "Won")[0].params["note"], "x");
        assert!(r.actions_for("crm", "Won")[0].params.is_empty());
    }

    #[test]
    fn destination_limits_are_read_and_checked() {
        let r = Routes::parse("[destination.brevo]\nmax_concurrency = 8\nmax_per_second = 1000", "f.toml").unwrap();
        assert_eq!(r.limits("brevo"), DestinationLimits { max_concurrency: Some(8), max_per_second: Some(1000.0) });
        assert_eq!(r.limits("meta-capi"), DestinationLimits::default());
        let err = Routes::parse("[destination.brevo]\nmax_concurrency = 0", "f.toml").unwrap_err();
        assert!(err.to_string().contains("destination.brevo.max_concurrency must be at least 1"), "{err}");
        let err = Routes::parse("[destination.brevo]\nmax_per_second = -1", "f.toml").unwrap_err();
        assert!(err.to_string().contains("max_per_second must be a number, at least 0.01"), "{err}");
        let err = Routes::parse("[destination.brevo]\nburst = 3", "f.toml").unwrap_err();
        assert!(err.to_string().contains("unknown field `burst`"), "{err}");
    }

    #[test]
    fn unknown_fields_are_rejected() {
        let err = Routes::parse("[[route]]\nstatus = \"x\"\nactions = []\nwhen = 1", "f.toml").unwrap_err();
        assert!(err.to_string().contains("unknown field `when`"), "{err}");
    }
}
