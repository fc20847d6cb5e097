//! Shared pieces of the end-to-end and sandbox suites: local stand-ins for
//! Meta and Brevo that answer as their public docs say, a handle on the real
//! binary, and polling helpers. Included with `#[path]` by each suite.

#![allow(dead_code)]

pub mod flows;

use std::collections::{HashMap, HashSet, VecDeque};
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use serde_json::{Value, json};
use tokio::sync::Notify;

/// The repository's root.
pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("host/ has a parent").to_path_buf()
}

/// The environment plugins see, from these variables and optional
/// `PLUGIN_GRANTS`, as the service builds it.
pub fn plugin_env(vars: &[(&str, &str)], grants: Option<&str>) -> crm_event_handler::plugins::grants::PluginEnv {
    use crm_event_handler::plugins::grants::{Grants, PluginEnv};
    let env: crm_event_handler::config::Environment =
        vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect::<HashMap<_, _>>().into();
    let grants = grants.map(|g| Grants::with_overrides(g).unwrap()).unwrap_or_default();
    PluginEnv::new(&env, grants)
}

/// A plugins directory holding copies of the named plugin folders (from
/// `plugins/` or `tests/plugins/`), so a test can change manifests freely.
pub fn plugins_dir(into: &Path, names: &[&str]) -> PathBuf {
    let dir = into.join("plugins");
    for name in names {
        let from = [repo().join("plugins").join(name), repo().join("tests/plugins").join(name)]
            .into_iter()
            .find(|p| p.join("plugin.toml").is_file())
            .unwrap_or_else(|| panic!("no plugin folder named {name}"));
        let to = dir.join(name);
        std::fs::create_dir_all(&to).unwrap();
        for file in ["plugin.toml", &format!("{name}.wasm")] {
            std::fs::copy(from.join(file), to.join(file)).unwrap_or_else(|e| panic!("copy {name}/{file}: {e}"));
        }
    }
    dir
}

/// Poll `check` until it returns Some, or panic after `timeout` with `what`.
pub async fn eventually<T>(what: &str, timeout: Duration, mut check: impl AsyncFnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = check().await {
            return v;
        }
        if start.elapsed() > timeout {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// A scripted answer.
#[derive(Clone, Debug)]
pub struct Scripted {
    pub status: u16,
    pub body: Value,
    pub headers: Vec<(String, String)>,
}

impl Scripted {
    pub fn new(status: u16, body: Value) -> Scripted {
        Scripted { status, body, headers: vec![] }
    }
}

/// One request a stand-in received.
#[derive(Clone, Debug)]
pub struct Received {
    /// When it arrived.
    pub at: Instant,
    pub path: String,
    pub headers: HashMap<String, String>,
    pub body: Value,
}

#[derive(Default)]
struct StandInState {
    received: Vec<Received>,
    script: VecDeque<Scripted>,
    /// Hold the next N requests unanswered until released.
    hold: usize,
    /// Brevo's idempotency keys already used.
    keys: HashSet<String>,
}

/// A local stand-in for Meta's Conversions API or Brevo's e-mail API.
#[derive(Clone)]
pub struct StandIn {
    pub url: String,
    state: Arc<Mutex<StandInState>>,
    release: Arc<Notify>,
    kind: Kind,
}

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Meta,
    Brevo,
}

impl StandIn {
    /// Meta: `POST /{version}/{pixel}/events` → 200 `{events_received, fbtrace_id}`.
    pub async fn meta() -> StandIn {
        StandIn::start(Kind::Meta).await
    }

    /// Brevo: `POST /v3/smtp/email` → 201 `{messageId}`; a reused
    /// `headers.idempotencyKey` → 400 `duplicate_parameter`.
    pub async fn brevo() -> StandIn {
        StandIn::start(Kind::Brevo).await
    }

    async fn start(kind: Kind) -> StandIn {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr: SocketAddr = listener.local_addr().unwrap();
        let stand_in =
            StandIn { url: format!("http://{addr}"), state: Arc::default(), release: Arc::new(Notify::new()), kind };
        let router = Router::new().fallback(post(answer)).with_state(stand_in.clone());
        tokio::spawn(async move {
            let _ = axum::serve(listener, router).await;
        });
        stand_in
    }

    /// Answer the next requests with these, in order, before the defaults.
    pub fn script(&self, answers: impl IntoIterator<Item = Scripted>) {
        self.state.lock().unwrap().script.extend(answers);
    }

    /// Leave the next `n` requests hanging until `release`.
    pub fn hold(&self, n: usize) {
        self.state.lock().unwrap().hold = n;
    }

    pub fn release(&self) {
        self.release.notify_waiters();
    }

    pub fn received(&self) -> Vec<Received> {
        self.state.lock().unwrap().received.clone()
    }

    /// Meta: the server events received (across requests).
    pub fn events(&self) -> Vec<Value> {
        self.received().into_iter().flat_map(|r| r.body["data"].as_array().cloned().unwrap_or_default()).collect()
    }

    /// Meta: distinct (event_name, event_id) pairs, as Meta deduplicates.
    pub fn unique_events(&self) -> Vec<(String, String)> {
        let mut seen: Vec<(String, String)> = Vec::new();
        for e in self.events() {
            let k =
                (e["event_name"].as_str().unwrap_or("").to_string(), e["event_id"].as_str().unwrap_or("").to_string());
            if !seen.contains(&k) {
                seen.push(k);
            }
        }
        seen
    }

    /// The e-mails received that are the host's operator alerts.
    pub fn operator_alerts(&self) -> Vec<Value> {
        self.received().into_iter().map(|r| r.body).filter(|b| b["tags"] == json!(["operator-alert"])).collect()
    }

    /// Brevo: e-mails actually sent (first use of each idempotency key).
    pub fn sent_emails(&self) -> usize {
        self.state.lock().unwrap().keys.len()
    }
}

async fn answer(State(s): State<StandIn>, uri: axum::http::Uri, headers: HeaderMap, body: Bytes) -> Response {
    let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let held = {
        let mut st = s.state.lock().unwrap();
        st.received.push(Received {
            at: Instant::now(),
            path: uri.path().to_string(),
            headers: headers.iter().map(|(n, v)| (n.to_string(), v.to_str().unwrap_or("").to_string())).collect(),
            body: body.clone(),
        });
        let held = st.hold > 0;
        st.hold = st.hold.saturating_sub(1);
        held
    };
    if held {
        s.release.notified().await;
    }
    let scripted = s.state.lock().unwrap().script.pop_front();
    if let Some(a) = scripted {
        let mut r = (StatusCode::from_u16(a.status).unwrap(), axum::Json(a.body)).into_response();
        for (n, v) in a.headers {
            r.headers_mut().insert(axum::http::HeaderName::from_bytes(n.as_bytes()).unwrap(), v.parse().unwrap());
        }
        return r;
    }
    match s.kind {
        Kind::Meta => {
            let n = body["data"].as_array().map(Vec::len).unwrap_or(0);
            (StatusCode::OK, axum::Json(json!({ "events_received": n, "fbtrace_id": "AbCdEf" }))).into_response()
        }
        Kind::Brevo => {
            let key = body["headers"]["idempotencyKey"].as_str().unwrap_or("").to_string();
            let fresh = s.state.lock().unwrap().keys.insert(key.clone());
            if fresh {
                (StatusCode::CREATED, axum::Json(json!({ "messageId": format!("<{key}@smtp-relay.mailin.fr>") })))
                    .into_response()
            } else {
                let err = json!({ "code": "duplicate_parameter", "message": "idempotencyKey already used" });
                (StatusCode::BAD_REQUEST, axum::Json(err)).into_response()
            }
        }
    }
}

/// The real `crm-event-handler` binary, serving on a free port.
pub struct Host {
    child: Child,
    pub url: String,
    pub logs: Arc<Mutex<Vec<String>>>,
}

impl Host {
    /// Start `serve` with these variables (PORT=0, HOST=127.0.0.1 and JSON
    /// logs are added) and wait until it listens.
    pub async fn start(vars: &[(&str, String)]) -> Host {
        // `option_env!`: this module is shared with the benchmark example,
        // which has no binary to start.
        #[allow(clippy::option_env_unwrap)]
        let binary = option_env!("CARGO_BIN_EXE_crm-event-handler").expect("only integration tests start the binary");
        let mut cmd = Command::new(binary);
        cmd.arg("serve")
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("PORT", "0")
            .env("HOST", "127.0.0.1")
            .env("LOG_FORMAT", "json")
            .env("LOG", "info")
            .current_dir(std::env::temp_dir())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (k, v) in vars {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("start crm-event-handler");
        let stderr = child.stderr.take().unwrap();
        let logs = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let sink = logs.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Ok(v) = serde_json::from_str::<Value>(&line)
                    && v["message"] == "crm-event-handler listening"
                {
                    let _ = tx.send(v["addr"].as_str().unwrap_or("").to_string());
                }
                sink.lock().unwrap().push(line);
            }
        });
        let addr = tokio::task::spawn_blocking(move || rx.recv_timeout(Duration::from_secs(120)))
            .await
            .unwrap()
            .unwrap_or_else(|_| {
                panic!("the host did not start listening; its log:\n{}", logs.lock().unwrap().join("\n"))
            });
        Host { child, url: format!("http://{addr}"), logs }
    }

    /// Kill the process at once (SIGKILL), as a crash would.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Ask the process to stop (SIGTERM), as an orchestrator does.
    pub fn terminate(&self) {
        let sent = Command::new("kill").args(["-TERM", &self.pid().to_string()]).status().unwrap();
        assert!(sent.success(), "kill -TERM failed");
    }

    /// The process's exit code, once it has exited (None if it has not
    /// within `within`).
    pub async fn exit_code(&mut self, within: Duration) -> Option<i32> {
        let give_up = std::time::Instant::now() + within;
        while std::time::Instant::now() < give_up {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code();
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        None
    }

    pub fn log_text(&self) -> String {
        self.logs.lock().unwrap().join("\n")
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub const API_KEY: &str = "test-key-123";

/// The variables of a host on `data` and `plugins`, with credentials for
/// and URLs of the Meta and Brevo stand-ins, and fast retries.
pub fn host_vars(data: &Path, plugins: &Path, meta: &StandIn, brevo: &StandIn) -> Vec<(&'static str, String)> {
    vec![
        ("API_KEY", API_KEY.to_string()),
        ("DATA_DIR", data.display().to_string()),
        ("PLUGINS_DIR", plugins.display().to_string()),
        ("META_ACCESS_TOKEN", "meta-token".to_string()),
        ("META_PIXEL_ID", "1234567890".to_string()),
        ("META_GRAPH_URL", meta.url.clone()),
        ("BREVO_API_KEY", "xkeysib-test".to_string()),
        ("BREVO_SENDER_EMAIL", "deals@example.com".to_string()),
        ("BREVO_API_URL", brevo.url.clone()),
        ("RETRY_BASE_DELAY_MS", "50".to_string()),
        // Only the plugins a test puts in PLUGINS_DIR (the bundled ones have
        // a test of their own).
        ("BUNDLED_PLUGINS", "none".to_string()),
    ]
}

/// POST a webhook; returns (status, JSON body).
pub async fn post_webhook(base: &str, path: &str, event: &str, body: &str) -> (u16, Value) {
    let r = reqwest::Client::new()
        .post(format!("{base}{path}"))
        .header("content-type", "application/json")
        .header("x-api-key", API_KEY)
        .header("x-event", event)
        .body(body.to_string())
        .send()
        .await
        .expect("post webhook");
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

/// GET an operator endpoint with the API key.
pub async fn get_json(base: &str, path: &str) -> Value {
    reqwest::Client::new()
        .get(format!("{base}{path}"))
        .header("x-api-key", API_KEY)
        .send()
        .await
        .expect("get")
        .json()
        .await
        .expect("json")
}

/// POST JSON to an operator endpoint with the API key; the answer's JSON.
pub async fn post_json(base: &str, path: &str, body: &Value) -> Value {
    reqwest::Client::new()
        .post(format!("{base}{path}"))
        .header("x-api-key", API_KEY)
        .json(body)
        .send()
        .await
        .expect("post")
        .json()
        .await
        .expect("json")
}

/// The demo payload with a given deal id and status.
pub fn payload(deal: &str, status: &str) -> String {
    std::fs::read_to_string(repo().join("examples/payloads/qualified.json"))
        .unwrap()
        .replace("D-927483-XYZ", deal)
        .replace("\"status\": \"Qualified\"", &format!("\"status\": \"{status}\""))
}

/// A minimal event for calling a destination plugin directly.
pub fn test_event() -> crm_event_handler::event::Event {
    crm_event_handler::event::Event {
        event_type: "deal_updated".into(),
        reference: "D-1".into(),
        status: "Qualified".into(),
        ..Default::default()
    }
}

/// Call a destination plugin for `action` with `params` on `test_event()`;
/// its outcome and the requests it made.
pub async fn run_action(
    plugin: &crm_event_handler::plugins::LoadedPlugin,
    action: &str,
    params: &[(&str, &str)],
) -> (
    Result<crm_event_handler::plugins::Outcome, crm_event_handler::plugins::PluginError>,
    Vec<crm_event_handler::plugins::world::RecordedRequest>,
) {
    let params: Vec<(String, String)> = params.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    let event = test_event();
    plugin
        .deliver(crm_event_handler::plugins::DeliveryRequest {
            event: &event,
            action,
            params: &params,
            receipt_id: "r",
            provider: "crm",
            attempt: 1,
            idempotency_key: "k",
        })
        .await
}

/// A webhook request carrying `body`, as the host hands it to a source plugin.
pub fn webhook_request(body: &str) -> crm_event_handler::plugins::IncomingRequest {
    crm_event_handler::plugins::IncomingRequest {
        method: "POST".into(),
        url: "http://localhost:3000/api/v1/webhook/crm".into(),
        headers: vec![("content-type".into(), "application/json".into())],
        body: body.as_bytes().to_vec(),
        received_at_ms: 0,
    }
}

/// A free TCP port on 127.0.0.1 (bound and released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn wait_for_port(port: u16, what: &str, log: &Path) {
    let start = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if start.elapsed() > Duration::from_secs(30) {
            panic!(
                "{what} did not start on port {port}; its log:\n{}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A throwaway server process (redis-server or the MongoDB stand-in) on a
/// free port, restartable on the same port with the same data.
pub struct Server {
    child: Option<Child>,
    program: PathBuf,
    args: Vec<String>,
    pub port: u16,
    pub uri: String,
    what: &'static str,
    dir: tempfile::TempDir,
}

impl Server {
    /// `redis-server` (installed on these machines), no persistence.
    pub fn redis() -> Server {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let args = ["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir"]
            .iter()
            .map(|s| s.to_string())
            .chain([dir.path().display().to_string(), "--logfile".into(), dir.path().join("log").display().to_string()])
            .collect();
        Server::launch("redis-server".into(), args, port, format!("redis://127.0.0.1:{port}"), "redis-server", dir)
    }

    /// The MongoDB wire-protocol stand-in `nx-27017` (installed into a venv
    /// by scripts/test.sh, which exports NX_27017), on a file database so it
    /// keeps its data across a restart.
    pub fn mongo(db: &str) -> Server {
        let program = std::env::var_os("NX_27017").map(PathBuf::from).unwrap_or_else(|| {
            panic!("NX_27017 is not set: run the suite with ./scripts/test.sh, which installs the MongoDB stand-in")
        });
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let args = vec![
            "--db".into(),
            dir.path().join("nx.db").display().to_string(),
            "--host".into(),
            "127.0.0.1".into(),
            "-p".into(),
            port.to_string(),
            "--pid-file".into(),
            dir.path().join("pid").display().to_string(),
            "--log-file".into(),
            dir.path().join("log").display().to_string(),
        ];
        Server::launch(program, args, port, format!("mongodb://127.0.0.1:{port}/{db}"), "nx-27017", dir)
    }

    fn launch(
        program: PathBuf,
        args: Vec<String>,
        port: u16,
        uri: String,
        what: &'static str,
        dir: tempfile::TempDir,
    ) -> Server {
        let mut s = Server { child: None, program, args, port, uri, what, dir };
        s.start();
        s
    }

    /// Start (again, after `stop`).
    pub fn start(&mut self) {
        let child = Command::new(&self.program)
            .args(&self.args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", self.what));
        self.child = Some(child);
        wait_for_port(self.port, self.what, &self.dir.path().join("log"));
    }

    /// Stop it hard, as an outage would.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A figure of `/proc/<pid>/status` in kB (`VmRSS`, `VmHWM`, …).
pub fn proc_status_kb(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))?;
    line.trim().trim_end_matches("kB").trim().parse().ok()
}
