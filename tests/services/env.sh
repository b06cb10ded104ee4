# Source this file (`. tests/services/env.sh`) to export the variables of the test services that are already running.
#
# It reads the env files that the start scripts wrote under
# ${LAIN_SERVICES_DIR:-/var/tmp/lain-services}/env.d and skips any whose
# processes are gone, so stale files from an earlier boot export nothing.
# It starts nothing; use tests/services/all.sh start for that.

__lain_env_load() {
    local dir="${LAIN_SERVICES_DIR:-/var/tmp/lain-services}/env.d" f pidfile expect pid alive
    [ -d "$dir" ] || return 0
    for f in "$dir"/*.env; do
        [ -f "$f" ] || continue
        alive=0
        # Lines "# pid: <pidfile> <expected command line>" name the processes.
        while read -r pidfile expect; do
            [ -s "$pidfile" ] || continue
            pid="$(tr -dc '0-9' < "$pidfile")"
            if [ -z "$pid" ] || [ ! -r "/proc/$pid/cmdline" ]; then continue; fi
            # A zombie is a process that has already exited.
            [ "$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null)" != Z ] || continue
            if tr '\0' ' ' < "/proc/$pid/cmdline" | grep -qF -- "$expect"; then
                alive=1
                break
            fi
        done < <(sed -n 's/^# pid: //p' "$f")
        if [ "$alive" = 1 ]; then
            # shellcheck disable=SC1090
            . "$f"
        fi
    done
}
__lain_env_load
unset -f __lain_env_load
