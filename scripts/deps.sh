#!/usr/bin/env bash
# Installs the Debian packages lain's build, tests and local cluster need, if any are missing.
set -euo pipefail

# Build: rdkafka compiles librdkafka with cmake; etcd-client compiles etcd's protobuf files
# with protoc (and the well-known types in libprotobuf-dev); the rest link against system libraries.
BUILD=(cmake g++ make pkg-config protobuf-compiler libprotobuf-dev libcurl4-openssl-dev libssl-dev zlib1g-dev libzstd-dev)
# Services the tests run for real (the tests/services scripts would install them too).
SERVICES=(etcd-server etcd-client docker.io busybox-static)
# Clients and peers the tests talk to; python3-venv holds the API fuzzer (tests/api_fuzz.sh).
TOOLS=(dnsutils curl iproute2 unbound python3 python3-venv)

missing=()
for p in "${BUILD[@]}" "${SERVICES[@]}" "${TOOLS[@]}" "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "deps: installing ${missing[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    # Package services must not start on install; the project starts its own on loopback.
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
        chmod +x /usr/sbin/policy-rc.d
        trap 'rm -f /usr/sbin/policy-rc.d' EXIT
    fi
    apt-get update -qq >&2
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
fi
