/* The test-guest virtio driver; see virtio.h. */
#include "virtio.h"

#define MAX_DEVICES 16
static struct vring_desc descs[MAX_DEVICES][4][VQ_SIZE] __attribute__((aligned(4096)));
static struct vring_avail avails[MAX_DEVICES][4] __attribute__((aligned(4096)));
static struct vring_used useds[MAX_DEVICES][4] __attribute__((aligned(4096)));

struct vq *virtio_alloc_vq(struct vdev *d, u32 q) {
    if (d->slot >= MAX_DEVICES || q >= 4) return 0;
    struct vq *v = &d->vq[q];
    v->desc = descs[d->slot][q];
    v->avail = &avails[d->slot][q];
    v->used = &useds[d->slot][q];
    memset(v->desc, 0, sizeof(descs[0][0]));
    memset(v->avail, 0, sizeof(*v->avail));
    memset((void *)v->used, 0, sizeof(*v->used));
    v->size = VQ_SIZE;
    v->last_used = 0;
    v->qidx = (u16)q;
    return v;
}

u32 virtio_read32(struct vdev *d, u64 off) { return mmio_read32(d->base + off); }
void virtio_write32(struct vdev *d, u64 off, u32 v) { mmio_write32(d->base + off, v); }
u8 virtio_scratch[65536] __attribute__((aligned(4096)));
u64 virtio_negotiated;

static int virtio_mmio_init(struct vdev *d, u64 features, u32 nq);

static u64 config_base(struct vdev *d) { return d->transport == VIRTIO_PCI ? d->device_cfg : d->base + 0x100; }
u8 virtio_config8(struct vdev *d, u64 off) { return *(volatile u8 *)(config_base(d) + off); }
u32 virtio_config32(struct vdev *d, u64 off) { return *(volatile u32 *)(config_base(d) + off); }

int virtio_init(struct vdev *d, u64 features, u32 nq) {
    if (d->transport == VIRTIO_PCI) return virtio_pci_init ? virtio_pci_init(d, features, nq) : -100;
    return virtio_mmio_init(d, features, nq);
}

int virtio_wait_irq(struct vdev *d) {
    u32 irqs = d->irqs;
    for (u64 t = rdtsc(); d->irqs == irqs && rdtsc() - t < 4000000000UL;) { sti(); cpu_relax(); }
    cli();
    return d->irqs != irqs;
}

u32 virtio_mmio_scan(struct vdev *devs, u32 max) {
    u32 n = 0;
    for (u32 i = 0; i < VIRTIO_MMIO_MAX && n < max; i++) {
        u64 base = VIRTIO_MMIO_BASE + i * VIRTIO_MMIO_STRIDE;
        if (mmio_read32(base) != 0x74726976 || mmio_read32(base + 4) != 2) continue;
        u32 type = mmio_read32(base + 8);
        if (!type) continue;
        memset(&devs[n], 0, sizeof(devs[n]));
        devs[n].transport = VIRTIO_MMIO;
        devs[n].base = base;
        devs[n].type = type;
        devs[n].slot = i;
        devs[n].gsi = VIRTIO_MMIO_FIRST_GSI + i;
        n++;
    }
    return n;
}

static int virtio_mmio_init(struct vdev *d, u64 features, u32 nq) {
    virtio_write32(d, 0x70, 0);                       /* reset */
    virtio_write32(d, 0x70, 1 | 2);                   /* ACKNOWLEDGE | DRIVER */
    virtio_write32(d, 0x14, 1);
    u32 hi = virtio_read32(d, 0x10);
    if (!(hi & 1)) return -1;                         /* no VERSION_1 */
    virtio_write32(d, 0x14, 0);
    u32 lo = virtio_read32(d, 0x10);
    u64 offered = ((u64)hi << 32) | lo;
    u64 want = (features & offered) | (1UL << 32);
    virtio_negotiated = want;
    virtio_write32(d, 0x24, 0);
    virtio_write32(d, 0x20, (u32)want);
    virtio_write32(d, 0x24, 1);
    virtio_write32(d, 0x20, (u32)(want >> 32));
    virtio_write32(d, 0x70, 1 | 2 | 8);               /* FEATURES_OK */
    if (!(virtio_read32(d, 0x70) & 8)) return -2;
    for (u32 q = 0; q < nq && q < 4; q++) {
        virtio_write32(d, 0x30, q);
        u32 max = virtio_read32(d, 0x34);
        if (max < VQ_SIZE) return -3;
        struct vq *v = virtio_alloc_vq(d, q);
        if (!v) return -3;
        virtio_write32(d, 0x38, VQ_SIZE);
        virtio_write32(d, 0x80, (u32)(u64)v->desc);
        virtio_write32(d, 0x84, (u32)((u64)v->desc >> 32));
        virtio_write32(d, 0x90, (u32)(u64)v->avail);
        virtio_write32(d, 0x94, (u32)((u64)v->avail >> 32));
        virtio_write32(d, 0xa0, (u32)(u64)v->used);
        virtio_write32(d, 0xa4, (u32)((u64)v->used >> 32));
        virtio_write32(d, 0x44, 1);
    }
    virtio_write32(d, 0x70, 1 | 2 | 8 | 4);           /* DRIVER_OK */
    if (virtio_read32(d, 0x70) & 64) return -4;       /* NEEDS_RESET */
    return 0;
}

void virtio_submit(struct vdev *d, u32 q, u32 n, const u64 *addr, const u32 *len, const int *device_writes) {
    struct vq *v = &d->vq[q];
    for (u32 i = 0; i < n; i++) {
        v->desc[i].addr = addr[i];
        v->desc[i].len = len[i];
        v->desc[i].flags = (u16)((device_writes[i] ? VRING_DESC_F_WRITE : 0) | (i + 1 < n ? VRING_DESC_F_NEXT : 0));
        v->desc[i].next = (u16)(i + 1);
    }
    v->avail->ring[v->avail->idx % v->size] = 0;
    __asm__ volatile("" ::: "memory");
    v->avail->idx++;
    __asm__ volatile("mfence" ::: "memory");
    if (d->transport == VIRTIO_PCI) virtio_pci_notify(d, q);
    else virtio_write32(d, 0x50, q);
}

i64 virtio_wait_used(struct vdev *d, u32 q) {
    struct vq *v = &d->vq[q];
    u64 start = rdtsc();
    while (v->used->idx == v->last_used) {
        if (rdtsc() - start > 20000000000UL) return -1;   /* ~5-10 s */
        sti();
        cpu_relax();
    }
    /* Give the interrupt that goes with this completion a moment to arrive. */
    u32 irqs = d->irqs;
    for (u64 t = rdtsc(); d->irqs == irqs && rdtsc() - t < 400000000UL;) { sti(); cpu_relax(); }
    cli();
    u32 len = v->used->ring[v->last_used % v->size].len;
    v->last_used++;
    return len;
}

void virtio_enable_irq(struct vdev *d, u8 vector) {
    /* virtio-pci interrupts are MSI-X messages programmed by virtio_pci_init (vector = 0x40 +
     * the device index); virtio-mmio ones go through the IOAPIC. */
    if (d->transport == VIRTIO_MMIO) ioapic_route(d->gsi, vector, lapic_id());
}

int virtio_handle_irq(struct vdev *d, u8 vector, u64 trap_vector) {
    if (trap_vector != vector) return 0;
    if (d->transport == VIRTIO_PCI) {
        virtio_pci_irq_ack(d);
    } else {
        u32 status = virtio_read32(d, 0x60);
        virtio_write32(d, 0x64, status);              /* InterruptACK */
    }
    d->irqs++;
    lapic_eoi();
    return 1;
}
