//! Benchmarks that print figures (no thresholds: these machines are noisy).
//!
//!     cargo run --release --example bench
//!
//! 1. Plugin call cost: the `crm` source plugin parsing the demo payload on
//!    a fresh instance per call (what the service does), and the same parse
//!    compiled natively. Median and p99 per call.
//! 2. The limit: a bare axum handler that checks the key and parses the
//!    JSON, with no storage, under the same load as the service.
//! 3. The service on the embedded default, in its own process (this
//!    program started again with `--serve`: the same start-up as
//!    `crm-event-handler serve`, logs included), under 32 connections for
//!    10 s of unique deals, half Qualified (a Meta `Lead`) and half Committed
//!    (a Meta `Purchase` and a Brevo e-mail). Prints accepts/s and the ratio
//!    to the limit, the accept latency, deliveries/s (sustained over the
//!    run, and while the backlog drains), the service's CPU per webhook,
//!    its RSS idle and under load, and, at a paced 50 webhooks/s, the time
//!    from sending a webhook to Meta receiving its event.
//! 4. The same on MongoDB + Redis, when `NX_27017` names the MongoDB
//!    wire-protocol stand-in (scripts/test.sh installs it) and `redis-server`
//!    is installed; both start on free ports. Also prints MongoDB and Redis
//!    round trips per webhook, from the service's `/metrics`. The stand-in
//!    is far slower than a real mongod: its figures bound the system from
//!    below.
//!
//! The load generator and the Meta and Brevo stand-ins run in this process:
//! plain HTTP/1.1 over keep-alive connections, cheap enough not to be the
//! bottleneck. The service's settings (`WORKERS`, say) set in the bench's
//! environment reach the service. `BENCH_SECONDS` changes the load's length; `BENCH_ONLY` set
//! to `plugin`, `embedded` or `mongo` runs one part.

#[path = "../tests/support/mod.rs"]
mod support;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crm_event_handler::plugins::grants::PluginEnv;
use crm_event_handler::plugins::{EngineOptions, PluginEngine};
use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// As in `host/src/main.rs`, so the service runs as it would.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const CALLS: usize = 20_000;
const CONNECTIONS: usize = 32;
/// The paced run: webhooks sent one at a time at this rate, so latency is
/// measured without a backlog.
const PACED: usize = 200;
const PACED_EVERY: Duration = Duration::from_millis(20);
const KEY: &str = "bench-key";
const WEBHOOK_PATH: &str = "/api/v1/webhook/crm";

fn seconds() -> Duration {
    Duration::from_secs(std::env::var("BENCH_SECONDS").ok().and_then(|s| s.parse().ok()).unwrap_or(10))
}

fn runs(part: &str) -> bool {
    std::env::var("BENCH_ONLY").map_or(true, |only| only == part)
}

fn micros(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

fn millis(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

// ---------------------------------------------------------------- plugin --

async fn plugin_call_cost() {
    let engine = PluginEngine::new(EngineOptions::default()).unwrap();
    let plugin = engine.load(&support::repo().join("plugins/crm"), &PluginEnv::default(), None).unwrap();
    let body = support::payload("D-927483-XYZ", "Qualified");
    let request = support::webhook_request(&body);
    let mut fresh = Vec::with_capacity(CALLS);
    for i in 0..CALLS + 500 {
        let start = Instant::now();
        plugin.parse(&request).await.unwrap().unwrap();
        if i >= 500 {
            fresh.push(start.elapsed());
        }
    }
    fresh.sort();
    let headers = vec![crm_plugin::crm::plugin::types::Header { name: "x-event".into(), value: "deal_updated".into() }];
    let start = Instant::now();
    for _ in 0..CALLS {
        std::hint::black_box(crm_plugin::parse_webhook(&headers, std::hint::black_box(body.as_bytes())).unwrap());
    }
    let native = start.elapsed() / CALLS as u32;
    println!("plugin call cost (crm source, demo payload, {CALLS} calls):");
    println!(
        "  fresh instance per call  median {:>6.1} µs, p99 {:>6.1} µs",
        micros(percentile(&fresh, 0.5)),
        micros(percentile(&fresh, 0.99))
    );
    println!("  native parse             mean   {:>6.1} µs", micros(native));
}

// ------------------------------------------------------------ load client --

/// What a load run saw.
#[derive(Default)]
struct LoadResult {
    ok: u64,
    failed: u64,
    elapsed: Duration,
    latencies: Vec<Duration>,
}

/// One HTTP/1.1 keep-alive connection: send a POST, read the answer.
struct Connection {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl Connection {
    async fn open(addr: SocketAddr) -> std::io::Result<Connection> {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        Ok(Connection { stream, buf: Vec::with_capacity(4096) })
    }

    /// POST `body` to `path`; the status of the answer.
    async fn post(&mut self, path: &str, body: &str) -> std::io::Result<u16> {
        let request = format!(
            "POST {path} HTTP/1.1\r\nhost: bench\r\nx-api-key: {KEY}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        );
        self.stream.write_all(request.as_bytes()).await?;
        self.buf.clear();
        let broken = || std::io::Error::other("malformed answer");
        loop {
            if let Some(end) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = std::str::from_utf8(&self.buf[..end]).map_err(|_| broken())?;
                let status: u16 = head.get(9..12).and_then(|s| s.parse().ok()).ok_or_else(broken)?;
                let length: usize = head
                    .lines()
                    .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().to_string()))
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0);
                while self.buf.len() < end + 4 + length {
                    if self.stream.read_buf(&mut self.buf).await? == 0 {
                        return Err(broken());
                    }
                }
                return Ok(status);
            }
            if self.stream.read_buf(&mut self.buf).await? == 0 {
                return Err(broken());
            }
        }
    }
}

/// `CONNECTIONS` connections posting `body(n)` (n counts up from 0) for
/// `length`, each waiting for its answer before the next request.
async fn load(addr: SocketAddr, length: Duration, body: impl Fn(u64) -> String + Send + Sync + 'static) -> LoadResult {
    let body = Arc::new(body);
    let next = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let until = start + length;
    let tasks: Vec<_> = (0..CONNECTIONS)
        .map(|_| {
            let (body, next) = (body.clone(), next.clone());
            tokio::spawn(async move {
                let mut seen = LoadResult::default();
                let Ok(mut conn) = Connection::open(addr).await else {
                    seen.failed += 1;
                    return seen;
                };
                while Instant::now() < until {
                    let payload = body(next.fetch_add(1, Ordering::Relaxed));
                    let sent = Instant::now();
                    match conn.post(WEBHOOK_PATH, &payload).await {
                        Ok(200) => {
                            seen.ok += 1;
                            seen.latencies.push(sent.elapsed());
                        }
                        Ok(_) => seen.failed += 1,
                        Err(_) => {
                            seen.failed += 1;
                            match Connection::open(addr).await {
                                Ok(c) => conn = c,
                                Err(_) => break,
                            }
                        }
                    }
                }
                seen
            })
        })
        .collect();
    let mut total = LoadResult::default();
    for task in tasks {
        let seen = task.await.unwrap();
        total.ok += seen.ok;
        total.failed += seen.failed;
        total.latencies.extend(seen.latencies);
    }
    total.elapsed = start.elapsed();
    total.latencies.sort();
    total
}

// ------------------------------------------------------------ stand-ins --

/// The Meta and Brevo stand-ins: every event or e-mail that arrived, by its
/// deal (Meta) or idempotency key (Brevo), with when it first arrived.
#[derive(Clone, Default)]
struct Arrivals {
    first: Arc<Mutex<HashMap<String, Instant>>>,
}

impl Arrivals {
    fn count(&self) -> usize {
        self.first.lock().unwrap().len()
    }

    fn at(&self, key: &str) -> Option<Instant> {
        self.first.lock().unwrap().get(key).copied()
    }
}

/// The text after `"field":"` in `body`, up to the closing quote.
fn field<'a>(body: &'a str, name: &str) -> Option<&'a str> {
    let marker = format!("\"{name}\":\"");
    let start = body.find(&marker)? + marker.len();
    Some(&body[start..start + body[start..].find('"')?])
}

async fn answer(
    arrivals: Arrivals,
    request: hyper::Request<Incoming>,
) -> Result<hyper::Response<Full<Bytes>>, hyper::Error> {
    let path = request.uri().path().to_string();
    let body = request.into_body().collect().await?.to_bytes();
    let body = String::from_utf8_lossy(&body);
    let now = Instant::now();
    let (key, status, reply) = if path.ends_with("/events") {
        (
            field(&body, "deal_id").map(|d| format!("meta/{d}/{}", field(&body, "event_name").unwrap_or(""))),
            200,
            r#"{"events_received":1,"fbtrace_id":"bench"}"#,
        )
    } else {
        (
            field(&body, "idempotencyKey").map(|k| format!("brevo/{k}")),
            201,
            r#"{"messageId":"<bench@smtp-relay.mailin.fr>"}"#,
        )
    };
    if let Some(key) = key {
        arrivals.first.lock().unwrap().entry(key).or_insert(now);
    }
    let response = hyper::Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from_static(reply.as_bytes())))
        .unwrap();
    Ok(response)
}

/// Serve the stand-ins on a free port; their base URL.
async fn stand_ins(arrivals: Arrivals) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else { continue };
            let _ = stream.set_nodelay(true);
            let arrivals = arrivals.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |r| answer(arrivals.clone(), r));
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    url
}

// ------------------------------------------------------------- processes --

/// A child process of this program: the service (`--serve`) or the bare
/// handler (`--bare`).
struct Service {
    child: Child,
    addr: SocketAddr,
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Service {
    async fn start(mode: &str, vars: &[(&str, String)], log: &std::path::Path) -> Service {
        let port = support::free_port();
        let log = std::fs::File::create(log).unwrap();
        let child = Command::new(std::env::current_exe().unwrap())
            .arg(mode)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("PORT", port.to_string())
            .env("HOST", "127.0.0.1")
            // The service's own settings given to the bench (WORKERS, say).
            .envs(crm_event_handler::config::HOST_VARS.iter().filter_map(|k| Some((k, std::env::var(k).ok()?))))
            .envs(vars.iter().map(|(k, v)| (k, v)))
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        let service = Service { child, addr: SocketAddr::from(([127, 0, 0, 1], port)) };
        let deadline = Instant::now() + Duration::from_secs(120);
        while Instant::now() < deadline {
            let ready = reqwest::get(format!("http://{}/ready", service.addr)).await;
            if ready.is_ok_and(|r| r.status().is_success()) {
                return service;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("{mode} did not become ready");
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Resident memory, in MB.
    fn rss_mb(&self) -> f64 {
        rss_of(self.pid())
    }

    /// CPU time used so far (user + system).
    fn cpu(&self) -> Duration {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid())).unwrap_or_default();
        // Fields after the command name, which is in parentheses.
        let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
        let fields: Vec<u64> = rest.split_whitespace().map(|f| f.parse().unwrap_or(0)).collect();
        let ticks = fields.get(11).copied().unwrap_or(0) + fields.get(12).copied().unwrap_or(0);
        Duration::from_secs_f64(ticks as f64 / clock_ticks())
    }

    /// A series from the service's `/metrics` (a name, or a name and its
    /// labels), summed.
    async fn metric(&self, name: &str) -> f64 {
        let text = reqwest::Client::new()
            .get(format!("http://{}/metrics", self.addr))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        text.lines()
            .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }
}

fn clock_ticks() -> f64 {
    let out = Command::new("getconf").arg("CLK_TCK").output();
    out.ok().and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok()).unwrap_or(100.0)
}

/// The bare limit: check the key, parse the JSON, answer; no storage.
async fn bare_handler(headers: axum::http::HeaderMap, body: Bytes) -> axum::response::Response {
    use axum::response::IntoResponse;
    let key_ok =
        headers.get("x-api-key").is_some_and(|k| subtle::ConstantTimeEq::ct_eq(k.as_bytes(), KEY.as_bytes()).into());
    if !key_ok {
        return axum::http::StatusCode::UNAUTHORIZED.into_response();
    }
    match serde_json::from_slice::<serde_json::Value>(&body) {
        Ok(v) => axum::Json(serde_json::json!({ "accepted": true, "reference": v["data"]["dealId"] })).into_response(),
        Err(_) => axum::http::StatusCode::BAD_REQUEST.into_response(),
    }
}

async fn serve_bare() {
    let port: u16 = std::env::var("PORT").unwrap().parse().unwrap();
    let router = axum::Router::new()
        .route("/api/v1/webhook/{provider}", axum::routing::post(bare_handler))
        .route("/ready", axum::routing::get(|| async { "ok" }));
    let listener = TcpListener::bind(("127.0.0.1", port)).await.unwrap();
    axum::serve(listener, router).await.unwrap();
}

// ------------------------------------------------------------- pipeline --

/// Unique deals, half Qualified and half Committed.
fn webhook(run: &'static str) -> impl Fn(u64) -> String + Send + Sync + 'static {
    move |n| support::payload(&format!("{run}-{n}"), if n % 2 == 0 { "Qualified" } else { "Committed" })
}

/// Deliveries the webhooks `0..n` of `webhook` make: a Lead for each
/// Qualified, a Purchase and an e-mail for each Committed.
fn deliveries_for(n: u64) -> usize {
    let committed = n / 2;
    (n - committed + 2 * committed) as usize
}

async fn bare_limit(dir: &std::path::Path) -> f64 {
    let bare = Service::start("--bare", &[], &dir.join("bare.log")).await;
    let seen = load(bare.addr, seconds(), webhook("BARE")).await;
    let rate = seen.ok as f64 / seen.elapsed.as_secs_f64();
    println!("the limit: bare axum handler (key check + JSON parse, no storage), {CONNECTIONS} connections:");
    println!(
        "  {:>8.0} requests/s, p99 {:.1} ms, service CPU {:.0} µs per request",
        rate,
        millis(percentile(&seen.latencies, 0.99)),
        micros(bare.cpu()) / seen.ok.max(1) as f64
    );
    rate
}

/// The service's settings for a run against the stand-ins at `url`.
fn service_vars(dir: &std::path::Path, url: &str, backend: &[(&'static str, String)]) -> Vec<(&'static str, String)> {
    let mut vars: Vec<(&'static str, String)> = vec![
        ("API_KEY", KEY.to_string()),
        ("DATA_DIR", dir.join("data").display().to_string()),
        ("PLUGINS_DIR", support::repo().join("plugins").display().to_string()),
        ("PLUGIN_CACHE_DIR", dir.join("cache").display().to_string()),
        ("META_ACCESS_TOKEN", "bench-token".to_string()),
        ("META_PIXEL_ID", "1234567890".to_string()),
        ("META_GRAPH_URL", url.to_string()),
        ("BREVO_API_KEY", "xkeysib-bench".to_string()),
        ("BREVO_SENDER_EMAIL", "deals@example.com".to_string()),
        ("BREVO_API_URL", url.to_string()),
        // One client address sends everything here; the limit is per address.
        ("RATE_LIMIT_MAX", "100000000".to_string()),
    ];
    vars.extend(backend.iter().cloned());
    vars
}

/// The accept path alone: the service with its workers off (the
/// `--api-only` role), so nothing competes with accepting.
async fn accepts_alone(limit: f64) {
    let dir = tempfile::tempdir().unwrap();
    let mut vars = service_vars(dir.path(), "http://127.0.0.1:9", &[]);
    vars.push(("BENCH_API_ONLY", "1".to_string()));
    let service = Service::start("--serve", &vars, &dir.path().join("service.log")).await;
    let cpu_before = service.cpu();
    let seen = load(service.addr, seconds(), webhook("ALONE")).await;
    let accepts = seen.ok as f64 / seen.elapsed.as_secs_f64();
    println!("accept path alone, embedded (workers off, {CONNECTIONS} connections, {} s):", seconds().as_secs());
    println!(
        "  accepted                 {accepts:>8.0} webhooks/s ({:.0} % of the limit), {} refused",
        accepts / limit * 100.0,
        seen.failed
    );
    println!(
        "  accept latency           p50 {:.1} ms, p99 {:.1} ms; service CPU {:.0} µs per webhook",
        millis(percentile(&seen.latencies, 0.5)),
        millis(percentile(&seen.latencies, 0.99)),
        micros(service.cpu().saturating_sub(cpu_before)) / seen.ok.max(1) as f64
    );
    // Nothing is delivered: every job accepted is still queued.
    println!("  service RSS              {:.0} MB with {} jobs queued", service.rss_mb(), deliveries_for(seen.ok));
}

async fn pipeline(label: &str, backend: &[(&'static str, String)], limit: Option<f64>) {
    let arrivals = Arrivals::default();
    let url = stand_ins(arrivals.clone()).await;
    let dir = tempfile::tempdir().unwrap();
    let vars = service_vars(dir.path(), &url, backend);
    let service = Service::start("--serve", &vars, &dir.path().join("service.log")).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let idle_rss = service.rss_mb();
    let cpu_before = service.cpu();

    // Peak RSS, sampled through the load and the drain.
    let sampling = Arc::new(AtomicBool::new(true));
    let peak = Arc::new(Mutex::new(idle_rss));
    let sampler = {
        let (sampling, peak, pid) = (sampling.clone(), peak.clone(), service.pid());
        tokio::spawn(async move {
            while sampling.load(Ordering::Relaxed) {
                let rss = rss_of(pid);
                {
                    let mut p = peak.lock().unwrap();
                    *p = p.max(rss);
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };

    let start = Instant::now();
    let seen = load(service.addr, seconds(), webhook("BENCH")).await;
    let expected = deliveries_for(seen.ok);
    let at_end = arrivals.count();
    let load_ended = Instant::now();
    let deadline = load_ended + Duration::from_secs(300);
    while arrivals.count() < expected && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let drained = Instant::now();
    let delivered = arrivals.count();
    let cpu = service.cpu().saturating_sub(cpu_before);
    sampling.store(false, Ordering::Relaxed);
    let _ = sampler.await;
    let accepts = seen.ok as f64 / seen.elapsed.as_secs_f64();

    println!(
        "pipeline, {label} ({CONNECTIONS} connections, {} s, unique deals, half Qualified, half Committed):",
        seconds().as_secs()
    );
    let ratio = limit.map(|l| format!(" ({:.0} % of the limit)", accepts / l * 100.0)).unwrap_or_default();
    println!("  accepted                 {accepts:>8.0} webhooks/s{ratio}, {} refused", seen.failed);
    println!(
        "  accept latency           p50 {:.1} ms, p99 {:.1} ms",
        millis(percentile(&seen.latencies, 0.5)),
        millis(percentile(&seen.latencies, 0.99))
    );
    println!("  delivered                {delivered} of {expected}");
    println!(
        "  deliveries, sustained    {:>8.0} /s (first accept to last delivery)",
        delivered as f64 / drained.duration_since(start).as_secs_f64()
    );
    if delivered > at_end && drained > load_ended {
        println!(
            "  backlog drain            {:>8.0} /s ({} left when the load stopped)",
            (delivered - at_end) as f64 / drained.duration_since(load_ended).as_secs_f64(),
            expected.saturating_sub(at_end)
        );
    }
    println!(
        "  service CPU              {:>8.0} µs per webhook accepted and delivered",
        micros(cpu) / seen.ok.max(1) as f64
    );
    println!("  service RSS              {idle_rss:.0} MB idle, {:.0} MB peak under load", *peak.lock().unwrap());
    for (backend, what) in [("mongodb", "MongoDB"), ("redis", "Redis")] {
        let trips = service.metric(&format!("crm_backend_round_trips_total{{backend=\"{backend}\"}}")).await;
        if trips > 0.0 {
            println!(
                "  {what} round trips{:>w$}{:.2} per webhook",
                "",
                trips / seen.ok.max(1) as f64,
                w = 12 - what.len()
            );
        }
    }

    // Paced: one webhook every 20 ms, so the figure is the pipeline's own
    // latency rather than time spent behind a burst.
    let mut conn = Connection::open(service.addr).await.unwrap();
    let mut paced = Vec::new();
    for n in 0..PACED {
        let deal = format!("PACED-{n}");
        let body = support::payload(&deal, "Qualified");
        // From the moment the CRM sends: the event often reaches Meta
        // before the 200 reaches the CRM.
        let sent = Instant::now();
        assert_eq!(conn.post(WEBHOOK_PATH, &body).await.unwrap(), 200);
        paced.push((format!("meta/{deal}/Lead"), sent));
        tokio::time::sleep(PACED_EVERY).await;
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while paced.iter().any(|(k, _)| arrivals.at(k).is_none()) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut latencies: Vec<Duration> =
        paced.iter().filter_map(|(k, sent)| arrivals.at(k).map(|got| got.saturating_duration_since(*sent))).collect();
    latencies.sort();
    println!(
        "  paced, 50 webhooks/s     sending → Meta p50 {:.1} ms, p90 {:.1} ms, p99 {:.1} ms",
        millis(percentile(&latencies, 0.5)),
        millis(percentile(&latencies, 0.9)),
        millis(percentile(&latencies, 0.99))
    );
}

/// Resident memory of a process, in MB.
fn rss_of(pid: u32) -> f64 {
    support::proc_status_kb(pid, "VmRSS").unwrap_or(0) as f64 / 1024.0
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    match std::env::args().nth(1).as_deref() {
        Some("--serve") => {
            // BENCH_API_ONLY: the `--api-only` role.
            let workers = std::env::var_os("BENCH_API_ONLY").is_none();
            if let Err(e) = runtime.block_on(crm_event_handler::run(crm_event_handler::Role { api: true, workers })) {
                eprintln!("error: {e:#}");
                std::process::exit(1);
            }
        }
        Some("--bare") => runtime.block_on(serve_bare()),
        _ => runtime.block_on(bench()),
    }
}

async fn bench() {
    if runs("plugin") {
        plugin_call_cost().await;
    }
    let dir = tempfile::tempdir().unwrap();
    let limit = if runs("embedded") || runs("mongo") { Some(bare_limit(dir.path()).await) } else { None };
    if runs("embedded") {
        accepts_alone(limit.unwrap_or(f64::NAN)).await;
        pipeline("embedded store + queue", &[], limit).await;
    }
    if runs("mongo") {
        let redis_installed = Command::new("redis-server").arg("--version").output().is_ok();
        if std::env::var_os("NX_27017").is_some() && redis_installed {
            let redis = support::Server::redis();
            let mongo = support::Server::mongo("bench");
            let backend = [("DB_URI", mongo.uri.clone()), ("REDIS_URI", redis.uri.clone())];
            pipeline("MongoDB (nx-27017 stand-in) + Redis", &backend, limit).await;
        } else {
            println!("(set NX_27017 and install redis-server to benchmark MongoDB + Redis too)");
        }
    }
}
