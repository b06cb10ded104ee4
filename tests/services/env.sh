# Source this file (`. tests/services/env.sh`) to export the variables of the test services that are already running.
#
# It reads the env files that the start scripts wrote under
# ${LAIN_SERVICES_DIR:-/var/tmp/lain-services}/env.d and skips any whose
# processes are gone, so stale files from an earlier boot export nothing.
# It starts nothing; use tests/services/all.sh start for that.

__lain_env_load() {
    local dir="${LAIN_SERVICES_DIR:-/var/tmp/lain-services}/env.d" f entry pidfile expect pid alive
    [ -d "$dir" ] || return 0
    for f in "$dir"/*.env; do
        [ -f "$f" ] || continue
        alive=0
        # The first line is "# pids: <pidfile>:<word in its command line> ...".
        for entry in $(sed -n '1s/^# pids: //p' "$f"); do
            pidfile="${entry%%:*}"
            expect="${entry#*:}"
            [ -s "$pidfile" ] || continue
            pid="$(tr -dc '0-9' < "$pidfile")"
            [ -n "$pid" ] && [ -r "/proc/$pid/cmdline" ] || continue
            if tr '\0' ' ' < "/proc/$pid/cmdline" | grep -qF -- "$expect"; then
                alive=1
                break
            fi
        done
        if [ "$alive" = 1 ]; then
            # shellcheck disable=SC1090
            . "$f"
        fi
    done
}
__lain_env_load
unset -f __lain_env_load
