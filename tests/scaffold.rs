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
