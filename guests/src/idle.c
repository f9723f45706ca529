/* idle: prints that it is up, then waits for interrupts forever (for stop/signal/console tests).
 * Bytes typed on COM1 are echoed back as "echo: <byte>". With `powerbutton=1` on the command
 * line it acts like an OS with ACPI: the power button (Ferrovisor's GED, GSI 9, event register
 * at port 0x3c4 as the DSDT describes) makes it power off. */
#include "kit.h"

#define COM1 0x3f8
#define SERIAL_VECTOR 0x31
#define GED_VECTOR 0x32
#define GED_GSI 9
#define GED_EVENT_PORT 0x3c4
#define GED_POWER_BUTTON 1

int guest_trap(struct kit_frame *f) {
    if (f->vector == SERIAL_VECTOR) {
        while (inb(COM1 + 5) & 1) {               /* LSR: data ready */
            u8 c = inb(COM1);
            kit_printf("echo: %c\n", c);
        }
        lapic_eoi();
        return 1;
    }
    if (f->vector == GED_VECTOR) {
        u8 events = inb(GED_EVENT_PORT);          /* reading acknowledges */
        lapic_eoi();
        if (events & GED_POWER_BUTTON) {
            kit_puts("idle: power button pressed, powering off\n");
            kit_poweroff();
        }
        return 1;
    }
    return 0;
}

int guest_main(struct hvm_start_info *si) {
    (void)si;
    lapic_enable();
    ioapic_route(4, SERIAL_VECTOR, lapic_id());
    u64 button = 0;
    if (kit_cmdline_u64("powerbutton", &button) && button) ioapic_route(GED_GSI, GED_VECTOR, lapic_id());
    outb(COM1 + 4, 0x08);                      /* OUT2 */
    outb(COM1 + 1, 0x01);                      /* IER: received-data interrupt */
    kit_puts("idle: up\n");
    for (;;) sti_hlt();
}
