/* virtio-blk test: reads the capacity and id, writes sectors with a pattern the host can
 * recompute (byte at disk offset p = (seed + 7p + 13(p >> 9)) & 0xff, seed from `blk.seed=N`,
 * first sector from `blk.sector=N`), reads them back, zeroes one sector with WRITE_ZEROES,
 * flushes (not with `blk.noflush=1`: then only the host's own flush makes the writes durable),
 * and checks the error answers: a read past the end gets IOERR, an unknown request
 * type UNSUPP, and on a read-only disk a write gets IOERR (the pattern must then already be on
 * the disk, put there by the host). One line per check, each naming the disk by its id. */
#include "virtio.h"

#define BLK_F_RO (1UL << 5)
#define BLK_F_BLK_SIZE (1UL << 6)
#define BLK_F_SEG_MAX (1UL << 2)
#define BLK_F_FLUSH (1UL << 9)
#define BLK_F_DISCARD (1UL << 13)
#define BLK_F_WRITE_ZEROES (1UL << 14)
#define T_IN 0
#define T_OUT 1
#define T_FLUSH 4
#define T_GET_ID 8
#define T_DISCARD 11
#define T_WRITE_ZEROES 13
#define SECTORS 9                       /* written with the pattern; the last is then zeroed */

struct blk_hdr { u32 type; u32 reserved; u64 sector; };
struct blk_range { u64 sector; u32 sectors; u32 flags; };

static struct blk_hdr *hdr = (struct blk_hdr *)(virtio_scratch + 0);
static volatile u8 *status = virtio_scratch + 64;
static struct blk_range *range = (struct blk_range *)(virtio_scratch + 128);
static char *id = (char *)(virtio_scratch + 256);
static u8 *wbuf = virtio_scratch + 4096;
static u8 *rbuf = virtio_scratch + 16384;

static u8 pattern(u64 seed, u64 pos) { return (u8)(seed + pos * 7 + (pos >> 9) * 13); }

/* One request: header, optional data (device-written for reads), status. Returns the status
 * byte, or -1 when the device did not answer. */
int virtio_blk_request(struct vdev *d, u32 type, u64 sector, void *data, u32 len, int device_writes) {
    hdr->type = type;
    hdr->reserved = 0;
    hdr->sector = sector;
    *status = 0xff;
    u64 addr[3] = { (u64)hdr, (u64)data, (u64)status };
    u32 lens[3] = { sizeof(*hdr), len, 1 };
    int wr[3] = { 0, device_writes, 1 };
    if (len) {
        virtio_submit(d, 0, 3, addr, lens, wr);
    } else {
        addr[1] = addr[2]; lens[1] = 1; wr[1] = 1;
        virtio_submit(d, 0, 2, addr, lens, wr);
    }
    if (virtio_wait_used(d, 0) < 0) return -1;
    return *status;
}

static int check(const char *name, int ok) { if (!ok) kit_printf("virtio-blk[%s]: FAILED\n", name); return ok ? 0 : 1; }

int virtio_test_blk(struct vdev *d) {
    int rc = virtio_init(d, BLK_F_RO | BLK_F_BLK_SIZE | BLK_F_SEG_MAX | BLK_F_FLUSH | BLK_F_DISCARD | BLK_F_WRITE_ZEROES, 1);
    if (rc) { kit_printf("virtio-blk: init failed at step %d\n", rc); return 1; }
    u64 seed = 1, first = 1;
    kit_cmdline_u64("blk.seed", &seed);
    kit_cmdline_u64("blk.sector", &first);
    u64 capacity = virtio_config32(d, 0) | ((u64)virtio_config32(d, 4) << 32);
    int ro = (virtio_negotiated & BLK_F_RO) != 0;
    int failed = 0;

    memset(id, 0, 21);
    int st = virtio_blk_request(d, T_GET_ID, 0, id, 20, 1);
    kit_printf("virtio-blk[%s]: capacity %lu sectors, blk_size %u, read-only %d, get-id status %d\n",
               id, capacity, virtio_config32(d, 20), ro, st);
    failed |= check(id, st == 0 && id[0] && capacity >= first + SECTORS);

    u32 len = SECTORS * 512;
    u64 base = first * 512;
    for (u32 i = 0; i < len; i++) wbuf[i] = pattern(seed, base + i);
    st = virtio_blk_request(d, T_OUT, first, wbuf, len, 0);
    kit_printf("virtio-blk[%s]: write %u sectors at %lu: status %d\n", id, SECTORS, first, st);
    failed |= check(id, st == (ro ? 1 : 0));

    memset(rbuf, 0, len);
    st = virtio_blk_request(d, T_IN, first, rbuf, len, 1);
    u32 same = 0;
    for (u32 i = 0; i < len; i++) same += rbuf[i] == wbuf[i];
    kit_printf("virtio-blk[%s]: read back: status %d, %u of %u bytes match the pattern\n", id, st, same, len);
    failed |= check(id, st == 0 && same == len);

    if (!ro) {
        range->sector = first + SECTORS - 1; range->sectors = 1; range->flags = 0;
        st = virtio_blk_request(d, T_WRITE_ZEROES, 0, range, sizeof(*range), 0);
        int st2 = virtio_blk_request(d, T_IN, first + SECTORS - 1, rbuf, 512, 1);
        u32 zero = 0;
        for (u32 i = 0; i < 512; i++) zero += rbuf[i] == 0;
        kit_printf("virtio-blk[%s]: write-zeroes sector %lu: status %d, read status %d, %u zero bytes\n",
                   id, first + SECTORS - 1, st, st2, zero);
        failed |= check(id, st == 0 && st2 == 0 && zero == 512);
        range->sector = capacity - 1; range->sectors = 1; range->flags = 1;   /* unmap: not for DISCARD */
        st = virtio_blk_request(d, T_DISCARD, 0, range, sizeof(*range), 0);
        kit_printf("virtio-blk[%s]: discard with the unmap flag: status %d\n", id, st);
        failed |= check(id, st == 2);
    }

    u64 noflush = 0;
    if (!kit_cmdline_u64("blk.noflush", &noflush) || !noflush) {
        st = virtio_blk_request(d, T_FLUSH, 0, 0, 0, 0);
        kit_printf("virtio-blk[%s]: flush: status %d\n", id, st);
        failed |= check(id, st == 0);
    }

    st = virtio_blk_request(d, T_IN, capacity, rbuf, 512, 1);
    int st2 = virtio_blk_request(d, T_IN, capacity - 1, rbuf, 1024, 1);
    kit_printf("virtio-blk[%s]: read past the end: status %d, straddling the end: status %d\n", id, st, st2);
    failed |= check(id, st == 1 && st2 == 1);

    st = virtio_blk_request(d, 99, 0, 0, 0, 0);
    kit_printf("virtio-blk[%s]: unknown request type: status %d, irqs %u\n", id, st, d->irqs);
    failed |= check(id, st == 2 && d->irqs > 0);
    return failed;
}
