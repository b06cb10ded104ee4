#!/usr/bin/env bash
# Benchmarks lain logship against rsyslog (imfile → file, imfile → omkafka) on the same
# generated file, with `cat` and kcat as ceilings; prints a markdown table and writes
# target/bench/logship.json.
#
# Needs the Kafka broker of tests/services (LAIN_KAFKA, started when missing). Installs
# rsyslog, rsyslog-kafka and kcat from Debian when missing. LINES (default 1000000) sets
# the size of the generated file.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"
lines=${LINES:-1000000}
timeout_s=${BENCH_TIMEOUT_SECS:-600}
target=${CARGO_TARGET_DIR:-$root/target}
out_dir="$root/target/bench"
mkdir -p "$out_dir"
work=$(mktemp -d /var/tmp/lain-bench-logship.XXXXXX)
pids=()
stop_kafka=
cleanup() {
  for p in "${pids[@]:-}"; do [ -n "$p" ] && kill "$p" 2>/dev/null || true; done
  rm -rf "$work"
  # Kafka is stopped again only when this run started it.
  if [ -n "$stop_kafka" ]; then tests/services/kafka.sh stop >&2 || true; fi
}
trap cleanup EXIT

need=()
command -v rsyslogd >/dev/null || need+=(rsyslog)
[ -e /usr/lib/x86_64-linux-gnu/rsyslog/omkafka.so ] || need+=(rsyslog-kafka)
command -v kcat >/dev/null || need+=(kcat)
if [ ${#need[@]} -gt 0 ]; then
  echo "installing ${need[*]}" >&2
  apt-get install -y "${need[@]}" >&2 || { apt-get update >&2 && apt-get install -y "${need[@]}" >&2; }
fi
if [ -z "${LAIN_KAFKA:-}" ]; then
  stop_kafka=1
  eval "$(tests/services/kafka.sh start)"
fi

echo "building lain (release)" >&2
cargo build --release --bin lain >&2
lain="$target/release/lain"

input="$work/input.log"
echo "generating $lines lines" >&2
awk -v n="$lines" 'BEGIN {
  srand(42);
  split("GET POST PUT DELETE", m, " ");
  split("INFO INFO INFO WARN ERROR DEBUG", lv, " ");
  for (i = 0; i < n; i++) {
    printf "2024-05-01T10:%02d:%02d.%03dZ %s [worker-%d] %s /api/v1/items/%d?page=%d status=%d duration_ms=%d user=u%06d request_id=%08x-%04x-%04x seq=%09d agent=\"Mozilla/5.0 (X11; Linux x86_64)\"\n",
      (i / 60000) % 60, (i / 1000) % 60, i % 1000, lv[1 + i % 6], i % 16, m[1 + i % 4],
      int(rand() * 100000), i % 50, (i % 17 == 0 ? 500 : 200), int(rand() * 900), int(rand() * 999999),
      int(rand() * 4294967295), int(rand() * 65535), int(rand() * 65535), i
  }
}' > "$input"
bytes=$(stat -c %s "$input")
mib=$(awk -v b="$bytes" 'BEGIN { printf "%.1f", b / 1048576 }')
echo "input: $lines lines, $mib MiB" >&2

# cpu_secs PID: user + system seconds of a live process (and its reaped children).
cpu_secs() {
  awk -v hz="$(getconf CLK_TCK)" '{ print ($14 + $15 + $16 + $17) / hz }' "/proc/$1/stat"
}
rss_mib() {
  awk '/VmHWM/ { printf "%.1f", $2 / 1024 }' "/proc/$1/status"
}
# Resident memory now (not the peak), for the memory-flatness check.
rss_now_mib() {
  awk '/VmRSS/ { printf "%.1f", $2 / 1024 }' "/proc/$1/status" 2>/dev/null || echo 0
}
now() { date +%s.%N; }
kafka_count() {
  kcat -C -b "$LAIN_KAFKA" -t "$1" -e -q -f '\n' 2>/dev/null | wc -l
}

declare -A R_LPC R_MIBS R_RSS R_LOST R_RSS_Q R_RSS_END
record() { # name count secs cpu rss
  local name=$1 count=$2 secs=$3 cpu=$4 rss=$5
  R_LOST[$name]=$((lines - count))
  R_MIBS[$name]=$(awk -v b="$bytes" -v s="$secs" 'BEGIN { printf "%.1f", b / 1048576 / (s > 0 ? s : 1e-9) }')
  R_LPC[$name]=$(awk -v n="$count" -v c="$cpu" 'BEGIN { printf "%.0f", n / (c > 0 ? c : 1e-9) }')
  R_RSS[$name]=$rss
  echo "$name: $count lines in ${secs}s, ${cpu} CPU s, RSS ${rss} MiB" >&2
}

# run_until NAME PID COUNT_CMD: waits until COUNT_CMD prints $lines (or timeout), records.
run_until() {
  local name=$1 pid=$2 count_cmd=$3 start=$4 count=0 last=-1 stable=0 rss_q=""
  local deadline=$(( $(date +%s) + timeout_s ))
  while [ "$(date +%s)" -lt "$deadline" ]; do
    count=$(eval "$count_cmd" || true)
    count=${count:-0}
    # Memory flatness: resident memory once a quarter of the file is out, against the end.
    if [ -z "$rss_q" ] && [ "$count" -ge $((lines / 4)) ]; then rss_q=$(rss_now_mib "$pid"); fi
    [ "$count" -ge "$lines" ] && break
    if [ "$count" = "$last" ] && [ "$count" -gt 0 ]; then stable=$((stable + 1)); else stable=0; fi
    [ "$stable" -ge 30 ] && break
    last=$count
    sleep 0.5
  done
  local end; end=$(now)
  local cpu rss; cpu=$(cpu_secs "$pid"); rss=$(rss_mib "$pid")
  R_RSS_Q[$name]=${rss_q:-0}
  R_RSS_END[$name]=$(rss_now_mib "$pid")
  kill "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  record "$name" "$count" "$(awk -v a="$start" -v b="$end" 'BEGIN { printf "%.2f", b - a }')" "$cpu" "$rss"
}

# Ceiling: cat.
start=$(now)
/usr/bin/time -f '%U %S %M' -o "$work/cat.time" cat "$input" > /dev/null
end=$(now)
read -r u s m < "$work/cat.time"
record cat_devnull "$lines" "$(awk -v a="$start" -v b="$end" 'BEGIN { printf "%.2f", b - a }')" "$(awk -v u="$u" -v s="$s" 'BEGIN { print u + s }')" "$(awk -v m="$m" 'BEGIN { printf "%.1f", m / 1024 }')"

# Ceiling: kcat producing the file.
topic="bench-kcat-$$"
start=$(now)
/usr/bin/time -f '%U %S %M' -o "$work/kcat.time" kcat -P -b "$LAIN_KAFKA" -t "$topic" -z lz4 -X linger.ms=20 -l "$input"
end=$(now)
read -r u s m < "$work/kcat.time"
record kcat_kafka "$(kafka_count "$topic")" "$(awk -v a="$start" -v b="$end" 'BEGIN { printf "%.2f", b - a }')" "$(awk -v u="$u" -v s="$s" 'BEGIN { print u + s }')" "$(awk -v m="$m" 'BEGIN { printf "%.1f", m / 1024 }')"

lain_config() { # dir sink-toml
  mkdir -p "$1/state"
  cat > "$1/logship.toml" <<TOML
node = "bench"
state_dir = "$1/state"
[admin]
listen = "127.0.0.1:0"
[[files]]
name = "bench"
paths = ["$input"]
parse_json = false
$2
TOML
}

# lain: file → file.
d="$work/lain-file"; lain_config "$d" "[sinks.file]
path = \"$d/out.ndjson\"
max_bytes = 100000000000"
start=$(now)
"$lain" logship --config "$d/logship.toml" > "$d/stdout" 2> "$d/stderr" & pid=$!; pids+=("$pid")
run_until lain_file "$pid" "cat $d/out.ndjson 2>/dev/null | wc -l" "$start"

# lain: file → Kafka.
topic="bench-lain-$$"
d="$work/lain-kafka"; lain_config "$d" "[sinks.kafka]
brokers = \"$LAIN_KAFKA\"
topic = \"$topic\""
start=$(now)
"$lain" logship --config "$d/logship.toml" > "$d/stdout" 2> "$d/stderr" & pid=$!; pids+=("$pid")
run_until lain_kafka "$pid" "kafka_count $topic" "$start"

rsyslog_run() { # name dir action
  local name=$1 d=$2 action=$3
  mkdir -p "$d/work"
  cat > "$d/rsyslog.conf" <<CONF
global(workDirectory="$d/work")
module(load="imfile")
$4
input(type="imfile" File="$input" Tag="bench" ruleset="out" freshStartTail="off")
ruleset(name="out") { $action }
CONF
  start=$(now)
  rsyslogd -n -f "$d/rsyslog.conf" -i "$d/rsyslog.pid" > "$d/out.log" 2>&1 & pid=$!; pids+=("$pid")
}

# rsyslog: file → file.
d="$work/rsyslog-file"
rsyslog_run rsyslog_file "$d" "action(type=\"omfile\" file=\"$d/out.log.txt\" template=\"RSYSLOG_FileFormat\")" ""
run_until rsyslog_file "$pid" "cat $d/out.log.txt 2>/dev/null | wc -l" "$start"

# rsyslog: file → Kafka.
topic="bench-rsyslog-$$"
d="$work/rsyslog-kafka"
rsyslog_run rsyslog_kafka "$d" "action(type=\"omkafka\" broker=[\"$LAIN_KAFKA\"] topic=\"$topic\" confParam=[\"compression.codec=lz4\", \"linger.ms=20\"])" 'module(load="omkafka")'
run_until rsyslog_kafka "$pid" "kafka_count $topic" "$start"

names=(cat_devnull kcat_kafka lain_file rsyslog_file lain_kafka rsyslog_kafka)
echo
echo "| run | lines/CPU-s | MiB/s | RSS MiB (peak) | RSS MiB at 1/4 → end | lost |"
echo "| --- | ---: | ---: | ---: | ---: | ---: |"
for n in "${names[@]}"; do
  flat=""
  [ -n "${R_RSS_Q[$n]:-}" ] && flat="${R_RSS_Q[$n]} → ${R_RSS_END[$n]}"
  echo "| $n | ${R_LPC[$n]} | ${R_MIBS[$n]} | ${R_RSS[$n]} | $flat | ${R_LOST[$n]} |"
done
json_map() { # assoc-name; runs without a figure are null
  local -n m=$1; local first=1
  printf '{'
  for n in "${names[@]}"; do
    [ $first = 1 ] || printf ','
    first=0
    printf '"%s":%s' "$n" "${m[$n]:-null}"
  done
  printf '}'
}
printf '{"lines":%s,"input_mib":%s,"lines_per_cpu_sec":%s,"mib_per_s":%s,"rss_mib":%s,"rss_quarter_mib":%s,"rss_end_mib":%s,"lost":%s}\n' \
  "$lines" "$mib" "$(json_map R_LPC)" "$(json_map R_MIBS)" "$(json_map R_RSS)" "$(json_map R_RSS_Q)" "$(json_map R_RSS_END)" "$(json_map R_LOST)" > "$out_dir/logship.json"
echo "wrote $out_dir/logship.json" >&2
