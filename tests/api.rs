//! The HTTP API driven in-process with `oneshot`: every answer a CRM can get.

#[path = "support/mod.rs"]
mod support;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::http::{Request, StatusCode};
use crm_event_handler::config::Config;
use crm_event_handler::{App, api};
use serde_json::Value;
use support::{API_KEY, payload, plugins_dir};
use tower::ServiceExt;

const ADMIN_KEY: &str = "admin-key-456";
const LOCAL: &str = "127.0.0.1:40000";
const REMOTE: &str = "203.0.113.7:40000";

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
        ("ADMIN_API_KEY", ADMIN_KEY.to_string()),
        ("BUNDLED_PLUGINS", "none".to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    for (k, v) in extra {
        if v.is_empty() {
            vars.remove(*k);
        } else {
            vars.insert(k.to_string(), v.to_string());
        }
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
    call(&api::router(app.app.clone()), req.body(body.into()).unwrap()).await
}

/// Answer one request, as the server does: the client's address attached.
async fn call(router: &axum::Router, request: Request<Body>) -> (StatusCode, Value) {
    let (status, _, body) = call_from(router, request, LOCAL).await;
    (status, body)
}

async fn call_from(
    router: &axum::Router,
    mut request: Request<Body>,
    peer: &str,
) -> (StatusCode, axum::http::HeaderMap, Value) {
    request.extensions_mut().insert(ConnectInfo(peer.parse::<SocketAddr>().unwrap()));
    let response = router.clone().oneshot(request).await.unwrap();
    let status = response.status();
    let headers = response.headers().clone();
    let bytes = axum::body::to_bytes(response.into_body(), usize::MAX).await.unwrap();
    (status, headers, serde_json::from_slice(&bytes).unwrap_or(Value::Null))
}

/// GET an operator route with these headers, from `peer`.
async fn operator_get(app: &TestApp, path: &str, headers: &[(&str, &str)], peer: &str) -> StatusCode {
    let mut req = Request::get(path);
    for (n, v) in headers {
        req = req.header(*n, *v);
    }
    call_from(&api::router(app.app.clone()), req.body(Body::empty()).unwrap(), peer).await.0
}

async fn receipts(app: &TestApp) -> usize {
    app.app
        .store
        .list(crm_event_handler::store::ListQuery { limit: 100, ..Default::default() })
        .await
        .unwrap()
        .receipts
        .len()
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

const OPERATOR_ROUTES: [&str; 4] =
    ["/api/v1/receipts", "/api/v1/receipts/nope", "/api/v1/dead-letters", "/api/v1/plugins"];

#[tokio::test]
async fn the_admin_key_opens_every_operator_route_and_the_webhook_key_none() {
    let app = app().await;
    for route in OPERATOR_ROUTES {
        let ok = operator_get(&app, route, &[("x-api-key", ADMIN_KEY)], REMOTE).await;
        assert!(ok == StatusCode::OK || ok == StatusCode::NOT_FOUND, "{route}: {ok}");
        assert_eq!(
            operator_get(&app, route, &[("authorization", &format!("Bearer {ADMIN_KEY}"))], REMOTE).await,
            ok,
            "{route}"
        );
        // The CRM's key, even from this machine, opens nothing.
        for attempt in [vec![("x-api-key", API_KEY)], vec![("authorization", "Bearer test-key-123")], vec![]] {
            assert_eq!(
                operator_get(&app, route, &attempt, LOCAL).await,
                StatusCode::UNAUTHORIZED,
                "{route} {attempt:?}"
            );
        }
    }
    // Replay is refused before its body is looked at.
    let req = Request::post("/api/v1/dead-letters/replay")
        .header("x-api-key", API_KEY)
        .body(Body::from("{\"all\": true}"))
        .unwrap();
    assert_eq!(call(&api::router(app.app.clone()), req).await.0, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn without_an_admin_key_the_operator_routes_answer_this_machine_only() {
    let app = app_with(&[("ADMIN_API_KEY", "")], |_| {}).await;
    assert_eq!(operator_get(&app, "/api/v1/receipts", &[("x-api-key", API_KEY)], LOCAL).await, StatusCode::OK);
    assert_eq!(operator_get(&app, "/api/v1/receipts", &[("x-api-key", API_KEY)], "[::1]:4000").await, StatusCode::OK);
    assert_eq!(operator_get(&app, "/api/v1/receipts", &[("x-api-key", API_KEY)], REMOTE).await, StatusCode::FORBIDDEN);
    assert_eq!(
        operator_get(&app, "/api/v1/receipts", &[("x-api-key", "guess")], LOCAL).await,
        StatusCode::UNAUTHORIZED
    );
}

#[tokio::test]
async fn during_a_key_rotation_both_keys_are_accepted() {
    let app = app_with(&[("API_KEY", "new-key"), ("API_KEY_PREVIOUS", API_KEY)], |_| {}).await;
    let (status, _) = send(&app, "/api/v1/webhook/crm", Some(API_KEY), payload("K-1", "Qualified")).await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = send(&app, "/api/v1/webhook/crm", Some("new-key"), payload("K-2", "Qualified")).await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = send(&app, "/api/v1/webhook/crm", Some("older-key"), payload("K-3", "Qualified")).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    assert_eq!(receipts(&app).await, 2);
}

#[tokio::test]
async fn a_client_over_the_rate_limit_gets_429_with_retry_after_and_others_do_not() {
    let app = app_with(&[("RATE_LIMIT_MAX", "3"), ("RATE_LIMIT_WINDOW_MS", "60000")], |_| {}).await;
    let router = api::router(app.app.clone());
    let webhook = |deal: &str| {
        Request::post("/api/v1/webhook/crm")
            .header("x-api-key", API_KEY)
            .body(Body::from(payload(deal, "Qualified")))
            .unwrap()
    };
    for i in 0..3 {
        assert_eq!(call_from(&router, webhook(&format!("RL-{i}")), REMOTE).await.0, StatusCode::OK);
    }
    let (status, headers, body) = call_from(&router, webhook("RL-3"), REMOTE).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(body["code"], "rate_limited");
    let wait: u64 = headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=20).contains(&wait), "{wait}");
    // Someone else is not held back, and the refused webhook left nothing.
    assert_eq!(call_from(&router, webhook("RL-4"), "198.51.100.1:1").await.0, StatusCode::OK);
    assert_eq!(receipts(&app).await, 4);
}

#[tokio::test]
async fn the_plugin_listing_names_variables_and_grants_but_no_value() {
    let app = app_with(&[("META_ACCESS_TOKEN", "EAAB-very-secret"), ("META_PIXEL_ID", "99")], |_| {}).await;
    let req = Request::get("/api/v1/plugins").header("x-api-key", ADMIN_KEY).body(Body::empty()).unwrap();
    let (status, body) = call(&api::router(app.app.clone()), req).await;
    assert_eq!(status, StatusCode::OK);
    let text = body.to_string();
    assert!(!text.contains("EAAB-very-secret") && !text.contains("test-key-123"), "{text}");
    let meta = body["plugins"].as_array().unwrap().iter().find(|p| p["name"] == "meta-capi").unwrap();
    assert_eq!(meta["grants"], serde_json::json!(["META_CAPI_* (own name)", "META_*"]));
    let token = meta["config"].as_array().unwrap().iter().find(|c| c["key"] == "access_token").unwrap();
    assert_eq!(token["env"], "META_ACCESS_TOKEN");
    assert_eq!(token["granted_by"], "META_*");
    assert_eq!(token["set"], true);
}

#[tokio::test]
async fn a_source_refused_at_start_answers_503_not_404() {
    // The operator's copy of crm asks for the webhook key itself: refused.
    let app = app_with(&[], |plugins| {
        let manifest = plugins.join("crm/plugin.toml");
        let text = std::fs::read_to_string(&manifest).unwrap() + "\n[config.key]\nenv = \"API_KEY\"\n";
        std::fs::write(manifest, text).unwrap();
    })
    .await;
    assert!(app.app.plugins.source("crm").is_none());
    let errors = app.app.plugins.load_errors();
    assert!(errors[0].1.contains("config.key: API_KEY is one of the host's own settings"), "{errors:?}");
    let (status, body) = send(&app, "/api/v1/webhook/crm", Some(API_KEY), payload("U-1", "Qualified")).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(body["code"], "provider_unavailable");
    let (status, _) = send(&app, "/api/v1/webhook/nobody", Some(API_KEY), payload("U-1", "Qualified")).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let ready = call(&api::router(app.app.clone()), Request::get("/ready").body(Body::empty()).unwrap()).await;
    assert_eq!(ready.0, StatusCode::SERVICE_UNAVAILABLE, "{}", ready.1);
}

#[tokio::test]
async fn replaying_needs_an_explicit_target() {
    let app = app().await;
    let post = |body: &'static str| {
        let router = api::router(app.app.clone());
        async move {
            let req = Request::post("/api/v1/dead-letters/replay")
                .header("content-type", "application/json")
                .header("x-api-key", ADMIN_KEY)
                .body(Body::from(body))
                .unwrap();
            call(&router, req).await
        }
    };
    let (status, body) = post("{}").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(body["code"], "invalid_replay_request");
    let (status, body) = post(r#"{"all": true}"#).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["replayed"], serde_json::json!([]));
    let (status, body) = post(r#"{"job_id": "nope"}"#).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(body["code"], "dead_letter_not_found");
}

#[tokio::test]
async fn the_openapi_description_lists_every_route_and_every_listed_route_is_served() {
    let app = app().await;
    let router = api::router(app.app.clone());
    let (status, spec) = call(&router, Request::get("/api/v1/openapi.json").body(Body::empty()).unwrap()).await;
    assert_eq!(status, StatusCode::OK);
    assert!(spec["openapi"].as_str().unwrap().starts_with("3."), "{spec}");
    let paths = spec["paths"].as_object().unwrap();
    let mut listed: Vec<&str> = paths.keys().map(String::as_str).collect();
    listed.sort();
    assert_eq!(
        listed,
        [
            "/api/v1/dead-letters",
            "/api/v1/dead-letters/replay",
            "/api/v1/destinations",
            "/api/v1/destinations/{name}/pause",
            "/api/v1/destinations/{name}/resume",
            "/api/v1/openapi.json",
            "/api/v1/plugins",
            "/api/v1/receipts",
            "/api/v1/receipts/{id}",
            "/api/v1/receipts/{id}/replay",
            "/api/v1/webhook/{provider}",
            "/health",
            "/metrics",
            "/ready",
            "/ui",
            "/ui/app.js",
            "/ui/style.css",
            "/v1/webhooks/{provider}",
        ]
    );
    // Each listed operation is routed: an answer of its own, not the
    // router's bare 404 or 405.
    for (path, item) in paths {
        for method in item.as_object().unwrap().keys() {
            let concrete = path
                .replace("{provider}", "crm")
                .replace("{id}", "no-such-receipt")
                .replace("{name}", "no-such-destination");
            let key = if path.contains("webhook") { API_KEY } else { ADMIN_KEY };
            let request = Request::builder()
                .method(method.to_uppercase().as_str())
                .uri(&concrete)
                .header("x-api-key", key)
                .header("content-type", "application/json")
                .body(Body::from("{}"))
                .unwrap();
            let (status, body) = call(&router, request).await;
            assert_ne!(status, StatusCode::METHOD_NOT_ALLOWED, "{method} {path}");
            assert!(status != StatusCode::NOT_FOUND || body["code"].is_string(), "{method} {path} is not routed");
        }
    }
    // And the check can tell: an unlisted route is the router's bare 404.
    let (status, body) = call(&router, Request::get("/api/v1/nothing").body(Body::empty()).unwrap()).await;
    assert_eq!((status, body), (StatusCode::NOT_FOUND, Value::Null));
}
