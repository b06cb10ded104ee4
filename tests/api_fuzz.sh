#!/usr/bin/env bash
# Fuzzes the lain HTTP API from its own OpenAPI document with schemathesis for a bounded
# time: starts `lain controlplane` on loopback against the harness's etcd (a fresh key
# prefix, no Docker nodes), creates an admin token with `lain controlplane init`, and fails
# on any 5xx answer. Usage: tests/api_fuzz.sh [MAX_EXAMPLES]  (default 30 per operation).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
max_examples="${1:-${LAIN_FUZZ_MAX_EXAMPLES:-30}}"
budget_secs="${LAIN_FUZZ_BUDGET_SECS:-180}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/lain-target}"
lain="${LAIN_BIN:-$CARGO_TARGET_DIR/debug/lain}"

. tests/services/env.sh
[ -n "${LAIN_ETCD:-}" ] || { echo "api_fuzz: no etcd (run tests/services/all.sh start)" >&2; exit 1; }
[ -x "$lain" ] || cargo build --bin lain --locked >&2

venv=/var/tmp/lain-services/venv
if [ ! -x "$venv/bin/schemathesis" ]; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q schemathesis >&2
fi

work=$(mktemp -d)
pid=""
cleanup() {
    if [ -n "$pid" ]; then kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; fi
    "$venv/bin/python" - "$LAIN_ETCD" "$prefix" <<'PY' >/dev/null 2>&1 || true
import sys, urllib.request, json, base64
ep, prefix = sys.argv[1].split(",")[0], sys.argv[2]
key = base64.b64encode(prefix.encode()).decode()
end = base64.b64encode(prefix[:-1].encode() + bytes([prefix.encode()[-1] + 1])).decode()
req = urllib.request.Request(ep + "/v3/kv/deleterange", json.dumps({"key": key, "range_end": end}).encode())
urllib.request.urlopen(req, timeout=5)
PY
    rm -rf "$work"
}
prefix="/lain-fuzz/$$-$RANDOM"
trap cleanup EXIT

cat > "$work/cp.toml" <<TOML
etcd_endpoints = ["${LAIN_ETCD%%,*}"]
prefix = "$prefix"
cluster_domains = ["lain.local"]
volume_root = "$work/volumes"
secret_key_file = "$work/secret.key"
api_listen = "127.0.0.1:0"
TOML

token=$("$lain" controlplane init -c "$work/cp.toml")
"$lain" controlplane -c "$work/cp.toml" > "$work/out.log" 2> "$work/err.log" &
pid=$!
api=""
for _ in $(seq 1 100); do
    # The announcement is a JSON line whose key order is not fixed, so it is parsed as JSON.
    api=$(python3 -c 'import json, sys
for line in open(sys.argv[1]):
    try:
        v = json.loads(line)["listening"]
    except Exception:
        continue
    if v.get("name") == "api":
        print(v["addr"])' "$work/out.log" 2>/dev/null || true)
    [ -n "$api" ] && curl -fsS "http://$api/healthz" | grep -q '"leader":true' && break
    sleep 0.2
done
[ -n "$api" ] || { echo "api_fuzz: the control plane did not start" >&2; cat "$work/err.log" >&2; exit 1; }

# Adding nodes would make the engine dial whatever Docker address the fuzzer invents, so
# that one operation is left out; everything else runs with an admin token.
status=0
timeout "$budget_secs" "$venv/bin/schemathesis" run "http://$api/openapi.json" \
    --url "http://$api" \
    -H "Authorization: Bearer $token" \
    --checks not_a_server_error \
    --max-examples "$max_examples" \
    --exclude-operation-id add_node \
    --no-color >"$work/fuzz.log" 2>&1 || status=$?
tail -n 40 "$work/fuzz.log"
if grep -q '"code":"internal"' "$work/err.log" || grep -qi "panicked" "$work/err.log"; then
    echo "api_fuzz: the control plane logged an internal error or a panic" >&2
    grep -i -m 5 "internal API error\|panicked" "$work/err.log" >&2 || true
    status=1
fi
if [ "$status" = 124 ]; then
    echo "api_fuzz: schemathesis did not finish within ${budget_secs}s" >&2
fi
exit "$status"
