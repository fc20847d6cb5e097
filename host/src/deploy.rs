//! `plugin deploy`: put a plugin folder into a running host's
//! `PLUGINS_DIR` the way hot reload expects (written aside, then renamed
//! into place), and wait until the host reports the new component's digest,
//! or says why it refused it. Also what the plugin tools read from a
//! running host: its plugins, and a stored receipt.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use sha2::{Digest, Sha256};

use crate::plugins::engine::hex;

use crate::plugins::manifest::Manifest;
use crate::plugins::plugin_folders;

/// What was put into place.
#[derive(Debug)]
pub struct Placed {
    pub name: String,
    pub version: String,
    pub digest: String,
    /// The folder the host loads it from.
    pub folder: PathBuf,
    /// The folder it replaced, moved aside (hidden) until the host runs the
    /// new one: `confirm` removes it, `roll_back` puts it back.
    replaced: Option<PathBuf>,
}

/// Copy `dir`'s manifest and component into `plugins_dir`: into the folder
/// that provides a plugin of the same name and kind there, or a new one
/// named after it. Written into a hidden folder first (the host ignores
/// those), then renamed into place, so the host never reads a
/// half-written plugin. A folder holding more than a plugin's manifest and
/// component (sources, notes) is not replaced.
pub fn place(dir: &Path, plugins_dir: &Path) -> anyhow::Result<Placed> {
    let manifest = Manifest::load(dir)?;
    let component = dir.join(&manifest.component);
    let bytes = std::fs::read(&component).with_context(|| {
        format!(
            "cannot read {}: build it first (`crm-event-handler plugin build {}`)",
            component.display(),
            dir.display()
        )
    })?;
    if !plugins_dir.is_dir() {
        bail!("{} is not a folder: pass the host's PLUGINS_DIR with --to", plugins_dir.display());
    }
    let folder = plugin_folders(plugins_dir)
        .into_iter()
        .find(|f| Manifest::load_lenient(f) == Some((manifest.name.clone(), manifest.kind)))
        .unwrap_or_else(|| plugins_dir.join(&manifest.name));
    if std::fs::canonicalize(dir).ok() == std::fs::canonicalize(&folder).ok() {
        bail!("{} is already the folder the host loads; deploy from another folder", dir.display());
    }
    if folder.exists() {
        // Its manifest, and the file (or folder) its component is in.
        let mut own = vec![std::ffi::OsString::from("plugin.toml")];
        if let Ok(live) = Manifest::load(&folder) {
            own.extend(Path::new(&live.component).iter().next().map(|top| top.to_os_string()));
        }
        let others: Vec<String> = std::fs::read_dir(&folder)
            .with_context(|| format!("cannot read {}", folder.display()))?
            .flatten()
            .filter(|e| !own.contains(&e.file_name()))
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        if !others.is_empty() {
            bail!(
                "{} holds more than a plugin's manifest and component ({}): deploy replaces the whole folder, so \
                 move those out first",
                folder.display(),
                others.join(", ")
            );
        }
    }
    let incoming = plugins_dir.join(format!(".{}.incoming", manifest.name));
    let replaced = plugins_dir.join(format!(".{}.replaced", manifest.name));
    if replaced.exists() {
        bail!(
            "{} is left from a deploy that did not finish: it may be the only copy of the version that ran before; \
             put it back or remove it",
            replaced.display()
        );
    }
    if incoming.exists() {
        std::fs::remove_dir_all(&incoming).with_context(|| format!("cannot remove {}", incoming.display()))?;
    }
    let written = (|| {
        let target = incoming.join(&manifest.component);
        std::fs::create_dir_all(target.parent().unwrap_or(&incoming))?;
        std::fs::write(&target, &bytes)?;
        std::fs::copy(dir.join("plugin.toml"), incoming.join("plugin.toml"))?;
        std::fs::File::open(&incoming)?.sync_all()
    })();
    if let Err(e) = written {
        let _ = std::fs::remove_dir_all(&incoming);
        return Err(e).with_context(|| format!("cannot write {}", incoming.display()));
    }
    // Two renames: the host takes a folder missing for one poll as a
    // redeploy in progress, not as a plugin removed.
    let replaced = match folder.exists() {
        true => {
            std::fs::rename(&folder, &replaced).with_context(|| format!("cannot move {} aside", folder.display()))?;
            Some(replaced)
        }
        false => None,
    };
    if let Err(e) = std::fs::rename(&incoming, &folder) {
        if let Some(replaced) = &replaced {
            let _ = std::fs::rename(replaced, &folder);
        }
        return Err(e).with_context(|| format!("cannot rename {} to {}", incoming.display(), folder.display()));
    }
    Ok(Placed {
        name: manifest.name,
        version: manifest.version.to_string(),
        digest: hex(&Sha256::digest(&bytes)),
        folder,
        replaced,
    })
}

/// The host runs it: the folder it replaced goes.
pub fn confirm(placed: &Placed) -> anyhow::Result<()> {
    match &placed.replaced {
        Some(replaced) => {
            std::fs::remove_dir_all(replaced).with_context(|| format!("cannot remove {}", replaced.display()))
        }
        None => Ok(()),
    }
}

/// The host refused it: put back the folder it replaced (or, for a new
/// plugin, remove it), so a restart does not meet the refused files.
pub fn roll_back(placed: &Placed) -> anyhow::Result<()> {
    let refused = placed.folder.with_file_name(format!(".{}.refused", placed.name));
    std::fs::rename(&placed.folder, &refused)
        .with_context(|| format!("cannot move {} aside", placed.folder.display()))?;
    if let Some(replaced) = &placed.replaced {
        std::fs::rename(replaced, &placed.folder)
            .with_context(|| format!("cannot put {} back at {}", replaced.display(), placed.folder.display()))?;
    }
    std::fs::remove_dir_all(&refused).with_context(|| format!("cannot remove {}", refused.display()))
}

/// `GET path` of the host at `url`, with its operator key: the body.
async fn get(url: &str, path: &str, key: &str) -> anyhow::Result<Vec<u8>> {
    let response = reqwest::Client::new()
        .get(format!("{}{path}", url.trim_end_matches('/')))
        .header("x-api-key", key)
        .timeout(Duration::from_secs(10))
        .send()
        .await
        .with_context(|| format!("cannot reach a running host at {url}"))?;
    if !response.status().is_success() {
        bail!("{url} answered {} to GET {path}", response.status());
    }
    Ok(response.bytes().await?.to_vec())
}

/// `GET /api/v1/plugins` of the host at `url`.
pub async fn listing(url: &str, key: &str) -> anyhow::Result<serde_json::Value> {
    Ok(serde_json::from_slice(&get(url, "/api/v1/plugins", key).await?)?)
}

/// A stored receipt, from `GET /api/v1/receipts/{id}` of the host at `url`.
pub async fn receipt(url: &str, key: &str, id: &str) -> anyhow::Result<crate::store::Receipt> {
    let body = get(url, &format!("/api/v1/receipts/{id}"), key).await?;
    serde_json::from_slice(&body).context("the host's receipt")
}

/// How a deploy ended, as the host reports it.
#[derive(Debug, PartialEq)]
pub enum Landed {
    /// Loaded: the host runs this digest now.
    Live,
    /// Refused: the host's reason. The previous version keeps running.
    Refused(String),
}

/// Why the host refused the folder it loads `placed` from, if it did, as
/// `listing` shows it.
pub fn refusal(listing: &serde_json::Value, placed: &Placed) -> Option<String> {
    // The host's path for the folder may differ from ours (a mounted
    // volume): match on the folder's own name.
    let name = placed.folder.file_name()?;
    listing["load_errors"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|e| e["dir"].as_str().is_some_and(|d| Path::new(d).file_name() == Some(name)))
        .map(|e| e["error"].as_str().unwrap_or("(no reason given)").to_string())
}

/// Poll the host at `url` until it runs `placed` or refuses it, for at
/// most `timeout`. `stale` is the refusal the host showed for that folder
/// before the deploy: seen again, it may be the old one, so it counts only
/// once the time is up.
pub async fn wait_live(
    url: &str,
    key: &str,
    placed: &Placed,
    stale: Option<String>,
    timeout: Duration,
) -> anyhow::Result<Landed> {
    let started = Instant::now();
    loop {
        let body = listing(url, key).await?;
        let live = body["plugins"].as_array().into_iter().flatten().any(|p| {
            p["name"] == placed.name.as_str()
                && p["digest"] == placed.digest.as_str()
                && p["version"] == placed.version.as_str()
        });
        if live {
            return Ok(Landed::Live);
        }
        let refused = refusal(&body, placed);
        let timed_out = started.elapsed() >= timeout;
        match refused {
            Some(reason) if timed_out || stale.as_deref() != Some(reason.as_str()) => {
                return Ok(Landed::Refused(reason));
            }
            _ if timed_out => bail!(
                "{} is in place, but the host at {url} has not loaded it after {} s: does it watch {} \
                 (PLUGINS_DIR, PLUGIN_RELOAD_MS)?{}",
                placed.name,
                timeout.as_secs(),
                placed.folder.parent().map(|p| p.display().to_string()).unwrap_or_default(),
                placed
                    .replaced
                    .as_ref()
                    .map(|r| format!(
                        " The folder it replaced is kept at {}: remove it once the host runs the new version, or \
                         put it back.",
                        r.display()
                    ))
                    .unwrap_or_default()
            ),
            _ => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}
