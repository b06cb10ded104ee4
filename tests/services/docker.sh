#!/usr/bin/env bash
# Starts, stops and inspects two independent Docker engines (dockerd) on local unix sockets for tests, each with a lain/busybox:latest image.
#
# Usage: docker.sh start | stop | status | env | stop-node N | start-node N | kill-node N | clean
#
#   start        starts both engines (node1, node2), imports lain/busybox:latest
#                into each and prints
#                  export DOCKER_HOST=unix://.../docker1.sock
#                  export LAIN_DOCKER_NODES=unix://.../docker1.sock,unix://.../docker2.sock
#                  export LAIN_DOCKER_NODE_1=... LAIN_DOCKER_NODE_2=...
#   stop         stops both engines (and the containerd each one manages)
#   stop-node N  graceful stop of engine N (1 or 2); its images and containers are kept
#   kill-node N  SIGKILL engine N, like a crash; start-node N brings it back
#   clean        stops both engines and deletes their data
#
# The engines do not create a bridge network or touch iptables, so they do not
# fight over docker0 or the host's firewall: containers must be run with
# `--network host` (or `--network none`).
set -euo pipefail
LAIN_SVC_NAME=docker
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

ROOT="$LAIN_SERVICES_DIR/docker"
NODES=2
IMAGE=lain/busybox:latest

DOCKERD="${DOCKERD_BIN:-/usr/sbin/dockerd}"
# The Debian client is preferred over any other docker binary on PATH, so the
# client matches the engine it talks to.
if [ -x /usr/bin/docker ]; then DOCKER_CLI=/usr/bin/docker; else DOCKER_CLI=docker; fi

mkdir -p "$ROOT"

node_dir() { echo "$ROOT/node$1"; }
# Sockets sit at the top of the state dir so their paths stay short (unix
# socket paths are limited to 107 bytes).
node_sock() { echo "$LAIN_SERVICES_DIR/docker$1.sock"; }
node_host() { echo "unix://$(node_sock "$1")"; }
node_pidfile() { echo "$(node_dir "$1")/dockerd.pid"; }
node_log() { echo "$(node_dir "$1")/dockerd.log"; }
node_expect() { echo "$DOCKERD --config-file $(node_dir "$1")/daemon.json"; }
dk() { local n="$1"; shift; "$DOCKER_CLI" -H "$(node_host "$n")" "$@"; }

node_check() {
    [[ "${1:-}" =~ ^[1-2]$ ]] || die "node number must be 1 or 2 (got '${1:-}')"
}

ensure_installed() {
    # The image has no libc, so it needs the static busybox; busybox-static
    # replaces the dynamic busybox package if that one is installed.
    ensure_apt docker.io busybox-static
}

node_ready() { dk "$1" version --format '{{.Server.Version}}'; }

start_node() {
    local n="$1" dir
    dir="$(node_dir "$n")"
    if live_pid "$(node_pidfile "$n")" "$(node_expect "$n")" > /dev/null; then
        wait_until "dockerd node$n" "$(node_pidfile "$n")" "$(node_expect "$n")" "$(node_log "$n")" node_ready "$n"
        return 0
    fi
    mkdir -p "$dir/data" "$dir/exec"
    # An own config file keeps a host /etc/docker/daemon.json out of the test
    # engines. Its key path gives each engine its own identity key (and so its
    # own engine ID in `docker info`) instead of the shared /etc/docker/key.json.
    printf '{"deprecated-key-path": "%s"}\n' "$dir/key.json" > "$dir/daemon.json"
    # After a crash the socket and dockerd's own pid file are left behind, and
    # dockerd refuses to start while that pid exists in /proc; on machines
    # whose init does not reap orphans the dead dockerd stays there as a
    # zombie. It is known to be dead (checked above), so both are removed.
    rm -f "$(node_sock "$n")" "$dir/dockerd.self.pid"
    unmount_leftovers "$n"
    # The same holds for the containerd that dockerd manages: dockerd would
    # wait for a pid from this file that only exists as a zombie, and time out.
    if ! live_pid "$dir/exec/containerd/containerd.pid" containerd > /dev/null; then
        rm -f "$dir/exec/containerd/containerd.pid"
    fi
    log "starting dockerd node$n on $(node_host "$n")"
    # Each engine gets its own data root, exec root (which also holds the
    # socket and state of the containerd it starts and manages), pid file and
    # cgroup parent. No bridge, iptables or IP forwarding: two engines would
    # otherwise both claim docker0 and rewrite the same firewall chains.
    spawn "$(node_pidfile "$n")" "$(node_log "$n")" "$DOCKERD" \
        --config-file "$dir/daemon.json" \
        -H "$(node_host "$n")" \
        --data-root "$dir/data" \
        --exec-root "$dir/exec" \
        --pidfile "$dir/dockerd.self.pid" \
        --bridge=none --iptables=false --ip6tables=false --ip-forward=false --ip-masq=false \
        --userland-proxy=false \
        --cgroup-parent "lain-docker$n" \
        --label "lain.test.node=node$n" \
        --log-level warn
    wait_until "dockerd node$n" "$(node_pidfile "$n")" "$(node_expect "$n")" "$(node_log "$n")" node_ready "$n"
    remove_test_leftovers "$n"
}

# Containers of test clusters (key prefixes under /lain-test/) that outlived their test,
# because the engine was stopped before the test's clean-up reached it, would keep their
# names and make the next run's containers of the same name fail to be created. The
# engine was just started, so no test is using it yet.
remove_test_leftovers() {
    local n="$1" ids
    ids="$(dk "$n" ps -a --filter label=lain.cluster \
        --format '{{.ID}} {{.Label "lain.cluster"}}' | awk '$2 ~ /^\/lain-test\// {print $1}')"
    if [ -n "$ids" ]; then
        log "removing $(echo "$ids" | wc -l) containers left by earlier tests on node$n"
        # shellcheck disable=SC2086
        dk "$n" rm -f $ids > /dev/null || true
    fi
}

# Builds a minimal root file system around the static busybox: the binary,
# a symlink per applet, the account files that tools such as `id` expect, and
# the /lain/logs directory that lain mounts into containers.
build_rootfs() {
    local rootfs="$ROOT/rootfs" applet
    rm -rf "$rootfs"
    mkdir -p "$rootfs"/{bin,sbin,usr/bin,usr/sbin,etc,tmp,root,home,var/log,lain/logs,proc,sys,dev}
    chmod 1777 "$rootfs/tmp"
    cp /bin/busybox "$rootfs/bin/busybox"
    for applet in $(/bin/busybox --list-full); do
        [ "$applet" = bin/busybox ] && continue
        mkdir -p "$rootfs/$(dirname "$applet")"
        ln -sf /bin/busybox "$rootfs/$applet"
    done
    cat > "$rootfs/etc/passwd" <<'EOF'
root:x:0:0:root:/root:/bin/sh
nobody:x:65534:65534:nobody:/nonexistent:/bin/false
EOF
    cat > "$rootfs/etc/group" <<'EOF'
root:x:0:
nogroup:x:65534:
EOF
    echo 'hosts: files dns' > "$rootfs/etc/nsswitch.conf"
    echo "$rootfs"
}

# Imports the image on each given engine that lacks it. The tarball is built once
# and reused, so both engines get an image with the same content.
import_image() {
    local n tarball="$ROOT/busybox-rootfs.tar" rootfs
    for n in "$@"; do
        dk "$n" image inspect "$IMAGE" > /dev/null 2>&1 && continue
        if [ ! -s "$tarball" ]; then
            rootfs="$(build_rootfs)"
            tar --numeric-owner --owner=0 --group=0 -C "$rootfs" -cf "$tarball.tmp" .
            mv "$tarball.tmp" "$tarball"
        fi
        log "importing $IMAGE into node$n"
        dk "$n" import --change 'CMD ["/bin/sh"]' --change 'ENV PATH=/usr/sbin:/usr/bin:/sbin:/bin' \
            "$tarball" "$IMAGE" > /dev/null \
            || die "docker import into node$n failed"
    done
}

smoke_test() {
    local n out
    for ((n = 1; n <= NODES; n++)); do
        out="$(dk "$n" run --rm --network host "$IMAGE" echo hi 2>&1)" || true
        if [ "$out" != hi ]; then
            log "node$n cannot run a container: $out"
            tail -n 40 "$(node_log "$n")" >&2 || true
            exit 1
        fi
    done
}

write_envfile() {
    local n pids="" nodes=() body
    for ((n = 1; n <= NODES; n++)); do
        pids+="$(node_pidfile "$n") $(node_expect "$n")"$'\n'
        nodes+=("$(node_host "$n")")
    done
    body="export DOCKER_HOST=$(node_host 1)"
    body+=$'\n'"export LAIN_DOCKER_NODES=$(IFS=,; echo "${nodes[*]}")"
    for ((n = 1; n <= NODES; n++)); do
        body+=$'\n'"export LAIN_DOCKER_NODE_$n=$(node_host "$n")"
    done
    write_env docker "$pids" "$body"
}

start() {
    ensure_installed
    local n
    for ((n = 1; n <= NODES; n++)); do start_node "$n"; done
    import_image $(seq 1 "$NODES")
    smoke_test
    write_envfile
    print_env docker
}

stop_node() {
    local n="$1" pid
    # Containers are stopped by dockerd itself on a graceful shutdown; the
    # grace period covers their stop timeout plus containerd's shutdown.
    stop_pidfile "$(node_pidfile "$n")" "$(node_expect "$n")" 60
    # If dockerd was killed, the containerd it started keeps running; it is
    # ours too (its pid file is in this node's exec root), so stop it as well.
    stop_pidfile "$(node_dir "$n")/exec/containerd/containerd.pid" "containerd" 30
    rm -f "$(node_sock "$n")"
    unmount_leftovers "$n"
}

# dockerd turns its data root into a bind mount of itself and pins the
# default network namespace under its exec root, and does not undo either on
# exit. Left in place they make the directories impossible to delete, so they
# are unmounted once the engine is down (deepest first, only under this
# node's own directory).
unmount_leftovers() {
    local dir m mounts
    dir="$(node_dir "$1")"
    live_pid "$(node_pidfile "$1")" "$(node_expect "$1")" > /dev/null && return 0
    # Mounts can be stacked after repeated starts, hence several passes.
    for _ in 1 2 3 4 5 6 7 8; do
        mounts="$(awk -v d="$dir/" 'index($2, d) == 1 {print $2}' /proc/mounts | sort -r)"
        [ -n "$mounts" ] || return 0
        for m in $mounts; do
            umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || true
        done
    done
    log "could not unmount everything under $dir"
}

kill_node() {
    local n="$1" pid
    if pid="$(live_pid "$(node_pidfile "$n")" "$(node_expect "$n")")"; then
        log "killing dockerd node$n (pid $pid) with SIGKILL"
        kill -KILL "$pid"
        while live_pid "$(node_pidfile "$n")" "$(node_expect "$n")" > /dev/null; do sleep 0.1; done
    else
        log "dockerd node$n is not running"
    fi
    rm -f "$(node_pidfile "$n")"
}

status() {
    local n pid rc=0
    for ((n = 1; n <= NODES; n++)); do
        if pid="$(live_pid "$(node_pidfile "$n")" "$(node_expect "$n")")"; then
            echo "docker node$n: running pid $pid at $(node_host "$n")"
        else
            echo "docker node$n: stopped"; rc=1
        fi
    done
    return $rc
}

case "${1:-}" in
    start) start ;;
    stop) remove_env docker; for ((i = 1; i <= NODES; i++)); do stop_node "$i"; done ;;
    status) status ;;
    env) [ -f "$LAIN_ENV_DIR/docker.env" ] && print_env docker; true ;;
    stop-node) node_check "${2:-}"; stop_node "$2" ;;
    start-node) node_check "${2:-}"; ensure_installed; start_node "$2"; import_image "$2" ;;
    kill-node) node_check "${2:-}"; kill_node "$2" ;;
    clean)
        remove_env docker
        for ((i = 1; i <= NODES; i++)); do stop_node "$i"; done
        rm -rf "$ROOT"
        ;;
    *) sed -n '2,/^set -euo/p' "$0" | sed '$d' >&2; exit 2 ;;
esac
