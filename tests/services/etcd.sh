#!/usr/bin/env bash
# Starts, stops and inspects real etcd servers on loopback for tests: one single member and/or a three-member cluster.
#
# Usage: etcd.sh start | start-cluster | stop | stop-single | stop-cluster | status | env
#        etcd.sh kill-member N | stop-member N | start-member N | restart-member N | leader | clean
#
#   start           single member; prints `export LAIN_ETCD=http://127.0.0.1:PORT`
#   start-cluster   three members; prints `export LAIN_ETCD_CLUSTER=url1,url2,url3`
#                   and LAIN_ETCD_CLUSTER_<N> for each member's client URL
#   stop            stops everything this script started (single and cluster)
#   kill-member N   SIGKILLs cluster member N (1..3), like a crash; data is kept
#   stop-member N   SIGTERMs cluster member N (graceful shutdown); data is kept
#   start-member N  starts member N again with its existing data (no-op if running)
#   restart-member N  kill-member N followed by start-member N
#   leader          prints the number (1..3) of the current cluster leader
#   clean           stops everything and deletes all etcd data
set -euo pipefail
LAIN_SVC_NAME=etcd
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

ETCD_BIN="${ETCD_BIN:-/usr/bin/etcd}"
ETCDCTL_BIN="${ETCDCTL_BIN:-/usr/bin/etcdctl}"
export ETCDCTL_API=3
# etcd 3.4 refuses to start on architectures other than amd64 unless told
# that the architecture is accepted.
case "$(uname -m)" in
    x86_64) ;;
    aarch64) export ETCD_UNSUPPORTED_ARCH="${ETCD_UNSUPPORTED_ARCH:-arm64}" ;;
    *) export ETCD_UNSUPPORTED_ARCH="${ETCD_UNSUPPORTED_ARCH:-$(dpkg --print-architecture 2>/dev/null || uname -m)}" ;;
esac

SINGLE_CLIENT_PORT="${LAIN_ETCD_PORT:-23100}"
SINGLE_PEER_PORT="${LAIN_ETCD_PEER_PORT:-23101}"
# Cluster member N (1..3) listens for clients on CLIENT_BASE+N and for peers on PEER_BASE+N.
CLUSTER_CLIENT_BASE="${LAIN_ETCD_CLUSTER_CLIENT_BASE:-23110}"
CLUSTER_PEER_BASE="${LAIN_ETCD_CLUSTER_PEER_BASE:-23120}"
CLUSTER_SIZE=3

ROOT="$LAIN_SERVICES_DIR/etcd"
mkdir -p "$ROOT"

ensure_installed() {
    [ -x "$ETCD_BIN" ] && [ -x "$ETCDCTL_BIN" ] && return 0
    ensure_apt etcd-server etcd-client
}

# Common flags. Periodic compaction keeps history for an hour so that watch
# tests can resume from recent revisions, while long test runs stay small.
# A small snapshot count keeps restarts after kill-member quick.
common_flags() {
    echo --logger=zap --log-outputs=stderr \
        --auto-compaction-mode=periodic --auto-compaction-retention=1h \
        --snapshot-count=5000 --quota-backend-bytes=$((1024 * 1024 * 1024)) \
        --enable-v2=true
}

healthy() { "$ETCDCTL_BIN" --endpoints="$1" --dial-timeout=2s --command-timeout=3s endpoint health; }

# ---------------------------------------------------------------- single member

single_url() { echo "http://127.0.0.1:$SINGLE_CLIENT_PORT"; }
single_pidfile() { echo "$ROOT/single/etcd.pid"; }
single_log() { echo "$ROOT/single/etcd.log"; }

single_env() {
    write_env etcd "$(single_pidfile) $ETCD_BIN" "export LAIN_ETCD=$(single_url)"
}

start_single() {
    ensure_installed
    local dir="$ROOT/single" url
    url="$(single_url)"
    if live_pid "$(single_pidfile)" "$ETCD_BIN" > /dev/null; then
        wait_until "etcd single member" "$(single_pidfile)" "$ETCD_BIN" "$(single_log)" healthy "$url"
        single_env
        print_env etcd
        return 0
    fi
    require_free_port "$SINGLE_CLIENT_PORT" "etcd client (LAIN_ETCD_PORT)"
    require_free_port "$SINGLE_PEER_PORT" "etcd peer (LAIN_ETCD_PEER_PORT)"
    mkdir -p "$dir"
    log "starting single member on $url"
    # shellcheck disable=SC2046
    spawn "$(single_pidfile)" "$(single_log)" "$ETCD_BIN" \
        --name single --data-dir "$dir/data" \
        --listen-client-urls "$url" --advertise-client-urls "$url" \
        --listen-peer-urls "http://127.0.0.1:$SINGLE_PEER_PORT" \
        --initial-advertise-peer-urls "http://127.0.0.1:$SINGLE_PEER_PORT" \
        --initial-cluster "single=http://127.0.0.1:$SINGLE_PEER_PORT" \
        --initial-cluster-token lain-test-single --initial-cluster-state new \
        $(common_flags)
    wait_until "etcd single member" "$(single_pidfile)" "$ETCD_BIN" "$(single_log)" healthy "$url"
    single_env
    print_env etcd
}

stop_single() {
    remove_env etcd
    stop_pidfile "$(single_pidfile)" "$ETCD_BIN"
}

# ---------------------------------------------------------------- cluster

member_check() {
    [[ "${1:-}" =~ ^[1-3]$ ]] || die "member number must be 1, 2 or 3 (got '${1:-}')"
}
member_name() { echo "m$1"; }
member_client_port() { echo $((CLUSTER_CLIENT_BASE + $1)); }
member_peer_port() { echo $((CLUSTER_PEER_BASE + $1)); }
member_url() { echo "http://127.0.0.1:$(member_client_port "$1")"; }
member_dir() { echo "$ROOT/cluster/m$1"; }
member_pidfile() { echo "$(member_dir "$1")/etcd.pid"; }
member_log() { echo "$(member_dir "$1")/etcd.log"; }

cluster_urls() {
    local n urls=()
    for ((n = 1; n <= CLUSTER_SIZE; n++)); do urls+=("$(member_url "$n")"); done
    (IFS=,; echo "${urls[*]}")
}

initial_cluster() {
    local n parts=()
    for ((n = 1; n <= CLUSTER_SIZE; n++)); do
        parts+=("$(member_name "$n")=http://127.0.0.1:$(member_peer_port "$n")")
    done
    (IFS=,; echo "${parts[*]}")
}

cluster_env() {
    local n pids="" body
    body="export LAIN_ETCD_CLUSTER=$(cluster_urls)"
    for ((n = 1; n <= CLUSTER_SIZE; n++)); do
        pids+="$(member_pidfile "$n") $ETCD_BIN"$'\n'
        body+=$'\n'"export LAIN_ETCD_CLUSTER_$n=$(member_url "$n")"
    done
    write_env etcd-cluster "$pids" "$body"
}

# Launches member N without waiting. With an existing data directory etcd
# ignores the --initial-* flags and rejoins with its stored identity, which is
# what restart tests need.
launch_member() {
    local n="$1" dir
    dir="$(member_dir "$n")"
    if live_pid "$(member_pidfile "$n")" "$ETCD_BIN" > /dev/null; then
        return 0
    fi
    require_free_port "$(member_client_port "$n")" "etcd member $n client (LAIN_ETCD_CLUSTER_CLIENT_BASE)"
    require_free_port "$(member_peer_port "$n")" "etcd member $n peer (LAIN_ETCD_CLUSTER_PEER_BASE)"
    mkdir -p "$dir"
    local state=new
    [ -d "$dir/data/member" ] && state=existing
    log "starting cluster member $n on $(member_url "$n") ($state data)"
    # shellcheck disable=SC2046
    spawn "$(member_pidfile "$n")" "$(member_log "$n")" "$ETCD_BIN" \
        --name "$(member_name "$n")" --data-dir "$dir/data" \
        --listen-client-urls "$(member_url "$n")" --advertise-client-urls "$(member_url "$n")" \
        --listen-peer-urls "http://127.0.0.1:$(member_peer_port "$n")" \
        --initial-advertise-peer-urls "http://127.0.0.1:$(member_peer_port "$n")" \
        --initial-cluster "$(initial_cluster)" \
        --initial-cluster-token lain-test-cluster --initial-cluster-state "$state" \
        $(common_flags)
}

wait_member() {
    local n="$1"
    wait_until "etcd cluster member $n" "$(member_pidfile "$n")" "$ETCD_BIN" "$(member_log "$n")" \
        healthy "$(member_url "$n")"
}

start_cluster() {
    ensure_installed
    local n
    # All members are launched before waiting, since none is healthy until a
    # quorum of them can elect a leader.
    for ((n = 1; n <= CLUSTER_SIZE; n++)); do launch_member "$n"; done
    for ((n = 1; n <= CLUSTER_SIZE; n++)); do wait_member "$n"; done
    cluster_env
    print_env etcd-cluster
}

stop_cluster() {
    local n
    remove_env etcd-cluster
    for ((n = 1; n <= CLUSTER_SIZE; n++)); do stop_pidfile "$(member_pidfile "$n")" "$ETCD_BIN"; done
}

kill_member() {
    member_check "${1:-}"
    local pid
    if pid="$(live_pid "$(member_pidfile "$1")" "$ETCD_BIN")"; then
        log "killing cluster member $1 (pid $pid) with SIGKILL"
        kill -KILL "$pid"
        while live_pid "$(member_pidfile "$1")" "$ETCD_BIN" > /dev/null; do sleep 0.1; done
    else
        log "cluster member $1 is not running"
    fi
    rm -f "$(member_pidfile "$1")"
}

stop_member() {
    member_check "${1:-}"
    stop_pidfile "$(member_pidfile "$1")" "$ETCD_BIN"
}

start_member() {
    member_check "${1:-}"
    ensure_installed
    launch_member "$1"
    wait_member "$1"
}

# Prints the number of the member that is the leader: the one whose
# `endpoint status` MemberID equals the Leader ID it reports (etcdctl 3.4
# prints IsLeader only in its table output, so the IDs are compared instead).
leader() {
    local n out member lead
    for ((n = 1; n <= CLUSTER_SIZE; n++)); do
        out="$("$ETCDCTL_BIN" --endpoints="$(member_url "$n")" --dial-timeout=2s --command-timeout=3s \
            endpoint status --write-out=fields 2>/dev/null)" || continue
        member="$(sed -n 's/^"MemberID" : //p' <<< "$out")"
        lead="$(sed -n 's/^"Leader" : //p' <<< "$out")"
        if [ -n "$member" ] && [ "$member" = "$lead" ]; then
            echo "$n"
            return 0
        fi
    done
    log "no cluster member reports itself as leader"
    return 1
}

status() {
    local rc=0 n pid
    if pid="$(live_pid "$(single_pidfile)" "$ETCD_BIN")"; then
        echo "etcd single: running pid $pid at $(single_url)"
    else
        echo "etcd single: stopped"; rc=1
    fi
    for ((n = 1; n <= CLUSTER_SIZE; n++)); do
        if pid="$(live_pid "$(member_pidfile "$n")" "$ETCD_BIN")"; then
            echo "etcd cluster member $n: running pid $pid at $(member_url "$n")"
        else
            echo "etcd cluster member $n: stopped"; rc=1
        fi
    done
    return $rc
}

case "${1:-}" in
    start) start_single ;;
    start-cluster) start_cluster ;;
    stop) stop_single; stop_cluster ;;
    stop-single) stop_single ;;
    stop-cluster) stop_cluster ;;
    status) status ;;
    env)
        [ -f "$LAIN_ENV_DIR/etcd.env" ] && print_env etcd
        [ -f "$LAIN_ENV_DIR/etcd-cluster.env" ] && print_env etcd-cluster
        true
        ;;
    kill-member) kill_member "${2:-}" ;;
    stop-member) stop_member "${2:-}" ;;
    start-member) start_member "${2:-}" ;;
    restart-member) kill_member "${2:-}"; start_member "${2:-}" ;;
    leader) leader ;;
    clean) stop_single; stop_cluster; rm -rf "$ROOT" ;;
    *) sed -n '2,/^set -euo/p' "$0" | sed '$d' >&2; exit 2 ;;
esac
