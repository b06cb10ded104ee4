#!/usr/bin/env bash
# Benchmark of `lain controlplane` on real etcd and the harness's two Docker engines, served
# through a real `lain proxy`: deploy → first request served (1 and 10 instances), container
# kill → served again, and scale 1 → 20. Prints a markdown table and writes
# target/bench/controlplane.json.
#
# Knobs: BENCH_REPS (default 20), BENCH_SCALE_REPS (default 3), BENCH_PROFILE (release by
# default; `dev` reuses a debug build, whose timings are dominated by Docker all the same),
# LAIN_BIN (a `lain` binary to run the proxy from, skipping its build).
set -euo pipefail

root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"
mkdir -p "$root/target/bench"
log() { echo "bench: $*" >&2; }

# The harness's etcd and Docker engines; started if they are not running (idempotent), and
# stopped at the end only when this run started them.
stop_services=()
stop_started() {
  for s in "${stop_services[@]:-}"; do
    [ -n "$s" ] && { tests/services/$s >&2 || true; }
  done
}
trap stop_started EXIT
if [ -f tests/services/env.sh ]; then . tests/services/env.sh >/dev/null 2>&1 || true; fi
if [ -z "${LAIN_ETCD:-}" ]; then
  log "starting etcd"
  stop_services+=("etcd.sh stop-single")
  eval "$(tests/services/etcd.sh start)"
fi
if [ -z "${LAIN_DOCKER_NODES:-}" ]; then
  log "starting the Docker engines"
  stop_services+=("docker.sh stop")
  eval "$(tests/services/docker.sh start)"
fi

profile=${BENCH_PROFILE:-release}
flag=--release
[ "$profile" = release ] || flag=
log "building the driver ($profile)"
cargo build $flag -p lain-controlplane --example bench_controlplane >&2
target_dir=$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')
[ "$profile" = release ] || profile=debug
bin="$target_dir/$profile"
lain=${LAIN_BIN:-}
if [ -z "$lain" ]; then
  log "building lain ($profile)"
  cargo build $flag --bin lain >&2
  lain="$bin/lain"
fi

log "machine: $(nproc) CPUs, $(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -1)"
CARGO_BIN_EXE_lain="$lain" BENCH_OUT="$root/target/bench/controlplane.json" LAIN_LOG=warn \
  timeout 1800 "$bin/examples/bench_controlplane"
