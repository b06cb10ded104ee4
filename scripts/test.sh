#!/usr/bin/env bash
# Runs every lain test against real services: installs what is missing, starts etcd, two
# Docker engines, Kafka and OpenSearch on loopback, checks formatting and lints, then runs
# the whole workspace's tests. Services this script started are stopped when it ends.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/lain-target}"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"
step() { printf '\n==> %s (%ss)\n' "$*" "$SECONDS" >&2; }

step "system packages"
bash scripts/deps.sh

step "formatting and lints"
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings

step "services"
started_here=0
if ! (. tests/services/env.sh && [ -n "${LAIN_ETCD:-}" ] && [ -n "${LAIN_ES:-}" ] && [ -n "${LAIN_KAFKA:-}" ] \
      && [ -n "${LAIN_ETCD_CLUSTER:-}" ] && [ -n "${LAIN_DOCKER_NODES:-}" ]); then
    started_here=1
fi
eval "$(tests/services/all.sh start)"
if [ "$started_here" = 1 ] && [ "${LAIN_KEEP_SERVICES:-0}" != 1 ]; then
    trap 'step "stopping services"; "$root/tests/services/all.sh" stop >&2 || true' EXIT
fi

step "build"
cargo build --workspace --bins --locked

step "tests"
cargo test --workspace --locked --no-fail-fast

step "API fuzzing from the OpenAPI document"
bash tests/api_fuzz.sh

step "DNS request-handler fuzzing (${FUZZ_SECS:-60}s)"
FUZZ_SECS="${FUZZ_SECS:-60}" bash dns/fuzz/run.sh

step "done"
