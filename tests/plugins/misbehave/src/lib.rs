//! A destination plugin that misbehaves on request, for the sandbox tests.
//! The action name picks the behaviour; each one probes one limit.

wit_bindgen::generate!({ world: "destination", path: "../../../wit" });

use crm::plugin::http::{self, HttpError, Request};
use crm::plugin::types::{Delivered, Failure};

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
