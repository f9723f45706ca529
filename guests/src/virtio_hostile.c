/* virtio_hostile: a driver that breaks the rules on purpose. Needs a virtio-blk disk and a
 * virtio-rng (virtio-mmio). Each attack, selected with `hostile.<name>=1` (or all with
 * `hostile.all=1`), must end with the device answering the request with an error status or a
 * zero length, or setting NEEDS_RESET; the guest then resets the device and checks a good
 * request still works. At the end the rng (another device) must still work too.
 *   oob       buffers outside guest memory and on MMIO registers
 *   loop      a descriptor chain whose `next` points back
 *   len       zero-length header and status, a 4 GiB - 1 data buffer
 *   dir       read-only buffers where the device must write
 *   indirect  indirect tables too large, misaligned, nested, or longer than the device accepts
 *   head      an available-ring head outside the descriptor table
 *   avail     an available index more than a queue size ahead
 *   qsize     queue sizes that are not powers of two, zero, or above the maximum
 *   ring      a descriptor table outside guest memory
 *   early     a notification before DRIVER_OK
 *   rng       rng buffers outside memory and read-only
 * Prints one line per check; exits 0 when every check passed, or with `hostile.linger=1` stays
 * up (halted) after the verdict so the test can question the VMM. */
#include "kit.h"
#include "virtio.h"

#define IRQ_VECTOR_BASE 0x40
#define F_INDIRECT (1UL << 28)
#define D_NEXT 1
#define D_WRITE 2
#define D_INDIRECT 4
#define NEEDS_RESET 64
#define OUTSIDE 0x4000000000UL          /* 256 GiB: far past the guest's RAM */
#define T_IN 0

static struct vdev devs[4];
static u32 ndevs;
static struct vdev *blk, *rng;
static int failed;

struct blk_hdr { u32 type; u32 reserved; u64 sector; };
static struct blk_hdr *hdr = (struct blk_hdr *)(virtio_scratch + 0);
static volatile u8 *status = virtio_scratch + 64;
static u8 *data = virtio_scratch + 4096;
static struct vring_desc *table = (struct vring_desc *)(virtio_scratch + 8192);  /* indirect */

int guest_trap(struct kit_frame *f) {
    for (u32 i = 0; i < ndevs; i++)
        if (virtio_handle_irq(&devs[i], (u8)(IRQ_VECTOR_BASE + i), f->vector)) return 1;
    return 0;
}

static int enabled(const char *name) {
    char key[32] = "hostile.";
    u64 v = 0, n = kit_strlen(name);
    memcpy(key + 8, name, n + 1);
    return (kit_cmdline_u64("hostile.all", &v) && v) || (kit_cmdline_u64(key, &v) && v);
}

static void check(const char *what, int ok) {
    kit_printf("hostile: %s: %s\n", what, ok ? "ok" : "FAILED");
    failed |= !ok;
}

static void set_desc(struct vdev *d, u32 q, u16 i, u64 addr, u32 len, u16 flags, u16 next) {
    struct vring_desc *x = &d->vq[q].desc[i];
    x->addr = addr; x->len = len; x->flags = flags; x->next = next;
}

/* Makes `head` available on queue q (possibly moving the index by `extra` more) and kicks. */
static void post(struct vdev *d, u32 q, u16 head, u16 extra) {
    struct vq *v = &d->vq[q];
    v->avail->ring[v->avail->idx % v->size] = head;
    __asm__ volatile("" ::: "memory");
    v->avail->idx = (u16)(v->avail->idx + 1 + extra);
    __asm__ volatile("mfence" ::: "memory");
    virtio_write32(d, 0x50, q);
}

enum { NOTHING, ANSWERED, RESET_NEEDED };
static u32 used_len;

/* Waits (bounded) for the next used element of queue q, or for NEEDS_RESET. */
static int outcome(struct vdev *d, u32 q) {
    struct vq *v = &d->vq[q];
    for (u64 t = rdtsc(); rdtsc() - t < 6000000000UL;) {
        if (v->used->idx != v->last_used) {
            used_len = v->used->ring[v->last_used % v->size].len;
            v->last_used++;
            return ANSWERED;
        }
        if (virtio_read32(d, 0x70) & NEEDS_RESET) return RESET_NEEDED;
        cpu_relax();
    }
    return NOTHING;
}

static void blk_header(u32 type, u64 sector) { hdr->type = type; hdr->reserved = 0; hdr->sector = sector; *status = 0xee; }

/* The driver-visible result of a hostile request: an error status, a zero length, or a reset.
 * The device puts the status in the last device-writable byte of the chain; for chains whose
 * status descriptor is not the last writable one, `at` says where that byte is. */
static int refused_at(struct vdev *d, u32 q, const char *what, volatile u8 *at) {
    int r = outcome(d, q);
    u8 st = *at;
    kit_printf("hostile: %s: %s, used length %u, status byte %u\n", what,
               r == ANSWERED ? "answered" : r == RESET_NEEDED ? "needs reset" : "NO ANSWER", used_len, st);
    return r == RESET_NEEDED || (r == ANSWERED && (used_len == 0 || st == 1 || st == 2));
}

static int refused(struct vdev *d, u32 q, const char *what) { return refused_at(d, q, what, status); }

/* Makes descriptor 0 (addr, len, flags, next) of blk's queue available and judges the answer. */
static int head_refused(u64 addr, u32 len, u16 flags, u16 next, const char *what) {
    set_desc(blk, 0, 0, addr, len, flags, next);
    post(blk, 0, 0, 0);
    return refused(blk, 0, what);
}

/* A read request: header at h (len hl), data at a (len al, flags af), status at s (len sl, flags sf). */
static void blk_read3(u64 h, u32 hl, u64 a, u32 al, u16 af, u64 s, u32 sl, u16 sf) {
    blk_header(T_IN, 0);
    set_desc(blk, 0, 0, h, hl, D_NEXT, 1);
    set_desc(blk, 0, 1, a, al, (u16)(af | D_NEXT), 2);
    set_desc(blk, 0, 2, s, sl, sf, 0);
    post(blk, 0, 0, 0);
}

/* Resets and re-initialises blk, then reads sector 0 the proper way. */
static int blk_recovers(u64 features) {
    if (virtio_init(blk, features, 1)) return 0;
    blk_read3((u64)hdr, 16, (u64)data, 512, D_WRITE, (u64)status, 1, D_WRITE);
    return outcome(blk, 0) == ANSWERED && used_len == 513 && *status == 0;
}

static void attack(const char *name, int ok, u64 features) {
    check(name, ok);
    check("  device works again after a reset", blk_recovers(features));
}

static void oob(void) {
    blk_recovers(0);
    blk_read3((u64)hdr, 16, OUTSIDE, 512, D_WRITE, (u64)status, 1, D_WRITE);
    int a = refused(blk, 0, "oob: data buffer outside RAM");
    blk_read3((u64)hdr, 16, VIRTIO_MMIO_BASE, 512, D_WRITE, (u64)status, 1, D_WRITE);
    int b = refused(blk, 0, "oob: data buffer on the device's own registers");
    blk_read3(OUTSIDE, 16, (u64)data, 512, D_WRITE, (u64)status, 1, D_WRITE);
    int c = refused(blk, 0, "oob: header outside RAM");
    blk_read3((u64)hdr, 16, (u64)data, 512, D_WRITE, OUTSIDE, 1, D_WRITE);
    int e = refused(blk, 0, "oob: status byte outside RAM") && used_len == 0;
    blk_read3((u64)hdr, 16, (u64)data, 512, D_WRITE, 0xfffffffffffffff0UL, 32, D_WRITE);
    int f = refused(blk, 0, "oob: buffer wrapping the address space");
    attack("oob", a && b && c && e && f, 0);
}

static void loop(void) {
    blk_recovers(0);
    blk_header(T_IN, 0);
    set_desc(blk, 0, 0, (u64)hdr, 16, D_NEXT, 1);
    set_desc(blk, 0, 1, (u64)status, 1, D_NEXT | D_WRITE, 0);
    post(blk, 0, 0, 0);
    int a = refused(blk, 0, "loop: 0 -> 1 -> 0");
    int b = head_refused((u64)hdr, 16, D_NEXT, 0, "loop: 0 -> 0");
    int c = head_refused((u64)hdr, 16, D_NEXT, 300, "loop: next past the table");
    attack("loop", a && b && c, 0);
}

static void len(void) {
    blk_recovers(0);
    blk_read3((u64)hdr, 0, (u64)data, 512, D_WRITE, (u64)status, 1, D_WRITE);
    int a = refused(blk, 0, "len: zero-length header");
    blk_read3((u64)hdr, 16, (u64)data, 0xffffffffU, D_WRITE, (u64)status, 1, D_WRITE);
    int b = refused(blk, 0, "len: 4 GiB - 1 data buffer");
    blk_read3((u64)hdr, 16, (u64)data, 512, D_WRITE, (u64)status, 0, D_WRITE);
    int c = refused(blk, 0, "len: zero-length status") && used_len == 0;
    blk_read3((u64)hdr, 16, (u64)data, 0xffffffffU, 0, (u64)status, 1, D_WRITE);
    int e = refused(blk, 0, "len: 4 GiB - 1 buffer the device reads");
    attack("len", a && b && c && e, 0);
}

static void dir(void) {
    blk_recovers(0);
    memset(data, 0xaa, 512);
    blk_read3((u64)hdr, 16, (u64)data, 512, 0, (u64)status, 1, D_WRITE);
    int a = refused(blk, 0, "dir: read into a read-only buffer") && data[0] == 0xaa && data[511] == 0xaa;
    blk_read3((u64)hdr, 16, (u64)data, 512, D_WRITE, (u64)status, 1, 0);
    /* The status descriptor is read-only: the error goes to the last writable byte, data[511]. */
    int b = refused_at(blk, 0, "dir: read-only status byte", data + 511) && *status == 0xee;
    attack("dir", a && b, 0);
}

static void indirect(void) {
    if (blk_recovers(F_INDIRECT) == 0 || !(virtio_negotiated & F_INDIRECT)) { check("indirect: negotiated", 0); return; }
    blk_header(T_IN, 0);
    int a = head_refused((u64)table, 0x100000, D_INDIRECT, 0, "indirect: table of 65536 descriptors");
    int b = head_refused((u64)table, 17, D_INDIRECT, 0, "indirect: table length not a multiple of 16");
    table[0] = (struct vring_desc){ (u64)hdr, 16, D_NEXT, 1 };
    table[1] = (struct vring_desc){ (u64)(table + 4), 48, D_INDIRECT | D_NEXT, 2 };
    table[2] = (struct vring_desc){ (u64)status, 1, D_WRITE, 0 };
    int c = head_refused((u64)table, 3 * 16, D_INDIRECT, 0, "indirect: nested table");
    /* 2000 chained descriptors (header, 1998 one-byte reads into data, status). */
    table[0] = (struct vring_desc){ (u64)hdr, 16, D_NEXT, 1 };
    for (u16 i = 1; i < 1999; i++) table[i] = (struct vring_desc){ (u64)data, 1, D_NEXT | D_WRITE, (u16)(i + 1) };
    table[1999] = (struct vring_desc){ (u64)status, 1, D_WRITE, 0 };
    set_desc(blk, 0, 0, (u64)table, 2000 * 16, D_INDIRECT, 0);
    post(blk, 0, 0, 0);
    /* Cut at the device's limit: the last writable byte it saw is data[0]. */
    int e = refused_at(blk, 0, "indirect: a chain of 2000 descriptors", data) && *status == 0xee;
    int f = head_refused(OUTSIDE, 64, D_INDIRECT, 0, "indirect: table outside RAM");
    attack("indirect", a && b && c && e && f, F_INDIRECT);
}

static void head(void) {
    blk_recovers(0);
    post(blk, 0, 200, 0);
    int r = outcome(blk, 0);
    kit_printf("hostile: head: available head 200 of 16: %s\n", r == RESET_NEEDED ? "needs reset" : r == ANSWERED ? "answered" : "NO ANSWER");
    attack("head", r == RESET_NEEDED, 0);
}

static void avail(void) {
    blk_recovers(0);
    blk_read3((u64)hdr, 16, (u64)data, 512, D_WRITE, (u64)status, 1, D_WRITE);
    int r = outcome(blk, 0);   /* the proper request first, so the device is running */
    post(blk, 0, 0, 100);
    r = outcome(blk, 0);
    kit_printf("hostile: avail: index 101 ahead on a 16-entry ring: %s\n", r == RESET_NEEDED ? "needs reset" : r == ANSWERED ? "answered" : "NO ANSWER");
    attack("avail", r == RESET_NEEDED, 0);
}

/* virtio_init's steps by hand, with queue 0's size and descriptor table chosen by the caller;
 * with `early`, a good read request is made available and kicked before DRIVER_OK. Returns the
 * status register after DRIVER_OK. */
static u32 hand_init(struct vdev *d, u32 qsize, u64 desc, int early, int *done_early) {
    virtio_write32(d, 0x70, 0);
    virtio_write32(d, 0x70, 1 | 2);
    virtio_write32(d, 0x24, 1);
    virtio_write32(d, 0x20, 1);                       /* VERSION_1 */
    virtio_write32(d, 0x24, 0);
    virtio_write32(d, 0x20, 0);
    virtio_write32(d, 0x70, 1 | 2 | 8);
    struct vq *v = virtio_alloc_vq(d, 0);
    if (!desc) desc = (u64)v->desc;
    virtio_write32(d, 0x30, 0);
    virtio_write32(d, 0x38, qsize);
    virtio_write32(d, 0x80, (u32)desc);
    virtio_write32(d, 0x84, (u32)(desc >> 32));
    virtio_write32(d, 0x90, (u32)(u64)v->avail);
    virtio_write32(d, 0x94, 0);
    virtio_write32(d, 0xa0, (u32)(u64)v->used);
    virtio_write32(d, 0xa4, 0);
    virtio_write32(d, 0x44, 1);
    if (early) {
        blk_read3((u64)hdr, 16, (u64)data, 512, D_WRITE, (u64)status, 1, D_WRITE);
        for (u64 t = rdtsc(); rdtsc() - t < 500000000UL;) cpu_relax();
        *done_early = v->used->idx != 0;
    }
    virtio_write32(d, 0x70, 1 | 2 | 8 | 4);
    return virtio_read32(d, 0x70);
}

static void qsize(void) {
    int ok = 1;
    u32 sizes[3] = { 15, 0, 512 };
    for (u32 i = 0; i < 3; i++) {
        u32 st = hand_init(blk, sizes[i], 0, 0, 0);
        kit_printf("hostile: qsize: queue size %u: status %x\n", sizes[i], st);
        ok &= (st & NEEDS_RESET) != 0;
    }
    attack("qsize", ok, 0);
}

static void ring(void) {
    u32 st = hand_init(blk, VQ_SIZE, OUTSIDE, 0, 0);
    kit_printf("hostile: ring: descriptor table outside RAM: status %x\n", st);
    attack("ring", (st & NEEDS_RESET) != 0, 0);
}

static void early(void) {
    int done_early = 1;
    u32 st = hand_init(blk, VQ_SIZE, 0, 1, &done_early);
    int r = outcome(blk, 0);
    kit_printf("hostile: early: kick before DRIVER_OK: served before %d, status %x, then %s, status byte %u\n",
               done_early, st, r == ANSWERED ? "answered" : "not answered", *status);
    attack("early", !done_early && !(st & NEEDS_RESET) && r == ANSWERED && *status == 0, 0);
}

static void rng_attacks(void) {
    if (virtio_init(rng, 0, 1)) { check("rng: init", 0); return; }
    set_desc(rng, 0, 0, OUTSIDE, 64, D_WRITE, 0);
    post(rng, 0, 0, 0);
    int a = outcome(rng, 0) == ANSWERED && used_len == 0;
    set_desc(rng, 0, 0, (u64)data, 64, 0, 0);
    memset(data, 0, 64);
    post(rng, 0, 0, 0);
    int b = outcome(rng, 0) == ANSWERED && used_len == 0 && data[0] == 0 && data[63] == 0;
    set_desc(rng, 0, 0, (u64)data, 0xffffffffU, D_WRITE, 0);
    post(rng, 0, 0, 0);
    int c = outcome(rng, 0) != NOTHING;
    kit_printf("hostile: rng: outside RAM %d, read-only %d, 4 GiB - 1 %d\n", a, b, c);
    check("rng", a && b && c);
}

int guest_main(struct hvm_start_info *si) {
    (void)si;
    lapic_enable();
    ndevs = virtio_mmio_scan(devs, 4);
    for (u32 i = 0; i < ndevs; i++) {
        devs[i].slot = i;
        virtio_enable_irq(&devs[i], (u8)(IRQ_VECTOR_BASE + i));
        if (devs[i].type == 2 && !blk) blk = &devs[i];
        if (devs[i].type == 4 && !rng) rng = &devs[i];
    }
    if (!blk || !rng) { kit_puts("hostile: needs a virtio-blk and a virtio-rng on virtio-mmio\n"); return 1; }
    kit_printf("hostile: blk at %lx, rng at %lx\n", blk->base, rng->base);
    if (enabled("oob")) oob();
    if (enabled("loop")) loop();
    if (enabled("len")) len();
    if (enabled("dir")) dir();
    if (enabled("indirect")) indirect();
    if (enabled("head")) head();
    if (enabled("avail")) avail();
    if (enabled("qsize")) qsize();
    if (enabled("ring")) ring();
    if (enabled("early")) early();
    if (enabled("rng")) rng_attacks();
    /* Another device still works after all that: the normal rng test. */
    check("rng still answers", virtio_test_rng(rng) == 0);
    kit_puts(failed ? "hostile: FAILED\n" : "hostile: all checks passed\n");
    u64 linger = 0;
    if (kit_cmdline_u64("hostile.linger", &linger) && linger)
        for (;;) sti_hlt();
    return failed;
}
