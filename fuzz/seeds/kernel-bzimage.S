/* The smallest bzImage the VMM boots: the real-mode setup (one sector after the boot sector)
 * with the boot protocol 2.15 header, then the protected-mode kernel, whose 64-bit entry point
 * (0x200 into it) prints "ok" on COM1 and halts. kernel-seeds.sh builds the seed. */
    .code16
    .org 0x1f1
    .byte 1                 /* setup_sects */
    .word 0                 /* root_flags */
    .long 0x40              /* syssize: the protected-mode kernel in 16-byte units */
    .word 0, 0, 0           /* ram_size, vid_mode, root_dev */
    .word 0xaa55            /* boot_flag */
    .byte 0xeb, 0x66        /* jump */
    .ascii "HdrS"
    .word 0x020f            /* version */
    .long 0                 /* realmode_swtch */
    .word 0x1000, 0         /* start_sys_seg, kernel_version */
    .byte 0, 1              /* type_of_loader, loadflags: LOADED_HIGH */
    .word 0x8000            /* setup_move_size */
    .long 0x100000          /* code32_start */
    .long 0, 0, 0           /* ramdisk_image, ramdisk_size, bootsect_kludge */
    .word 0                 /* heap_end_ptr */
    .byte 0, 0              /* ext_loader_ver, ext_loader_type */
    .long 0                 /* cmd_line_ptr */
    .long 0x7fffffff        /* initrd_addr_max */
    .long 0x200000          /* kernel_alignment */
    .byte 0, 0              /* relocatable_kernel, min_alignment */
    .word 0x1               /* xloadflags: XLF_KERNEL_64 */
    .long 2047              /* cmdline_size */
    .long 0                 /* hardware_subarch */
    .quad 0                 /* hardware_subarch_data */
    .long 0, 0              /* payload_offset, payload_length */
    .quad 0                 /* setup_data */
    .quad 0x1000000         /* pref_address */
    .long 0x40000           /* init_size */
    .long 0, 0              /* handover_offset, kernel_info_offset */
    .org 0x400              /* the protected-mode kernel */
    .code32
1:  hlt
    jmp 1b
    .org 0x600              /* startup_64 */
    .code64
    mov $0x3f8, %dx
    mov $0x6f, %al
    out %al, %dx
    mov $0x6b, %al
    out %al, %dx
2:  hlt
    jmp 2b
    .org 0x800
