//! Destination plugin for Brevo transactional e-mail.
//!
//! Action `property-details-email`: sends the customer the details of the
//! property on a committed deal through `POST {api_url}/v3/smtp/email`.
//! Action `operator-alert`: the host's alerts (queue backlog, dead letters)
//! as a plain-text e-mail to the operators named in its `to` param.
//! Every customer-supplied value is HTML-escaped before it enters
//! `htmlContent`. `headers.idempotencyKey` is a UUID derived from the
//! host's idempotency key (Brevo requires the UUID form), the same on every
//! retry, so a retry after a lost answer is not sent twice; Brevo's
//! `duplicate_parameter` answer to a reused key means "already sent".
//!
//! With `BREVO_TEMPLATE_ID` set, the e-mail is a Brevo template that
//! marketers edit in Brevo: the request names the template and passes the
//! deal's values as `params` (Brevo's template language escapes them).

use crm_plugin_sdk::http::{self, Request, Response};
use crm_plugin_sdk::{
    Action, CrmEvent, Delivered, DeliveryContext, Guest, Header, Outcome, Retryable, StatusClass, classify_status,
    excerpt, header_seconds, http_error_outcome, log, permanent, retry_after_ms, sha256_hex,
};
use serde_json::{Value, json};

struct Brevo;

impl Guest for Brevo {
    fn deliver(event: CrmEvent, action: Action, context: DeliveryContext) -> Outcome {
        let settings = match Settings::from_config(crm_plugin_sdk::config::get) {
            Ok(s) => s,
            Err(missing) => return permanent(None, missing),
        };
        let request = match action.name.as_str() {
            PROPERTY_DETAILS => {
                log::log(log::Level::Debug, &format!("sending property details for deal {}", event.reference));
                build_request(&settings, &event, &context)
            }
            OPERATOR_ALERT => alert_request(&settings, &action.params, &context),
            other => Err(format!("unknown Brevo action {other:?} (known: {PROPERTY_DETAILS}, {OPERATOR_ALERT})")),
        };
        let request = match request {
            Ok(r) => r,
            Err(reason) => return permanent(None, reason),
        };
        match http::send(&request) {
            Ok(response) => classify_response(&response),
            Err(e) => http_error_outcome("Brevo", e),
        }
    }
}

crm_plugin_sdk::export!(Brevo);

/// The deal action: the property's details to the customer.
pub const PROPERTY_DETAILS: &str = "property-details-email";
/// The host's own alerts (queue backlog, dead letters) to its operators:
/// params `to` (comma-separated addresses), `subject` and `text`.
pub const OPERATOR_ALERT: &str = "operator-alert";

/// The plugin's configuration, read through the host's `config` import.
#[derive(Debug, Clone)]
pub struct Settings {
    pub api_key: String,
    pub api_url: String,
    pub sender_email: String,
    pub sender_name: String,
    /// Send this Brevo template instead of the inline HTML.
    pub template_id: Option<u64>,
}

impl Settings {
    /// Read settings; the error names every missing key's variable. The
    /// defaults and the checks of each value's shape are the manifest's:
    /// the host applies them before the plugin runs.
    pub fn from_config(get: impl Fn(&str) -> Option<String>) -> Result<Self, String> {
        let mut settings = crm_plugin_sdk::Settings::new(get);
        let api_key = settings.required("api_key", "BREVO_API_KEY");
        let sender_email = settings.required("sender_email", "BREVO_SENDER_EMAIL");
        let api_url = settings.required("api_url", "BREVO_API_URL");
        let sender_name = settings.required("sender_name", "BREVO_SENDER_NAME");
        settings.finish("Brevo")?;
        // Checked by the manifest's pattern (`[1-9][0-9]*`).
        let template_id = match settings.optional("template_id") {
            None => None,
            Some(id) => Some(
                id.trim()
                    .parse::<u64>()
                    .ok()
                    .filter(|n| *n > 0)
                    .ok_or_else(|| format!("BREVO_TEMPLATE_ID must be a template's number, got {id:?}"))?,
            ),
        };
        Ok(Settings { api_key, template_id, sender_email, api_url, sender_name })
    }
}

/// Escape text for an HTML element or a quoted attribute.
pub fn escape_html(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// A single-line version of customer text for the subject (no header
/// injection through CR/LF or other control characters).
fn single_line(text: &str) -> String {
    text.chars().map(|c| if c.is_control() { ' ' } else { c }).collect::<String>().trim().to_string()
}

/// Format an amount with thousands separators and two decimals.
pub fn format_amount(value: f64) -> String {
    let cents = (value * 100.0).round() as u128;
    let (whole, frac) = (cents / 100, cents % 100);
    let digits = whole.to_string();
    let mut grouped = String::new();
    for (i, ch) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            grouped.push(',');
        }
        grouped.push(ch);
    }
    format!("{grouped}.{frac:02}")
}

/// The e-mail's subject, HTML and text bodies.
pub struct Email {
    pub subject: String,
    pub html: String,
    pub text: String,
}

/// Render the property-details e-mail. Values are escaped exactly once, here.
pub fn render_email(event: &CrmEvent) -> Email {
    let c = &event.customer;
    let name = [c.first_name.as_deref(), c.last_name.as_deref()]
        .into_iter()
        .flatten()
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect::<Vec<_>>()
        .join(" ");
    let deal_name = event.deal.name.clone().unwrap_or_else(|| event.reference.clone());
    let mut rows: Vec<(&str, String)> = Vec::new();
    if let Some(p) = &event.property {
        let fields = [
            ("Property", p.id.clone()),
            ("Address", p.address.clone()),
            ("City", p.city.clone()),
            ("State", p.state.clone()),
            ("ZIP code", p.zip_code.clone()),
            ("Property type", p.property_type.clone()),
            ("Square footage", p.square_footage.map(|f| format!("{f}"))),
        ];
        rows.extend(fields.into_iter().filter_map(|(k, v)| v.map(|v| (k, v))));
    }
    if let Some(v) = event.deal.value {
        let currency = event.deal.currency.clone().unwrap_or_default();
        rows.push(("Deal value", format!("{} {currency}", format_amount(v)).trim().to_string()));
    }
    if let Some(d) = &event.deal.closing_date {
        rows.push(("Closing date", d.clone()));
    }
    let greeting = if name.is_empty() { "Hello".to_string() } else { format!("Dear {name}") };

    let mut html = format!(
        "<!doctype html><html><body><p>{},</p><p>Thank you for committing to <strong>{}</strong>. \
         Here are the details of the property.</p><table>",
        escape_html(&greeting),
        escape_html(&deal_name)
    );
    let mut text =
        format!("{greeting},\n\nThank you for committing to {deal_name}. Here are the details of the property.\n\n");
    for (label, value) in &rows {
        html.push_str(&format!("<tr><th align=\"left\">{label}</th><td>{}</td></tr>", escape_html(value)));
        text.push_str(&format!("{label}: {value}\n"));
    }
    html.push_str("</table></body></html>");
    Email { subject: single_line(&format!("Property details: {deal_name}")), html, text }
}

/// The idempotency key as Brevo wants it: a UUID, derived from the host's
/// key so every retry of the action carries the same one.
pub fn idempotency_uuid(key: &str) -> String {
    let h = sha256_hex(key);
    let variant = ["8", "9", "a", "b"][usize::from(h.as_bytes()[16] % 4)];
    // Version-4 layout (the bits are a hash, as random as a v4's).
    format!("{}-{}-4{}-{variant}{}-{}", &h[0..8], &h[8..12], &h[13..16], &h[17..20], &h[20..32])
}

/// The deal's values for a Brevo template, as `params`.
pub fn template_params(event: &CrmEvent) -> Value {
    let c = &event.customer;
    let mut params = json!({
        "deal_reference": event.reference,
        "deal_status": event.status,
        "first_name": c.first_name,
        "last_name": c.last_name,
        "email": c.email,
        "deal_name": event.deal.name,
        "deal_value": event.deal.value.map(format_amount),
        "currency": event.deal.currency,
        "closing_date": event.deal.closing_date,
    });
    if let Some(p) = &event.property {
        params["property"] = json!({
            "id": p.id,
            "address": p.address,
            "city": p.city,
            "state": p.state,
            "zip_code": p.zip_code,
            "property_type": p.property_type,
            "square_footage": p.square_footage,
        });
    }
    params
}

/// Build the Brevo request for one event.
pub fn build_request(settings: &Settings, event: &CrmEvent, context: &DeliveryContext) -> Result<Request, String> {
    let to_email = event
        .customer
        .email
        .as_deref()
        .map(str::trim)
        .filter(|e| e.contains('@'))
        .ok_or("the event has no customer e-mail address to send to")?;
    let c = &event.customer;
    let to_name = single_line(
        &[c.first_name.as_deref(), c.last_name.as_deref()].into_iter().flatten().collect::<Vec<_>>().join(" "),
    );
    let mut to = json!({ "email": to_email });
    if !to_name.is_empty() {
        to["name"] = json!(to_name);
    }
    let mut body = json!({
        "sender": { "name": settings.sender_name, "email": settings.sender_email },
        "to": [to],
        "tags": ["property-details"],
        "headers": { "idempotencyKey": idempotency_uuid(&context.idempotency_key) },
    });
    match settings.template_id {
        Some(id) => {
            body["templateId"] = json!(id);
            body["params"] = template_params(event);
        }
        None => {
            let email = render_email(event);
            body["subject"] = json!(email.subject);
            body["htmlContent"] = json!(email.html);
            body["textContent"] = json!(email.text);
        }
    }
    send_email(settings, &body)
}

/// An operator alert: plain text, to the operators' addresses.
pub fn alert_request(
    settings: &Settings,
    params: &[(String, String)],
    context: &DeliveryContext,
) -> Result<Request, String> {
    let param = |name: &str| params.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str()).unwrap_or("");
    let to: Vec<Value> =
        param("to")
            .split(',')
            .map(str::trim)
            .filter(|a| !a.is_empty())
            .map(|a| {
                if a.contains('@') { Ok(json!({ "email": a })) } else { Err(format!("{a:?} is not an e-mail address")) }
            })
            .collect::<Result<_, _>>()?;
    if to.is_empty() {
        return Err("an operator alert needs `to`: one or more e-mail addresses, comma-separated".into());
    }
    let text = param("text");
    let body = json!({
        "sender": { "name": settings.sender_name, "email": settings.sender_email },
        "to": to,
        "tags": ["operator-alert"],
        "subject": single_line(param("subject")),
        "textContent": text,
        "htmlContent": format!("<!doctype html><html><body><pre>{}</pre></body></html>", escape_html(text)),
        "headers": { "idempotencyKey": idempotency_uuid(&context.idempotency_key) },
    });
    send_email(settings, &body)
}

/// `POST /v3/smtp/email` with this body.
fn send_email(settings: &Settings, body: &Value) -> Result<Request, String> {
    Ok(Request {
        method: "POST".into(),
        url: format!("{}/v3/smtp/email", settings.api_url.trim_end_matches('/')),
        headers: vec![
            Header { name: "content-type".into(), value: "application/json".into() },
            Header { name: "accept".into(), value: "application/json".into() },
            Header { name: "api-key".into(), value: settings.api_key.clone() },
        ],
        body: serde_json::to_vec(body).map_err(|e| e.to_string())?,
    })
}

/// Turn Brevo's answer into an outcome.
pub fn classify_response(response: &Response) -> Outcome {
    let status = response.status;
    let body: Value = serde_json::from_slice(&response.body).unwrap_or(Value::Null);
    let code = body.get("code").and_then(Value::as_str).unwrap_or("");
    let message =
        body.get("message").and_then(Value::as_str).map(str::to_string).unwrap_or_else(|| excerpt(&response.body));
    if classify_status(status) == StatusClass::Success {
        let id = body.get("messageId").and_then(Value::as_str).unwrap_or("-");
        return Outcome::Delivered(Delivered { status: Some(status), detail: format!("messageId={id}") });
    }
    if code == "duplicate_parameter" {
        return Outcome::Delivered(Delivered {
            status: Some(status),
            detail: format!("already sent (Brevo: {message})"),
        });
    }
    let reason = if code.is_empty() {
        format!("Brevo answered {status}: {message}")
    } else {
        format!("Brevo answered {status} ({code}): {message}")
    };
    match classify_status(status) {
        StatusClass::Retryable => {
            let headers = || response.headers.iter().map(|h| (h.name.as_str(), h.value.as_str()));
            let wait = retry_after_ms(headers()).or_else(|| header_seconds(headers(), "x-sib-ratelimit-reset"));
            Outcome::Retryable(Retryable { status: Some(status), reason, retry_after_ms: wait })
        }
        _ => permanent(Some(status), reason),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crm_plugin_sdk::{Customer, Deal, Property};

    fn event() -> CrmEvent {
        CrmEvent {
            event_type: "deal_updated".into(),
            reference: "D-927483-XYZ".into(),
            status: "Committed".into(),
            customer: Customer {
                contact_id: Some("CUST-45678".into()),
                first_name: Some("John".into()),
                last_name: Some("<b>Doe</b>".into()),
                email: Some("john.doe@example.com".into()),
                phone: None,
                city: None,
                state: None,
                zip_code: None,
                country: None,
            },
            deal: Deal {
                name: Some("Grand \"Cypress\" & Co\r\nBcc: x@evil".into()),
                value: Some(12_500_000.0),
                currency: Some("USD".into()),
                closing_date: Some("2026-03-15".into()),
            },
            property: Some(Property {
                id: Some("PROP-101122".into()),
                address: Some("<script>alert('x')</script>".into()),
                city: Some("Coastal City".into()),
                state: Some("CA".into()),
                zip_code: Some("90210".into()),
                property_type: Some("Commercial Office".into()),
                square_footage: Some(15000.0),
            }),
            occurred_at: None,
            lead_id: None,
            received_at: 0,
        }
    }

    fn settings_with(template_id: Option<&'static str>) -> Result<Settings, String> {
        Settings::from_config(move |k| match k {
            "api_key" => Some("xkeysib-1".into()),
            "sender_email" => Some("deals@example.com".into()),
            "template_id" => template_id.map(str::to_string),
            "api_url" => Some("https://api.brevo.com".into()),
            "sender_name" => Some("Property Team".into()),
            _ => None,
        })
    }

    fn settings() -> Settings {
        settings_with(None).unwrap()
    }

    fn ctx() -> DeliveryContext {
        DeliveryContext { receipt_id: "r".into(), provider: "crm".into(), attempt: 2, idempotency_key: "idem-1".into() }
    }

    #[test]
    fn an_operator_alert_goes_to_each_recipient_as_plain_text() {
        let params = |to: &str| {
            vec![
                ("to".to_string(), to.to_string()),
                ("subject".to_string(), "Queue backlog\r\nBcc: x@evil.test".to_string()),
                ("text".to_string(), "61 jobs waiting <b>".to_string()),
            ]
        };
        let r = alert_request(&settings(), &params("ops@example.com, oncall@example.com"), &ctx()).unwrap();
        let b: Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(b["to"], json!([{ "email": "ops@example.com" }, { "email": "oncall@example.com" }]));
        assert_eq!(b["subject"], "Queue backlog  Bcc: x@evil.test", "one line");
        assert_eq!(b["textContent"], "61 jobs waiting <b>");
        assert!(b["htmlContent"].as_str().unwrap().contains("61 jobs waiting &lt;b&gt;"));
        assert_eq!(b["headers"]["idempotencyKey"], idempotency_uuid("idem-1"));
        let err = alert_request(&settings(), &params(" , "), &ctx()).unwrap_err();
        assert!(err.contains("needs `to`"), "{err}");
        let err = alert_request(&settings(), &params("ops"), &ctx()).unwrap_err();
        assert!(err.contains("\"ops\" is not an e-mail address"), "{err}");
    }

    #[test]
    fn escapes_all_five_characters() {
        assert_eq!(escape_html(r#"<a href="x">'&'</a>"#), "&lt;a href=&quot;x&quot;&gt;&#39;&amp;&#39;&lt;/a&gt;");
    }

    #[test]
    fn customer_text_is_escaped_in_html_but_plain_in_text() {
        let e = render_email(&event());
        assert!(!e.html.contains("<script>"));
        assert!(e.html.contains("&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;"));
        assert!(e.html.contains("Dear John &lt;b&gt;Doe&lt;/b&gt;"));
        assert!(e.html.contains("Grand &quot;Cypress&quot; &amp; Co"));
        assert!(e.text.contains("<script>alert('x')</script>"));
        assert!(e.html.contains("12,500,000.00 USD"));
    }

    #[test]
    fn subject_cannot_carry_extra_header_lines() {
        let e = render_email(&event());
        assert!(!e.subject.contains('\n') && !e.subject.contains('\r'));
        assert!(e.subject.starts_with("Property details: Grand"));
    }

    #[test]
    fn request_carries_key_sender_and_idempotency_key() {
        let r = build_request(&settings(), &event(), &ctx()).unwrap();
        assert_eq!(r.url, "https://api.brevo.com/v3/smtp/email");
        assert!(r.headers.iter().any(|h| h.name == "api-key" && h.value == "xkeysib-1"));
        let b: Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(b["headers"]["idempotencyKey"], idempotency_uuid("idem-1"));
        assert_eq!(b["to"][0]["email"], "john.doe@example.com");
        assert_eq!(b["sender"]["email"], "deals@example.com");
        assert_eq!(b["sender"]["name"], "Property Team");
    }

    #[test]
    fn the_idempotency_key_is_a_stable_uuid() {
        let k = idempotency_uuid("3f2a9c0b4d5e6f708192a3b4c5d6e7f8");
        assert_eq!(k, idempotency_uuid("3f2a9c0b4d5e6f708192a3b4c5d6e7f8"), "the same on every retry");
        assert_ne!(k, idempotency_uuid("3f2a9c0b4d5e6f708192a3b4c5d6e7f9"));
        let parts: Vec<&str> = k.split('-').collect();
        assert_eq!(parts.iter().map(|p| p.len()).collect::<Vec<_>>(), [8, 4, 4, 4, 12], "{k}");
        assert!(k.bytes().all(|b| b == b'-' || b.is_ascii_hexdigit() && !b.is_ascii_uppercase()), "{k}");
        assert!(parts[2].starts_with('4') && "89ab".contains(&parts[3][..1]), "{k}");
    }

    #[test]
    fn template_mode_names_the_template_and_passes_the_values() {
        let s = settings_with(Some("42")).unwrap();
        let b: Value = serde_json::from_slice(&build_request(&s, &event(), &ctx()).unwrap().body).unwrap();
        assert_eq!(b["templateId"], 42);
        assert_eq!(b["params"]["deal_reference"], "D-927483-XYZ");
        assert_eq!(b["params"]["deal_value"], "12,500,000.00");
        assert_eq!(b["params"]["property"]["address"], "<script>alert('x')</script>", "Brevo escapes params itself");
        assert!(b.get("htmlContent").is_none() && b.get("subject").is_none());
        assert_eq!(b["headers"]["idempotencyKey"], idempotency_uuid("idem-1"));
        let err = settings_with(Some("welcome")).err().unwrap();
        assert_eq!(err, "BREVO_TEMPLATE_ID must be a template's number, got \"welcome\"");
    }

    #[test]
    fn no_email_address_is_a_permanent_problem() {
        let mut e = event();
        e.customer.email = Some("not-an-address".into());
        assert!(build_request(&settings(), &e, &ctx()).is_err());
    }

    #[test]
    fn amounts_are_grouped() {
        assert_eq!(format_amount(12_500_000.0), "12,500,000.00");
        assert_eq!(format_amount(999.5), "999.50");
        assert_eq!(format_amount(0.0), "0.00");
    }

    #[test]
    fn answers_are_classified() {
        let resp = |status: u16, body: &str, headers: Vec<Header>| Response {
            status,
            headers,
            body: body.as_bytes().to_vec(),
        };
        assert!(
            matches!(classify_response(&resp(201, r#"{"messageId":"<m1@x>"}"#, vec![])), Outcome::Delivered(d) if d.detail == "messageId=<m1@x>")
        );
        assert!(matches!(
            classify_response(&resp(400, r#"{"code":"duplicate_parameter","message":"dup"}"#, vec![])),
            Outcome::Delivered(d) if d.detail.starts_with("already sent")
        ));
        assert!(matches!(
            classify_response(&resp(401, r#"{"code":"unauthorized","message":"Key not found"}"#, vec![])),
            Outcome::Permanent(_)
        ));
        let limited = resp(
            429,
            r#"{"code":"too_many_requests","message":"slow"}"#,
            vec![Header { name: "x-sib-ratelimit-reset".into(), value: "2".into() }],
        );
        assert!(matches!(
            classify_response(&limited),
            Outcome::Retryable(Retryable { retry_after_ms: Some(2000), .. })
        ));
        assert!(matches!(classify_response(&resp(502, "bad gateway", vec![])), Outcome::Retryable(_)));
    }

    #[test]
    fn missing_settings_name_the_variables() {
        assert_eq!(
            // The host gives the keys with a manifest default their default.
            Settings::from_config(|k| match k {
                "api_url" => Some("https://api.brevo.com".into()),
                "sender_name" => Some("Property Team".into()),
                _ => None,
            })
            .unwrap_err(),
            "Brevo is not configured: set BREVO_API_KEY and BREVO_SENDER_EMAIL"
        );
    }
}
