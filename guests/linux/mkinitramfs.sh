#!/bin/bash
# Build the Ferrovisor Linux test guest's initramfs: an uncompressed newc cpio
# holding a static busybox and an /init that
#   - mounts proc, sysfs and devtmpfs,
#   - prints FERRO-GUEST-UP, FERRO-UPTIME <guest uptime s>, FERRO-CPUS <online CPUs>,
#     FERRO-MEM-KB <MemTotal>,
#   - runs the command given on the kernel command line as ferro.cmd=... ('+' stands
#     for a space, since the kernel splits its command line at spaces) in a subshell,
#     printing FERRO-CMD <command>, its output, then FERRO-CMD-RC <exit status>,
#   - prints FERRO-POWEROFF and powers off (poweroff -f).
#
# Uncompressed on purpose: on kvm-pvm the kernel's decompressor runs in
# interpreted ring 0 (a gzip initramfs cost tens of seconds in the reference).
# There is no /dev/console in the archive: the kernel's built-in initramfs
# provides it before this one is unpacked.
#
# usage: mkinitramfs.sh OUTPUT.cpio
# needs: busybox-static, cpio (build.sh installs them)
set -euo pipefail

die() { echo "mkinitramfs.sh: $*" >&2; exit 1; }

[ $# -eq 1 ] || die "usage: mkinitramfs.sh OUTPUT.cpio"
out=$1
busybox=/bin/busybox

[ -x "$busybox" ] || die "$busybox not found: apt-get install busybox-static"
command -v cpio >/dev/null || die "cpio not found: apt-get install cpio"
if readelf -l "$busybox" | grep -q INTERP; then
    die "$busybox is dynamically linked; the initramfs needs busybox-static (apt-get install busybox-static)"
fi

stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT

mkdir -p "$stage"/{bin,dev,proc,sys,tmp,mnt,root}
cp "$busybox" "$stage/bin/busybox"
for applet in $("$busybox" --list); do
    [ "$applet" = busybox ] || ln -s busybox "$stage/bin/$applet"
done

cat > "$stage/init" <<'INIT'
#!/bin/sh
# /init of the Ferrovisor Linux test guest (busybox ash).  On kvm-pvm every
# syscall costs about 1.4 ms and every fork+exec about a second, so this sticks
# to shell builtins: `read` instead of cat/grep, `( eval )` instead of `sh -c`.
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
echo FERRO-GUEST-UP
read -r uptime _ < /proc/uptime
echo "FERRO-UPTIME $uptime"

# Online CPUs (the ones /proc/cpuinfo lists), from a list like "0-1,3".
read -r online < /sys/devices/system/cpu/online
cpus=0
IFS=,
for range in $online; do
    case $range in
        *-*) cpus=$((cpus + ${range#*-} - ${range%-*} + 1)) ;;
        *) cpus=$((cpus + 1)) ;;
    esac
done
unset IFS
echo "FERRO-CPUS $cpus"

mem_kb=unknown
while read -r key value _; do
    if [ "$key" = MemTotal: ]; then mem_kb=$value; break; fi
done < /proc/meminfo
echo "FERRO-MEM-KB $mem_kb"

read -r cmdline < /proc/cmdline
cmd=
set -f    # no globbing while splitting the kernel command line
for arg in $cmdline; do
    case $arg in
        ferro.cmd=*) cmd=${arg#ferro.cmd=} ;;
    esac
done
set +f
if [ -n "$cmd" ]; then
    cmd=${cmd//+/ }
    echo "FERRO-CMD $cmd"
    ( eval "$cmd" )
    echo "FERRO-CMD-RC $?"
fi

sync
echo FERRO-POWEROFF
poweroff -f
INIT
chmod 755 "$stage/init"

# Fixed owners and timestamps so that the same busybox gives the same archive.
find "$stage" -exec touch -h -d @0 {} +
mkdir -p "$(dirname "$out")"
(cd "$stage" && find . -mindepth 1 | LC_ALL=C sort |
    cpio --quiet -o -H newc --owner=0:0 --reproducible) > "$out.tmp"
mv "$out.tmp" "$out"
