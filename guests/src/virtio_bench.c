/* virtio_bench: drives one virtio-blk or virtio-net device as fast as a ring-0 test guest can,
 * for ferro-bench to time under Ferrovisor and QEMU with the same file (virtio-pci, where QEMU's
 * firmware assigns the BARs; virtio-mmio under Ferrovisor works too).
 *
 * Parameters (kernel command line):
 *   bench.op=read|write|tx  blk read or write, or net transmit
 *   bench.size=N            bytes per request (blk: a multiple of 512) or per frame (tx: the
 *                           Ethernet frame, header included, 60..2036)
 *   bench.count=N           requests or frames; 0 sets everything up and stops
 *   bench.random=1          blk: uniformly random request-aligned offsets (else sequential,
 *                           wrapping at the end of the disk)
 *   bench.depth=N           requests in flight, 1..16 (default 16)
 *   bench.verify=1          blk reads: the first 8 bytes of each request's data must hold its
 *                           byte offset on the disk (the host prepares the image so)
 *   bench.span=BYTES        blk: requests stay in the first BYTES of the disk (default: all of it)
 *   bench.rounds=N          does the workload N times (default 1; 0: until the VM is stopped),
 *                           the offsets going on where the last round stopped, and prints
 *                           "bench: round R cycles C errors E" after each round but the last, so
 *                           the host sees the guest's throughput over time (ferro-bench
 *                           backup-running times a backup against it)
 * Every blk write puts its byte offset in its first 8 bytes; a write run ends with a FLUSH
 * inside the timed part. Every frame is a broadcast of ethertype 0x88b5 from the device's MAC
 * (or 02:00:00:00:00:01) carrying its sequence number (u64, little endian) at byte 14.
 *
 * The guest prints "bench: <op> size S count N depth D random R cycles C errors E" with C the
 * TSC cycles from the first request to the last completion (guest TSC = host TSC here) and
 * exits through isa-debug-exit: status 1 when E is 0, 5 otherwise (QEMU's PVH entry gives no
 * ACPI tables to power off with).
 *
 * Speed: ring 0 is interpreted on kvm-pvm (~0.5 us per instruction, under either VMM), so the
 * per-request path is a few dozen plain instructions: descriptors (indirect tables for blk, so
 * 16 requests fit a 16-entry ring) are built once per slot; a request only rewrites its sector
 * and posts its slot; interrupts are suppressed (VRING_AVAIL_F_NO_INTERRUPT) and completions
 * polled; a kick is skipped while the device says it is already processing (VRING_USED_F_NO_NOTIFY). */
#include "kit.h"
#include "virtio.h"

#define F_INDIRECT_DESC (1UL << 28)
#define NET_F_MAC (1UL << 5)
#define DESC_F_INDIRECT 4
#define AVAIL_F_NO_INTERRUPT 1
#define USED_F_NO_NOTIFY 1
#define T_IN 0
#define T_OUT 1
#define T_FLUSH 4
#define NET_HDR 12
#define TX_STRIDE 2048
#define BENCH_ETHERTYPE 0x88b5
#define BUF_BASE 0x400000UL      /* request buffers: above the kit image, identity-mapped */
#define WAIT_TICKS 40000000000UL /* a stuck device fails the run instead of hanging it */
#define RNG_SEED 0x243f6a8885a308d3UL /* random offsets: a 64-bit LCG, request (state >> 24) & mask */
#define RNG_MUL 6364136223846793005UL
#define RNG_ADD 1442695040888963407UL

enum op { OP_READ, OP_WRITE, OP_TX };

struct blk_hdr { u32 type; u32 reserved; u64 sector; };

static struct vdev dev;
static struct blk_hdr hdrs[VQ_SIZE + 1];
static volatile u8 status[VQ_SIZE + 1];
static struct vring_desc itab[VQ_SIZE + 1][3] __attribute__((aligned(16)));

struct bench {
    enum op op;
    u64 size, count, random, depth, verify, span, rounds;
    u64 rng, next;           /* blk: the random state and the next sequential sector, kept across rounds */
    u64 blocks;              /* blk: requests of `size` that fit the disk */
    u64 mask;                /* blk random: the largest power of two <= blocks, less one */
    struct vq *v;
    u32 q;
    u64 notify;              /* the queue's notify register */
};

static struct bench b;

/* "bench.op=WORD": whether WORD is the value of bench.op. */
static int op_is(const char *word) {
    const char *s = kit_cmdline(), *key = "bench.op=";
    u64 klen = kit_strlen(key), wlen = kit_strlen(word);
    for (const char *p = s; *p; p++) {
        if ((p != s && p[-1] != ' ') || kit_strncmp(p, key, klen)) continue;
        return !kit_strncmp(p + klen, word, wlen) && (p[klen + wlen] == ' ' || p[klen + wlen] == 0);
    }
    return 0;
}

static inline void kick(void) {
    if (dev.transport == VIRTIO_PCI) *(volatile u16 *)b.notify = (u16)b.q;
    else *(volatile u32 *)b.notify = b.q;
}

static u8 *slot_buf(u32 s) { return (u8 *)(BUF_BASE + (u64)s * (b.op == OP_TX ? TX_STRIDE : b.size)); }

/* Publishes the available index and kicks unless the device said it is still processing. */
static inline void publish(struct vq *v, u16 avail) {
    __asm__ volatile("" ::: "memory");
    v->avail->idx = avail;
    __asm__ volatile("mfence" ::: "memory");
    if (!(v->used->flags & USED_F_NO_NOTIFY)) kick();
}

/* Waits for the used index to move past `seen`; returns it, or `seen` after WAIT_TICKS. The
 * clock is read once every 1024 polls: a poll is then five instructions. */
static inline __attribute__((always_inline)) u16 wait_used(volatile u16 *idx, u16 seen) {
    u16 now;
    u64 spins = 0, deadline = 0;
    while ((now = *idx) == seen) {
        if (++spins & 1023) continue;
        u64 t = rdtsc();
        if (!deadline) deadline = t + WAIT_TICKS;
        else if (t > deadline) break;
    }
    return now;
}

/* Keeps `depth` slots in flight until `count` have completed. OP, RANDOM and VERIFY are
 * constants at each call, so what a workload does not use is compiled out and its state stays
 * in registers. Returns the number of failed requests, or ~0 when the device stopped. */
static inline __attribute__((always_inline)) u64 run(const enum op op, const int random, const int verify) {
    struct vq *v = b.v;
    volatile u16 *used_idx = &v->used->idx;
    volatile struct vring_used_elem *uring = v->used->ring;
    u16 *aring = v->avail->ring;
    const u64 count = b.count, size = b.size, mask = b.mask, spb = b.size >> 9, end = b.blocks * spb;
    u64 rng = b.rng, next = b.next, issued = 0, done = 0, errors = 0;
    u16 avail = v->avail->idx, used = *used_idx;
#define POST(s) do {                                                                        \
        if (op == OP_TX) {                                                                  \
            *(u64 *)(BUF_BASE + ((u64)(s) << 11) + NET_HDR + 14) = issued;                  \
        } else {                                                                            \
            u64 sector;                                                                     \
            if (random) { rng = rng * RNG_MUL + RNG_ADD; sector = ((rng >> 24) & mask) * spb; } \
            else { sector = next; next += spb; if (next >= end) next = 0; }                 \
            hdrs[s].sector = sector;                                                        \
            if (op == OP_WRITE) *(u64 *)(BUF_BASE + (s) * size) = sector << 9;              \
        }                                                                                   \
        aring[avail++ & (VQ_SIZE - 1)] = (u16)(s);                                          \
        issued++;                                                                           \
    } while (0)
    for (u32 s = 0; s < b.depth && issued < count; s++) POST(s);
    publish(v, avail);
    while (done < count) {
        u16 now = wait_used(used_idx, used);
        if (now == used) return ~0UL;
        while (used != now) {
            u32 s = uring[used++ & (VQ_SIZE - 1)].id;
            done++;
            if (op != OP_TX) {
                if (status[s] || (verify && *(u64 *)(BUF_BASE + s * size) != hdrs[s].sector << 9)) errors++;
                status[s] = 0xff;
            }
            if (issued < count) POST(s);
        }
        publish(v, avail);
    }
#undef POST
    v->last_used = used;
    b.rng = rng;
    b.next = next;
    return errors;
}

/* One round of the workload: run() with its constants. */
static u64 workload(void) {
    if (b.op == OP_TX) return run(OP_TX, 0, 0);
    if (b.op == OP_WRITE) return b.random ? run(OP_WRITE, 1, 0) : run(OP_WRITE, 0, 0);
    if (b.verify) return b.random ? run(OP_READ, 1, 1) : run(OP_READ, 0, 1);
    return b.random ? run(OP_READ, 1, 0) : run(OP_READ, 0, 0);
}

/* One FLUSH on descriptor 0 (every slot is free by now); 0 when it succeeded. */
static int flush(void) {
    struct vq *v = b.v;
    u32 s = VQ_SIZE;
    hdrs[s].type = T_FLUSH;
    hdrs[s].sector = 0;
    itab[s][0] = (struct vring_desc){ (u64)&hdrs[s], sizeof(hdrs[s]), VRING_DESC_F_NEXT, 1 };
    itab[s][1] = (struct vring_desc){ (u64)&status[s], 1, VRING_DESC_F_WRITE, 0 };
    v->desc[0] = (struct vring_desc){ (u64)itab[s], 2 * sizeof(struct vring_desc), DESC_F_INDIRECT, 0 };
    status[s] = 0xff;
    u16 avail = v->avail->idx, used = v->used->idx;
    v->avail->ring[avail & (VQ_SIZE - 1)] = 0;
    __asm__ volatile("" ::: "memory");
    v->avail->idx = (u16)(avail + 1);
    __asm__ volatile("mfence" ::: "memory");
    kick();
    if (wait_used(&v->used->idx, used) == used) return 1;
    return status[s] != 0;
}

static int setup_blk(void) {
    int rc = virtio_init(&dev, F_INDIRECT_DESC, 1);
    if (rc) { kit_printf("bench: virtio-blk init failed at step %d\n", rc); return 1; }
    if (!(virtio_negotiated & F_INDIRECT_DESC)) { kit_puts("bench: the device lacks indirect descriptors\n"); return 1; }
    u64 capacity = virtio_config32(&dev, 0) | ((u64)virtio_config32(&dev, 4) << 32);
    if (!b.size || b.size % 512 || capacity * 512 < b.size) { kit_printf("bench: bad size %lu for a disk of %lu sectors\n", b.size, capacity); return 1; }
    u64 bytes = b.span && b.span < capacity * 512 ? b.span : capacity * 512;
    if (bytes < b.size) { kit_printf("bench: span %lu is smaller than a request of %lu\n", b.span, b.size); return 1; }
    u64 blocks = bytes / b.size;
    b.blocks = blocks;
    for (b.mask = 1; b.mask * 2 <= blocks; b.mask *= 2) {}
    b.mask -= 1;
    b.q = 0;
    b.v = &dev.vq[0];
    for (u32 s = 0; s < VQ_SIZE; s++) {
        hdrs[s].type = b.op == OP_WRITE ? T_OUT : T_IN;
        status[s] = 0xff;
        itab[s][0] = (struct vring_desc){ (u64)&hdrs[s], sizeof(hdrs[s]), VRING_DESC_F_NEXT, 1 };
        itab[s][1] = (struct vring_desc){ (u64)slot_buf(s), (u32)b.size, (u16)(VRING_DESC_F_NEXT | (b.op == OP_READ ? VRING_DESC_F_WRITE : 0)), 2 };
        itab[s][2] = (struct vring_desc){ (u64)&status[s], 1, VRING_DESC_F_WRITE, 0 };
        b.v->desc[s] = (struct vring_desc){ (u64)itab[s], sizeof(itab[s]), DESC_F_INDIRECT, 0 };
    }
    return 0;
}

static int setup_tx(void) {
    int rc = virtio_init(&dev, NET_F_MAC, 2);
    if (rc) { kit_printf("bench: virtio-net init failed at step %d\n", rc); return 1; }
    if (b.size < 60 || b.size + NET_HDR > TX_STRIDE) { kit_printf("bench: bad frame size %lu\n", b.size); return 1; }
    u8 mac[6] = { 2, 0, 0, 0, 0, 1 };
    if (virtio_negotiated & NET_F_MAC)
        for (u32 i = 0; i < 6; i++) mac[i] = virtio_config8(&dev, i);
    b.q = 1;
    b.v = &dev.vq[1];
    for (u32 s = 0; s < VQ_SIZE; s++) {
        u8 *p = slot_buf(s);
        memset(p, 0, NET_HDR + b.size);
        memset(p + NET_HDR, 0xff, 6);
        memcpy(p + NET_HDR + 6, mac, 6);
        p[NET_HDR + 12] = BENCH_ETHERTYPE >> 8;
        p[NET_HDR + 13] = BENCH_ETHERTYPE & 0xff;
        b.v->desc[s] = (struct vring_desc){ (u64)p, (u32)(NET_HDR + b.size), 0, 0 };
    }
    return 0;
}

int guest_main(struct hvm_start_info *si) {
    (void)si;
    b.op = op_is("read") ? OP_READ : op_is("write") ? OP_WRITE : op_is("tx") ? OP_TX : (enum op)-1;
    b.size = 4096; b.count = 0; b.random = 0; b.depth = VQ_SIZE; b.verify = 0; b.span = 0; b.rounds = 1;
    b.rng = RNG_SEED; b.next = 0;
    kit_cmdline_u64("bench.size", &b.size);
    kit_cmdline_u64("bench.count", &b.count);
    kit_cmdline_u64("bench.random", &b.random);
    kit_cmdline_u64("bench.depth", &b.depth);
    kit_cmdline_u64("bench.verify", &b.verify);
    kit_cmdline_u64("bench.span", &b.span);
    kit_cmdline_u64("bench.rounds", &b.rounds);
    if ((int)b.op < 0 || !b.depth || b.depth > VQ_SIZE) { kit_puts("bench: give bench.op=read|write|tx and bench.depth=1..16\n"); return 2; }
    u32 want = b.op == OP_TX ? 1 : 2;
    static struct vdev found[8];
    u32 m = virtio_mmio_scan(found, 8);
    if (virtio_pci_scan) m += virtio_pci_scan(found + m, 8 - m);
    u32 i = 0;
    while (i < m && found[i].type != want) i++;
    if (i == m) { kit_printf("bench: no virtio device of type %u\n", want); return 2; }
    dev = found[i];
    dev.slot = 0;
    if (b.op == OP_TX ? setup_tx() : setup_blk()) return 2;
    b.v->avail->flags = AVAIL_F_NO_INTERRUPT;
    if (dev.transport == VIRTIO_PCI) {
        *(volatile u16 *)(dev.base + 0x16) = (u16)b.q;                     /* queue_select */
        b.notify = dev.notify + (u64)*(volatile u16 *)(dev.base + 0x1e) * dev.notify_mul;
    } else {
        b.notify = dev.base + 0x50;
    }
    u64 t0, errors;
    for (u64 round = 1;; round++) {
        t0 = rdtsc();
        errors = workload();
        if (errors == ~0UL || round == b.rounds) break;
        kit_printf("bench: round %lu cycles %lu errors %lu\n", round, rdtsc() - t0, errors);
    }
    int stuck = errors == ~0UL;
    if (!stuck && b.op == OP_WRITE && b.count) errors += (u64)flush();
    u64 cycles = rdtsc() - t0;
    if (stuck) { kit_puts("bench: the device stopped completing requests\n"); errors = 1; }
    kit_printf("bench: %s size %lu count %lu depth %lu random %lu cycles %lu errors %lu\n",
               b.op == OP_READ ? "read" : b.op == OP_WRITE ? "write" : "tx", b.size, b.count, b.depth, b.random, cycles, errors);
    kit_exit(errors ? 2 : 0);
}
