/* The smallest kernel the VMM boots from an ELF file: prints "ok" on COM1 and halts. Assembled
 * as ELF64 and as 32-bit ELF, with the PVH note (entered in 32-bit protected mode at _start) or,
 * with -DNO_PVH_NOTE, without it (ELF64 only: the 64-bit Linux boot protocol enters _start in
 * long mode; the code below means the same in either mode). kernel-seeds.sh builds the seeds. */
#ifndef NO_PVH_NOTE
    .section .note.Xen, "a", @note
    .p2align 2
    .long 4, 4, 18          /* name size, descriptor size, XEN_ELFNOTE_PHYS32_ENTRY */
    .asciz "Xen"
    .long _start
#endif
    .text
    .globl _start
_start:
    mov $0x3f8, %dx
    mov $0x6f, %al
    out %al, %dx
    mov $0x6b, %al
    out %al, %dx
1:  hlt
    jmp 1b
    .bss
    .skip 0x20000           /* memory beyond the file, as a kernel's .bss */
