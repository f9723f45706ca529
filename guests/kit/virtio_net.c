/* virtio-net test: reads the MAC and link status from the configuration space, then talks to
 * a host on the other side of the tap: an ARP request for net.ip (the host's address) must get
 * a reply, then an ICMP echo request must come back as an echo reply with the same payload.
 * The guest answers ARP requests for its own address net.me. Addresses come from the command
 * line as dotted quads: "net.ip=10.0.0.1 net.me=10.0.0.2". */
#include "virtio.h"

#define NET_F_MAC (1UL << 5)
#define NET_F_STATUS (1UL << 16)
#define NET_HDR 12          /* virtio_net_hdr_v1 */
#define RX_BUF 2048
#define ETH_HDR 14
#define ETH_MIN 60
#define ETH_ARP 0x0806
#define ETH_IP 0x0800
#define ECHO_ID 0x4652
#define ECHO_LEN 32
#define ROUNDS 20
#define ROUND_TICKS 1000000000UL

static u8 my_mac[6], host_mac[6], my_ip[4], host_ip[4];
static u8 *rx_buf, *tx_buf;
static u32 frames_in, frames_out;

/* Finds "key=a.b.c.d" on the command line. */
static int cmdline_ip(const char *key, u8 ip[4]) {
    const char *s = kit_cmdline();
    u64 klen = kit_strlen(key);
    for (const char *p = s; *p; p++) {
        if ((p != s && p[-1] != ' ') || kit_strncmp(p, key, klen) || p[klen] != '=') continue;
        const char *q = p + klen + 1;
        for (int i = 0; i < 4; i++) {
            u32 v = 0, digits = 0;
            for (; *q >= '0' && *q <= '9' && digits < 3; q++, digits++) v = v * 10 + (u32)(*q - '0');
            if (!digits || v > 255 || (i < 3 && *q++ != '.')) return 0;
            ip[i] = (u8)v;
        }
        return 1;
    }
    return 0;
}

static void put16(u8 *p, u32 v) { p[0] = (u8)(v >> 8); p[1] = (u8)v; }
static u32 get16(const u8 *p) { return ((u32)p[0] << 8) | p[1]; }
static int same(const u8 *a, const u8 *b, u32 n) { for (u32 i = 0; i < n; i++) if (a[i] != b[i]) return 0; return 1; }

static u32 checksum(const u8 *p, u32 n) {
    u32 sum = 0;
    for (u32 i = 0; i + 1 < n; i += 2) sum += get16(p + i);
    if (n & 1) sum += (u32)p[n - 1] << 8;
    while (sum >> 16) sum = (sum & 0xffff) + (sum >> 16);
    return ~sum & 0xffff;
}

static void print_mac(const char *what, const u8 *m) {
    static const char hex[] = "0123456789abcdef";
    char s[18];
    for (int i = 0; i < 6; i++) {
        s[i * 3] = hex[m[i] >> 4];
        s[i * 3 + 1] = hex[m[i] & 15];
        s[i * 3 + 2] = i < 5 ? ':' : 0;
    }
    kit_printf("%s%s", what, s);
}

static void post_rx(struct vdev *d) {
    u64 addr = (u64)rx_buf; u32 len = RX_BUF; int wr = 1;
    virtio_submit(d, 0, 1, &addr, &len, &wr);
}

/* Waits up to `ticks` for a received frame; returns its length (header included) or 0. */
static u32 poll_rx(struct vdev *d, u64 ticks) {
    struct vq *v = &d->vq[0];
    for (u64 t = rdtsc(); v->used->idx == v->last_used; ) {
        if (rdtsc() - t > ticks) { cli(); return 0; }
        sti();
        cpu_relax();
    }
    cli();
    u32 len = v->used->ring[v->last_used % v->size].len;
    v->last_used++;
    frames_in++;
    return len;
}

/* Sends the Ethernet frame in tx_buf + NET_HDR (padded to the minimum length). */
static int send_frame(struct vdev *d, u32 len) {
    memset(tx_buf, 0, NET_HDR);
    if (len < ETH_MIN) { memset(tx_buf + NET_HDR + len, 0, ETH_MIN - len); len = ETH_MIN; }
    u64 addr = (u64)tx_buf; u32 total = NET_HDR + len; int wr = 0;
    virtio_submit(d, 1, 1, &addr, &total, &wr);
    frames_out++;
    return virtio_wait_used(d, 1) >= 0;
}

static u8 *eth(u8 *frame, const u8 *dst, u32 type) {
    memcpy(frame, dst, 6);
    memcpy(frame + 6, my_mac, 6);
    put16(frame + 12, type);
    return frame + ETH_HDR;
}

static int send_arp(struct vdev *d, u32 op, const u8 *to_mac, const u8 *to_ip) {
    static const u8 broadcast[6] = { 0xff, 0xff, 0xff, 0xff, 0xff, 0xff };
    u8 *a = eth(tx_buf + NET_HDR, op == 1 ? broadcast : to_mac, ETH_ARP);
    put16(a, 1); put16(a + 2, ETH_IP); a[4] = 6; a[5] = 4; put16(a + 6, op);
    memcpy(a + 8, my_mac, 6); memcpy(a + 14, my_ip, 4);
    if (op == 1) memset(a + 18, 0, 6); else memcpy(a + 18, to_mac, 6);
    memcpy(a + 24, to_ip, 4);
    return send_frame(d, ETH_HDR + 28);
}

static void echo_payload(u8 *p) { for (u32 i = 0; i < ECHO_LEN; i++) p[i] = (u8)(0xa5 ^ (i * 7)); }

static int send_echo(struct vdev *d, u32 seq) {
    u8 *ip = eth(tx_buf + NET_HDR, host_mac, ETH_IP);
    u32 icmp_len = 8 + ECHO_LEN, ip_len = 20 + icmp_len;
    memset(ip, 0, 20);
    ip[0] = 0x45; put16(ip + 2, ip_len); put16(ip + 4, seq); ip[8] = 64; ip[9] = 1;
    memcpy(ip + 12, my_ip, 4); memcpy(ip + 16, host_ip, 4);
    put16(ip + 10, checksum(ip, 20));
    u8 *icmp = ip + 20;
    icmp[0] = 8; icmp[1] = 0; put16(icmp + 2, 0); put16(icmp + 4, ECHO_ID); put16(icmp + 6, seq);
    echo_payload(icmp + 8);
    put16(icmp + 2, checksum(icmp, icmp_len));
    return send_frame(d, ETH_HDR + ip_len);
}

/* Looks at one received frame: answers ARP requests for us; returns 1 for an ARP reply from the
 * host (filling host_mac), 2 for our echo reply with the payload intact, 0 otherwise. */
static int handle_frame(struct vdev *d, u32 len, u32 seq) {
    u8 *f = rx_buf + NET_HDR;
    if (len < NET_HDR + ETH_HDR) return 0;
    len -= NET_HDR;
    u32 type = get16(f + 12);
    if (type == ETH_ARP && len >= ETH_HDR + 28) {
        u8 *a = f + ETH_HDR, sender_mac[6], sender_ip[4];
        u32 op = get16(a + 6);
        if (op == 1 && same(a + 24, my_ip, 4)) {
            memcpy(sender_mac, a + 8, 6); memcpy(sender_ip, a + 14, 4);
            send_arp(d, 2, sender_mac, sender_ip);
            return 0;
        }
        if (op == 2 && same(a + 14, host_ip, 4) && same(a + 24, my_ip, 4) && same(f, my_mac, 6)) {
            memcpy(host_mac, a + 8, 6);
            return 1;
        }
        return 0;
    }
    if (type == ETH_IP && len >= ETH_HDR + 20 + 8 + ECHO_LEN) {
        u8 *ip = f + ETH_HDR, *icmp = ip + (ip[0] & 15) * 4;
        if (ip[9] != 1 || !same(ip + 12, host_ip, 4) || !same(ip + 16, my_ip, 4)) return 0;
        if (icmp + 8 + ECHO_LEN > f + len || icmp[0] != 0 || get16(icmp + 4) != ECHO_ID || get16(icmp + 6) != seq) return 0;
        u8 want[ECHO_LEN];
        echo_payload(want);
        if (!same(icmp + 8, want, ECHO_LEN)) { kit_puts("virtio-net: echo reply payload differs\n"); return 0; }
        if (checksum(icmp, 8 + ECHO_LEN)) { kit_puts("virtio-net: echo reply checksum is wrong\n"); return 0; }
        return 2;
    }
    return 0;
}

/* Sends with `send` each round until handle_frame returns `want`. */
static int exchange(struct vdev *d, int want, u32 seq) {
    for (u32 round = 0; round < ROUNDS; round++) {
        if (want == 1 ? !send_arp(d, 1, 0, host_ip) : !send_echo(d, seq)) return 0;
        for (u64 t = rdtsc(); rdtsc() - t < ROUND_TICKS;) {
            u32 len = poll_rx(d, ROUND_TICKS);
            if (!len) break;
            int got = handle_frame(d, len, seq);
            post_rx(d);
            if (got == want) return 1;
        }
    }
    return 0;
}

int virtio_test_net(struct vdev *d) {
    int rc = virtio_init(d, NET_F_MAC | NET_F_STATUS, 2);
    if (rc) { kit_printf("virtio-net: init failed at step %d\n", rc); return 1; }
    for (int i = 0; i < 6; i++) my_mac[i] = virtio_config8(d, (u64)i);
    u32 status = virtio_config8(d, 6) | ((u32)virtio_config8(d, 7) << 8);
    print_mac("virtio-net: mac ", my_mac);
    kit_printf(", link %s\n", (status & 1) ? "up" : "down");
    if (!cmdline_ip("net.ip", host_ip) || !cmdline_ip("net.me", my_ip)) {
        kit_puts("virtio-net: give net.ip=HOST net.me=GUEST (dotted quads) on the command line\n");
        return 1;
    }
    rx_buf = virtio_scratch;
    tx_buf = virtio_scratch + 4096;
    post_rx(d);
    if (!exchange(d, 1, 0)) { kit_puts("virtio-net: no ARP reply from the host\n"); return 1; }
    kit_printf("virtio-net: arp reply: %u.%u.%u.%u is at ", host_ip[0], host_ip[1], host_ip[2], host_ip[3]);
    print_mac("", host_mac);
    kit_puts("\n");
    if (!exchange(d, 2, 1)) { kit_puts("virtio-net: no ICMP echo reply from the host\n"); return 1; }
    kit_printf("virtio-net: icmp echo reply from %u.%u.%u.%u, %u bytes payload intact\n",
               host_ip[0], host_ip[1], host_ip[2], host_ip[3], ECHO_LEN);
    kit_printf("virtio-net: frames out %u in %u, irqs %u\n", frames_out, frames_in, d->irqs);
    return (status & 1) && d->irqs > 0 ? 0 : 1;
}
