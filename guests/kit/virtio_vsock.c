/* virtio-vsock test: reads the guest CID from the configuration space, then, with ports from
 * the command line:
 *   vsock.refused=P  a connection to host port P (nobody listens) is answered with RST;
 *   vsock.port=P     a stream to host port P echoes back VSOCK_MSG bytes the guest sends;
 *   vsock.listen=L   the guest accepts a stream the host opens to port L and echoes what comes
 *                    until the host shuts it down.
 * One receive buffer at a time (header + 4 KiB of data), a packet sent waits for its completion. */
#include "virtio.h"

struct vsock_hdr {
    u64 src_cid, dst_cid;
    u32 src_port, dst_port, len;
    u16 type, op;
    u32 flags, buf_alloc, fwd_cnt;
} __attribute__((packed));

enum { OP_REQUEST = 1, OP_RESPONSE, OP_RST, OP_SHUTDOWN, OP_RW, OP_CREDIT_UPDATE, OP_CREDIT_REQUEST };
#define HOST_CID 2
#define TYPE_STREAM 1
#define DATA_MAX 4096
#define GUEST_PORT 40000
#define BUF_ALLOC 65536
#define VSOCK_MSG 3000
#define WAIT_TRIES 4

static u64 my_cid;
static struct vsock_hdr *rx_hdr, *tx_hdr, in;
static u8 *rx_data, *tx_data, *got;
static u32 fwd_cnt; /* bytes of the current stream we consumed */

static void post_rx(struct vdev *d) {
    u64 addr[2] = { (u64)rx_hdr, (u64)rx_data };
    u32 len[2] = { sizeof(*rx_hdr), DATA_MAX };
    int wr[2] = { 1, 1 };
    virtio_submit(d, 0, 2, addr, len, wr);
}

static int send_pkt(struct vdev *d, u32 local, u32 peer, u16 op, u32 flags, const u8 *data, u32 len) {
    memset(tx_hdr, 0, sizeof(*tx_hdr));
    tx_hdr->src_cid = my_cid; tx_hdr->dst_cid = HOST_CID;
    tx_hdr->src_port = local; tx_hdr->dst_port = peer;
    tx_hdr->len = len; tx_hdr->type = TYPE_STREAM; tx_hdr->op = op; tx_hdr->flags = flags;
    tx_hdr->buf_alloc = BUF_ALLOC; tx_hdr->fwd_cnt = fwd_cnt;
    if (len) memcpy(tx_data, data, len);
    u64 addr[2] = { (u64)tx_hdr, (u64)tx_data };
    u32 lens[2] = { sizeof(*tx_hdr), len };
    int wr[2] = { 0, 0 };
    virtio_submit(d, 1, len ? 2 : 1, addr, lens, wr);
    return virtio_wait_used(d, 1) >= 0;
}

/* Next packet for the guest into `in` and `got` (its data); 0 when none came in time. */
static int recv_pkt(struct vdev *d) {
    for (u32 i = 0; i < WAIT_TRIES; i++) {
        if (virtio_wait_used(d, 0) < 0) continue;
        in = *rx_hdr;
        if (in.len > DATA_MAX) in.len = 0;
        memcpy(got, rx_data, in.len);
        post_rx(d);
        if (in.dst_cid == my_cid && in.src_cid == HOST_CID) return 1;
    }
    return 0;
}

/* Next packet of stream (local, peer), skipping credit updates; 0 on timeout. */
static int recv_on(struct vdev *d, u32 local, u32 peer) {
    while (recv_pkt(d)) {
        if (in.dst_port != local || in.src_port != peer) continue;
        if (in.op == OP_CREDIT_UPDATE) continue;
        if (in.op == OP_CREDIT_REQUEST) { send_pkt(d, local, peer, OP_CREDIT_UPDATE, 0, 0, 0); continue; }
        return 1;
    }
    return 0;
}

static u8 msg_byte(u32 i) { return (u8)('a' + i % 26); }

static int refused(struct vdev *d, u32 port) {
    if (!send_pkt(d, GUEST_PORT - 1, port, OP_REQUEST, 0, 0, 0) || !recv_on(d, GUEST_PORT - 1, port)) return 0;
    if (in.op != OP_RST) { kit_printf("virtio-vsock: port %u answered op %u, not RST\n", port, in.op); return 0; }
    kit_printf("virtio-vsock: connect to unbound host port %u refused with RST\n", port);
    return 1;
}

static int guest_initiated(struct vdev *d, u32 port) {
    static u8 msg[VSOCK_MSG], echo[VSOCK_MSG];
    fwd_cnt = 0;
    if (!send_pkt(d, GUEST_PORT, port, OP_REQUEST, 0, 0, 0) || !recv_on(d, GUEST_PORT, port)) return 0;
    if (in.op != OP_RESPONSE) { kit_printf("virtio-vsock: connect to port %u got op %u\n", port, in.op); return 0; }
    for (u32 i = 0; i < VSOCK_MSG; i++) msg[i] = msg_byte(i);
    for (u32 off = 0; off < VSOCK_MSG; off += DATA_MAX) {
        u32 n = VSOCK_MSG - off < DATA_MAX ? VSOCK_MSG - off : DATA_MAX;
        if (!send_pkt(d, GUEST_PORT, port, OP_RW, 0, msg + off, n)) return 0;
    }
    u32 have = 0;
    while (have < VSOCK_MSG) {
        if (!recv_on(d, GUEST_PORT, port)) { kit_printf("virtio-vsock: echo stalled at %u bytes\n", have); return 0; }
        if (in.op != OP_RW || have + in.len > VSOCK_MSG) { kit_printf("virtio-vsock: op %u during the echo\n", in.op); return 0; }
        memcpy(echo + have, got, in.len);
        have += in.len;
        fwd_cnt += in.len;
    }
    for (u32 i = 0; i < VSOCK_MSG; i++)
        if (echo[i] != msg[i]) { kit_printf("virtio-vsock: echo differs at byte %u\n", i); return 0; }
    if (!send_pkt(d, GUEST_PORT, port, OP_SHUTDOWN, 3, 0, 0) || !recv_on(d, GUEST_PORT, port) || in.op != OP_RST) {
        kit_puts("virtio-vsock: no RST after our shutdown\n");
        return 0;
    }
    kit_printf("virtio-vsock: guest-initiated stream to host port %u echoed %u bytes, closed\n", port, have);
    return 1;
}

static int host_initiated(struct vdev *d, u32 port) {
    fwd_cnt = 0;
    kit_printf("virtio-vsock: listening on port %u\n", port);
    u32 host_port = 0;
    while (!host_port) {
        if (!recv_pkt(d)) { kit_puts("virtio-vsock: no connection from the host\n"); return 0; }
        if (in.op == OP_REQUEST && in.dst_port == port) host_port = in.src_port;
    }
    if (!send_pkt(d, port, host_port, OP_RESPONSE, 0, 0, 0)) return 0;
    u32 echoed = 0;
    for (;;) {
        if (!recv_on(d, port, host_port)) { kit_puts("virtio-vsock: host stream went silent\n"); return 0; }
        if (in.op == OP_SHUTDOWN) break;
        if (in.op != OP_RW) { kit_printf("virtio-vsock: op %u on the host stream\n", in.op); return 0; }
        fwd_cnt += in.len;
        if (!send_pkt(d, port, host_port, OP_RW, 0, got, in.len)) return 0;
        echoed += in.len;
    }
    send_pkt(d, port, host_port, OP_RST, 0, 0, 0);
    kit_printf("virtio-vsock: host-initiated stream from host port %u to port %u echoed %u bytes, closed by the host\n",
               host_port, port, echoed);
    return 1;
}

int virtio_test_vsock(struct vdev *d) {
    int rc = virtio_init(d, 0, 3);
    if (rc) { kit_printf("virtio-vsock: init failed at step %d\n", rc); return 1; }
    my_cid = virtio_config32(d, 0) | ((u64)virtio_config32(d, 4) << 32);
    kit_printf("virtio-vsock: cid %lu\n", my_cid);
    rx_hdr = (struct vsock_hdr *)virtio_scratch;
    tx_hdr = (struct vsock_hdr *)(virtio_scratch + 64);
    rx_data = virtio_scratch + 4096;
    tx_data = virtio_scratch + 2 * 4096;
    got = virtio_scratch + 3 * 4096;
    u64 event_addr = (u64)(virtio_scratch + 128); u32 event_len = 8; int wr = 1;
    virtio_submit(d, 2, 1, &event_addr, &event_len, &wr);
    post_rx(d);
    u64 port;
    int ok = 1;
    if (kit_cmdline_u64("vsock.refused", &port)) ok &= refused(d, (u32)port);
    if (kit_cmdline_u64("vsock.port", &port)) ok &= guest_initiated(d, (u32)port);
    if (kit_cmdline_u64("vsock.listen", &port)) ok &= host_initiated(d, (u32)port);
    kit_printf("virtio-vsock: irqs %u\n", d->irqs);
    return ok && d->irqs > 0 ? 0 : 1;
}
