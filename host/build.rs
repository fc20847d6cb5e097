//! Builds the plugin components (Rust guests in this workspace) for
//! `wasm32-wasip2` and places each next to its `plugin.toml`, so `cargo run`
//! and `cargo test` always load plugins built from the current sources. The
//! nested build uses its own target directory, as wasmtime's test programs
//! do, so it never waits on the outer build's lock.

use std::path::{Path, PathBuf};
use std::process::Command;

/// (folder, package, component file named in its plugin.toml)
const GUESTS: [(&str, &str, &str); 5] = [
    ("plugins/crm", "crm-plugin", "crm.wasm"),
    ("plugins/meta-capi", "meta-capi-plugin", "meta-capi.wasm"),
    ("plugins/brevo", "brevo-plugin", "brevo.wasm"),
    ("tests/plugins/misbehave", "misbehave-plugin", "misbehave.wasm"),
    ("tests/plugins/slow-source", "slow-source-plugin", "slow-source.wasm"),
];

fn main() {
    let host_dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let root = host_dir.parent().expect("host/ is inside the workspace").to_path_buf();
    println!("cargo:rerun-if-changed={}", root.join("wit").display());
    println!("cargo:rerun-if-changed={}", root.join("sdk/src").display());
    println!("cargo:rerun-if-changed={}", root.join("Cargo.lock").display());
    println!("cargo:rerun-if-changed={}", root.join("Cargo.toml").display()); // the plugin profile
    for (dir, _, _) in GUESTS {
        println!("cargo:rerun-if-changed={}", root.join(dir).join("src").display());
        println!("cargo:rerun-if-changed={}", root.join(dir).join("Cargo.toml").display());
    }
    println!("cargo:rerun-if-env-changed=CRM_SKIP_PLUGIN_BUILD");
    let out_dir = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    if std::env::var_os("CRM_SKIP_PLUGIN_BUILD").is_none() {
        build_plugins(&root, &out_dir);
    }
    bundle(&root, &out_dir);
}

/// The plugins built into the binary (crm, meta-capi, brevo): their folder
/// name, manifest and component, for `host/src/plugins/bundled.rs`. Empty
/// when the components were not built (CRM_SKIP_PLUGIN_BUILD).
fn bundle(root: &Path, out_dir: &Path) {
    let mut list = String::from("&[\n");
    for (dir, _, file) in &GUESTS[..3] {
        let (manifest, component) = (root.join(dir).join("plugin.toml"), root.join(dir).join(file));
        println!("cargo:rerun-if-changed={}", manifest.display());
        println!("cargo:rerun-if-changed={}", component.display()); // reruns when it appears or goes
        if component.is_file() {
            let name = Path::new(dir).file_name().and_then(|n| n.to_str()).expect("a folder name");
            list.push_str(&format!(
                "    ({name:?}, include_str!({:?}), include_bytes!({:?})),\n",
                manifest.display().to_string(),
                component.display().to_string()
            ));
        }
    }
    list.push(']');
    std::fs::write(out_dir.join("bundled.rs"), list).expect("cannot write bundled.rs");
}

fn build_plugins(root: &Path, out_dir: &Path) {
    // OUT_DIR is <target>/<profile>/build/<pkg>-<hash>/out: share one
    // plugin build across profiles at <target>/plugins.
    let target_dir = out_dir.ancestors().nth(4).unwrap_or(out_dir).join("plugins");

    ensure_wasm_target();
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(root)
        .args(["build", "--locked", "--profile", "plugin", "--target", "wasm32-wasip2", "--target-dir"])
        .arg(&target_dir);
    for (_, package, _) in GUESTS {
        cmd.args(["-p", package]);
    }
    for var in
        ["CARGO_ENCODED_RUSTFLAGS", "RUSTFLAGS", "CARGO_TARGET_DIR", "CARGO_BUILD_TARGET", "RUSTC_WORKSPACE_WRAPPER"]
    {
        cmd.env_remove(var);
    }
    let status = cmd.status().expect("could not run cargo to build the plugins");
    if !status.success() {
        fail("building the plugins for wasm32-wasip2 failed; the compiler's errors are above");
    }
    for (dir, package, file) in GUESTS {
        let built = target_dir.join("wasm32-wasip2/plugin").join(format!("{}.wasm", package.replace('-', "_")));
        copy_if_changed(&built, &root.join(dir).join(file));
    }
}

/// The plugins need the standard library for `wasm32-wasip2`. rustup
/// installs a toolchain file's targets only with the toolchain itself, so a
/// machine that already had this toolchain lacks it: add it through rustup
/// when rustup manages this compiler, or stop with the one line to run.
fn ensure_wasm_target() {
    const TARGET: &str = "wasm32-wasip2";
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let sysroot = Command::new(&rustc).args(["--print", "sysroot"]).output().ok().filter(|out| out.status.success());
    let Some(sysroot) = sysroot.map(|out| PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())) else {
        return; // the nested build reports the compiler's own error
    };
    if sysroot.join("lib/rustlib").join(TARGET).join("lib").is_dir() {
        return;
    }
    let Ok(toolchain) = std::env::var("RUSTUP_TOOLCHAIN") else {
        fail(&format!(
            "the Rust standard library for {TARGET} is not installed in {}; install it for this compiler \
             (with rustup: `rustup target add {TARGET}`)",
            sysroot.display()
        ));
    };
    println!("cargo:warning=installing the {TARGET} target for toolchain {toolchain} (rustup target add)");
    let added = Command::new("rustup")
        .args(["target", "add", "--toolchain", &toolchain, TARGET])
        // Cargo reads a build script's stdout for its directives.
        .stdout(std::io::stderr())
        .status()
        .is_ok_and(|status| status.success());
    if !added {
        fail(&format!("could not add the {TARGET} target; run `rustup target add --toolchain {toolchain} {TARGET}`"));
    }
}

/// Stops the build with one line, not a build-script panic's backtrace.
fn fail(message: &str) -> ! {
    eprintln!("error: {message}");
    std::process::exit(1);
}

fn copy_if_changed(from: &Path, to: &Path) {
    let new = std::fs::read(from).unwrap_or_else(|e| panic!("missing built plugin {}: {e}", from.display()));
    if std::fs::read(to).ok().as_deref() != Some(new.as_slice()) {
        std::fs::write(to, &new).unwrap_or_else(|e| panic!("cannot write {}: {e}", to.display()));
    }
}
