#!/bin/bash
# All tests on a fresh machine: install what is needed, build the Linux test guest (cached
# under ~/.cache/ferrovisor, rebuilt only when its recipe changes), then run every test.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --test
start=$(date +%s)
linux_dir=$(guests/linux/build.sh | tail -n 1)
echo "test.sh: Linux test guest in $linux_dir ($(( $(date +%s) - start )) s)" >&2
export FERRO_LINUX_DIR=$linux_dir
start=$(date +%s)
debian_dir=$(guests/debian/build.sh | tail -n 1)
echo "test.sh: Debian root filesystem in $debian_dir ($(( $(date +%s) - start )) s)" >&2
cargo test --workspace --no-fail-fast -- --test-threads=2
# The Debian package of the debug build just tested (docs/service.md), and its checks.
scripts/check-package.sh "$(scripts/package.sh --debug)"
