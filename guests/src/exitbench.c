/* exitbench: `pio=N` port writes to an unclaimed port and `mmio=N` writes to an unmapped address
 * in the device hole, each a full exit to the VMM and back; a host-side bench times the run
 * against one with N=0 to get the cost of one exit. */
#include "kit.h"

int guest_main(struct hvm_start_info *si) {
    (void)si;
    u64 pio = 0, mmio = 0;
    kit_cmdline_u64("pio", &pio);
    kit_cmdline_u64("mmio", &mmio);
    for (u64 i = 0; i < pio; i++) outl(0x80, (u32)i);
    for (u64 i = 0; i < mmio; i++) mmio_write32(0xd0000000UL, (u32)i);
    kit_printf("exitbench: %lu pio %lu mmio\n", pio, mmio);
    return 0;
}
