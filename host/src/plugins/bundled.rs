//! The bundled plugins (crm, meta-capi, brevo), built into the binary by
//! `host/build.rs`, so an installed binary runs without a plugin folder.
//! They are written out under the plugin cache and loaded like any folder,
//! wherever `PLUGINS_DIR` has no folder of the same name: a folder there
//! overrides the bundled plugin.

use std::path::{Path, PathBuf};

use super::manifest::Manifest;

/// (folder name, plugin.toml, component)
const BUNDLED: &[(&str, &str, &[u8])] = include!(concat!(env!("OUT_DIR"), "/bundled.rs"));

/// Write the bundled plugins' folders under `into`, rewriting only what
/// differs (so hot reload sees nothing new at each start).
pub fn write_out(into: &Path) -> std::io::Result<()> {
    for (name, manifest, component) in BUNDLED {
        let dir = into.join(name);
        std::fs::create_dir_all(&dir)?;
        write_if_changed(&dir.join("plugin.toml"), manifest.as_bytes())?;
        let file = Manifest::parse(manifest).map(|m| m.component).map_err(std::io::Error::other)?;
        write_if_changed(&dir.join(file), component)?;
    }
    Ok(())
}

fn write_if_changed(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    if std::fs::read(path).ok().as_deref() != Some(bytes) {
        std::fs::write(path, bytes)?;
    }
    Ok(())
}

/// The folders to load: `dir`'s, and each of the `enabled` bundled ones
/// (written out under `bundled`) that no folder of `dir` provides by name.
pub fn folders(dir: &Path, bundled: &Path, enabled: &[String]) -> Vec<PathBuf> {
    let mut out = super::plugin_folders(dir);
    let provided: Vec<String> = out.iter().filter_map(|f| Manifest::load_lenient(f)).map(|(name, _)| name).collect();
    for (name, _, _) in BUNDLED {
        if enabled.iter().any(|e| e == name) && !provided.iter().any(|p| p == name) {
            out.push(bundled.join(name));
        }
    }
    out
}

/// The bundled plugins' names.
pub fn names() -> Vec<&'static str> {
    BUNDLED.iter().map(|(name, _, _)| *name).collect()
}
