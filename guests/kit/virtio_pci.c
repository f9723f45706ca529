/* virtio-pci (modern) for test guests: finds virtio functions on PCI bus 0 through ECAM (its base
 * from the ACPI MCFG table) or, without MCFG, the 0xcf8/0xcfc ports; reads the virtio vendor
 * capabilities and the MSI-X capability; brings devices up with one MSI-X message per queue (and
 * one for configuration changes) aimed at vector 0x40 + slot on this CPU's local APIC.
 * With `pci_ports=1` on the command line ECAM is ignored and the ports are used. With
 * `pci_hostile=1`, every function first gets hostile configuration and
 * MSI-X traffic (BAR sizing with decoding on, out-of-range offsets, garbage table entries); the
 * device must still work afterwards. Ring 0: integer instructions only. */
#include "virtio.h"

#define PCI_DEVICES 32
#define VIRTIO_VENDOR 0x1af4
#define MSIX_VECTOR_BASE 0x40

/* Common configuration offsets (virtio 1.x 4.1.4.3). */
#define C_DFSEL 0x00
#define C_DF 0x04
#define C_GFSEL 0x08
#define C_GF 0x0c
#define C_MSIX 0x10
#define C_NUMQ 0x12
#define C_STATUS 0x14
#define C_QSEL 0x16
#define C_QSIZE 0x18
#define C_QMSIX 0x1a
#define C_QENABLE 0x1c
#define C_QNOFF 0x1e
#define C_QDESC 0x20
#define C_QDRIVER 0x28
#define C_QDEVICE 0x30

static u64 ecam;                        /* 0: use the 0xcf8 ports */
static u64 msix_table[PCI_DEVICES];     /* per device number */
static u32 msix_cap[PCI_DEVICES];
static u32 msix_vectors[PCI_DEVICES];
static u16 notify_off[PCI_DEVICES][4];

static inline void outl_(u16 port, u32 v) { __asm__ volatile("outl %0, %1" :: "a"(v), "Nd"(port)); }
static inline u32 inl_(u16 port) { u32 v; __asm__ volatile("inl %1, %0" : "=a"(v) : "Nd"(port)); return v; }
static inline u8 r8(u64 a) { return *(volatile u8 *)a; }
static inline u16 r16(u64 a) { return *(volatile u16 *)a; }
static inline void w8(u64 a, u8 v) { *(volatile u8 *)a = v; }
static inline void w16(u64 a, u16 v) { *(volatile u16 *)a = v; }

static u32 cf8_read32(u32 dev, u32 off) {
    outl_(0xcf8, 0x80000000u | (dev << 11) | (off & 0xfc));
    return inl_(0xcfc);
}

static u32 cfg_read32(u32 dev, u32 off) {
    if (ecam) return mmio_read32(ecam + (dev << 15) + off);
    return cf8_read32(dev, off);
}

static void cfg_write32(u32 dev, u32 off, u32 v) {
    if (ecam) { mmio_write32(ecam + (dev << 15) + off, v); return; }
    outl_(0xcf8, 0x80000000u | (dev << 11) | (off & 0xfc));
    outl_(0xcfc, v);
}

static u8 cfg_read8(u32 dev, u32 off) { return (u8)(cfg_read32(dev, off & ~3u) >> ((off & 3) * 8)); }

static void find_ecam(void) {
    u64 ports = 0;
    if (kit_cmdline_u64("pci_ports", &ports) && ports) return;
    const u8 *mcfg = kit_acpi_table("MCFG");
    if (!mcfg || *(const u32 *)(mcfg + 4) < 44 + 16) return;
    const u8 *e = mcfg + 44;                  /* first allocation: base, segment, start/end bus */
    u64 base;
    memcpy(&base, e, 8);
    if (*(const u16 *)(e + 8) == 0 && e[10] == 0) ecam = base;
}

/* BAR i's address (a 64-bit BAR spans i and i + 1). */
static u64 bar_address(u32 dev, u32 i) {
    u32 lo = cfg_read32(dev, 0x10 + 4 * i);
    u64 a = lo & ~0xfu;
    if ((lo & 6) == 4 && i < 5) a |= (u64)cfg_read32(dev, 0x14 + 4 * i) << 32;
    return a;
}

/* Sizes a 64-bit BAR the way firmware does, with decoding left on; returns its size. */
static u64 bar_size(u32 dev, u32 i) {
    u32 lo = cfg_read32(dev, 0x10 + 4 * i), hi = cfg_read32(dev, 0x14 + 4 * i);
    cfg_write32(dev, 0x10 + 4 * i, 0xffffffff);
    cfg_write32(dev, 0x14 + 4 * i, 0xffffffff);
    u64 mask = ((u64)cfg_read32(dev, 0x14 + 4 * i) << 32) | (cfg_read32(dev, 0x10 + 4 * i) & ~0xfu);
    cfg_write32(dev, 0x10 + 4 * i, lo);
    cfg_write32(dev, 0x14 + 4 * i, hi);
    return ~mask + 1;
}

static int hostile_config(u32 dev) {
    int bad = 0;
    u32 id = cfg_read32(dev, 0);
    u64 bar = bar_address(dev, 0);
    u64 size = bar_size(dev, 0);
    if (size != 0x8000 || bar_address(dev, 0) != bar) { kit_printf("pci-hostile: BAR sizing gave %lx, BAR now %lx\n", size, bar_address(dev, 0)); bad = 1; }
    /* Read-only and absent registers: vendor/device, unused BARs, ROM. */
    cfg_write32(dev, 0, 0xdeadbeef);
    cfg_write32(dev, 0x18, 0xffffffff);
    cfg_write32(dev, 0x30, 0xffffffff);
    if (cfg_read32(dev, 0) != id || cfg_read32(dev, 0x18) || cfg_read32(dev, 0x30)) {
        kit_puts("pci-hostile: a read-only register changed\n"); bad = 1;
    }
    if (ecam) {
        /* The extended space (ECAM only) has nothing in it. */
        cfg_write32(dev, 0x100, 0xffffffff);
        cfg_write32(dev, 0xffc, 0xffffffff);
        if (cfg_read32(dev, 0x100) || cfg_read32(dev, 0xffc)) { kit_puts("pci-hostile: extended space answered\n"); bad = 1; }
        /* Misaligned and absent-function accesses through ECAM. */
        mmio_write32(ecam + (dev << 15) + 2, 0xffffffff);
        if (mmio_read32(ecam + (dev << 15) + 2) != 0xffffffff) { kit_puts("pci-hostile: misaligned ECAM read answered\n"); bad = 1; }
        mmio_write32(ecam + (dev << 15) + (3 << 12), 0x12345678);
        if (mmio_read32(ecam + (dev << 15) + (3 << 12)) != 0xffffffff) { kit_puts("pci-hostile: function 3 answered\n"); bad = 1; }
        if (cf8_read32(dev, 0) != id) { kit_puts("pci-hostile: 0xcf8 and ECAM disagree\n"); bad = 1; }
    }
    /* 0xcf8 with bus 7, and with the enable bit clear. */
    outl_(0xcf8, 0x80070000u | (dev << 11));
    outl_(0xcfc, 0xffffffff);
    if (inl_(0xcfc) != 0xffffffff) { kit_puts("pci-hostile: bus 7 answered\n"); bad = 1; }
    outl_(0xcf8, dev << 11);
    if (inl_(0xcfc) != 0xffffffff) { kit_puts("pci-hostile: disabled 0xcf8 answered\n"); bad = 1; }
    kit_printf("pci-hostile: 00:%x.0 config space held (BAR size %lx)\n", dev, size);
    return bad;
}

/* Garbage MSI-X traffic: entries aimed outside the APIC window, unmasked, MSI-X enabled, writes
 * past the table and into the PBA, and absurd vector numbers in the common configuration. */
static int hostile_msix(u32 dev, struct vdev *d) {
    int bad = 0;
    u64 t = msix_table[dev];
    u32 cap = msix_cap[dev];
    for (u32 v = 0; v < msix_vectors[dev] + 4; v++) {
        mmio_write32(t + v * 16, 0x00001000 + v);
        mmio_write32(t + v * 16 + 4, 0xffffffff);
        mmio_write32(t + v * 16 + 8, 0xffffffff);
        mmio_write32(t + v * 16 + 12, 0);
    }
    mmio_write32(t + 0x2000, 0xffffffff);                /* the PBA is read-only */
    mmio_write32(bar_address(dev, 0) + 0x7ffc, 0xffffffff);  /* end of the BAR */
    cfg_write32(dev, cap, cfg_read32(dev, cap) | (1u << 31));
    w16(d->base + C_MSIX, 0x7fff);
    if (r16(d->base + C_MSIX) != 0xffff) { kit_puts("pci-hostile: bad config vector accepted\n"); bad = 1; }
    w16(d->base + C_QSEL, 999);
    w16(d->base + C_QSIZE, 3);
    w16(d->base + C_QMSIX, 5000);
    w16(d->base + C_QENABLE, 1);
    if (r16(d->base + C_QSIZE) != 0 || r16(d->base + C_QMSIX) != 0xffff) { kit_puts("pci-hostile: queue 999 exists\n"); bad = 1; }
    w8(d->base + 0x37, 0xff);
    w8(d->base + 0x800, 0xff);
    cfg_write32(dev, cap, cfg_read32(dev, cap) & ~(3u << 30));
    kit_printf("pci-hostile: 00:%x.0 MSI-X garbage absorbed\n", dev);
    return bad;
}

u32 virtio_pci_scan(struct vdev *devs, u32 max) {
    find_ecam();
    u64 hostile = 0;
    kit_cmdline_u64("pci_hostile", &hostile);
    kit_printf("virtio-pci: config through %s %lx\n", ecam ? "ECAM at" : "ports", ecam ? ecam : 0xcf8UL);
    u32 n = 0;
    for (u32 dev = 0; dev < PCI_DEVICES && n < max; dev++) {
        u32 id = cfg_read32(dev, 0);
        if ((id & 0xffff) != VIRTIO_VENDOR || (id >> 16) < 0x1040 || (id >> 16) > 0x107f) continue;
        int bad = hostile ? hostile_config(dev) : 0;
        /* Memory decoding and bus mastering on. */
        cfg_write32(dev, 0x04, (cfg_read32(dev, 0x04) & 0xffff) | 0x6);
        struct vdev *d = &devs[n];
        memset(d, 0, sizeof(*d));
        d->transport = VIRTIO_PCI;
        d->type = (id >> 16) - 0x1040;
        d->bdf = dev << 3;
        u32 ptr = cfg_read8(dev, 0x34);
        for (u32 guard = 0; ptr && guard < 48; guard++, ptr = cfg_read8(dev, ptr + 1)) {
            u8 cap_id = cfg_read8(dev, ptr);
            if (cap_id == 0x11) {
                u32 table = cfg_read32(dev, ptr + 4);
                msix_cap[dev] = ptr;
                msix_vectors[dev] = (cfg_read32(dev, ptr) >> 16 & 0x7ff) + 1;
                msix_table[dev] = bar_address(dev, table & 7) + (table & ~7u);
                continue;
            }
            if (cap_id != 0x09) continue;
            u8 type = cfg_read8(dev, ptr + 3);
            u64 addr = bar_address(dev, cfg_read8(dev, ptr + 4)) + cfg_read32(dev, ptr + 8);
            switch (type) {
            case 1: d->base = addr; break;
            case 2: d->notify = addr; d->notify_mul = cfg_read32(dev, ptr + 16); break;
            case 3: d->isr = addr; break;
            case 4: d->device_cfg = addr; break;
            }
        }
        if (!d->base || !d->notify || !d->isr || !msix_table[dev]) {
            kit_printf("virtio-pci: 00:%x.0 lacks a capability\n", dev);
            continue;
        }
        if (hostile) bad |= hostile_msix(dev, d);
        if (bad) { kit_puts("pci-hostile: FAILED\n"); continue; }
        kit_printf("virtio-pci: 00:%x.0 type %u, BAR %lx, %u MSI-X vectors, notify x%u\n",
                   dev, d->type, bar_address(dev, 0), msix_vectors[dev], d->notify_mul);
        n++;
    }
    return n;
}

static void msix_program(u32 dev, u32 v, u8 vector) {
    u64 e = msix_table[dev] + v * 16;
    mmio_write32(e + 12, 1);                              /* mask while changing it */
    mmio_write32(e, 0xfee00000u | (lapic_id() << 12));    /* physical destination: this CPU */
    mmio_write32(e + 4, 0);
    mmio_write32(e + 8, vector);                          /* fixed delivery, edge */
    mmio_write32(e + 12, 0);
}

int virtio_pci_init(struct vdev *d, u64 features, u32 nq) {
    u32 dev = d->bdf >> 3;
    u64 c = d->base;
    w8(c + C_STATUS, 0);
    for (u32 i = 0; r8(c + C_STATUS) && i < 1000; i++) cpu_relax();
    w8(c + C_STATUS, 1 | 2);
    mmio_write32(c + C_DFSEL, 1);
    u32 hi = mmio_read32(c + C_DF);
    if (!(hi & 1)) return -1;
    mmio_write32(c + C_DFSEL, 0);
    u64 offered = ((u64)hi << 32) | mmio_read32(c + C_DF);
    u64 want = (features & offered) | (1UL << 32);
    virtio_negotiated = want;
    mmio_write32(c + C_GFSEL, 0);
    mmio_write32(c + C_GF, (u32)want);
    mmio_write32(c + C_GFSEL, 1);
    mmio_write32(c + C_GF, (u32)(want >> 32));
    w8(c + C_STATUS, 1 | 2 | 8);
    if (!(r8(c + C_STATUS) & 8)) return -2;
    if (nq > 4 || nq + 1 > msix_vectors[dev] || nq > r16(c + C_NUMQ)) return -3;
    /* Vectors 0..nq-1 for the queues, nq for configuration changes; all to one IDT vector. */
    u8 vector = (u8)(MSIX_VECTOR_BASE + d->slot);
    for (u32 v = 0; v <= nq; v++) msix_program(dev, v, vector);
    u32 cap = msix_cap[dev];
    cfg_write32(dev, cap, (cfg_read32(dev, cap) & ~(1u << 30)) | (1u << 31));   /* enable, unmask */
    w16(c + C_MSIX, (u16)nq);
    if (r16(c + C_MSIX) != nq) return -5;
    for (u32 q = 0; q < nq; q++) {
        w16(c + C_QSEL, (u16)q);
        if (r16(c + C_QSIZE) < VQ_SIZE) return -3;
        struct vq *v = virtio_alloc_vq(d, q);
        if (!v) return -3;
        w16(c + C_QSIZE, VQ_SIZE);
        w16(c + C_QMSIX, (u16)q);
        if (r16(c + C_QMSIX) != q) return -5;
        mmio_write32(c + C_QDESC, (u32)(u64)v->desc);
        mmio_write32(c + C_QDESC + 4, (u32)((u64)v->desc >> 32));
        mmio_write32(c + C_QDRIVER, (u32)(u64)v->avail);
        mmio_write32(c + C_QDRIVER + 4, (u32)((u64)v->avail >> 32));
        mmio_write32(c + C_QDEVICE, (u32)(u64)v->used);
        mmio_write32(c + C_QDEVICE + 4, (u32)((u64)v->used >> 32));
        notify_off[dev][q] = r16(c + C_QNOFF);
        w16(c + C_QENABLE, 1);
    }
    w8(c + C_STATUS, 1 | 2 | 8 | 4);
    if (r8(c + C_STATUS) & 64) return -4;
    return 0;
}

void virtio_pci_notify(struct vdev *d, u32 q) {
    w16(d->notify + (u64)notify_off[d->bdf >> 3][q & 3] * d->notify_mul, (u16)q);
}

/* MSI-X messages need no acknowledgement at the device; the handler only sends the EOI. */
void virtio_pci_irq_ack(struct vdev *d) { (void)d; }
