//! HubSpot, end to end, through a plugin written in Python: the source in
//! examples/hubspot-python (componentize-py) is built with its one documented
//! command and unit-tested, then loaded by the real host next to the Rust
//! plugins. HubSpot posts signed batches of id-only deal events; the plugin
//! checks the signature and fetches the deals and contacts from a local
//! stand-in for HubSpot's CRM API, answering as HubSpot's docs show.

#[path = "support/mod.rs"]
mod support;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use axum::{Json, Router};
use base64::Engine as _;
use hmac::{Hmac, Mac};
use serde_json::{Value, json};
use support::*;

const WAIT: Duration = Duration::from_secs(60);
const SECRET: &str = "hubspot-client-secret";
const TOKEN: &str = "pat-na1-test-token";

/// What the stand-in knows: deal and contact properties as HubSpot's CRM
/// API returns them (every one a string), and which contacts each deal has.
struct CrmData {
    deals: HashMap<String, Value>,
    associations: HashMap<String, Vec<u64>>,
    contacts: HashMap<String, Value>,
}

fn crm_data() -> CrmData {
    let deals = HashMap::from([
        (
            "1001".to_string(),
            json!({ "dealname": "The Grand Cypress Acquisition", "amount": "12500000", "deal_currency_code": "USD",
                    "closedate": "2026-03-15T00:00:00Z", "dealstage": "closedwon" }),
        ),
        (
            "1002".to_string(),
            json!({ "dealname": "Harbor View", "amount": "800000", "deal_currency_code": "USD",
                    "dealstage": "qualifiedtobuy" }),
        ),
    ]);
    let associations = HashMap::from([("1001".to_string(), vec![987]), ("1002".to_string(), vec![988])]);
    let contacts = HashMap::from([
        (
            "987".to_string(),
            json!({ "email": "john.doe@example.com", "firstname": "John", "lastname": "Doe", "phone": "+1234567890" }),
        ),
        ("988".to_string(), json!({ "email": "ann.lee@example.com", "firstname": "Ann", "lastname": "Lee" })),
    ]);
    CrmData { deals, associations, contacts }
}

#[derive(Clone, Default)]
struct HubSpot {
    calls: Arc<Mutex<Vec<String>>>,
}

/// `POST /crm/v3/objects/{deals|contacts}/batch/read` and
/// `POST /crm/v4/associations/deals/contacts/batch/read`, with a private app
/// token. Ids HubSpot does not have are left out of `results` (207).
async fn hubspot_api(
    State(s): State<HubSpot>,
    uri: axum::http::Uri,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> (StatusCode, Json<Value>) {
    s.calls.lock().unwrap().push(uri.path().to_string());
    if headers.get("authorization").and_then(|v| v.to_str().ok()) != Some(&format!("Bearer {TOKEN}")) {
        let error = json!({ "status": "error", "message": "Authentication credentials not found.",
                            "category": "INVALID_AUTHENTICATION" });
        return (StatusCode::UNAUTHORIZED, Json(error));
    }
    let CrmData { deals, associations, contacts } = crm_data();
    let ids: Vec<String> =
        body["inputs"].as_array().into_iter().flatten().filter_map(|i| i["id"].as_str().map(str::to_string)).collect();
    let results: Vec<Value> = match uri.path() {
        "/crm/v3/objects/deals/batch/read" => ids
            .iter()
            .filter_map(|id| deals.get(id).map(|p| json!({ "id": id, "properties": p, "archived": false })))
            .collect(),
        "/crm/v3/objects/contacts/batch/read" => ids
            .iter()
            .filter_map(|id| contacts.get(id).map(|p| json!({ "id": id, "properties": p, "archived": false })))
            .collect(),
        "/crm/v4/associations/deals/contacts/batch/read" => ids
            .iter()
            .filter_map(|id| {
                associations.get(id).map(|to| {
                    let to: Vec<Value> = to
                        .iter()
                        .map(|c| {
                            json!({ "toObjectId": c, "associationTypes": [
                            { "category": "HUBSPOT_DEFINED", "typeId": 3, "label": null }] })
                        })
                        .collect();
                    json!({ "from": { "id": id }, "to": to })
                })
            })
            .collect(),
        other => return (StatusCode::NOT_FOUND, Json(json!({ "status": "error", "message": format!("no {other}") }))),
    };
    let status = if results.len() == ids.len() { StatusCode::OK } else { StatusCode::MULTI_STATUS };
    (status, Json(json!({ "status": "COMPLETE", "results": results })))
}

async fn hubspot_stand_in() -> (String, HubSpot) {
    let state = HubSpot::default();
    let router = Router::new().fallback(post(hubspot_api)).with_state(state.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, router).await });
    (url, state)
}

/// POST a batch to the host as HubSpot does: signed (v3) over the URL it
/// calls, with this timestamp and secret.
async fn post_signed(url: &str, body: &str, timestamp_ms: u64, secret: &str) -> (u16, Value) {
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(format!("POST{url}{body}{timestamp_ms}").as_bytes());
    let signature = base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes());
    let r = reqwest::Client::new()
        .post(url)
        .header("content-type", "application/json")
        .header("x-hubspot-signature-v3", signature)
        .header("x-hubspot-request-timestamp", timestamp_ms.to_string())
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64
}

fn run_in_example(program: &str, args: &[&str]) -> std::process::Output {
    std::process::Command::new(program)
        .args(args)
        .current_dir(repo().join("examples/hubspot-python"))
        .output()
        .unwrap_or_else(|e| panic!("run {program}: {e}"))
}

#[tokio::test]
async fn hubspot_batches_go_through_the_python_source_to_meta_and_brevo() {
    let built = tokio::task::spawn_blocking(|| run_in_example("bash", &["build.sh"])).await.unwrap();
    let out = |o: &std::process::Output| {
        format!("{}\n{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
    };
    assert!(built.status.success(), "build.sh failed:\n{}", out(&built));
    let unit =
        tokio::task::spawn_blocking(|| run_in_example(".venv/bin/python", &["-m", "unittest", "-q"])).await.unwrap();
    assert!(unit.status.success(), "the plugin's own unit tests failed:\n{}", out(&unit));

    let dir = tempfile::tempdir().unwrap();
    let plugins = plugins_dir(dir.path(), &["crm", "meta-capi", "brevo"]);
    let hubspot = plugins.join("hubspot");
    std::fs::create_dir_all(&hubspot).unwrap();
    for file in ["plugin.toml", "hubspot.wasm"] {
        std::fs::copy(repo().join("examples/hubspot-python").join(file), hubspot.join(file)).unwrap();
    }
    let (meta, brevo) = (StandIn::meta().await, StandIn::brevo().await);
    let (api_url, api) = hubspot_stand_in().await;
    let mut vars = host_vars(&dir.path().join("data"), &plugins, &meta, &brevo);
    vars.extend([
        ("HUBSPOT_CLIENT_SECRET", SECRET.to_string()),
        ("HUBSPOT_ACCESS_TOKEN", TOKEN.to_string()),
        ("HUBSPOT_API_URL", api_url),
    ]);
    let host = Host::start(&vars).await;
    let url = format!("{}/api/v1/webhook/hubspot", host.url);

    // One signed batch, two deal events (and one this source leaves out),
    // no x-api-key: the plugin authenticates HubSpot itself.
    let occurred = now_ms() - 60_000;
    let batch = json!([
        { "objectId": 1001, "propertyName": "dealstage", "propertyValue": "closedwon", "changeSource": "CRM",
          "eventId": 1, "subscriptionId": 25, "portalId": 33, "appId": 7, "occurredAt": occurred,
          "subscriptionType": "deal.propertyChange", "attemptNumber": 0 },
        { "objectId": 1002, "changeSource": "CRM", "eventId": 2, "subscriptionId": 22, "portalId": 33, "appId": 7,
          "occurredAt": occurred, "subscriptionType": "deal.creation", "attemptNumber": 0 },
        { "objectId": 1001, "propertyName": "amount", "propertyValue": "1", "eventId": 3,
          "occurredAt": occurred, "subscriptionType": "deal.propertyChange" },
    ])
    .to_string();
    let (status, answer) = post_signed(&url, &batch, now_ms(), SECRET).await;
    assert_eq!(status, 200, "{answer}\n{}", host.log_text());
    let events = answer["events"].as_array().unwrap();
    assert_eq!(events.len(), 2, "two receipts: {answer}");
    assert_eq!((events[0]["reference"].as_str(), events[0]["status"].as_str()), (Some("1001"), Some("Committed")));
    assert_eq!((events[1]["reference"].as_str(), events[1]["status"].as_str()), (Some("1002"), Some("Qualified")));
    assert_eq!(
        api.calls.lock().unwrap().clone(),
        [
            "/crm/v3/objects/deals/batch/read",
            "/crm/v4/associations/deals/contacts/batch/read",
            "/crm/v3/objects/contacts/batch/read"
        ],
        "three API calls for the whole batch"
    );

    eventually("the Purchase, the Lead and the e-mail", WAIT, async || {
        (meta.events().len() == 2 && brevo.sent_emails() == 1).then_some(())
    })
    .await;
    let by_name = |name: &str| meta.events().into_iter().find(|e| e["event_name"] == name).unwrap();
    let purchase = by_name("Purchase");
    assert_eq!(purchase["custom_data"]["deal_id"], "1001");
    assert_eq!(purchase["custom_data"]["lead_event_source"], "hubspot");
    assert_eq!(purchase["event_time"], occurred / 1000, "HubSpot's own change time");
    assert_eq!(purchase["user_data"]["em"][0], "836f82db99121b3481011f16b49dfa5fbc714a0d1b1b9f784a1ebbbf5b39577f");
    assert_eq!(by_name("Lead")["custom_data"]["deal_id"], "1002");
    assert_eq!(brevo.received()[0].body["to"][0]["email"], "john.doe@example.com");

    // A bad signature, and a good one five minutes and more old: 401, nothing stored.
    let (status, answer) = post_signed(&url, &batch, now_ms(), "not-the-secret").await;
    assert_eq!((status, answer["code"].as_str()), (401, Some("unauthorized")), "{answer}");
    let (status, _) = post_signed(&url, &batch, now_ms() - 6 * 60 * 1000, SECRET).await;
    assert_eq!(status, 401);
    let receipts = get_json(&host.url, "/api/v1/receipts?limit=100").await;
    assert_eq!(receipts["receipts"].as_array().unwrap().len(), 2);
}
