#!/usr/bin/env bash
# Starts, stops and inspects a Docker registry (Debian's docker-registry) on loopback, through which images travel between the test engines.
#
# Usage: registry.sh start | stop | status | env | clean
#
#   start   starts the registry on 127.0.0.1:23500 (LAIN_REGISTRY_PORT) and prints
#             export LAIN_REGISTRY=127.0.0.1:23500
#   stop    stops it; the stored images are kept
#   clean   stops it and deletes the stored images
#
# Docker engines accept plain HTTP from registries on 127.0.0.0/8 without any
# `insecure-registries` setting, so both test engines can push to and pull from
# it as `127.0.0.1:23500/APP:TAG`.
set -euo pipefail
LAIN_SVC_NAME=registry
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

REGISTRY_BIN="${REGISTRY_BIN:-/usr/bin/docker-registry}"
PORT="${LAIN_REGISTRY_PORT:-23500}"
ROOT="$LAIN_SERVICES_DIR/registry"
PIDFILE="$ROOT/registry.pid"
LOGFILE="$ROOT/registry.log"
CONFIG="$ROOT/config.yml"
EXPECT="$REGISTRY_BIN serve $CONFIG"

mkdir -p "$ROOT"

ensure_installed() {
    [ -x "$REGISTRY_BIN" ] && return 0
    ensure_apt docker-registry
}

# The package's own config listens on every address and wants htpasswd files;
# this one listens on loopback only, without auth, and keeps its data here.
write_config() {
    cat > "$CONFIG.tmp" <<CONF
version: 0.1
log:
  level: warn
  fields:
    service: registry
storage:
  filesystem:
    rootdirectory: $ROOT/data
  delete:
    enabled: true
http:
  addr: 127.0.0.1:$PORT
  headers:
    X-Content-Type-Options: [nosniff]
CONF
    mv "$CONFIG.tmp" "$CONFIG"
}

ready() { curl -fsS "http://127.0.0.1:$PORT/v2/" > /dev/null; }

write_envfile() {
    write_env registry "$PIDFILE $EXPECT" "export LAIN_REGISTRY=127.0.0.1:$PORT"
}

start() {
    ensure_installed
    if live_pid "$PIDFILE" "$EXPECT" > /dev/null; then
        wait_until "registry" "$PIDFILE" "$EXPECT" "$LOGFILE" ready
        write_envfile
        print_env registry
        return 0
    fi
    require_free_port "$PORT" "the registry (LAIN_REGISTRY_PORT)"
    mkdir -p "$ROOT/data"
    write_config
    log "starting docker-registry on 127.0.0.1:$PORT"
    spawn "$PIDFILE" "$LOGFILE" "$REGISTRY_BIN" serve "$CONFIG"
    wait_until "registry" "$PIDFILE" "$EXPECT" "$LOGFILE" ready
    write_envfile
    print_env registry
}

status() {
    local pid
    if pid="$(live_pid "$PIDFILE" "$EXPECT")"; then
        echo "registry: running pid $pid at 127.0.0.1:$PORT"
    else
        echo "registry: stopped"
        return 1
    fi
}

case "${1:-}" in
    start) start ;;
    stop) remove_env registry; stop_pidfile "$PIDFILE" "$EXPECT" 30 ;;
    status) status ;;
    env) [ -f "$LAIN_ENV_DIR/registry.env" ] && print_env registry; true ;;
    clean) remove_env registry; stop_pidfile "$PIDFILE" "$EXPECT" 30; rm -rf "$ROOT" ;;
    *) sed -n '2,/^set -euo/p' "$0" | sed '$d' >&2; exit 2 ;;
esac
