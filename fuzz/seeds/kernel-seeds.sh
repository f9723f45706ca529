#!/bin/bash
# Builds the seeds of the `kernel` fuzz target (fuzz/corpus/kernel) from kernel-elf.S and
# kernel-bzimage.S with binutils: the same tiny kernel as ELF64 and 32-bit ELF with a PVH note,
# as ELF64 without one, and as a bzImage. docs/fuzzing.md.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=$here/../corpus/kernel
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
mkdir -p "$out"
# One PT_LOAD at 1 MiB (code, note, .bss) and the PT_NOTE, as Linux's vmlinux has them.
cat > "$tmp/kernel.ld" <<'LD'
ENTRY(_start)
PHDRS { text PT_LOAD; note PT_NOTE; }
SECTIONS {
  . = 0x100000;
  .text : { *(.text) } :text
  .note.Xen : { KEEP(*(.note.Xen)) } :text :note
  .bss : { *(.bss) } :text
  /DISCARD/ : { *(.note.gnu.*) *(.note.GNU-stack) *(.comment) }
}
LD
link=(-nostdlib -static -z max-page-size=4096 -z noexecstack --no-warn-rwx-segments -T "$tmp/kernel.ld")
gcc -c "$here/kernel-elf.S" -o "$tmp/pvh64.o"
ld "${link[@]}" -o "$tmp/pvh64.elf" "$tmp/pvh64.o"
gcc -m32 -c "$here/kernel-elf.S" -o "$tmp/pvh32.o"
ld -m elf_i386 "${link[@]}" -o "$tmp/pvh32.elf" "$tmp/pvh32.o"
gcc -DNO_PVH_NOTE -c "$here/kernel-elf.S" -o "$tmp/linux64.o"
ld "${link[@]}" -o "$tmp/linux64.elf" "$tmp/linux64.o"
gcc -c "$here/kernel-bzimage.S" -o "$tmp/bzimage.o"
objcopy -O binary "$tmp/bzimage.o" "$tmp/bzImage"
for f in pvh64.elf pvh32.elf linux64.elf; do strip "$tmp/$f"; install -m 644 "$tmp/$f" "$out/$f"; done
install -m 644 "$tmp/bzImage" "$out/bzImage"
ls -l "$out"
