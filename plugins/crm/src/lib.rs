//! Source plugin for the reference CRM (the seed system's payload).
//!
//! Reads `data.dealId`, `data.customer`, `data.dealDetails` and
//! `data.propertyInformation` from the JSON body and the `x-event` header;
//! optionally the customer's address (`data.customer.city`, `state`,
//! `zipCode`, `country`), a Meta lead id (`data.leadId`) and when the deal
//! reached its status (`data.dealDetails.statusChangedAt`, unix seconds or
//! RFC 3339). Every problem is reported with the path of the field at
//! fault. One webhook, one event; the host authenticates it (`x-api-key`).

// The generated export glue takes a parameter per flattened field.
#![allow(clippy::too_many_arguments)]

wit_bindgen::generate!({ world: "source", path: "../../wit" });

use crm::plugin::types::{Customer, Deal, FieldError, Header, Property};
use serde_json::{Map, Value};

struct CrmSource;

impl Guest for CrmSource {
    fn parse(request: IncomingRequest) -> Result<Vec<CrmEvent>, ParseError> {
        parse_webhook(&request.headers, &request.body).map(|event| vec![event])
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
        None | Some(Value::Null) => Customer {
            contact_id: None,
            first_name: None,
            last_name: None,
            email: None,
            phone: None,
            city: None,
            state: None,
            zip_code: None,
            country: None,
        },
        Some(v) => {
            let c = as_object(v, "data.customer")?;
            let f = |key: &str| optional_string(c, key, &format!("data.customer.{key}"));
            Customer {
                contact_id: f("contactId")?,
                first_name: f("firstName")?,
                last_name: f("lastName")?,
                email: f("email")?,
                phone: f("phoneNumber")?,
                city: f("city")?,
                state: f("state")?,
                zip_code: f("zipCode")?,
                country: f("country")?,
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

    let occurred_at = match details.get("statusChangedAt") {
        None | Some(Value::Null) => None,
        Some(v) => Some(timestamp(v).ok_or_else(|| {
            invalid("data.dealDetails.statusChangedAt", "unix seconds or an RFC 3339 time such as 2026-03-15T09:30:00Z")
        })?),
    };
    let lead_id = optional_string(data, "leadId", "data.leadId")?;

    Ok(CrmEvent { event_type, reference, status, customer, deal, property, occurred_at, lead_id, received_at: 0 })
}

/// Unix seconds from a number (seconds, or milliseconds if that large) or
/// an RFC 3339 string (`Z` or a `±hh:mm` offset).
pub fn timestamp(v: &Value) -> Option<u64> {
    match v {
        Value::Number(n) => {
            let n = n.as_u64()?;
            Some(if n > 100_000_000_000 { n / 1000 } else { n })
        }
        Value::String(s) => rfc3339(s.trim()),
        _ => None,
    }
}

fn rfc3339(s: &str) -> Option<u64> {
    let num = |from: usize, to: usize| s.get(from..to)?.parse::<i64>().ok();
    let bytes = s.as_bytes();
    if s.len() < 20 || bytes[4] != b'-' || bytes[7] != b'-' || !matches!(bytes[10], b'T' | b't' | b' ') {
        return None;
    }
    let (year, month, day) = (num(0, 4)?, num(5, 7)?, num(8, 10)?);
    let (hour, minute, second) = (num(11, 13)?, num(14, 16)?, num(17, 19)?);
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) || hour > 23 || minute > 59 || second > 60 {
        return None;
    }
    // Skip fractional seconds, then read the offset.
    let rest = s[19..].trim_start_matches(|c: char| c == '.' || c.is_ascii_digit());
    let offset = match rest {
        "Z" | "z" => 0,
        _ if rest.len() == 6 && (rest.starts_with('+') || rest.starts_with('-')) => {
            let h: i64 = rest.get(1..3)?.parse().ok()?;
            let m: i64 = rest.get(4..6)?.parse().ok()?;
            let sign = if rest.starts_with('-') { -1 } else { 1 };
            sign * (h * 3600 + m * 60)
        }
        _ => return None,
    };
    // Days from the civil date (Howard Hinnant's algorithm).
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    u64::try_from(days * 86_400 + hour * 3600 + minute * 60 + second - offset).ok()
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
    fn optional_crm_fields_reach_the_event() {
        let body = DEMO
            .replace(
                "\"phoneNumber\": \"+1234567890\"",
                "\"phoneNumber\": \"+1234567890\", \"city\": \"Austin\", \"country\": \"US\"",
            )
            .replace(
                "\"closingDate\": \"2026-03-15\"",
                "\"closingDate\": \"2026-03-15\", \"statusChangedAt\": \"2026-03-01T12:00:00+01:00\"",
            )
            .replace(
                "\"dealId\": \"D-927483-XYZ\",",
                "\"dealId\": \"D-927483-XYZ\", \"leadId\": \"1234567890123456\",",
            );
        let e = parse_webhook(&[], body.as_bytes()).unwrap();
        assert_eq!((e.customer.city.as_deref(), e.customer.country.as_deref()), (Some("Austin"), Some("US")));
        assert_eq!(e.lead_id.as_deref(), Some("1234567890123456"));
        assert_eq!(e.occurred_at, Some(1_772_362_800));
        let e = parse_webhook(&[], DEMO.as_bytes()).unwrap();
        assert_eq!((e.occurred_at, e.lead_id), (None, None));
    }

    #[test]
    fn change_times_are_read_as_seconds_or_rfc3339() {
        assert_eq!(timestamp(&serde_json::json!(1_700_000_000)), Some(1_700_000_000));
        assert_eq!(timestamp(&serde_json::json!(1_700_000_000_123u64)), Some(1_700_000_000));
        assert_eq!(timestamp(&serde_json::json!("1970-01-01T00:00:00Z")), Some(0));
        assert_eq!(timestamp(&serde_json::json!("2000-02-29T23:59:59.5Z")), Some(951_868_799));
        assert_eq!(timestamp(&serde_json::json!("2026-03-01T12:00:00-05:30")), Some(1_772_386_200));
        for bad in ["2026-13-01T00:00:00Z", "yesterday", "2026-03-01", "2026-03-01T12:00:00"] {
            assert_eq!(timestamp(&serde_json::json!(bad)), None, "{bad}");
        }
        let body = DEMO.replace(
            "\"closingDate\": \"2026-03-15\"",
            "\"closingDate\": \"2026-03-15\", \"statusChangedAt\": \"soon\"",
        );
        let err = parse_webhook(&[], body.as_bytes()).unwrap_err();
        assert!(matches!(err, ParseError::InvalidField(f) if f.field == "data.dealDetails.statusChangedAt"));
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
