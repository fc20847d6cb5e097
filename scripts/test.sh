#!/usr/bin/env bash
# The whole test suite, from a fresh machine: installs what it needs (the
# wasm32-wasip2 target; Python tooling for the example plugin is installed by
# the test that builds it), then runs every test in the workspace.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! rustup target list --installed 2>/dev/null | grep -qx wasm32-wasip2; then
    echo "installing the wasm32-wasip2 target"
    rustup target add wasm32-wasip2
fi

cargo test --workspace --locked "$@"
