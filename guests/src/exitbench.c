/* exitbench: `pio=N` port writes to an unclaimed port and `mmio=N` writes to an unmapped address
 * in the device hole, each a full exit to the VMM and back; a host-side bench times the run
 * against one with N=0 to get the cost of one exit. */
#include "kit.h"

int guest_main(struct hvm_start_info *si) {
    (void)si;
    u64 pio = 0, mmio = 0;
    kit_cmdline_u64("pio", &pio);
    kit_cmdline_u64("mmio", &mmio);
    /* The same three-instruction loops as the raw-ioctl floor (benches/src/floor.rs),
     * so both sides pay the same emulated guest instructions per exit. */
    if (pio) __asm__ volatile("1: outb %%al, $0xe8; dec %%rcx; jnz 1b" : "+c"(pio) : "a"(0) : "memory");
    if (mmio) __asm__ volatile("1: movl %%ecx, (%%rbx); dec %%rcx; jnz 1b" : "+c"(mmio) : "b"(0xd0000000UL) : "memory");
    /* The loops counted their registers down; report the requested counts. */
    kit_cmdline_u64("pio", &pio);
    kit_cmdline_u64("mmio", &mmio);
    kit_printf("exitbench: %lu pio %lu mmio\n", pio, mmio);
    return 0;
}
