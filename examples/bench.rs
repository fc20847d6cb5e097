//! Benchmarks that print figures (no thresholds: these machines are noisy).
//!
//!     cargo run --release --example bench
//!
//! 1. Plugin call cost: the `crm` source plugin parsing the demo payload on
//!    a fresh instance per call (what the service does), on a warm instance,
//!    and the same parse compiled natively.
//! 2. Webhooks accepted per second on the embedded default (unique deals,
//!    concurrent clients, each routed to a Meta `Lead`).
//! 3. Time from the 200 answer to the Meta stand-in receiving the event:
//!    median and p99.
//! 4. The same pipeline on MongoDB + Redis, when `NX_27017` names the
//!    MongoDB wire-protocol stand-in (scripts/test.sh installs it) and
//!    `redis-server` is installed: both are started on free ports. Also
//!    reports MongoDB round trips per accepted webhook. The stand-in is far
//!    slower than a real mongod: its figures bound the system from below.

#[path = "../tests/support/mod.rs"]
mod support;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::routing::post;
use crm_event_handler::config::Config;
use crm_event_handler::plugins::grants::PluginEnv;
use crm_event_handler::plugins::{EngineOptions, PluginEngine};
use crm_event_handler::{App, serve};
use serde_json::Value;

const CALLS: u32 = 2_000;
const WEBHOOKS: usize = 2_000;
const CLIENTS: usize = 32;
/// The paced run: webhooks sent one at a time at this rate, so latency is
/// measured without a backlog.
const PACED: usize = 200;
const PACED_EVERY: Duration = Duration::from_millis(20);

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

fn demo() -> Vec<u8> {
    std::fs::read(repo().join("examples/payloads/qualified.json")).unwrap()
}

fn per_call(total: Duration, n: u32) -> String {
    format!("{:>8.2} µs/call", total.as_secs_f64() * 1e6 / f64::from(n))
}

async fn plugin_call_cost() {
    let engine = PluginEngine::new(EngineOptions::default()).unwrap();
    let plugin = engine.load(&repo().join("plugins/crm"), &PluginEnv::default(), None).unwrap();
    let body = demo();
    let mut request = support::webhook_request(&String::from_utf8_lossy(&body));
    request.headers.push(("x-event".to_string(), "deal_updated".to_string()));
    for _ in 0..100 {
        plugin.parse(&request).await.unwrap().unwrap();
    }
    let start = Instant::now();
    for _ in 0..CALLS {
        plugin.parse(&request).await.unwrap().unwrap();
    }
    let fresh = start.elapsed();
    let warm = plugin.time_warm_parse(&request, CALLS).await.unwrap();
    let wit_headers =
        vec![crm_plugin::crm::plugin::types::Header { name: "x-event".into(), value: "deal_updated".into() }];
    let start = Instant::now();
    for _ in 0..CALLS {
        std::hint::black_box(crm_plugin::parse_webhook(&wit_headers, std::hint::black_box(&body)).unwrap());
    }
    let native = start.elapsed();
    println!("plugin call cost (crm source, demo payload, {CALLS} calls):");
    println!("  fresh instance per call  {}", per_call(fresh, CALLS));
    println!("  warm instance            {}", per_call(warm, CALLS));
    println!("  native parse             {}", per_call(native, CALLS));
}

/// Meta stand-in recording when each deal's event arrived.
#[derive(Clone, Default)]
struct Arrivals(Arc<Mutex<HashMap<String, Instant>>>);

async fn meta(State(a): State<Arrivals>, body: Bytes) -> axum::Json<Value> {
    let now = Instant::now();
    let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    if let Some(deal) = v["data"][0]["custom_data"]["deal_id"].as_str() {
        a.0.lock().unwrap().entry(deal.to_string()).or_insert(now);
    }
    axum::Json(serde_json::json!({ "events_received": 1, "fbtrace_id": "bench" }))
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

async fn pipeline(label: &str, backend: &[(&str, String)]) {
    let arrivals = Arrivals::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let meta_url = format!("http://{}", listener.local_addr().unwrap());
    let router = axum::Router::new().route("/{v}/{p}/events", post(meta)).with_state(arrivals.clone());
    tokio::spawn(async move { axum::serve(listener, router).await });

    let dir = tempfile::tempdir().unwrap();
    let vars: HashMap<String, String> = vec![
        ("API_KEY", "bench".to_string()),
        ("DATA_DIR", dir.path().display().to_string()),
        ("PLUGINS_DIR", repo().join("plugins").display().to_string()),
        ("META_ACCESS_TOKEN", "t".to_string()),
        ("META_PIXEL_ID", "1".to_string()),
        ("META_GRAPH_URL", meta_url),
    ]
    .into_iter()
    .chain(backend.iter().cloned())
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let app = App::build(Config::from_vars(vars).unwrap()).await.unwrap();
    let store = app.store.clone();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}/api/v1/webhook/crm", listener.local_addr().unwrap());
    let (_stop, stopped) = tokio::sync::watch::channel(false);
    tokio::spawn(serve(app, listener, stopped));

    let template = String::from_utf8(demo()).unwrap();
    let client = reqwest::Client::new();
    let accepted: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let start = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..CLIENTS {
        let (client, base, template, accepted) = (client.clone(), base.clone(), template.clone(), accepted.clone());
        tasks.push(tokio::spawn(async move {
            for i in (c..WEBHOOKS).step_by(CLIENTS) {
                let deal = format!("BENCH-{i}");
                let body = template.replace("D-927483-XYZ", &deal);
                let r = client.post(&base).header("x-api-key", "bench").body(body).send().await.unwrap();
                assert_eq!(r.status(), 200);
                accepted.lock().unwrap().insert(deal, Instant::now());
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let elapsed = start.elapsed();
    let deadline = Instant::now() + Duration::from_secs(120);
    while arrivals.0.lock().unwrap().len() < WEBHOOKS && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let arrived = arrivals.0.lock().unwrap().clone();
    let accepted = accepted.lock().unwrap().clone();
    let mut latencies: Vec<Duration> = accepted
        .iter()
        .filter_map(|(deal, at)| arrived.get(deal).map(|got| got.saturating_duration_since(*at)))
        .collect();
    latencies.sort();
    println!("pipeline, {label} ({WEBHOOKS} unique deals, {CLIENTS} concurrent clients):");
    println!("  accepted                 {:>8.0} webhooks/s", WEBHOOKS as f64 / elapsed.as_secs_f64());
    println!("  delivered to Meta        {} of {WEBHOOKS}", latencies.len());
    if !latencies.is_empty() {
        println!("  accept → Meta, median    {:>8.1} ms", percentile(&latencies, 0.5).as_secs_f64() * 1e3);
        println!("  accept → Meta, p99       {:>8.1} ms", percentile(&latencies, 0.99).as_secs_f64() * 1e3);
    }
    let trips = store.round_trips();
    if trips > 0 {
        println!(
            "  MongoDB round trips      {:>8.2} per webhook (accept + delivery record)",
            trips as f64 / WEBHOOKS as f64
        );
    }

    // Paced: one webhook every 20 ms, so the figure is the pipeline's own
    // latency rather than time spent behind a burst.
    let mut paced = Vec::new();
    for i in 0..PACED {
        let deal = format!("PACED-{i}");
        let body = template.replace("D-927483-XYZ", &deal);
        // Measured from the moment the CRM sends: the event often reaches
        // Meta before the 200 reaches the CRM.
        let at = Instant::now();
        let r = client.post(&base).header("x-api-key", "bench").body(body).send().await.unwrap();
        assert_eq!(r.status(), 200);
        tokio::time::sleep(PACED_EVERY).await;
        paced.push((deal, at));
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while paced.iter().any(|(d, _)| !arrivals.0.lock().unwrap().contains_key(d)) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let arrived = arrivals.0.lock().unwrap().clone();
    let mut latencies: Vec<Duration> =
        paced.iter().filter_map(|(d, at)| arrived.get(d).map(|got| got.saturating_duration_since(*at))).collect();
    latencies.sort();
    if !latencies.is_empty() {
        println!(
            "  paced, 50 webhooks/s:    median {:.1} ms, p99 {:.1} ms from sending to Meta",
            percentile(&latencies, 0.5).as_secs_f64() * 1e3,
            percentile(&latencies, 0.99).as_secs_f64() * 1e3
        );
    }
}

#[tokio::main]
async fn main() {
    plugin_call_cost().await;
    pipeline("embedded store + queue", &[]).await;
    let redis_installed = std::process::Command::new("redis-server").arg("--version").output().is_ok();
    if std::env::var_os("NX_27017").is_some() && redis_installed {
        let redis = support::Server::redis();
        let mongo = support::Server::mongo("bench");
        let backend = [("DB_URI", mongo.uri.clone()), ("REDIS_URI", redis.uri.clone())];
        pipeline("MongoDB (nx-27017 stand-in) + Redis", &backend).await;
    } else {
        println!("(set NX_27017 and install redis-server to benchmark MongoDB + Redis too)");
    }
}
