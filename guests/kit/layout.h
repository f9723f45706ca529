/* Fixed addresses shared by the linker script, the assembly and the C kit.
 * ISR stubs and the TSS sit at fixed addresses so the IDT and the TSS descriptor can be
 * static data: a test guest spends no emulated ring-0 instructions building them. */
#define KIT_ISR_BASE   0x200000   /* 256 interrupt stubs, 16 bytes each */
#define KIT_TSS_BASE   0x201000   /* the 64-bit TSS (0x68 bytes) */
#define KIT_AP_TRAMP   0x8000     /* real-mode AP entry; SIPI vector 0x08 */

#define SEL_KCODE   0x08
#define SEL_KDATA   0x10
#define SEL_CODE32  0x18
#define SEL_UDATA   0x23
#define SEL_UCODE   0x2b
#define SEL_TSS     0x30
