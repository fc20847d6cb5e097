//! The host side of the WIT contract (`wit/plugin.wit`): generated bindings
//! for both worlds, the per-call store state, and the host imports plugins
//! may use: `http.send` (allow-listed), `config.get` (declared keys only) and
//! `log.log`. WASI is linked with nothing granted: no environment, no
//! preopened directories, no sockets, no name lookups, stdio discarded.

use std::sync::Arc;
use std::time::{Duration, Instant};

use wasmtime::ResourceLimiter;
use wasmtime::component::{HasSelf, Linker, ResourceTable};
use wasmtime_wasi::{WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};

use super::allow::AllowList;
use super::manifest::{Limits, ResolvedConfig};
use super::outbound;
use crate::event;

mod source {
    wasmtime::component::bindgen!({
        path: "../wit",
        world: "source",
        imports: { default: async },
        exports: { default: async },
    });
}

mod destination {
    wasmtime::component::bindgen!({
        path: "../wit",
        world: "destination",
        imports: { default: async },
        exports: { default: async },
        with: {
            "crm:plugin/types": super::source::crm::plugin::types,
            "crm:plugin/http": super::source::crm::plugin::http,
            "crm:plugin/config": super::source::crm::plugin::config,
            "crm:plugin/log": super::source::crm::plugin::log,
        },
    });
}

pub use destination::DestinationPre;
pub use source::SourcePre;
pub use source::crm::plugin::http as wit_http;
pub use source::crm::plugin::types as wit;
use source::crm::plugin::{config as wit_config, log as wit_log};

/// The contract version this host implements (the WIT package version).
pub const CONTRACT_PACKAGE: &str = "crm:plugin";
pub const CONTRACT_VERSION: &str = "0.2.0";

/// Largest response body handed back to a plugin.
pub const MAX_RESPONSE_BYTES: u64 = 1 << 20;
/// How much of a request body a live call keeps for the attempt log; the
/// rest is dropped as soon as the request is sent.
pub const BODY_EXCERPT_BYTES: usize = 2048;
/// Bytes of an answer's body kept for the attempt log.
pub const RESPONSE_EXCERPT_BYTES: usize = 1024;
/// Headers a plugin may set on one request, and their bytes together.
const MAX_REQUEST_HEADERS: usize = 64;
const MAX_REQUEST_HEADER_BYTES: usize = 16 * 1024;

/// How a plugin's outbound HTTP is carried out.
#[derive(Clone)]
pub enum HttpMode {
    /// Really send (allow-listed), with the plugin's own clients (see
    /// `outbound`).
    Live(outbound::Clients),
    /// Record the request, whole, and answer from the call's script
    /// (`PluginState::answers`, by place; the last one answers any request
    /// after it): `plugin test`.
    Record,
    /// A shadow candidate: record the request, never send it, and answer
    /// with what the live version got for its request in the same place in
    /// the call (`PluginState::answers`).
    Shadow,
}

/// An answer given instead of sending a request: what the live version's
/// request got, for its shadow candidate, or a test's scripted answer. An
/// error is a transport failure with that reason.
pub type Answer = Result<Reply, String>;

/// A downstream's answer, as a plugin sees it.
#[derive(Debug, Clone, PartialEq, Default, serde::Deserialize)]
pub struct Reply {
    pub status: u16,
    #[serde(default)]
    pub headers: Vec<(String, String)>,
    #[serde(default)]
    pub body: Vec<u8>,
}

/// What the live version's request got, as given to a plugin that is not
/// to send its own: refused, answered, or failed in transport.
pub fn answer_like(denied: Option<&str>, status: Option<u16>, excerpt: Option<&str>, error: Option<&str>) -> Answer {
    match (denied, status) {
        (Some(why), _) => Err(format!("the live version's request here was refused: {why}")),
        (None, Some(status)) => {
            Ok(Reply { status, headers: Vec::new(), body: excerpt.unwrap_or_default().as_bytes().to_vec() })
        }
        (None, None) => Err(error.unwrap_or("no answer").to_string()),
    }
}

/// A line a plugin logged during a call (kept in `plugin test` only).
#[derive(Debug, Clone, PartialEq)]
pub struct LogLine {
    pub level: &'static str,
    pub message: String,
}

/// Per-plugin facts every call of it shares.
pub struct PluginContext {
    pub name: String,
    pub config: ResolvedConfig,
    /// Keys the manifest declares (set or not).
    pub declared_keys: Vec<String>,
    pub allow: AllowList,
    pub http: HttpMode,
    pub limits: Limits,
    pub max_response_bytes: u64,
}

/// One outbound request as a plugin made it (shown by the dry-run, kept for
/// the attempt log). A live call keeps only an excerpt of the body.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RecordedRequest {
    pub method: String,
    pub url: String,
    pub headers: Vec<(String, String)>,
    pub body: String,
    /// The body's whole size, and its SHA-256 (hex): what shadow mode
    /// compares, beyond the excerpt.
    pub body_bytes: usize,
    #[serde(skip)]
    pub body_sha256: String,
    /// Why the host refused it, if it did.
    pub denied: Option<String>,
    /// The answer's status and the start of its body (live calls).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub response_status: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub response_excerpt: Option<String>,
    /// Why no answer came (timeout, connection refused, too large).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Memory cap for one call, across all of the component's memories;
/// remembers whether it was hit so the host can report "memory limit"
/// rather than a bare trap.
pub struct MemoryLimiter {
    max_bytes: usize,
    /// Bytes of linear memory granted so far in this store.
    used: usize,
    pub exceeded: bool,
}

impl ResourceLimiter for MemoryLimiter {
    fn memory_growing(&mut self, current: usize, desired: usize, _maximum: Option<usize>) -> wasmtime::Result<bool> {
        let total = self.used.saturating_sub(current).saturating_add(desired);
        if total > self.max_bytes {
            self.exceeded = true;
            return Ok(false);
        }
        self.used = total;
        Ok(true)
    }

    fn table_growing(&mut self, _current: usize, desired: usize, _maximum: Option<usize>) -> wasmtime::Result<bool> {
        Ok(desired <= 100_000)
    }
}

/// The data of one call's store.
pub struct PluginState {
    /// Built when the plugin first uses WASI (clocks, random): most calls
    /// never do, and building one costs more than a plugin's own parse.
    wasi: Option<WasiCtx>,
    table: ResourceTable,
    pub limiter: MemoryLimiter,
    pub plugin: Arc<PluginContext>,
    /// When this call's time is up (host HTTP included).
    pub deadline: Instant,
    /// At most `limits.max_requests_per_call` of them.
    pub requests: Vec<RecordedRequest>,
    /// Shadow mode and `plugin test`: the answer for each request, by its
    /// place in the call.
    pub answers: Vec<Answer>,
    /// `plugin test`: the lines the plugin logged.
    pub logs: Vec<LogLine>,
    /// `plugin test`: the last answer answers any request after it.
    pub repeat_last_answer: bool,
    /// Keep a digest of each request's whole body (for a shadow comparison).
    pub digest_bodies: bool,
    /// `http.send` calls so far, and their body bytes.
    sent: u32,
    sent_bytes: u64,
    /// Log lines this call may still write.
    log_budget: u32,
}

/// Log lines one call may write; a plugin logging in a loop cannot flood the
/// host's log.
const LOG_LINES_PER_CALL: u32 = 100;

/// Shorten plugin-supplied text for logs and receipts, on a char boundary.
pub fn clip(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_string();
    }
    let cut = (0..=max).rev().find(|i| text.is_char_boundary(*i)).unwrap_or(0);
    format!("{}…", &text[..cut])
}

/// The start of a body as text, at most `max` bytes (`…` when cut).
/// SHA-256 of `bytes`, hex.
pub fn digest(bytes: &[u8]) -> String {
    crate::plugins::engine::hex(&<sha2::Sha256 as sha2::Digest>::digest(bytes))
}

pub fn excerpt(body: &[u8], max: usize) -> String {
    // A few bytes more, so a character cut at the edge is not mangled.
    clip(&String::from_utf8_lossy(&body[..body.len().min(max + 4)]), max)
}

impl PluginState {
    pub fn new(plugin: Arc<PluginContext>, memory_bytes: usize, time: Duration) -> Self {
        PluginState {
            wasi: None,
            table: ResourceTable::new(),
            limiter: MemoryLimiter { max_bytes: memory_bytes, used: 0, exceeded: false },
            log_budget: LOG_LINES_PER_CALL,
            plugin,
            deadline: Instant::now() + time,
            requests: Vec::new(),
            answers: Vec::new(),
            logs: Vec::new(),
            repeat_last_answer: false,
            digest_bodies: false,
            sent: 0,
            sent_bytes: 0,
        }
    }

    /// Spend one unit of the log budget; false when it is used up.
    fn may_log(&mut self) -> bool {
        let ok = self.log_budget > 0;
        self.log_budget = self.log_budget.saturating_sub(1);
        ok
    }
}

impl WasiView for PluginState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        let ctx = self.wasi.get_or_insert_with(|| {
            WasiCtxBuilder::new()
                .allow_tcp(false)
                .allow_udp(false)
                .allow_ip_name_lookup(false)
                .socket_addr_check(|_, _| Box::pin(async { false }))
                .build()
        });
        WasiCtxView { ctx, table: &mut self.table }
    }
}

/// The linker for every plugin: WASI (nothing granted) + http + config +
/// log. Both worlds import the same interfaces; a component that imports
/// anything else does not link.
pub fn linker(engine: &wasmtime::Engine) -> wasmtime::Result<Linker<PluginState>> {
    let mut linker = Linker::new(engine);
    wasmtime_wasi::p2::add_to_linker_async(&mut linker)?;
    source::Source::add_to_linker::<PluginState, HasSelf<PluginState>>(&mut linker, |s| s)?;
    Ok(linker)
}

impl wit::Host for PluginState {}

impl wit_config::Host for PluginState {
    async fn get(&mut self, key: String) -> Option<String> {
        let value = self.plugin.config.values.get(&key).cloned();
        if !self.plugin.declared_keys.contains(&key) && self.may_log() {
            let key = clip(&key, 100);
            tracing::warn!(plugin = %self.plugin.name, %key, "plugin asked for a config key its manifest does not declare");
        }
        value
    }
}

impl wit_log::Host for PluginState {
    async fn log(&mut self, level: wit_log::Level, message: String) {
        // The last line of the budget says the budget is spent.
        if self.log_budget == 1 {
            self.log_budget = 0;
            let plugin = self.plugin.name.as_str();
            tracing::warn!(
                plugin,
                "plugin log limit reached: {LOG_LINES_PER_CALL} lines per call; the rest are dropped"
            );
        }
        if !self.may_log() {
            return;
        }
        let plugin = self.plugin.name.as_str();
        // Clip before redacting (a huge message costs nothing), with room for
        // a secret cut at the edge to be redacted whole.
        let message = clip(&self.plugin.config.redact(&clip(&message, 8192)), 2048);
        if matches!(self.plugin.http, HttpMode::Record) {
            let level = match level {
                wit_log::Level::Debug => "debug",
                wit_log::Level::Info => "info",
                wit_log::Level::Warn => "warn",
                wit_log::Level::Error => "error",
            };
            self.logs.push(LogLine { level, message: message.clone() });
        }
        match level {
            wit_log::Level::Debug => tracing::debug!(plugin, "{message}"),
            wit_log::Level::Info => tracing::info!(plugin, "{message}"),
            wit_log::Level::Warn => tracing::warn!(plugin, "{message}"),
            wit_log::Level::Error => tracing::error!(plugin, "{message}"),
        }
    }
}

impl wit_http::Host for PluginState {
    async fn send(&mut self, request: wit_http::Request) -> Result<wit_http::Response, wit_http::HttpError> {
        use wit_http::HttpError;
        let plugin = self.plugin.clone();
        let limits = plugin.limits;
        // Caps first: a plugin looping on send (denied or not) costs the
        // host a counter, not memory.
        self.sent = self.sent.saturating_add(1);
        if self.sent > limits.max_requests_per_call {
            return Err(HttpError::Denied(format!(
                "plugin {} made more than {} requests in one call (limits.max_requests_per_call)",
                plugin.name, limits.max_requests_per_call
            )));
        }
        let body_bytes = request.body.len();
        self.sent_bytes = self.sent_bytes.saturating_add(body_bytes as u64);
        if self.sent_bytes > limits.max_request_bytes_per_call {
            return Err(HttpError::Denied(format!(
                "plugin {} sent more than {} request body bytes in one call (limits.max_request_bytes_per_call)",
                plugin.name, limits.max_request_bytes_per_call
            )));
        }
        let headers =
            outbound::forwardable_headers(&request.headers.into_iter().map(|h| (h.name, h.value)).collect::<Vec<_>>());
        let header_bytes: usize = headers.iter().map(|(n, v)| n.len() + v.len()).sum();
        if headers.len() > MAX_REQUEST_HEADERS || header_bytes > MAX_REQUEST_HEADER_BYTES {
            return Err(HttpError::InvalidRequest(format!(
                "at most {MAX_REQUEST_HEADERS} headers and {MAX_REQUEST_HEADER_BYTES} bytes of them per request"
            )));
        }
        let excerpted = matches!(plugin.http, HttpMode::Live(_) | HttpMode::Shadow);
        let body_text = if excerpted {
            excerpt(&request.body, BODY_EXCERPT_BYTES)
        } else {
            String::from_utf8_lossy(&request.body).into_owned()
        };
        let mut record = RecordedRequest {
            method: clip(&request.method, 32),
            url: clip(&request.url, 2048),
            headers: headers.clone(),
            body: body_text,
            body_bytes,
            body_sha256: if self.digest_bodies { digest(&request.body) } else { String::new() },
            denied: None,
            response_status: None,
            response_excerpt: None,
            error: None,
        };
        let url = match url::Url::parse(&request.url) {
            Ok(u) => u,
            Err(e) => return Err(HttpError::InvalidRequest(format!("bad URL {:?}: {e}", record.url))),
        };
        let route = if plugin.allow.allows(&url) {
            outbound::route(&url, &plugin.allow)
        } else {
            let origin = url.origin().ascii_serialization();
            Err(format!("{origin} is not in allowed_outbound_hosts of plugin {}", plugin.name))
        };
        let route = match route {
            Ok(route) => route,
            Err(why) => {
                if self.may_log() {
                    tracing::warn!(plugin = %plugin.name, origin = %url.origin().ascii_serialization(), reason = %why, "outbound request denied");
                }
                record.denied = Some(why.clone());
                self.requests.push(record);
                return Err(HttpError::Denied(why));
            }
        };
        let Ok(method) = reqwest::Method::from_bytes(request.method.as_bytes()) else {
            return Err(HttpError::InvalidRequest(format!("bad method {:?}", record.method)));
        };
        self.requests.push(record);

        let client = match &plugin.http {
            HttpMode::Live(clients) => clients.get(route),
            // Paired by place, as a shadow comparison pairs them.
            HttpMode::Record | HttpMode::Shadow => {
                let place = self.requests.len() - 1;
                let last = if self.repeat_last_answer { self.answers.last() } else { None };
                return match self.answers.get(place).or(last).cloned() {
                    Some(Ok(reply)) => {
                        if let Some(record) = self.requests.last_mut() {
                            record.response_status = Some(reply.status);
                        }
                        Ok(wit_http::Response {
                            status: reply.status,
                            headers: reply
                                .headers
                                .into_iter()
                                .map(|(name, value)| wit::Header { name, value })
                                .collect(),
                            body: reply.body,
                        })
                    }
                    Some(Err(error)) => Err(wit_http::HttpError::Transport(error)),
                    None => Err(wit_http::HttpError::Transport(
                        "no answer for this request: the live version made no request here".into(),
                    )),
                };
            }
        };
        let answer = self.exchange(client, method, url, headers, request.body, plugin.max_response_bytes).await;
        // For the attempt log: what came back, in short.
        if let Some(record) = self.requests.last_mut() {
            match &answer {
                Ok(response) => {
                    record.response_status = Some(response.status);
                    record.response_excerpt = Some(excerpt(&response.body, RESPONSE_EXCERPT_BYTES));
                }
                Err(e) => record.error = Some(clip(&e.to_string(), RESPONSE_EXCERPT_BYTES)),
            }
        }
        answer
    }
}

impl PluginState {
    /// Send one allowed request and read its answer, within the call's
    /// deadline and the response size limit.
    async fn exchange(
        &mut self,
        client: &reqwest::Client,
        method: reqwest::Method,
        url: url::Url,
        headers: Vec<(String, String)>,
        body: Vec<u8>,
        limit: u64,
    ) -> Result<wit_http::Response, wit_http::HttpError> {
        use wit_http::HttpError;
        // Leave the plugin a tenth of what is left (at most 500 ms) to turn a
        // timeout into its own outcome before the call's deadline.
        let left = self.deadline.saturating_duration_since(Instant::now());
        let remaining = left.saturating_sub((left / 10).min(Duration::from_millis(500)));
        if remaining.is_zero() {
            return Err(HttpError::Timeout);
        }
        let mut builder = client.request(method, url).timeout(remaining).body(body);
        for (name, value) in &headers {
            builder = builder.header(name.as_str(), value.as_str());
        }
        let mut response = match builder.send().await {
            Ok(r) => r,
            Err(e) if e.is_timeout() => return Err(HttpError::Timeout),
            Err(e) if e.is_builder() => return Err(HttpError::InvalidRequest(error_chain(&e))),
            Err(e) => return Err(HttpError::Transport(error_chain(&e))),
        };
        let status = response.status().as_u16();
        let headers = response
            .headers()
            .iter()
            .filter_map(|(n, v)| {
                Some(wit::Header { name: n.as_str().to_string(), value: v.to_str().ok()?.to_string() })
            })
            .collect();
        if response.content_length().is_some_and(|n| n > limit) {
            return Err(HttpError::ResponseTooLarge(limit));
        }
        let mut body = Vec::new();
        loop {
            match response.chunk().await {
                Ok(Some(chunk)) => {
                    if body.len() as u64 + chunk.len() as u64 > limit {
                        return Err(HttpError::ResponseTooLarge(limit));
                    }
                    body.extend_from_slice(&chunk);
                }
                Ok(None) => break,
                Err(e) if e.is_timeout() => return Err(HttpError::Timeout),
                Err(e) => return Err(HttpError::Transport(error_chain(&e))),
            }
        }
        Ok(wit_http::Response { status, headers, body })
    }
}

/// An error with its causes, on one line (reqwest's top-level message alone
/// says little).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

impl From<wit::CrmEvent> for event::Event {
    fn from(e: wit::CrmEvent) -> Self {
        let c = e.customer;
        let d = e.deal;
        event::Event {
            event_type: e.event_type,
            reference: e.reference,
            status: e.status,
            customer: event::Customer {
                contact_id: c.contact_id,
                first_name: c.first_name,
                last_name: c.last_name,
                email: c.email,
                phone: c.phone,
                city: c.city,
                state: c.state,
                zip_code: c.zip_code,
                country: c.country,
            },
            deal: event::Deal { name: d.name, value: d.value, currency: d.currency, closing_date: d.closing_date },
            property: e.property.map(|p| event::Property {
                id: p.id,
                address: p.address,
                city: p.city,
                state: p.state,
                zip_code: p.zip_code,
                property_type: p.property_type,
                square_footage: p.square_footage,
            }),
            occurred_at: e.occurred_at,
            lead_id: e.lead_id,
            received_at: e.received_at,
        }
    }
}

impl From<&event::Event> for wit::CrmEvent {
    fn from(e: &event::Event) -> Self {
        let c = e.customer.clone();
        let d = e.deal.clone();
        wit::CrmEvent {
            event_type: e.event_type.clone(),
            reference: e.reference.clone(),
            status: e.status.clone(),
            customer: wit::Customer {
                contact_id: c.contact_id,
                first_name: c.first_name,
                last_name: c.last_name,
                email: c.email,
                phone: c.phone,
                city: c.city,
                state: c.state,
                zip_code: c.zip_code,
                country: c.country,
            },
            deal: wit::Deal { name: d.name, value: d.value, currency: d.currency, closing_date: d.closing_date },
            property: e.property.clone().map(|p| wit::Property {
                id: p.id,
                address: p.address,
                city: p.city,
                state: p.state,
                zip_code: p.zip_code,
                property_type: p.property_type,
                square_footage: p.square_footage,
            }),
            occurred_at: e.occurred_at,
            lead_id: e.lead_id.clone(),
            received_at: e.received_at,
        }
    }
}
