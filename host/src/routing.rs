//! Routing: which destination actions a deal status triggers. Configuration,
//! not code: a TOML table (`ROUTES_FILE`, default `routes.default.toml`),
//! parsed strictly.

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

/// The routing table.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Routes {
    #[serde(rename = "route", default)]
    routes: Vec<Route>,
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
        Routes::parse(DEFAULT_ROUTES, "built-in").unwrap_or(Routes { routes: Vec::new() })
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
        Ok(routes)
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
    fn unknown_fields_are_rejected() {
        let err = Routes::parse("[[route]]\nstatus = \"x\"\nactions = []\nwhen = 1", "f.toml").unwrap_err();
        assert!(err.to_string().contains("unknown field `when`"), "{err}");
    }
}
