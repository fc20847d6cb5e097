//! Plugins: the engine that runs them, their manifests and allow-lists, the
//! host side of the WIT contract, and the registry of what is loaded.
//!
//! The registry hands out `Arc<LoadedPlugin>` snapshots: a call keeps the
//! version it started with even when the plugin is replaced meanwhile. Hot
//! reload (`Registry::sync`) compiles and validates a changed plugin folder
//! *before* swapping it in; a folder that fails leaves the previous version
//! running and records why. A folder that disappears is unloaded only once
//! it has stayed gone for two polls, like any other change.

pub mod allow;
pub mod bundled;
pub mod engine;
pub mod grants;
pub mod manifest;
pub mod outbound;
pub mod world;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime};

pub use engine::{
    CacheSettings, Compared, DeliveryRequest, EngineOptions, IncomingRequest, LoadError, LoadedPlugin, Outcome,
    ParseFailure, PluginEngine, PluginError, PoolShares, Status, Trace,
};
pub use manifest::Kind;

use grants::PluginEnv;

/// How long a source that was loaded and went away still answers 503 (the
/// CRM retries) rather than 404 (the CRM gives up).
const GONE_GRACE: Duration = Duration::from_secs(15 * 60);

/// What is loaded now.
#[derive(Default, Clone)]
pub struct PluginSet {
    pub sources: BTreeMap<String, Arc<LoadedPlugin>>,
    pub destinations: BTreeMap<String, Arc<LoadedPlugin>>,
}

impl PluginSet {
    fn map(&mut self, kind: Kind) -> &mut BTreeMap<String, Arc<LoadedPlugin>> {
        match kind {
            Kind::Source => &mut self.sources,
            Kind::Destination => &mut self.destinations,
        }
    }

    /// The destinations jobs can name: not shadow candidates.
    pub fn live_destinations(&self) -> impl Iterator<Item = &Arc<LoadedPlugin>> {
        self.destinations.values().filter(|p| p.manifest.shadow_of.is_none())
    }

    /// The live destination of that name (not a shadow candidate).
    pub fn live_destination(&self, name: &str) -> Option<&Arc<LoadedPlugin>> {
        self.destinations.get(name).filter(|p| p.manifest.shadow_of.is_none())
    }

    /// The candidate shadowing destination `live`, if one is loaded.
    pub fn shadow_of(&self, live: &str) -> Option<&Arc<LoadedPlugin>> {
        self.destinations.values().find(|p| p.manifest.shadow_of.as_deref() == Some(live))
    }

    /// Every loaded plugin.
    pub fn all(&self) -> impl Iterator<Item = &Arc<LoadedPlugin>> {
        self.sources.values().chain(self.destinations.values())
    }
}

/// What a sync changed.
#[derive(Debug)]
pub enum Change {
    Loaded {
        name: String,
        version: String,
        digest: String,
        replaced: bool,
    },
    Unloaded {
        name: String,
    },
    /// The folder's new contents were refused; the previous version (if
    /// any) keeps running.
    Failed {
        dir: PathBuf,
        error: String,
    },
}

/// Size and modification time of the files that make a plugin (empty: the
/// folder is gone).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Fingerprint(Vec<(u64, Option<SystemTime>)>);

const GONE: Fingerprint = Fingerprint(Vec::new());

fn fingerprint(dir: &Path) -> Fingerprint {
    let stat = |p: &Path| std::fs::metadata(p).map(|m| (m.len(), m.modified().ok())).unwrap_or((0, None));
    let mut parts = vec![stat(&dir.join("plugin.toml"))];
    if let Ok(m) = manifest::Manifest::load(dir) {
        parts.push(stat(&dir.join(&m.component)));
    }
    Fingerprint(parts)
}

/// What the registry knows of one plugin folder.
struct Folder {
    fingerprint: Fingerprint,
    /// The plugin this folder provides now (name and kind).
    loaded: Option<(String, Kind)>,
    /// Why its latest contents were refused, and the source name they
    /// declare, if the manifest could be read.
    error: Option<String>,
    refused_source: Option<String>,
}

/// A folder whose latest contents were refused.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Refused {
    dir: PathBuf,
    error: String,
    /// The source name its manifest declares, if it can be read.
    source: Option<String>,
}

/// What a webhook for a provider name finds.
pub enum SourceLookup {
    Loaded(Arc<LoadedPlugin>),
    /// Not loaded now, but it was recently or its folder is there and was
    /// refused: the CRM should retry.
    Unavailable(String),
    Unknown,
}

/// The loaded plugins and the folders they came from.
pub struct Registry {
    engine: Arc<PluginEngine>,
    env: PluginEnv,
    current: RwLock<Arc<PluginSet>>,
    /// The folders as the last sync left them. Held by a sync for as long
    /// as it compiles: only syncs take it, never a request handler.
    folders: Mutex<HashMap<PathBuf, Folder>>,
    /// Folders whose latest contents were refused, published when a sync
    /// ends.
    refused: RwLock<Arc<Vec<Refused>>>,
    /// Fingerprints seen changed once; acted on when seen the same twice, so
    /// a file still being copied is not loaded half-written and a folder
    /// moved aside for a moment is not unloaded.
    settling: Mutex<HashMap<PathBuf, Fingerprint>>,
    /// Sources unloaded, and when.
    gone_sources: Mutex<HashMap<String, Instant>>,
    /// Where the bundled plugins are written out, and which of them load.
    bundled: Option<(PathBuf, Vec<String>)>,
}

impl Registry {
    /// An empty registry on `engine`; plugins resolve their settings from
    /// what `env` grants them.
    pub fn new(engine: Arc<PluginEngine>, env: PluginEnv) -> Registry {
        Registry {
            engine,
            env,
            current: RwLock::new(Arc::new(PluginSet::default())),
            folders: Mutex::default(),
            refused: RwLock::default(),
            settling: Mutex::default(),
            gone_sources: Mutex::default(),
            bundled: None,
        }
    }

    /// Load these bundled plugins too (written out under `dir`) where no
    /// plugin folder provides one of the same name.
    pub fn with_bundled(mut self, dir: PathBuf, enabled: Vec<String>) -> Registry {
        self.bundled = Some((dir, enabled));
        self
    }

    /// The folders a sync of `dir` loads.
    pub fn folders(&self, dir: &Path) -> Vec<PathBuf> {
        match &self.bundled {
            Some((bundled, enabled)) => bundled::folders(dir, bundled, enabled),
            None => plugin_folders(dir),
        }
    }

    /// The environment plugins resolve their settings from.
    pub fn env(&self) -> &PluginEnv {
        &self.env
    }

    /// Bring the registry in line with `dir`: load new and changed plugin
    /// folders, unload removed ones. With `settle`, a change is acted on
    /// only once it has stayed the same for two calls. Blocking (compiles).
    pub fn sync(&self, dir: &Path, settle: bool) -> Vec<Change> {
        let mut folders = self.folders.lock().unwrap_or_else(|e| e.into_inner());
        let mut settling = self.settling.lock().unwrap_or_else(|e| e.into_inner());
        let mut set = (*self.snapshot()).clone();
        let mut changes = Vec::new();
        let present = self.folders(dir);

        let gone: Vec<PathBuf> = folders.keys().filter(|f| !present.contains(f)).cloned().collect();
        for folder in gone {
            if settle && settling.get(&folder) != Some(&GONE) {
                settling.insert(folder, GONE);
                continue;
            }
            settling.remove(&folder);
            if let Some(Folder { loaded: Some((name, kind)), .. }) = folders.remove(&folder) {
                set.map(kind).remove(&name);
                if kind == Kind::Source {
                    self.gone_sources.lock().unwrap_or_else(|e| e.into_inner()).insert(name.clone(), Instant::now());
                }
                changes.push(Change::Unloaded { name });
            }
        }
        // A folder that came back before it settled as gone.
        settling.retain(|f, fp| *fp != GONE || !present.contains(f));

        for folder in present {
            let fp = fingerprint(&folder);
            if folders.get(&folder).is_some_and(|f| f.fingerprint == fp) {
                settling.remove(&folder);
                continue;
            }
            if settle && settling.get(&folder) != Some(&fp) {
                settling.insert(folder.clone(), fp);
                continue;
            }
            settling.remove(&folder);
            let previous = folders.get(&folder).and_then(|f| f.loaded.clone());
            let loaded = self.engine.load(&folder, &self.env, None).and_then(|plugin| {
                // Two folders must not provide one name: a backup copy beside
                // the live folder would silently replace it. Nor two
                // candidates shadow one destination.
                let rival = plugin
                    .manifest
                    .shadow_of
                    .as_deref()
                    .and_then(|live| set.shadow_of(live))
                    .filter(|p| p.dir != folder);
                if let (Some(rival), Some(live)) = (rival, &plugin.manifest.shadow_of) {
                    return Err(LoadError::Config {
                        path: folder.join("plugin.toml"),
                        message: format!(
                            "{} already shadows {live:?}; one candidate per destination",
                            rival.dir.display()
                        ),
                    });
                }
                match set.map(plugin.manifest.kind).get(plugin.name()) {
                    Some(other) if other.dir != folder => Err(LoadError::Config {
                        path: folder.join("plugin.toml"),
                        message: format!(
                            "a {} plugin named {:?} is already loaded from {}",
                            plugin.manifest.kind,
                            plugin.name(),
                            other.dir.display()
                        ),
                    }),
                    _ => Ok(plugin),
                }
            });
            match loaded {
                Ok(plugin) => {
                    let plugin = Arc::new(plugin);
                    let key = (plugin.name().to_string(), plugin.manifest.kind);
                    if let Some((old_name, old_kind)) = &previous
                        && (*old_name != key.0 || *old_kind != key.1)
                    {
                        set.map(*old_kind).remove(old_name);
                    }
                    let replaced = set.map(key.1).insert(key.0.clone(), plugin.clone()).is_some();
                    changes.push(Change::Loaded {
                        name: key.0.clone(),
                        version: plugin.manifest.version.clone(),
                        digest: plugin.digest.clone(),
                        replaced,
                    });
                    if key.1 == Kind::Source {
                        self.gone_sources.lock().unwrap_or_else(|e| e.into_inner()).remove(&key.0);
                    }
                    folders.insert(
                        folder,
                        Folder { fingerprint: fp, loaded: Some(key), error: None, refused_source: None },
                    );
                }
                Err(e) => {
                    let error = e.to_string();
                    let refused_source = manifest::Manifest::load_lenient(&folder)
                        .filter(|(_, kind)| *kind == Kind::Source)
                        .map(|(name, _)| name);
                    changes.push(Change::Failed { dir: folder.clone(), error: error.clone() });
                    folders.insert(
                        folder,
                        Folder { fingerprint: fp, loaded: previous, error: Some(error), refused_source },
                    );
                }
            }
        }
        if changes.iter().any(|c| !matches!(c, Change::Failed { .. })) {
            *self.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(set);
        }
        let mut refused: Vec<_> = folders
            .iter()
            .filter_map(|(p, f)| {
                let error = f.error.clone()?;
                Some(Refused { dir: p.clone(), error, source: f.refused_source.clone() })
            })
            .collect();
        refused.sort();
        *self.refused.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(refused);
        changes
    }

    /// Folders whose latest contents failed to load, with the reason.
    pub fn load_errors(&self) -> Vec<(PathBuf, String)> {
        self.refused().iter().map(|r| (r.dir.clone(), r.error.clone())).collect()
    }

    fn refused(&self) -> Arc<Vec<Refused>> {
        self.refused.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// A snapshot of what is loaded.
    pub fn snapshot(&self) -> Arc<PluginSet> {
        self.current.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn source(&self, name: &str) -> Option<Arc<LoadedPlugin>> {
        self.snapshot().sources.get(name).cloned()
    }

    /// What a webhook for provider `name` finds: the loaded source, or why
    /// it is briefly unavailable, or nothing by that name.
    pub fn lookup_source(&self, name: &str) -> SourceLookup {
        if let Some(p) = self.source(name) {
            return SourceLookup::Loaded(p);
        }
        let refused = self.refused().iter().find(|r| r.source.as_deref() == Some(name)).map(|r| r.error.clone());
        if let Some(error) = refused {
            return SourceLookup::Unavailable(format!("the {name} plugin is not loaded: {error}"));
        }
        let gone = self.gone_sources.lock().unwrap_or_else(|e| e.into_inner()).get(name).copied();
        match gone {
            Some(at) if at.elapsed() < GONE_GRACE => {
                SourceLookup::Unavailable(format!("the {name} plugin was unloaded {} s ago", at.elapsed().as_secs()))
            }
            _ => SourceLookup::Unknown,
        }
    }

    /// The live destination plugin of that name (not a shadow candidate:
    /// jobs cannot name one).
    pub fn destination(&self, name: &str) -> Option<Arc<LoadedPlugin>> {
        self.snapshot().live_destination(name).cloned()
    }
}

/// Sub-folders of `dir` that hold a `plugin.toml`, in name order. Hidden
/// folders (`.name`) are left alone: a deploy writes into one first.
pub fn plugin_folders(dir: &Path) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
        .map(|e| e.path())
        .filter(|p| p.join("plugin.toml").is_file())
        .collect();
    out.sort();
    out
}
