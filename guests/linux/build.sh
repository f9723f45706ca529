#!/bin/bash
# Build the Ferrovisor Linux test guest: a small x86_64 kernel from Debian's
# linux-source-6.1 (tinyconfig + ferro.config + patches/*.patch), as
#   vmlinux         ELF with a PVH note (also bootable with the 64-bit boot protocol)
#   bzImage         the same kernel in the bzImage format
#   initramfs.cpio  uncompressed busybox initramfs (mkinitramfs.sh)
#
# Results are cached in ${FERRO_CACHE:-$HOME/.cache/ferrovisor}/linux/<hash>/, where
# <hash> covers ferro.config, the patches, this script and mkinitramfs.sh: an
# unchanged recipe is never rebuilt. The last line on stdout is that directory;
# progress and errors go to stderr.
#
# usage: guests/linux/build.sh
# env:   FERRO_CACHE       cache root (default $HOME/.cache/ferrovisor)
#        FERRO_KEEP_BUILD  1 keeps the kernel build tree (default: removed after success)
#        FERRO_JOBS        make -j value (default 2; the build runs under nice -n 10)
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cache_root=${FERRO_CACHE:-$HOME/.cache/ferrovisor}/linux
jobs=${FERRO_JOBS:-2}
source_tarball=/usr/src/linux-source-6.1.tar.xz
packages=(linux-source-6.1 build-essential bc bison flex libelf-dev libssl-dev cpio
          busybox-static e2fsprogs)

log() { echo "build.sh: $*" >&2; }
die() { echo "build.sh: error: $*" >&2; exit 1; }

# --- Inputs and their hash ------------------------------------------------------
config_fragment=$here/ferro.config
shopt -s nullglob
patches=("$here"/patches/*.patch)
shopt -u nullglob
[ -f "$config_fragment" ] || die "missing $config_fragment"
[ ${#patches[@]} -gt 0 ] || die "no patches in $here/patches"

inputs=("$config_fragment" "${patches[@]}" "$here/build.sh" "$here/mkinitramfs.sh")
hash=$(for f in "${inputs[@]}"; do echo "== ${f#"$here"/}"; cat "$f"; done |
       sha256sum | cut -c1-16)
out=$cache_root/$hash

is_built() {
    [ -f "$out/vmlinux" ] && [ -f "$out/bzImage" ] && [ -f "$out/initramfs.cpio" ]
}

if is_built; then
    log "up to date: $out"
    echo "$out"
    exit 0
fi

# --- Packages -------------------------------------------------------------------
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}\n' "$p" 2>/dev/null | grep -q '^install ok installed$' ||
        missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    [ "$(id -u)" -eq 0 ] || die "missing Debian packages: ${missing[*]}; run as root or: sudo apt-get install ${missing[*]}"
    log "installing ${missing[*]}"
    apt-get update -q >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" >&2
fi
[ -f "$source_tarball" ] || die "$source_tarball not found although linux-source-6.1 is installed"

# --- Build (one at a time per cache) --------------------------------------------
mkdir -p "$cache_root"
exec 9>"$cache_root/.lock"
log "waiting for the build lock $cache_root/.lock"
flock 9
if is_built; then    # another run built it while we waited
    log "up to date: $out"
    echo "$out"
    exit 0
fi

work=$cache_root/build-$hash
rm -rf "$work" "$out.tmp"
mkdir -p "$work" "$out.tmp"
src=$work/linux-source-6.1
build_log=$work/build.log
start=$(date +%s)

log "unpacking $source_tarball into $work"
tar -C "$work" -xf "$source_tarball"
[ -d "$src" ] || die "$source_tarball did not contain linux-source-6.1/"

for p in "${patches[@]}"; do
    log "applying ${p#"$here"/}"
    patch -d "$src" -p1 --batch --forward --fuzz=0 --no-backup-if-mismatch -s < "$p" ||
        die "patch ${p#"$here"/} does not apply to $(dpkg-query -W -f='${Version}' linux-source-6.1)"
done

log "configuring: tinyconfig + ${config_fragment#"$here"/}"
make -C "$src" tinyconfig >"$build_log" 2>&1
(cd "$src" && ./scripts/kconfig/merge_config.sh -m .config "$config_fragment") >>"$build_log" 2>&1
make -C "$src" olddefconfig >>"$build_log" 2>&1

# Every option the fragment sets must have survived olddefconfig.
bad=0
while read -r line; do
    case $line in
        CONFIG_*=*)
            grep -qxF "$line" "$src/.config" ||
                { log "config: $line requested, got: $(grep "^${line%%=*}=" "$src/.config" || echo 'not set')"; bad=1; } ;;
        "# CONFIG_"*" is not set")
            opt=${line#\# }; opt=${opt%% *}
            if grep -q "^$opt=" "$src/.config"; then
                log "config: $opt requested off, got: $(grep "^$opt=" "$src/.config")"; bad=1
            fi ;;
    esac
done < "$config_fragment"
[ $bad -eq 0 ] || die "the config fragment does not hold (see above; dependencies or a typo)"

log "building vmlinux and bzImage (nice -n 10 make -j$jobs; log: $build_log)"
if ! KBUILD_BUILD_USER=ferrovisor KBUILD_BUILD_HOST=ferrovisor \
     nice -n 10 make -C "$src" -j"$jobs" vmlinux bzImage >>"$build_log" 2>&1; then
    tail -n 30 "$build_log" >&2
    die "kernel build failed; full log: $build_log"
fi

readelf -n "$src/vmlinux" | grep -q 'Xen.*0x00000012' ||
    die "vmlinux has no PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY); is CONFIG_PVH on?"

log "building initramfs.cpio"
"$here/mkinitramfs.sh" "$out.tmp/initramfs.cpio"

cp "$src/vmlinux" "$out.tmp/vmlinux"
cp "$src/arch/x86/boot/bzImage" "$out.tmp/bzImage"
cp "$src/.config" "$out.tmp/config"
{
    echo "source: linux-source-6.1 $(dpkg-query -W -f='${Version}' linux-source-6.1)"
    echo "busybox: $(dpkg-query -W -f='${Version}' busybox-static)"
    echo "build seconds: $(( $(date +%s) - start )) (make -j$jobs, nice -n 10, $(nproc) cores)"
} > "$out.tmp/build-info.txt"
cp "$build_log" "$out.tmp/build.log"
mv "$out.tmp" "$out"

if [ "${FERRO_KEEP_BUILD:-0}" = 1 ]; then
    log "kept the build tree: $work"
else
    rm -rf "$work"
fi
log "built in $(( $(date +%s) - start )) s: $out"
echo "$out"
