/* soak: the guest of scripts/soak.py. On the first virtio-blk disk it keeps a ring of records in
 * sectors 1..RING: record k sits in sector 1 + k % RING and holds the magic "FSOAKREC", k, k
 * times a constant, and k's low byte in the rest of the sector. At boot it reads the ring and goes on
 * from the highest valid k it finds (so a VM killed and started again continues its sequence);
 * then forever: write record k, FLUSH, and once the flush has completed print
 * "soak: flushed <k>" (every 16th k). A printed k was acknowledged as durable: whatever kills
 * the VMM or ferrod afterwards, the disk must hold k or a later record in k's sector. Between
 * records it halts on a 20 ms LAPIC timer: on kvm-pvm every timer interrupt costs host CPU, and
 * eight of these must leave the host's CPUs mostly to other work. */
#include "kit.h"
#include "virtio.h"

#define IRQ_VECTOR 0x40
#define TIMER_VECTOR 0x30
#define RING 256
#define MAGIC 0x4345524b414f5346UL   /* "FSOAKREC" little-endian, as a u64 */
#define MULT 0x9e3779b97f4a7c15UL
#define BLK_F_FLUSH (1UL << 9)
#define T_IN 0
#define T_OUT 1
#define T_FLUSH 4

static struct vdev dev;
static volatile u32 ticks;
static u64 *sector = (u64 *)(virtio_scratch + 4096);

int guest_trap(struct kit_frame *f) {
    if (f->vector == TIMER_VECTOR) { ticks++; lapic_eoi(); return 1; }
    return virtio_handle_irq(&dev, IRQ_VECTOR, f->vector);
}

static void pause_tick(void) {
    u32 t = ticks;
    while (ticks == t) sti_hlt();
    cli();
}

int guest_main(struct hvm_start_info *si) {
    (void)si;
    lapic_enable();
    u32 n = virtio_mmio_scan(&dev, 1);
    if (!n && virtio_pci_scan) n = virtio_pci_scan(&dev, 1);
    if (!n || dev.type != 2) { kit_puts("soak: FAILED: no virtio-blk disk\n"); return 1; }
    virtio_enable_irq(&dev, IRQ_VECTOR);
    int rc = virtio_init(&dev, BLK_F_FLUSH, 1);
    if (rc || !(virtio_negotiated & BLK_F_FLUSH)) { kit_printf("soak: FAILED: init step %d, flush %d\n", rc, (virtio_negotiated & BLK_F_FLUSH) != 0); return 1; }

    u64 next = 0;
    for (u64 s = 1; s <= RING; s++) {
        if (virtio_blk_request(&dev, T_IN, s, sector, 512, 1) != 0) { kit_printf("soak: FAILED: read sector %lu\n", s); return 1; }
        if (sector[0] == MAGIC && sector[2] == sector[1] * MULT && sector[1] % RING == s - 1 && sector[1] + 1 > next) next = sector[1] + 1;
    }
    kit_printf("soak: up, continuing at %lu\n", next);

    /* LAPIC timer: divide by 1, periodic, 20,000,000 bus cycles (KVM's APIC bus runs at 1 GHz). */
    mmio_write32(LAPIC_BASE + 0x3e0, 0xb);
    mmio_write32(LAPIC_BASE + 0x320, TIMER_VECTOR | (1 << 17));
    mmio_write32(LAPIC_BASE + 0x380, 20000000);
    for (u64 k = next;; k++) {
        sector[0] = MAGIC;
        sector[1] = k;
        sector[2] = k * MULT;
        memset((u8 *)sector + 24, (int)(k & 0xff), 512 - 24);
        int w = virtio_blk_request(&dev, T_OUT, 1 + k % RING, sector, 512, 0);
        int fl = virtio_blk_request(&dev, T_FLUSH, 0, 0, 0, 0);
        if (w != 0 || fl != 0) { kit_printf("soak: FAILED: record %lu: write status %d, flush status %d\n", k, w, fl); return 1; }
        if (k % 16 == 0) kit_printf("soak: flushed %lu\n", k);
        pause_tick();
    }
}
