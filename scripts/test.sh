#!/usr/bin/env bash
# The whole test suite, from a fresh machine: installs what it needs, then
# runs every test in the workspace.
#   - the wasm32-wasip2 Rust target (the plugins are built for it);
#   - redis-server (tests start their own on free ports);
#   - nx-27017, a MongoDB wire-protocol server, in a venv (tests start their
#     own on free ports; NX_27017 tells them where it is);
#   - Debian's chromium and Playwright for Python (in a venv), for the web
#     page's browser test (UI_PYTHON tells it where);
#   - Python tooling for the example Python plugin is installed by its own
#     build script, which a test runs.
set -euo pipefail
cd "$(dirname "$0")/.."
target_dir="${CARGO_TARGET_DIR:-$PWD/target}"

# The toolchain pinned in rust-toolchain.toml, with the wasm target (explicit,
# so it works where rustup's auto-install is turned off).
toolchain=$(sed -n 's/^channel *= *"\(.*\)"/\1/p' rust-toolchain.toml)
if ! rustup run "$toolchain" rustc --version >/dev/null 2>&1; then
    echo "installing Rust $toolchain"
    rustup toolchain install "$toolchain" --profile minimal --component rustfmt,clippy
fi
if ! rustup target list --installed --toolchain "$toolchain" 2>/dev/null | grep -qx wasm32-wasip2; then
    echo "installing the wasm32-wasip2 target"
    rustup target add --toolchain "$toolchain" wasm32-wasip2
fi

if ! command -v redis-server >/dev/null; then
    echo "installing redis-server"
    apt-get update -qq && apt-get install -y -qq redis-server >/dev/null
fi

venv="$target_dir/nx-venv"
if [ ! -x "$venv/bin/nx-27017" ]; then
    echo "installing nx-27017 (MongoDB wire-protocol stand-in) into $venv"
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check 'nx-27017==0.8.1'
fi
export NX_27017="$venv/bin/nx-27017"

# The plugin scaffold's test builds JavaScript plugins (componentize-js,
# from npm) and runs their tests with node.
if ! command -v npm >/dev/null; then
    echo "installing nodejs and npm"
    apt-get update -qq && apt-get install -y -qq nodejs npm >/dev/null
fi

# The web page's test drives Debian's Chromium with Playwright for Python
# (which cannot download its own browsers here; it is pointed at this one).
if ! command -v chromium >/dev/null; then
    echo "installing chromium"
    apt-get update -qq && apt-get install -y -qq chromium >/dev/null
fi
ui_venv="$target_dir/ui-venv"
if [ ! -x "$ui_venv/bin/python" ] || ! "$ui_venv/bin/python" -c 'import playwright' 2>/dev/null; then
    echo "installing Playwright for Python into $ui_venv"
    python3 -m venv "$ui_venv"
    "$ui_venv/bin/pip" install --quiet --disable-pip-version-check 'playwright==1.65.2'
fi
export UI_PYTHON="$ui_venv/bin/python" CHROMIUM="$(command -v chromium)"

# Lints are part of the suite.
cargo fmt --all --check
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo test --workspace --locked "$@"
