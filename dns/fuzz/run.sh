#!/usr/bin/env bash
# Runs the request-handler fuzz target for a bounded time (FUZZ_SECS, 60 by default) with
# cargo-fuzz on the nightly toolchain. Exits non-zero when the fuzzer finds a crash.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
secs=${FUZZ_SECS:-60}
cd "$here"
mkdir -p corpus/request_handler
# A few valid queries as seeds, so the fuzzer starts from well-formed messages.
printf '\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x05web-1\x05hello\x04lain\x00\x00\x01\x00\x01' > corpus/request_handler/seed-a
printf '\x12\x35\x01\x00\x00\x01\x00\x00\x00\x00\x00\x01\x04_http\x04_tcp\x03web\x05hello\x04lain\x00\x00\x21\x00\x01\x00\x00\x29\x04\xd0\x00\x00\x00\x00\x00\x00' > corpus/request_handler/seed-srv
exec cargo +nightly fuzz run request_handler corpus/request_handler -- -max_total_time="$secs" -rss_limit_mb=2048
