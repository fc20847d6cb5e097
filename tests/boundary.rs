//! The plugin trust boundary, tested from the attacker's side: plugins
//! written to take more than the operator granted (the `misbehave` and
//! `slow-source` fixtures in tests/plugins), and the limits that hold them.
//! Each rule is tested in pairs where that makes sense: granted / not
//! granted, within / over a cap.

#[path = "support/mod.rs"]
mod support;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use crm_event_handler::plugins::{
    EngineOptions, IncomingRequest, LoadError, LoadedPlugin, Outcome, PluginEngine, PluginError, PoolShares,
};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Load a copy of `misbehave` whose manifest `edit` changes, with these
/// variables and `PLUGIN_GRANTS`.
fn misbehave(
    dir: &Path,
    edit: impl FnOnce(String) -> String,
    vars: &[(&str, &str)],
    grants: Option<&str>,
) -> Result<LoadedPlugin, LoadError> {
    let plugins = plugins_dir(dir, &["misbehave"]);
    let manifest = plugins.join("misbehave/plugin.toml");
    std::fs::write(&manifest, edit(std::fs::read_to_string(&manifest).unwrap())).unwrap();
    let engine = PluginEngine::new(EngineOptions::default()).unwrap();
    engine.load(&plugins.join("misbehave"), &plugin_env(vars, grants), None)
}

/// Add a `[config.stolen]` key reading `var`.
fn asking_for(var: &str) -> impl FnOnce(String) -> String {
    let var = var.to_string();
    move |manifest| format!("{manifest}\n[config.stolen]\nenv = \"{var}\"\n")
}

/// Add literal entries to the allow-list.
fn also_allowing(entries: &str) -> impl FnOnce(String) -> String {
    let entries = entries.to_string();
    move |manifest| manifest.replace("[\"{allowed_url}\"]", &format!("[\"{{allowed_url}}\", {entries}]"))
}

async fn detail(plugin: &LoadedPlugin, action: &str, params: &[(&str, &str)]) -> String {
    match run_action(plugin, action, params).await.0 {
        Ok(Outcome::Delivered { detail, .. }) => detail,
        Ok(Outcome::Permanent { reason, .. }) => reason,
        other => panic!("unexpected {other:?}"),
    }
}

// ---- What a plugin may read ----

#[tokio::test]
async fn a_setting_that_is_a_host_setting_refuses_the_plugin_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    for var in ["API_KEY", "ADMIN_API_KEY", "DB_URI", "REDIS_URI", "API_KEY_PREVIOUS", "PLUGIN_GRANTS"] {
        let err = misbehave(dir.path(), asking_for(var), &[(var, "s3cret")], Some(&format!("misbehave={var}_X")))
            .err()
            .unwrap_or_else(|| panic!("{var} was handed to the plugin"))
            .to_string();
        assert!(err.contains(&format!("config.stolen: {var} is one of the host's own settings")), "{err}");
        std::fs::remove_dir_all(dir.path().join("plugins")).unwrap();
    }
}

#[tokio::test]
async fn another_plugins_secret_is_refused_unless_granted() {
    let dir = tempfile::tempdir().unwrap();
    let vars = [("META_ACCESS_TOKEN", "EAAB-token"), ("MISBEHAVE_ALLOWED_URL", "http://127.0.0.1:1")];
    // Not granted: refused, with the variable and how to grant it.
    let err = misbehave(dir.path(), asking_for("META_ACCESS_TOKEN"), &vars, None).err().unwrap().to_string();
    assert!(err.contains("META_ACCESS_TOKEN is not granted to plugin \"misbehave\""), "{err}");
    assert!(err.contains("PLUGIN_GRANTS=\"misbehave=META_ACCESS_TOKEN\""), "{err}");
    std::fs::remove_dir_all(dir.path().join("plugins")).unwrap();
    // Granted by the operator: the plugin reads it.
    let p = misbehave(dir.path(), asking_for("META_ACCESS_TOKEN"), &vars, Some("misbehave=META_ACCESS_TOKEN")).unwrap();
    assert_eq!(detail(&p, "read-config", &[("keys", "stolen")]).await, "stolen=EAAB-token");
}

#[tokio::test]
async fn config_get_answers_only_the_declared_keys() {
    let dir = tempfile::tempdir().unwrap();
    let vars = [
        ("API_KEY", "webhook-key"),
        ("META_ACCESS_TOKEN", "EAAB-token"),
        ("MISBEHAVE_ALLOWED_URL", "http://127.0.0.1:9"),
        ("MISBEHAVE_UNDECLARED", "own-prefix-but-not-declared"),
    ];
    let p = misbehave(dir.path(), |m| m, &vars, None).unwrap();
    let got =
        detail(&p, "read-config", &[("keys", "allowed_url,API_KEY,api_key,META_ACCESS_TOKEN,MISBEHAVE_UNDECLARED")])
            .await;
    assert_eq!(
        got,
        "allowed_url=http://127.0.0.1:9;API_KEY=<none>;api_key=<none>;META_ACCESS_TOKEN=<none>;MISBEHAVE_UNDECLARED=<none>"
    );
    assert_eq!(detail(&p, "read-env", &[]).await, "0 variables");
}

// ---- Outbound caps ----

#[tokio::test]
async fn requests_within_the_caps_all_go_out() {
    let meta = StandIn::meta().await;
    let dir = tempfile::tempdir().unwrap();
    let p = misbehave(dir.path(), |m| m, &[("MISBEHAVE_ALLOWED_URL", &meta.url)], None).unwrap();
    let url = format!("{}/x", meta.url);
    let got = detail(&p, "send-loop", &[("url", &url), ("n", "3"), ("bytes", "1000")]).await;
    assert_eq!(got, "sent 3, denied 0, failed 0; last denial: ");
    assert_eq!(meta.received().len(), 3);
}

#[tokio::test]
async fn requests_over_the_count_cap_are_refused_and_not_kept() {
    let meta = StandIn::meta().await;
    let dir = tempfile::tempdir().unwrap();
    let p = misbehave(dir.path(), |m| m, &[("MISBEHAVE_ALLOWED_URL", &meta.url)], None).unwrap();
    let url = format!("{}/x", meta.url);
    let (outcome, records) = run_action(&p, "send-loop", &[("url", &url), ("n", "50"), ("bytes", "10000")]).await;
    let Ok(Outcome::Delivered { detail, .. }) = outcome else { panic!("{outcome:?}") };
    assert!(
        detail.starts_with("sent 20, denied 30, failed 0; last denial: plugin misbehave made more than 20 requests"),
        "{detail}"
    );
    assert_eq!(meta.received().len(), 20, "the default cap is 20 requests per call");
    // What is kept for the attempt log is bounded: one record per request
    // sent, each with a body excerpt, not the body.
    assert_eq!(records.len(), 20);
    assert!(records.iter().all(|r| r.body.len() <= 2100 && r.body_bytes == 10000));
}

#[tokio::test]
async fn request_bytes_over_the_cap_are_refused() {
    let meta = StandIn::meta().await;
    let dir = tempfile::tempdir().unwrap();
    let cap = |m: String| m.replace("memory_mb = 16", "memory_mb = 16\nmax_request_bytes_per_call = 1000000");
    let p = misbehave(dir.path(), cap, &[("MISBEHAVE_ALLOWED_URL", &meta.url)], None).unwrap();
    let url = format!("{}/x", meta.url);
    let got = detail(&p, "send-loop", &[("url", &url), ("n", "5"), ("bytes", "400000")]).await;
    assert!(
        got.starts_with("sent 2, denied 3, failed 0; last denial: plugin misbehave sent more than 1000000"),
        "{got}"
    );
    assert_eq!(meta.received().len(), 2);
}

#[tokio::test]
async fn a_loop_of_denied_requests_stays_within_the_caps() {
    let dir = tempfile::tempdir().unwrap();
    let long = |m: String| m.replace("time_per_call_ms = 500", "time_per_call_ms = 20000");
    let p = misbehave(dir.path(), long, &[], None).unwrap();
    let (outcome, records) =
        run_action(&p, "send-loop", &[("url", "http://example.com/"), ("n", "1000"), ("bytes", "100000")]).await;
    let Ok(Outcome::Delivered { detail, .. }) = outcome else { panic!("{outcome:?}") };
    assert!(detail.starts_with("sent 0, denied 1000, failed 0"), "{detail}");
    assert!(records.len() <= 20, "{} requests kept", records.len());
    assert!(records.iter().all(|r| r.body.len() <= 2100));
}

// ---- Headers and addresses ----

/// A TCP server that records the raw bytes of one request and answers 204.
async fn raw_capture() -> (String, tokio::sync::oneshot::Receiver<Vec<u8>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let (tx, rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let (mut socket, _) = listener.accept().await.unwrap();
        let mut seen = Vec::new();
        let mut buf = [0u8; 4096];
        // Read until the head and the declared body are in.
        loop {
            let n = tokio::time::timeout(Duration::from_millis(500), socket.read(&mut buf))
                .await
                .unwrap_or(Ok(0))
                .unwrap_or(0);
            if n == 0 {
                break;
            }
            seen.extend_from_slice(&buf[..n]);
            let text = String::from_utf8_lossy(&seen).to_string();
            if let Some(end) = text.find("\r\n\r\n") {
                let length = text[..end]
                    .lines()
                    .find_map(|l| {
                        l.to_ascii_lowercase()
                            .strip_prefix("content-length:")
                            .map(|v| v.trim().parse::<usize>().unwrap_or(0))
                    })
                    .unwrap_or(0);
                if seen.len() >= end + 4 + length {
                    break;
                }
            }
        }
        let _ = socket.write_all(b"HTTP/1.1 204 No Content\r\ncontent-length: 0\r\n\r\n").await;
        let _ = tx.send(seen);
    });
    (url, rx)
}

#[tokio::test]
async fn a_plugin_cannot_set_hop_by_hop_headers() {
    let (url, captured) = raw_capture().await;
    let dir = tempfile::tempdir().unwrap();
    let p = misbehave(dir.path(), |m| m, &[("MISBEHAVE_ALLOWED_URL", &url)], None).unwrap();
    assert_eq!(detail(&p, "smuggle", &[("url", &format!("{url}/in"))]).await, "status 204");
    let raw = String::from_utf8(captured.await.unwrap()).unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").unwrap();
    let head = head.to_ascii_lowercase();
    let host = url.trim_start_matches("http://");
    assert!(head.contains(&format!("\r\nhost: {host}")), "{head}");
    assert!(
        !head.contains("169.254.169.254") && !head.contains("transfer-encoding") && !head.contains("x-hop"),
        "{head}"
    );
    assert!(head.contains("x-kept: yes"), "{head}");
    // The body is framed by the host's own length: the "second request" is
    // just body bytes.
    assert!(head.contains(&format!("content-length: {}", body.len())), "{head}");
    assert!(body.ends_with("GET /admin HTTP/1.1\r\n\r\n"));
}

#[tokio::test]
async fn an_internal_address_the_plugin_lists_itself_is_refused() {
    let meta = StandIn::meta().await;
    let port = meta.url.rsplit(':').next().unwrap().to_string();
    let dir = tempfile::tempdir().unwrap();
    let entries = format!("\"http://127.0.0.1:{port}\", \"http://localhost:{port}\", \"http://*.0.0.1:*\"");
    let p = misbehave(dir.path(), also_allowing(&entries), &[], None).unwrap();
    let literal = detail(&p, "fetch", &[("url", &format!("http://127.0.0.1:{port}/x"))]).await;
    assert!(
        literal.starts_with("denied: 127.0.0.1 is an internal address; only the operator can allow it"),
        "{literal}"
    );
    let named = detail(&p, "fetch", &[("url", &format!("http://localhost:{port}/x"))]).await;
    assert!(named.contains("localhost resolves only to internal addresses"), "{named}");
    assert!(meta.received().is_empty());
}

#[tokio::test]
async fn only_exactly_the_operators_origin_reaches_an_internal_address() {
    let meta = StandIn::meta().await;
    let (other, _) = raw_capture().await;
    let dir = tempfile::tempdir().unwrap();
    // The operator points the plugin at the stand-in; the plugin's own
    // manifest adds every port of that host.
    let p =
        misbehave(dir.path(), also_allowing("\"http://127.0.0.1:*\""), &[("MISBEHAVE_ALLOWED_URL", &meta.url)], None)
            .unwrap();
    assert_eq!(detail(&p, "fetch", &[("url", &format!("{}/x", meta.url))]).await, "status 405 with 0 bytes");
    let elsewhere = detail(&p, "fetch", &[("url", &format!("{other}/x"))]).await;
    assert!(elsewhere.starts_with("denied: 127.0.0.1 is an internal address"), "{elsewhere}");
}

#[tokio::test]
async fn a_plugin_named_after_another_plugins_prefix_gets_nothing_of_its_grant() {
    let dir = tempfile::tempdir().unwrap();
    // Renamed "meta", asking for nothing but meta-capi's token.
    let squat = |_: String| {
        "name = \"meta\"\nversion = \"1\"\nkind = \"destination\"\ncomponent = \"misbehave.wasm\"\n\n\
         [config.stolen]\nenv = \"META_ACCESS_TOKEN\"\n"
            .to_string()
    };
    let err = misbehave(dir.path(), squat, &[("META_ACCESS_TOKEN", "EAAB-token")], None).err().unwrap().to_string();
    assert!(err.contains("META_ACCESS_TOKEN is granted to plugin \"meta-capi\""), "{err}");
}

#[tokio::test]
async fn request_headers_beyond_the_cap_are_refused() {
    let meta = StandIn::meta().await;
    let dir = tempfile::tempdir().unwrap();
    let p = misbehave(dir.path(), |m| m, &[("MISBEHAVE_ALLOWED_URL", &meta.url)], None).unwrap();
    let url = format!("{}/x", meta.url);
    assert_eq!(detail(&p, "many-headers", &[("url", &url), ("n", "10")]).await, "status 405");
    let flood = detail(&p, "many-headers", &[("url", &url), ("n", "1000")]).await;
    assert!(flood.starts_with("error: HttpError::InvalidRequest(\"at most 64 headers"), "{flood}");
}

#[tokio::test]
async fn an_internal_address_the_operator_set_is_reachable() {
    let meta = StandIn::meta().await;
    let port = meta.url.rsplit(':').next().unwrap().to_string();
    let dir = tempfile::tempdir().unwrap();
    let by_name = format!("http://localhost:{port}");
    let p = misbehave(dir.path(), |m| m, &[("MISBEHAVE_ALLOWED_URL", &by_name)], None).unwrap();
    // The stand-in answers POST only: any status shows the request arrived.
    assert_eq!(detail(&p, "fetch", &[("url", &format!("{by_name}/x"))]).await, "status 405 with 0 bytes");
}

// ---- The instance pool ----

#[tokio::test]
async fn a_burst_of_parses_cannot_take_the_instances_deliveries_need() {
    let dir = tempfile::tempdir().unwrap();
    let plugins = plugins_dir(dir.path(), &["slow-source", "misbehave"]);
    let engine =
        PluginEngine::new(EngineOptions { pool: PoolShares { parses: 2, deliveries: 1 }, ..EngineOptions::default() })
            .unwrap();
    let env = plugin_env(&[], None);
    let source = Arc::new(engine.load(&plugins.join("slow-source"), &env, None).unwrap());
    let destination = engine.load(&plugins.join("misbehave"), &env, None).unwrap();
    let slow = IncomingRequest {
        method: "POST".into(),
        url: "http://localhost/api/v1/webhook/slow-source".into(),
        headers: vec![("x-spin-ms".to_string(), "3000".to_string()), ("x-deal".to_string(), "S".to_string())],
        body: b"{}".to_vec(),
        received_at_ms: 0,
    };
    let burst: Vec<_> = (0..4)
        .map(|_| {
            let (source, slow) = (source.clone(), slow.clone());
            tokio::spawn(async move { source.parse(&slow).await })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    // While every parse instance is taken, a delivery still runs.
    assert_eq!(detail(&destination, "ok", &[]).await, "fine");
    let mut busy = 0;
    let mut parsed = 0;
    for task in burst {
        match task.await.unwrap() {
            Ok(Ok(events)) if events.len() == 1 && events[0].reference == "S" => parsed += 1,
            Err(PluginError::Busy { share: "parse instances", .. }) => busy += 1,
            other => panic!("{other:?}"),
        }
    }
    assert_eq!((parsed, busy), (2, 2), "two parses had the share; the others were told it was busy");
}

// ---- End to end, on the real binary ----

const WAIT: Duration = Duration::from_secs(60);
const ADMIN_KEY: &str = "admin-key-789";

async fn admin_get(base: &str, path: &str) -> serde_json::Value {
    let r = reqwest::Client::new().get(format!("{base}{path}")).header("x-api-key", ADMIN_KEY).send().await.unwrap();
    r.json().await.unwrap()
}

/// Replace a file the way a deploy should: write aside, then rename.
fn replace(path: &Path, contents: &str) {
    let tmp = path.with_extension("incoming");
    std::fs::write(&tmp, contents).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// The attack the trust boundary was built against: a copy of meta-capi
/// whose manifest reads the webhook key as its pixel id, so the key would
/// go out in the URL of every Meta request.
#[tokio::test]
async fn a_meta_capi_copy_reading_the_webhook_key_is_refused_and_never_sends_it() {
    let dir = tempfile::tempdir().unwrap();
    let plugins = plugins_dir(dir.path(), &["crm", "meta-capi"]);
    let (meta, brevo) = (StandIn::meta().await, StandIn::brevo().await);
    let mut vars = host_vars(&dir.path().join("data"), &plugins, &meta, &brevo);
    vars.extend([("ADMIN_API_KEY", ADMIN_KEY.to_string()), ("PLUGIN_RELOAD_MS", "100".to_string())]);
    let manifest = plugins.join("meta-capi/plugin.toml");
    let honest = std::fs::read_to_string(&manifest).unwrap();
    let stolen = honest.replace("env = \"META_PIXEL_ID\"", "env = \"API_KEY\"");
    assert_ne!(honest, stolen);
    std::fs::write(&manifest, &stolen).unwrap();

    // At start-up: refused, the service runs, and says why.
    let host = Host::start(&vars).await;
    let listing = admin_get(&host.url, "/api/v1/plugins").await;
    let error = listing["load_errors"][0]["error"].as_str().unwrap().to_string();
    assert!(error.contains("config.pixel_id: API_KEY is one of the host's own settings"), "{error}");
    assert!(listing["plugins"].as_array().unwrap().iter().all(|p| p["name"] != "meta-capi"));
    let (status, _) =
        post_webhook(&host.url, "/api/v1/webhook/crm", "deal_created", &payload("T-1", "Qualified")).await;
    assert_eq!(status, 200, "webhooks are still accepted; their Meta job waits");

    // The operator fixes the manifest: the waiting job goes out, with the
    // pixel id the operator set.
    replace(&manifest, &honest);
    eventually("the waiting Lead", WAIT, async || (meta.events().len() == 1).then_some(())).await;

    // A later version asking for the key again is refused; the running one
    // keeps delivering.
    replace(&manifest, &stolen);
    eventually("the refusal", WAIT, async || {
        let listing = admin_get(&host.url, "/api/v1/plugins").await;
        (!listing["load_errors"].as_array().unwrap().is_empty()).then_some(())
    })
    .await;
    let (status, _) =
        post_webhook(&host.url, "/api/v1/webhook/crm", "deal_created", &payload("T-2", "Qualified")).await;
    assert_eq!(status, 200);
    eventually("the second Lead", WAIT, async || (meta.events().len() == 2).then_some(())).await;
    for r in meta.received() {
        assert_eq!(r.path, "/v21.0/1234567890/events");
        assert!(!r.body.to_string().contains(API_KEY), "the webhook key left the host: {r:?}");
    }
}

/// The real binary with only the crm source, and these settings on top.
async fn crm_host(dir: &Path, extra: &[(&'static str, &str)]) -> Host {
    let plugins = plugins_dir(dir, &["crm"]);
    let mut vars = vec![
        ("API_KEY", API_KEY.to_string()),
        ("DATA_DIR", dir.join("data").display().to_string()),
        ("PLUGINS_DIR", plugins.display().to_string()),
    ];
    vars.extend(extra.iter().map(|(k, v)| (*k, v.to_string())));
    Host::start(&vars).await
}

#[tokio::test]
async fn half_open_connections_neither_hold_up_others_nor_stay_open() {
    let dir = tempfile::tempdir().unwrap();
    let host = crm_host(dir.path(), &[("HTTP_HEADER_TIMEOUT_MS", "3000")]).await;
    let addr = host.url.trim_start_matches("http://").to_string();
    let mut idle = Vec::new();
    for _ in 0..1000 {
        let mut s = tokio::net::TcpStream::connect(&addr).await.unwrap();
        s.write_all(b"POST /api/v1/webhook/crm HTTP/1.1\r\nhost: x\r\nx-api-key: ").await.unwrap();
        idle.push(s);
    }
    // Others are answered meanwhile.
    let client = reqwest::Client::builder().timeout(Duration::from_secs(10)).build().unwrap();
    let r = client.get(format!("{}/health", host.url)).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let (status, _) =
        post_webhook(&host.url, "/api/v1/webhook/crm", "deal_created", &payload("H-1", "Qualified")).await;
    assert_eq!(status, 200);
    // The server closes every one of them (the header timeout).
    let mut closed = 0;
    for mut s in idle {
        let mut buf = [0u8; 256];
        match tokio::time::timeout(Duration::from_secs(30), s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => closed += 1,
            Ok(Ok(_)) => closed += 1, // an error answer, then the close
            Err(_) => {}
        }
    }
    assert_eq!(closed, 1000);
}

#[tokio::test]
async fn connections_past_the_cap_are_closed_and_the_rest_served() {
    let dir = tempfile::tempdir().unwrap();
    let host = crm_host(dir.path(), &[("HTTP_MAX_CONNECTIONS", "20")]).await;
    let addr = host.url.trim_start_matches("http://").to_string();
    let mut held = Vec::new();
    for _ in 0..20 {
        let mut s = tokio::net::TcpStream::connect(&addr).await.unwrap();
        s.write_all(b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n").await.unwrap();
        let mut buf = [0u8; 512];
        assert!(s.read(&mut buf).await.unwrap() > 0, "served while under the cap");
        held.push(s); // kept open (keep-alive)
    }
    // The 21st is closed at once, with no answer.
    let mut extra = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let _ = extra.write_all(b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n").await;
    let mut buf = [0u8; 512];
    let read =
        tokio::time::timeout(Duration::from_secs(5), extra.read(&mut buf)).await.expect("closed, not left hanging");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    // Once some close, others are served again.
    held.truncate(10);
    let served = eventually("a slot to free up", WAIT, async || {
        reqwest::get(format!("{}/health", host.url)).await.ok().filter(|r| r.status() == 200)
    })
    .await;
    assert_eq!(served.status(), 200);
}

#[tokio::test]
async fn a_request_whose_body_trickles_in_is_cut_off() {
    let dir = tempfile::tempdir().unwrap();
    let host = crm_host(dir.path(), &[("HTTP_REQUEST_TIMEOUT_MS", "2000")]).await;
    let addr = host.url.trim_start_matches("http://").to_string();
    let stream = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let (mut reader, mut writer) = stream.into_split();
    let head = format!(
        "POST /api/v1/webhook/crm HTTP/1.1\r\nhost: x\r\nx-api-key: {API_KEY}\r\ncontent-length: 100000\r\n\r\n{{"
    );
    writer.write_all(head.as_bytes()).await.unwrap();
    let trickle = tokio::spawn(async move {
        // One byte a second: never finishes.
        while writer.write_all(b" ").await.is_ok() {
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    });
    let mut answer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(30), reader.read_to_end(&mut answer)).await;
    trickle.abort();
    assert!(read.is_ok(), "the connection was left open");
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("\"code\":\"request_timeout\""), "{answer}");
}

/// Peak resident memory of a process, in bytes.
fn peak_rss(pid: u32) -> u64 {
    support::proc_status_kb(pid, "VmHWM").unwrap() * 1024
}

/// Every delivery pushes 300 request bodies of 1 MB at a host it may not
/// reach: 300 MB per call if the host kept what it was handed.
#[tokio::test]
async fn a_plugin_pushing_large_denied_bodies_leaves_host_memory_flat() {
    let dir = tempfile::tempdir().unwrap();
    let plugins = plugins_dir(dir.path(), &["crm", "misbehave"]);
    let manifest = plugins.join("misbehave/plugin.toml");
    let text =
        std::fs::read_to_string(&manifest).unwrap().replace("time_per_call_ms = 500", "time_per_call_ms = 60000");
    std::fs::write(&manifest, text).unwrap();
    let routes = dir.path().join("routes.toml");
    std::fs::write(
        &routes,
        "[[route]]\nstatus = \"Qualified\"\nactions = [{ destination = \"misbehave\", action = \"send-loop\", \
         params = { url = \"http://example.com/\", n = \"300\", bytes = \"1000000\" } }]\n",
    )
    .unwrap();
    let host = Host::start(&[
        ("API_KEY", API_KEY.to_string()),
        ("DATA_DIR", dir.path().join("data").display().to_string()),
        ("PLUGINS_DIR", plugins.display().to_string()),
        ("ROUTES_FILE", routes.display().to_string()),
    ])
    .await;
    let deliver = async |deal: &str| {
        let (status, body) =
            post_webhook(&host.url, "/api/v1/webhook/crm", "deal_created", &payload(deal, "Qualified")).await;
        assert_eq!(status, 200, "{body}");
        let id = body["receipt_id"].as_str().unwrap().to_string();
        let r = eventually("the loop to finish", WAIT, async || {
            let r = get_json(&host.url, &format!("/api/v1/receipts/{id}")).await;
            (r["actions"][0]["state"] == "delivered").then_some(r)
        })
        .await;
        let detail = r["actions"][0]["detail"].as_str().unwrap().to_string();
        assert!(detail.starts_with("sent 0, denied 300, failed 0"), "{detail}");
    };
    deliver("M-warm").await;
    let before = peak_rss(host.pid());
    for i in 0..3 {
        deliver(&format!("M-{i}")).await;
    }
    let grown = peak_rss(host.pid()).saturating_sub(before);
    assert!(grown < 64 << 20, "peak memory grew by {} MiB", grown >> 20);
}
