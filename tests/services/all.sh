#!/usr/bin/env bash
# Starts, stops or describes all test services at once (etcd, etcd cluster, Docker engines, registry, Kafka, OpenSearch).
#
# Usage: all.sh start [SERVICE...] | stop [SERVICE...] | status | env
#
#   start   starts the services (all of them by default, or the ones named:
#           etcd, etcd-cluster, docker, registry, kafka, opensearch) and prints the
#           combined `export` lines, so `eval "$(tests/services/all.sh start)"`
#           configures the calling shell
#   stop    stops them (in reverse order); data is kept
#   status  one line per process; exits non-zero if any is stopped
#   env     prints the export lines of the services that are running now
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ALL=(etcd etcd-cluster docker registry kafka opensearch)

start_one() {
    case "$1" in
        etcd) "$HERE/etcd.sh" start ;;
        etcd-cluster) "$HERE/etcd.sh" start-cluster ;;
        docker) "$HERE/docker.sh" start ;;
        registry) "$HERE/registry.sh" start ;;
        kafka) "$HERE/kafka.sh" start ;;
        opensearch) "$HERE/opensearch.sh" start ;;
        *) echo "unknown service: $1 (known: ${ALL[*]})" >&2; exit 2 ;;
    esac
}

stop_one() {
    case "$1" in
        etcd) "$HERE/etcd.sh" stop-single ;;
        etcd-cluster) "$HERE/etcd.sh" stop-cluster ;;
        docker) "$HERE/docker.sh" stop ;;
        registry) "$HERE/registry.sh" stop ;;
        kafka) "$HERE/kafka.sh" stop ;;
        opensearch) "$HERE/opensearch.sh" stop ;;
        *) echo "unknown service: $1 (known: ${ALL[*]})" >&2; exit 2 ;;
    esac
}

cmd="${1:-}"
[ $# -gt 0 ] && shift
services=("$@")
[ ${#services[@]} -gt 0 ] || services=("${ALL[@]}")

case "$cmd" in
    start)
        # Services start one after another: the machine has few cores, and the
        # JVM services start faster when they do not compete with each other.
        out=""
        for s in "${services[@]}"; do
            out+="$(start_one "$s")"$'\n'
        done
        printf '%s' "$out"
        ;;
    stop)
        for ((i = ${#services[@]} - 1; i >= 0; i--)); do stop_one "${services[$i]}"; done
        ;;
    status)
        rc=0
        "$HERE/etcd.sh" status || rc=1
        "$HERE/docker.sh" status || rc=1
        "$HERE/registry.sh" status || rc=1
        "$HERE/kafka.sh" status || rc=1
        "$HERE/opensearch.sh" status || rc=1
        exit $rc
        ;;
    env)
        # env.sh exports into this shell; printing them back makes them evalable.
        # shellcheck disable=SC1091
        (
            for v in $(env | sed -n 's/^\(LAIN_[A-Z0-9_]*\|DOCKER_HOST\)=.*/\1/p'); do unset "$v"; done
            . "$HERE/env.sh"
            env | grep -E '^(LAIN_(ETCD|DOCKER|REGISTRY|KAFKA|ES)[A-Z0-9_]*|DOCKER_HOST)=' | sort | sed 's/^/export /'
        )
        ;;
    *) sed -n '2,/^set -euo/p' "$0" | sed '$d' >&2; exit 2 ;;
esac
