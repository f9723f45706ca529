/* idle: prints that it is up, then waits for interrupts forever (for stop/signal/console tests).
 * Bytes typed on COM1 are echoed back as "echo: <byte>". */
#include "kit.h"

#define COM1 0x3f8
#define SERIAL_VECTOR 0x31

int guest_trap(struct kit_frame *f) {
    if (f->vector != SERIAL_VECTOR) return 0;
    while (inb(COM1 + 5) & 1) {               /* LSR: data ready */
        u8 c = inb(COM1);
        kit_printf("echo: %c\n", c);
    }
    lapic_eoi();
    return 1;
}

int guest_main(struct hvm_start_info *si) {
    (void)si;
    lapic_enable();
    ioapic_route(4, SERIAL_VECTOR, lapic_id());
    outb(COM1 + 4, 0x08);                      /* OUT2 */
    outb(COM1 + 1, 0x01);                      /* IER: received-data interrupt */
    kit_puts("idle: up\n");
    for (;;) sti_hlt();
}
