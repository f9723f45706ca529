#!/bin/bash
# Build the Debian root filesystem the image tests boot from: debootstrap's minimal bookworm
# with linux-image-amd64 installed, so /boot has a real distribution layout (vmlinuz-*,
# initrd.img-*, config-*, the /vmlinuz and /initrd.img links), as one ext4 filesystem image.
#
# The result is cached in ${FERRO_CACHE:-$HOME/.cache/ferrovisor}/debian/<hash>/rootfs.ext4,
# where <hash> covers this script: it is built once (a few minutes, mostly downloads and dpkg)
# and reused. The last line on stdout is that directory; progress goes to stderr.
#
# usage: guests/debian/build.sh
# env:   FERRO_CACHE    cache root (default $HOME/.cache/ferrovisor)
#        FERRO_MIRROR   Debian mirror (default: the first deb.debian.org-style URI apt uses here)
# needs: debootstrap, e2fsprogs (scripts/setup.sh installs them), root
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cache_root=${FERRO_CACHE:-$HOME/.cache/ferrovisor}/debian
suite=bookworm
size=3G
log() { echo "debian/build.sh: $*" >&2; }
die() { echo "debian/build.sh: error: $*" >&2; exit 1; }

hash=$(sha256sum "$here/build.sh" | cut -c1-16)
out=$cache_root/$hash
if [ -f "$out/rootfs.ext4" ]; then
    log "up to date: $out"
    echo "$out"
    exit 0
fi

[ "$(id -u)" -eq 0 ] || die "debootstrap needs root"
command -v debootstrap >/dev/null || die "debootstrap not found: apt-get install debootstrap (scripts/setup.sh)"
command -v mkfs.ext4 >/dev/null || die "mkfs.ext4 not found: apt-get install e2fsprogs"
mirror=${FERRO_MIRROR:-$(sed -n 's/^URIs: *\(http[^ ]*\/debian\)$/\1/p' /etc/apt/sources.list.d/*.sources 2>/dev/null | head -n 1)}
mirror=${mirror:-http://deb.debian.org/debian}

mkdir -p "$cache_root"
exec 9>"$cache_root/.lock"
log "waiting for the build lock $cache_root/.lock"
flock 9
if [ -f "$out/rootfs.ext4" ]; then
    log "up to date: $out"
    echo "$out"
    exit 0
fi

work=$cache_root/build-$hash
rm -rf "$work" "$out.tmp"
mkdir -p "$work" "$out.tmp"
trap 'rm -rf "$work"' EXIT
log "debootstrap $suite from $mirror with linux-image-amd64 (a few minutes the first time)"
debootstrap --variant=minbase --include=linux-image-amd64 "$suite" "$work/root" "$mirror" >"$out.tmp/debootstrap.log" 2>&1 ||
    die "debootstrap failed; see $out.tmp/debootstrap.log"
rm -rf "$work/root/var/cache/apt/archives/"*.deb "$work/root/var/lib/apt/lists/"*
ls "$work/root/boot" > "$out.tmp/boot.txt"
grep -q '^vmlinuz-' "$out.tmp/boot.txt" || die "no kernel in /boot after debootstrap"
grep -q '^initrd.img-' "$out.tmp/boot.txt" || die "no initrd in /boot after debootstrap"
log "making the ext4 filesystem ($size, sparse)"
truncate -s "$size" "$out.tmp/rootfs.ext4"
mkfs.ext4 -q -L debian-root -d "$work/root" "$out.tmp/rootfs.ext4"
rm -rf "$out"
mv "$out.tmp" "$out"
log "built $out"
echo "$out"
