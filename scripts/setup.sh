#!/bin/bash
# Installs what building and testing Ferrovisor needs on a Debian machine (idempotent: only
# missing packages are installed, after one apt-get update). The Rust toolchain itself must
# already be there (rustup); the Linux test-guest recipe installs its own packages.
# `scripts/setup.sh --test` adds what only the tests need (chromium for the web UI's browser test).
set -euo pipefail

packages=(
    build-essential   # gcc and binutils build the test guests (guests/build.rs)
    qemu-utils        # qemu-img / qemu-io: the interop peer of the block layer's tests
    iproute2          # ip: network namespaces, veth, tap for network tests
    util-linux        # flock, setsid
    procps            # ps, for leak checks in the daemon tests
    nftables          # nft: forwarding and NAT of ferrod's networks (crates/net)
    dnsmasq-base      # DHCP and DNS of ferrod's networks (crates/net)
    busybox-static    # udhcpc, nslookup and ping for the network tests' guest stand-ins
    fdisk             # sfdisk: partition tables for the image tests
    dosfstools        # fsck.vfat: checks the cloud-init seeds we write
    e2fsprogs         # mkfs.ext4 -d, debugfs: filesystems for the image tests
    debootstrap       # guests/debian/build.sh: a real Debian root filesystem (cached)
    openssl           # the remote-access tests make their CA and certificates as docs/remote.md says
    dpkg-dev          # scripts/package.sh: dpkg-deb, dpkg-shlibdeps
)
if [ "${1:-}" = "--test" ]; then
    packages+=(chromium)  # the web UI's browser test (crates/manager/tests/ui.rs) drives it headless
    # scripts/check-package.sh: systemd-analyze verify of the unit, man -l of every page
    packages+=(systemd man-db groff-base)
    packages+=(python3-venv)  # the API test's schemathesis (below) lives in a venv
fi
# npm builds the web UI that ferrod embeds (crates/manager/build.rs). Any Node.js 18+ with npm will
# do (a NodeSource one included, whose nodejs package carries npm), so Debian's are only installed
# when there is none.
if ! command -v npm >/dev/null; then
    packages+=(nodejs npm)
fi

missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}\n' "$p" 2>/dev/null | grep -q '^install ok installed$' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" -ne 0 ]; then
        echo "setup.sh: missing Debian packages: ${missing[*]}; run as root or: sudo apt-get install ${missing[*]}" >&2
        exit 1
    fi
    echo "setup.sh: installing ${missing[*]}" >&2
    apt-get update -q >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" >&2
fi

# ferrod runs each VMM jailed as this unprivileged system user (docs/isolation.md); the Debian
# package's postinst makes it the same way.
if ! getent passwd ferro-vmm >/dev/null; then
    if [ "$(id -u)" -ne 0 ]; then
        echo "setup.sh: the user ferro-vmm (jailed VMMs run as it) is missing; run as root or: sudo adduser --system --group --no-create-home --home /nonexistent --shell /usr/sbin/nologin ferro-vmm" >&2
        exit 1
    fi
    echo "setup.sh: creating the system user ferro-vmm" >&2
    adduser --quiet --system --group --no-create-home --home /nonexistent --shell /usr/sbin/nologin ferro-vmm
fi

if ! command -v cargo >/dev/null; then
    echo "setup.sh: cargo not found: install the Rust toolchain (rustup, Rust 1.85 or newer)" >&2
    exit 1
fi
if [ "${1:-}" = "--test" ] && [ "$(node -p 'process.versions.node.split(".")[0]')" -lt 20 ]; then
    echo "setup.sh: warning: Node.js $(node --version) is older than 20, which the browser test's playwright-core needs" >&2
fi
# schemathesis (PyPI) fuzzes ferrod's REST API against openapi.json in
# crates/manager/tests/api_schemathesis.rs; it goes into its own venv, pinned.
schemathesis_version=4.32.5
schemathesis_venv=${XDG_CACHE_HOME:-$HOME/.cache}/ferrovisor/schemathesis
if [ "${1:-}" = "--test" ] && ! "$schemathesis_venv/bin/schemathesis" --version 2>/dev/null | grep -q "$schemathesis_version"; then
    echo "setup.sh: installing schemathesis $schemathesis_version into $schemathesis_venv" >&2
    python3 -m venv "$schemathesis_venv"
    "$schemathesis_venv/bin/pip" install -q "schemathesis==$schemathesis_version" >&2
fi
if [ ! -e /dev/kvm ]; then
    echo "setup.sh: warning: /dev/kvm is missing; VM tests will fail (see 'ferro host-check')" >&2
fi
