#!/usr/bin/env bash
# Brings up a working local lain cluster on loopback: installs what is missing, starts etcd,
# the Docker engines, Kafka and OpenSearch, builds lain, starts each lain component with the
# configuration in examples/local/, and shows it working. `--down` stops everything it started.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/lain-target}"
state="${LAIN_SERVICES_DIR:-/var/tmp/lain-services}/cluster"
mkdir -p "$state"
step() { printf '==> %s\n' "$*" >&2; }

# The components in start order; each runs only when its config exists in examples/local/.
components=(controlplane proxy dns logship)

stop_components() {
    for c in "${components[@]}"; do
        pidfile="$state/$c.pid"
        [ -f "$pidfile" ] || continue
        pid=$(cat "$pidfile")
        if kill -0 "$pid" 2>/dev/null && grep -q "lain" "/proc/$pid/cmdline" 2>/dev/null; then
            step "stopping lain $c (pid $pid)"
            kill -TERM "$pid" || true
            for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        fi
        rm -f "$pidfile"
    done
}

if [ "${1:-}" = "--down" ]; then
    stop_components
    tests/services/all.sh stop >&2
    exit 0
fi

step "system packages"
bash scripts/deps.sh
step "services"
eval "$(tests/services/all.sh start etcd docker kafka opensearch)"
step "building lain"
cargo build --bin lain --locked >&2
lain="$CARGO_TARGET_DIR/debug/lain"

for c in "${components[@]}"; do
    cfg="examples/local/$c.toml"
    [ -f "$cfg" ] || continue
    pidfile="$state/$c.pid"
    if [ -f "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null; then
        step "lain $c already runs (pid $(cat "$pidfile"))"
        continue
    fi
    step "starting lain $c"
    LAIN_ETCD="$LAIN_ETCD" nohup "$lain" "$c" --config "$cfg" > "$state/$c.out" 2> "$state/$c.log" &
    echo $! > "$pidfile"
done

step "cluster"
printf '  etcd        %s\n  docker      %s\n  kafka       %s\n  opensearch  %s\n' \
    "$LAIN_ETCD" "$LAIN_DOCKER_NODES" "$LAIN_KAFKA" "$LAIN_ES"
for c in "${components[@]}"; do
    pidfile="$state/$c.pid"
    if [ -f "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null; then
        printf '  lain %-12s running, pid %s, log %s\n' "$c" "$(cat "$pidfile")" "$state/$c.log"
    fi
done
echo "stop everything with: bash scripts/up.sh --down" >&2
