#!/bin/bash
# Runs one cargo-fuzz target for a while: scripts/fuzz.sh TARGET SECONDS [libFuzzer options...]
# Targets: ls fuzz/fuzz_targets. Inputs that find something new are added to fuzz/corpus/TARGET
# (commit the small ones worth keeping); a crash is saved under fuzz/artifacts/TARGET and makes
# this script fail. Needs cargo-fuzz (cargo install cargo-fuzz) and a sanitizer build: the
# nightly toolchain when installed, else stable with RUSTC_BOOTSTRAP=1. docs/fuzzing.md.
set -euo pipefail
if [ $# -lt 2 ]; then
    echo "usage: $0 TARGET SECONDS [libFuzzer options...]" >&2
    exit 2
fi
target=$1
seconds=$2
shift 2
cd "$(dirname "$0")/.."
if [ ! -f "fuzz/fuzz_targets/$target.rs" ]; then
    echo "fuzz.sh: no target $target (targets: $(ls fuzz/fuzz_targets | sed 's/\.rs$//' | tr '\n' ' '))" >&2
    exit 2
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "fuzz.sh: cargo-fuzz is not installed: cargo install cargo-fuzz" >&2
    exit 1
fi
toolchain=()
if rustup toolchain list 2>/dev/null | grep -q '^nightly'; then
    toolchain=(+nightly)
else
    export RUSTC_BOOTSTRAP=1
fi
mkdir -p "fuzz/corpus/$target"
# One job on one core; -max_len bounds each input (images and queues larger than this add no
# new paths worth the time; disk_boot's disks need 131072). The RSS limit is 2 GiB, not
# libFuzzer's 1 GiB: a sanitized process grows by ~80 bytes an input (ASan's quarantine and the
# growing corpus, docs/fuzzing.md), which ends a run of millions on the limit with no leak.
maxlen=65536
if [ "$target" = disk_boot ] || [ "$target" = vmdk ]; then maxlen=131072; fi
exec cargo "${toolchain[@]}" fuzz run "$target" "fuzz/corpus/$target" -- \
    -max_total_time="$seconds" -max_len="$maxlen" -rss_limit_mb=2048 -print_final_stats=1 "$@"
