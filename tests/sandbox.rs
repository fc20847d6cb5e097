//! Sandbox limits, each tested within and over: time per call, memory,
//! outbound allow-list, response size, and no files, environment or sockets.
//! Uses the `misbehave` fixture plugin (tests/plugins/misbehave), whose
//! action name picks what it does.

#[path = "support/mod.rs"]
mod support;

use std::collections::HashMap;
use std::time::Duration;

use crm_event_handler::config::Config;
use crm_event_handler::plugins::{EngineOptions, LoadedPlugin, Outcome, PluginEngine, PluginError};
use crm_event_handler::{App, serve};
use serde_json::Value;
use support::*;

fn load(dir: &std::path::Path, allowed_url: &str) -> LoadedPlugin {
    let plugins = plugins_dir(dir, &["misbehave"]);
    let env = plugin_env(&[("MISBEHAVE_ALLOWED_URL", allowed_url)], None);
    let engine = PluginEngine::new(EngineOptions::default()).unwrap();
    engine.load(&plugins.join("misbehave"), &env, None).unwrap()
}

async fn run(plugin: &LoadedPlugin, action: &str, params: &[(&str, &str)]) -> Result<Outcome, PluginError> {
    run_action(plugin, action, params).await.0
}

fn delivered(r: &Result<Outcome, PluginError>) -> String {
    match r {
        Ok(Outcome::Delivered { detail, .. }) => detail.clone(),
        other => panic!("expected delivered, got {other:?}"),
    }
}

fn refused(r: &Result<Outcome, PluginError>) -> String {
    match r {
        Ok(Outcome::Permanent { reason, .. }) => reason.clone(),
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[tokio::test]
async fn time_within_the_limit_completes() {
    let dir = tempfile::tempdir().unwrap();
    let p = load(dir.path(), "http://127.0.0.1:1");
    assert_eq!(delivered(&run(&p, "spin-ms", &[("ms", "100")]).await), "spun 100 ms");
}

#[tokio::test]
async fn an_endless_loop_is_interrupted_at_the_time_limit() {
    let dir = tempfile::tempdir().unwrap();
    let p = load(dir.path(), "http://127.0.0.1:1");
    let r = run(&p, "loop", &[]).await;
    assert!(matches!(r, Err(PluginError::TimeLimit { limit_ms: 500, .. })), "{r:?}");
    // The engine keeps serving after an interruption.
    assert_eq!(delivered(&run(&p, "ok", &[]).await), "fine");
}

#[tokio::test]
async fn memory_within_the_limit_is_granted() {
    let dir = tempfile::tempdir().unwrap();
    let p = load(dir.path(), "http://127.0.0.1:1");
    assert_eq!(delivered(&run(&p, "allocate-mb", &[("mb", "4")]).await), "allocated 4 MiB");
}

#[tokio::test]
async fn memory_past_the_limit_traps() {
    let dir = tempfile::tempdir().unwrap();
    let p = load(dir.path(), "http://127.0.0.1:1");
    let r = run(&p, "allocate-mb", &[("mb", "64")]).await;
    assert!(matches!(r, Err(PluginError::MemoryLimit { limit_mb: 16, .. })), "{r:?}");
    assert_eq!(delivered(&run(&p, "ok", &[]).await), "fine");
}

#[tokio::test]
async fn an_allowed_host_is_reachable() {
    let meta = StandIn::meta().await;
    let dir = tempfile::tempdir().unwrap();
    let p = load(dir.path(), &meta.url);
    // The stand-in only answers POST; any answer proves the call went out.
    let r = run(&p, "fetch", &[("url", &format!("{}/x", meta.url))]).await;
    assert!(delivered(&r).starts_with("status "), "{r:?}");
}

#[tokio::test]
async fn a_host_not_in_the_allow_list_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let p = load(dir.path(), "http://127.0.0.1:1");
    let r = run(&p, "fetch", &[("url", "http://example.com/")]).await;
    let reason = refused(&r);
    assert!(reason.starts_with("denied: http://example.com is not in allowed_outbound_hosts"), "{reason}");
    // A different port on an allowed host is a different origin.
    let r = run(&p, "fetch", &[("url", "http://127.0.0.1:2/")]).await;
    assert!(refused(&r).starts_with("denied:"));
}

#[tokio::test]
async fn the_cloud_metadata_address_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let p = load(dir.path(), "http://127.0.0.1:1");
    let r = run(&p, "fetch", &[("url", "http://169.254.169.254/latest/meta-data/")]).await;
    assert!(refused(&r).starts_with("denied: http://169.254.169.254"));
}

/// A local server that answers `/big/{n}` with n bytes and `/redirect`
/// with a 302 to the cloud metadata address.
async fn odd_server() -> String {
    use axum::routing::get;
    let router = axum::Router::new()
        .route("/big/{n}", get(|axum::extract::Path(n): axum::extract::Path<usize>| async move { vec![b'x'; n] }))
        .route(
            "/redirect",
            get(|| async {
                (axum::http::StatusCode::FOUND, [("location", "http://169.254.169.254/latest/meta-data/")])
            }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, router).await });
    url
}

#[tokio::test]
async fn a_response_within_the_size_limit_is_passed_back() {
    let server = odd_server().await;
    let dir = tempfile::tempdir().unwrap();
    let p = load(dir.path(), &server);
    let r = run(&p, "fetch", &[("url", &format!("{server}/big/100000"))]).await;
    assert_eq!(delivered(&r), "status 200 with 100000 bytes");
}

#[tokio::test]
async fn a_response_over_the_size_limit_is_refused() {
    let server = odd_server().await;
    let dir = tempfile::tempdir().unwrap();
    let p = load(dir.path(), &server);
    let r = run(&p, "fetch", &[("url", &format!("{server}/big/2000000"))]).await;
    assert_eq!(refused(&r), "too large: 1048576");
}

#[tokio::test]
async fn a_redirect_to_a_host_not_allowed_is_not_followed() {
    let server = odd_server().await;
    let dir = tempfile::tempdir().unwrap();
    let p = load(dir.path(), &server);
    // The plugin sees the 302 itself; the host never requests the target.
    let r = run(&p, "fetch", &[("url", &format!("{server}/redirect"))]).await;
    assert_eq!(delivered(&r), "status 302 with 0 bytes");
}

#[tokio::test]
async fn no_environment_files_or_sockets() {
    let dir = tempfile::tempdir().unwrap();
    let p = load(dir.path(), "http://127.0.0.1:1");
    // The host process has variables; the plugin sees none.
    assert!(std::env::vars().count() > 0);
    assert_eq!(delivered(&run(&p, "read-env", &[]).await), "0 variables");
    assert!(delivered(&run(&p, "read-file", &[]).await).starts_with("no file access"));
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    assert!(delivered(&run(&p, "open-socket", &[("addr", &addr)]).await).starts_with("no socket"));
}

/// The whole pipeline: a looping destination is interrupted on every
/// attempt, retried up to RETRY_MAX_ATTEMPTS, then dead-lettered with the
/// reason, while the service keeps answering.
#[tokio::test]
async fn a_looping_destination_is_retried_then_dead_lettered() {
    let dir = tempfile::tempdir().unwrap();
    let plugins = plugins_dir(dir.path(), &["crm", "misbehave"]);
    let routes = dir.path().join("routes.toml");
    std::fs::write(
        &routes,
        "[[route]]\nstatus = \"Qualified\"\nactions = [{ destination = \"misbehave\", action = \"loop\" }]\n",
    )
    .unwrap();
    let vars: HashMap<String, String> = [
        ("API_KEY", API_KEY.to_string()),
        ("DATA_DIR", dir.path().join("data").display().to_string()),
        ("PLUGINS_DIR", plugins.display().to_string()),
        ("ROUTES_FILE", routes.display().to_string()),
        ("RETRY_MAX_ATTEMPTS", "2".to_string()),
        ("RETRY_BASE_DELAY_MS", "10".to_string()),
        ("BUNDLED_PLUGINS", "none".to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let app = App::build(Config::from_vars(vars).unwrap()).await.unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let server = tokio::spawn(serve(app.clone(), listener, stopped));

    let (status, body) = post_webhook(&base, "/api/v1/webhook/crm", "deal_created", &payload("D-L", "Qualified")).await;
    assert_eq!(status, 200);
    let id = body["receipt_id"].as_str().unwrap().to_string();
    let receipt: Value = eventually("the looping job to be dead-lettered", Duration::from_secs(30), async || {
        let r = get_json(&base, &format!("/api/v1/receipts/{id}")).await;
        (r["actions"][0]["state"] == "failed").then_some(r)
    })
    .await;
    assert_eq!(receipt["actions"][0]["attempts"], 2);
    let error = receipt["actions"][0]["last_error"].as_str().unwrap();
    assert_eq!(
        error,
        "gave up after 2 attempts: plugin misbehave exceeded its time limit of 500 ms and was interrupted"
    );
    let health = reqwest::get(format!("{base}/health")).await.unwrap();
    assert_eq!(health.status(), 200);
    let _ = stop.send(true);
    let _ = server.await;
}
