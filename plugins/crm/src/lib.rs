//! Source plugin for the reference CRM (the seed system's payload).
//!
//! Reads `data.dealId`, `data.customer`, `data.dealDetails` and
//! `data.propertyInformation` from the JSON body and the `x-event` header.
//! Every problem is reported with the path of the field at fault.

wit_bindgen::generate!({ world: "source", path: "../../wit" });

use crm::plugin::types::{Customer, Deal, FieldError, Property};
use serde_json::{Map, Value};

struct CrmSource;

impl Guest for CrmSource {
    fn parse(headers: Vec<Header>, body: Vec<u8>) -> Result<CrmEvent, ParseError> {
        parse_webhook(&headers, &body)
    }
}

export!(CrmSource);

/// The event type recorded when the CRM sends no `x-event` header.
const UNSPECIFIED_EVENT: &str = "unspecified";

/// Parse one webhook. Pure: no host calls, so it is tested natively.
pub fn parse_webhook(headers: &[Header], body: &[u8]) -> Result<CrmEvent, ParseError> {
    let root: Value =
        serde_json::from_slice(body).map_err(|e| ParseError::Malformed(format!("body is not valid JSON: {e}")))?;
    let root = as_object(&root, "body")?;
    let data = as_object(required(root, "data", "data")?, "data")?;

    let reference = required_string(data, "dealId", "data.dealId")?;
    let details = match data.get("dealDetails") {
        Some(v) => as_object(v, "data.dealDetails")?,
        None => return Err(ParseError::MissingField("data.dealDetails.status".into())),
    };
    let status = required_string(details, "status", "data.dealDetails.status")?;

    let customer = match data.get("customer") {
        None | Some(Value::Null) => {
            Customer { contact_id: None, first_name: None, last_name: None, email: None, phone: None }
        }
        Some(v) => {
            let c = as_object(v, "data.customer")?;
            Customer {
                contact_id: optional_string(c, "contactId", "data.customer.contactId")?,
                first_name: optional_string(c, "firstName", "data.customer.firstName")?,
                last_name: optional_string(c, "lastName", "data.customer.lastName")?,
                email: optional_string(c, "email", "data.customer.email")?,
                phone: optional_string(c, "phoneNumber", "data.customer.phoneNumber")?,
            }
        }
    };

    let currency =
        optional_string(details, "currency", "data.dealDetails.currency")?.map(|c| c.trim().to_ascii_uppercase());
    if let Some(c) = &currency
        && (c.len() != 3 || !c.bytes().all(|b| b.is_ascii_uppercase()))
    {
        return Err(invalid("data.dealDetails.currency", "a three-letter ISO 4217 code"));
    }
    let deal = Deal {
        name: optional_string(details, "dealName", "data.dealDetails.dealName")?,
        value: optional_number(details, "dealValue", "data.dealDetails.dealValue")?,
        currency,
        closing_date: optional_string(details, "closingDate", "data.dealDetails.closingDate")?,
    };

    let property = match data.get("propertyInformation") {
        None | Some(Value::Null) => None,
        Some(v) => {
            let p = as_object(v, "data.propertyInformation")?;
            let f = |key: &str| optional_string(p, key, &format!("data.propertyInformation.{key}"));
            Some(Property {
                id: f("propertyId")?,
                address: f("address")?,
                city: f("city")?,
                state: f("state")?,
                zip_code: f("zipCode")?,
                property_type: f("propertyType")?,
                square_footage: optional_number(p, "squareFootage", "data.propertyInformation.squareFootage")?,
            })
        }
    };

    let event_type = headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case("x-event"))
        .map(|h| h.value.trim().to_string())
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| UNSPECIFIED_EVENT.to_string());

    Ok(CrmEvent { event_type, reference, status, customer, deal, property, received_at: 0 })
}

fn invalid(field: &str, expected: &str) -> ParseError {
    ParseError::InvalidField(FieldError { field: field.into(), expected: expected.into() })
}

fn required<'a>(obj: &'a Map<String, Value>, key: &str, path: &str) -> Result<&'a Value, ParseError> {
    match obj.get(key) {
        None | Some(Value::Null) => Err(ParseError::MissingField(path.into())),
        Some(v) => Ok(v),
    }
}

fn as_object<'a>(v: &'a Value, path: &str) -> Result<&'a Map<String, Value>, ParseError> {
    v.as_object().ok_or_else(|| invalid(path, "a JSON object"))
}

fn required_string(obj: &Map<String, Value>, key: &str, path: &str) -> Result<String, ParseError> {
    match optional_string(obj, key, path)? {
        Some(s) if !s.trim().is_empty() => Ok(s.trim().to_string()),
        Some(_) => Err(invalid(path, "a non-empty string")),
        None => Err(ParseError::MissingField(path.into())),
    }
}

/// A string field; numbers are accepted and kept as written (CRMs are loose
/// about ids and zip codes).
fn optional_string(obj: &Map<String, Value>, key: &str, path: &str) -> Result<Option<String>, ParseError> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(Value::Number(n)) => Ok(Some(n.to_string())),
        Some(_) => Err(invalid(path, "a string")),
    }
}

/// A number field; numeric strings such as "12500000.00" are accepted.
fn optional_number(obj: &Map<String, Value>, key: &str, path: &str) -> Result<Option<f64>, ParseError> {
    let n = match obj.get(key) {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::Number(n)) => n.as_f64(),
        Some(Value::String(s)) => s.trim().parse::<f64>().ok(),
        Some(_) => None,
    };
    match n {
        Some(n) if n.is_finite() && n >= 0.0 => Ok(Some(n)),
        _ => Err(invalid(path, "a non-negative number")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEMO: &str = include_str!("../../../examples/payloads/qualified.json");

    fn header(name: &str, value: &str) -> Header {
        Header { name: name.into(), value: value.into() }
    }

    #[test]
    fn parses_the_demo_payload() {
        let e = parse_webhook(&[header("x-event", "deal_created")], DEMO.as_bytes()).unwrap();
        assert_eq!(e.reference, "D-927483-XYZ");
        assert_eq!(e.status, "Qualified");
        assert_eq!(e.event_type, "deal_created");
        assert_eq!(e.customer.email.as_deref(), Some("john.doe@example.com"));
        assert_eq!(e.customer.phone.as_deref(), Some("+1234567890"));
        assert_eq!(e.deal.value, Some(12_500_000.0));
        assert_eq!(e.deal.currency.as_deref(), Some("USD"));
        let p = e.property.unwrap();
        assert_eq!(p.zip_code.as_deref(), Some("90210"));
        assert_eq!(p.square_footage, Some(15000.0));
    }

    #[test]
    fn missing_event_header_is_recorded_as_unspecified() {
        let e = parse_webhook(&[], DEMO.as_bytes()).unwrap();
        assert_eq!(e.event_type, "unspecified");
    }

    #[test]
    fn non_json_is_malformed() {
        let err = parse_webhook(&[], b"deal=1").unwrap_err();
        assert!(matches!(err, ParseError::Malformed(m) if m.contains("not valid JSON")));
    }

    #[test]
    fn missing_deal_id_names_the_field() {
        let body = DEMO.replace("\"dealId\"", "\"dealIdentifier\"");
        let err = parse_webhook(&[], body.as_bytes()).unwrap_err();
        assert!(matches!(err, ParseError::MissingField(f) if f == "data.dealId"));
    }

    #[test]
    fn missing_status_names_the_field() {
        let body = DEMO.replace("\"status\": \"Qualified\"", "\"stage\": \"Qualified\"");
        let err = parse_webhook(&[], body.as_bytes()).unwrap_err();
        assert!(matches!(err, ParseError::MissingField(f) if f == "data.dealDetails.status"));
    }

    #[test]
    fn wrong_type_names_field_and_expectation() {
        let body = DEMO.replace("12500000.00", "\"lots\"");
        match parse_webhook(&[], body.as_bytes()).unwrap_err() {
            ParseError::InvalidField(f) => {
                assert_eq!(f.field, "data.dealDetails.dealValue");
                assert_eq!(f.expected, "a non-negative number");
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn bad_currency_is_rejected() {
        let body = DEMO.replace("\"USD\"", "\"dollars\"");
        assert!(matches!(
            parse_webhook(&[], body.as_bytes()).unwrap_err(),
            ParseError::InvalidField(f) if f.field == "data.dealDetails.currency"
        ));
    }
}
