//! __NAME__: posts each deal event to the configured endpoint. The logic
//! (`request_for`, `outcome_for`) is plain Rust that `cargo test` runs
//! natively; `deliver` reads the settings and sends through the host.

// The generated export glue takes a parameter per flattened field.
#![allow(clippy::too_many_arguments)]

wit_bindgen::generate!({ world: "destination", path: "wit" });

use crm::plugin::http::{self, Request};
use crm::plugin::types::{Delivered, Failure, Header, Retryable};
use crm::plugin::{config, log};
use serde_json::json;

struct Plugin;

impl Guest for Plugin {
    fn deliver(event: CrmEvent, action: Action, context: DeliveryContext) -> Outcome {
        let Some(endpoint) = config::get("endpoint") else {
            return Outcome::Permanent(Failure { status: None, reason: "set __PREFIX___URL".into() });
        };
        let request = request_for(&event, &action, &context, &endpoint, config::get("token").as_deref());
        log::log(log::Level::Debug, &format!("posting {} for deal {}", action.name, event.reference));
        match http::send(&request) {
            Ok(response) => outcome_for(response.status, &response.body),
            Err(e) => Outcome::Retryable(Retryable { status: None, reason: format!("cannot reach {endpoint}: {e:?}"), retry_after_ms: None }),
        }
    }
}

export!(Plugin);

/// The request for one action: the event as JSON, with the job's
/// idempotency key so a retry is recognised downstream.
pub fn request_for(event: &CrmEvent, action: &Action, context: &DeliveryContext, endpoint: &str, token: Option<&str>) -> Request {
    let body = json!({
        "action": action.name,
        "event": event.event_type,
        "deal": { "id": event.reference, "status": event.status, "name": event.deal.name, "value": event.deal.value },
        "contact": { "email": event.customer.email },
    });
    let mut headers = vec![
        Header { name: "content-type".into(), value: "application/json".into() },
        Header { name: "idempotency-key".into(), value: context.idempotency_key.clone() },
    ];
    if let Some(token) = token {
        headers.push(Header { name: "authorization".into(), value: format!("Bearer {token}") });
    }
    Request { method: "POST".into(), url: endpoint.into(), headers, body: body.to_string().into_bytes() }
}

/// What an answer means: 2xx delivered; 408, 429 and 5xx worth retrying;
/// anything else final.
pub fn outcome_for(status: u16, body: &[u8]) -> Outcome {
    let excerpt = String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned();
    match status {
        200..=299 => Outcome::Delivered(Delivered { status: Some(status), detail: excerpt }),
        408 | 429 | 500..=599 => Outcome::Retryable(Retryable { status: Some(status), reason: excerpt, retry_after_ms: None }),
        _ => Outcome::Permanent(Failure { status: Some(status), reason: excerpt }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_classified_by_status() {
        assert!(matches!(outcome_for(201, b"ok"), Outcome::Delivered(_)));
        assert!(matches!(outcome_for(503, b""), Outcome::Retryable(_)));
        assert!(matches!(outcome_for(400, b"bad"), Outcome::Permanent(f) if f.reason == "bad"));
    }
}
