//! __NAME__: posts each deal event to the configured endpoint. The logic
//! (`request_for`, and the SDK's `outcome_for_status`) is plain Rust that
//! `cargo test` runs natively; `deliver` reads the settings and sends
//! through the host. `sdk/` is crm-plugin-sdk: the contract's bindings and
//! the helpers every destination needs.

use crm_plugin_sdk::http::{self, Request};
use crm_plugin_sdk::{Action, CrmEvent, DeliveryContext, Guest, Header, Outcome, Settings, log};
use serde_json::json;

struct Plugin;

impl Guest for Plugin {
    fn deliver(event: CrmEvent, action: Action, context: DeliveryContext) -> Outcome {
        let mut settings = Settings::from_host();
        let endpoint = settings.required("endpoint", "__PREFIX___URL");
        if let Err(reason) = settings.finish("__NAME__") {
            return crm_plugin_sdk::permanent(None, reason);
        }
        let request = request_for(&event, &action, &context, &endpoint, settings.optional("token").as_deref());
        log::log(log::Level::Debug, &format!("posting {} for deal {}", action.name, event.reference));
        match http::send(&request) {
            Ok(response) => crm_plugin_sdk::outcome_for_status(&response, "__NAME__", |r| crm_plugin_sdk::excerpt(&r.body)),
            Err(e) => crm_plugin_sdk::http_error_outcome("__NAME__", e),
        }
    }
}

crm_plugin_sdk::export!(Plugin);

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

#[cfg(test)]
mod tests {
    use super::*;
    use crm_plugin_sdk::{Customer, Deal};

    fn event() -> CrmEvent {
        CrmEvent {
            event_type: "deal_updated".into(),
            reference: "D-1".into(),
            status: "Committed".into(),
            customer: Customer {
                contact_id: None,
                first_name: None,
                last_name: None,
                email: Some("jo@example.com".into()),
                phone: None,
                city: None,
                state: None,
                zip_code: None,
                country: None,
            },
            deal: Deal { name: Some("Harbour View".into()), value: Some(1.0), currency: None, closing_date: None },
            property: None,
            occurred_at: None,
            lead_id: None,
            received_at: 0,
        }
    }

    #[test]
    fn the_request_carries_the_event_and_the_idempotency_key() {
        let action = Action { name: "notify".into(), params: vec![] };
        let context = DeliveryContext { receipt_id: "r".into(), provider: "crm".into(), attempt: 1, idempotency_key: "k-1".into() };
        let request = request_for(&event(), &action, &context, "https://example.com/hook", Some("t"));
        let body: serde_json::Value = serde_json::from_slice(&request.body).unwrap();
        assert_eq!(body["deal"]["id"], "D-1");
        assert!(request.headers.iter().any(|h| h.name == "idempotency-key" && h.value == "k-1"));
        assert!(request.headers.iter().any(|h| h.name == "authorization" && h.value == "Bearer t"));
    }

    #[test]
    fn answers_are_classified_by_status() {
        let answer = |status: u16| http::Response { status, headers: vec![], body: b"bad".to_vec() };
        let outcome = |status| crm_plugin_sdk::outcome_for_status(&answer(status), "__NAME__", |_| String::new());
        assert!(matches!(outcome(201), Outcome::Delivered(_)));
        assert!(matches!(outcome(503), Outcome::Retryable(_)));
        assert!(matches!(outcome(400), Outcome::Permanent(f) if f.reason == "__NAME__ answered 400: bad"));
    }
}
