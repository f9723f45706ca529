#!/bin/bash
# The main job on a fresh machine: install what is needed, build, check the host, boot the
# built-in test guest with its serial console on this terminal, then show the platform: ferrod
# serving its web UI on loopback with a running demo VM, until Ctrl-C.
# FERRO_DEMO_PORT picks the UI's port (default: a free one).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo build --release -p ferro-cli -p ferro-manager
target/release/ferro host-check || true
echo
echo "== ferro run (built-in guest, 2 vCPUs)"
target/release/ferro run --guest hello --cpus 2 --cmdline "console=ttyS0 demo"
target/release/ferro run --guest smp --cpus 2

echo
echo "== ferrod with its web UI and a demo VM"
home=$(mktemp -d /tmp/ferro-demo.XXXXXX)
export FERRO_HOME=$home
( umask 077; echo "$(openssl rand -hex 32) admin" > "$home/tokens" )
token=$(cut -d' ' -f1 "$home/tokens")
# In its own session, so that Ctrl-C reaches this script, which stops the VM before ferrod (VMs
# outlive ferrod by design).
RUST_LOG=info setsid target/release/ferrod --listen "127.0.0.1:${FERRO_DEMO_PORT:-0}" --insecure \
    --token-file "$home/tokens" 2> "$home/ferrod.log" &
ferrod=$!
stop() {
    target/release/ferro destroy demo >/dev/null 2>&1 || true
    kill "$ferrod" 2>/dev/null || true
    wait "$ferrod" 2>/dev/null || true
    echo "demo stopped; its files are in $home"
}
trap stop EXIT
trap 'exit 0' INT TERM
address=
for _ in $(seq 100); do
    address=$(sed -n 's/.*listening address=\([0-9.:]*\).*/\1/p' "$home/ferrod.log" | head -n 1)
    [ -n "$address" ] && [ -S "$home/ferrod.sock" ] && break
    kill -0 "$ferrod" 2>/dev/null || { cat "$home/ferrod.log" >&2; exit 1; }
    sleep 0.1
done
[ -n "$address" ] || { echo "demo: ferrod did not start; its log:" >&2; cat "$home/ferrod.log" >&2; exit 1; }
printf 'name = "demo"\nmemory = "64M"\nvcpus = 1\n[boot]\nguest = "idle"\n' > "$home/demo.toml"
target/release/ferro define "$home/demo.toml"
target/release/ferro start demo
target/release/ferro list --all
echo
echo "Open http://$address/ and sign in with the token:"
echo "    $token"
echo "(the demo VM echoes what you type in its console; ferrod's log: $home/ferrod.log)"
echo "Ctrl-C stops the VM and ferrod."
wait "$ferrod"
