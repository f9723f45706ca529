/* virtio-balloon test: touches a region of RAM (in ring 3, so the host has it resident), waits
 * for a target (num_pages, from --balloon size= or the control socket), gives exactly those
 * pages to the inflate queue and sets `actual`; serves the statistics queue (the host takes the
 * buffer back when it wants fresh numbers); then waits for a lower target and deflates to it
 * (or, with DEFLATE_ON_OOM and no request, deflates half as an out-of-memory guest would) and
 * touches the returned pages again. The host released them with MADV_DONTNEED, so they read back
 * as zeros (anonymous private memory), not as what the guest wrote before inflating.
 *
 * Command line: balloon_touch_mib=N (region size; default the initial target, else 16),
 * balloon_wait_s=N (how long to wait for a target change, about N seconds; default 1). */
#include "virtio.h"

#define F_STATS_VQ (1UL << 1)
#define F_DEFLATE_ON_OOM (1UL << 2)
#define Q_INFLATE 0
#define Q_DEFLATE 1
#define Q_STATS 2
#define PAGE 4096UL
#define BATCH 4096          /* page numbers per inflate/deflate buffer (16 KiB of virtio_scratch) */
#define TSC_PER_S 2000000000UL

struct stat { u16 tag; u64 val; } __attribute__((packed));
enum { SWAP_IN, SWAP_OUT, MAJFLT, MINFLT, MEMFREE, MEMTOT, AVAIL };

static struct {
    struct vdev *d;
    u64 base, pages;        /* the touched region */
    u64 ram;                /* bytes of RAM in the memory map */
    u32 actual;
    u32 stats_sent;
} b;
static struct stat stats[7];
static u8 user_stack[16384] __attribute__((aligned(16)));

/* Ring 3: what a region looks like after the guest touches it. */
struct touch { u64 start, end, seed, nonzero, errors; };

static void fill(u64 arg) {
    struct touch *t = (struct touch *)arg;
    for (volatile u64 *q = (volatile u64 *)t->start; q < (volatile u64 *)t->end; q++) *q = (u64)q ^ t->seed;
    kit_user_return(0);
}

/* Counts words that are not zero, then writes the pattern and checks it. */
static void zero_then_fill(u64 arg) {
    struct touch *t = (struct touch *)arg;
    volatile u64 *p = (volatile u64 *)t->start, *end = (volatile u64 *)t->end;
    for (volatile u64 *q = p; q < end; q++) t->nonzero += *q != 0;
    for (volatile u64 *q = p; q < end; q++) *q = (u64)q ^ t->seed;
    for (volatile u64 *q = p; q < end; q++) t->errors += *q != ((u64)q ^ t->seed);
    kit_user_return(0);
}

static void in_ring3(void (*fn)(u64), struct touch *t) {
    kit_enter_user(fn, (u64)(user_stack + sizeof(user_stack)), (u64)t);
}

static void config_write32(struct vdev *d, u64 off, u32 v) {
    u64 base = d->transport == VIRTIO_PCI ? d->device_cfg : d->base + 0x100;
    *(volatile u32 *)(base + off) = v;
}

/* (Re)fills the statistics buffer from the guest's view and hands it to the device. Like
 * Linux, pages in the balloon no longer count in the total. */
static void send_stats(void) {
    u64 total = b.ram - (u64)b.actual * PAGE;
    u64 used = b.base + (b.pages - b.actual) * PAGE;
    u64 values[7] = { 0, 0, 0, 0, total > used ? total - used : 0, total, total > used ? total - used : 0 };
    for (u16 i = 0; i < 7; i++) { stats[i].tag = i; stats[i].val = values[i]; }
    u64 addr = (u64)stats; u32 len = sizeof(stats); int wr = 0;
    virtio_submit(b.d, Q_STATS, 1, &addr, &len, &wr);
    b.stats_sent++;
}

/* The device gave the stats buffer back: it wants fresh numbers. */
static void serve_stats(void) {
    struct vq *v = &b.d->vq[Q_STATS];
    if (v->used->idx == v->last_used) return;
    v->last_used = v->used->idx;
    send_stats();
}

/* Waits up to `seconds` for num_pages to satisfy want_more (num_pages > actual) or its
 * opposite, serving the statistics queue meanwhile; num_pages is read again after each
 * interrupt. Returns the last num_pages read. */
static u32 wait_target(u64 seconds, int want_more) {
    u32 irqs = b.d->irqs;
    u32 target = virtio_config32(b.d, 0);
    for (u64 t0 = rdtsc(); rdtsc() - t0 < seconds * TSC_PER_S;) {
        if (want_more ? target > b.actual : target < b.actual) break;
        sti();
        cpu_relax();
        cli();
        /* The buffer may have come back before this wait began: look at the ring itself. */
        serve_stats();
        if (b.d->irqs != irqs) {
            irqs = b.d->irqs;
            target = virtio_config32(b.d, 0);
        }
    }
    cli();
    return target;
}

/* Sends region pages [from, to) to queue q in batches; 0 when every batch was used. */
static int move_pages(u32 q, u32 from, u32 to) {
    u32 *pfns = (u32 *)virtio_scratch;
    while (from < to) {
        u32 n = to - from < BATCH ? to - from : BATCH;
        for (u32 i = 0; i < n; i++) pfns[i] = (u32)((b.base >> 12) + from + i);
        u64 addr = (u64)pfns; u32 len = n * 4; int wr = 0;
        virtio_submit(b.d, q, 1, &addr, &len, &wr);
        if (virtio_wait_used(b.d, q) < 0) return 1;
        from += n;
    }
    return 0;
}

static u64 ram_bytes_and_region(u64 want) {
    struct hvm_start_info *si = kit_start_info;
    if (!si || !si->memmap_paddr) return 0;
    struct hvm_memmap_entry *m = (struct hvm_memmap_entry *)si->memmap_paddr;
    u64 floor = ((u64)kit_image_end + 0x1fffff) & ~0x1fffffUL, ram = 0;
    b.base = 0;
    for (u32 i = 0; i < si->memmap_entries; i++) {
        if (m[i].type != 1) continue;
        ram += m[i].size;
        u64 start = m[i].addr < floor ? floor : m[i].addr;
        if (!b.base && start + want <= m[i].addr + m[i].size && start + want <= 0x100000000UL) b.base = start;
    }
    return ram;
}

int virtio_test_balloon(struct vdev *d) {
    int rc = virtio_init(d, F_STATS_VQ | F_DEFLATE_ON_OOM, 3);
    if (rc) { kit_printf("virtio-balloon: init failed at step %d\n", rc); return 1; }
    int oom = (virtio_negotiated & F_DEFLATE_ON_OOM) != 0;
    if (!(virtio_negotiated & F_STATS_VQ)) { kit_puts("virtio-balloon: no statistics queue offered\n"); return 1; }
    b.d = d;
    b.actual = 0;
    u32 target = virtio_config32(d, 0);
    u64 touch_mib = target ? ((u64)target * PAGE + (1 << 20) - 1) >> 20 : 16, wait_s = 1;
    kit_cmdline_u64("balloon_touch_mib", &touch_mib);
    kit_cmdline_u64("balloon_wait_s", &wait_s);
    b.pages = touch_mib << 8;
    b.ram = ram_bytes_and_region(touch_mib << 20);
    if (!b.base) { kit_printf("virtio-balloon: no %lu MiB of RAM to touch\n", touch_mib); return 1; }
    send_stats();

    struct touch t = { b.base, b.base + b.pages * PAGE, 0x6b616c6c6f6f6e00UL ^ rdtsc(), 0, 0 };
    in_ring3(fill, &t);
    kit_printf("virtio-balloon: ram %lu, touched %lu MiB at %lx, target %u pages, deflate_on_oom %u\n",
               b.ram, touch_mib, b.base, target, oom);

    target = wait_target(wait_s, 1);
    if (target <= b.actual) { kit_printf("virtio-balloon: no target within %lu s\n", wait_s); return 1; }
    u32 want = target < b.pages ? target : (u32)b.pages;
    if (move_pages(Q_INFLATE, 0, want)) { kit_puts("virtio-balloon: inflate buffer not used\n"); return 1; }
    b.actual = want;
    config_write32(d, 4, b.actual);
    kit_printf("virtio-balloon: inflated %u pages (%lu MiB), actual %u, irqs %u\n",
               want, (u64)want >> 8, virtio_config32(d, 4), d->irqs);

    target = wait_target(wait_s, 0);
    u32 to;
    if (target < b.actual) {
        to = target;
        kit_printf("virtio-balloon: target lowered to %u pages\n", target);
    } else if (oom) {
        to = b.actual / 2;
        kit_printf("virtio-balloon: no lower target; deflating to %u pages as on OOM\n", to);
    } else {
        kit_printf("virtio-balloon: no deflate requested; stats sent %u times\n", b.stats_sent);
        return 0;
    }
    if (move_pages(Q_DEFLATE, to, b.actual)) { kit_puts("virtio-balloon: deflate buffer not used\n"); return 1; }
    struct touch back = { b.base + (u64)to * PAGE, b.base + (u64)b.actual * PAGE, 0x6465666c61746500UL, 0, 0 };
    b.actual = to;
    config_write32(d, 4, b.actual);
    in_ring3(zero_then_fill, &back);
    kit_printf("virtio-balloon: deflated to %u pages; %lu MiB back read %lu non-zero words, %lu errors after rewrite; stats sent %u times\n",
               to, (back.end - back.start) >> 20, back.nonzero, back.errors, b.stats_sent);
    return (back.nonzero == 0 && back.errors == 0) ? 0 : 1;
}
