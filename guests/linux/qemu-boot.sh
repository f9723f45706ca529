#!/bin/bash
# Boot the Linux test guest (build.sh) under Debian's QEMU and time it: the
# peer measurement for Ferrovisor's own VMM on the same kernel and initramfs.
#
# usage: guests/linux/qemu-boot.sh [--kernel vmlinux|bzImage] [--machine M] [--smp N]
#                                  [--mem MB] [--cmd CMD] [--timeout S] [--extra ARGS] [--dir DIR]
#        guests/linux/qemu-boot.sh --matrix [--runs N]
#
# One boot prints the guest console with wall-clock offsets on stderr and one
# RESULT line on stdout, e.g.
#   RESULT kernel=vmlinux machine=microvm,acpi=on smp=1 up_s=21.30 exit_s=22.10 qemu_rc=0 cpus=1 mem_kb=... cmd_rc=0 load1=0.50
# up_s is QEMU start -> FERRO-GUEST-UP on the console, exit_s is QEMU start ->
# QEMU exited, load1 the host's 1-minute load average before the boot. --matrix boots the measured set (microvm vmlinux and bzImage with
# 1 and 2 vCPUs, then pc and q35 with vmlinux) --runs times each and prints one
# RESULT line per boot.
#
# Defaults: --kernel vmlinux --machine microvm,acpi=on --smp 1 --mem 256
#           --cmd 'cat+/proc/partitions' --timeout 180
# The kernel command line is guests/linux/cmdline.txt plus ferro.cmd=CMD and --extra.
# --dir DIR boots DIR/{vmlinux,bzImage,initramfs.cpio} instead of build.sh's output.
set -euo pipefail
shopt -s lastpipe

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

die() { echo "qemu-boot.sh: error: $*" >&2; exit 1; }
log() { echo "qemu-boot.sh: $*" >&2; }

kernel=vmlinux machine=microvm,acpi=on smp=1 mem=256 cmd='cat+/proc/partitions'
timeout_s=180 extra= matrix=0 runs=1 dir=
while [ $# -gt 0 ]; do
    [ $# -ge 2 ] || [ "$1" = --matrix ] || die "option $1 needs a value"
    case $1 in
        --kernel) kernel=$2; shift 2 ;;
        --machine) machine=$2; shift 2 ;;
        --smp) smp=$2; shift 2 ;;
        --mem) mem=$2; shift 2 ;;
        --cmd) cmd=$2; shift 2 ;;
        --timeout) timeout_s=$2; shift 2 ;;
        --extra) extra=$2; shift 2 ;;
        --runs) runs=$2; shift 2 ;;
        --dir) dir=$2; shift 2 ;;
        --matrix) matrix=1; shift ;;
        *) die "unknown option $1 (see the usage at the top of $0)" ;;
    esac
done
case $kernel in vmlinux|bzImage) ;; *) die "--kernel must be vmlinux or bzImage, not $kernel" ;; esac

# Debian's QEMU, unpacked privately (its package would replace the newer qemu-img).
qemu=${FERRO_QEMU:-$("$here/../../scripts/qemu-peer.sh" | tail -n 1)}
[ -x "$qemu" ] || die "no QEMU peer: scripts/qemu-peer.sh failed"
[ -w /dev/kvm ] || die "/dev/kvm is missing or not writable (load kvm, or add yourself to group kvm)"

# build.sh is a no-op when the recipe is unchanged; its last stdout line is the output dir.
if [ -z "$dir" ]; then
    dir=$("$here/build.sh" | tail -n 1)
fi
for f in vmlinux bzImage initramfs.cpio; do
    [ -f "$dir/$f" ] || die "$dir/$f not found"
done
base_cmdline=$(cat "$here/cmdline.txt")

elapsed() {  # sets $t to the seconds since $start_us, two decimals, without forking
    local d=$(( ${EPOCHREALTIME/[.,]/} - start_us ))
    printf -v t '%d.%02d' $(( d / 1000000 )) $(( d % 1000000 / 10000 ))
}

boot() {  # boot KERNEL MACHINE SMP
    local k=$1 m=$2 n=$3
    local append="$base_cmdline ferro.cmd=$cmd${extra:+ $extra}"
    local load
    read -r load _ < /proc/loadavg    # other work on the host slows an interpreted guest a lot
    local start_us=${EPOCHREALTIME/[.,]/} up=none cpus=none mem_kb=none cmd_rc=none line t rc
    log "boot: kernel=$k machine=$m smp=$n mem=${mem}M"
    set +o pipefail    # QEMU's status is read from PIPESTATUS below
    # -arch-capabilities: QEMU 7.2 cannot set IA32_ARCH_CAPABILITIES on this host's KVM.
    timeout "$timeout_s" "$qemu" -accel kvm -M "$m" -cpu host,-arch-capabilities -m "$mem" -smp "$n" \
        -nographic -no-reboot -serial stdio -monitor none -nodefaults \
        -kernel "$dir/$k" -initrd "$dir/initramfs.cpio" -append "$append" \
        </dev/null 2>&1 |
    while IFS= read -r line; do
        line=${line%$'\r'}
        elapsed
        printf '[%7s] %s\n' "$t" "$line" >&2
        case $line in
            *FERRO-GUEST-UP) up=$t ;;  # firmware (SeaBIOS) may leave a partial line before it
            *"FERRO-CPUS "*) cpus=${line##*FERRO-CPUS } ;;
            *"FERRO-MEM-KB "*) mem_kb=${line##*FERRO-MEM-KB } ;;
            *"FERRO-CMD-RC "*) cmd_rc=${line##*FERRO-CMD-RC } ;;
        esac
    done
    rc=${PIPESTATUS[0]}
    elapsed
    set -o pipefail
    [ "$rc" -ne 124 ] || log "timed out after ${timeout_s} s"
    echo "RESULT kernel=$k machine=$m smp=$n up_s=$up exit_s=$t qemu_rc=$rc cpus=$cpus mem_kb=$mem_kb cmd_rc=$cmd_rc load1=$load"
}

if [ $matrix -eq 0 ]; then
    boot "$kernel" "$machine" "$smp"
    exit 0
fi

for ((i = 1; i <= runs; i++)); do
    boot vmlinux microvm,acpi=on 1
    boot vmlinux microvm,acpi=on 2
    boot bzImage microvm,acpi=on 1
    boot bzImage microvm,acpi=on 2
    boot vmlinux q35 1
    boot vmlinux pc 1
done
