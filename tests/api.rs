//! The HTTP API driven in-process with `oneshot`: every answer a CRM can get.

#[path = "support/mod.rs"]
mod support;

use std::collections::HashMap;
use std::sync::Arc;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use crm_event_handler::config::Config;
use crm_event_handler::{App, api};
use serde_json::Value;
use support::{API_KEY, payload, plugins_dir};
use tower::ServiceExt;

struct TestApp {
    app: Arc<App>,
    _dir: tempfile::TempDir,
}

/// An App on a fresh DATA_DIR; `tweak` may edit the copied plugins first.
async fn app_with(extra: &[(&str, &str)], tweak: impl FnOnce(&std::path::Path)) -> TestApp {
    let dir = tempfile::tempdir().unwrap();
    let plugins = plugins_dir(dir.path(), &["crm", "meta-capi", "brevo"]);
    tweak(&plugins);
    let mut vars: HashMap<String, String> = [
        ("API_KEY", API_KEY.to_string()),
        ("DATA_DIR", dir.path().join("data").display().to_string()),
        ("PLUGINS_DIR", plugins.display().to_string()),
        ("MAX_BODY_BYTES", "65536".to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    for (k, v) in extra {
        vars.insert(k.to_string(), v.to_string());
    }
    let app = App::build(Config::from_vars(vars).unwrap()).await.unwrap();
    TestApp { app, _dir: dir }
}

async fn app() -> TestApp {
    app_with(&[], |_| {}).await
}

async fn send(app: &TestApp, path: &str, key: Option<&str>, body: impl Into<Body>) -> (StatusCode, Value) {
    let mut req = Request::post(path).header("content-type", "application/json").header("x-event", "deal_updated");
    if let Some(k) = key {
        req = req.header("x-api-key", k);
    }
    let response = api::router(app.app.clone()).oneshot(req.body(body.into()).unwrap()).await.unwrap();
    let status = response.status();
    let bytes = axum::body::to_bytes(response.into_body(), usize::MAX).await.unwrap();
    (status, serde_json::from_slice(&bytes).unwrap_or(Value::Null))
}

async fn receipts(app: &TestApp) -> usize {
    app.app.store.list(crm_event_handler::store::ListQuery { limit: 100, state: None }).await.unwrap().len()
}

#[tokio::test]
async fn accepted_webhook_answers_200_with_the_receipt() {
    let app = app().await;
    let (status, body) = send(&app, "/api/v1/webhook/crm", Some(API_KEY), payload("D-1", "Committed")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["duplicate"], false);
    assert_eq!(body["reference"], "D-1");
    assert_eq!(body["actions"].as_array().unwrap().len(), 2);
    let id = body["receipt_id"].as_str().unwrap();
    let stored = app.app.store.get(id).await.unwrap().unwrap();
    assert!(stored.jobs_enqueued);
    // The key is not stored in clear.
    assert!(stored.request.headers.iter().any(|(n, v)| n == "x-api-key" && v == "«redacted»"));
    assert_eq!(app.app.queue.depth().await.unwrap().ready, 2);

    let (status, again) = send(&app, "/api/v1/webhook/crm", Some(API_KEY), payload("D-1", "Committed")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(again["duplicate"], true);
    assert_eq!(again["receipt_id"], body["receipt_id"]);
    assert_eq!(app.app.queue.depth().await.unwrap().ready, 2, "a duplicate queues nothing");
}

#[tokio::test]
async fn a_status_without_actions_is_stored_and_queues_nothing() {
    let app = app().await;
    let (status, body) = send(&app, "/api/v1/webhook/crm", Some(API_KEY), payload("D-9", "Negotiation")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["actions"], serde_json::json!([]));
    assert_eq!(receipts(&app).await, 1);
    assert_eq!(app.app.queue.depth().await.unwrap().ready, 0);
}

#[tokio::test]
async fn bad_or_missing_key_answers_202_and_processes_nothing() {
    let app = app().await;
    for key in [None, Some("wrong")] {
        let (status, body) = send(&app, "/api/v1/webhook/crm", key, payload("D-1", "Qualified")).await;
        assert_eq!(status, StatusCode::ACCEPTED);
        assert_eq!(body["code"], "unauthorized");
    }
    assert_eq!(receipts(&app).await, 0);
}

#[tokio::test]
async fn the_auth_failure_status_is_configurable() {
    let app = app_with(&[("AUTH_FAILURE_STATUS", "401")], |_| {}).await;
    let (status, _) = send(&app, "/api/v1/webhook/crm", Some("wrong"), payload("D-1", "Qualified")).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn malformed_json_and_missing_fields_answer_400_naming_the_field() {
    let app = app().await;
    let (status, body) = send(&app, "/api/v1/webhook/crm", Some(API_KEY), "{not json").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(body["code"], "malformed_body");

    let (status, body) =
        send(&app, "/api/v1/webhook/crm", Some(API_KEY), payload("D-1", "Qualified").replace("\"dealId\"", "\"id\""))
            .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(body["code"], "missing_field");
    assert_eq!(body["field"], "data.dealId");

    let (status, body) =
        send(&app, "/api/v1/webhook/crm", Some(API_KEY), payload("D-1", "Qualified").replace("12500000.00", "true"))
            .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(body["code"], "invalid_field");
    assert_eq!(body["field"], "data.dealDetails.dealValue");
    assert_eq!(receipts(&app).await, 0);
}

#[tokio::test]
async fn unknown_provider_answers_404() {
    let app = app().await;
    let (status, body) = send(&app, "/api/v1/webhook/salesforce", Some(API_KEY), payload("D-1", "Qualified")).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(body["code"], "unknown_provider");
    assert!(body["detail"].as_str().unwrap().contains("known: crm"));
}

#[tokio::test]
async fn oversized_body_answers_413() {
    let app = app().await;
    let big = format!("{{\"pad\":\"{}\"}}", "x".repeat(70_000));
    let (status, body) = send(&app, "/api/v1/webhook/crm", Some(API_KEY), big).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(body["code"], "payload_too_large");
}

#[tokio::test]
async fn a_failing_source_plugin_answers_503_so_the_crm_retries() {
    // 1 MiB is less than the component's own initial memory: every call fails.
    let app = app_with(&[], |plugins| {
        let manifest = plugins.join("crm/plugin.toml");
        let text = std::fs::read_to_string(&manifest).unwrap().replace("memory_mb = 16", "memory_mb = 1");
        std::fs::write(manifest, text).unwrap();
    })
    .await;
    let (status, body) = send(&app, "/api/v1/webhook/crm", Some(API_KEY), payload("D-1", "Qualified")).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(body["code"], "source_plugin_failed");
    assert_eq!(receipts(&app).await, 0);
}

#[tokio::test]
async fn health_ready_and_metrics() {
    let app = app().await;
    let get = |path: &'static str| {
        let router = api::router(app.app.clone());
        async move {
            let r = router.oneshot(Request::get(path).body(Body::empty()).unwrap()).await.unwrap();
            let status = r.status();
            let text =
                String::from_utf8(axum::body::to_bytes(r.into_body(), usize::MAX).await.unwrap().to_vec()).unwrap();
            (status, text)
        }
    };
    assert_eq!(get("/health").await.0, StatusCode::OK);
    let (status, ready) = get("/ready").await;
    assert_eq!(status, StatusCode::OK, "{ready}");
    send(&app, "/api/v1/webhook/crm", Some(API_KEY), payload("D-1", "Qualified")).await;
    send(&app, "/api/v1/webhook/crm", Some("nope"), payload("D-1", "Qualified")).await;
    let (_, metrics) = get("/metrics").await;
    assert!(metrics.contains(r#"crm_webhooks_received_total{provider="crm",outcome="accepted"} 1"#), "{metrics}");
    assert!(metrics.contains(r#"crm_webhooks_received_total{provider="crm",outcome="unauthorized"} 1"#), "{metrics}");
    assert!(metrics.contains(r#"crm_queue_depth{queue="jobs",state="ready"} 1"#), "{metrics}");
}

#[tokio::test]
async fn operator_endpoints_require_the_key() {
    let app = app().await;
    let r = api::router(app.app.clone())
        .oneshot(Request::get("/api/v1/receipts").body(Body::empty()).unwrap())
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn replaying_needs_the_key_and_an_explicit_target() {
    let app = app().await;
    let post = |key: Option<&'static str>, body: &'static str| {
        let router = api::router(app.app.clone());
        async move {
            let mut req = Request::post("/api/v1/dead-letters/replay").header("content-type", "application/json");
            if let Some(k) = key {
                req = req.header("x-api-key", k);
            }
            let r = router.oneshot(req.body(Body::from(body)).unwrap()).await.unwrap();
            let status = r.status();
            let bytes = axum::body::to_bytes(r.into_body(), usize::MAX).await.unwrap();
            (status, serde_json::from_slice::<Value>(&bytes).unwrap_or(Value::Null))
        }
    };
    assert_eq!(post(None, r#"{"all": true}"#).await.0, StatusCode::UNAUTHORIZED);
    let (status, body) = post(Some(API_KEY), "{}").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(body["code"], "invalid_replay_request");
    let (status, body) = post(Some(API_KEY), r#"{"all": true}"#).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["replayed"], serde_json::json!([]));
    let (status, body) = post(Some(API_KEY), r#"{"job_id": "nope"}"#).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(body["code"], "dead_letter_not_found");
}
