//! Who may call what.
//!
//! - Webhooks: `x-api-key` must be `API_KEY`, or `API_KEY_PREVIOUS` while a
//!   rotation is under way (sources that authenticate themselves skip this).
//! - Operator routes (receipts, dead letters, replay, plugins, and anything
//!   added under `operator_routes`): `ADMIN_API_KEY`, in `x-api-key` or
//!   `Authorization: Bearer`. The webhook keys never open them. Without
//!   `ADMIN_API_KEY`, the webhook key opens them from loopback addresses
//!   only, and not through a proxy (a request carrying `Forwarded`,
//!   `X-Forwarded-For` or `X-Real-IP` came from elsewhere), so the first-run
//!   demo works on the machine itself and nowhere else.
//!
//! Keys are compared as SHA-256 digests in constant time, every accepted key
//! each time: how long a check takes says nothing about the keys, whatever
//! the length of the key presented.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};
use subtle::{Choice, ConstantTimeEq};

use super::ApiError;
use crate::App;
use crate::config::{Config, Secret};

/// The accepted keys, as digests.
pub struct Keys {
    webhook: Vec<[u8; 32]>,
    admin: Option<[u8; 32]>,
}

fn digest(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

fn any_matches(presented: &[u8], keys: &[[u8; 32]]) -> bool {
    let presented = digest(presented);
    keys.iter().fold(Choice::from(0), |found, key| found | presented.ct_eq(key)).into()
}

impl Keys {
    pub fn new(config: &Config) -> Keys {
        let d = |s: &Secret| digest(s.expose().as_bytes());
        Keys { webhook: config.webhook_keys.iter().map(d).collect(), admin: config.admin_key.as_ref().map(d) }
    }

    /// Whether a webhook's `x-api-key` (among these headers, names
    /// lower-case) is one of the webhook keys.
    pub fn webhook_pairs(&self, headers: &[(String, String)]) -> bool {
        let given = headers.iter().find(|(n, _)| n == "x-api-key").map(|(_, v)| v.as_bytes()).unwrap_or_default();
        any_matches(given, &self.webhook)
    }

    /// Whether the caller may use the operator routes.
    fn operator(&self, headers: &HeaderMap, peer: Option<SocketAddr>) -> Result<(), ApiError> {
        let given = presented(headers);
        match &self.admin {
            Some(admin) if any_matches(given, std::slice::from_ref(admin)) => Ok(()),
            Some(_) => Err(ApiError::new(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "this route needs the operator key (ADMIN_API_KEY) in x-api-key or Authorization: Bearer",
            )),
            None if !peer.is_some_and(|p| p.ip().is_loopback()) || proxied(headers) => Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "admin_key_not_set",
                "operator routes answer only on this machine until ADMIN_API_KEY is set",
            )),
            None if any_matches(given, &self.webhook) => Ok(()),
            None => Err(ApiError::new(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "this route needs a key in x-api-key or Authorization: Bearer (ADMIN_API_KEY is not set, so API_KEY, from this machine)",
            )),
        }
    }
}

/// Whether a proxy forwarded the request (its client is not the peer).
fn proxied(headers: &HeaderMap) -> bool {
    ["forwarded", "x-forwarded-for", "x-real-ip"].iter().any(|h| headers.contains_key(*h))
}

/// The key in `x-api-key`, else in `Authorization: Bearer …`.
fn presented(headers: &HeaderMap) -> &[u8] {
    if let Some(key) = headers.get("x-api-key") {
        return key.as_bytes();
    }
    headers
        .get("authorization")
        .map(|v| v.as_bytes())
        .and_then(|v| v.strip_prefix(b"Bearer ").or_else(|| v.strip_prefix(b"bearer ")))
        .map(|v| v.trim_ascii())
        .unwrap_or_default()
}

/// `route_layer` for the operator routes: checked before any body is read.
pub async fn require_operator(State(app): State<Arc<App>>, request: Request, next: Next) -> Response {
    let peer = request.extensions().get::<ConnectInfo<SocketAddr>>().map(|c| c.0);
    match app.keys.operator(request.headers(), peer) {
        Ok(()) => next.run(request).await,
        Err(e) => e.into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(pairs: &[(&str, &str)]) -> Keys {
        let vars = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        Keys::new(&Config::from_vars(vars).unwrap())
    }

    fn pairs(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs.iter().map(|(n, v)| (n.to_string(), v.to_string())).collect()
    }

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (n, v) in pairs {
            h.insert(axum::http::HeaderName::from_bytes(n.as_bytes()).unwrap(), v.parse().unwrap());
        }
        h
    }

    const LOCAL: Option<SocketAddr> = Some(SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 5000));
    const REMOTE: Option<SocketAddr> =
        Some(SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::new(203, 0, 113, 9)), 5000));

    #[test]
    fn both_keys_are_accepted_during_a_rotation_and_nothing_else() {
        let k = keys(&[("API_KEY", "new-key"), ("API_KEY_PREVIOUS", "old-key")]);
        assert!(k.webhook_pairs(&pairs(&[("x-api-key", "new-key")])));
        assert!(k.webhook_pairs(&pairs(&[("x-api-key", "old-key")])));
        for wrong in ["new-ke", "new-key2", "", "NEW-KEY", &"x".repeat(10_000)] {
            assert!(!k.webhook_pairs(&pairs(&[("x-api-key", wrong)])), "{wrong}");
        }
        assert!(!k.webhook_pairs(&pairs(&[])));
    }

    #[test]
    fn the_admin_key_opens_operator_routes_and_the_webhook_key_does_not() {
        let k = keys(&[("API_KEY", "hook"), ("ADMIN_API_KEY", "admin")]);
        assert!(k.operator(&headers(&[("x-api-key", "admin")]), REMOTE).is_ok());
        assert!(k.operator(&headers(&[("authorization", "Bearer admin")]), REMOTE).is_ok());
        for attempt in [headers(&[("x-api-key", "hook")]), headers(&[("authorization", "Bearer hook")]), headers(&[])] {
            assert_eq!(k.operator(&attempt, LOCAL).unwrap_err().status, StatusCode::UNAUTHORIZED);
        }
    }

    #[test]
    fn without_an_admin_key_the_webhook_key_works_from_this_machine_only() {
        let k = keys(&[("API_KEY", "hook")]);
        assert!(k.operator(&headers(&[("x-api-key", "hook")]), LOCAL).is_ok());
        assert_eq!(k.operator(&headers(&[("x-api-key", "hook")]), REMOTE).unwrap_err().status, StatusCode::FORBIDDEN);
        assert_eq!(k.operator(&headers(&[("x-api-key", "hook")]), None).unwrap_err().status, StatusCode::FORBIDDEN);
        // A local reverse proxy makes every client look local: not enough.
        let proxied = headers(&[("x-api-key", "hook"), ("x-forwarded-for", "203.0.113.9")]);
        assert_eq!(k.operator(&proxied, LOCAL).unwrap_err().status, StatusCode::FORBIDDEN);
        assert_eq!(k.operator(&headers(&[("x-api-key", "nope")]), LOCAL).unwrap_err().status, StatusCode::UNAUTHORIZED);
    }
}
