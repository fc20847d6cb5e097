//! Plugins: the engine that runs them, their manifests and allow-lists, the
//! host side of the WIT contract, and the registry of what is loaded.
//!
//! The registry hands out `Arc<LoadedPlugin>` snapshots: a call keeps the
//! version it started with even if the plugin is replaced meanwhile (the
//! seam hot swap builds on).

pub mod allow;
pub mod engine;
pub mod manifest;
pub mod world;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

pub use engine::{DeliveryRequest, LoadError, LoadedPlugin, Outcome, ParseFailure, PluginEngine, PluginError};
pub use manifest::Kind;

use crate::config::Environment;

/// What is loaded now.
#[derive(Default)]
pub struct PluginSet {
    pub sources: BTreeMap<String, Arc<LoadedPlugin>>,
    pub destinations: BTreeMap<String, Arc<LoadedPlugin>>,
}

/// The loaded plugins, replaceable as a whole or one at a time.
pub struct Registry {
    engine: Arc<PluginEngine>,
    env: Environment,
    current: RwLock<Arc<PluginSet>>,
}

impl Registry {
    /// An empty registry on `engine`; plugins resolve config from `env`.
    pub fn new(engine: Arc<PluginEngine>, env: Environment) -> Registry {
        Registry { engine, env, current: RwLock::new(Arc::new(PluginSet::default())) }
    }

    pub fn engine(&self) -> &Arc<PluginEngine> {
        &self.engine
    }

    /// Load every plugin folder (one holding a `plugin.toml`) under `dir`.
    /// A plugin that fails to load is reported and skipped; the others load.
    pub fn load_dir(&self, dir: &Path) -> Vec<(PathBuf, LoadError)> {
        let mut failures = Vec::new();
        let mut set = PluginSet::default();
        for folder in plugin_folders(dir) {
            match self.engine.load(&folder, &self.env, None) {
                Ok(p) => {
                    let p = Arc::new(p);
                    let map = match p.manifest.kind {
                        Kind::Source => &mut set.sources,
                        Kind::Destination => &mut set.destinations,
                    };
                    if let Some(previous) = map.insert(p.name().to_string(), p.clone()) {
                        let message = format!(
                            "plugin name {:?} is used by both {} and {}; using the latter",
                            p.name(),
                            previous.dir.display(),
                            p.dir.display()
                        );
                        tracing::warn!("{message}");
                    }
                }
                Err(e) => failures.push((folder, e)),
            }
        }
        self.replace(set);
        failures
    }

    /// Swap in a new set atomically.
    pub fn replace(&self, set: PluginSet) {
        let mut guard = self.current.write().unwrap_or_else(|e| e.into_inner());
        *guard = Arc::new(set);
    }

    /// A snapshot of what is loaded.
    pub fn snapshot(&self) -> Arc<PluginSet> {
        self.current.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn source(&self, name: &str) -> Option<Arc<LoadedPlugin>> {
        self.snapshot().sources.get(name).cloned()
    }

    pub fn destination(&self, name: &str) -> Option<Arc<LoadedPlugin>> {
        self.snapshot().destinations.get(name).cloned()
    }
}

/// Sub-folders of `dir` that hold a `plugin.toml`, in name order.
pub fn plugin_folders(dir: &Path) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.join("plugin.toml").is_file())
        .collect();
    out.sort();
    out
}
