/* Test-guest kit: PVH entry (32-bit protected mode, paging off, %ebx = hvm_start_info),
 * switch to long mode on static page tables, static IDT and TSS, ring-3 entry and return,
 * and the real-mode trampoline that application processors start in after INIT/SIPI.
 * Ring 0 uses only instructions kvm-pvm's emulator implements (docs/kvm-pvm.md). */
#include "layout.h"

#define MAX_CPUS 64
#define STACK_SIZE 16384

/* ---- PVH note: XEN_ELFNOTE_PHYS32_ENTRY (18) ---- */
    .section .note.Xen, "a", @note
    .p2align 2
    .long 4, 4, 18
    .asciz "Xen"
    .long _start32

/* ---- 32-bit entry ---- */
    .section .text.entry, "ax"
    .code32
    .globl _start32
_start32:
    cli
    mov %ebx, %esi                  /* keep start_info */
    mov $bsp_stack_top, %esp        /* PVH gives no stack */
    lgdt gdt_ptr
    mov $SEL_KDATA, %eax
    mov %eax, %ds
    mov %eax, %es
    mov %eax, %ss
    call enable_long_mode_32
    ljmp $SEL_KCODE, $long_entry_bsp

/* Shared by the BSP and the AP trampoline: PAE, CR3, EFER.LME, paging. */
enable_long_mode_32:
    mov %cr4, %eax
    or $0x620, %eax                 /* PAE | OSFXSR | OSXMMEXCPT */
    mov %eax, %cr4
    mov $pml4, %eax
    mov %eax, %cr3
    mov $0xc0000080, %ecx
    rdmsr
    or $0x100, %eax                 /* LME */
    wrmsr
    mov %cr0, %eax
    or $0x80010021, %eax            /* PG | WP | NE | PE */
    and $0x9fffffff, %eax           /* clear CD, NW */
    mov %eax, %cr0
    ret

    .code64
long_entry_bsp:
    mov $SEL_KDATA, %eax
    mov %eax, %ds
    mov %eax, %es
    mov %eax, %ss
    mov %eax, %fs
    mov %eax, %gs
    lea bsp_stack_top(%rip), %rsp
    lidt idt_ptr(%rip)
    mov $SEL_TSS, %eax
    ltr %ax
    mov %esi, %edi                  /* guest_main(start_info) */
    call kit_main
    /* kit_main does not return; stop the vCPU hard if it does. */
1:  cli
    hlt
    jmp 1b

/* AP path after the trampoline: we are in 32-bit protected mode. */
    .code32
ap_prot32:
    mov $SEL_KDATA, %eax
    mov %eax, %ds
    mov %eax, %es
    mov %eax, %ss
    mov $ap_stack_top, %esp         /* temporary: the shared early stack, guarded by a lock */
    call enable_long_mode_32
    ljmp $SEL_KCODE, $ap_long

    .code64
ap_long:
    mov $SEL_KDATA, %eax
    mov %eax, %ds
    mov %eax, %es
    mov %eax, %ss
    /* Take a CPU index and the stack that goes with it. */
    mov $1, %eax
    lock xadd %eax, ap_next_index(%rip)
    mov %eax, %edi
    inc %eax
    imul $STACK_SIZE, %eax, %eax
    lea ap_stacks(%rip), %rsp
    add %rax, %rsp
    movb $0, ap_early_lock_low(%rip) /* release the early stack */
    lidt idt_ptr(%rip)
    call kit_ap_main                /* kit_ap_main(index) */
1:  cli
    hlt
    jmp 1b

/* ---- ring 3 entry and return ----
 * u64 kit_enter_user(void (*fn)(void), u64 user_stack_top, u64 arg)
 * Runs fn in ring 3 with %rdi = arg. The user code ends with `ud2` holding its result in %rax;
 * the #UD handler calls kit_leave_user(result), which returns from kit_enter_user. */
    .globl kit_enter_user
kit_enter_user:
    push %rbx
    push %rbp
    push %r12
    push %r13
    push %r14
    push %r15
    mov %rsp, kit_user_saved_rsp(%rip)
    push $SEL_UDATA                 /* SS */
    push %rsi                       /* RSP */
    push $0x202                     /* RFLAGS: IF */
    push $SEL_UCODE                 /* CS */
    push %rdi                       /* RIP */
    mov %rdx, %rdi
    iretq

    .globl kit_leave_user
kit_leave_user:
    mov %rdi, %rax
    mov kit_user_saved_rsp(%rip), %rsp
    pop %r15
    pop %r14
    pop %r13
    pop %r12
    pop %rbp
    pop %rbx
    ret

/* ---- interrupt entry: every stub pushes (error code or 0, vector) ---- */
isr_common:
    push %rax
    push %rcx
    push %rdx
    push %rbx
    push %rbp
    push %rsi
    push %rdi
    push %r8
    push %r9
    push %r10
    push %r11
    push %r12
    push %r13
    push %r14
    push %r15
    mov %rsp, %rdi
    call kit_trap                   /* kit_trap(struct kit_frame *) */
    pop %r15
    pop %r14
    pop %r13
    pop %r12
    pop %r11
    pop %r10
    pop %r9
    pop %r8
    pop %rdi
    pop %rsi
    pop %rbp
    pop %rbx
    pop %rdx
    pop %rcx
    pop %rax
    add $16, %rsp
    iretq

    .section .isr, "ax"
    .set vec, 0
    .rept 256
    .balign 16
    .if (vec == 8) || (vec == 10) || (vec == 11) || (vec == 12) || (vec == 13) || (vec == 14) || (vec == 17) || (vec == 21) || (vec == 29) || (vec == 30)
    pushq $vec
    .else
    pushq $0
    pushq $vec
    .endif
    jmp isr_common
    .set vec, vec + 1
    .endr

/* ---- the AP trampoline (real mode, copied nowhere: linked at 0x8000) ---- */
    .section .trampoline, "ax"
    .code16
    .globl kit_ap_trampoline
kit_ap_trampoline:
    cli
    xor %ax, %ax
    mov %ax, %ds
    /* one AP at a time uses the early stack */
1:  mov $1, %al
    xchg %al, ap_early_lock_low
    test %al, %al
    jnz 1b
    lgdtl tramp_gdt_ptr
    mov %cr0, %eax
    or $1, %eax
    mov %eax, %cr0
    ljmpl $SEL_CODE32, $ap_prot32
    .p2align 3
tramp_gdt_ptr:
    .word gdt_end - gdt - 1
    .long gdt
    .globl ap_early_lock_low
ap_early_lock_low:
    .byte 0

/* ---- static tables ---- */
    .section .data
    .p2align 4
gdt:
    .quad 0
    .quad 0x00af9a000000ffff        /* 0x08 kernel code, 64-bit */
    .quad 0x00cf92000000ffff        /* 0x10 kernel data */
    .quad 0x00cf9a000000ffff        /* 0x18 code, 32-bit (AP trampoline) */
    .quad 0x00cff2000000ffff        /* 0x20 user data */
    .quad 0x00affa000000ffff        /* 0x28 user code, 64-bit */
    /* 0x30 TSS: base KIT_TSS_BASE, limit 0x67, type 0x89 (available 64-bit TSS) */
    .quad 0x67 | ((KIT_TSS_BASE & 0xffffff) << 16) | (0x89 << 40) | (((KIT_TSS_BASE >> 24) & 0xff) << 56)
    .quad 0
gdt_end:
    .p2align 3
    .word 0, 0, 0
gdt_ptr:
    .word gdt_end - gdt - 1
    .quad gdt
    .word 0, 0, 0
idt_ptr:
    .word 256 * 16 - 1
    .quad idt

    .p2align 4
idt:
    .set vec, 0
    .rept 256
    .set handler, KIT_ISR_BASE + vec * 16
    /* interrupt gate, DPL 0, present; vector 6 (#UD) reachable from ring 3 through the fault */
    .word handler & 0xffff
    .word SEL_KCODE
    .word 0x8e00
    .word (handler >> 16) & 0xffff
    .long 0
    .long 0
    .set vec, vec + 1
    .endr

    .globl ap_next_index
ap_next_index:
    .long 0
    .globl kit_user_saved_rsp
kit_user_saved_rsp:
    .quad 0

    .section .tss, "a"
    .long 0
    .quad trap_stack_top            /* RSP0: stack for traps from ring 3 */
    .fill 0x68 - 12, 1, 0

/* Identity map of the first 4 GiB with 2 MiB pages, user-accessible (tests run code in ring 3). */
    .section .pagetables, "a"
    .p2align 12
    .globl pml4
pml4:
    .quad pdpt + 0x7
    .fill 511, 8, 0
    .globl kit_pdpt
kit_pdpt:
pdpt:
    .quad pd0 + 0x7
    .quad pd0 + 0x1000 + 0x7
    .quad pd0 + 0x2000 + 0x7
    .quad pd0 + 0x3000 + 0x7
    .fill 508, 8, 0
pd0:
    .set addr, 0
    .rept 2048
    .quad addr | 0x87
    .set addr, addr + 0x200000
    .endr

    .section .stacks, "aw", @nobits
    .p2align 12
    .space STACK_SIZE
bsp_stack_top:
    .space STACK_SIZE
trap_stack_top:
    .space 4096
ap_stack_top:
    .globl ap_stacks
ap_stacks:
    .space STACK_SIZE * (MAX_CPUS + 1)
