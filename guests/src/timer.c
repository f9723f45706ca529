/* timer: LAPIC timer interrupts (periodic, 1 ms) arrive and are counted; then an IOAPIC line
 * the VMM raises (COM1's IRQ 4, through an irqfd) is routed to a vector and arrives. */
#include "kit.h"

#define TIMER_VECTOR 0x30
#define SERIAL_VECTOR 0x31
#define COM1 0x3f8

static volatile u32 ticks, serial_irqs;

int guest_trap(struct kit_frame *f) {
    if (f->vector == TIMER_VECTOR) { ticks++; lapic_eoi(); return 1; }
    if (f->vector == SERIAL_VECTOR) {
        serial_irqs++;
        outb(COM1 + 1, 0);          /* IER off: one interrupt is enough */
        (void)inb(COM1 + 2);        /* read IIR: acknowledges THR-empty */
        lapic_eoi();
        return 1;
    }
    return 0;
}

int guest_main(struct hvm_start_info *si) {
    (void)si;
    lapic_enable();
    /* LAPIC timer: divide by 1, periodic, 1,000,000 bus cycles (KVM's APIC bus runs at 1 GHz). */
    mmio_write32(LAPIC_BASE + 0x3e0, 0xb);
    mmio_write32(LAPIC_BASE + 0x320, TIMER_VECTOR | (1 << 17));
    u64 t0 = rdtsc();
    mmio_write32(LAPIC_BASE + 0x380, 1000000);
    while (ticks < 10) sti_hlt();
    u64 cycles = rdtsc() - t0;
    mmio_write32(LAPIC_BASE + 0x320, 1 << 16);   /* mask the timer */
    cli();
    kit_printf("timer: 10 LAPIC ticks in %lu TSC cycles\n", cycles);

    ioapic_route(4, SERIAL_VECTOR, lapic_id());
    outb(COM1 + 4, 0x08);           /* MCR: OUT2 gates the UART interrupt on a PC */
    outb(COM1 + 1, 0x02);           /* IER: transmitter-empty interrupt */
    u64 w0 = rdtsc();
    while (!serial_irqs && rdtsc() - w0 < 4000000000ULL) sti_hlt();
    cli();
    kit_printf("timer: %u serial interrupts through IOAPIC pin 4\n", serial_irqs);
    return (ticks >= 10 && serial_irqs >= 1) ? 0 : 1;
}
