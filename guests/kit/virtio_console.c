/* virtio-console test (port 0: receiveq 0, transmitq 1): sends a known line on the transmit
 * queue; with `console.rx=1` also waits for a line from the host on the receive queue (ended by
 * '\n' or '\r'), reports it on COM1 and sends "echo: LINE\n" back. One line per check. */
#include "virtio.h"

static const char hello[] = "virtio-console: hello from the guest\n";

static i64 console_send(struct vdev *d, const char *s, u32 len) {
    u8 *buf = virtio_scratch;
    memcpy(buf, s, len);
    u64 addr = (u64)buf; int wr = 0;
    virtio_submit(d, 1, 1, &addr, &len, &wr);
    return virtio_wait_used(d, 1);
}

int virtio_test_console(struct vdev *d) {
    int rc = virtio_init(d, 0, 2);
    if (rc) { kit_printf("virtio-console: init failed at step %d\n", rc); return 1; }
    i64 used = console_send(d, hello, sizeof(hello) - 1);
    kit_printf("virtio-console: sent %u bytes, used length %ld\n", (u32)(sizeof(hello) - 1), used);
    if (used != 0) return 1;
    u64 rx = 0;
    kit_cmdline_u64("console.rx", &rx);
    if (!rx) return 0;

    char line[64];
    u32 got = 0;
    int ended = 0;
    u8 *buf = virtio_scratch + 4096;
    while (!ended && got < sizeof(line) - 1) {
        u64 addr = (u64)buf; u32 len = 64; int wr = 1;
        virtio_submit(d, 0, 1, &addr, &len, &wr);
        i64 n = virtio_wait_used(d, 0);
        if (n < 0) { kit_printf("virtio-console: no input from the host\n"); return 1; }
        for (i64 i = 0; i < n && got < sizeof(line) - 1; i++) {
            if (buf[i] == '\n' || buf[i] == '\r') { ended = 1; break; }
            line[got++] = (buf[i] >= 32 && buf[i] < 127) ? (char)buf[i] : '?';
        }
    }
    line[got] = 0;
    kit_printf("virtio-console: received '%s', irqs %u\n", line, d->irqs);
    char echo[80];
    memcpy(echo, "echo: ", 6);
    memcpy(echo + 6, line, got);
    echo[6 + got] = '\n';
    used = console_send(d, echo, 7 + got);
    kit_printf("virtio-console: echoed, used length %ld\n", used);
    return (ended && used == 0 && d->irqs > 0) ? 0 : 1;
}
