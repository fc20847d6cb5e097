//! The SDK for destination plugins in Rust: the contract's bindings,
//! generated once here from `wit/plugin.wit`, and what every destination
//! otherwise writes again:
//!
//! - reading settings, with one error naming every missing variable
//!   ([`Settings`]);
//! - delivered, retryable and permanent outcomes ([`delivered`],
//!   [`retryable`], [`permanent`]), and what an HTTP status means by the
//!   contract's retry rules ([`outcome_for_status`], [`classify_status`]);
//! - the outcome of a request the host could not make
//!   ([`http_error_outcome`]);
//! - `Retry-After` ([`retry_after_ms`]), body excerpts and SHA-256.
//!
//! A plugin implements [`Guest`] and hands its type to [`export!`]:
//!
//! ```ignore
//! use crm_plugin_sdk::{Action, CrmEvent, DeliveryContext, Guest, Outcome, http};
//!
//! struct Notify;
//!
//! impl Guest for Notify {
//!     fn deliver(event: CrmEvent, action: Action, context: DeliveryContext) -> Outcome {
//!         let mut settings = crm_plugin_sdk::Settings::from_host();
//!         let url = settings.required("url", "NOTIFY_URL");
//!         if let Err(reason) = settings.finish("Notify") {
//!             return crm_plugin_sdk::permanent(None, reason);
//!         }
//!         // … build the request …
//!         # let request = todo!();
//!         match http::send(&request) {
//!             Ok(response) => crm_plugin_sdk::outcome_for_status(&response, "Notify", |_| "sent".into()),
//!             Err(e) => crm_plugin_sdk::http_error_outcome("Notify", e),
//!         }
//!     }
//! }
//!
//! crm_plugin_sdk::export!(Notify);
//! ```
//!
//! Everything but the host calls (`http::send`, `config`, `log`) is plain
//! Rust, so a plugin's tests run natively with `cargo test`.

use sha2::{Digest, Sha256};

#[doc(hidden)]
pub mod bindings {
    // The generated export glue takes a parameter per flattened field.
    #![allow(clippy::too_many_arguments)]
    wit_bindgen::generate!({
        world: "destination",
        path: "../wit",
        pub_export_macro: true,
        default_bindings_module: "crm_plugin_sdk::bindings",
        additional_derives: [PartialEq],
    });
}

pub use bindings::Guest;
pub use bindings::crm::plugin::types::{
    Action, CrmEvent, Customer, Deal, Delivered, DeliveryContext, Failure, Header, Outcome, Property, Retryable,
};
pub use bindings::crm::plugin::{config, http, log};
/// Export a type implementing [`Guest`] as the plugin's `deliver`.
pub use bindings::export;

/// A plugin's settings, read through the host's `config` import (or any
/// getter, in tests). Blank values count as unset. The defaults and the
/// checks of each value's shape belong in the manifest: the host applies
/// them before the plugin runs, so a key with a default is never missing.
pub struct Settings<G> {
    get: G,
    missing: Vec<String>,
}

impl Settings<fn(&str) -> Option<String>> {
    /// Settings as the host gives them.
    pub fn from_host() -> Self {
        Settings::new(config::get)
    }
}

impl<G: Fn(&str) -> Option<String>> Settings<G> {
    /// Settings from `get` (a test's values, say).
    pub fn new(get: G) -> Self {
        Settings { get, missing: Vec::new() }
    }

    /// The value of `key`, if it has one.
    pub fn optional(&self, key: &str) -> Option<String> {
        (self.get)(key).filter(|v| !v.trim().is_empty())
    }

    /// The value of `key`; if it has none, `var` (the variable that sets
    /// it) is noted for [`Settings::finish`], and this is empty.
    pub fn required(&mut self, key: &str, var: &str) -> String {
        self.optional(key).unwrap_or_else(|| {
            self.missing.push(var.to_string());
            String::new()
        })
    }

    /// Whether every required key had a value; if not, the reason names
    /// each missing variable: `"Meta is not configured: set A and B"`.
    pub fn finish(&self, service: &str) -> Result<(), String> {
        match self.missing.is_empty() {
            true => Ok(()),
            false => Err(format!("{service} is not configured: set {}", self.missing.join(" and "))),
        }
    }
}

/// Delivered.
pub fn delivered(status: Option<u16>, detail: impl Into<String>) -> Outcome {
    Outcome::Delivered(Delivered { status, detail: detail.into() })
}

/// Worth another attempt, after `retry_after_ms` if the downstream said so
/// (the host's backoff otherwise).
pub fn retryable(status: Option<u16>, reason: impl Into<String>, retry_after_ms: Option<u64>) -> Outcome {
    Outcome::Retryable(Retryable { status, reason: reason.into(), retry_after_ms })
}

/// Final: another attempt would fail the same way. The job is
/// dead-lettered with `reason`.
pub fn permanent(status: Option<u16>, reason: impl Into<String>) -> Outcome {
    Outcome::Permanent(Failure { status, reason: reason.into() })
}

/// The outcome of a request the host could not make or finish: refused by
/// the host (the allow-list, a limit) or malformed is final; a timeout, a
/// transport error or an answer too large is worth retrying. `service`
/// names the downstream in the reason.
pub fn http_error_outcome(service: &str, error: http::HttpError) -> Outcome {
    use http::HttpError;
    match error {
        HttpError::Denied(why) => permanent(None, format!("request refused by the host: {why}")),
        HttpError::InvalidRequest(why) => permanent(None, format!("invalid request: {why}")),
        HttpError::Timeout => retryable(None, format!("{service} did not answer in time"), None),
        HttpError::Transport(why) => retryable(None, format!("could not reach {service}: {why}"), None),
        HttpError::ResponseTooLarge(n) => retryable(None, format!("{service}'s answer exceeded {n} bytes"), None),
    }
}

/// What an answer means by the contract's retry rules, for a downstream
/// with nothing more to say: 2xx is delivered (with `detail` of it); 408,
/// 429 and 5xx are retried, after `Retry-After` if given; anything else is
/// final. The reason quotes the start of the body.
pub fn outcome_for_status(
    response: &http::Response,
    service: &str,
    detail: impl Fn(&http::Response) -> String,
) -> Outcome {
    let status = Some(response.status);
    let reason = || format!("{service} answered {}: {}", response.status, excerpt(&response.body));
    match classify_status(response.status) {
        StatusClass::Success => delivered(status, detail(response)),
        StatusClass::Retryable => retryable(status, reason(), retry_after_ms(header_pairs(&response.headers))),
        StatusClass::Permanent => permanent(status, reason()),
    }
}

/// Headers as (name, value) pairs, for [`retry_after_ms`] and
/// [`header_seconds`].
pub fn header_pairs(headers: &[Header]) -> impl Iterator<Item = (&str, &str)> {
    headers.iter().map(|h| (h.name.as_str(), h.value.as_str()))
}

/// What an HTTP status means for a delivery, by the contract's retry rules:
/// 2xx delivered; 408, 429 and 5xx worth retrying; any other status final.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatusClass {
    Success,
    Retryable,
    Permanent,
}

/// Classify an HTTP status by the contract's retry rules.
pub fn classify_status(status: u16) -> StatusClass {
    match status {
        200..=299 => StatusClass::Success,
        408 | 429 | 500..=599 => StatusClass::Retryable,
        _ => StatusClass::Permanent,
    }
}

/// Milliseconds to wait according to a `Retry-After` header given in
/// seconds (the HTTP-date form is not used by Meta or Brevo; it is ignored).
pub fn retry_after_ms<'a>(headers: impl IntoIterator<Item = (&'a str, &'a str)>) -> Option<u64> {
    header_seconds(headers, "retry-after")
}

/// The value of a header holding a whole number of seconds, in milliseconds.
pub fn header_seconds<'a>(headers: impl IntoIterator<Item = (&'a str, &'a str)>, name: &str) -> Option<u64> {
    headers
        .into_iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .and_then(|(_, v)| v.trim().parse::<u64>().ok())
        .map(|s| s.saturating_mul(1000))
}

/// Lower-case hex SHA-256 of `value`.
pub fn sha256_hex(value: &str) -> String {
    let digest = Sha256::digest(value.as_bytes());
    let mut out = String::with_capacity(64);
    for b in digest {
        out.push(char::from_digit(u32::from(b >> 4), 16).unwrap_or('0'));
        out.push(char::from_digit(u32::from(b & 0xf), 16).unwrap_or('0'));
    }
    out
}

/// Shorten a downstream body for an error message, on a char boundary.
pub fn excerpt(body: &[u8]) -> String {
    const MAX: usize = 300;
    let text = String::from_utf8_lossy(body);
    let text = text.trim();
    match text.char_indices().nth(MAX) {
        Some((i, _)) => format!("{}…", &text[..i]),
        None => text.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_follow_the_retry_rules() {
        assert_eq!(classify_status(200), StatusClass::Success);
        assert_eq!(classify_status(201), StatusClass::Success);
        assert_eq!(classify_status(408), StatusClass::Retryable);
        assert_eq!(classify_status(429), StatusClass::Retryable);
        assert_eq!(classify_status(503), StatusClass::Retryable);
        assert_eq!(classify_status(400), StatusClass::Permanent);
        assert_eq!(classify_status(401), StatusClass::Permanent);
        assert_eq!(classify_status(404), StatusClass::Permanent);
        assert_eq!(classify_status(302), StatusClass::Permanent);
    }

    #[test]
    fn retry_after_in_seconds() {
        assert_eq!(retry_after_ms([("Retry-After", "7")]), Some(7000));
        assert_eq!(retry_after_ms([("retry-after", "Wed, 21 Oct 2015 07:28:00 GMT")]), None);
        assert_eq!(retry_after_ms([("x-other", "7")]), None);
    }

    #[test]
    fn an_answer_becomes_an_outcome() {
        let answer = |status: u16, headers: &[(&str, &str)], body: &str| http::Response {
            status,
            headers: headers.iter().map(|(n, v)| Header { name: n.to_string(), value: v.to_string() }).collect(),
            body: body.as_bytes().to_vec(),
        };
        let detail = |r: &http::Response| format!("id {}", String::from_utf8_lossy(&r.body));
        assert_eq!(outcome_for_status(&answer(201, &[], "7"), "Notify", detail), delivered(Some(201), "id 7"));
        assert_eq!(
            outcome_for_status(&answer(429, &[("Retry-After", "3")], "slow down"), "Notify", detail),
            retryable(Some(429), "Notify answered 429: slow down", Some(3000))
        );
        assert_eq!(
            outcome_for_status(&answer(400, &[], "bad field"), "Notify", detail),
            permanent(Some(400), "Notify answered 400: bad field")
        );
    }

    #[test]
    fn a_request_the_host_could_not_make_is_final_or_retried_by_why() {
        use http::HttpError;
        assert_eq!(
            http_error_outcome("Notify", HttpError::Denied("not allowed".into())),
            permanent(None, "request refused by the host: not allowed")
        );
        assert_eq!(
            http_error_outcome("Notify", HttpError::Timeout),
            retryable(None, "Notify did not answer in time", None)
        );
        assert_eq!(
            http_error_outcome("Notify", HttpError::Transport("refused".into())),
            retryable(None, "could not reach Notify: refused", None)
        );
    }

    #[test]
    fn settings_name_every_missing_variable() {
        let mut s = Settings::new(|k| match k {
            "url" => Some("https://example.com".into()),
            "blank" => Some("  ".into()),
            _ => None,
        });
        assert_eq!(s.required("url", "NOTIFY_URL"), "https://example.com");
        assert_eq!(s.optional("blank"), None);
        s.required("token", "NOTIFY_TOKEN");
        s.required("blank", "NOTIFY_CHANNEL");
        assert_eq!(s.finish("Notify").unwrap_err(), "Notify is not configured: set NOTIFY_TOKEN and NOTIFY_CHANNEL");
    }

    #[test]
    fn sha256_matches_known_value() {
        assert_eq!(
            sha256_hex("john.doe@example.com"),
            "836f82db99121b3481011f16b49dfa5fbc714a0d1b1b9f784a1ebbbf5b39577f"
        );
    }

    #[test]
    fn excerpt_cuts_long_bodies_safely() {
        let long = "é".repeat(400);
        let e = excerpt(long.as_bytes());
        assert_eq!(e.chars().count(), 301);
        assert!(e.ends_with('…'));
    }
}
