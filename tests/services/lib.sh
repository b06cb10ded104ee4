# Shared helpers for the test service scripts under tests/services; sourced, never run directly.
#
# Every script keeps its state (data, pid files, logs, env files) under one
# directory so that a single `rm -rf` resets everything and nothing is left in
# system locations. Only stdout carries `export` lines; everything else goes to
# stderr or to log files, so callers can `eval "$(tests/services/X.sh start)"`.

LAIN_SERVICES_DIR="${LAIN_SERVICES_DIR:-/var/tmp/lain-services}"
LAIN_SERVICES_TIMEOUT="${LAIN_SERVICES_TIMEOUT:-120}"
# shellcheck disable=SC2034  # used by the scripts that source this file
LAIN_SERVICES_SRC="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
export LAIN_SERVICES_DIR

# Env files live here; env.sh sources the ones whose processes are still alive.
LAIN_ENV_DIR="$LAIN_SERVICES_DIR/env.d"

mkdir -p "$LAIN_SERVICES_DIR" "$LAIN_ENV_DIR"

log() { printf '[%s %s] %s\n' "$(date +%H:%M:%S)" "${LAIN_SVC_NAME:-services}" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

# Installs Debian packages that are missing. `apt-get update` runs only when a
# package cannot be found, because on a fresh machine the lists may be empty.
ensure_apt() {
    local missing=() p
    for p in "$@"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    log "installing Debian packages: ${missing[*]}"
    # Another apt process may hold the lock; wait for it instead of failing.
    if ! DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -q "${missing[@]}" >&2; then
        DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 update -q >&2 || true
        DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -q "${missing[@]}" >&2 \
            || die "apt-get install ${missing[*]} failed"
    fi
}

# Prints the pid recorded in a pid file if that process is alive and its
# command line contains the expected word; a recycled pid must never be
# mistaken for (or signalled as) one of our services.
live_pid() {
    local file="$1" expect="$2" pid
    [ -s "$file" ] || return 1
    pid="$(tr -dc '0-9' < "$file")"
    [ -n "$pid" ] && [ -r "/proc/$pid/cmdline" ] || return 1
    # A zombie still has a /proc entry but is gone for our purposes.
    [ "$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null)" != "Z" ] || return 1
    if [ -n "$expect" ] && ! tr '\0' ' ' < "/proc/$pid/cmdline" | grep -qF -- "$expect"; then
        return 1
    fi
    echo "$pid"
}

# Starts a command detached from the caller's session with its output in a
# log file and records its pid. setsid does not fork here (the background job
# is not a process group leader), so $! is the service's own pid.
spawn() {
    local pidfile="$1" logfile="$2"; shift 2
    mkdir -p "$(dirname "$pidfile")" "$(dirname "$logfile")"
    printf '\n===== %s starting: %s\n' "$(date '+%F %T')" "$*" >> "$logfile"
    setsid "$@" >> "$logfile" 2>&1 < /dev/null &
    local pid=$! i
    # Until the forked shell has executed the command, /proc shows the shell's own
    # command line, which a liveness check that matches the command takes for a service
    # that already exited; on a busy machine that window lasts long enough to be seen.
    for ((i = 0; i < 200; i++)); do
        [ -r "/proc/$pid/cmdline" ] || break
        tr '\0' ' ' < "/proc/$pid/cmdline" | grep -qF -- "$*" && break
        sleep 0.05
    done
    echo "$pid" > "$pidfile"
}

# Sends SIGTERM to the pid in a pid file (only if it is ours), waits up to
# $3 seconds (default 30), then SIGKILLs it. Removes the pid file.
stop_pidfile() {
    local pidfile="$1" expect="$2" grace="${3:-30}" pid i
    if pid="$(live_pid "$pidfile" "$expect")"; then
        log "stopping pid $pid ($(basename "$pidfile"))"
        kill -TERM "$pid" 2>/dev/null || true
        for ((i = 0; i < grace * 5; i++)); do
            live_pid "$pidfile" "$expect" > /dev/null || break
            sleep 0.2
        done
        if live_pid "$pidfile" "$expect" > /dev/null; then
            log "pid $pid did not exit after ${grace}s, sending SIGKILL"
            kill -KILL "$pid" 2>/dev/null || true
            for ((i = 0; i < 50; i++)); do
                live_pid "$pidfile" "$expect" > /dev/null || break
                sleep 0.2
            done
        fi
    fi
    rm -f "$pidfile"
}

# Runs a check command until it succeeds, the process dies, or the timeout
# passes. On failure it prints the tail of the log and exits non-zero.
#   wait_until <description> <pidfile> <expect> <logfile> <command...>
wait_until() {
    local what="$1" pidfile="$2" expect="$3" logfile="$4"; shift 4
    local deadline=$((SECONDS + LAIN_SERVICES_TIMEOUT))
    while ((SECONDS < deadline)); do
        if "$@" > /dev/null 2>&1; then
            return 0
        fi
        if [ -n "$pidfile" ] && ! live_pid "$pidfile" "$expect" > /dev/null; then
            log "$what: process exited before becoming ready; last log lines of $logfile:"
            tail -n 60 "$logfile" >&2 2>/dev/null || true
            exit 1
        fi
        sleep 0.5
    done
    log "$what: not ready after ${LAIN_SERVICES_TIMEOUT}s; last log lines of $logfile:"
    tail -n 60 "$logfile" >&2 2>/dev/null || true
    exit 1
}

# True if something accepts TCP connections on 127.0.0.1:$1.
port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# Fails early, with a clear message, when a port we want is taken by a
# process that is not ours.
require_free_port() {
    local port="$1" what="$2" i
    # A service that was just killed may hold its socket for a moment longer.
    for ((i = 0; i < 30; i++)); do
        port_open "$port" || return 0
        sleep 0.5
    done
    if port_open "$port"; then
        die "port 127.0.0.1:$port needed for $what is already in use by another process (override it with the env var in the README)"
    fi
}

# Writes the env file for a service. Its comment lines name the pid file and
# the expected command line of each process behind it; env.sh only sources
# the file while one of them lives.
#   write_env <name> <lines of "pidfile expected-command-line"> <export-lines>
write_env() {
    local name="$1" pids="$2" body="$3" line
    {
        while IFS= read -r line; do
            [ -n "$line" ] && echo "# pid: $line"
        done <<< "$pids"
        printf '%s\n' "$body"
    } > "$LAIN_ENV_DIR/$name.env.tmp"
    mv "$LAIN_ENV_DIR/$name.env.tmp" "$LAIN_ENV_DIR/$name.env"
}

remove_env() { rm -f "$LAIN_ENV_DIR/$1.env"; }

# Prints the export lines of a service's env file (without the pid comment).
print_env() { grep '^export ' "$LAIN_ENV_DIR/$1.env"; }
