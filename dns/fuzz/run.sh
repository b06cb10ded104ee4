#!/usr/bin/env bash
# Runs the request-handler fuzz target for a bounded time (FUZZ_SECS, 60 by default) with
# cargo-fuzz. Exits non-zero when the fuzzer finds a crash (any panic aborts the target).
#
# It runs on the pinned stable toolchain: RUSTC_BOOTSTRAP=1 lets cargo-fuzz pass its -Z flags,
# and no sanitizer is used, because the code under test is safe Rust and what the fuzzer hunts
# is panics, which libFuzzer sees as crashes without one. The build lives in its own target
# directory so the main build never compiles libFuzzer and later runs start warm.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
secs=${FUZZ_SECS:-60}
target_dir=${LAIN_FUZZ_TARGET_DIR:-/var/tmp/lain-target-fuzz}
cd "$here"
if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "installing cargo-fuzz" >&2
    cargo install cargo-fuzz --locked >&2
fi
corpus="$target_dir/corpus/request_handler"
mkdir -p "$corpus"
# A few valid queries as seeds, so the fuzzer starts from well-formed messages.
printf '\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x05web-1\x05hello\x04lain\x00\x00\x01\x00\x01' > "$corpus/seed-a"
printf '\x12\x35\x01\x00\x00\x01\x00\x00\x00\x00\x00\x01\x04_http\x04_tcp\x03web\x05hello\x04lain\x00\x00\x21\x00\x01\x00\x00\x29\x04\xd0\x00\x00\x00\x00\x00\x00' > "$corpus/seed-srv"
export RUSTC_BOOTSTRAP=1
exec cargo fuzz run --sanitizer none --target-dir "$target_dir" request_handler "$corpus" -- \
    -max_total_time="$secs" -rss_limit_mb=2048 -artifact_prefix="$target_dir/"
