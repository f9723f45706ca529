/* virtio-rng test: one 64-byte request comes back full of non-zero-looking bytes, with an
 * interrupt. */
#include "virtio.h"

int virtio_test_rng(struct vdev *d) {
    int rc = virtio_init(d, 0, 1);
    if (rc) { kit_printf("virtio-rng: init failed at step %d\n", rc); return 1; }
    u8 *buf = virtio_scratch;
    memset(buf, 0, 64);
    u64 addr = (u64)buf; u32 len = 64; int wr = 1;
    virtio_submit(d, 0, 1, &addr, &len, &wr);
    i64 got = virtio_wait_used(d, 0);
    u32 nonzero = 0;
    for (u32 i = 0; i < 64; i++) nonzero += buf[i] != 0;
    kit_printf("virtio-rng: got %ld bytes, %u non-zero, first %x %x %x %x, irqs %u\n",
               got, nonzero, buf[0], buf[1], buf[2], buf[3], d->irqs);
    return (got == 64 && nonzero > 32 && d->irqs > 0) ? 0 : 1;
}
