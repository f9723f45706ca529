#!/bin/bash
# Provides Debian's QEMU system emulator as the benchmark peer without installing it: Debian's
# qemu-system-x86 package conflicts with the newer qemu-utils (qemu-img) the interop tests use,
# so its packages are unpacked into a private cache directory instead, and only the shared
# libraries they need are installed. Prints the path of a qemu-system-x86_64 wrapper that finds
# its own firmware as its last line of stdout.
#
# usage: scripts/qemu-peer.sh        (as root on Debian; idempotent, a no-op when cached)
# env:   FERRO_CACHE (default $HOME/.cache/ferrovisor)
set -euo pipefail

cache=${FERRO_CACHE:-$HOME/.cache/ferrovisor}/qemu-peer
wrapper=$cache/qemu-system-x86_64
if [ -x "$wrapper" ] && "$wrapper" --version >/dev/null 2>&1; then
    echo "$wrapper"
    exit 0
fi
[ "$(id -u)" -eq 0 ] || { echo "qemu-peer.sh: needs root to install QEMU's libraries" >&2; exit 1; }

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$work"
# apt-get download runs as _apt when it can; a root-owned temp dir makes it warn, not fail.
chmod 755 "$work"
apt-get update -q >&2 || true
apt-get download -q qemu-system-x86 qemu-system-common qemu-system-data >&2

# Every library the three packages depend on, without the qemu packages themselves.
deps=$(for deb in ./*.deb; do dpkg-deb -f "$deb" Depends; done | tr ',' '\n' \
    | sed -e 's/([^)]*)//g' -e 's/|.*//' -e 's/ //g' | grep -v '^qemu-' | grep -v '^$' | sort -u)
# shellcheck disable=SC2086
DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $deps >&2

rm -rf "$cache"
mkdir -p "$cache"
for deb in ./*.deb; do dpkg-deb -x "$deb" "$cache/root"; done
cat > "$wrapper" <<WRAP
#!/bin/sh
# Debian's qemu-system-x86_64, unpacked by scripts/qemu-peer.sh; -L finds its firmware.
exec "$cache/root/usr/bin/qemu-system-x86_64" -L "$cache/root/usr/share/qemu" -L /usr/share/seabios -L /usr/lib/ipxe/qemu "\$@"
WRAP
chmod +x "$wrapper"
"$wrapper" --version >&2
echo "$wrapper"
