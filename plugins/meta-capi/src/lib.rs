//! Destination plugin for Meta's Conversions API.
//!
//! One action per event name (`Lead`, `Purchase`, …): sends
//! `POST {graph_url}/{api_version}/{pixel_id}/events` with one server event
//! whose `user_data` is normalized and SHA-256 hashed here, inside the
//! sandbox, so raw customer data never leaves it unhashed. `event_id` is the
//! host's idempotency key, so Meta deduplicates retries.

wit_bindgen::generate!({ world: "destination", path: "../../wit" });

use crm::plugin::http::{self, HttpError, Request, Response};
use crm::plugin::types::{Delivered, Failure, Header, Retryable};
use crm::plugin::{config, log};
use plugin_support::{StatusClass, classify_status, excerpt, retry_after_ms, sha256_hex};
use serde_json::{Map, Value, json};

struct MetaCapi;

impl Guest for MetaCapi {
    fn deliver(event: CrmEvent, action: Action, context: DeliveryContext) -> Outcome {
        let settings = match Settings::from_config(config::get) {
            Ok(s) => s,
            Err(missing) => return permanent(None, missing),
        };
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        if let Some(reason) = outside_window(event.received_at, now) {
            return permanent(None, reason);
        }
        let request = match build_request(&settings, &event, &action, &context) {
            Ok(r) => r,
            Err(reason) => return permanent(None, reason),
        };
        log::log(log::Level::Debug, &format!("sending {} for deal {}", action.name, event.reference));
        match http::send(&request) {
            Ok(response) => classify_response(&response),
            Err(e) => http_error_outcome(e),
        }
    }
}

export!(MetaCapi);

/// Error codes Meta documents as transient (throttling, temporary outage).
const RETRYABLE_CODES: [i64; 7] = [1, 2, 4, 17, 341, 368, 80003];
/// Error codes that will not succeed on retry (bad parameter, token, permission).
const PERMANENT_CODES: [i64; 3] = [100, 190, 200];

/// The plugin's configuration, read through the host's `config` import.
#[derive(Debug, Clone)]
pub struct Settings {
    pub access_token: String,
    pub pixel_id: String,
    pub api_version: String,
    pub graph_url: String,
    pub action_source: String,
    pub event_source_url: Option<String>,
    pub test_event_code: Option<String>,
}

impl Settings {
    /// Read settings; the error names every missing key's variable.
    pub fn from_config(get: impl Fn(&str) -> Option<String>) -> Result<Self, String> {
        let get = |k: &str| get(k).filter(|v| !v.trim().is_empty());
        let mut missing = Vec::new();
        let mut need = |key: &str, var: &str| {
            get(key).unwrap_or_else(|| {
                missing.push(var.to_string());
                String::new()
            })
        };
        let access_token = need("access_token", "META_ACCESS_TOKEN");
        let pixel_id = need("pixel_id", "META_PIXEL_ID");
        if !missing.is_empty() {
            return Err(format!("Meta is not configured: set {}", missing.join(" and ")));
        }
        let api_version = get("api_version").unwrap_or_else(|| "v21.0".into());
        let version_ok = api_version.strip_prefix('v').is_some_and(|rest| {
            let mut parts = rest.split('.');
            let number = |p: Option<&str>| p.is_some_and(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()));
            number(parts.next()) && number(parts.next()) && parts.next().is_none()
        });
        if !version_ok {
            return Err(format!("META_API_VERSION must look like v21.0, got {api_version:?}"));
        }
        Ok(Settings {
            access_token,
            pixel_id,
            api_version,
            graph_url: get("graph_url").unwrap_or_else(|| "https://graph.facebook.com".into()),
            action_source: get("action_source").unwrap_or_else(|| "system_generated".into()),
            event_source_url: get("event_source_url"),
            test_event_code: get("test_event_code"),
        })
    }
}

/// Meta refuses events whose `event_time` is more than 7 days old.
const MAX_EVENT_AGE_SECS: u64 = 7 * 24 * 3600;

/// Why an event can no longer be sent (e.g. a dead letter replayed late),
/// said plainly instead of Meta's generic parameter error.
pub fn outside_window(event_time: u64, now: u64) -> Option<String> {
    let age = now.saturating_sub(event_time);
    (age > MAX_EVENT_AGE_SECS)
        .then(|| format!("the event is {} days old; Meta accepts events up to 7 days old", age / 86_400))
}

/// Normalize and hash an e-mail address: trimmed, lower-cased.
pub fn hash_email(email: &str) -> Option<String> {
    let e = email.trim().to_lowercase();
    (!e.is_empty()).then(|| sha256_hex(&e))
}

/// Normalize and hash a phone number: digits only, country code kept
/// (a leading `00` international prefix is dropped).
pub fn hash_phone(phone: &str) -> Option<String> {
    let digits: String = phone.chars().filter(char::is_ascii_digit).collect();
    let digits = digits.strip_prefix("00").unwrap_or(&digits);
    (!digits.is_empty()).then(|| sha256_hex(digits))
}

/// Normalize and hash a first or last name: trimmed, lower-cased.
pub fn hash_name(name: &str) -> Option<String> {
    let n = name.trim().to_lowercase();
    (!n.is_empty()).then(|| sha256_hex(&n))
}

/// Hash the CRM's contact id as `external_id` (trimmed; ids are case-sensitive).
pub fn hash_external_id(id: &str) -> Option<String> {
    let id = id.trim();
    (!id.is_empty()).then(|| sha256_hex(id))
}

/// Build `user_data`: every field is a one-element array of hashes.
pub fn user_data(event: &CrmEvent) -> Map<String, Value> {
    let c = &event.customer;
    let mut out = Map::new();
    let fields = [
        ("em", c.email.as_deref().and_then(hash_email)),
        ("ph", c.phone.as_deref().and_then(hash_phone)),
        ("fn", c.first_name.as_deref().and_then(hash_name)),
        ("ln", c.last_name.as_deref().and_then(hash_name)),
        ("external_id", c.contact_id.as_deref().and_then(hash_external_id)),
    ];
    for (key, hash) in fields {
        if let Some(h) = hash {
            out.insert(key.into(), json!([h]));
        }
    }
    out
}

/// Build the Conversions API request for one event and action.
pub fn build_request(
    settings: &Settings,
    event: &CrmEvent,
    action: &Action,
    context: &DeliveryContext,
) -> Result<Request, String> {
    let event_name = action.name.trim();
    if event_name.is_empty() {
        return Err("the route gave no Meta event name".into());
    }
    let user_data = user_data(event);
    if user_data.is_empty() {
        return Err("the event has no customer e-mail, phone, name or contact id to match on".into());
    }
    let mut custom = Map::new();
    if let Some(v) = event.deal.value {
        custom.insert("value".into(), json!(v));
    }
    if let Some(c) = &event.deal.currency {
        custom.insert("currency".into(), json!(c));
    }
    if event_name == "Purchase" && (event.deal.value.is_none() || event.deal.currency.is_none()) {
        return Err("a Purchase event needs the deal's value and currency".into());
    }
    custom.insert("deal_id".into(), json!(event.reference));

    let mut server_event = json!({
        "event_name": event_name,
        "event_time": event.received_at,
        "event_id": context.idempotency_key,
        "action_source": settings.action_source,
        "user_data": user_data,
        "custom_data": custom,
    });
    if let Some(url) = &settings.event_source_url {
        server_event["event_source_url"] = json!(url);
    }
    let mut body = json!({ "data": [server_event], "access_token": settings.access_token });
    if let Some(code) = &settings.test_event_code {
        body["test_event_code"] = json!(code);
    }
    let url =
        format!("{}/{}/{}/events", settings.graph_url.trim_end_matches('/'), settings.api_version, settings.pixel_id);
    Ok(Request {
        method: "POST".into(),
        url,
        headers: vec![Header { name: "content-type".into(), value: "application/json".into() }],
        body: serde_json::to_vec(&body).map_err(|e| e.to_string())?,
    })
}

/// Turn Meta's answer into an outcome, by its documented error codes.
pub fn classify_response(response: &Response) -> Outcome {
    let status = response.status;
    let headers = response.headers.iter().map(|h| (h.name.as_str(), h.value.as_str()));
    let body: Value = serde_json::from_slice(&response.body).unwrap_or(Value::Null);
    if classify_status(status) == StatusClass::Success {
        let received = body.get("events_received").and_then(Value::as_i64).unwrap_or(0);
        let trace = body.get("fbtrace_id").and_then(Value::as_str).unwrap_or("-");
        return Outcome::Delivered(Delivered {
            status: Some(status),
            detail: format!("events_received={received} fbtrace_id={trace}"),
        });
    }
    let error = body.get("error");
    let code = error.and_then(|e| e.get("code")).and_then(Value::as_i64);
    let transient = error.and_then(|e| e.get("is_transient")).and_then(Value::as_bool) == Some(true);
    let message = error
        .and_then(|e| e.get("message"))
        .and_then(Value::as_str)
        .map(str::to_string)
        .unwrap_or_else(|| excerpt(&response.body));
    let reason = match code {
        Some(c) => format!("Meta answered {status} (code {c}): {message}"),
        None => format!("Meta answered {status}: {message}"),
    };
    let retry = match code {
        _ if transient => true,
        Some(c) if RETRYABLE_CODES.contains(&c) => true,
        Some(c) if PERMANENT_CODES.contains(&c) => false,
        _ => classify_status(status) == StatusClass::Retryable,
    };
    if retry {
        Outcome::Retryable(Retryable { status: Some(status), reason, retry_after_ms: retry_after_ms(headers) })
    } else {
        permanent(Some(status), reason)
    }
}

fn http_error_outcome(e: HttpError) -> Outcome {
    let retry = |reason: String| Outcome::Retryable(Retryable { status: None, reason, retry_after_ms: None });
    match e {
        HttpError::Denied(why) => permanent(None, format!("request refused by the host: {why}")),
        HttpError::InvalidRequest(why) => permanent(None, format!("invalid request: {why}")),
        HttpError::Timeout => retry("Meta did not answer in time".into()),
        HttpError::Transport(why) => retry(format!("could not reach Meta: {why}")),
        HttpError::ResponseTooLarge(n) => retry(format!("Meta's answer exceeded {n} bytes")),
    }
}

fn permanent(status: Option<u16>, reason: String) -> Outcome {
    Outcome::Permanent(Failure { status, reason })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crm::plugin::types::{Customer, Deal};

    fn demo_event() -> CrmEvent {
        CrmEvent {
            event_type: "deal_updated".into(),
            reference: "D-927483-XYZ".into(),
            status: "Committed".into(),
            customer: Customer {
                contact_id: Some("CUST-45678".into()),
                first_name: Some(" John ".into()),
                last_name: Some("Doe".into()),
                email: Some("  John.Doe@Example.com ".into()),
                phone: Some("+1 (234) 567-890".into()),
            },
            deal: Deal {
                name: Some("The Grand Cypress Acquisition".into()),
                value: Some(12_500_000.0),
                currency: Some("USD".into()),
                closing_date: None,
            },
            property: None,
            received_at: 1_790_000_000,
        }
    }

    fn settings() -> Settings {
        Settings::from_config(|k| match k {
            "access_token" => Some("token-1".into()),
            "pixel_id" => Some("123".into()),
            "graph_url" => Some("http://127.0.0.1:9/".into()),
            "test_event_code" => Some("TEST42".into()),
            _ => None,
        })
        .unwrap()
    }

    fn context() -> DeliveryContext {
        DeliveryContext { receipt_id: "r1".into(), provider: "crm".into(), attempt: 1, idempotency_key: "key-1".into() }
    }

    fn response(status: u16, body: &str) -> Response {
        Response { status, headers: vec![], body: body.as_bytes().to_vec() }
    }

    #[test]
    fn hashes_the_demo_customer_with_known_values() {
        let u = user_data(&demo_event());
        assert_eq!(u["em"][0], "836f82db99121b3481011f16b49dfa5fbc714a0d1b1b9f784a1ebbbf5b39577f");
        assert_eq!(u["ph"][0], "c775e7b757ede630cd0aa1113bd102661ab38829ca52a6422ab782862f268646");
        assert_eq!(u["fn"][0], "96d9632f363564cc3032521409cf22a852f2032eec099ed5967c0d000cec607a");
        assert_eq!(u["ln"][0], "799ef92a11af918e3fb741df42934f3b568ed2d93ac1df74f1b8d41a27932a6f");
        assert_eq!(u["external_id"][0], "e2096e0f267ad5799884c29793a32c31d621d26cf26547dc471ae25086470989");
    }

    #[test]
    fn phone_keeps_country_code_and_drops_international_prefix() {
        assert_eq!(hash_phone("0049 30 1234"), hash_phone("+49301234"));
        assert_eq!(hash_phone("ext."), None);
    }

    #[test]
    fn request_has_the_documented_shape() {
        let r =
            build_request(&settings(), &demo_event(), &Action { name: "Purchase".into(), params: vec![] }, &context())
                .unwrap();
        assert_eq!(r.method, "POST");
        assert_eq!(r.url, "http://127.0.0.1:9/v21.0/123/events");
        let body: Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(body["access_token"], "token-1");
        assert_eq!(body["test_event_code"], "TEST42");
        let e = &body["data"][0];
        assert_eq!(e["event_name"], "Purchase");
        assert_eq!(e["event_id"], "key-1");
        assert_eq!(e["event_time"], 1_790_000_000);
        assert_eq!(e["action_source"], "system_generated");
        assert_eq!(e["custom_data"]["value"], 12_500_000.0);
        assert_eq!(e["custom_data"]["currency"], "USD");
        assert_eq!(e["custom_data"]["deal_id"], "D-927483-XYZ");
        assert!(e.get("event_source_url").is_none());
    }

    #[test]
    fn purchase_without_value_is_refused() {
        let mut ev = demo_event();
        ev.deal.value = None;
        let err = build_request(&settings(), &ev, &Action { name: "Purchase".into(), params: vec![] }, &context())
            .unwrap_err();
        assert!(err.contains("value and currency"));
    }

    #[test]
    fn events_older_than_seven_days_are_refused_plainly() {
        let day = 86_400;
        assert_eq!(outside_window(1_000 * day, 1_000 * day + 6 * day), None);
        assert_eq!(
            outside_window(1_000 * day, 1_000 * day + 8 * day).as_deref(),
            Some("the event is 8 days old; Meta accepts events up to 7 days old")
        );
    }

    #[test]
    fn missing_credentials_name_the_variables() {
        let err = Settings::from_config(|_| None).unwrap_err();
        assert_eq!(err, "Meta is not configured: set META_ACCESS_TOKEN and META_PIXEL_ID");
    }

    #[test]
    fn a_malformed_api_version_is_refused_plainly() {
        let with_version = |v: &'static str| {
            Settings::from_config(move |k| match k {
                "access_token" | "pixel_id" => Some("x".into()),
                "api_version" => Some(v.into()),
                _ => None,
            })
        };
        assert_eq!(with_version("v22.0").unwrap().api_version, "v22.0");
        for bad in ["21", "v21", "v21.0.1", "v.0", "../v21.0"] {
            assert_eq!(with_version(bad).unwrap_err(), format!("META_API_VERSION must look like v21.0, got {bad:?}"));
        }
    }

    #[test]
    fn error_codes_are_classified() {
        let body = |code: i64, transient: bool| {
            format!(
                r#"{{"error":{{"message":"m","type":"OAuthException","code":{code},"is_transient":{transient},"fbtrace_id":"x"}}}}"#
            )
        };
        for code in RETRYABLE_CODES {
            assert!(
                matches!(classify_response(&response(400, &body(code, false))), Outcome::Retryable(_)),
                "code {code}"
            );
        }
        for code in PERMANENT_CODES {
            assert!(
                matches!(classify_response(&response(400, &body(code, false))), Outcome::Permanent(_)),
                "code {code}"
            );
        }
        assert!(matches!(classify_response(&response(400, &body(999, true))), Outcome::Retryable(_)));
        assert!(matches!(classify_response(&response(500, "oops")), Outcome::Retryable(_)));
        assert!(matches!(classify_response(&response(403, "no")), Outcome::Permanent(_)));
        assert!(matches!(
            classify_response(&response(200, r#"{"events_received":1,"fbtrace_id":"abc"}"#)),
            Outcome::Delivered(d) if d.detail == "events_received=1 fbtrace_id=abc"
        ));
    }

    #[test]
    fn throttling_honours_retry_after() {
        let r = Response {
            status: 429,
            headers: vec![Header { name: "retry-after".into(), value: "3".into() }],
            body: vec![],
        };
        assert!(matches!(classify_response(&r), Outcome::Retryable(Retryable { retry_after_ms: Some(3000), .. })));
    }
}
