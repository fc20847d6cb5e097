//! Destination plugin for Meta's Conversions API.
//!
//! One action per event name (`Lead`, `Purchase`, …): sends
//! `POST {graph_url}/{api_version}/{pixel_id}/events` with one server event
//! whose `user_data` is normalized and SHA-256 hashed here, inside the
//! sandbox, so raw customer data never leaves it unhashed. `event_id` is the
//! host's idempotency key, so Meta deduplicates retries.
//!
//! Events follow Meta's rules for CRM events (Conversion Leads):
//! `action_source` `system_generated`, `custom_data.event_source` `crm`,
//! `custom_data.lead_event_source` the CRM's name (`META_LEAD_EVENT_SOURCE`,
//! else the provider), `user_data.lead_id` when the CRM carries a Meta lead
//! id, and `event_time` the CRM's own change time when it says.

use crm_plugin_sdk::http::{self, Request, Response};
use crm_plugin_sdk::{
    Action, CrmEvent, Delivered, DeliveryContext, Guest, Header, Outcome, Retryable, StatusClass, classify_status,
    excerpt, http_error_outcome, log, permanent, retry_after_ms, sha256_hex,
};
use serde_json::{Map, Value, json};

struct MetaCapi;

impl Guest for MetaCapi {
    fn deliver(event: CrmEvent, action: Action, context: DeliveryContext) -> Outcome {
        let settings = match Settings::from_config(crm_plugin_sdk::config::get) {
            Ok(s) => s,
            Err(missing) => return permanent(None, missing),
        };
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        if let Some(reason) = outside_window(event_time(&event), now) {
            return permanent(None, reason);
        }
        let request = match build_request(&settings, &event, &action, &context) {
            Ok(r) => r,
            Err(reason) => return permanent(None, reason),
        };
        log::log(log::Level::Debug, &format!("sending {} for deal {}", action.name, event.reference));
        match http::send(&request) {
            Ok(response) => classify_response(&response),
            Err(e) => http_error_outcome("Meta", e),
        }
    }
}

crm_plugin_sdk::export!(MetaCapi);

/// Error codes Meta documents as transient (throttling, temporary outage).
const RETRYABLE_CODES: [i64; 8] = [1, 2, 4, 17, 32, 341, 368, 613];
/// Meta's rate-limit codes 80000–80014 (ads, pages, business use cases…).
const RETRYABLE_RANGE: std::ops::RangeInclusive<i64> = 80_000..=80_014;
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
    /// `custom_data.lead_event_source`; the provider's name when unset.
    pub lead_event_source: Option<String>,
    /// Calling code put before national phone numbers (no `+`), e.g. "1".
    pub default_country_code: Option<String>,
    /// Limited Data Use: `data_processing_options` and its location.
    pub limited_data_use: Option<(i64, i64)>,
    pub partner_agent: Option<String>,
}

impl Settings {
    /// Read settings; the error names every missing key's variable. The
    /// defaults and the checks of each value's shape are the manifest's:
    /// the host applies them before the plugin runs.
    pub fn from_config(get: impl Fn(&str) -> Option<String>) -> Result<Self, String> {
        let mut settings = crm_plugin_sdk::Settings::new(get);
        let access_token = settings.required("access_token", "META_ACCESS_TOKEN");
        let pixel_id = settings.required("pixel_id", "META_PIXEL_ID");
        let api_version = settings.required("api_version", "META_API_VERSION");
        let graph_url = settings.required("graph_url", "META_GRAPH_URL");
        let action_source = settings.required("action_source", "META_ACTION_SOURCE");
        settings.finish("Meta")?;
        let get = |key: &str| settings.optional(key);
        // Checked by the manifest's pattern (`\+?[0-9]{1,3}`).
        let default_country_code = get("default_country_code").map(|c| c.trim().trim_start_matches('+').to_string());
        let number = |key: &str, var: &str| -> Result<i64, String> {
            get(key).map_or(Ok(0), |v| v.trim().parse().map_err(|_| format!("{var} must be a number, got {v:?}")))
        };
        let limited_data_use = match get("limited_data_use").as_deref().map(str::trim) {
            None | Some("false") | Some("0") => None,
            Some("true") | Some("1") => Some((
                number("data_processing_country", "META_LDU_COUNTRY")?,
                number("data_processing_state", "META_LDU_STATE")?,
            )),
            Some(other) => return Err(format!("META_LIMITED_DATA_USE must be true or false, got {other:?}")),
        };
        Ok(Settings {
            access_token,
            pixel_id,
            api_version,
            graph_url,
            action_source,
            event_source_url: get("event_source_url"),
            test_event_code: get("test_event_code"),
            lead_event_source: get("lead_event_source"),
            default_country_code,
            limited_data_use,
            partner_agent: get("partner_agent"),
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

/// Digits of a national number without its country code, at least (the
/// shortest numbering plans aside, which a default code does not serve).
const NATIONAL_DIGITS: usize = 10;

/// Normalize a phone number as Meta asks: digits only, with the country
/// code, no leading zeros. A number written with `+` or `00` carries its
/// own code (and a `(0)` trunk marker after it is dropped); any other is
/// national and gets `default_country_code`, unless it already starts with
/// that code and is too long to be national without it.
pub fn normalize_phone(phone: &str, default_country_code: Option<&str>) -> Option<String> {
    let trimmed = phone.trim().replace("(0)", "");
    let digits: String = trimmed.chars().filter(char::is_ascii_digit).collect();
    let international = trimmed.starts_with('+') || digits.starts_with("00");
    let national = digits.trim_start_matches('0');
    let has_code = |code: &str| international || (national.starts_with(code) && national.len() > NATIONAL_DIGITS);
    let digits = match default_country_code {
        Some(code) if !has_code(code) => format!("{code}{national}"),
        _ => national.to_string(),
    };
    (!digits.is_empty()).then_some(digits)
}

/// Normalize and hash a phone number (see `normalize_phone`).
pub fn hash_phone(phone: &str, default_country_code: Option<&str>) -> Option<String> {
    normalize_phone(phone, default_country_code).map(|p| sha256_hex(&p))
}

/// Lower-case, with punctuation removed (names keep letters of any
/// alphabet and inner spaces, as Meta asks).
pub fn normalize_name(name: &str) -> Option<String> {
    let n: String = name.trim().to_lowercase().chars().filter(|c| c.is_alphanumeric() || c.is_whitespace()).collect();
    let n = n.split_whitespace().collect::<Vec<_>>().join(" ");
    (!n.is_empty()).then_some(n)
}

/// Normalize and hash a first or last name.
pub fn hash_name(name: &str) -> Option<String> {
    normalize_name(name).map(|n| sha256_hex(&n))
}

/// A city: lower-case, no spaces, no punctuation ("New York" → "newyork").
pub fn normalize_city(city: &str) -> Option<String> {
    let c: String = city.to_lowercase().chars().filter(|c| c.is_alphanumeric()).collect();
    (!c.is_empty()).then_some(c)
}

/// US states by name, for the two-letter codes Meta asks for.
const US_STATES: [(&str, &str); 51] = [
    ("alabama", "al"),
    ("alaska", "ak"),
    ("arizona", "az"),
    ("arkansas", "ar"),
    ("california", "ca"),
    ("colorado", "co"),
    ("connecticut", "ct"),
    ("delaware", "de"),
    ("districtofcolumbia", "dc"),
    ("florida", "fl"),
    ("georgia", "ga"),
    ("hawaii", "hi"),
    ("idaho", "id"),
    ("illinois", "il"),
    ("indiana", "in"),
    ("iowa", "ia"),
    ("kansas", "ks"),
    ("kentucky", "ky"),
    ("louisiana", "la"),
    ("maine", "me"),
    ("maryland", "md"),
    ("massachusetts", "ma"),
    ("michigan", "mi"),
    ("minnesota", "mn"),
    ("mississippi", "ms"),
    ("missouri", "mo"),
    ("montana", "mt"),
    ("nebraska", "ne"),
    ("nevada", "nv"),
    ("newhampshire", "nh"),
    ("newjersey", "nj"),
    ("newmexico", "nm"),
    ("newyork", "ny"),
    ("northcarolina", "nc"),
    ("northdakota", "nd"),
    ("ohio", "oh"),
    ("oklahoma", "ok"),
    ("oregon", "or"),
    ("pennsylvania", "pa"),
    ("rhodeisland", "ri"),
    ("southcarolina", "sc"),
    ("southdakota", "sd"),
    ("tennessee", "tn"),
    ("texas", "tx"),
    ("utah", "ut"),
    ("vermont", "vt"),
    ("virginia", "va"),
    ("washington", "wa"),
    ("westvirginia", "wv"),
    ("wisconsin", "wi"),
    ("wyoming", "wy"),
];

/// A state: lower-case, no spaces or punctuation; a US state written out
/// becomes its two-letter code ("California" → "ca").
pub fn normalize_state(state: &str) -> Option<String> {
    let s = normalize_city(state)?;
    Some(US_STATES.iter().find(|(name, _)| *name == s).map(|(_, code)| code.to_string()).unwrap_or(s))
}

/// A zip code: lower-case, no spaces or dashes; a US zip is its first five
/// digits ("94025-1234" → "94025").
pub fn normalize_zip(zip: &str, country: Option<&str>) -> Option<String> {
    let z: String = zip.to_lowercase().chars().filter(|c| c.is_alphanumeric()).collect();
    let us = country.is_none_or(|c| c.trim().eq_ignore_ascii_case("us"));
    let first_five = z.get(..5).filter(|p| p.bytes().all(|b| b.is_ascii_digit()));
    let z = match first_five {
        Some(five) if us && (z.len() == 5 || z.len() == 9) => five.to_string(),
        _ => z,
    };
    (!z.is_empty()).then_some(z)
}

/// A country: its ISO 3166-1 alpha-2 code, lower-case; anything else is
/// not sent (Meta would not match it).
pub fn normalize_country(country: &str) -> Option<String> {
    let c = country.trim().to_lowercase();
    (c.len() == 2 && c.bytes().all(|b| b.is_ascii_lowercase())).then_some(c)
}

/// Hash the CRM's contact id as `external_id` (trimmed; ids are case-sensitive).
pub fn hash_external_id(id: &str) -> Option<String> {
    let id = id.trim();
    (!id.is_empty()).then(|| sha256_hex(id))
}

/// Build `user_data`: every customer field normalized by Meta's rules and
/// hashed, as a one-element array; `lead_id` as Meta gave it (a number).
pub fn user_data(event: &CrmEvent, settings: &Settings) -> Map<String, Value> {
    let c = &event.customer;
    let country = c.country.as_deref();
    let hashed = |v: Option<String>| v.map(|v| sha256_hex(&v));
    let mut out = Map::new();
    let fields = [
        ("em", c.email.as_deref().and_then(hash_email)),
        ("ph", c.phone.as_deref().and_then(|p| hash_phone(p, settings.default_country_code.as_deref()))),
        ("fn", c.first_name.as_deref().and_then(hash_name)),
        ("ln", c.last_name.as_deref().and_then(hash_name)),
        ("ct", hashed(c.city.as_deref().and_then(normalize_city))),
        ("st", hashed(c.state.as_deref().and_then(normalize_state))),
        ("zp", hashed(c.zip_code.as_deref().and_then(|z| normalize_zip(z, country)))),
        ("country", hashed(country.and_then(normalize_country))),
        ("external_id", c.contact_id.as_deref().and_then(hash_external_id)),
    ];
    for (key, hash) in fields {
        if let Some(h) = hash {
            out.insert(key.into(), json!([h]));
        }
    }
    if let Some(lead) = event.lead_id.as_deref().map(str::trim).filter(|l| !l.is_empty()) {
        out.insert("lead_id".into(), lead.parse::<u64>().map_or_else(|_| json!(lead), |n| json!(n)));
    }
    out
}

/// The event's time for Meta: when the CRM says the deal reached its
/// status, else when the host received it.
pub fn event_time(event: &CrmEvent) -> u64 {
    event.occurred_at.unwrap_or(event.received_at)
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
    let user_data = user_data(event, settings);
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
    custom.insert("event_source".into(), json!("crm"));
    let lead_event_source = settings.lead_event_source.as_deref().unwrap_or(&context.provider);
    custom.insert("lead_event_source".into(), json!(lead_event_source));

    let mut server_event = json!({
        "event_name": event_name,
        "event_time": event_time(event),
        "event_id": context.idempotency_key,
        "action_source": settings.action_source,
        "user_data": user_data,
        "custom_data": custom,
    });
    if let Some(url) = &settings.event_source_url {
        server_event["event_source_url"] = json!(url);
    }
    if let Some((country, state)) = settings.limited_data_use {
        server_event["data_processing_options"] = json!(["LDU"]);
        server_event["data_processing_options_country"] = json!(country);
        server_event["data_processing_options_state"] = json!(state);
    }
    let mut body = json!({ "data": [server_event], "access_token": settings.access_token });
    if let Some(code) = &settings.test_event_code {
        body["test_event_code"] = json!(code);
    }
    if let Some(agent) = &settings.partner_agent {
        body["partner_agent"] = json!(agent);
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
        Some(c) if RETRYABLE_CODES.contains(&c) || RETRYABLE_RANGE.contains(&c) => true,
        Some(c) if PERMANENT_CODES.contains(&c) => false,
        _ => classify_status(status) == StatusClass::Retryable,
    };
    if retry {
        Outcome::Retryable(Retryable { status: Some(status), reason, retry_after_ms: retry_after_ms(headers) })
    } else {
        permanent(Some(status), reason)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crm_plugin_sdk::{Customer, Deal};

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
                city: None,
                state: None,
                zip_code: None,
                country: None,
            },
            deal: Deal {
                name: Some("The Grand Cypress Acquisition".into()),
                value: Some(12_500_000.0),
                currency: Some("USD".into()),
                closing_date: None,
            },
            property: None,
            occurred_at: None,
            lead_id: None,
            received_at: 1_790_000_000,
        }
    }

    fn settings() -> Settings {
        settings_with(&[])
    }

    fn settings_with(extra: &[(&'static str, &'static str)]) -> Settings {
        let base = [
            ("access_token", "token-1"),
            ("pixel_id", "123"),
            ("graph_url", "http://127.0.0.1:9/"),
            ("test_event_code", "TEST42"),
            ("api_version", "v21.0"),
            ("action_source", "system_generated"),
        ];
        let values: Vec<(&str, &str)> = extra.iter().chain(base.iter()).copied().collect();
        Settings::from_config(move |k| values.iter().find(|(key, _)| *key == k).map(|(_, v)| v.to_string())).unwrap()
    }

    fn context() -> DeliveryContext {
        DeliveryContext { receipt_id: "r1".into(), provider: "crm".into(), attempt: 1, idempotency_key: "key-1".into() }
    }

    fn response(status: u16, body: &str) -> Response {
        Response { status, headers: vec![], body: body.as_bytes().to_vec() }
    }

    #[test]
    fn hashes_the_demo_customer_with_known_values() {
        let u = user_data(&demo_event(), &settings());
        assert_eq!(u["em"][0], "836f82db99121b3481011f16b49dfa5fbc714a0d1b1b9f784a1ebbbf5b39577f");
        assert_eq!(u["ph"][0], "c775e7b757ede630cd0aa1113bd102661ab38829ca52a6422ab782862f268646");
        assert_eq!(u["fn"][0], "96d9632f363564cc3032521409cf22a852f2032eec099ed5967c0d000cec607a");
        assert_eq!(u["ln"][0], "799ef92a11af918e3fb741df42934f3b568ed2d93ac1df74f1b8d41a27932a6f");
        assert_eq!(u["external_id"][0], "e2096e0f267ad5799884c29793a32c31d621d26cf26547dc471ae25086470989");
    }

    #[test]
    fn phone_keeps_country_code_and_drops_international_prefix() {
        // Meta's examples: "+1 (616) 954-78 88" and "1(650)555-1212".
        assert_eq!(normalize_phone("+1 (616) 954-78 88", None).as_deref(), Some("16169547888"));
        assert_eq!(normalize_phone("1(650)555-1212", None).as_deref(), Some("16505551212"));
        assert_eq!(hash_phone("0049 30 1234", None), hash_phone("+49301234", None));
        assert_eq!(hash_phone("ext.", None), None);
    }

    #[test]
    fn national_numbers_get_the_default_country_code() {
        assert_eq!(normalize_phone("(650) 555-1212", Some("1")).as_deref(), Some("16505551212"));
        // Written with its code already, but no "+": not doubled.
        assert_eq!(normalize_phone("1 (650) 555-1212", Some("1")).as_deref(), Some("16505551212"));
        assert_eq!(normalize_phone("+44 (0)20 7946 0958", None).as_deref(), Some("442079460958"));
        assert_eq!(normalize_phone("020 7946 0958", Some("44")).as_deref(), Some("442079460958"));
        // A number that says its own country keeps it.
        assert_eq!(normalize_phone("+33 1 23 45 67 89", Some("44")).as_deref(), Some("33123456789"));
        assert_eq!(normalize_phone("0033 1 23 45 67 89", Some("44")).as_deref(), Some("33123456789"));
        let s = settings_with(&[("default_country_code", "+1")]);
        assert_eq!(s.default_country_code.as_deref(), Some("1"));
    }

    #[test]
    fn names_and_addresses_follow_metas_rules() {
        // Names: lower-case, no punctuation, any alphabet kept.
        assert_eq!(normalize_name(" Mary-Jane ").as_deref(), Some("maryjane"));
        assert_eq!(normalize_name("Valéry").as_deref(), Some("valéry"));
        assert_eq!(normalize_name("O'Brien, Jr.").as_deref(), Some("obrien jr"));
        assert_eq!(normalize_name(".,"), None);
        // City: lower-case, no spaces or punctuation.
        assert_eq!(normalize_city("Menlo Park").as_deref(), Some("menlopark"));
        assert_eq!(normalize_city("St. Louis").as_deref(), Some("stlouis"));
        // State: two-letter code for the US, else lower-case without spaces.
        assert_eq!(normalize_state("AZ").as_deref(), Some("az"));
        assert_eq!(normalize_state("California").as_deref(), Some("ca"));
        assert_eq!(normalize_state("New York").as_deref(), Some("ny"));
        assert_eq!(normalize_state("Île-de-France").as_deref(), Some("îledefrance"));
        // Zip: no spaces or dashes; a US zip's first five digits.
        assert_eq!(normalize_zip("94025-1234", Some("US")).as_deref(), Some("94025"));
        assert_eq!(normalize_zip("94025", None).as_deref(), Some("94025"));
        assert_eq!(normalize_zip("W1J 7NT", Some("GB")).as_deref(), Some("w1j7nt"));
        // Non-ASCII alphanumerics never split a character.
        assert_eq!(normalize_zip("1234١", None).as_deref(), Some("1234١"));
        assert_eq!(normalize_zip("ééééé", Some("FR")).as_deref(), Some("ééééé"));
        // Country: ISO 3166-1 alpha-2, lower-case; other spellings dropped.
        assert_eq!(normalize_country("US").as_deref(), Some("us"));
        assert_eq!(normalize_country("United States"), None);
    }

    #[test]
    fn the_customers_address_and_lead_id_are_sent() {
        let mut ev = demo_event();
        ev.customer.city = Some("Menlo Park".into());
        ev.customer.state = Some("California".into());
        ev.customer.zip_code = Some("94025-1234".into());
        ev.customer.country = Some("US".into());
        ev.lead_id = Some("1234567890123456".into());
        let u = user_data(&ev, &settings());
        assert_eq!(u["ct"][0], sha256_hex("menlopark"));
        assert_eq!(u["st"][0], sha256_hex("ca"));
        assert_eq!(u["zp"][0], sha256_hex("94025"));
        assert_eq!(u["country"][0], sha256_hex("us"));
        assert_eq!(u["lead_id"], 1_234_567_890_123_456u64, "lead_id goes as Meta gave it, unhashed");
    }

    #[test]
    fn crm_events_carry_metas_crm_fields() {
        let mut ev = demo_event();
        ev.occurred_at = Some(1_789_990_000);
        let action = Action { name: "Lead".into(), params: vec![] };
        let r = build_request(&settings(), &ev, &action, &context()).unwrap();
        let body: Value = serde_json::from_slice(&r.body).unwrap();
        let e = &body["data"][0];
        assert_eq!(e["action_source"], "system_generated");
        assert_eq!(e["custom_data"]["event_source"], "crm");
        assert_eq!(e["custom_data"]["lead_event_source"], "crm", "the provider's name by default");
        assert_eq!(e["event_time"], 1_789_990_000, "the CRM's own change time");
        assert!(e.get("data_processing_options").is_none() && body.get("partner_agent").is_none());

        let s = settings_with(&[
            ("lead_event_source", "HubSpot"),
            ("limited_data_use", "true"),
            ("data_processing_country", "1"),
            ("data_processing_state", "1000"),
            ("partner_agent", "crm-event-handler"),
        ]);
        let body: Value = serde_json::from_slice(&build_request(&s, &ev, &action, &context()).unwrap().body).unwrap();
        let e = &body["data"][0];
        assert_eq!(e["custom_data"]["lead_event_source"], "HubSpot");
        assert_eq!(e["data_processing_options"], serde_json::json!(["LDU"]));
        assert_eq!(
            (e["data_processing_options_country"].as_i64(), e["data_processing_options_state"].as_i64()),
            (Some(1), Some(1000))
        );
        assert_eq!(body["partner_agent"], "crm-event-handler");
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
        // The host gives the keys with a manifest default their default.
        let err = Settings::from_config(|k| match k {
            "api_version" => Some("v21.0".into()),
            "graph_url" => Some("https://graph.facebook.com".into()),
            "action_source" => Some("system_generated".into()),
            _ => None,
        })
        .unwrap_err();
        assert_eq!(err, "Meta is not configured: set META_ACCESS_TOKEN and META_PIXEL_ID");
    }

    #[test]
    fn error_codes_are_classified() {
        let body = |code: i64, transient: bool| {
            format!(
                r#"{{"error":{{"message":"m","type":"OAuthException","code":{code},"is_transient":{transient},"fbtrace_id":"x"}}}}"#
            )
        };
        for code in RETRYABLE_CODES.into_iter().chain(RETRYABLE_RANGE) {
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
