//! `plugin new` → `plugin build` → `plugin check` → dry run, in Rust,
//! Python and JavaScript, for a source and a destination each, and each new
//! plugin's own test in its language's runner. This is what a plugin author
//! does first; it needs cargo, python3 and npm (`./scripts/test.sh` has
//! them). `plugin build` installs componentize-py and componentize-js into
//! `CRM_PLUGIN_TOOLS` on first use; the suite keeps them in its target dir.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;

use support::repo;

fn binary() -> &'static str {
    env!("CARGO_BIN_EXE_crm-event-handler")
}

/// Where built tools and Rust artifacts are kept between runs.
fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| repo().join("target"))
}

/// Run a command to success; its stdout.
fn run(command: &mut Command) -> String {
    let shown = format!("{command:?}");
    let out = command.output().unwrap_or_else(|e| panic!("cannot run {shown}: {e}"));
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{shown} failed:\n{stdout}\n{stderr}");
    stdout.into_owned()
}

fn tool(dir: &Path, args: &[&str]) -> String {
    run(Command::new(binary())
        .args(args)
        .current_dir(dir)
        .env("CRM_PLUGIN_TOOLS", target_dir().join("plugin-tools"))
        .env("CARGO_TARGET_DIR", target_dir())
        // The dry run of a destination parses with the bundled crm source.
        .env("PLUGINS_DIR", dir.join("no-plugins-here")))
}

/// new → build → check → dry run → the plugin's own test.
fn a_new_plugin_builds_checks_and_runs(lang: &str, kind: &str, test: &[&str]) {
    let work = tempfile::tempdir().unwrap();
    let name = format!("{lang}-{kind}");
    tool(work.path(), &["plugin", "new", &name, "--kind", kind, "--lang", lang]);
    let dir = work.path().join(&name);
    for file in ["plugin.toml", "wit/plugin.wit", "README.md", "example-payload.json"] {
        assert!(dir.join(file).is_file(), "{file} missing");
    }
    let contract = std::fs::read_to_string(repo().join("wit/plugin.wit")).unwrap();
    assert_eq!(std::fs::read_to_string(dir.join("wit/plugin.wit")).unwrap(), contract);
    // A Rust destination builds on the SDK the bundled destinations use.
    if (lang, kind) == ("rust", "destination") {
        let sdk = std::fs::read_to_string(repo().join("sdk/src/lib.rs")).unwrap();
        assert_eq!(std::fs::read_to_string(dir.join("sdk/src/lib.rs")).unwrap(), sdk);
        assert!(std::fs::read_to_string(dir.join("src/lib.rs")).unwrap().contains("crm_plugin_sdk::export!(Plugin)"));
    }

    let built = tool(work.path(), &["plugin", "build", &name]);
    assert!(built.contains(&format!("built {}", dir.join(format!("{name}.wasm")).display())), "{built}");
    let checked = tool(work.path(), &["plugin", "check", &name]);
    assert!(checked.starts_with(&format!("ok: {name} 0.1.0 ({kind})")), "{checked}");
    let payload = dir.join("example-payload.json");
    let payload = payload.to_str().unwrap();
    if kind == "source" {
        let parsed = tool(work.path(), &["plugin", "run", &name, "--payload", payload]);
        assert!(parsed.contains("\"reference\": \"D-1001\"") && parsed.contains("jane.doe@example.com"), "{parsed}");
    } else {
        let sent = tool(work.path(), &["plugin", "run", &name, "--payload", payload, "--action", "notify"]);
        assert!(sent.contains("POST https://example.com/crm-events"), "{sent}");
        assert!(sent.contains("\"id\": \"D-927483-XYZ\"") && sent.contains("none sent"), "{sent}");
        assert!(sent.contains("outcome, given a 200 answer: delivered"), "{sent}");
    }
    let (program, args) = test.split_first().unwrap();
    run(Command::new(program).args(args).current_dir(&dir).env("CARGO_TARGET_DIR", target_dir()));
}

#[test]
fn a_rust_source_and_destination() {
    a_new_plugin_builds_checks_and_runs("rust", "source", &["cargo", "test", "--quiet"]);
    a_new_plugin_builds_checks_and_runs("rust", "destination", &["cargo", "test", "--quiet"]);
}

#[test]
fn a_python_source_and_destination() {
    a_new_plugin_builds_checks_and_runs("python", "source", &["python3", "-m", "unittest"]);
    a_new_plugin_builds_checks_and_runs("python", "destination", &["python3", "-m", "unittest"]);
}

#[test]
fn a_javascript_source_and_destination() {
    a_new_plugin_builds_checks_and_runs("js", "source", &["node", "--test"]);
    a_new_plugin_builds_checks_and_runs("js", "destination", &["node", "--test"]);
}

#[test]
fn a_bad_name_or_an_existing_folder_is_refused_with_the_reason() {
    let work = tempfile::tempdir().unwrap();
    let out = Command::new(binary())
        .args(["plugin", "new", "Bad_Name", "--kind", "source", "--lang", "rust"])
        .current_dir(work.path())
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && said.contains("must be 1-64 characters of a-z, 0-9 and '-'"), "{said}");
    std::fs::create_dir(work.path().join("taken")).unwrap();
    let out = Command::new(binary())
        .args(["plugin", "new", "taken", "--kind", "source", "--lang", "js"])
        .current_dir(work.path())
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("exists already"));
    let out = Command::new(binary()).args(["plugin", "build", "."]).current_dir(work.path()).output().unwrap();
    assert!(!out.status.success());
}

/// The JavaScript Pipedrive example, built with `plugin build`, in a real
/// host: a won deal reaches Meta as a Purchase, a deal moved to a mapped
/// stage as a Lead, and a webhook with the wrong credentials is refused.
#[tokio::test]
async fn the_pipedrive_example_turns_deal_changes_into_meta_events() {
    use support::*;
    let work = tempfile::tempdir().unwrap();
    let plugins = plugins_dir(work.path(), &["meta-capi", "brevo"]);
    let pipedrive = plugins.join("pipedrive");
    let example = repo().join("examples/pipedrive-js");
    std::fs::create_dir_all(pipedrive.join("wit")).unwrap();
    for file in ["plugin.toml", "app.js", "logic.js"] {
        std::fs::copy(example.join(file), pipedrive.join(file)).unwrap();
    }
    std::fs::copy(repo().join("wit/plugin.wit"), pipedrive.join("wit/plugin.wit")).unwrap();
    tool(work.path(), &["plugin", "build", pipedrive.to_str().unwrap()]);

    let (meta, brevo) = (StandIn::meta().await, StandIn::brevo().await);
    let mut vars = host_vars(&work.path().join("data"), &plugins, &meta, &brevo);
    vars.extend([
        ("PIPEDRIVE_WEBHOOK_USER", "pipe".to_string()),
        ("PIPEDRIVE_WEBHOOK_PASSWORD", "s3cret".to_string()),
        ("PIPEDRIVE_STAGE_MAP", "3=Qualified".to_string()),
    ]);
    let host = Host::start(&vars).await;
    // Meta takes events of the last 7 days: the change happened a minute ago.
    let changed_at = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() - 60;
    let post = async |payload: &str, credentials: &str| {
        use base64::Engine;
        let basic = base64::engine::general_purpose::STANDARD.encode(credentials);
        let mut body: serde_json::Value =
            serde_json::from_slice(&std::fs::read(example.join("payloads").join(payload)).unwrap()).unwrap();
        body["meta"]["timestamp"] = changed_at.into();
        let response = reqwest::Client::new()
            .post(format!("{}/api/v1/webhook/pipedrive", host.url))
            .header("authorization", format!("Basic {basic}"))
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        (status, response.json::<serde_json::Value>().await.unwrap_or_default())
    };
    let (status, body) = post("deal-won.json", "pipe:wrong").await;
    assert_eq!((status, body["code"].as_str()), (401, Some("unauthorized")), "{body}");

    let (status, body) = post("deal-won.json", "pipe:s3cret").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!((body["reference"].as_str(), body["status"].as_str()), (Some("42"), Some("Committed")), "{body}");
    let (status, body) = post("deal-stage-changed.json", "pipe:s3cret").await;
    assert_eq!((status, body["status"].as_str()), (200, Some("Qualified")), "{body}");
    let events = eventually("the Purchase and the Lead at Meta", std::time::Duration::from_secs(60), async || {
        let events = meta.events();
        (events.len() == 2).then_some(events)
    })
    .await;
    let purchase = events.iter().find(|e| e["event_name"] == "Purchase").expect("a Purchase");
    assert_eq!(purchase["custom_data"]["deal_id"], "42");
    assert_eq!(purchase["custom_data"]["value"], 480000.0);
    assert_eq!(purchase["custom_data"]["currency"], "USD");
    assert_eq!(purchase["event_time"], changed_at);
    assert!(purchase["user_data"]["external_id"][0].is_string(), "the deal's person, to match on: {purchase}");
    assert!(events.iter().any(|e| e["event_name"] == "Lead" && e["custom_data"]["deal_id"] == "43"), "{events:?}");
}

/// The example's TypeScript declarations are what jco generates from the
/// contract today.
#[test]
fn the_pipedrive_types_match_the_contract() {
    let tools = target_dir().join("plugin-tools/jco-1.10.2");
    let jco = tools.join("node_modules/.bin/jco");
    if !jco.is_file() {
        std::fs::create_dir_all(&tools).unwrap();
        run(Command::new("npm")
            .args(["install", "--silent", "--no-audit", "--no-fund", "--prefix"])
            .arg(&tools)
            .arg("@bytecodealliance/jco@1.10.2"));
    }
    let work = tempfile::tempdir().unwrap();
    std::fs::create_dir(work.path().join("wit")).unwrap();
    std::fs::copy(repo().join("wit/plugin.wit"), work.path().join("wit/plugin.wit")).unwrap();
    run(Command::new(&jco).args(["guest-types", "wit", "-n", "source", "-o", "types", "-q"]).current_dir(work.path()));
    let committed = repo().join("examples/pipedrive-js/types");
    for file in ["source.d.ts", "interfaces/crm-plugin-types.d.ts", "interfaces/crm-plugin-http.d.ts"] {
        let generated = std::fs::read_to_string(work.path().join("types").join(file)).unwrap();
        assert_eq!(
            std::fs::read_to_string(committed.join(file)).unwrap(),
            generated,
            "{file} is out of date: see its README"
        );
    }
}
