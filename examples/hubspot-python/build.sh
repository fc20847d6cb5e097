#!/usr/bin/env bash
# Build the HubSpot source plugin: examples/hubspot-python/hubspot.wasm.
#
#   examples/hubspot-python/build.sh           # build if anything changed
#   examples/hubspot-python/build.sh --force   # rebuild regardless
#
# Runnable from any directory. Creates .venv/ (python3 -m venv) if missing,
# installs requirements.txt into it when that file changed, regenerates the
# stub bindings in bindings/ when the WIT changed (for editors and
# test_app.py; the component gets its own bindings from componentize-py), and
# skips the componentize step when hubspot.wasm is newer than every input.
# Needs python3 >= 3.10 with venv, and PyPI (first run only).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")"
here=$(pwd)
wit_dir=../../wit
out=hubspot.wasm
force=0
case "${1:-}" in
    --force) force=1 ;;
    "") ;;
    *) echo "usage: $0 [--force]" >&2; exit 2 ;;
esac

python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    echo "creating .venv with $python"
    "$python" -m venv .venv
fi
stamp=.venv/.requirements-installed
if [ ! -f "$stamp" ] || [ requirements.txt -nt "$stamp" ] || [ ! -x .venv/bin/componentize-py ]; then
    echo "installing requirements.txt into .venv"
    .venv/bin/python -m pip install --quiet --disable-pip-version-check -r requirements.txt
    touch "$stamp"
fi
cpy=(.venv/bin/componentize-py -d "$wit_dir" -w source)

# Every input of the component; a change to any of them means a rebuild.
wit_files=()
while IFS= read -r f; do wit_files+=("$f"); done < <(find "$wit_dir" -name '*.wit' | sort)
inputs=(app.py mapping.py plugin.toml requirements.txt "${wit_files[@]}")

newer_than() { # newer_than TARGET FILE...: true if any FILE is newer than TARGET
    local target=$1 f
    shift
    for f in "$@"; do
        [ "$f" -nt "$target" ] && return 0
    done
    return 1
}

if [ ! -f bindings/wit_world/__init__.py ] || newer_than bindings/wit_world/__init__.py "${wit_files[@]}" "$stamp"; then
    echo "generating stub bindings in bindings/"
    rm -rf bindings
    "${cpy[@]}" --quiet bindings bindings
fi

if [ "$force" = 0 ] && [ -f "$out" ] && ! newer_than "$out" "${inputs[@]}"; then
    echo "up to date: $here/$out"
    exit 0
fi

echo "componentizing app.py (componentize-py $(.venv/bin/componentize-py --version | awk '{print $2}'))"
start=$SECONDS
# VIRTUAL_ENV pins the extra module path to this .venv (componentize-py would
# otherwise fall back to whatever `python` is on PATH). Build to a temporary
# file so a failed build never leaves a half-written component behind.
VIRTUAL_ENV="$here/.venv" "${cpy[@]}" --quiet componentize app -p . -o "$out.tmp"
mv -f "$out.tmp" "$out"
echo "built $here/$out ($(wc -c < "$out") bytes, $((SECONDS - start)) s)"
