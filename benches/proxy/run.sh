#!/usr/bin/env bash
# Side-by-side benchmark of `lain proxy` against nginx and HAProxy on loopback: one cheap
# upstream (an nginx `return 200`), wrk with keep-alive, the same worker threads for every
# proxy (1, then 2), alternating targets over several rounds and reporting each figure's
# median. A bare pingora proxy (proxy/examples/bare_pingora.rs) runs alongside as the floor
# of pingora's own pipeline, and lain with its HTTP/1.1 path turned off (every request
# through pingora) shows what that path saves. Also route churn and propagation latency against real etcd, and
# criterion's route lookup times. Prints a markdown table and writes target/bench/proxy.json.
#
# Then the same load over TLS (HTTPS, TLS 1.3, one handshake per kept-alive connection): lain,
# lain without its HTTP/1.1 path, nginx and HAProxy terminating TLS with one ECDSA P-256
# certificate.
#
# Knobs: BENCH_DURATION (s per wrk run, default 10), BENCH_ROUNDS (default 5),
# BENCH_TLS_ROUNDS (rounds of the TLS part, default 3),
# BENCH_CONNECTIONS (default 64), BENCH_CHURN_SECS (default 10), BENCH_UPDATES_PER_SEC
# (default 200), BENCH_LAIN_CONFIG (top-level lines added to both lain targets' config, for
# example "event_interval = 1").
set -euo pipefail

root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"
out="$root/target/bench"
mkdir -p "$out"
duration=${BENCH_DURATION:-10}
rounds=${BENCH_ROUNDS:-5}
conns=${BENCH_CONNECTIONS:-64}
tls_rounds=${BENCH_TLS_ROUNDS:-3}
work=$(mktemp -d /tmp/lain-bench-proxy.XXXXXX)
pids=()

stop_etcd=
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  rm -rf "$work"
  # etcd is stopped again only when this run started it.
  if [ -n "$stop_etcd" ]; then tests/services/etcd.sh stop-single >&2 || true; fi
}
trap cleanup EXIT

log() { echo "bench: $*" >&2; }

# Peers come from Debian, installed the way every other dependency is (without starting
# the packages' own services).
missing=()
for tool in nginx haproxy wrk jq python3 openssl; do
  command -v "$tool" >/dev/null || PATH="$PATH:/usr/sbin" command -v "$tool" >/dev/null || missing+=("$tool")
done
if [ ${#missing[@]} -gt 0 ]; then
  log "installing ${missing[*]}"
  "$root/scripts/deps.sh" "${missing[@]}" >&2
fi
export PATH="$PATH:/usr/sbin"
load_start=$(cut -d' ' -f1-3 /proc/loadavg)

# etcd for churn and propagation.
if [ -f tests/services/env.sh ]; then . tests/services/env.sh >/dev/null 2>&1 || true; fi
if [ -z "${LAIN_ETCD:-}" ]; then
  stop_etcd=1
  eval "$(tests/services/etcd.sh start)"
fi

log "building (release)"
cargo build --release --bin lain >&2
cargo build --release -p lain-proxy --example bench_churn --example bare_pingora >&2
target_dir=$(cargo metadata --format-version 1 --no-deps | jq -r .target_directory)
lain="$target_dir/release/lain"
churn="$target_dir/release/examples/bench_churn"
bare="$target_dir/release/examples/bare_pingora"

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

# The upstream: nginx answering a small body from memory, one worker, keep-alive.
up_port=$(free_port)
mkdir -p "$work/up"
cat >"$work/up/nginx.conf" <<EOF
worker_processes 1;
daemon off;
pid $work/up/nginx.pid;
error_log $work/up/error.log;
events { worker_connections 4096; }
http {
  access_log off;
  keepalive_requests 1000000;
  server {
    listen 127.0.0.1:$up_port;
    location / { return 200 "hello from upstream\n"; }
  }
}
EOF
nginx -p "$work/up" -c "$work/up/nginx.conf" &
pids+=($!)

wait_port() {
  for _ in $(seq 1 100); do
    if (echo >"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then return 0; fi
    sleep 0.1
  done
  log "port $1 did not open"; return 1
}
wait_port "$up_port"

prefix="/lain-bench/proxy-$$"
# The host of the route bench_churn writes (and lain serves); nginx and HAProxy ignore it.
host="churn.bench.lain"

# CPU ticks (utime+stime) and RSS (KiB) summed over a process and its children.
proc_tree() { echo "$1"; pgrep -P "$1" || true; }
cpu_ticks() {
  local t=0
  for p in $(proc_tree "$1"); do
    [ -r "/proc/$p/stat" ] || continue
    t=$((t + $(awk '{print $14 + $15}' "/proc/$p/stat")))
  done
  echo "$t"
}
rss_kib() {
  local r=0
  for p in $(proc_tree "$1"); do
    [ -r "/proc/$p/status" ] || continue
    r=$((r + $(awk '/VmRSS/ {print $2}' "/proc/$p/status")))
  done
  echo "$r"
}
hz=$(getconf CLK_TCK)

to_ms() { # wrk latency like 1.23ms, 456.00us, 1.02s
  awk -v v="$1" 'BEGIN {
    if (v ~ /us$/) { sub(/us$/, "", v); print v / 1000 }
    else if (v ~ /ms$/) { sub(/ms$/, "", v); print v + 0 }
    else if (v ~ /s$/) { sub(/s$/, "", v); print v * 1000 }
    else print 0 }'
}

# run_wrk NAME ADDR PID THREADS -> sets globals rps p50 p99 cpu rss
run_wrk() {
  local name=$1 addr=$2 pid=$3 threads=$4 scheme=${5:-http}
  # Warm keep-alive pools before measuring.
  wrk -t "$threads" -c "$conns" -d 2 -H "Host: $host" "$scheme://$addr/" >/dev/null 2>&1 || true
  local c0=0
  [ "$pid" != 0 ] && c0=$(cpu_ticks "$pid")
  local txt
  txt=$(wrk -t "$threads" -c "$conns" -d "$duration" --latency -s "$root/benches/proxy/percentiles.lua" \
    -H "Host: $host" "$scheme://$addr/")
  local c1=0
  [ "$pid" != 0 ] && c1=$(cpu_ticks "$pid")
  local reqs
  reqs=$(echo "$txt" | awk '/requests in/ {print $1}')
  rps=$(echo "$txt" | awk '/Requests\/sec/ {print $2}')
  p50=$(to_ms "$(echo "$txt" | awk '$1 == "50%" {print $2}')")
  p99=$(to_ms "$(echo "$txt" | awk '$1 == "99%" {print $2}')")
  if [ "$pid" != 0 ] && [ "${reqs:-0}" -gt 0 ]; then
    cpu=$(awk -v d=$((c1 - c0)) -v hz="$hz" -v n="$reqs" 'BEGIN { printf "%.2f", d * 1e6 / hz / n }')
    rss=$(awk -v k="$(rss_kib "$pid")" 'BEGIN { printf "%.1f", k / 1024 }')
  else
    cpu=0; rss=0
  fi
  local errors
  errors=$(echo "$txt" | awk '/Non-2xx|Socket errors/' | tr '\n' ' ')
  log "$name threads=$threads rps=$rps p50=${p50}ms p99=${p99}ms cpu=${cpu}us/req rss=${rss}MiB $errors"
  log "$name threads=$threads $(echo "$txt" | grep '^percentiles_us' || true)"
  # Figures of a run that did not answer 200 measure something else; stop instead.
  if echo "$txt" | grep -q "Non-2xx"; then
    log "$name answered errors under load; no figures are reported. One request now:"
    curl -s -k -i -H "Host: $host" "$scheme://$addr/" | head -5 >&2
    exit 1
  fi
}

# start_lain THREADS NAME [EXTRA] [LISTENER]: a lain proxy with EXTRA top-level config; sets
# lain_addr (of LISTENER, http or https) and lain_pid.
start_lain() {
  local threads=$1 name=$2 extra=${3:-} listener=${4:-http}
  local https="" tls=""
  if [ "$listener" = https ]; then
    https='https = "127.0.0.1:0"'
    tls=$(printf '[[tls.certs]]\nnames = ["%s"]\ncert_path = "%s"\nkey_path = "%s"' \
      "$host" "$work/tls/cert.pem" "$work/tls/key.pem")
  fi
  cat >"$work/$name.toml" <<EOF
threads = $threads
$extra
${BENCH_LAIN_CONFIG:-}
[listen]
http = "127.0.0.1:0"
$https
admin = "127.0.0.1:0"
[state]
etcd_endpoints = ["${LAIN_ETCD%%,*}"]
prefix = "$prefix"
[access_log]
path = ""
$tls
EOF
  LAIN_LOG=warn "$lain" proxy --config "$work/$name.toml" >"$work/$name.out" 2>"$work/$name.err" &
  lain_pid=$!
  pids+=($lain_pid)
  for _ in $(seq 1 100); do
    lain_addr=$(jq -r --arg l "$listener" 'select(.listening.name == $l) | .listening.addr' "$work/$name.out" 2>/dev/null | head -1)
    [ -n "$lain_addr" ] && break
    sleep 0.1
  done
  [ -n "$lain_addr" ] || { log "lain proxy did not start"; cat "$work/$name.err" >&2; exit 1; }
}

start_nginx() {
  local threads=$1 ssl=${2:-}
  ng_port=$(free_port)
  local listen="listen 127.0.0.1:$ng_port;"
  if [ -n "$ssl" ]; then
    listen="listen 127.0.0.1:$ng_port ssl; ssl_certificate $work/tls/cert.pem; ssl_certificate_key $work/tls/key.pem; ssl_protocols TLSv1.3;"
  fi
  mkdir -p "$work/ng"
  cat >"$work/ng/nginx.conf" <<EOF
worker_processes $threads;
daemon off;
pid $work/ng/nginx.pid;
error_log $work/ng/error.log;
events { worker_connections 4096; }
http {
  access_log off;
  keepalive_requests 1000000;
  upstream up { server 127.0.0.1:$up_port; keepalive 256; }
  server {
    $listen
    location / {
      proxy_pass http://up;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Host \$host;
      proxy_set_header X-Forwarded-For \$proxy_add_x_forwarded_for;
    }
  }
}
EOF
  nginx -p "$work/ng" -c "$work/ng/nginx.conf" &
  ng_pid=$!
  pids+=($ng_pid)
  wait_port "$ng_port"
}

start_haproxy() {
  local threads=$1 ssl=${2:-}
  hp_port=$(free_port)
  local bind="bind 127.0.0.1:$hp_port"
  [ -z "$ssl" ] || bind="$bind ssl crt $work/tls/combined.pem ssl-min-ver TLSv1.3"
  cat >"$work/haproxy.cfg" <<EOF
global
  nbthread $threads
  maxconn 8192
defaults
  mode http
  timeout connect 5s
  timeout client 30s
  timeout server 30s
  option http-keep-alive
  option forwardfor
  http-reuse always
frontend fe
  $bind
  default_backend be
backend be
  server up 127.0.0.1:$up_port
EOF
  haproxy -db -f "$work/haproxy.cfg" &
  hp_pid=$!
  pids+=($hp_pid)
  wait_port "$hp_port"
}

start_pingora() {
  local threads=$1
  pg_port=$(free_port)
  "$bare" "127.0.0.1:$pg_port" "127.0.0.1:$up_port" "$threads" >"$work/pingora.log" 2>&1 &
  pg_pid=$!
  pids+=($pg_pid)
  wait_port "$pg_port"
}

stop_pid() { kill "$1" 2>/dev/null || true; wait "$1" 2>/dev/null || true; }

declare -A R
# lain-pingora is lain with its own HTTP/1.1 path turned off: every request through
# pingora's pipeline, as before that path existed.
targets="direct lain lain-pingora pingora nginx haproxy"
# add KEY VALUE: one more round's value; med KEY: the median of the rounds.
add() { R[$1]="${R[$1]:-} $2"; }
med() {
  echo "${R[$1]:-0}" | tr ' ' '\n' | grep . | sort -g |
    awk '{ v[NR] = $1 } END { if (NR % 2) print v[(NR + 1) / 2]; else printf "%.2f\n", (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}
for threads in 1 2; do
  start_lain "$threads" lain-pingora "h1_fast_path = false"
  lp_addr=$lain_addr lp_pid=$lain_pid
  start_lain "$threads" lain
  # The route lain serves: written by bench_churn's set-up and kept for the whole run.
  BENCH_PROXY="$lain_addr" BENCH_UPSTREAM="127.0.0.1:$up_port" BENCH_PREFIX="$prefix" \
    BENCH_CHURN_SECS=0 BENCH_PROPAGATIONS=0 BENCH_KEEP=1 "$churn" >/dev/null
  start_pingora "$threads"
  start_nginx "$threads"
  start_haproxy "$threads"
  for round in $(seq 1 "$rounds"); do
    log "threads=$threads round $round of $rounds"
    for target in $targets; do
      case $target in
        direct) run_wrk direct "127.0.0.1:$up_port" 0 "$threads" ;;
        lain) run_wrk lain "$lain_addr" "$lain_pid" "$threads" ;;
        lain-pingora) run_wrk lain-pingora "$lp_addr" "$lp_pid" "$threads" ;;
        pingora) run_wrk pingora "127.0.0.1:$pg_port" "$pg_pid" "$threads" ;;
        nginx) run_wrk nginx "127.0.0.1:$ng_port" "$ng_pid" "$threads" ;;
        haproxy) run_wrk haproxy "127.0.0.1:$hp_port" "$hp_pid" "$threads" ;;
      esac
      add "$threads,$target,rps" "$rps"; add "$threads,$target,p50" "$p50"
      add "$threads,$target,p99" "$p99"; add "$threads,$target,cpu" "$cpu"
      add "$threads,$target,rss" "$rss"
    done
  done
  for target in $targets; do
    for k in rps p50 p99 cpu rss; do R[$threads,$target,$k]=$(med "$threads,$target,$k"); done
  done
  if [ "$threads" = 1 ]; then
    log "route churn and propagation"
    churn_json=$(BENCH_PROXY="$lain_addr" BENCH_UPSTREAM="127.0.0.1:$up_port" BENCH_PREFIX="$prefix" "$churn")
  fi
  stop_pid "$lain_pid"; stop_pid "$lp_pid"; stop_pid "$pg_pid"; stop_pid "$ng_pid"; stop_pid "$hp_pid"
done

# HTTPS: the same load over TLS 1.3, each proxy terminating it with the same certificate
# (wrk sends no ALPN, so every proxy speaks HTTP/1.1 to it).
mkdir -p "$work/tls"
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 \
  -subj "/CN=$host" -addext "subjectAltName=DNS:$host" \
  -keyout "$work/tls/key.pem" -out "$work/tls/cert.pem" 2>/dev/null
cat "$work/tls/cert.pem" "$work/tls/key.pem" >"$work/tls/combined.pem"
tls_targets="lain lain-pingora nginx haproxy"
for threads in 1 2; do
  start_lain "$threads" lain-pingora-tls "h1_fast_path = false" https
  lp_addr=$lain_addr lp_pid=$lain_pid
  start_lain "$threads" lain-tls "" https
  start_nginx "$threads" ssl
  start_haproxy "$threads" ssl
  for round in $(seq 1 "$tls_rounds"); do
    log "TLS threads=$threads round $round of $tls_rounds"
    for target in $tls_targets; do
      case $target in
        lain) run_wrk lain-tls "$lain_addr" "$lain_pid" "$threads" https ;;
        lain-pingora) run_wrk lain-pingora-tls "$lp_addr" "$lp_pid" "$threads" https ;;
        nginx) run_wrk nginx-tls "127.0.0.1:$ng_port" "$ng_pid" "$threads" https ;;
        haproxy) run_wrk haproxy-tls "127.0.0.1:$hp_port" "$hp_pid" "$threads" https ;;
      esac
      for k in rps p50 p99 cpu rss; do add "tls,$threads,$target,$k" "${!k}"; done
    done
  done
  for target in $tls_targets; do
    for k in rps p50 p99 cpu rss; do R[tls,$threads,$target,$k]=$(med "tls,$threads,$target,$k"); done
  done
  stop_pid "$lain_pid"; stop_pid "$lp_pid"; stop_pid "$ng_pid"; stop_pid "$hp_pid"
done

log "route lookup (criterion)"
cargo bench -p lain-proxy --bench lookup -- --warm-up-time 1 --measurement-time 3 >&2
crit="$target_dir/criterion"
lookup_ns() { jq -r '.mean.point_estimate' "$crit/lookup/$1/new/estimates.json" 2>/dev/null || echo 0; }

obj() { # obj THREADS KEY -> {"direct":..,"lain":..,"lain_pingora":..,"pingora":..,"nginx":..,"haproxy":..}
  printf '{"direct":%s,"lain":%s,"lain_pingora":%s,"pingora":%s,"nginx":%s,"haproxy":%s}' \
    "${R[$1,direct,$2]:-0}" "${R[$1,lain,$2]:-0}" "${R[$1,lain-pingora,$2]:-0}" \
    "${R[$1,pingora,$2]:-0}" "${R[$1,nginx,$2]:-0}" "${R[$1,haproxy,$2]:-0}"
}
group() {
  printf '"rps":%s,"p50_ms":%s,"p99_ms":%s,"cpu_us_per_req":%s,"rss_mib":%s' \
    "$(obj "$1" rps)" "$(obj "$1" p50)" "$(obj "$1" p99)" "$(obj "$1" cpu)" "$(obj "$1" rss)"
}
tls_obj() { # tls_obj THREADS KEY -> {"lain":..,"lain_pingora":..,"nginx":..,"haproxy":..}
  printf '{"lain":%s,"lain_pingora":%s,"nginx":%s,"haproxy":%s}' \
    "${R[tls,$1,lain,$2]:-0}" "${R[tls,$1,lain-pingora,$2]:-0}" "${R[tls,$1,nginx,$2]:-0}" \
    "${R[tls,$1,haproxy,$2]:-0}"
}
tls_group() {
  printf '"rps":%s,"p50_ms":%s,"p99_ms":%s,"cpu_us_per_req":%s,"rss_mib":%s' \
    "$(tls_obj "$1" rps)" "$(tls_obj "$1" p50)" "$(tls_obj "$1" p99)" "$(tls_obj "$1" cpu)" "$(tls_obj "$1" rss)"
}
json="{$(group 1),\"threads2\":{$(group 2)},\"tls\":{$(tls_group 1),\"threads2\":{$(tls_group 2)}},\"churn\":$(echo "$churn_json" | jq -c .churn),\"propagation_ms\":$(echo "$churn_json" | jq -c .propagation_ms),\"lookup_ns\":{\"10\":$(lookup_ns 10),\"1000\":$(lookup_ns 1000),\"100000\":$(lookup_ns 100000)}}"
echo "$json" | jq . >"$out/proxy.json"

# table PREFIX TARGETS: the markdown table of the medians kept under R[PREFIX<threads>,...].
table() {
  local prefix=$1 targets=$2 threads target k ratio
  echo "| threads | target | req/s | p50 ms | p99 ms | CPU µs/req | lain ÷ target (CPU) | RSS MiB |"
  echo "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"
  for threads in 1 2; do
    k=$prefix$threads
    for target in $targets; do
      ratio=$(awk -v l="${R[$k,lain,cpu]}" -v t="${R[$k,$target,cpu]}" 'BEGIN { if (t > 0) printf "%.2f", l / t; else print "–" }')
      echo "| $threads | $target | ${R[$k,$target,rps]} | ${R[$k,$target,p50]} | ${R[$k,$target,p99]} | ${R[$k,$target,cpu]} | $ratio | ${R[$k,$target,rss]} |"
    done
  done
}

{
  echo "Medians of $rounds rounds of ${duration} s, $conns connections."
  [ -z "${BENCH_LAIN_CONFIG:-}" ] || echo "lain's extra config: ${BENCH_LAIN_CONFIG//$'\n'/; }"
  echo
  table "" "$targets"
  echo
  echo "HTTPS (TLS 1.3, ECDSA P-256), medians of $tls_rounds rounds:"
  echo
  table tls, "$tls_targets"
  echo
  echo "Route churn: $(echo "$churn_json" | jq -r '.churn | "\(.updates) updates, \(.requests) requests, \(.failed) failed"')"
  echo "Propagation: $(echo "$churn_json" | jq -r '.propagation_ms | "p50 \(.p50) ms, p99 \(.p99) ms"')"
  echo "Lookup: 10 routes $(lookup_ns 10) ns, 1,000 routes $(lookup_ns 1000) ns, 100,000 routes $(lookup_ns 100000) ns"
  echo
  echo "Machine: $(nproc) CPUs, $(awk -F: '/model name/ {print $2; exit}' /proc/cpuinfo | sed 's/^ //'), $(uname -r)"
  echo "Load average (1, 5, 15 min) at start: $load_start; at end: $(cut -d' ' -f1-3 /proc/loadavg)"
}
log "wrote $out/proxy.json"
