//! __NAME__: turns one webhook into the deal event it carries. The logic
//! is `parse_body`, plain Rust that `cargo test` runs natively; `parse`
//! only hands the request to it.

// The generated export glue takes a parameter per flattened field.
#![allow(clippy::too_many_arguments)]

wit_bindgen::generate!({ world: "source", path: "wit" });

use crm::plugin::types::{Customer, Deal, FieldError};
use serde_json::Value;

struct Plugin;

impl Guest for Plugin {
    fn parse(request: IncomingRequest) -> Result<Vec<CrmEvent>, ParseError> {
        parse_body(&request.body).map(|event| vec![event])
    }
}

export!(Plugin);

/// The event in a body like `example-payload.json`: `deal.id` and
/// `deal.status` are required; every problem names its field.
pub fn parse_body(body: &[u8]) -> Result<CrmEvent, ParseError> {
    let root: Value =
        serde_json::from_slice(body).map_err(|e| ParseError::Malformed(format!("the body is not JSON: {e}")))?;
    let text = |path: &str| root.pointer(path).and_then(Value::as_str).map(str::to_string);
    let required = |path: &str, field: &str| text(path).ok_or_else(|| ParseError::MissingField(field.into()));
    let value = match root.pointer("/deal/value") {
        None | Some(Value::Null) => None,
        Some(v) => Some(v.as_f64().ok_or_else(|| {
            ParseError::InvalidField(FieldError { field: "deal.value".into(), expected: "a number".into() })
        })?),
    };
    Ok(CrmEvent {
        event_type: text("/event").unwrap_or_else(|| "deal_updated".into()),
        reference: required("/deal/id", "deal.id")?,
        status: required("/deal/status", "deal.status")?,
        customer: Customer {
            contact_id: None,
            first_name: text("/contact/first_name"),
            last_name: text("/contact/last_name"),
            email: text("/contact/email"),
            phone: text("/contact/phone"),
            city: None,
            state: None,
            zip_code: None,
            country: None,
        },
        deal: Deal { name: text("/deal/name"), value, currency: text("/deal/currency"), closing_date: None },
        property: None,
        occurred_at: None,
        lead_id: None,
        // Set by the host.
        received_at: 0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_example_payload_is_one_qualified_deal() {
        let event = parse_body(include_bytes!("../example-payload.json")).unwrap();
        assert_eq!((event.reference.as_str(), event.status.as_str()), ("D-1001", "Qualified"));
        assert_eq!(event.customer.email.as_deref(), Some("jane.doe@example.com"));
        assert_eq!(event.deal.value, Some(250000.0));
    }

    #[test]
    fn problems_name_their_field() {
        assert!(matches!(parse_body(b"{\"deal\": {\"status\": \"Won\"}}"), Err(ParseError::MissingField(f)) if f == "deal.id"));
        let wrong = parse_body(b"{\"deal\": {\"id\": \"D\", \"status\": \"Won\", \"value\": \"lots\"}}");
        assert!(matches!(wrong, Err(ParseError::InvalidField(e)) if e.field == "deal.value"));
        assert!(matches!(parse_body(b"not json"), Err(ParseError::Malformed(_))));
    }
}
