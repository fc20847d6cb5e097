//! The wasmtime engine and everything about running one plugin call: the
//! pooling allocator, epoch-based time limits, memory caps, and turning traps
//! into errors that say which limit was hit.
//!
//! Every call gets a fresh instance (a crm parse takes about 20 µs in all,
//! with the pooling allocator), so no state leaks between events and a
//! trapped instance is simply dropped. The pool is split in two shares,
//! parses and deliveries, so a burst of webhooks cannot take the instances
//! the workers need.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime};

use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};
use tokio::sync::Semaphore;
use wasmtime::component::Component;
use wasmtime::{Engine, InstanceAllocationStrategy, PoolingAllocationConfig, Store, Trap, UpdateDeadline};

use super::allow::AllowList;
use super::grants::PluginEnv;
use super::manifest::{Kind, MAX_MEMORY_MB, Manifest, ManifestError, ResolvedConfig};
use super::outbound;
use super::world::{
    self, Answer, CONTRACT_PACKAGE, CONTRACT_VERSION, DestinationPre, HttpMode, LogLine, PluginContext, PluginState,
    RecordedRequest, SourcePre, wit,
};
use crate::event::Event;

/// Whether a delivery call is compared in shadow mode, and on which side,
/// or answered from a test's script.
#[derive(Debug, Clone, PartialEq)]
pub enum Compared {
    No,
    /// The live call a candidate is compared with.
    Live,
    /// The candidate's call, with the live call's answers by place.
    Shadow(Vec<Answer>),
    /// `plugin test`: a plugin loaded with `HttpMode::Record`, answered
    /// from these by place (the last answers any request after it).
    Scripted(Vec<Answer>),
    /// `plugin test --receipt`: the same, answered as the live version's
    /// requests were, by place only.
    Replayed(Vec<Answer>),
}

/// What a call did besides its result: the requests it made and, in
/// `plugin test`, the lines it logged.
#[derive(Debug, Default)]
pub struct Trace {
    pub requests: Vec<RecordedRequest>,
    pub logs: Vec<LogLine>,
}

/// How often the epoch advances; time limits are enforced to this grain.
const EPOCH_TICK: Duration = Duration::from_millis(10);
/// What one plugin instance may hold (a componentize-py component, the
/// heaviest here, has a CPython, a libc and WASI adapters).
const MAX_CORE_INSTANCES: u32 = 16;
const MAX_MEMORIES: u32 = 2;
const MAX_TABLES: u32 = 8;
/// How much of a used memory or table slot is kept mapped and reset in
/// place (only its dirty pages, where the kernel can say which they are).
const KEEP_RESIDENT: usize = 2 << 20;
/// Slots handed back to the kernel per batch of madvise calls.
const DECOMMIT_BATCH: usize = 32;
/// How long a parse waits for a free instance of its share before the
/// webhook is answered 503.
const PARSE_SLOT_WAIT: Duration = Duration::from_secs(1);
/// How long a delivery waits for one (workers never need more than their
/// share, so this only passes when something is badly wrong).
const DELIVERY_SLOT_WAIT: Duration = Duration::from_secs(10);

/// Why a plugin could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    #[error("{path}: cannot read component: {error}; {build}")]
    ReadComponent { path: PathBuf, error: std::io::Error, build: String },
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
    /// No instance was free in the pool (the host's state, not the plugin's).
    #[error("no plugin instance is free to run {plugin} (all {share} in use); try again shortly")]
    Busy { plugin: String, share: &'static str },
    #[error("plugin {plugin} is a {actual} plugin, not a {expected}")]
    WrongKind { plugin: String, expected: Kind, actual: Kind },
}

impl PluginError {
    /// Whether the plugin is at fault (a limit, a trap, a failed start), as
    /// opposed to the host having had no room to run it. Only the plugin's
    /// failures spend a job's attempts.
    pub fn is_plugins_fault(&self) -> bool {
        !matches!(self, PluginError::Busy { .. })
    }

    /// A short, stable name for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            PluginError::TimeLimit { .. } => "time_limit",
            PluginError::MemoryLimit { .. } => "memory_limit",
            PluginError::Trap { .. } => "trap",
            PluginError::Instantiate { .. } => "instantiate",
            PluginError::Busy { .. } => "busy",
            PluginError::WrongKind { .. } => "wrong_kind",
        }
    }
}

/// A source plugin's verdict against a webhook.
#[derive(Debug, Clone, PartialEq)]
pub enum ParseFailure {
    Malformed(String),
    MissingField(String),
    InvalidField {
        field: String,
        expected: String,
    },
    /// Not from who it claims (the reason is logged, not answered).
    Unauthenticated(String),
    /// Something the plugin needs is down: the CRM should retry.
    Unavailable(String),
}

impl ParseFailure {
    /// The stable error code the API answers with.
    pub fn code(&self) -> &'static str {
        match self {
            ParseFailure::Malformed(_) => "malformed_body",
            ParseFailure::MissingField(_) => "missing_field",
            ParseFailure::InvalidField { .. } => "invalid_field",
            ParseFailure::Unauthenticated(_) => "unauthorized",
            ParseFailure::Unavailable(_) => "source_unavailable",
        }
    }

    /// The field at fault, if the failure names one.
    pub fn field(&self) -> Option<&str> {
        match self {
            ParseFailure::MissingField(f) | ParseFailure::InvalidField { field: f, .. } => Some(f),
            _ => None,
        }
    }
}

impl std::fmt::Display for ParseFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ParseFailure::Malformed(detail) => f.write_str(detail),
            ParseFailure::MissingField(field) => write!(f, "required field {field} is missing"),
            ParseFailure::InvalidField { field, expected } => write!(f, "field {field} must be {expected}"),
            ParseFailure::Unauthenticated(why) => write!(f, "not authenticated: {why}"),
            ParseFailure::Unavailable(why) => write!(f, "the source cannot take it now: {why}"),
        }
    }
}

impl From<wit::ParseError> for ParseFailure {
    fn from(e: wit::ParseError) -> Self {
        match e {
            wit::ParseError::Malformed(m) => ParseFailure::Malformed(m),
            wit::ParseError::MissingField(f) => ParseFailure::MissingField(f),
            wit::ParseError::InvalidField(f) => ParseFailure::InvalidField { field: f.field, expected: f.expected },
            wit::ParseError::Unauthenticated(why) => ParseFailure::Unauthenticated(why),
            wit::ParseError::Unavailable(why) => ParseFailure::Unavailable(why),
        }
    }
}

/// A webhook request as a source plugin sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct IncomingRequest {
    pub method: String,
    /// As the sender called (and signed) it: `BASE_URL` + path and query.
    pub url: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    pub received_at_ms: u64,
}

/// A destination plugin's report on one attempt.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Delivered { status: Option<u16>, detail: String },
    Retryable { status: Option<u16>, reason: String, retry_after: Option<Duration> },
    Permanent { status: Option<u16>, reason: String },
}

impl Outcome {
    /// The downstream's HTTP status, as the plugin reported it.
    pub fn status(&self) -> Option<u16> {
        match self {
            Outcome::Delivered { status, .. }
            | Outcome::Retryable { status, .. }
            | Outcome::Permanent { status, .. } => *status,
        }
    }

    /// What the plugin said of it: the detail of a delivery, or the reason
    /// for a failure.
    pub fn text(&self) -> &str {
        match self {
            Outcome::Delivered { detail, .. } => detail,
            Outcome::Retryable { reason, .. } | Outcome::Permanent { reason, .. } => reason,
        }
    }
}

/// An outcome's HTTP status as logs and texts show it: the number, or
/// `none` when the plugin reported none.
#[derive(Debug, Clone, Copy)]
pub struct Status(pub Option<u16>);

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Some(status) => write!(f, "{status}"),
            None => f.write_str("none"),
        }
    }
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

/// How the engine is set up.
#[derive(Debug, Clone, Default)]
pub struct EngineOptions {
    /// Keep compiled components on disk (`None`: compile every time).
    pub cache: Option<CacheSettings>,
    pub pool: PoolShares,
}

/// Where compiled components are kept, and the file holding the key that
/// authenticates them. The key must not be inside `dir`.
#[derive(Debug, Clone)]
pub struct CacheSettings {
    pub dir: PathBuf,
    pub key_file: PathBuf,
}

/// How many plugin instances may run at once, for parses and for deliveries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolShares {
    pub parses: u32,
    pub deliveries: u32,
}

impl Default for PoolShares {
    fn default() -> Self {
        PoolShares { parses: 992, deliveries: 8 }
    }
}

/// The free instances of each share.
struct Slots {
    parses: Semaphore,
    deliveries: Semaphore,
}

/// The shared engine, its linkers and the epoch ticker.
pub struct PluginEngine {
    engine: Engine,
    linker: wasmtime::component::Linker<PluginState>,
    ticker: Arc<EpochTicker>,
    slots: Arc<Slots>,
    cache: Option<CompileCache>,
}

/// Compiled components on disk, so a restart does not recompile.
///
/// Layout of the cache folder: `<key>.cwasm`, the serialized component
/// followed by the HMAC-SHA256 of the key and those bytes. The key hashes
/// the component's bytes and the engine's compatibility hash (wasmtime's
/// version, the engine's settings and target), so a changed component or
/// engine never matches a stale entry. The MAC is keyed by a secret kept in
/// `CacheSettings::key_file`, outside the folder: whoever can write the
/// folder but not that file cannot make an entry the host will run. An
/// entry whose MAC does not verify is rebuilt and overwritten.
struct CompileCache {
    dir: PathBuf,
    engine_key: String,
    mac_key: [u8; 32],
}

type HmacSha256 = Hmac<Sha256>;

impl CompileCache {
    fn open(settings: &CacheSettings, engine: &Engine) -> anyhow::Result<CompileCache> {
        let dir = &settings.dir;
        std::fs::create_dir_all(dir)
            .map_err(|e| anyhow::anyhow!("cannot create the plugin cache {}: {e}", dir.display()))?;
        let inside = |a: &Path, b: &Path| match (a.canonicalize(), b.canonicalize()) {
            (Ok(a), Ok(b)) => a.starts_with(b),
            _ => a.starts_with(b),
        };
        let key_dir = settings.key_file.parent().unwrap_or(Path::new("."));
        std::fs::create_dir_all(key_dir).map_err(|e| anyhow::anyhow!("cannot create {}: {e}", key_dir.display()))?;
        if inside(key_dir, dir) {
            anyhow::bail!(
                "the plugin cache key {} must not be inside PLUGIN_CACHE_DIR={}: anyone who can write the cache could forge entries",
                settings.key_file.display(),
                dir.display()
            );
        }
        let mac_key = load_or_create_key(&settings.key_file)?;
        // The compatibility hash covers wasmtime's version and the engine's
        // settings and target.
        let mut h = Sha256Hasher(Sha256::new());
        std::hash::Hash::hash(&engine.precompile_compatibility_hash(), &mut h);
        let engine_key = hex(&h.0.finalize());
        Ok(CompileCache { dir: dir.clone(), engine_key, mac_key })
    }

    fn mac(&self, key: &str, artifact: &[u8]) -> HmacSha256 {
        let mut mac = <HmacSha256 as Mac>::new_from_slice(&self.mac_key).expect("HMAC takes a key of any length");
        mac.update(key.as_bytes());
        mac.update(&[0]);
        mac.update(artifact);
        mac
    }

    /// The artifact in an entry (`artifact ‖ MAC`), if its MAC verifies.
    fn open_entry<'a>(&self, key: &str, entry: &'a [u8]) -> Option<&'a [u8]> {
        let (artifact, tag) = entry.split_at_checked(entry.len().checked_sub(MAC_BYTES)?)?;
        self.mac(key, artifact).verify_slice(tag).is_ok().then_some(artifact)
    }

    /// Write an entry: a fresh private file (random name, created
    /// exclusively, so nothing planted in the folder is followed), renamed
    /// into place.
    fn write_entry(&self, key: &str, path: &Path, mut artifact: Vec<u8>) -> std::io::Result<()> {
        let tag = self.mac(key, &artifact).finalize().into_bytes();
        artifact.extend_from_slice(&tag);
        let mut file = tempfile::NamedTempFile::new_in(&self.dir)?;
        std::io::Write::write_all(&mut file, &artifact)?;
        file.persist(path).map_err(|e| e.error)?;
        Ok(())
    }
}

/// Bytes of an entry's MAC (HMAC-SHA256).
const MAC_BYTES: usize = 32;

/// Feeds `Hash` output into SHA-256, for a cache key that stays the same
/// across Rust versions (unlike `DefaultHasher`).
struct Sha256Hasher(Sha256);

impl std::hash::Hasher for Sha256Hasher {
    fn write(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }
    fn finish(&self) -> u64 {
        0
    }
}

/// How a cache key file starts: it can never be mistaken for a MAC.
const KEY_FILE_PREFIX: &str = "crm-event-handler plugin cache key v1: ";

/// Read the cache key, or create it (32 random bytes, hex, owner-only).
fn load_or_create_key(path: &Path) -> anyhow::Result<[u8; 32]> {
    let parse = |text: &str| -> Option<[u8; 32]> {
        let text = text.trim().strip_prefix(KEY_FILE_PREFIX)?;
        let mut key = [0u8; 32];
        if text.len() != 64 {
            return None;
        }
        for (i, byte) in key.iter_mut().enumerate() {
            *byte = u8::from_str_radix(text.get(i * 2..i * 2 + 2)?, 16).ok()?;
        }
        Some(key)
    };
    match std::fs::read_to_string(path) {
        Ok(text) => parse(&text).ok_or_else(|| {
            anyhow::anyhow!("{} is not a plugin cache key; delete it to make a new one", path.display())
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let mut key = [0u8; 32];
            getrandom::fill(&mut key).map_err(|e| anyhow::anyhow!("no randomness for the plugin cache key: {e}"))?;
            let mut options = std::fs::OpenOptions::new();
            options.write(true).create_new(true);
            #[cfg(unix)]
            std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
            match options.open(path) {
                Ok(mut file) => {
                    std::io::Write::write_all(&mut file, format!("{KEY_FILE_PREFIX}{}\n", hex(&key)).as_bytes())
                        .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", path.display()))?;
                    Ok(key)
                }
                // Another process made it first: use theirs.
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => load_or_create_key(path),
                Err(e) => Err(anyhow::anyhow!("cannot create {}: {e}", path.display())),
            }
        }
        Err(e) => Err(anyhow::anyhow!("cannot read {}: {e}", path.display())),
    }
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
    pub fn new(options: EngineOptions) -> anyhow::Result<PluginEngine> {
        let shares = options.pool;
        let instances = shares.parses + shares.deliveries;
        let mut pool = PoolingAllocationConfig::new();
        pool.total_component_instances(instances)
            // Totals are the per-component maxima times the instances, so a
            // heavy component cannot use up another share's slots.
            .total_core_instances(instances * MAX_CORE_INSTANCES)
            .total_memories(instances * MAX_MEMORIES)
            .total_tables(instances * MAX_TABLES)
            .total_stacks(instances)
            .max_memories_per_component(MAX_MEMORIES)
            .max_tables_per_component(MAX_TABLES)
            .max_core_instances_per_component(MAX_CORE_INSTANCES)
            .max_memory_size((MAX_MEMORY_MB as usize) << 20)
            // Reset a used slot by rewriting only its dirty pages (found with
            // PAGEMAP_SCAN where the kernel has it), instead of handing pages
            // back with madvise: that costs a TLB shootdown on every core and
            // a page fault per page on the next call.
            .pagemap_scan(wasmtime::Enabled::Auto)
            .linear_memory_keep_resident(KEEP_RESIDENT)
            .table_keep_resident(KEEP_RESIDENT)
            // What is still handed back goes in batches.
            .decommit_batch_size(DECOMMIT_BATCH);
        let mut config = wasmtime::Config::new();
        config
            .wasm_component_model(true)
            .epoch_interruption(true)
            .allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
        let engine = Engine::new(&config).map_err(|e| anyhow::anyhow!("cannot create the plugin engine: {e}"))?;
        let linker = world::linker(&engine).map_err(|e| anyhow::anyhow!("{e}"))?;

        let stop = Arc::new(AtomicBool::new(false));
        let ticker = Arc::new(EpochTicker { stop: stop.clone() });
        let ticking = engine.clone();
        std::thread::Builder::new().name("wasm-epoch".into()).spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                std::thread::sleep(EPOCH_TICK);
                ticking.increment_epoch();
            }
        })?;
        let cache = options.cache.as_ref().map(|c| CompileCache::open(c, &engine)).transpose()?;
        let slots = Arc::new(Slots {
            parses: Semaphore::new(shares.parses as usize),
            deliveries: Semaphore::new(shares.deliveries as usize),
        });
        Ok(PluginEngine { engine, linker, ticker, slots, cache })
    }

    /// Compile a component, through the on-disk cache when there is one.
    fn compile(&self, bytes: &[u8], digest: &str, path: &Path) -> Result<Component, LoadError> {
        let compile = || {
            Component::new(&self.engine, bytes)
                .map_err(|e| LoadError::Compile { path: path.to_path_buf(), message: format!("{e:#}") })
        };
        let Some(cache) = &self.cache else {
            return compile();
        };
        let key = hex(&Sha256::digest(format!("{}:{digest}", cache.engine_key)));
        let entry_path = cache.dir.join(format!("{key}.cwasm"));
        if let Ok(entry) = std::fs::read(&entry_path) {
            match cache.open_entry(&key, &entry) {
                Some(artifact) => {
                    // SAFETY: `deserialize` runs the native code in `artifact`,
                    // so it must be code this host compiled. The trust
                    // assumption: only this service's user can read the key
                    // file (created 0600, outside PLUGIN_CACHE_DIR). The MAC
                    // checked just above, keyed by it, over the entry's key
                    // (component digest and engine compatibility hash) and
                    // these very bytes, shows that this host's
                    // `Component::serialize` wrote them for exactly this
                    // component on an engine like this one; a file merely
                    // placed in the cache folder cannot carry it. wasmtime
                    // also re-checks the header against this engine.
                    match unsafe { Component::deserialize(&self.engine, artifact) } {
                        Ok(c) => return Ok(c),
                        Err(e) => {
                            tracing::warn!(path = %entry_path.display(), error = %e, "unusable compile cache entry; rebuilding")
                        }
                    }
                }
                None => {
                    tracing::warn!(path = %entry_path.display(), "compile cache entry fails authentication; rebuilding")
                }
            }
        }
        let component = compile()?;
        match component.serialize() {
            Ok(artifact) => {
                if let Err(e) = cache.write_entry(&key, &entry_path, artifact) {
                    tracing::warn!(dir = %cache.dir.display(), error = %e, "could not write the compile cache");
                }
            }
            Err(e) => tracing::warn!(error = %e, "could not serialize a compiled component"),
        }
        Ok(component)
    }

    /// Load, compile and validate the plugin in `dir` against its world,
    /// resolving its settings from what `env` grants it. Nothing is
    /// registered: the caller swaps it in only if this succeeds.
    pub fn load(&self, dir: &Path, env: &PluginEnv, http: Option<HttpMode>) -> Result<LoadedPlugin, LoadError> {
        let manifest = Manifest::load(dir)?;
        // Grants first: a manifest asking for what it was not given is
        // refused before its component is even read.
        let config = manifest.resolve_config(env).map_err(|e| LoadError::Manifest(e.at(&dir.join("plugin.toml"))))?;
        let path = dir.join(&manifest.component);
        let bytes = std::fs::read(&path).map_err(|error| LoadError::ReadComponent {
            build: how_to_build(dir, &path),
            path: path.clone(),
            error,
        })?;
        let digest = hex(&Sha256::digest(&bytes));
        let component = self.compile(&bytes, &digest, &path)?;
        let built_for = check_contract_version(&self.engine, &component)
            .map_err(|message| LoadError::Contract { path: path.clone(), message })?;
        // Built for a later compatible version, it may use what this host
        // does not have yet: the linker's refusal then says which item.
        let newer = built_for
            .as_deref()
            .and_then(version_numbers)
            .is_some_and(|v| version_numbers(CONTRACT_VERSION).is_some_and(|ours| v > ours));

        let allow = manifest
            .allow_list(&config)
            .map_err(|e| LoadError::Config { path: dir.join("plugin.toml"), message: config.redact(&e.to_string()) })?;
        let http = match http {
            Some(mode) => mode,
            // A candidate loaded to deliver never sends.
            None if manifest.shadow_of.is_some() => HttpMode::Shadow,
            None => HttpMode::Live(outbound::Clients::new().map_err(|e| LoadError::Config {
                path: dir.join("plugin.toml"),
                message: format!("cannot build its HTTP clients: {e}"),
            })?),
        };
        let contract = |e: wasmtime::Error| LoadError::Contract {
            path: path.clone(),
            message: match (newer, &built_for) {
                (true, Some(version)) => format!(
                    "was built for {CONTRACT_PACKAGE} {version}, newer than this host's {CONTRACT_VERSION}, and uses \
                     something this host does not have yet: upgrade the host, or build the plugin for \
                     {CONTRACT_VERSION} ({e:#})"
                ),
                _ => format!(
                    "does not match the {} world of {CONTRACT_PACKAGE}@{CONTRACT_VERSION}: {e:#}",
                    manifest.kind
                ),
            },
        };
        let compiled = match manifest.kind {
            Kind::Source => {
                let pre = self.linker.instantiate_pre(&component).map_err(contract)?;
                Compiled::Source(SourcePre::new(pre).map_err(contract)?)
            }
            Kind::Destination => {
                let pre = self.linker.instantiate_pre(&component).map_err(contract)?;
                Compiled::Destination(DestinationPre::new(pre).map_err(contract)?)
            }
        };
        let context = Arc::new(PluginContext {
            name: manifest.name.clone(),
            config: config.clone(),
            declared_keys: manifest.config.keys().cloned().collect(),
            allow: allow.clone(),
            http,
            limits: manifest.limits,
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
            slots: self.slots.clone(),
            compiled,
            context,
        })
    }
}

/// The command that builds a plugin folder's component, as far as the
/// folder shows it.
fn how_to_build(dir: &Path, component: &Path) -> String {
    let component = component.display();
    if dir.join("build.sh").is_file() {
        format!("build it with `{}`", dir.join("build.sh").display())
    } else if dir.join("Cargo.toml").is_file() {
        format!(
            "build it with `cargo build --release --target wasm32-wasip2` in {} and copy \
             target/wasm32-wasip2/release/<crate>.wasm to {component} (in this repository, `cargo build` \
             builds the bundled plugins)",
            dir.display()
        )
    } else {
        format!("build the plugin's component into {component} (docs/plugins.md shows how, per language)")
    }
}

/// The component's imports must all be of a contract version compatible
/// with ours; say so plainly rather than let the linker report a missing
/// import. (The linker itself matches compatible versions' names.) The
/// version they name, if any.
fn check_contract_version(engine: &Engine, component: &Component) -> Result<Option<String>, String> {
    let ty = component.component_type();
    let mut built_for = None;
    for (name, _) in ty.imports(engine) {
        if let Some(rest) = name.strip_prefix(&format!("{CONTRACT_PACKAGE}/")) {
            let version = rest.split_once('@').map(|(_, v)| v).unwrap_or("(none)");
            if !compatible(version) {
                let mut ours = CONTRACT_VERSION.split('.');
                let series = match (ours.next(), ours.next()) {
                    (Some("0"), Some(minor)) => format!("0.{minor}.x"),
                    (major, _) => format!("{}.x", major.unwrap_or("0")),
                };
                return Err(format!(
                    "the plugin targets {CONTRACT_PACKAGE} contract version {version}; this host supports \
                     {CONTRACT_VERSION}, and plugins built for any {series}"
                ));
            }
            built_for.get_or_insert_with(|| version.to_string());
        }
    }
    Ok(built_for)
}

/// A version's numbers (`0.2.9` → [0, 2, 9]), if it is one.
fn version_numbers(version: &str) -> Option<Vec<u64>> {
    version.split('.').map(|p| p.parse::<u64>().ok()).collect()
}

/// Whether a plugin built for contract `version` runs on this host, as
/// semver counts it: the same major version, and while that is 0, the same
/// minor one.
fn compatible(version: &str) -> bool {
    match (version_numbers(version).as_deref(), version_numbers(CONTRACT_VERSION).as_deref()) {
        (Some([0, minor, _]), Some([0, ours, _])) => minor == ours,
        (Some([major, _, _]), Some([ours, _, _])) => major == ours,
        _ => false,
    }
}

fn wit_request(r: &IncomingRequest) -> wit::IncomingRequest {
    wit::IncomingRequest {
        method: r.method.clone(),
        url: r.url.clone(),
        headers: r.headers.iter().map(|(n, v)| wit::Header { name: n.clone(), value: v.clone() }).collect(),
        body: r.body.clone(),
        received_at_ms: r.received_at_ms,
    }
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// How a call failed before the plugin could answer.
enum CallError {
    Start(wasmtime::Error),
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
    slots: Arc<Slots>,
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

    /// The one path for a plugin call: take an instance of the share, arm
    /// the limits, run `body`, and say which limit a failure hit. Also
    /// returns the requests the call made.
    async fn call<T>(
        &self,
        slots: &Semaphore,
        wait: Duration,
        share: &'static str,
        body: impl AsyncFnOnce(&mut Store<PluginState>) -> Result<T, CallError>,
    ) -> (Result<T, PluginError>, Trace) {
        let busy = || PluginError::Busy { plugin: self.name().to_string(), share };
        let Ok(Ok(_permit)) = tokio::time::timeout(wait, slots.acquire()).await else {
            return (Err(busy()), Trace::default());
        };
        let (mut store, time) = self.store();
        let finished = tokio::time::timeout(time + EPOCH_TICK * 5, body(&mut store)).await;
        let result = match finished {
            Err(_) => Err(self.time_limit()),
            Ok(Err(CallError::Start(e))) if e.downcast_ref::<wasmtime::PoolConcurrencyLimitError>().is_some() => {
                Err(busy())
            }
            Ok(Err(CallError::Start(e))) => {
                Err(PluginError::Instantiate { plugin: self.name().to_string(), message: format!("{e:#}") })
            }
            Ok(Err(CallError::Trap(trap))) => Err(self.classify(&store, trap)),
            Ok(Ok(value)) => Ok(value),
        };
        let state = store.data_mut();
        (result, Trace { requests: std::mem::take(&mut state.requests), logs: std::mem::take(&mut state.logs) })
    }

    /// Run the source plugin on one webhook request: the events it carries,
    /// or why it was refused.
    pub async fn parse(&self, request: &IncomingRequest) -> Result<Result<Vec<Event>, ParseFailure>, PluginError> {
        self.parse_traced(request, Vec::new()).await.0
    }

    /// `parse`, with what the call did; a plugin loaded with
    /// `HttpMode::Record` gets `answers` (see `Compared::Scripted`).
    pub async fn parse_traced(
        &self,
        request: &IncomingRequest,
        answers: Vec<Answer>,
    ) -> (Result<Result<Vec<Event>, ParseFailure>, PluginError>, Trace) {
        let Compiled::Source(pre) = &self.compiled else {
            return (Err(self.wrong_kind(Kind::Source)), Trace::default());
        };
        let request = wit_request(request);
        let (result, trace) = self
            .call(&self.slots.parses, PARSE_SLOT_WAIT, "parse instances", async |store| {
                store.data_mut().answers = answers;
                store.data_mut().repeat_last_answer = true;
                let instance = pre.instantiate_async(&mut *store).await.map_err(CallError::Start)?;
                instance.call_parse(&mut *store, &request).await.map_err(CallError::Trap)
            })
            .await;
        (result.map(|parsed| self.parsed(parsed)), trace)
    }

    fn parsed(&self, parsed: Result<Vec<wit::CrmEvent>, wit::ParseError>) -> Result<Vec<Event>, ParseFailure> {
        parsed
            .map(|events| events.into_iter().map(Event::from).collect())
            // Failures are answered, logged and stored: no secret goes with
            // them, and none is longer than 2 KiB.
            .map_err(|e| match ParseFailure::from(e) {
                ParseFailure::Malformed(m) => ParseFailure::Malformed(self.outcome_text(&m)),
                ParseFailure::MissingField(f) => ParseFailure::MissingField(self.outcome_text(&f)),
                ParseFailure::InvalidField { field, expected } => ParseFailure::InvalidField {
                    field: self.outcome_text(&field),
                    expected: self.outcome_text(&expected),
                },
                ParseFailure::Unauthenticated(why) => ParseFailure::Unauthenticated(self.outcome_text(&why)),
                ParseFailure::Unavailable(why) => ParseFailure::Unavailable(self.outcome_text(&why)),
            })
    }

    /// Run the destination plugin for one delivery attempt; also returns the
    /// requests it made.
    pub async fn deliver(&self, req: DeliveryRequest<'_>) -> (Result<Outcome, PluginError>, Vec<RecordedRequest>) {
        self.deliver_with(req, Compared::No).await
    }

    /// `deliver`, for a call a shadow candidate is compared with (or that
    /// candidate's own call, when `Compared::Shadow` gives it the live
    /// version's answers: its requests are never sent). Each request's whole
    /// body is kept as a digest.
    pub async fn deliver_with(
        &self,
        req: DeliveryRequest<'_>,
        compared: Compared,
    ) -> (Result<Outcome, PluginError>, Vec<RecordedRequest>) {
        let (result, trace) = self.deliver_traced(req, compared).await;
        (result, trace.requests)
    }

    /// `deliver_with`, with what the call did.
    pub async fn deliver_traced(
        &self,
        req: DeliveryRequest<'_>,
        compared: Compared,
    ) -> (Result<Outcome, PluginError>, Trace) {
        let Compiled::Destination(pre) = &self.compiled else {
            return (Err(self.wrong_kind(Kind::Destination)), Trace::default());
        };
        let event = wit::CrmEvent::from(req.event);
        let action = wit::Action { name: req.action.to_string(), params: req.params.to_vec() };
        let context = wit::DeliveryContext {
            receipt_id: req.receipt_id.to_string(),
            provider: req.provider.to_string(),
            attempt: req.attempt,
            idempotency_key: req.idempotency_key.to_string(),
        };
        let (result, trace) = self
            .call(&self.slots.deliveries, DELIVERY_SLOT_WAIT, "delivery instances", async |store| {
                let state = store.data_mut();
                state.digest_bodies = matches!(compared, Compared::Live | Compared::Shadow(_));
                state.repeat_last_answer = matches!(compared, Compared::Scripted(_));
                if let Compared::Shadow(answers) | Compared::Scripted(answers) | Compared::Replayed(answers) = compared
                {
                    state.answers = answers;
                }
                let instance = pre.instantiate_async(&mut *store).await.map_err(CallError::Start)?;
                instance.call_deliver(&mut *store, &event, &action, &context).await.map_err(CallError::Trap)
            })
            .await;
        // Outcome text is stored and logged: no secret goes with it.
        let result = result.map(|outcome| match outcome {
            wit::Outcome::Delivered(d) => Outcome::Delivered { status: d.status, detail: self.outcome_text(&d.detail) },
            wit::Outcome::Retryable(r) => Outcome::Retryable {
                status: r.status,
                reason: self.outcome_text(&r.reason),
                retry_after: r.retry_after_ms.map(Duration::from_millis),
            },
            wit::Outcome::Permanent(f) => Outcome::Permanent { status: f.status, reason: self.outcome_text(&f.reason) },
        });
        (result, trace)
    }

    /// Outcome text as stored on receipts and logged: secrets redacted,
    /// at most 2 KiB.
    fn outcome_text(&self, text: &str) -> String {
        world::clip(&self.config.redact(&world::clip(text, 8192)), 2048)
    }

    fn time_limit(&self) -> PluginError {
        PluginError::TimeLimit { plugin: self.name().to_string(), limit_ms: self.manifest.limits.time_per_call_ms }
    }

    fn wrong_kind(&self, expected: Kind) -> PluginError {
        PluginError::WrongKind { plugin: self.name().to_string(), expected, actual: self.manifest.kind }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_component_names_the_command_that_builds_it() {
        let dir = tempfile::tempdir().unwrap();
        let wasm = dir.path().join("notify.wasm");
        assert!(how_to_build(dir.path(), &wasm).contains("docs/plugins.md"));
        std::fs::write(dir.path().join("Cargo.toml"), "").unwrap();
        let hint = how_to_build(dir.path(), &wasm);
        assert!(hint.contains("cargo build --release --target wasm32-wasip2"), "{hint}");
        assert!(hint.contains(&wasm.display().to_string()), "{hint}");
        std::fs::write(dir.path().join("build.sh"), "").unwrap();
        assert!(how_to_build(dir.path(), &wasm).contains("build.sh"));
    }

    #[test]
    fn contract_versions_are_compatible_as_semver_counts_them() {
        assert_eq!(CONTRACT_VERSION, "0.2.0", "update the versions below");
        for ok in ["0.2.0", "0.2.1", "0.2.17"] {
            assert!(compatible(ok), "{ok}");
        }
        for refused in ["0.1.0", "0.3.0", "1.2.0", "0.2", "0.2.0-rc.1", "(none)"] {
            assert!(!compatible(refused), "{refused}");
        }
    }
}
