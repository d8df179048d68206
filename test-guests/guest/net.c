/*
 * rt.net=A.B.C.D: a polling virtio-net driver that answers ARP requests and ICMP echo requests
 * for its IPv4 address and nothing else. The address comes from the identity page (offset 112,
 * network order) when the VMM announced one, else from the command line; after a restore (a new
 * identity generation) it re-reads the address and the MAC (config space), so every clone of
 * one template answers for its own address. Reports: "PASS net_ready ip=A mac=M" once, then
 * "PASS net_resumed ip=A mac=M gen=G echoes=N" after each restore. Never returns.
 * Every instruction is emulated on our hosts (~1 us): the reply is built in place, the ICMP
 * checksum updated incrementally, and only the transmit notification exits.
 */
typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long u64;

#define IDENTITY_PAGE 0x9e000UL
#define NQ 8
#define BUF 2048
#define HDR 12
#define F_MAC (1u << 5)
#define F_MRG_RXBUF (1u << 15)

struct desc { u64 addr; u32 len; u16 flags; u16 next; };
struct ring {
    struct desc desc[NQ] __attribute__((aligned(4096)));
    struct { u16 flags, idx, ring[NQ], used_event; } avail __attribute__((aligned(4096)));
    struct { u16 flags, idx; struct { u32 id, len; } ring[NQ]; } used __attribute__((aligned(4096)));
    u16 last_used;
};
static struct ring rxq __attribute__((aligned(4096))), txq __attribute__((aligned(4096)));
static u8 rxbuf[NQ][BUF] __attribute__((aligned(4096)));
static u8 txbuf[NQ][BUF] __attribute__((aligned(4096)));
static u64 base;
static u8 mac[6];
static u8 ip[4];
static u64 echoes;

static u32 rd(u32 off) { return *(volatile u32 *)(base + off); }
static void wr(u32 off, u32 v) { *(volatile u32 *)(base + off) = v; }
static void mb(void) { __asm__ volatile("mfence" ::: "memory"); }

/* ---- reports (own buffer: this file does not share main.c's statics) ---- */
static char nbuf[160];
static u32 nlen;
static void n_str(const char *s) { while (*s && nlen < sizeof nbuf - 1) nbuf[nlen++] = *s++; }
static void n_dec(u64 v) {
    char t[21]; int k = 0;
    do { t[k++] = '0' + v % 10; v /= 10; } while (v);
    while (k && nlen < sizeof nbuf - 1) nbuf[nlen++] = t[--k];
}
static void n_hex2(u8 v) { n_str((char[]){"0123456789abcdef"[v >> 4], "0123456789abcdef"[v & 15], 0}); }
static void n_send(void) {
    nbuf[nlen] = 0;
    __asm__ volatile("outl %0, %1" ::"a"((u32)(u64)nbuf), "Nd"((u16)0xf4));
    nlen = 0;
}
static void n_addr(void) {
    n_str(" ip=");
    for (int i = 0; i < 4; i++) { n_dec(ip[i]); if (i < 3) n_str("."); }
    n_str(" mac=");
    for (int i = 0; i < 6; i++) { n_hex2(mac[i]); if (i < 5) n_str(":"); }
}
static void n_fail(const char *why) { n_str("FAIL net: "); n_str(why); n_send(); }

/* ---- addresses ---- */
static int parse_ip(const char *s, u8 *out) {
    for (int i = 0; i < 4; i++) {
        u32 v = 0, digits = 0;
        while (*s >= '0' && *s <= '9' && digits < 3) { v = v * 10 + (u32)(*s++ - '0'); digits++; }
        if (!digits || v > 255) return 0;
        out[i] = (u8)v;
        if (i < 3 && *s++ != '.') return 0;
    }
    return 1;
}

/* The identity page's address wins when the VMM announced one. */
static void load_identity(void) {
    const volatile u8 *id = (const volatile u8 *)(IDENTITY_PAGE + 112);
    if (id[0] | id[1] | id[2] | id[3])
        for (int i = 0; i < 4; i++) ip[i] = id[i];
    u32 lo = rd(0x100), hi = rd(0x104);
    for (int i = 0; i < 4; i++) mac[i] = (u8)(lo >> (8 * i));
    mac[4] = (u8)hi;
    mac[5] = (u8)(hi >> 8);
}

/* ---- queues ---- */
static void setup(struct ring *q, u32 index) {
    wr(0x30, index);
    wr(0x38, NQ);
    wr(0x80, (u32)(u64)q->desc);   wr(0x84, 0);
    wr(0x90, (u32)(u64)&q->avail); wr(0x94, 0);
    wr(0xa0, (u32)(u64)&q->used);  wr(0xa4, 0);
    wr(0x44, 1);
}

static void post_rx(u16 i) {
    rxq.desc[i] = (struct desc){(u64)rxbuf[i], BUF, 2 /* WRITE */, 0};
    rxq.avail.ring[rxq.avail.idx % NQ] = i;
    mb();
    rxq.avail.idx++;
    mb();
    /* The device asks for notifications only when it ran out of buffers. */
    if (!(*(volatile u16 *)&rxq.used.flags & 1)) wr(0x50, 0);
}

static void send(u16 slot, u32 len) {
    txq.desc[slot] = (struct desc){(u64)txbuf[slot], len, 0, 0};
    txq.avail.ring[txq.avail.idx % NQ] = slot;
    mb();
    txq.avail.idx++;
    mb();
    wr(0x50, 1);
}

static const char *init(void) {
    wr(0x70, 0);
    wr(0x70, 1 | 2);
    wr(0x14, 0);
    u32 f0 = rd(0x10);
    wr(0x14, 1);
    if (!(rd(0x10) & 1)) return "device lacks VERSION_1";
    if (!(f0 & F_MAC)) return "device offers no MAC";
    wr(0x24, 0); wr(0x20, f0 & (F_MAC | F_MRG_RXBUF));
    wr(0x24, 1); wr(0x20, 1);
    wr(0x70, 1 | 2 | 8);
    if (!(rd(0x70) & 8)) return "FEATURES_OK refused";
    setup(&rxq, 0);
    setup(&txq, 1);
    wr(0x70, 1 | 2 | 8 | 4);
    if (rd(0x70) & 0x40) return "device needs reset";
    for (u16 i = 0; i < NQ; i++) post_rx(i);
    return 0;
}

static int mine(const u8 *a) { return a[0] == ip[0] && a[1] == ip[1] && a[2] == ip[2] && a[3] == ip[3]; }
static void cp(u8 *d, const u8 *s, u32 n) { while (n--) *d++ = *s++; }

/* Builds the answer to frame `f` (length n, after the virtio header) in `o`; its length or 0. */
static u32 answer(const u8 *f, u32 n, u8 *o) {
    if (n < 42) return 0;
    u16 type = (u16)(f[12] << 8 | f[13]);
    if (type == 0x0806) {
        /* ARP request for our address (Ethernet/IPv4 only). */
        if (f[14] || f[15] != 1 || f[16] != 8 || f[17] || f[20] || f[21] != 1 || !mine(f + 38)) return 0;
        cp(o, f + 6, 6); cp(o + 6, mac, 6); cp(o + 12, f + 12, 8);
        o[20] = 0; o[21] = 2;                  /* op: reply */
        cp(o + 22, mac, 6); cp(o + 28, ip, 4);
        cp(o + 32, f + 22, 10);
        return 42;
    }
    if (type != 0x0800 || f[14] != 0x45 || f[23] != 1 || !mine(f + 30)) return 0;
    u32 total = (u32)(f[16] << 8 | f[17]);
    if (total < 28 || 14 + total > n || f[34] != 8) return 0;
    /* Echo reply: swap addresses (the IP checksum stays valid), type 8 -> 0 (incremental). */
    cp(o, f + 6, 6); cp(o + 6, mac, 6);
    cp(o + 12, f + 12, 14 + total - 12);
    cp(o + 26, f + 30, 4); cp(o + 30, f + 26, 4);
    o[34] = 0;
    u32 sum = (u32)(o[36] << 8 | o[37]) + 0x0800;
    sum = (sum & 0xffff) + (sum >> 16);
    o[36] = (u8)(sum >> 8); o[37] = (u8)sum;
    echoes++;
    return 14 + total;
}

void task_net(u64 mmio_base, const char *arg) {
    base = mmio_base;
    if (!base) { n_fail("no virtio-net device announced"); return; }
    if (!parse_ip(arg, ip)) { n_fail("rt.net wants an IPv4 address"); return; }
    const char *why = init();
    if (why) { n_fail(why); return; }
    volatile const u64 *gen = (volatile const u64 *)(IDENTITY_PAGE + 8);
    u64 seen = *gen;
    load_identity();
    n_str("PASS net_ready"); n_addr(); n_send();
    u16 tx_slot = 0;
    for (;;) {
        if (*gen != seen) {
            seen = *gen;
            load_identity();
            n_str("PASS net_resumed"); n_addr();
            n_str(" gen="); n_dec(seen);
            n_str(" echoes="); n_dec(echoes);
            n_send();
        }
        if (*(volatile u16 *)&rxq.used.idx == rxq.last_used) continue;
        mb();
        u16 u = rxq.last_used++ % NQ;
        u32 id = rxq.used.ring[u].id % NQ, len = rxq.used.ring[u].len;
        if (len > HDR && len <= BUF) {
            /* Reclaim a transmit slot the device finished with before reusing it. */
            while ((u16)(txq.avail.idx - *(volatile u16 *)&txq.used.idx) >= NQ) mb();
            u32 n = answer(rxbuf[id] + HDR, len - HDR, txbuf[tx_slot] + HDR);
            if (n) {
                for (int i = 0; i < HDR; i++) txbuf[tx_slot][i] = 0;
                send(tx_slot, HDR + n);
                tx_slot = (tx_slot + 1) % NQ;
            }
        }
        post_rx((u16)id);
    }
}
