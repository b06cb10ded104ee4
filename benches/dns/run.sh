#!/usr/bin/env bash
# Side-by-side benchmark of `lain dns` against NSD, Knot DNS, Unbound (local-data) and dnsmasq,
# all from Debian, and CoreDNS with its etcd plugin (from the Go module proxy), on loopback, one at a time, loaded by dnsperf with the same 1,000-instance
# zone and a query file with 10% non-existent names. Prints a markdown table and writes
# target/bench/dns.json. Bounded: BENCH_SECS (10) of load per server, thread count and round.
# BENCH_ROUNDS (3) rounds alternate the servers, and every figure is the median over them: on a
# shared machine one run of one server can be off by a fifth. BENCH_SERVERS restricts the run
# to some of the servers.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
secs=${BENCH_SECS:-10}
rounds=${BENCH_ROUNDS:-3}
port=${BENCH_PORT:-25353}
work=$(mktemp -d /tmp/lain-bench-dns.XXXXXX)
# Servers that drop privileges (dnsmasq) must still read their files.
chmod 755 "$work"
out="${CARGO_TARGET_DIR:-$root/target}"
mkdir -p "$root/target/bench"
trap 'stop_server; remove_coredns_records || true; rm -rf "$work"' EXIT

need=()
for b in dnsperf:dnsperf nsd:nsd knotd:knot unbound:unbound dnsmasq:dnsmasq-base; do
  command -v "${b%%:*}" >/dev/null 2>&1 || [ -x "/usr/sbin/${b%%:*}" ] || need+=("${b##*:}")
done
if [ ${#need[@]} -gt 0 ]; then
  echo "installing ${need[*]}" >&2
  apt-get install -y -q "${need[@]}" >&2 || { apt-get update -q >&2 && apt-get install -y -q "${need[@]}" >&2; }
fi
export PATH="$PATH:/usr/sbin"

# CoreDNS with its etcd plugin (one etcd Get per query), built from the Go module proxy into
# /var/tmp/lain-go when missing; it needs the etcd of tests/services (LAIN_ETCD). Skipped with
# a message when it cannot be built or there is no etcd.
coredns_version=v1.14.7
coredns=$(command -v coredns || true)
if [ -z "$coredns" ] && [ -x /var/tmp/lain-go/bin/coredns ]; then coredns=/var/tmp/lain-go/bin/coredns; fi
if [ -z "$coredns" ] && command -v go >/dev/null 2>&1; then
  echo "building CoreDNS $coredns_version from the Go module proxy" >&2
  if GOPATH=/var/tmp/lain-go GOBIN=/var/tmp/lain-go/bin timeout 1800 go install "github.com/coredns/coredns@$coredns_version" >&2; then
    coredns=/var/tmp/lain-go/bin/coredns
  fi
fi
if [ -z "${LAIN_ETCD:-}" ] && [ -x "$root/tests/services/etcd.sh" ]; then
  eval "$("$root/tests/services/etcd.sh" start)"
fi

# LAIN_BIN skips the release build (for a quick run of the script itself).
lain=${LAIN_BIN:-}
if [ -z "$lain" ]; then
  echo "building lain (release)" >&2
  (cd "$root" && cargo build --release --bin lain >&2)
  lain="$out/release/lain"
fi

# The records: 1,000 instances of 50 apps, addresses 10.1.x.y.
python3 - "$work" <<'PY'
import sys, os, random
w = sys.argv[1]
inst = [(f"app{i % 50}", i // 50 + 1, f"10.1.{i // 250}.{i % 250 + 1}") for i in range(1000)]
with open(f"{w}/state.yaml", "w") as f:
    f.write("endpoints:\n")
    for app, n, ip in inst:
        f.write(f"  - {{app: {app}, proc: web, instance: {n}, address: {ip}, port: 80}}\n")
soa = "lain. 5 IN SOA ns.lain. hostmaster.lain. 1 60 10 86400 5"
with open(f"{w}/lain.zone", "w") as f:
    f.write(f"$ORIGIN lain.\n{soa}\nlain. 5 IN NS ns.lain.\nns.lain. 5 IN A 127.0.0.1\n")
    for app, n, ip in inst:
        f.write(f"web-{n}.{app}.lain. 5 IN A {ip}\n")
with open(f"{w}/unbound-data.conf", "w") as f:
    f.write('  local-zone: "lain." static\n')
    f.write(f'  local-data: "{soa}"\n  local-data: "lain. 5 IN NS ns.lain."\n')
    for app, n, ip in inst:
        f.write(f'  local-data: "web-{n}.{app}.lain. 5 IN A {ip}"\n')
with open(f"{w}/hosts", "w") as f:
    for app, n, ip in inst:
        f.write(f"{ip} web-{n}.{app}.lain\n")
random.seed(1)
with open(f"{w}/queries.txt", "w") as f:
    for i in range(20000):
        if i % 10 == 0:
            f.write(f"nope-{i}.app{i % 50}.lain A\n")
        else:
            app, n, _ = random.choice(inst)
            f.write(f"web-{n}.{app}.lain A\n")
PY

# CoreDNS's records: SkyDNS messages under a per-run etcd prefix, written once.
coredns_path="/lain-bench-coredns-$$"
coredns_loaded=""
load_coredns_records() {
  [ -n "$coredns_loaded" ] && return 0
  python3 - "${LAIN_ETCD%%,*}" "$coredns_path" <<'PY'
import base64, json, sys, urllib.request
etcd, path = sys.argv[1], sys.argv[2]
b64 = lambda s: base64.b64encode(s.encode()).decode()
for i in range(1000):
    app, n, ip = f"app{i % 50}", i // 50 + 1, f"10.1.{i // 250}.{i % 250 + 1}"
    key = f"{path}/lain/{app}/web-{n}"
    body = json.dumps({"key": b64(key), "value": b64(json.dumps({"host": ip, "ttl": 5}))}).encode()
    req = urllib.request.Request(f"{etcd}/v3/kv/put", body, {"content-type": "application/json"})
    urllib.request.urlopen(req, timeout=5).read()
PY
  coredns_loaded=1
}
remove_coredns_records() {
  [ -n "$coredns_loaded" ] || return 0
  python3 - "${LAIN_ETCD%%,*}" "$coredns_path" <<'PY'
import base64, json, sys, urllib.request
etcd, path = sys.argv[1], sys.argv[2]
b64 = lambda s: base64.b64encode(s.encode()).decode()
body = json.dumps({"key": b64(path + "/"), "range_end": b64(path + "0")}).encode()
urllib.request.urlopen(urllib.request.Request(f"{etcd}/v3/kv/deleterange", body, {"content-type": "application/json"}), timeout=5).read()
PY
}

pid=""
stop_server() {
  if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; fi
  pid=""
}

start_server() { # name threads
  local name=$1 t=$2
  case "$name" in
    lain)
      printf 'listen = "127.0.0.1:%s"\nadmin_listen = "127.0.0.1:0"\nudp_sockets = %s\nworker_threads = %s\n[state]\nfile = "%s/state.yaml"\n' \
        "$port" "$t" "$t" "$work" > "$work/lain.toml"
      LAIN_LOG=warn "$lain" dns -c "$work/lain.toml" > /dev/null 2>"$work/lain.log" & pid=$! ;;
    nsd)
      cat > "$work/nsd.conf" <<C
server:
  ip-address: 127.0.0.1@$port
  server-count: $t
  username: ""
  zonesdir: "$work"
  pidfile: "$work/nsd.pid"
  database: ""
  xfrdfile: "$work/xfrd.state"
  zonelistfile: "$work/zone.list"
  logfile: "$work/nsd.log"
  # Debian builds NSD with response rate limiting on (200 answers/s per source), which would
  # drop most of the load generator's queries; the other servers have no such limit.
  rrl-ratelimit: 0
  rrl-whitelist-ratelimit: 0
remote-control:
  control-enable: no
zone:
  name: lain.
  zonefile: lain.zone
C
      nsd -d -c "$work/nsd.conf" & pid=$! ;;
    knot)
      mkdir -p "$work/knot"
      cat > "$work/knot.conf" <<C
server:
  listen: 127.0.0.1@$port
  udp-workers: $t
  tcp-workers: 1
  rundir: "$work/knot"
database:
  storage: "$work/knot"
template:
  - id: default
    storage: "$work"
zone:
  - domain: lain.
    file: lain.zone
log:
  - target: stderr
    any: error
C
      knotd -c "$work/knot.conf" & pid=$! ;;
    unbound)
      { printf 'server:\n  interface: 127.0.0.1\n  port: %s\n  num-threads: %s\n  do-daemonize: no\n  use-syslog: no\n  logfile: ""\n  username: ""\n  chroot: ""\n  pidfile: ""\n  directory: "%s"\n  do-ip6: no\n  module-config: "iterator"\n' "$port" "$t" "$work"
        cat "$work/unbound-data.conf"; printf 'remote-control:\n  control-enable: no\n'; } > "$work/unbound.conf"
      unbound -d -c "$work/unbound.conf" & pid=$! ;;
    coredns)
      [ -n "$coredns" ] && [ -n "${LAIN_ETCD:-}" ] || { echo "coredns: not built or no etcd; skipped" >&2; return 1; }
      load_coredns_records
      printf 'lain:%s {\n  bind 127.0.0.1\n  etcd lain {\n    path %s\n    endpoint %s\n  }\n}\n' \
        "$port" "$coredns_path" "${LAIN_ETCD%%,*}" > "$work/Corefile"
      GOMAXPROCS=$t "$coredns" -conf "$work/Corefile" > "$work/coredns.log" 2>&1 & pid=$! ;;
    dnsmasq)
      dnsmasq -k --port "$port" --listen-address 127.0.0.1 --bind-interfaces --no-resolv --no-hosts \
        --addn-hosts "$work/hosts" --local=/lain/ --cache-size=0 --pid-file= 2>"$work/dnsmasq.log" & pid=$! ;;
  esac
  for _ in $(seq 100); do
    if dig +short +time=1 +tries=1 -p "$port" @127.0.0.1 web-1.app0.lain A 2>/dev/null | grep -q 10.1.0.1; then return 0; fi
    sleep 0.1
  done
  echo "$name did not start" >&2; return 1
}

# CPU of the server and all its descendants, in clock ticks: NSD's serving processes are
# grandchildren of the one started here (xfrd -> main -> server N). Process names may contain
# spaces ("nsd: server 1"), so the fields are counted after the closing parenthesis.
cpu_ticks() {
  local total=0 c
  [ -r "/proc/$1/stat" ] && total=$(sed 's/.*) //' "/proc/$1/stat" | awk '{print $12 + $13}')
  for c in $(pgrep -P "$1" || true); do
    total=$((total + $(cpu_ticks "$c")))
  done
  echo "$total"
}
rss_mib() { awk '/VmRSS/ {printf "%.1f", $2 / 1024}' "/proc/$1/status"; }

results="$work/results.tsv"
: > "$results"
tck=$(getconf CLK_TCK)
for t in 1 2; do
 for round in $(seq "$rounds"); do
  for name in ${BENCH_SERVERS:-lain nsd knot unbound dnsmasq coredns}; do
    echo "threads $t, round $round: $name" >&2
    stop_server
    if ! start_server "$name" "$t"; then stop_server; continue; fi
    before=$(cpu_ticks "$pid")
    dnsperf -s 127.0.0.1 -p "$port" -d "$work/queries.txt" -l "$secs" -c "$t" -T "$t" > "$work/perf.txt" 2>&1 || true
    after=$(cpu_ticks "$pid")
    rss=$(rss_mib "$pid")
    stop_server
    python3 - "$work/perf.txt" "$name" "$t" "$((after - before))" "$tck" "$rss" >> "$results" <<'PY'
import re, sys
text = open(sys.argv[1]).read()
def num(pat):
    m = re.search(pat, text)
    return float(m.group(1)) if m else 0.0
done = num(r"Queries completed:\s+(\d+)")
lost = num(r"Queries lost:\s+(\d+)")
qps = num(r"Queries per second:\s+([\d.]+)")
avg = num(r"Average Latency \(s\):\s+([\d.]+)")
sd = num(r"Latency StdDev \(s\):\s+([\d.]+)")
ticks, tck, rss = float(sys.argv[4]), float(sys.argv[5]), sys.argv[6]
cpu = ticks * 1e6 / tck / done if done else 0.0
# dnsperf reports mean and standard deviation; p99 is estimated as mean + 2.326 sd.
p99 = (avg + 2.326 * sd) * 1000
print(f"{sys.argv[3]}\t{sys.argv[2]}\t{qps:.0f}\t{avg*1000:.3f}\t{p99:.3f}\t{lost:.0f}\t{cpu:.2f}\t{rss}")
PY
  done
 done
done

# Propagation: etcd put -> first correct answer, when an etcd is available.
prop="null"
if [ -n "${LAIN_ETCD:-}" ]; then
  prefix="/lain-bench/dns-$$"
  printf 'listen = "127.0.0.1:%s"\nadmin_listen = "127.0.0.1:0"\nudp_sockets = 1\nworker_threads = 1\n[state]\netcd_endpoints = ["%s"]\nprefix = "%s"\n' \
    "$port" "${LAIN_ETCD%%,*}" "$prefix" > "$work/lain-etcd.toml"
  LAIN_LOG=warn "$lain" dns -c "$work/lain-etcd.toml" > /dev/null 2>"$work/lain.log" & pid=$!
  sleep 1
  prop=$(python3 - "${LAIN_ETCD%%,*}" "$prefix" "$port" <<'PY'
import base64, json, socket, struct, sys, time, urllib.request
etcd, prefix, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
def kv(path, body):
    req = urllib.request.Request(f"{etcd}/v3/kv/{path}", json.dumps(body).encode(), {"content-type": "application/json"})
    urllib.request.urlopen(req, timeout=5).read()
b64 = lambda s: base64.b64encode(s.encode()).decode()
def query(name, qid):
    q = struct.pack(">HHHHHH", qid, 0x0100, 1, 0, 0, 0)
    for l in name.split("."):
        q += bytes([len(l)]) + l.encode()
    return q + b"\x00\x00\x01\x00\x01"
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(0.5)
lat = []
for i in range(1, 101):
    # The key layout of lain_state::Keyspace::endpoint: {prefix}/state/endpoints/{app}/{proc}/{n}.
    key = f"{prefix}/state/endpoints/prop/web/{i}"
    rec = {"v": 1, "app": "prop", "proc": "web", "instance": i, "address": f"10.2.0.{i}", "port": 80}
    t0 = time.monotonic()
    kv("put", {"key": b64(key), "value": b64(json.dumps(rec))})
    while time.monotonic() - t0 < 5:
        s.sendto(query(f"web-{i}.prop.lain", i), ("127.0.0.1", port))
        try:
            data = s.recv(512)
        except socket.timeout:
            continue
        if data[3] & 0x0f == 0 and struct.unpack(">H", data[6:8])[0] > 0:
            lat.append((time.monotonic() - t0) * 1000)
            break
kv("deleterange", {"key": b64(prefix + "/"), "range_end": b64(prefix + "0")})
lat.sort()
print(json.dumps({"p50": round(lat[len(lat) // 2], 2), "p99": round(lat[int(len(lat) * 0.99) - 1], 2)} if lat else None))
PY
)
  stop_server
fi

python3 - "$results" "$prop" "$root/target/bench/dns.json" "$rounds" <<'PY'
import json, statistics, sys
runs = [l.rstrip("\n").split("\t") for l in open(sys.argv[1]) if l.strip()]
# One row per (threads, server): the median of each column over the rounds (lost: the most).
rows, seen = [], {}
for r in runs:
    seen.setdefault((r[0], r[1]), []).append(r)
for (t, n), rs in seen.items():
    med = lambda i, fmt: fmt.format(statistics.median(float(x[i]) for x in rs))
    rows.append([t, n, med(2, "{:.0f}"), med(3, "{:.3f}"), med(4, "{:.3f}"),
                 str(max(int(x[5]) for x in rs)), med(6, "{:.2f}"), med(7, "{:.1f}")])
def section(t):
    d = {k: {} for k in ("qps", "avg_ms", "p99_ms", "lost", "cpu_us_per_query", "rss_mib")}
    for r in rows:
        if r[0] != t: continue
        n = r[1]
        d["qps"][n] = float(r[2]); d["avg_ms"][n] = float(r[3]); d["p99_ms"][n] = float(r[4])
        d["lost"][n] = int(r[5]); d["cpu_us_per_query"][n] = float(r[6]); d["rss_mib"][n] = float(r[7])
    return d
out = section("1")
out["threads2"] = section("2")
out["propagation_ms"] = json.loads(sys.argv[2])
json.dump(out, open(sys.argv[3], "w"), indent=2)
# The machine, so that figures are never quoted without it.
model = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "unknown CPU")
cores = sum(1 for l in open("/proc/cpuinfo") if l.startswith("processor"))
load = open("/proc/loadavg").read().split()[:3]
print(f"machine: {cores} x {model}, load average {' '.join(load)} at the end of the run; medians of {sys.argv[4]} alternating rounds\n")
lain_qps = {r[0]: float(r[2]) for r in rows if r[1] == "lain"}
lain_cpu = {r[0]: float(r[6]) for r in rows if r[1] == "lain"}
print("| threads | server | queries/s | lain ÷ server (queries/s) | avg ms | p99 ms (est.) | lost | CPU µs/query | lain ÷ server (CPU) | RSS MiB |")
print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
for r in rows:
    ratio = f"{lain_qps[r[0]] / float(r[2]):.2f}" if r[0] in lain_qps and float(r[2]) > 0 else "-"
    cpu_ratio = f"{lain_cpu[r[0]] / float(r[6]):.2f}" if r[0] in lain_cpu and float(r[6]) > 0 else "-"
    print("| " + " | ".join(r[:3] + [ratio] + r[3:7] + [cpu_ratio, r[7]]) + " |")
print(f"\npropagation (etcd put -> answer): {sys.argv[2]}")
PY
