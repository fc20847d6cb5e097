//! Hot swap: plugin and routing changes take effect without a restart, are
//! validated before they replace what runs, and never fail or lose events.

#[path = "support/mod.rs"]
mod support;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crm_event_handler::config::Config;
use crm_event_handler::plugins::{CacheSettings, EngineOptions, LoadError, PluginEngine};
use crm_event_handler::{App, serve};
use serde_json::Value;
use support::*;

const WAIT: Duration = Duration::from_secs(60);

struct Running {
    app: Arc<App>,
    base: String,
    plugins: PathBuf,
    meta: StandIn,
    dir: tempfile::TempDir,
    stop: tokio::sync::watch::Sender<bool>,
}

async fn start(extra: &[(&str, String)]) -> Running {
    let dir = tempfile::tempdir().unwrap();
    let plugins = plugins_dir(dir.path(), &["crm", "meta-capi"]);
    let meta = StandIn::meta().await;
    let mut vars: HashMap<String, String> = [
        ("API_KEY", API_KEY.to_string()),
        ("DATA_DIR", dir.path().join("data").display().to_string()),
        ("PLUGINS_DIR", plugins.display().to_string()),
        ("META_ACCESS_TOKEN", "t".to_string()),
        ("META_PIXEL_ID", "1".to_string()),
        ("META_GRAPH_URL", meta.url.clone()),
        ("RETRY_BASE_DELAY_MS", "50".to_string()),
        ("PLUGIN_RELOAD_MS", "100".to_string()),
        ("BUNDLED_PLUGINS", "none".to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    for (k, v) in extra {
        vars.insert(k.to_string(), v.clone());
    }
    let app = App::build(Config::from_vars(vars).unwrap()).await.unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let (stop, stopped) = tokio::sync::watch::channel(false);
    tokio::spawn(serve(app.clone(), listener, stopped));
    Running { app, base, plugins, meta, dir, stop }
}

/// Replace a file the way a deploy should: write aside, then rename.
fn replace(path: &Path, contents: &[u8]) {
    let tmp = path.with_extension("incoming");
    std::fs::write(&tmp, contents).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

fn meta_version(app: &App) -> Option<String> {
    app.plugins.destination("meta-capi").map(|p| p.manifest.version.clone())
}

#[tokio::test]
async fn a_new_plugin_version_takes_over_under_load_without_failing_or_repeating_anything() {
    let r = start(&[]).await;
    let manifest = r.plugins.join("meta-capi/plugin.toml");
    let v2 = std::fs::read_to_string(&manifest)
        .unwrap()
        .replace("version = \"0.1.0\"", "version = \"0.2.0\"")
        .replace("default = \"system_generated\"", "default = \"website\"");
    assert!(v2.contains("0.2.0") && v2.contains("\"website\""));

    // A steady stream of webhooks, one new deal every 20 ms for 3 s.
    let base = r.base.clone();
    let stream = tokio::spawn(async move {
        let mut accepted = Vec::new();
        let start = Instant::now();
        let mut i = 0;
        while start.elapsed() < Duration::from_secs(3) {
            let deal = format!("HS-{i}");
            // When it was sent: its job cannot start before this.
            let sent = Instant::now();
            let (status, body) =
                post_webhook(&base, "/api/v1/webhook/crm", "deal_updated", &payload(&deal, "Qualified")).await;
            assert_eq!(status, 200, "{body}");
            accepted.push((deal, sent));
            i += 1;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        accepted
    });
    tokio::time::sleep(Duration::from_millis(1000)).await;
    replace(&manifest, v2.as_bytes());
    let swapped_at = eventually("version 0.2.0 to be loaded", WAIT, async || {
        (meta_version(&r.app).as_deref() == Some("0.2.0")).then(Instant::now)
    })
    .await;
    let accepted = stream.await.unwrap();

    eventually("every webhook delivered", WAIT, async || (r.meta.events().len() >= accepted.len()).then_some(())).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let events = r.meta.events();
    assert_eq!(events.len(), accepted.len(), "each webhook delivered exactly once");
    assert_eq!(r.meta.unique_events().len(), accepted.len());
    let source_of = |deal: &str| -> String {
        let e = events
            .iter()
            .find(|e| e["custom_data"]["deal_id"] == deal)
            .unwrap_or_else(|| panic!("no event for {deal}"));
        e["action_source"].as_str().unwrap().to_string()
    };
    let (mut old, mut new) = (0, 0);
    for (deal, sent) in &accepted {
        let source = source_of(deal);
        if *sent > swapped_at {
            assert_eq!(source, "website", "{deal} was sent after the swap");
            new += 1;
        } else if source == "system_generated" {
            old += 1;
        }
    }
    assert!(old > 5 && new > 5, "both versions served the stream (old {old}, new {new})");
    let dead = get_json(&r.base, "/api/v1/dead-letters").await;
    assert_eq!(dead["dead_letters"], Value::Array(vec![]));
    let _ = r.stop.send(true);
}

#[tokio::test]
async fn a_broken_replacement_is_refused_and_the_running_version_keeps_working() {
    let r = start(&[]).await;
    let digest = r.app.plugins.destination("meta-capi").unwrap().digest.clone();
    let component = r.plugins.join("meta-capi/meta-capi.wasm");
    let original = std::fs::read(&component).unwrap();

    // Not a component at all.
    replace(&component, b"\0asm this is not a component");
    let errors = eventually("the refusal to be reported", WAIT, async || {
        let e = r.app.plugins.load_errors();
        (!e.is_empty()).then_some(e)
    })
    .await;
    assert!(errors[0].1.contains("not a valid WebAssembly component"), "{errors:?}");
    // Counted once the reload pass that refused it has reported.
    eventually("the refusal to be counted", WAIT, async || {
        r.app.metrics.render().contains("crm_plugin_load_failures_total 1").then_some(())
    })
    .await;
    let (status, _) = post_webhook(&r.base, "/api/v1/webhook/crm", "deal_updated", &payload("B-1", "Qualified")).await;
    assert_eq!(status, 200);
    eventually("delivery by the old version", WAIT, async || (r.meta.events().len() == 1).then_some(())).await;
    assert_eq!(r.app.plugins.destination("meta-capi").unwrap().digest, digest);

    // A real component, but of the wrong world (a source, not a destination).
    replace(&component, &std::fs::read(r.plugins.join("crm/crm.wasm")).unwrap());
    eventually("the world mismatch to be reported", WAIT, async || {
        r.app
            .plugins
            .load_errors()
            .iter()
            .any(|(_, e)| e.contains("does not match the destination world"))
            .then_some(())
    })
    .await;
    assert_eq!(r.app.plugins.destination("meta-capi").unwrap().digest, digest);

    // Removing the folder unloads it: jobs wait with a clear reason, and
    // spend none of their attempts (the plugin is not at fault).
    std::fs::remove_dir_all(r.plugins.join("meta-capi")).unwrap();
    eventually("the plugin to be unloaded", WAIT, async || {
        r.app.plugins.destination("meta-capi").is_none().then_some(())
    })
    .await;
    let (_, body) = post_webhook(&r.base, "/api/v1/webhook/crm", "deal_updated", &payload("B-2", "Qualified")).await;
    let id = body["receipt_id"].as_str().unwrap().to_string();
    let receipt = eventually("the job to be put off", WAIT, async || {
        let rec = get_json(&r.base, &format!("/api/v1/receipts/{id}")).await;
        rec["actions"][0]["last_error"].is_string().then_some(rec)
    })
    .await;
    assert_eq!(receipt["actions"][0]["last_error"], "no destination plugin named \"meta-capi\" is loaded");
    assert_eq!(
        (receipt["actions"][0]["state"].as_str(), receipt["actions"][0]["attempts"].as_u64()),
        (Some("retrying"), Some(0))
    );

    // Putting it back brings it back, and the waiting job is delivered.
    let folder = r.plugins.join("meta-capi");
    std::fs::create_dir_all(&folder).unwrap();
    std::fs::copy(repo().join("plugins/meta-capi/plugin.toml"), folder.join("plugin.toml")).unwrap();
    std::fs::write(folder.join("meta-capi.wasm"), &original).unwrap();
    eventually("the job delivered after the plugin came back", WAIT, async || {
        let rec = get_json(&r.base, &format!("/api/v1/receipts/{id}")).await;
        (rec["actions"][0]["state"] == "delivered").then_some(())
    })
    .await;
    let _ = r.stop.send(true);
}

#[tokio::test]
async fn routing_changes_apply_without_restart_and_bad_ones_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let routes = dir.path().join("routes.toml");
    std::fs::write(
        &routes,
        "[[route]]\nstatus = \"Won\"\nactions = [{ destination = \"meta-capi\", action = \"Purchase\" }]\n",
    )
    .unwrap();
    let r = start(&[("ROUTES_FILE", routes.display().to_string())]).await;
    let (_, body) = post_webhook(&r.base, "/api/v1/webhook/crm", "deal_updated", &payload("R-1", "Qualified")).await;
    assert_eq!(body["actions"], Value::Array(vec![]), "Qualified routes nowhere yet");

    replace(
        &routes,
        b"[[route]]\nstatus = \"Qualified\"\nactions = [{ destination = \"meta-capi\", action = \"Lead\" }]\n",
    );
    eventually("the new table", WAIT, async || {
        (!r.app.routes().actions_for("crm", "Qualified").is_empty()).then_some(())
    })
    .await;
    let (_, body) = post_webhook(&r.base, "/api/v1/webhook/crm", "deal_updated", &payload("R-2", "Qualified")).await;
    assert_eq!(body["actions"][0]["action"], "Lead");
    eventually("the Lead", WAIT, async || (r.meta.events().len() == 1).then_some(())).await;

    replace(&routes, b"[[route]]\nstatus = \"Qualified\"\nactions = [{ destination = \"meta-capi\" }]\n");
    eventually("the refusal", WAIT, async || {
        r.app.metrics.render().contains("crm_routes_reload_failures_total 1").then_some(())
    })
    .await;
    assert_eq!(r.app.routes().actions_for("crm", "Qualified")[0].action, "Lead", "the previous table stays");
    drop(r.dir);
}

/// An engine with the compile cache in `dir/cache` and its key in `dir/data`.
fn cached_engine(dir: &Path) -> PluginEngine {
    let cache = CacheSettings { dir: dir.join("cache"), key_file: dir.join("data/plugin-cache.key") };
    PluginEngine::new(EngineOptions { cache: Some(cache), ..EngineOptions::default() }).unwrap()
}

/// The cache entry a plugin was compiled into: the file that appeared
/// while it loaded.
fn new_entry(cache: &Path, before: &[PathBuf]) -> PathBuf {
    let now: Vec<PathBuf> =
        std::fs::read_dir(cache).unwrap().flatten().map(|e| e.path()).filter(|p| !before.contains(p)).collect();
    assert_eq!(now.len(), 1, "one entry per component: {now:?}");
    now[0].clone()
}

fn listing(cache: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(cache).map(|d| d.flatten().map(|e| e.path()).collect()).unwrap_or_default()
}

#[tokio::test]
async fn compiled_components_are_cached_and_a_corrupt_entry_is_rebuilt() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let plugins = plugins_dir(dir.path(), &["crm"]);
    let env = plugin_env(&[], None);
    cached_engine(dir.path()).load(&plugins.join("crm"), &env, None).unwrap();
    let artifact = new_entry(&cache, &[]);
    let written = std::fs::metadata(&artifact).unwrap().modified().unwrap();
    let good = std::fs::read(&artifact).unwrap();

    // A second engine (a restart) uses the entry as it is.
    tokio::time::sleep(Duration::from_millis(20)).await;
    let p = cached_engine(dir.path()).load(&plugins.join("crm"), &env, None).unwrap();
    assert_eq!(
        std::fs::metadata(&artifact).unwrap().modified().unwrap(),
        written,
        "read from the cache, not rewritten"
    );
    assert!(p.parse(&webhook_request(&payload("C-1", "Qualified"))).await.unwrap().is_ok());

    // Corrupt it: the MAC no longer verifies, so it is rebuilt, not run.
    let mut bad = good.clone();
    let mid = bad.len() / 2;
    bad[mid] ^= 0xff;
    std::fs::write(&artifact, &bad).unwrap();
    let p = cached_engine(dir.path()).load(&plugins.join("crm"), &env, None).unwrap();
    assert!(p.parse(&webhook_request(&payload("C-2", "Qualified"))).await.unwrap().is_ok());
    assert_eq!(std::fs::read(&artifact).unwrap(), good, "rebuilt as the host compiles it");
}

/// The attacker can write PLUGIN_CACHE_DIR but not the key file: they put
/// native code the host compiled for another component (their own source
/// plugin), MAC and all, where the crm source's entry goes, with a checksum
/// as the old cache layout used. The host must not run it as crm.
#[tokio::test]
async fn a_file_placed_in_the_cache_cannot_make_the_host_run_code_it_did_not_compile() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let plugins = plugins_dir(dir.path(), &["crm", "slow-source"]);
    let env = plugin_env(&[], None);
    let engine = cached_engine(dir.path());
    engine.load(&plugins.join("crm"), &env, None).unwrap();
    let crm_artifact = new_entry(&cache, &[]);
    let before = listing(&cache);
    engine.load(&plugins.join("slow-source"), &env, None).unwrap();
    let evil_artifact = new_entry(&cache, &before);
    std::fs::copy(&evil_artifact, &crm_artifact).unwrap();
    let sum: String = sha2_hex(&std::fs::read(&crm_artifact).unwrap());
    std::fs::write(crm_artifact.with_extension("sha256"), sum).unwrap();

    let crm = cached_engine(dir.path()).load(&plugins.join("crm"), &env, None).unwrap();
    let events = crm.parse(&webhook_request(&payload("C-9", "Qualified"))).await.unwrap().unwrap();
    assert_eq!(
        (events[0].reference.as_str(), events[0].event_type.as_str()),
        ("C-9", "unspecified"),
        "crm's own code ran"
    );
    assert_ne!(
        std::fs::read(&crm_artifact).unwrap(),
        std::fs::read(&evil_artifact).unwrap(),
        "the forged entry was replaced"
    );

    // The key never lives in the cache folder: a setup that would put it
    // there is refused.
    let inside = CacheSettings { dir: dir.path().join("data"), key_file: dir.path().join("data/plugin-cache.key") };
    let err =
        PluginEngine::new(EngineOptions { cache: Some(inside), ..EngineOptions::default() }).err().unwrap().to_string();
    assert!(err.contains("must not be inside PLUGIN_CACHE_DIR"), "{err}");
}

fn sha2_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

/// Rewrite "crm:plugin/<interface>@0.2.0" to `version` in `wasm` (a plugin
/// built for that contract), in place: same length, so the binary stays
/// well-formed and only the version changes.
fn built_for_contract(wasm: &Path, version: &str) {
    assert_eq!(version.len(), 5);
    let mut bytes = std::fs::read(wasm).unwrap();
    let prefix = b"crm:plugin/";
    let mut patched = 0;
    for i in 0..bytes.len().saturating_sub(prefix.len() + 30) {
        if &bytes[i..i + prefix.len()] == prefix {
            let rest = i + prefix.len();
            if let Some(at) = bytes[rest..rest + 20].iter().position(|b| *b == b'@') {
                let v = rest + at + 1;
                if &bytes[v..v + 5] == b"0.2.0" {
                    bytes[v..v + 5].copy_from_slice(version.as_bytes());
                    patched += 1;
                }
            }
        }
    }
    assert!(patched > 0, "the contract's import names are in the binary");
    std::fs::write(wasm, bytes).unwrap();
}

/// Why the meta-capi folder in `plugins` is refused: a contract error.
fn contract_refusal(plugins: &Path) -> String {
    let err = PluginEngine::new(EngineOptions::default())
        .unwrap()
        .load(&plugins.join("meta-capi"), &plugin_env(&[], None), None)
        .err()
        .expect("refused");
    assert!(matches!(err, LoadError::Contract { .. }), "{err}");
    err.to_string()
}

#[tokio::test]
async fn a_plugin_built_for_an_incompatible_contract_is_refused_with_the_reason() {
    for version in ["0.1.0", "0.3.0", "1.2.0"] {
        let dir = tempfile::tempdir().unwrap();
        let plugins = plugins_dir(dir.path(), &["meta-capi"]);
        built_for_contract(&plugins.join("meta-capi/meta-capi.wasm"), version);
        let err = contract_refusal(&plugins);
        let expected = format!(
            "targets crm:plugin contract version {version}; this host supports 0.2.0, and plugins built for any 0.2.x"
        );
        assert!(err.contains(&expected), "{err}");
    }
}

/// A host process on `plugins` only, delivering to `meta` (with a test
/// token of one character).
fn meta_host(dir: &Path, plugins: &Path, meta: &StandIn) -> Vec<(&'static str, String)> {
    vec![
        ("API_KEY", API_KEY.to_string()),
        ("DATA_DIR", dir.join("data").display().to_string()),
        ("PLUGINS_DIR", plugins.display().to_string()),
        ("BUNDLED_PLUGINS", "none".to_string()),
        ("META_ACCESS_TOKEN", "t".to_string()),
        ("META_PIXEL_ID", "1".to_string()),
        ("META_GRAPH_URL", meta.url.clone()),
    ]
}

/// A plugin built for a later 0.2.x than the host's (the same items, a
/// newer patch of the contract) loads and delivers.
#[tokio::test]
async fn a_plugin_built_for_a_compatible_contract_version_runs() {
    let dir = tempfile::tempdir().unwrap();
    let plugins = plugins_dir(dir.path(), &["crm", "meta-capi"]);
    built_for_contract(&plugins.join("crm/crm.wasm"), "0.2.9");
    built_for_contract(&plugins.join("meta-capi/meta-capi.wasm"), "0.2.9");
    let meta = StandIn::meta().await;
    let host = Host::start(&meta_host(dir.path(), &plugins, &meta)).await;
    let (status, body) =
        post_webhook(&host.url, "/api/v1/webhook/crm", "deal_updated", &payload("V-029", "Qualified")).await;
    assert_eq!(status, 200, "{body}");
    eventually("the Lead", Duration::from_secs(20), async || (meta.events().len() == 1).then_some(())).await;
    // The one-character token is warned about at start-up.
    assert!(host.log_text().contains("META_ACCESS_TOKEN is shorter than 8 characters"), "{}", host.log_text());
}

/// A plugin built for a later 0.2.x that uses an interface this host does
/// not have yet is refused with a reason that says so.
#[tokio::test]
async fn a_plugin_using_what_a_later_contract_added_is_told_to_upgrade_the_host() {
    let dir = tempfile::tempdir().unwrap();
    let plugins = plugins_dir(dir.path(), &["meta-capi"]);
    let wasm = plugins.join("meta-capi/meta-capi.wasm");
    built_for_contract(&wasm, "0.2.9");
    // Its `log` import renamed, as if 0.2.9 had added an interface `lag`.
    let mut bytes = std::fs::read(&wasm).unwrap();
    let (from, to) = (b"crm:plugin/log@0.2.9", b"crm:plugin/lag@0.2.9");
    let at = bytes.windows(from.len()).position(|w| w == from).expect("the log import");
    bytes[at..at + to.len()].copy_from_slice(to);
    std::fs::write(&wasm, bytes).unwrap();
    let err = contract_refusal(&plugins);
    assert!(err.contains("was built for crm:plugin 0.2.9, newer than this host's 0.2.0, and uses something"), "{err}");
}

#[tokio::test]
async fn a_second_folder_with_the_same_plugin_name_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let plugins = plugins_dir(dir.path(), &["crm"]);
    // An operator's backup copy beside the live folder.
    let backup = plugins.join("crm.old");
    std::fs::create_dir_all(&backup).unwrap();
    for file in ["plugin.toml", "crm.wasm"] {
        std::fs::copy(plugins.join("crm").join(file), backup.join(file)).unwrap();
    }
    let engine = Arc::new(PluginEngine::new(EngineOptions::default()).unwrap());
    let registry = crm_event_handler::plugins::Registry::new(engine, plugin_env(&[], None));
    registry.sync(&plugins, false);
    assert_eq!(registry.source("crm").unwrap().dir, plugins.join("crm"));
    let errors = registry.load_errors();
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert_eq!(errors[0].0, backup);
    assert!(errors[0].1.contains("a source plugin named \"crm\" is already loaded from"), "{errors:?}");
}

#[tokio::test]
async fn a_folder_gone_for_a_moment_is_not_unloaded_and_one_gone_for_good_is() {
    let dir = tempfile::tempdir().unwrap();
    let plugins = plugins_dir(dir.path(), &["crm", "meta-capi"]);
    let engine = Arc::new(PluginEngine::new(EngineOptions::default()).unwrap());
    let registry = crm_event_handler::plugins::Registry::new(engine, plugin_env(&[], None));
    registry.sync(&plugins, false);
    let folder = plugins.join("meta-capi");
    let aside = dir.path().join("meta-capi.aside");

    // Moved aside for one poll (a deploy that replaces the folder), then back.
    std::fs::rename(&folder, &aside).unwrap();
    assert!(registry.sync(&plugins, true).is_empty());
    assert!(registry.destination("meta-capi").is_some(), "one poll is not enough to unload");
    std::fs::rename(&aside, &folder).unwrap();
    assert!(registry.sync(&plugins, true).is_empty());
    assert!(registry.sync(&plugins, true).is_empty());
    assert!(registry.destination("meta-capi").is_some());

    // Gone on two polls: unloaded.
    std::fs::rename(&folder, &aside).unwrap();
    registry.sync(&plugins, true);
    let changes = registry.sync(&plugins, true);
    assert!(
        matches!(&changes[..], [crm_event_handler::plugins::Change::Unloaded { name }] if name == "meta-capi"),
        "{changes:?}"
    );
    assert!(registry.destination("meta-capi").is_none());
}

#[tokio::test]
async fn webhooks_for_a_source_that_just_went_away_answer_503_so_the_crm_retries() {
    let r = start(&[]).await;
    std::fs::remove_dir_all(r.plugins.join("crm")).unwrap();
    eventually("the source to be unloaded", WAIT, async || r.app.plugins.source("crm").is_none().then_some(())).await;
    let (status, body) =
        post_webhook(&r.base, "/api/v1/webhook/crm", "deal_updated", &payload("G-1", "Qualified")).await;
    assert_eq!((status, body["code"].as_str()), (503, Some("provider_unavailable")), "{body}");
    let (status, _) =
        post_webhook(&r.base, "/api/v1/webhook/never-loaded", "deal_updated", &payload("G-1", "Qualified")).await;
    assert_eq!(status, 404);
    let _ = r.stop.send(true);
}

/// Run `crm-event-handler plugin deploy` with these arguments: whether it
/// succeeded, and what it printed.
async fn deploy(args: &[&str]) -> (bool, String) {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_crm-event-handler"))
        .args(["plugin", "deploy"])
        .args(args)
        .env_clear()
        .env("API_KEY", API_KEY)
        .current_dir(std::env::temp_dir())
        .output()
        .await
        .unwrap();
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

/// A plugin folder as an author has it after `plugin build`: meta-capi at
/// `version`, with `component` as its component.
fn authored(into: &Path, version: &str, component: &[u8]) -> PathBuf {
    let dir = into.join("meta-capi");
    std::fs::create_dir_all(&dir).unwrap();
    let manifest = std::fs::read_to_string(repo().join("plugins/meta-capi/plugin.toml")).unwrap();
    std::fs::write(
        dir.join("plugin.toml"),
        manifest.replace("version = \"0.1.0\"", &format!("version = \"{version}\"")),
    )
    .unwrap();
    std::fs::write(dir.join("meta-capi.wasm"), component).unwrap();
    dir
}

/// `plugin deploy` puts a new version in place and returns once the host
/// runs it. A broken one is refused with the host's reason while the
/// running version stays; one never built is refused before anything moves.
#[tokio::test]
async fn plugin_deploy_returns_once_the_host_runs_the_new_version() {
    let dir = tempfile::tempdir().unwrap();
    let plugins = plugins_dir(dir.path(), &["crm", "meta-capi"]);
    let meta = StandIn::meta().await;
    let mut vars = meta_host(dir.path(), &plugins, &meta);
    vars.push(("PLUGIN_RELOAD_MS", "100".to_string()));
    let host = Host::start(&vars).await;
    let to = plugins.display().to_string();
    let meta_version = async || -> String {
        let body: Value = reqwest::Client::new()
            .get(format!("{}/api/v1/plugins", host.url))
            .header("x-api-key", API_KEY)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let plugins = body["plugins"].as_array().unwrap().clone();
        let meta = plugins.into_iter().find(|p| p["name"] == "meta-capi").expect("meta-capi is loaded");
        meta["version"].as_str().unwrap().to_string()
    };
    let component = std::fs::read(plugins.join("meta-capi/meta-capi.wasm")).unwrap();

    let next = authored(&dir.path().join("v011"), "0.1.1", &component);
    let (ok, out) = deploy(&[next.to_str().unwrap(), "--to", &to, "--url", &host.url]).await;
    assert!(ok, "{out}");
    assert!(out.contains("live: meta-capi 0.1.1"), "{out}");
    assert_eq!(meta_version().await, "0.1.1", "the host runs it when the command returns");
    let folders = || {
        let mut left: Vec<String> = std::fs::read_dir(&plugins)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        left
    };
    assert_eq!(folders(), ["crm", "meta-capi"], "nothing is left aside");
    let (status, body) =
        post_webhook(&host.url, "/api/v1/webhook/crm", "deal_updated", &payload("DEP-1", "Qualified")).await;
    assert_eq!(status, 200, "{body}");
    eventually("the Lead", Duration::from_secs(20), async || (meta.events().len() == 1).then_some(())).await;

    let broken = authored(&dir.path().join("v012"), "0.1.2", b"not a component");
    let (ok, out) = deploy(&[broken.to_str().unwrap(), "--to", &to, "--url", &host.url, "--wait", "20"]).await;
    assert!(!ok, "{out}");
    assert!(out.contains("the host refused") && out.contains("the previous files are back in place"), "{out}");
    assert_eq!(meta_version().await, "0.1.1");
    // Rolled back on disk too: a restart meets the version that runs.
    let manifest = std::fs::read_to_string(plugins.join("meta-capi/plugin.toml")).unwrap();
    assert!(manifest.contains("version = \"0.1.1\""), "{manifest}");
    assert_eq!(std::fs::read(plugins.join("meta-capi/meta-capi.wasm")).unwrap(), component);
    assert_eq!(folders(), ["crm", "meta-capi"], "nothing is left aside");

    // A folder holding more than a plugin (its sources, say) is not replaced.
    std::fs::write(plugins.join("meta-capi/NOTES.md"), "the operator's notes").unwrap();
    let (ok, out) = deploy(&[broken.to_str().unwrap(), "--to", &to, "--url", &host.url]).await;
    assert!(!ok && out.contains("holds more than a plugin's manifest and component (NOTES.md)"), "{out}");
    assert!(plugins.join("meta-capi/NOTES.md").is_file());
    std::fs::remove_file(plugins.join("meta-capi/NOTES.md")).unwrap();

    let unbuilt = dir.path().join("unbuilt/meta-capi");
    std::fs::create_dir_all(&unbuilt).unwrap();
    std::fs::copy(next.join("plugin.toml"), unbuilt.join("plugin.toml")).unwrap();
    let before = std::fs::read(plugins.join("meta-capi/meta-capi.wasm")).unwrap();
    let (ok, out) = deploy(&[unbuilt.to_str().unwrap(), "--to", &to, "--url", &host.url]).await;
    assert!(!ok && out.contains("build it first"), "{out}");
    assert_eq!(std::fs::read(plugins.join("meta-capi/meta-capi.wasm")).unwrap(), before, "nothing moved");
}
