/* virtio: finds every virtio device on virtio-mmio and virtio-pci, brings each up with the kit's
 * driver and runs its test (kit/virtio_<device>.c), which moves real data. Prints one line per
 * check; exit 0 when every device passed. With `virtio.hold=1` it stays up after the verdict
 * (interrupts on, halted) so the host decides how the VM ends. */
#include "kit.h"
#include "virtio.h"

#define IRQ_VECTOR_BASE 0x40
#define MAX_DEVS 16

static struct vdev devs[MAX_DEVS];
static u32 ndevs;

int guest_trap(struct kit_frame *f) {
    for (u32 i = 0; i < ndevs; i++)
        if (virtio_handle_irq(&devs[i], (u8)(IRQ_VECTOR_BASE + i), f->vector)) return 1;
    return 0;
}

static int (*test_for(u32 type))(struct vdev *) {
    switch (type) {
    case 1: return virtio_test_net;
    case 2: return virtio_test_blk;
    case 3: return virtio_test_console;
    case 4: return virtio_test_rng;
    case 5: return virtio_test_balloon;
    case 19: return virtio_test_vsock;
    default: return 0;
    }
}

int guest_main(struct hvm_start_info *si) {
    (void)si;
    lapic_enable();
    ndevs = virtio_mmio_scan(devs, MAX_DEVS);
    if (virtio_pci_scan) ndevs += virtio_pci_scan(devs + ndevs, MAX_DEVS - ndevs);
    kit_printf("virtio: %u devices\n", ndevs);
    int failed = ndevs == 0;
    for (u32 i = 0; i < ndevs; i++) {
        struct vdev *d = &devs[i];
        d->slot = i;
        kit_printf("virtio: device %u type %u on %s at %lx\n", i, d->type, d->transport == VIRTIO_PCI ? "pci" : "mmio", d->base);
        virtio_enable_irq(d, (u8)(IRQ_VECTOR_BASE + i));
        int (*test)(struct vdev *) = test_for(d->type);
        if (!test) { kit_printf("virtio: no test for type %u\n", d->type); failed = 1; continue; }
        failed |= test(d);
    }
    kit_puts(failed ? "virtio: FAILED\n" : "virtio: all devices passed\n");
    u64 hold = 0;
    if (kit_cmdline_u64("virtio.hold", &hold) && hold) for (;;) sti_hlt();
    return failed;
}
