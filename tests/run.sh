#!/usr/bin/env bash
# The test command. On a fresh machine it installs what the tests need
# (a Python virtualenv with DuckDB, pyarrow and moto, cached under
# ~/.cache/watershed), builds the workspace, and runs every test:
# unit, property, CLI and end-to-end tests against the real `watershed`
# binary on loopback ports, and AWS KMS (master keys, `serve`, `keys seal`)
# against moto.
#
#   WATERSHED_TEST_CACHE   cache directory (default ~/.cache/watershed)
#   CARGO_TARGET_DIR  build directory (default $WATERSHED_TEST_CACHE/target)
set -euo pipefail
cd "$(dirname "$0")/.."

cache="${WATERSHED_TEST_CACHE:-$HOME/.cache/watershed}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$cache/target}"
mkdir -p "$cache"

venv="$cache/venv"
if ! "$venv/bin/python" -c 'import duckdb, pyarrow, moto.server' 2>/dev/null; then
    echo "==> creating the test virtualenv (DuckDB, pyarrow, moto) in $venv"
    if ! python3 -m venv "$venv" 2>/dev/null; then
        echo "==> python3 -m venv failed; installing python3-venv"
        apt-get update -qq && apt-get install -y -qq python3-venv
        python3 -m venv "$venv"
    fi
    "$venv/bin/pip" install --quiet --disable-pip-version-check -r tests/requirements.txt
fi
export WATERSHED_TEST_PYTHON="$venv/bin/python"

echo "==> building"
cargo build --locked --workspace --all-targets

echo "==> checking the example schemas"
"$CARGO_TARGET_DIR/debug/watershed" schema check schemas

echo "==> running the tests (the KMS ones against moto)"
cargo test --locked --workspace
