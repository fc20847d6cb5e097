//! A destination plugin that misbehaves on request, for the sandbox and
//! trust-boundary tests: written as an attacker would, to take more than it
//! was granted. The action name picks the behaviour; each one probes one
//! limit.

// The generated export glue takes a parameter per flattened field.
#![allow(clippy::too_many_arguments)]

wit_bindgen::generate!({ world: "destination", path: "../../../wit" });

use crm::plugin::config;
use crm::plugin::http::{self, HttpError, Request};
use crm::plugin::types::{Delivered, Failure, Header};

struct Misbehave;

fn delivered(detail: String) -> Outcome {
    Outcome::Delivered(Delivered { status: None, detail })
}

fn failed(reason: String) -> Outcome {
    Outcome::Permanent(Failure { status: None, reason })
}

fn param<'a>(action: &'a Action, key: &str) -> &'a str {
    action.params.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str()).unwrap_or("")
}

/// Send a GET and describe what came back.
fn fetch(url: &str) -> Outcome {
    let request = Request { method: "GET".into(), url: url.into(), headers: vec![], body: vec![] };
    match http::send(&request) {
        Ok(r) => delivered(format!("status {} with {} bytes", r.status, r.body.len())),
        Err(HttpError::Denied(why)) => failed(format!("denied: {why}")),
        Err(HttpError::ResponseTooLarge(n)) => failed(format!("too large: {n}")),
        Err(e) => failed(format!("error: {e:?}")),
    }
}

/// Send `n` requests of `bytes` body bytes to `url`, whatever happens, and
/// count how they went.
fn send_loop(action: &Action) -> Outcome {
    let n: u32 = param(action, "n").parse().unwrap_or(1);
    let bytes: usize = param(action, "bytes").parse().unwrap_or(0);
    let body = vec![b'x'; bytes];
    let (mut ok, mut denied, mut other) = (0, 0, 0);
    let mut last_denial = String::new();
    for _ in 0..n {
        let request =
            Request { method: "POST".into(), url: param(action, "url").into(), headers: vec![], body: body.clone() };
        match http::send(&request) {
            Ok(_) => ok += 1,
            Err(HttpError::Denied(why)) => {
                denied += 1;
                last_denial = why;
            }
            Err(_) => other += 1,
        }
    }
    delivered(format!("sent {ok}, denied {denied}, failed {other}; last denial: {last_denial}"))
}

impl Guest for Misbehave {
    fn deliver(_event: CrmEvent, action: Action, _context: DeliveryContext) -> Outcome {
        match action.name.as_str() {
            "ok" => delivered("fine".into()),
            "loop" => {
                let mut n: u64 = 0;
                loop {
                    n = std::hint::black_box(n.wrapping_add(1));
                }
            }
            "spin-ms" => {
                // Busy for roughly the given wall time, then succeed.
                let ms: u64 = param(&action, "ms").parse().unwrap_or(10);
                let start = std::time::Instant::now();
                while start.elapsed().as_millis() < u128::from(ms) {
                    std::hint::black_box(());
                }
                delivered(format!("spun {ms} ms"))
            }
            "allocate-mb" => {
                let mb: usize = param(&action, "mb").parse().unwrap_or(1);
                let mut chunks = Vec::new();
                for _ in 0..mb {
                    chunks.push(std::hint::black_box(vec![1u8; 1 << 20]));
                }
                delivered(format!("allocated {} MiB", chunks.len()))
            }
            "fetch" => fetch(param(&action, "url")),
            "read-env" => delivered(format!("{} variables", std::env::vars().count())),
            "read-config" => {
                // Ask for every key named, declared or not: report what came back.
                let got: Vec<String> = param(&action, "keys")
                    .split(',')
                    .map(|k| format!("{k}={}", config::get(k).unwrap_or_else(|| "<none>".into())))
                    .collect();
                delivered(got.join(";"))
            }
            "exfiltrate" => {
                // Read a setting and send it to the allowed host.
                let value = config::get(param(&action, "key")).unwrap_or_default();
                fetch(&format!("{}/{value}", param(&action, "url")))
            }
            "send-loop" => send_loop(&action),
            "many-headers" => {
                let n: usize = param(&action, "n").parse().unwrap_or(1);
                let headers = (0..n).map(|i| Header { name: format!("x-h{i}"), value: "v".repeat(100) }).collect();
                let request =
                    Request { method: "GET".into(), url: param(&action, "url").into(), headers, body: vec![] };
                match http::send(&request) {
                    Ok(r) => delivered(format!("status {}", r.status)),
                    Err(e) => failed(format!("error: {e:?}")),
                }
            }
            "smuggle" => {
                // Try to address another host and frame a second request.
                let headers = [
                    ("host", "169.254.169.254"),
                    ("content-length", "0"),
                    ("transfer-encoding", "chunked"),
                    ("connection", "close, x-hop"),
                    ("x-hop", "1"),
                    ("x-kept", "yes"),
                ];
                let request = Request {
                    method: "POST".into(),
                    url: param(&action, "url").into(),
                    headers: headers
                        .iter()
                        .map(|(n, v)| Header { name: n.to_string(), value: v.to_string() })
                        .collect(),
                    body: b"{}0\r\n\r\nGET /admin HTTP/1.1\r\n\r\n".to_vec(),
                };
                match http::send(&request) {
                    Ok(r) => delivered(format!("status {}", r.status)),
                    Err(e) => failed(format!("error: {e:?}")),
                }
            }
            "read-file" => match std::fs::read("/etc/passwd") {
                Ok(b) => failed(format!("read {} bytes", b.len())),
                Err(e) => delivered(format!("no file access: {e}")),
            },
            "open-socket" => match std::net::TcpStream::connect(param(&action, "addr")) {
                Ok(_) => failed("connected".into()),
                Err(e) => delivered(format!("no socket: {e}")),
            },
            other => failed(format!("unknown action {other}")),
        }
    }
}

export!(Misbehave);
