#!/usr/bin/env bash
# The test command. On a fresh machine it installs what the tests need
# (a Python virtualenv with DuckDB, pyarrow, moto and confluent-kafka, cached under
# ~/.cache/watershed), builds the workspace, and runs every test:
# unit, property, CLI and end-to-end tests against the real `watershed`
# binary on loopback ports, and AWS KMS (master keys, `serve`, `keys seal`)
# against moto.
#
#   WATERSHED_TEST_CACHE   cache directory (default ~/.cache/watershed)
#   CARGO_TARGET_DIR  build directory (default $WATERSHED_TEST_CACHE/target)
#   WATERSHED_TARGET_MAX_GB  when the build directory's debug profile has
#                     grown past this (default 30), it is removed and
#                     rebuilt from scratch rather than filling the disk
set -euo pipefail
cd "$(dirname "$0")/.."

cache="${WATERSHED_TEST_CACHE:-$HOME/.cache/watershed}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$cache/target}"
mkdir -p "$cache"

venv="$cache/venv"
if ! "$venv/bin/python" -c 'import duckdb, pyarrow, moto.server, confluent_kafka.schema_registry.avro, sqlglot' 2>/dev/null; then
    echo "==> creating the test virtualenv (DuckDB, pyarrow, moto, confluent-kafka, sqlglot) in $venv"
    if ! python3 -m venv "$venv" 2>/dev/null; then
        echo "==> python3 -m venv failed; installing python3-venv"
        apt-get update -qq && apt-get install -y -qq python3-venv
        python3 -m venv "$venv"
    fi
    "$venv/bin/pip" install --quiet --disable-pip-version-check -r tests/requirements.txt
fi
export WATERSHED_TEST_PYTHON="$venv/bin/python"

# A persistent build directory outlives the clones that use it: every
# checkout at a new path builds its own copy of the workspace crates, and
# every change of the lock file its own dependencies, none of which cargo
# ever removes. Incremental compilation data is never reused across fresh
# clones, so it is not written at all, and a debug profile that has grown
# past the limit starts afresh (a cold build takes a while; a full disk
# fails the run).
export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"
max_gb="${WATERSHED_TARGET_MAX_GB:-30}"
if [ -d "$CARGO_TARGET_DIR/debug" ]; then
    debug_gb=$(( $(du -sk "$CARGO_TARGET_DIR/debug" | cut -f1) / 1048576 ))
    if [ "$debug_gb" -ge "$max_gb" ]; then
        echo "==> $CARGO_TARGET_DIR/debug holds ${debug_gb} GB (limit ${max_gb} GB, WATERSHED_TARGET_MAX_GB); removing it for a clean build"
        rm -rf "$CARGO_TARGET_DIR/debug"
    fi
fi

echo "==> building"
build_start=$SECONDS
cargo build --locked --workspace --all-targets
echo "==> built in $(( SECONDS - build_start )) s"

echo "==> checking the example schemas"
"$CARGO_TARGET_DIR/debug/watershed" schema check schemas

echo "==> running the tests (the KMS ones against moto)"
cargo test --locked --workspace
