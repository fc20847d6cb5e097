//! The wasmtime engine and everything about running one plugin call: the
//! pooling allocator, epoch-based time limits, memory caps, and turning traps
//! into errors that say which limit was hit.
//!
//! Every call gets a fresh instance (about 60–100 µs with the pooling
//! allocator), so no state leaks between events and a trapped instance is
//! simply dropped.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime};

use sha2::{Digest, Sha256};
use wasmtime::component::Component;
use wasmtime::{Engine, InstanceAllocationStrategy, PoolingAllocationConfig, Store, Trap, UpdateDeadline};

use super::allow::AllowList;
use super::manifest::{Kind, MAX_MEMORY_MB, Manifest, ManifestError, ResolvedConfig};
use super::world::{
    self, CONTRACT_PACKAGE, CONTRACT_VERSION, DestinationPre, HttpMode, PluginContext, PluginState, RecordedRequest,
    SourcePre, wit,
};
use crate::config::Environment;
use crate::event::Event;

/// How often the epoch advances; time limits are enforced to this grain.
const EPOCH_TICK: Duration = Duration::from_millis(10);
/// Concurrent plugin instances the pool holds.
const POOL_INSTANCES: u32 = 1000;

/// Why a plugin could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    #[error("{path}: cannot read component: {error}")]
    ReadComponent { path: PathBuf, error: std::io::Error },
    #[error("{path}: not a valid WebAssembly component: {message}")]
    Compile { path: PathBuf, message: String },
    #[error("{path}: {message}")]
    Contract { path: PathBuf, message: String },
    #[error("{path}: {message}")]
    Config { path: PathBuf, message: String },
}

/// Why a call into a plugin failed (as opposed to the plugin reporting a
/// failed delivery). All are worth retrying: the job's attempt cap decides.
#[derive(Debug, Clone, thiserror::Error)]
pub enum PluginError {
    #[error("plugin {plugin} exceeded its time limit of {limit_ms} ms and was interrupted")]
    TimeLimit { plugin: String, limit_ms: u64 },
    #[error("plugin {plugin} exceeded its memory limit of {limit_mb} MiB")]
    MemoryLimit { plugin: String, limit_mb: u64 },
    #[error("plugin {plugin} trapped: {message}")]
    Trap { plugin: String, message: String },
    #[error("plugin {plugin} could not be started: {message}")]
    Instantiate { plugin: String, message: String },
    #[error("plugin {plugin} is a {actual} plugin, not a {expected}")]
    WrongKind { plugin: String, expected: Kind, actual: Kind },
}

/// A source plugin's verdict on a webhook.
#[derive(Debug, Clone, PartialEq)]
pub enum ParseFailure {
    Malformed(String),
    MissingField(String),
    InvalidField { field: String, expected: String },
}

impl ParseFailure {
    /// The stable error code the API answers with.
    pub fn code(&self) -> &'static str {
        match self {
            ParseFailure::Malformed(_) => "malformed_body",
            ParseFailure::MissingField(_) => "missing_field",
            ParseFailure::InvalidField { .. } => "invalid_field",
        }
    }

    /// The field at fault, if the failure names one.
    pub fn field(&self) -> Option<&str> {
        match self {
            ParseFailure::Malformed(_) => None,
            ParseFailure::MissingField(f) | ParseFailure::InvalidField { field: f, .. } => Some(f),
        }
    }
}

impl std::fmt::Display for ParseFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ParseFailure::Malformed(detail) => f.write_str(detail),
            ParseFailure::MissingField(field) => write!(f, "required field {field} is missing"),
            ParseFailure::InvalidField { field, expected } => write!(f, "field {field} must be {expected}"),
        }
    }
}

/// A destination plugin's report on one attempt.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Delivered { status: Option<u16>, detail: String },
    Retryable { status: Option<u16>, reason: String, retry_after: Option<Duration> },
    Permanent { status: Option<u16>, reason: String },
}

/// The action a route asks a destination for, with the attempt's facts.
#[derive(Debug, Clone)]
pub struct DeliveryRequest<'a> {
    pub event: &'a Event,
    pub action: &'a str,
    pub params: &'a [(String, String)],
    pub receipt_id: &'a str,
    pub provider: &'a str,
    pub attempt: u32,
    pub idempotency_key: &'a str,
}

/// The shared engine, its linkers and the epoch ticker.
pub struct PluginEngine {
    engine: Engine,
    source_linker: wasmtime::component::Linker<PluginState>,
    destination_linker: wasmtime::component::Linker<PluginState>,
    http: reqwest::Client,
    ticker: Arc<EpochTicker>,
    cache: Option<CompileCache>,
}

/// The wasmtime this host is built with (pinned in Cargo.toml); part of the
/// compile cache key.
const WASMTIME_VERSION: &str = "48.0.8";

/// Compiled components on disk, so a restart does not recompile.
///
/// Layout of the cache folder: `<key>.cwasm` (the serialized component) and
/// `<key>.sha256` (hex SHA-256 of that file). The key hashes the component's
/// bytes, the wasmtime version and the engine's compatibility hash (its
/// settings and target), so a changed component or engine never matches a
/// stale entry. An entry is used only if its checksum matches; anything else
/// is rebuilt and overwritten.
struct CompileCache {
    dir: PathBuf,
    engine_key: String,
}

/// Advances the engine's epoch while anything that runs plugins is alive:
/// the engine and every plugin it loaded hold it. Without it a runaway
/// plugin would never be interrupted.
struct EpochTicker {
    stop: Arc<AtomicBool>,
}

impl Drop for EpochTicker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

impl PluginEngine {
    /// Build the engine (pooling allocator, epoch interruption) and start the
    /// epoch ticker.
    pub fn new(cache_dir: Option<PathBuf>) -> anyhow::Result<PluginEngine> {
        let mut pool = PoolingAllocationConfig::new();
        pool.total_component_instances(POOL_INSTANCES)
            .total_core_instances(POOL_INSTANCES * 8)
            .total_memories(POOL_INSTANCES * 2)
            .total_tables(POOL_INSTANCES * 4)
            .total_stacks(POOL_INSTANCES)
            .max_memories_per_component(8)
            .max_tables_per_component(16)
            .max_core_instances_per_component(64)
            .max_memory_size((MAX_MEMORY_MB as usize) << 20);
        let mut config = wasmtime::Config::new();
        config
            .wasm_component_model(true)
            .epoch_interruption(true)
            .allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
        let engine = Engine::new(&config).map_err(|e| anyhow::anyhow!("cannot create the plugin engine: {e}"))?;
        let source_linker = world::source_linker(&engine).map_err(|e| anyhow::anyhow!("{e}"))?;
        let destination_linker = world::destination_linker(&engine).map_err(|e| anyhow::anyhow!("{e}"))?;
        let http = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(Duration::from_secs(5))
            .user_agent(concat!("crm-event-handler/", env!("CARGO_PKG_VERSION")))
            .build()?;

        let stop = Arc::new(AtomicBool::new(false));
        let ticker = Arc::new(EpochTicker { stop: stop.clone() });
        let ticking = engine.clone();
        std::thread::Builder::new().name("wasm-epoch".into()).spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                std::thread::sleep(EPOCH_TICK);
                ticking.increment_epoch();
            }
        })?;
        let cache = match cache_dir {
            Some(dir) => {
                std::fs::create_dir_all(&dir)
                    .map_err(|e| anyhow::anyhow!("cannot create the plugin cache {}: {e}", dir.display()))?;
                let mut h = std::collections::hash_map::DefaultHasher::new();
                std::hash::Hash::hash(&engine.precompile_compatibility_hash(), &mut h);
                let engine_key = format!("{WASMTIME_VERSION}-{:016x}", std::hash::Hasher::finish(&h));
                Some(CompileCache { dir, engine_key })
            }
            None => None,
        };
        Ok(PluginEngine { engine, source_linker, destination_linker, http, ticker, cache })
    }

    /// Compile a component, through the on-disk cache when there is one.
    fn compile(&self, bytes: &[u8], digest: &str, path: &Path) -> Result<Component, LoadError> {
        let compile = || {
            Component::new(&self.engine, bytes)
                .map_err(|e| LoadError::Compile { path: path.to_path_buf(), message: format!("{e:#}") })
        };
        let Some(cache) = &self.cache else { return compile() };
        let key = hex(&Sha256::digest(format!("{}:{digest}", cache.engine_key)));
        let artifact_path = cache.dir.join(format!("{key}.cwasm"));
        let sum_path = cache.dir.join(format!("{key}.sha256"));
        if let (Ok(artifact), Ok(sum)) = (std::fs::read(&artifact_path), std::fs::read_to_string(&sum_path)) {
            if hex(&Sha256::digest(&artifact)) == sum.trim() {
                // SAFETY: these bytes are exactly what `Component::serialize`
                // wrote for this component on an engine with the same
                // compatibility hash (both are in the key), as the checksum
                // we stored alongside proves; wasmtime also re-checks the
                // header against this engine.
                match unsafe { Component::deserialize(&self.engine, &artifact) } {
                    Ok(c) => return Ok(c),
                    Err(e) => {
                        tracing::warn!(path = %artifact_path.display(), error = %e, "unusable compile cache entry; rebuilding")
                    }
                }
            } else {
                tracing::warn!(path = %artifact_path.display(), "corrupt compile cache entry; rebuilding");
            }
        }
        let component = compile()?;
        match component.serialize() {
            Ok(artifact) => {
                let write = |p: &Path, data: &[u8]| -> std::io::Result<()> {
                    // Per-process temporary name: hosts may share the folder.
                    let tmp = p.with_extension(format!("tmp{}", std::process::id()));
                    std::fs::write(&tmp, data)?;
                    std::fs::rename(&tmp, p)
                };
                let written = write(&artifact_path, &artifact)
                    .and_then(|()| write(&sum_path, hex(&Sha256::digest(&artifact)).as_bytes()));
                if let Err(e) = written {
                    tracing::warn!(dir = %cache.dir.display(), error = %e, "could not write the compile cache");
                }
            }
            Err(e) => tracing::warn!(error = %e, "could not serialize a compiled component"),
        }
        Ok(component)
    }

    /// Load, compile and validate the plugin in `dir` against its world.
    /// Nothing is registered: the caller swaps it in only if this succeeds.
    pub fn load(&self, dir: &Path, env: &Environment, http: Option<HttpMode>) -> Result<LoadedPlugin, LoadError> {
        let manifest = Manifest::load(dir)?;
        let path = dir.join(&manifest.component);
        let bytes = std::fs::read(&path).map_err(|error| LoadError::ReadComponent { path: path.clone(), error })?;
        let digest = hex(&Sha256::digest(&bytes));
        let component = self.compile(&bytes, &digest, &path)?;
        check_contract_version(&self.engine, &component)
            .map_err(|message| LoadError::Contract { path: path.clone(), message })?;

        let config = manifest.resolve_config(env);
        let allow = manifest
            .allow_list(&config)
            .map_err(|e| LoadError::Config { path: dir.join("plugin.toml"), message: e.to_string() })?;
        let contract = |e: wasmtime::Error| LoadError::Contract {
            path: path.clone(),
            message: format!(
                "does not match the {} world of {CONTRACT_PACKAGE}@{CONTRACT_VERSION}: {e:#}",
                manifest.kind
            ),
        };
        let compiled = match manifest.kind {
            Kind::Source => {
                let pre = self.source_linker.instantiate_pre(&component).map_err(contract)?;
                Compiled::Source(SourcePre::new(pre).map_err(contract)?)
            }
            Kind::Destination => {
                let pre = self.destination_linker.instantiate_pre(&component).map_err(contract)?;
                Compiled::Destination(DestinationPre::new(pre).map_err(contract)?)
            }
        };
        let context = Arc::new(PluginContext {
            name: manifest.name.clone(),
            config: config.clone(),
            declared_keys: manifest.config.keys().cloned().collect(),
            allow: allow.clone(),
            http: http.unwrap_or_else(|| HttpMode::Live(self.http.clone())),
            max_response_bytes: world::MAX_RESPONSE_BYTES,
        });
        Ok(LoadedPlugin {
            dir: dir.to_path_buf(),
            manifest,
            config,
            allow,
            digest,
            loaded_at: SystemTime::now(),
            engine: self.engine.clone(),
            _ticker: self.ticker.clone(),
            compiled,
            context,
        })
    }
}

/// The component's imports must all be of the contract version we implement;
/// say so plainly rather than let the linker report a missing import.
fn check_contract_version(engine: &Engine, component: &Component) -> Result<(), String> {
    let ty = component.component_type();
    for (name, _) in ty.imports(engine) {
        if let Some(rest) = name.strip_prefix(&format!("{CONTRACT_PACKAGE}/")) {
            let version = rest.split_once('@').map(|(_, v)| v).unwrap_or("(none)");
            if version != CONTRACT_VERSION {
                return Err(format!(
                    "the plugin targets {CONTRACT_PACKAGE} contract version {version}; this host supports {CONTRACT_VERSION}"
                ));
            }
        }
    }
    Ok(())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// How a call failed before the plugin could answer.
enum CallError {
    Start(PluginError),
    Trap(wasmtime::Error),
}

enum Compiled {
    Source(SourcePre<PluginState>),
    Destination(DestinationPre<PluginState>),
}

/// A compiled, validated plugin, ready to be called any number of times.
pub struct LoadedPlugin {
    pub dir: PathBuf,
    pub manifest: Manifest,
    pub config: ResolvedConfig,
    pub allow: AllowList,
    /// SHA-256 of the component file.
    pub digest: String,
    pub loaded_at: SystemTime,
    engine: Engine,
    _ticker: Arc<EpochTicker>,
    compiled: Compiled,
    context: Arc<PluginContext>,
}

impl LoadedPlugin {
    pub fn name(&self) -> &str {
        &self.manifest.name
    }

    /// A fresh store for one call, with this plugin's limits armed.
    fn store(&self) -> (Store<PluginState>, Duration) {
        let limits = self.manifest.limits;
        let time = Duration::from_millis(limits.time_per_call_ms);
        let state = PluginState::new(self.context.clone(), (limits.memory_mb as usize) << 20, time);
        let deadline = state.deadline;
        let mut store = Store::new(&self.engine, state);
        store.limiter(|s| &mut s.limiter);
        store.set_epoch_deadline(1);
        // Each tick: over time → interrupt (a trap); otherwise yield to the
        // executor so a busy plugin cannot starve other tasks.
        store.epoch_deadline_callback(move |_| {
            Ok(if Instant::now() >= deadline { UpdateDeadline::Interrupt } else { UpdateDeadline::Yield(1) })
        });
        (store, time)
    }

    /// Name the limit a failed call hit, if any.
    fn classify(&self, store: &Store<PluginState>, err: wasmtime::Error) -> PluginError {
        let plugin = self.name().to_string();
        let limits = self.manifest.limits;
        if store.data().limiter.exceeded {
            return PluginError::MemoryLimit { plugin, limit_mb: limits.memory_mb };
        }
        if err.downcast_ref::<Trap>() == Some(&Trap::Interrupt) {
            return PluginError::TimeLimit { plugin, limit_ms: limits.time_per_call_ms };
        }
        PluginError::Trap { plugin, message: format!("{err:#}") }
    }

    /// Run the source plugin on one webhook.
    pub async fn parse(
        &self,
        headers: &[(String, String)],
        body: &[u8],
    ) -> Result<Result<Event, ParseFailure>, PluginError> {
        let Compiled::Source(pre) = &self.compiled else {
            return Err(self.wrong_kind(Kind::Source));
        };
        let (mut store, time) = self.store();
        let headers: Vec<wit::Header> =
            headers.iter().map(|(n, v)| wit::Header { name: n.clone(), value: v.clone() }).collect();
        let plugin = self.name().to_string();
        let run = async {
            let instance = pre.instantiate_async(&mut store).await.map_err(|e| {
                CallError::Start(PluginError::Instantiate { plugin: plugin.clone(), message: format!("{e:#}") })
            })?;
            instance.call_parse(&mut store, &headers, body).await.map_err(CallError::Trap)
        };
        let finished = tokio::time::timeout(time + EPOCH_TICK * 5, run).await;
        let result = match finished {
            Err(_) => return Err(self.time_limit()),
            Ok(Err(CallError::Start(e))) => return Err(e),
            Ok(Err(CallError::Trap(trap))) => return Err(self.classify(&store, trap)),
            Ok(Ok(r)) => r,
        };
        Ok(result.map(Event::from).map_err(|e| match e {
            wit::ParseError::Malformed(m) => ParseFailure::Malformed(m),
            wit::ParseError::MissingField(f) => ParseFailure::MissingField(f),
            wit::ParseError::InvalidField(f) => ParseFailure::InvalidField { field: f.field, expected: f.expected },
        }))
    }

    /// Time `n` parses on one live instance. For benchmarks only: the service
    /// always takes a fresh instance per call, so no state leaks between
    /// webhooks.
    pub async fn time_warm_parse(
        &self,
        headers: &[(String, String)],
        body: &[u8],
        n: u32,
    ) -> Result<Duration, PluginError> {
        let Compiled::Source(pre) = &self.compiled else {
            return Err(self.wrong_kind(Kind::Source));
        };
        let (mut store, _) = self.store();
        let headers: Vec<wit::Header> =
            headers.iter().map(|(n, v)| wit::Header { name: n.clone(), value: v.clone() }).collect();
        let instance = pre
            .instantiate_async(&mut store)
            .await
            .map_err(|e| PluginError::Instantiate { plugin: self.name().to_string(), message: format!("{e:#}") })?;
        let started = Instant::now();
        for _ in 0..n {
            let parsed = instance.call_parse(&mut store, &headers, body).await;
            if let Err(trap) = parsed {
                return Err(self.classify(&store, trap));
            }
        }
        Ok(started.elapsed())
    }

    /// Run the destination plugin for one delivery attempt; also returns the
    /// requests it made.
    pub async fn deliver(&self, req: DeliveryRequest<'_>) -> (Result<Outcome, PluginError>, Vec<RecordedRequest>) {
        let Compiled::Destination(pre) = &self.compiled else {
            return (Err(self.wrong_kind(Kind::Destination)), Vec::new());
        };
        let (mut store, time) = self.store();
        let event = wit::CrmEvent::from(req.event);
        let action = wit::Action { name: req.action.to_string(), params: req.params.to_vec() };
        let context = wit::DeliveryContext {
            receipt_id: req.receipt_id.to_string(),
            provider: req.provider.to_string(),
            attempt: req.attempt,
            idempotency_key: req.idempotency_key.to_string(),
        };
        let plugin = self.name().to_string();
        let run = async {
            let instance = pre.instantiate_async(&mut store).await.map_err(|e| {
                CallError::Start(PluginError::Instantiate { plugin: plugin.clone(), message: format!("{e:#}") })
            })?;
            instance.call_deliver(&mut store, &event, &action, &context).await.map_err(CallError::Trap)
        };
        let finished = tokio::time::timeout(time + EPOCH_TICK * 5, run).await;
        let result = match finished {
            Err(_) => Err(self.time_limit()),
            Ok(Err(CallError::Start(e))) => Err(e),
            Ok(Err(CallError::Trap(trap))) => Err(self.classify(&store, trap)),
            // Outcome text is stored and logged: no secret goes with it.
            Ok(Ok(outcome)) => Ok(match outcome {
                wit::Outcome::Delivered(d) => {
                    Outcome::Delivered { status: d.status, detail: self.outcome_text(&d.detail) }
                }
                wit::Outcome::Retryable(r) => Outcome::Retryable {
                    status: r.status,
                    reason: self.outcome_text(&r.reason),
                    retry_after: r.retry_after_ms.map(Duration::from_millis),
                },
                wit::Outcome::Permanent(f) => {
                    Outcome::Permanent { status: f.status, reason: self.outcome_text(&f.reason) }
                }
            }),
        };
        let requests = std::mem::take(&mut store.data_mut().requests);
        (result, requests)
    }

    /// Outcome text as stored on receipts and logged: secrets redacted,
    /// at most 2 KiB.
    fn outcome_text(&self, text: &str) -> String {
        world::clip(&self.config.redact(text), 2048)
    }

    fn time_limit(&self) -> PluginError {
        PluginError::TimeLimit { plugin: self.name().to_string(), limit_ms: self.manifest.limits.time_per_call_ms }
    }

    fn wrong_kind(&self, expected: Kind) -> PluginError {
        PluginError::WrongKind { plugin: self.name().to_string(), expected, actual: self.manifest.kind }
    }
}
