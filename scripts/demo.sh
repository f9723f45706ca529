#!/bin/bash
# The main job on a fresh machine: install what is needed, build, check the host, and boot the
# built-in test guest with its serial console on this terminal.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo build --release -p ferro-cli
target/release/ferro host-check || true
echo
echo "== ferro run (built-in guest, 2 vCPUs)"
target/release/ferro run --guest hello --cpus 2 --cmdline "console=ttyS0 demo"
target/release/ferro run --guest smp --cpus 2
