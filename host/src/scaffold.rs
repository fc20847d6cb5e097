//! The plugin author's start: `plugin new` writes a working plugin folder
//! (manifest, code, contract, README, a test in the language's own runner)
//! in Rust, Python or JavaScript, and `plugin build` turns any of them into
//! its component with the language's tool: cargo, componentize-py or
//! componentize-js, the last two installed on first use into a tools folder
//! (`CRM_PLUGIN_TOOLS`, default `~/.cache/crm-event-handler/plugin-tools`).

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};

use crate::plugins::Kind;
use crate::plugins::grants::own_prefix;
use crate::plugins::manifest::Manifest;

/// The contract, copied into every new plugin.
const CONTRACT: &str = include_str!("../../wit/plugin.wit");
/// crm-plugin-sdk, copied into every new Rust destination (`sdk/`: it
/// reads the contract from `../wit`, there as here).
const SDK: [(&str, &str); 2] = [
    ("sdk/Cargo.toml", include_str!("../../sdk/Cargo.toml")),
    ("sdk/src/lib.rs", include_str!("../../sdk/src/lib.rs")),
];
/// The tools `plugin build` installs, pinned: the bindings and the embedded
/// runtime come from these exact versions.
const COMPONENTIZE_PY: &str = "componentize-py==0.25.1";
const COMPONENTIZE_JS: &str = "@bytecodealliance/componentize-js@0.23.0";

/// A plugin's language.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Lang {
    Rust,
    Python,
    Js,
}

impl Lang {
    fn title(self) -> &'static str {
        match self {
            Lang::Rust => "Rust",
            Lang::Python => "Python (componentize-py)",
            Lang::Js => "JavaScript (componentize-js)",
        }
    }
}

macro_rules! template {
    ($path:literal) => {
        include_str!(concat!("../templates/", $path))
    };
}

/// The source or the destination version of a template, by its folder and
/// the end of its name (`python/source_app.py`, `python/destination_app.py`).
macro_rules! of_kind {
    ($source:expr, $folder:literal, $end:literal) => {
        if $source {
            include_str!(concat!("../templates/", $folder, "source", $end))
        } else {
            include_str!(concat!("../templates/", $folder, "destination", $end))
        }
    };
}

/// What the README says of the files every interpreted language has.
const GLUE: &str = "the glue between the contract's types and `logic`";
const LOGIC: &str = "the plugin's logic, plain code";
const TESTS: &str = "its tests";

/// Write a new plugin folder `parent/name`; its path.
pub fn create(name: &str, kind: Kind, lang: Lang, parent: &Path) -> anyhow::Result<PathBuf> {
    let source = kind == Kind::Source;
    let memory = if lang == Lang::Rust { "16" } else { "64" };
    let prefix = own_prefix(name);
    let prefix = prefix.trim_end_matches('_');
    // A Rust destination builds on crm-plugin-sdk; a source on the bindings.
    let dependencies = if source { "wit-bindgen = \"0.46\"" } else { "crm-plugin-sdk = { path = \"sdk\" }" };
    let fill = |text: &str| {
        text.replace("__NAME__", name)
            .replace("__PREFIX__", prefix)
            .replace("__MEMORY__", memory)
            .replace("__DEPENDENCIES__", dependencies)
    };
    let manifest = fill(of_kind!(source, "", ".toml"));
    // The manifest's own rules say what a name may be.
    Manifest::parse(&manifest).map_err(|e| {
        anyhow::anyhow!("cannot make a plugin named {name:?}: {}", e.to_string().trim_start_matches(": "))
    })?;
    let dir = parent.join(name);
    if dir.exists() {
        bail!("{} exists already: choose another name, or --dir", dir.display());
    }

    let mut files: Vec<(&str, String)> = vec![
        ("plugin.toml", manifest),
        ("wit/plugin.wit", CONTRACT.to_string()),
        (
            "example-payload.json",
            if source {
                template!("source-payload.json").to_string()
            } else {
                // What the bundled crm source parses, for the dry run.
                include_str!("../../examples/payloads/qualified.json").to_string()
            },
        ),
    ];
    // (path, template, what it is), the build tool, the test command.
    let (code, build, test_command): (Vec<(&str, &str, &str)>, &str, &str) = match lang {
        Lang::Rust => (
            vec![
                ("Cargo.toml", template!("rust/Cargo.toml"), "the package"),
                (
                    "src/lib.rs",
                    of_kind!(source, "rust/", ".rs"),
                    "the plugin: its logic, the glue to the contract, and its tests",
                ),
            ],
            "cargo build --release --target wasm32-wasip2, then copies the component here",
            "cargo test",
        ),
        Lang::Python => (
            vec![
                ("app.py", of_kind!(source, "python/", "_app.py"), GLUE),
                ("logic.py", of_kind!(source, "python/", "_logic.py"), LOGIC),
                ("test_logic.py", of_kind!(source, "python/", "_test.py"), TESTS),
            ],
            "componentize-py (installed on first use)",
            "python3 -m unittest -v",
        ),
        Lang::Js => (
            vec![
                ("app.js", of_kind!(source, "js/", "_app.js"), GLUE),
                ("logic.js", of_kind!(source, "js/", "_logic.js"), LOGIC),
                ("logic.test.js", of_kind!(source, "js/", "_test.js"), TESTS),
                ("package.json", template!("js/package.json"), "the package"),
            ],
            "componentize-js (installed on first use)",
            "node --test",
        ),
    };
    let with_sdk = lang == Lang::Rust && !source;
    let mut listed: String = code.iter().map(|(path, _, what)| format!("| `{path}` | {what} |\n")).collect();
    if with_sdk {
        listed.push_str(
            "| `sdk/` | crm-plugin-sdk: the contract's bindings, and settings, outcomes and Retry-After for \
             destinations |\n",
        );
    }
    let (what, try_it) = if source {
        (
            "It turns a webhook body like `example-payload.json` into one deal event (`deal.id` and `deal.status` \
             required; every problem names its field). Change the logic to read your CRM's payload.",
            "crm-event-handler plugin test . --payload example-payload.json   # the event it parses; nothing is stored",
        )
    } else {
        (
            "It POSTs each event as JSON to the URL in `__PREFIX___URL`, with the job's idempotency key and, when \
             `__PREFIX___TOKEN` is set, a bearer token; 2xx is delivered, 408, 429 and 5xx are retried, anything \
             else is final.",
            "crm-event-handler plugin test . --payload example-payload.json --action notify   # the request it would send; nothing is sent",
        )
    };
    let readme = fill(
        &template!("README.md")
            .replace("__KIND__", &kind.to_string())
            .replace("__LANGUAGE__", lang.title())
            .replace("__WHAT__", what)
            .replace("__FILES__\n", &listed)
            .replace("__BUILD__", build)
            .replace("__TRY__", try_it)
            .replace("__TEST__", test_command),
    );
    files.push(("README.md", readme));
    files.extend(code.into_iter().map(|(path, text, _)| (path, fill(text))));
    if with_sdk {
        files.extend(SDK.map(|(path, text)| (path, text.to_string())));
    }
    for (path, text) in files {
        let path = dir.join(path);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).with_context(|| format!("cannot create {}", parent.display()))?;
        }
        std::fs::write(&path, text).with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(dir)
}

/// Build the component of the plugin folder `dir`, in its language; the
/// component's path.
pub fn build(dir: &Path) -> anyhow::Result<PathBuf> {
    let dir = &dir.canonicalize().with_context(|| format!("cannot open {}", dir.display()))?;
    let manifest = Manifest::load(dir)?;
    let out = dir.join(&manifest.component);
    let world = manifest.kind.to_string();
    let lang = if dir.join("Cargo.toml").is_file() {
        Lang::Rust
    } else if dir.join("app.py").is_file() {
        Lang::Python
    } else if dir.join("app.js").is_file() {
        Lang::Js
    } else {
        bail!(
            "{}: no Cargo.toml, app.py or app.js; plugin build knows Rust (cargo), Python (componentize-py) and \
             JavaScript (componentize-js)",
            dir.display()
        );
    };
    let tmp = out.with_extension("wasm.tmp");
    match lang {
        Lang::Rust => build_rust(dir, &tmp)?,
        Lang::Python => {
            let venv = tools_dir()?.join(COMPONENTIZE_PY.replace("==", "-"));
            let tool = venv.join("bin/componentize-py");
            if !tool.is_file() {
                eprintln!("installing {COMPONENTIZE_PY} into {} (first use)", venv.display());
                run(Command::new("python3").arg("-m").arg("venv").arg(&venv), "python3 -m venv")?;
                run(
                    Command::new(venv.join("bin/pip")).args([
                        "install",
                        "--quiet",
                        "--disable-pip-version-check",
                        COMPONENTIZE_PY,
                    ]),
                    "pip install componentize-py",
                )?;
            }
            run(
                Command::new(&tool)
                    .current_dir(dir)
                    .env("VIRTUAL_ENV", &venv)
                    .args(["-d", "wit", "-w", &world, "componentize", "app", "-p", ".", "-o"])
                    .arg(&tmp),
                "componentize-py",
            )?;
        }
        Lang::Js => {
            let tools = tools_dir()?.join(COMPONENTIZE_JS.replace(['/', '@'], "-").trim_start_matches('-'));
            let tool = tools.join("node_modules/.bin/componentize-js");
            if !tool.is_file() {
                eprintln!("installing {COMPONENTIZE_JS} into {} (first use)", tools.display());
                std::fs::create_dir_all(&tools)?;
                run(
                    Command::new("npm")
                        .args(["install", "--silent", "--no-audit", "--no-fund", "--prefix"])
                        .arg(&tools)
                        .arg(COMPONENTIZE_JS),
                    "npm install componentize-js",
                )?;
            }
            // Only the contract's imports: no WASI stdio, clocks, random or HTTP.
            run(
                Command::new(&tool)
                    .current_dir(dir)
                    .args([
                        "app.js",
                        "--wit",
                        "wit",
                        "--world-name",
                        &world,
                        "-d",
                        "stdio",
                        "random",
                        "clocks",
                        "http",
                        "fetch-event",
                        "-o",
                    ])
                    .arg(&tmp),
                "componentize-js",
            )?;
        }
    }
    std::fs::rename(&tmp, &out).with_context(|| format!("cannot move the component to {}", out.display()))?;
    Ok(out)
}

/// `cargo build` for wasm32-wasip2 (adding the target through rustup if it
/// is missing), then the library's component copied to `out`.
fn build_rust(dir: &Path, out: &Path) -> anyhow::Result<()> {
    let cargo_toml: toml::Table = std::fs::read_to_string(dir.join("Cargo.toml"))?.parse()?;
    let package = cargo_toml
        .get("package")
        .and_then(|p| p.get("name"))
        .and_then(|n| n.as_str())
        .context("Cargo.toml has no package.name")?;
    let installed = Command::new("rustup").args(["target", "list", "--installed"]).current_dir(dir).output();
    if let Ok(listed) = installed
        && !String::from_utf8_lossy(&listed.stdout).lines().any(|t| t == "wasm32-wasip2")
    {
        run(Command::new("rustup").args(["target", "add", "wasm32-wasip2"]).current_dir(dir), "rustup target add")?;
    }
    let target_dir = std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| dir.join("target"));
    run(
        Command::new("cargo")
            .current_dir(dir)
            .args(["build", "--release", "--target", "wasm32-wasip2", "--manifest-path"])
            .arg(dir.join("Cargo.toml"))
            .env("CARGO_TARGET_DIR", &target_dir),
        "cargo build",
    )?;
    let built = target_dir.join("wasm32-wasip2/release").join(format!("{}.wasm", package.replace('-', "_")));
    std::fs::copy(&built, out).with_context(|| format!("cannot copy {}", built.display()))?;
    Ok(())
}

/// Where `plugin build` keeps the tools it installs.
fn tools_dir() -> anyhow::Result<PathBuf> {
    if let Some(dir) = std::env::var_os("CRM_PLUGIN_TOOLS") {
        return Ok(PathBuf::from(dir));
    }
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".cache")))
        .context("set CRM_PLUGIN_TOOLS (or HOME): where plugin build may install its tools")?;
    Ok(cache.join("crm-event-handler/plugin-tools"))
}

/// Run a build step; an error names the step, and the tool's own output
/// (inherited) says why.
fn run(command: &mut Command, what: &str) -> anyhow::Result<()> {
    let status = command.status().with_context(|| format!("cannot run {what}: is it installed?"))?;
    if !status.success() {
        bail!("{what} failed ({status}); its output is above");
    }
    Ok(())
}
