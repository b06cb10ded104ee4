#!/usr/bin/env bash
# Brings up a working local lain cluster on loopback: installs what is missing, starts etcd,
# the Docker engines, a registry, Kafka and OpenSearch, builds lain, starts each lain component
# with the configuration in examples/local/, builds and deploys examples/hello, and shows it
# working: a request through the proxy, a DNS lookup, `lain ps` and `lain logs`. Running it
# again is harmless. `--down` stops everything it started.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/lain-target}"
state="${LAIN_SERVICES_DIR:-/var/tmp/lain-services}/cluster"
mkdir -p "$state"
step() { printf '==> %s\n' "$*" >&2; }

# The components in start order; each runs only when its config exists in examples/local/.
# The part of a name before a dash is the subcommand (logship-node2 runs `lain logship`).
components=(controlplane proxy dns logship logship-node2)

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
eval "$(tests/services/all.sh start etcd docker registry kafka opensearch)"
step "building lain"
cargo build --bin lain --locked >&2
lain="$CARGO_TARGET_DIR/debug/lain"

# The first admin token, created once; `init` refuses when an admin already exists.
token_file="$state/admin.token"
if [ ! -s "$token_file" ]; then
    step "creating the first admin token"
    (umask 077 && "$lain" controlplane init -c examples/local/controlplane.toml > "$token_file")
fi

for c in "${components[@]}"; do
    cfg="examples/local/$c.toml"
    [ -f "$cfg" ] || continue
    pidfile="$state/$c.pid"
    if [ -f "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null; then
        step "lain $c already runs (pid $(cat "$pidfile"))"
        continue
    fi
    step "starting lain $c"
    LAIN_ETCD="$LAIN_ETCD" nohup "$lain" "${c%%-*}" --config "$cfg" > "$state/$c.out" 2> "$state/$c.log" &
    echo $! > "$pidfile"
done

# The CLI talks to the control plane's API with the admin token.
export LAIN_CONFIG="$state/cli.toml"
api=http://127.0.0.1:9105
for _ in $(seq 1 100); do
    curl -fsS "$api/healthz" 2>/dev/null | grep -q '"leader":true' && break
    sleep 0.2
done
"$lain" login --server "$api" --token "$(cat "$token_file")" >&2

step "building and deploying examples/hello"
# The demo is built from the checked-out commit; local edits are included in the image.
DOCKER_HOST="${LAIN_DOCKER_NODES%%,*}" "$lain" build examples/hello --push "$LAIN_REGISTRY" --allow-dirty >&2
"$lain" app create examples/hello >&2
"$lain" deploy hello >&2

step "hello through the proxy (Host: hello.lain.local)"
curl -fsS -H 'Host: hello.lain.local' http://127.0.0.1:8080/ || echo "(no answer from the proxy)"
step "DNS: web.hello.lain"
dig +short -p 5353 @127.0.0.1 web.hello.lain A || true
step "lain ps hello"
"$lain" ps hello
step "lain logs hello"
for _ in $(seq 1 50); do
    curl -fsS -o /dev/null -H 'Host: hello.lain.local' http://127.0.0.1:8080/ || true
    out=$(cat "$state"/logs/lain*.ndjson 2>/dev/null | grep -c '"hello"' || true)
    [ "${out:-0}" -gt 0 ] && break
    sleep 0.2
done
for f in "$state"/logs/lain.ndjson "$state"/logs/lain-node2.ndjson; do
    [ -f "$f" ] && "$lain" logs hello --file "$f" -n 5 --since 1h
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
echo "use the CLI with: export LAIN_CONFIG=$LAIN_CONFIG; $lain ps hello" >&2
echo "stop everything with: bash scripts/up.sh --down" >&2
