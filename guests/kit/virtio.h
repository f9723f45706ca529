/* A minimal virtio 1.x driver for test guests: split virtqueues in static memory, the
 * virtio-mmio transport (devices found by scanning Ferrovisor's MMIO window), polled
 * completion with the interrupt counted on the side. Ring 0, integer instructions only. */
#ifndef KIT_VIRTIO_H
#define KIT_VIRTIO_H
#include "kit.h"

#define VIRTIO_MMIO_BASE 0xd0000000UL
#define VIRTIO_MMIO_STRIDE 0x1000UL
#define VIRTIO_MMIO_MAX 8
#define VIRTIO_MMIO_FIRST_GSI 16
#define VQ_SIZE 16

#define VRING_DESC_F_NEXT 1
#define VRING_DESC_F_WRITE 2

struct vring_desc { u64 addr; u32 len; u16 flags; u16 next; };
struct vring_avail { u16 flags; u16 idx; u16 ring[VQ_SIZE]; u16 used_event; };
struct vring_used_elem { u32 id; u32 len; };
struct vring_used { u16 flags; u16 idx; struct vring_used_elem ring[VQ_SIZE]; u16 avail_event; };

struct vq {
    struct vring_desc *desc;
    struct vring_avail *avail;
    volatile struct vring_used *used;
    u16 size, last_used, qidx;
};

enum { VIRTIO_MMIO = 0, VIRTIO_PCI = 1 };

struct vdev {
    int transport;     /* VIRTIO_MMIO or VIRTIO_PCI */
    u64 base;          /* virtio-mmio: register window; virtio-pci: common config (BAR + offset) */
    u64 notify;        /* virtio-pci: notify area, notify_mul: its multiplier */
    u32 notify_mul;
    u64 isr;           /* virtio-pci: ISR status */
    u64 device_cfg;    /* virtio-pci: device-specific config */
    u32 bdf;           /* virtio-pci: bus/device/function */
    u32 type;          /* virtio device id */
    u32 gsi;
    u32 slot;
    volatile u32 irqs; /* interrupts seen (counted by the guest's handler) */
    struct vq vq[4];
};

/* Finds virtio-mmio devices; fills up to max entries; returns how many. */
u32 virtio_mmio_scan(struct vdev *devs, u32 max);
/* Resets, negotiates VERSION_1 (plus `features`), sets up `nq` queues, DRIVER_OK, on either
 * transport. Returns 0, or a negative step number where it failed. */
int virtio_init(struct vdev *d, u64 features, u32 nq);
/* Features the driver and device agreed on in the last virtio_init. */
extern u64 virtio_negotiated;

/* virtio-pci (kit/virtio_pci.c, when present): scan bus 0, init, notify, config, irq ack. */
u32 virtio_pci_scan(struct vdev *devs, u32 max) __attribute__((weak));
int virtio_pci_init(struct vdev *d, u64 features, u32 nq) __attribute__((weak));
void virtio_pci_notify(struct vdev *d, u32 q) __attribute__((weak));
void virtio_pci_irq_ack(struct vdev *d) __attribute__((weak));

/* Per-device tests (kit/virtio_<device>.c): return 0 on pass, print one line per check.
 * A test that is not linked in is a weak null symbol. */
int virtio_test_net(struct vdev *d) __attribute__((weak));
int virtio_test_blk(struct vdev *d) __attribute__((weak));
/* One virtio-blk request on queue 0 (type, sector, data of len bytes that the device writes for
 * reads); the status byte, or -1 when the device did not answer. */
int virtio_blk_request(struct vdev *d, u32 type, u64 sector, void *data, u32 len, int device_writes) __attribute__((weak));
int virtio_test_console(struct vdev *d) __attribute__((weak));
int virtio_test_rng(struct vdev *d) __attribute__((weak));
int virtio_test_balloon(struct vdev *d) __attribute__((weak));
int virtio_test_vsock(struct vdev *d) __attribute__((weak));
/* A page-aligned scratch buffer tests may use (64 KiB). */
extern u8 virtio_scratch[65536];
/* Posts a chain of buffers (addresses, lengths, write flags) on queue q and kicks it. */
void virtio_submit(struct vdev *d, u32 q, u32 n, const u64 *addr, const u32 *len, const int *device_writes);
/* Waits (bounded) for the next used element of queue q; returns its length or -1 on timeout. */
i64 virtio_wait_used(struct vdev *d, u32 q);
/* Routes the device's GSI to `vector` and counts interrupts in d->irqs (call from guest_trap). */
void virtio_enable_irq(struct vdev *d, u8 vector);
int virtio_handle_irq(struct vdev *d, u8 vector, u64 trap_vector);
/* Assigns (and clears) the static rings of queue q of device d (d->slot < 16, q < 4). */
struct vq *virtio_alloc_vq(struct vdev *d, u32 q);
u32 virtio_read32(struct vdev *d, u64 off);
void virtio_write32(struct vdev *d, u64 off, u32 v);
u8 virtio_config8(struct vdev *d, u64 off);
u32 virtio_config32(struct vdev *d, u64 off);
/* Bounded wait with interrupts on for the device's next interrupt; 1 if one came. */
int virtio_wait_irq(struct vdev *d);
#endif
