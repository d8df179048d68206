/*
 * runv test guest: boots through the Linux 64-bit boot protocol, reads its tasks from the kernel
 * command line (rt.* tokens, see docs/ARCHITECTURE.md) and reports over the debug port 0xf4.
 * Every instruction runs emulated (~1 us) on our development hosts: keep loops short.
 */
typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long u64;

#define ZP_E820_ENTRIES 0x1e8
#define ZP_E820_TABLE 0x2d0
#define ZP_RAMDISK_IMAGE 0x218
#define ZP_RAMDISK_SIZE 0x21c
#define ZP_CMD_LINE_PTR 0x228
#define IDENTITY_PAGE 0x9e000UL
#define MPTABLE_AREA 0x9fc00UL

static inline void outb(u16 port, u8 v) { __asm__ volatile("outb %0, %1" ::"a"(v), "Nd"(port)); }
static inline void outl(u16 port, u32 v) { __asm__ volatile("outl %0, %1" ::"a"(v), "Nd"(port)); }
static inline u8 inb(u16 port) { u8 v; __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port)); return v; }
static inline u64 rdmsr(u32 msr) {
    u32 lo, hi;
    __asm__ volatile("rdmsr" : "=a"(lo), "=d"(hi) : "c"(msr));
    return ((u64)hi << 32) | lo;
}

/* ---- reports --------------------------------------------------------------------------- */
static char rbuf[512];
static u32 rlen;

/* Every guest instruction is emulated on our development hosts (~1 us each): the report
 * builders keep the length in a register instead of re-reading `rlen` after each byte store. */
static void r_str(const char *s) {
    u32 n = rlen;
    while (*s && n < sizeof(rbuf) - 1) rbuf[n++] = *s++;
    rlen = n;
}
static void r_digits(const char *t, int k) {
    u32 n = rlen;
    while (k && n < sizeof(rbuf) - 1) rbuf[n++] = t[--k];
    rlen = n;
}
static void r_dec(u64 v) {
    char t[21]; int k = 0;
    do { t[k++] = '0' + v % 10; v /= 10; } while (v);
    r_digits(t, k);
}
static void r_hex(u64 v) {
    char t[17]; int k = 0;
    do { t[k++] = "0123456789abcdef"[v & 15]; v >>= 4; } while (v);
    r_digits(t, k);
}
/* One OUT per report: the VMM reads the string from our memory. */
static void r_send(void) {
    rbuf[rlen] = 0;
    outl(0xf4, (u32)(u64)rbuf);
    rlen = 0;
}
static void report(const char *s) { r_str(s); r_send(); }
static void fail(const char *task, const char *why) {
    r_str("FAIL "); r_str(task); r_str(": "); r_str(why); r_send();
}

/* ---- command line ---------------------------------------------------------------------- */
static const char *cmdline;

static int prefix(const char *s, const char *p) { while (*p) if (*s++ != *p++) return 0; return 1; }

/* Finds token `key` (exactly, or followed by '=') at or after `s`; returns a pointer past the
 * key or 0. */
static const char *find_token_from(const char *s, const char *key) {
    while (s && *s) {
        while (*s == ' ') s++;
        if (prefix(s, key)) {
            const char *e = s; const char *k = key;
            while (*k) { k++; e++; }
            if (*e == 0 || *e == ' ' || *e == '=') return e;
        }
        while (*s && *s != ' ') s++;
    }
    return 0;
}

static const char *find_token(const char *key) { return find_token_from(cmdline, key); }

static u32 fnv1a(const u8 *p, u64 n) {
    u32 h = 0x811c9dc5;
    while (n--) { h ^= *p++; h *= 0x01000193; }
    return h;
}

/* ---- tasks ----------------------------------------------------------------------------- */
static u32 count_mp_cpus(void) {
    for (u64 a = MPTABLE_AREA; a < 0xa0000; a += 16) {
        const u8 *f = (const u8 *)a;
        if (!prefix((const char *)f, "_MP_")) continue;
        u8 sum = 0;
        for (int i = 0; i < 16; i++) sum += f[i];
        if (sum) return 0;
        const u8 *t = (const u8 *)(u64)*(const u32 *)(f + 4);
        if (!prefix((const char *)t, "PCMP")) return 0;
        u16 len = *(const u16 *)(t + 4);
        sum = 0;
        for (u32 i = 0; i < len; i++) sum += t[i];
        if (sum) return 0;
        u16 count = *(const u16 *)(t + 34);
        const u8 *e = t + 44;
        u32 cpus = 0;
        for (u16 i = 0; i < count && e < t + len; i++) {
            if (e[0] == 0) { cpus++; e += 20; } else e += 8;
        }
        return cpus;
    }
    return 0;
}

/* What either boot protocol handed us. */
struct boot_info {
    int pvh;
    u64 ram;
    u32 e820;
    u64 initrd, initrd_size;
};

static void read_boot_info(const u8 *p, int pvh, struct boot_info *bi) {
    bi->pvh = pvh;
    bi->ram = 0;
    if (pvh) {
        /* struct hvm_start_info: modlist_paddr 16, memmap_paddr 40, memmap_entries 48. */
        u32 n = *(const u32 *)(p + 48);
        const u8 *map = (const u8 *)*(const u64 *)(p + 40);
        for (u32 i = 0; i < n && i < 128; i++)
            if (*(const u32 *)(map + 24 * i + 16) == 1) bi->ram += *(const u64 *)(map + 24 * i + 8);
        bi->e820 = n;
        const u8 *mod = (const u8 *)*(const u64 *)(p + 16);
        bi->initrd = *(const u32 *)(p + 12) ? *(const u64 *)mod : 0;
        bi->initrd_size = bi->initrd ? *(const u64 *)(mod + 8) : 0;
    } else {
        u8 n = p[ZP_E820_ENTRIES];
        for (u8 i = 0; i < n && i < 128; i++) {
            const u8 *e = p + ZP_E820_TABLE + 20 * i;
            if (*(const u32 *)(e + 16) == 1) bi->ram += *(const u64 *)(e + 8);
        }
        bi->e820 = n;
        bi->initrd = *(const u32 *)(p + ZP_RAMDISK_IMAGE);
        bi->initrd_size = *(const u32 *)(p + ZP_RAMDISK_SIZE);
    }
}

static void task_boot(const struct boot_info *bi) {
    u64 cr0, cr4;
    u16 cs;
    __asm__ volatile("mov %%cr0, %0" : "=r"(cr0));
    __asm__ volatile("mov %%cr4, %0" : "=r"(cr4));
    __asm__ volatile("mov %%cs, %0" : "=r"(cs));
    u64 efer = rdmsr(0xc0000080);
    if (!(cr0 & 1) || !(cr0 & (1UL << 31))) { fail("boot", "paging or protection off"); return; }
    if (!(cr4 & (1 << 5))) { fail("boot", "CR4.PAE off"); return; }
    if (!(efer & (1 << 10))) { fail("boot", "EFER.LMA off"); return; }
    if (cs != 0x10) { fail("boot", "CS is not 0x10"); return; }
    /* The identity map covers the first GiB: the top of it must read back what we write. */
    volatile u64 *probe = (volatile u64 *)(0x3ffffff8UL);
    (void)probe;
    if (bi->e820 == 0 || bi->e820 > 128) { fail("boot", "bad e820 entry count"); return; }
    u64 cl = 0;
    while (cmdline[cl]) cl++;
    u64 rd = bi->initrd, rs = bi->initrd_size;
    const u32 *id = (const u32 *)IDENTITY_PAGE;
    if (id[0] != 0x564e5552) { fail("boot", "identity page magic missing"); return; }
    r_str("PASS boot proto="); r_str(bi->pvh ? "pvh" : "linux64");
    r_str(" ram="); r_dec(bi->ram);
    r_str(" e820="); r_dec(bi->e820);
    r_str(" cmdline_len="); r_dec(cl);
    r_str(" initrd_size="); r_dec(rs);
    r_str(" initrd_sum="); r_hex(rs ? fnv1a((const u8 *)rd, rs) : 0);
    r_str(" cpus="); r_dec(count_mp_cpus());
    r_str(" gen="); r_dec(*(const u64 *)(IDENTITY_PAGE + 8));
    r_send();
}

static void serial_putc(char c) {
    for (int i = 0; i < 1000 && !(inb(0x3f8 + 5) & 0x20); i++) {}
    outb(0x3f8, c);
}

static void task_serial(const char *arg) {
    u32 n = 0;
    for (; *arg && *arg != ' '; arg++, n++) serial_putc(*arg);
    serial_putc('\r');
    serial_putc('\n');
    r_str("PASS serial bytes="); r_dec(n); r_send();
}

/* ---- virtio-mmio (modern) polling driver ---------------------------------------------- */
#define VQ_SIZE 8
#define VRING_NEXT 1
#define VRING_WRITE 2

struct vq_desc { u64 addr; u32 len; u16 flags; u16 next; };
/* One split virtqueue: descriptor table, driver and device areas on their own pages. */
struct vq {
    struct vq_desc desc[VQ_SIZE] __attribute__((aligned(4096)));
    struct { u16 flags, idx, ring[VQ_SIZE], used_event; } avail __attribute__((aligned(4096)));
    struct { u16 flags, idx; struct { u32 id, len; } ring[VQ_SIZE]; } used __attribute__((aligned(4096)));
    u16 last_used;
    u16 index;
};
static struct vq vqs[3] __attribute__((aligned(4096)));
static u64 vio_base;

static u32 vio_rd(u32 off) { return *(volatile u32 *)(vio_base + off); }
static void vio_wr(u32 off, u32 v) { *(volatile u32 *)(vio_base + off) = v; }
static void barrier(void) { __asm__ volatile("mfence" ::: "memory"); }

static u64 parse_hex(const char *s) {
    u64 v = 0;
    if (s[0] == '0' && s[1] == 'x') s += 2;
    for (;; s++) {
        u8 c = *s;
        if (c >= '0' && c <= '9') v = v * 16 + (c - '0');
        else if (c >= 'a' && c <= 'f') v = v * 16 + (c - 'a' + 10);
        else return v;
    }
}

static u64 parse_dec(const char *s) {
    u64 v = 0;
    while (*s >= '0' && *s <= '9') v = v * 10 + (u64)(*s++ - '0');
    return v;
}

/* The boot identity map covers the first GiB; map 3..4 GiB (MMIO gap) uncached with 2 MiB pages. */
static u64 mmio_pd[512] __attribute__((aligned(4096)));
static void map_mmio_gap(void) {
    static int done;
    if (done) return;
    u64 cr3;
    __asm__ volatile("mov %%cr3, %0" : "=r"(cr3));
    u64 *pml4 = (u64 *)(cr3 & ~0xfffUL);
    u64 *pdpt = (u64 *)(pml4[0] & ~0xfffUL);
    for (u64 i = 0; i < 512; i++) mmio_pd[i] = (0xc0000000UL + (i << 21)) | 0x9b; /* P RW PWT PCD PS */
    pdpt[3] = (u64)mmio_pd | 3;
    __asm__ volatile("mov %0, %%cr3" ::"r"(cr3) : "memory");
    done = 1;
}

/* Finds the n-th announced virtio-mmio device of type `id`; sets vio_base. */
static int vio_find(u32 id) {
    const char *s = cmdline;
    map_mmio_gap();
    while ((s = find_token_from(s, "virtio_mmio.device"))) {
        const char *at = s;
        while (*at && *at != '@' && *at != ' ') at++;
        if (*at != '@') continue;
        vio_base = parse_hex(at + 1);
        if (vio_rd(0) == 0x74726976 && vio_rd(4) == 2 && vio_rd(8) == id) return 1;
    }
    return 0;
}

/* Reset, negotiate VERSION_1 only, set up `nqueues` queues, DRIVER_OK. Returns 0 or a failure. */
static const char *vio_init(u32 nqueues) {
    vio_wr(0x70, 0);
    vio_wr(0x70, 1 | 2);                  /* ACKNOWLEDGE | DRIVER */
    vio_wr(0x14, 1);
    if (!(vio_rd(0x10) & 1)) return "device lacks VERSION_1";
    vio_wr(0x24, 0); vio_wr(0x20, 0);
    vio_wr(0x24, 1); vio_wr(0x20, 1);     /* VIRTIO_F_VERSION_1 */
    vio_wr(0x70, 1 | 2 | 8);
    if (!(vio_rd(0x70) & 8)) return "FEATURES_OK refused";
    for (u32 i = 0; i < nqueues; i++) {
        struct vq *q = &vqs[i];
        q->index = i;
        vio_wr(0x30, i);
        if (vio_rd(0x34) < VQ_SIZE) return "queue too small";
        vio_wr(0x38, VQ_SIZE);
        vio_wr(0x80, (u32)(u64)q->desc);   vio_wr(0x84, 0);
        vio_wr(0x90, (u32)(u64)&q->avail); vio_wr(0x94, 0);
        vio_wr(0xa0, (u32)(u64)&q->used);  vio_wr(0xa4, 0);
        vio_wr(0x44, 1);
        q->last_used = q->used.idx;
    }
    vio_wr(0x70, 1 | 2 | 8 | 4);          /* DRIVER_OK */
    if (vio_rd(0x70) & 0x40) return "device needs reset";
    return 0;
}

/* Makes chain `head` available and notifies the device. */
static void vq_publish(struct vq *q, u16 head) {
    q->avail.ring[q->avail.idx % VQ_SIZE] = head;
    barrier();
    q->avail.idx++;
    barrier();
    vio_wr(0x50, q->index);
}

/* Polls for the next used element (bounded); returns its index in the used ring or -1. */
static int vq_poll(struct vq *q, u32 spins) {
    for (u32 spin = 0; spin < spins; spin++) {
        barrier();
        if (*(volatile u16 *)&q->used.idx != q->last_used)
            return q->last_used++ % VQ_SIZE;
    }
    return -1;
}

static int vq_submit(struct vq *q, u16 head) {
    vq_publish(q, head);
    return vq_poll(q, 2000000) >= 0;
}

static struct { u32 type, reserved; u64 sector; } blk_hdr;
static u8 blk_status;
static u8 blk_buf[512] __attribute__((aligned(512)));

/* One block request; data may be empty. Returns the status byte, or 0xfe on timeout. */
static u8 blk_request(u32 type, u64 sector, u32 len, int device_writes) {
    blk_hdr.type = type;
    blk_hdr.sector = sector;
    blk_status = 0xff;
    struct vq *q = &vqs[0];
    q->desc[0] = (struct vq_desc){(u64)&blk_hdr, 16, VRING_NEXT, len ? 1 : 2};
    q->desc[1] = (struct vq_desc){(u64)blk_buf, len, VRING_NEXT | (device_writes ? VRING_WRITE : 0), 2};
    q->desc[2] = (struct vq_desc){(u64)&blk_status, 1, VRING_WRITE, 0};
    return vq_submit(q, 0) ? blk_status : 0xfe;
}

static void task_blk(void) {
    const char *why;
    if (!vio_find(2)) { fail("blk", "no virtio-blk device announced"); return; }
    if ((why = vio_init(1))) { fail("blk", why); return; }
    u8 st = blk_request(0, 0, 512, 1);
    if (st) { r_str("FAIL blk: read status "); r_dec(st); r_send(); return; }
    u32 sum0 = fnv1a(blk_buf, 512);
    for (u32 i = 0; i < 512; i++) blk_buf[i] = (u8)(i & 0xff) ^ 0x5a;
    u8 wst = blk_request(1, 1, 512, 0);
    u8 fst = blk_request(4, 0, 0, 0);
    for (u32 i = 0; i < 21; i++) blk_buf[i] = 0;
    u8 ist = blk_request(8, 0, 20, 1);
    if (ist) { r_str("FAIL blk: get-id status "); r_dec(ist); r_send(); return; }
    r_str("PASS blk sum0="); r_hex(sum0);
    r_str(" id="); r_str((const char *)blk_buf);
    r_str(" write="); r_dec(wst);
    r_str(" flush="); r_dec(fst);
    r_send();
}

/* ---- rt.blk_watch[=N]: disk slot hot swap ---------------------------------------------- */
/* Drives the first virtio-blk device (slot 0), reports "PASS blk_watching capacity=C", then
 * polls its config generation (at most N thousand polls per change, default 20000) until it
 * moves: reads the capacity (generation-consistent), the interrupt status (bit 1: configuration
 * change; acknowledged), the serial (GET_ID) and sector 0, and reports "PASS blk_attached
 * capacity=C serial=S sum0=HEX config_irq=0|1"; then waits for the next change and reports
 * "PASS blk_detached capacity=C config_irq=0|1". Survives a snapshot: a clone keeps polling. */
static u64 blk_capacity(void) { return vio_rd(0x100) | ((u64)vio_rd(0x104) << 32); }

/* Polls until the generation differs from *gen; 1 with *gen, *cap and *irq updated. */
static int blk_wait_change(u32 *gen, u64 *cap, u32 *irq, u64 budget) {
    for (u64 i = 0; i < budget; i++) {
        u32 g = vio_rd(0xfc);
        if (g == *gen) continue;
        u64 c;
        do { g = vio_rd(0xfc); c = blk_capacity(); } while (g != vio_rd(0xfc));
        *gen = g; *cap = c;
        *irq = (vio_rd(0x60) >> 1) & 1;
        vio_wr(0x64, 2);
        return 1;
    }
    return 0;
}

static void task_blk_watch(u64 budget) {
    const char *why;
    if (!vio_find(2)) { fail("blk_watch", "no virtio-blk device announced"); return; }
    if ((why = vio_init(1))) { fail("blk_watch", why); return; }
    u32 gen = vio_rd(0xfc), irq = 0;
    u64 cap = blk_capacity();
    r_str("PASS blk_watching capacity="); r_dec(cap); r_send();
    if (!blk_wait_change(&gen, &cap, &irq, budget)) { fail("blk_watch", "no attach in time"); return; }
    static char serial[21];
    for (u32 i = 0; i < 21; i++) blk_buf[i] = 0;
    u8 st = blk_request(8, 0, 20, 1);
    if (st) { r_str("FAIL blk_watch: get-id status "); r_dec(st); r_send(); return; }
    for (u32 i = 0; i < 21; i++) serial[i] = (char)blk_buf[i];
    u32 sum0 = 0;
    if (cap) {
        st = blk_request(0, 0, 512, 1);
        if (st) { r_str("FAIL blk_watch: read status "); r_dec(st); r_send(); return; }
        sum0 = fnv1a(blk_buf, 512);
    }
    r_str("PASS blk_attached capacity="); r_dec(cap);
    r_str(" serial="); r_str(serial);
    r_str(" sum0="); r_hex(sum0);
    r_str(" config_irq="); r_dec(irq);
    r_send();
    if (!blk_wait_change(&gen, &cap, &irq, budget)) { fail("blk_watch", "no detach in time"); return; }
    r_str("PASS blk_detached capacity="); r_dec(cap);
    r_str(" config_irq="); r_dec(irq);
    r_send();
}

/* ---- SMP: INIT-SIPI-SIPI every AP of the MP table ------------------------------------- */
extern const u8 ap_tramp_start[], ap_tramp_end[];
#define AP_TRAMPOLINE 0x6000UL
#define LAPIC 0xfee00000UL

static void lapic_wr(u32 off, u32 v) { *(volatile u32 *)(LAPIC + off) = v; }

static void task_smp(void) {
    u32 cpus = count_mp_cpus();
    if (!cpus) { fail("smp", "no MP table"); return; }
    map_mmio_gap();
    volatile u16 *count = (volatile u16 *)(AP_TRAMPOLINE + 0xff0);
    volatile u32 *mask = (volatile u32 *)(AP_TRAMPOLINE + 0xff4);
    *count = 0;
    *mask = 1; /* the BSP, APIC id 0 */
    u8 *dst = (u8 *)AP_TRAMPOLINE;
    for (const u8 *p = ap_tramp_start; p < ap_tramp_end; p++) *dst++ = *p;
    lapic_wr(0xf0, 0x1ff); /* spurious vector register: APIC software-enabled */
    for (u32 id = 1; id < cpus; id++) {
        lapic_wr(0x310, id << 24);
        lapic_wr(0x300, 0x4500);                          /* INIT, assert */
        for (int sipi = 0; sipi < 2; sipi++) {
            lapic_wr(0x310, id << 24);
            lapic_wr(0x300, 0x4600 | (AP_TRAMPOLINE >> 12)); /* STARTUP */
        }
    }
    for (u32 spin = 0; spin < 2000000 && *count < cpus - 1; spin++) barrier();
    if (*count != cpus - 1) {
        r_str("FAIL smp: "); r_dec(*count); r_str(" of "); r_dec(cpus - 1); r_str(" APs started");
        r_send();
        return;
    }
    r_str("PASS smp cpus="); r_dec(1 + *count);
    r_str(" apic_mask="); r_hex(*mask);
    r_send();
}

/* ---- virtio-vsock: rx queue 0 (buffers always posted), tx queue 1, event queue 2 --------- */
struct vsock_hdr {
    u64 src_cid, dst_cid;
    u32 src_port, dst_port, len;
    u16 type, op;
    u32 flags, buf_alloc, fwd_cnt;
} __attribute__((packed));
enum { OP_REQUEST = 1, OP_RESPONSE, OP_RST, OP_SHUTDOWN, OP_RW, OP_CREDIT_UPDATE };
#define RXBUF 4096
static u8 vs_rx[VQ_SIZE][RXBUF] __attribute__((aligned(4096)));
static struct vsock_hdr vs_txh;
static u64 vs_cid;
static u32 vs_fwd_cnt;

static void vs_post_rx(u16 i) {
    vqs[0].desc[i] = (struct vq_desc){(u64)vs_rx[i], RXBUF, VRING_WRITE, 0};
    vq_publish(&vqs[0], i);
}

static const char *vs_init(void) {
    const char *why;
    if (!vio_find(19)) return "no virtio-vsock device announced";
    if ((why = vio_init(3))) return why;
    vs_cid = vio_rd(0x100) | ((u64)vio_rd(0x104) << 32);
    for (u16 i = 0; i < VQ_SIZE; i++) vs_post_rx(i);
    return 0;
}

/* Sends one packet; header and payload in separate descriptors, as a driver may. */
static int vs_send(u32 sport, u32 dport, u16 op, u32 flags, const u8 *data, u32 len) {
    struct vq *q = &vqs[1];
    vs_txh = (struct vsock_hdr){vs_cid, 2, sport, dport, len, 1, op, flags, 65536, vs_fwd_cnt};
    q->desc[0] = (struct vq_desc){(u64)&vs_txh, sizeof vs_txh, len ? VRING_NEXT : 0, 1};
    q->desc[1] = (struct vq_desc){(u64)data, len, 0, 0};
    return vq_submit(q, 0);
}

/* Waits for the next rx packet; returns its buffer index or -1 on timeout. */
static int vs_recv(void) {
    int slot = vq_poll(&vqs[0], 20000000);
    return slot < 0 ? -1 : (int)vqs[0].used.ring[slot].id;
}

static void task_vsock_listen(u32 port) {
    const char *why;
    if ((why = vs_init())) { fail("vsock_listen", why); return; }
    u64 bytes = 0;
    u32 peer = 0;
    for (;;) {
        int b = vs_recv();
        if (b < 0) { fail("vsock_listen", "timed out waiting for the host"); return; }
        struct vsock_hdr *h = (struct vsock_hdr *)vs_rx[b];
        if (h->op == OP_REQUEST && h->dst_port == port) {
            peer = h->src_port;
            vs_send(port, peer, OP_RESPONSE, 0, 0, 0);
        } else if (h->op == OP_RW && h->src_port == peer) {
            vs_fwd_cnt += h->len;
            bytes += h->len;
            vs_send(port, peer, OP_RW, 0, vs_rx[b] + sizeof *h, h->len);
        } else if (h->op == OP_SHUTDOWN || h->op == OP_RST) {
            if (h->op == OP_SHUTDOWN) vs_send(port, peer, OP_RST, 0, 0, 0);
            vs_post_rx(b);
            break;
        }
        vs_post_rx(b);
    }
    r_str("PASS vsock_listen bytes="); r_dec(bytes); r_send();
}

static u8 vs_pattern[4096];

static void task_vsock_connect(u32 port) {
    const char *why;
    if ((why = vs_init())) { fail("vsock_connect", why); return; }
    const u32 me = 1234;
    vs_send(me, port, OP_REQUEST, 0, 0, 0);
    int b = vs_recv();
    if (b < 0 || ((struct vsock_hdr *)vs_rx[b])->op != OP_RESPONSE) {
        fail("vsock_connect", "no RESPONSE from the host");
        return;
    }
    vs_post_rx(b);
    for (u32 i = 0; i < sizeof vs_pattern; i++) vs_pattern[i] = (u8)(i * 7 + 1);
    vs_send(me, port, OP_RW, 0, vs_pattern, sizeof vs_pattern);
    u32 got = 0;
    while (got < sizeof vs_pattern) {
        b = vs_recv();
        if (b < 0) { fail("vsock_connect", "echo timed out"); return; }
        struct vsock_hdr *h = (struct vsock_hdr *)vs_rx[b];
        if (h->op == OP_RW) {
            for (u32 i = 0; i < h->len; i++)
                if (got + i >= sizeof vs_pattern || vs_rx[b][sizeof *h + i] != vs_pattern[got + i]) {
                    fail("vsock_connect", "echo mismatch");
                    return;
                }
            got += h->len;
            vs_fwd_cnt += h->len;
        } else if (h->op == OP_RST || h->op == OP_SHUTDOWN) {
            fail("vsock_connect", "host closed early");
            return;
        }
        vs_post_rx(b);
    }
    vs_send(me, port, OP_SHUTDOWN, 3, 0, 0);
    r_str("PASS vsock_connect bytes="); r_dec(got); r_send();
}

/* ---- rt.counter: the snapshot workload ------------------------------------------------- */
/* Counts forever; when the identity generation changes (a restore) it reports the counter, the
 * generation and clone id it sees, what a previous clone could have left in its private page,
 * and whether its pattern page is intact. That report is preceded by a cheap
 * "PASS woke gen=G clone=ID" (the guest's first report after a resume). Options:
 *   rt.vsock_hold=PORT  before counting, open a vsock connection to host PORT and hold it; after
 *                       a restore, expect a TRANSPORT_RESET event, then open a new connection,
 *                       send "clone=<id>" and wait for the host's echo;
 *   rt.touch=N          after a restore's report, read one byte of each of the first N initrd
 *                       pages (a clone's working set in the template's memory) and report
 *                       "PASS touched pages=N sum=HEX";
 *   rt.idle             after a restore's report, halt with interrupts off (an idle clone). */
static volatile u64 counter;
static char clone_page[4096] __attribute__((aligned(4096)));
static u8 pattern_page[4096] __attribute__((aligned(4096)));
static u32 vs_event __attribute__((aligned(8)));

static void vs_post_event(void) {
    vqs[2].desc[0] = (struct vq_desc){(u64)&vs_event, sizeof vs_event, VRING_WRITE, 0};
    vq_publish(&vqs[2], 0);
}

/* Connects from `sport` to host `port`; 1 on RESPONSE. */
static int vs_connect(u32 sport, u32 port) {
    vs_send(sport, port, OP_REQUEST, 0, 0, 0);
    for (;;) {
        int b = vs_recv();
        if (b < 0) return 0;
        struct vsock_hdr *h = (struct vsock_hdr *)vs_rx[b];
        u16 op = h->op;
        u32 dport = h->dst_port;
        vs_post_rx(b);
        if (dport != sport) continue;
        return op == OP_RESPONSE;
    }
}

/* After a restore: TRANSPORT_RESET seen, new connection, "clone=<id>" echoed. */
static void vsock_after_restore(u32 port, const char *clone_id) {
    int reset = vq_poll(&vqs[2], 1000000) >= 0 && vs_event == 0;
    if (!reset) { fail("vsock_after_restore", "no TRANSPORT_RESET event"); return; }
    vs_post_event();
    const u32 me = 2000 + (u32)(counter & 0x3ff);
    if (!vs_connect(me, port)) { fail("vsock_after_restore", "no RESPONSE to a new connection"); return; }
    static u8 msg[80];
    u32 n = 0;
    for (const char *p = "clone="; *p; p++) msg[n++] = (u8)*p;
    for (u32 i = 0; clone_id[i] && i < 63; i++) msg[n++] = (u8)clone_id[i];
    vs_send(me, port, OP_RW, 0, msg, n);
    u32 got = 0;
    while (got < n) {
        int b = vs_recv();
        if (b < 0) { fail("vsock_after_restore", "echo timed out"); return; }
        struct vsock_hdr *h = (struct vsock_hdr *)vs_rx[b];
        if (h->dst_port == me && h->op == OP_RW) {
            for (u32 i = 0; i < h->len; i++)
                if (got + i >= n || vs_rx[b][sizeof *h + i] != msg[got + i]) {
                    fail("vsock_after_restore", "echo mismatch");
                    return;
                }
            got += h->len;
            vs_fwd_cnt += h->len;
        } else if (h->dst_port == me && (h->op == OP_RST || h->op == OP_SHUTDOWN)) {
            fail("vsock_after_restore", "host closed early");
            return;
        }
        vs_post_rx(b);
    }
    r_str("PASS vsock_after_restore reset=1 bytes="); r_dec(got); r_send();
}

static void task_counter(const struct boot_info *bi) {
    volatile const u64 *gen = (volatile const u64 *)(IDENTITY_PAGE + 8);
    const char *clone_id = (const char *)(IDENTITY_PAGE + 16);
    const char *a;
    u32 port = 0, touch = 0;
    if ((a = find_token("rt.vsock_hold")) && *a == '=') port = (u32)parse_dec(a + 1);
    if ((a = find_token("rt.touch")) && *a == '=') touch = (u32)parse_dec(a + 1);
    int idle = find_token("rt.idle") != 0;
    for (u32 i = 0; i < sizeof pattern_page; i++) pattern_page[i] = (u8)(i * 13 + 5);
    if (port) {
        const char *why;
        if ((why = vs_init())) { fail("counter", why); return; }
        vs_post_event();
        if (!vs_connect(1500, port)) { fail("counter", "vsock_hold: no RESPONSE from the host"); return; }
        report("PASS vsock_hold connected");
    }
    u64 seen = *gen;
    r_str("PASS counter_started addr="); r_hex((u64)&counter); r_send();
    for (;;) {
        counter++;
        if (*gen == seen) continue;
        seen = *gen;
        u64 c = counter;
        /* The first report after a resume says only "running, as whom": benches time to it, so
         * the checks below (about 1000 emulated instructions here) are not counted as restore. */
        r_str("PASS woke gen="); r_dec(seen); r_str(" clone="); r_str(clone_id); r_send();
        int pattern_ok = 1;
        for (u32 i = 0; i < sizeof pattern_page; i += 64)
            if (pattern_page[i] != (u8)(i * 13 + 5)) pattern_ok = 0;
        r_str("PASS resumed counter="); r_dec(c);
        r_str(" gen="); r_dec(seen);
        r_str(" clone="); r_str(clone_id);
        /* What this clone finds in its private page: it must never be another clone's id. */
        r_str(" prev="); r_str(clone_page);
        r_str(" pattern="); r_str(pattern_ok ? "ok" : "damaged");
        /* A hash of the identity page's 32 entropy bytes: each clone must get its own. */
        r_str(" ent="); r_hex(fnv1a((const u8 *)(IDENTITY_PAGE + 80), 32));
        r_send();
        if (touch) {
            u32 sum = 0, pages = 0;
            if (bi->initrd)
                for (; pages < touch && (u64)pages * 4096 < bi->initrd_size; pages++)
                    sum += *(volatile const u8 *)(bi->initrd + (u64)pages * 4096);
            r_str("PASS touched pages="); r_dec(pages); r_str(" sum="); r_hex(sum); r_send();
        }
        u32 i = 0;
        for (; clone_id[i] && i < 63; i++) clone_page[i] = clone_id[i];
        clone_page[i] = 0;
        if (port) vsock_after_restore(port, clone_id);
        if (idle) return;
    }
}

#include "agent.c"
/* net.c: rt.net=IP answers ARP and ICMP echo for IP on the virtio-net device (never returns). */
void task_net(u64 mmio_base, const char *arg);

void guest_main(const u8 *info, int pvh) {
    struct boot_info bi;
    /* hvm_start_info.cmdline_paddr is at offset 24. */
    cmdline = pvh ? (const char *)*(const u64 *)(info + 24)
                  : (const char *)(u64)*(const u32 *)(info + ZP_CMD_LINE_PTR);
    read_boot_info(info, pvh, &bi);
    report("READY");
    const char *a;
    if (find_token("rt.boot")) task_boot(&bi);
    if ((a = find_token("rt.serial")) && *a == '=') task_serial(a + 1);
    if (find_token("rt.smp")) task_smp();
    if (find_token("rt.blk")) task_blk();
    if ((a = find_token("rt.blk_watch")))
        task_blk_watch((*a == '=' ? parse_dec(a + 1) : 20000) * 1000);
    if ((a = find_token("rt.vsock_listen")) && *a == '=') task_vsock_listen((u32)parse_dec(a + 1));
    if ((a = find_token("rt.vsock_connect")) && *a == '=') task_vsock_connect((u32)parse_dec(a + 1));
    if (find_token("rt.counter")) task_counter(&bi);
    if ((a = find_token("rt.agent"))) task_agent(*a == '=' ? (u32)parse_dec(a + 1) : 1024);
    if ((a = find_token("rt.net")) && *a == '=') task_net(vio_find(1) ? vio_base : 0, a + 1);
    a = find_token("rt.exit");
    if (a && prefix(a, "=reset")) outb(0x64, 0xfe);
    if (a && prefix(a, "=crash")) {
        /* An empty IDT, then an exception: #UD -> #DF -> triple fault (a dead guest). */
        static const struct { u16 limit; u64 base; } __attribute__((packed)) none = {0, 0};
        __asm__ volatile("lidt %0; ud2" : : "m"(none));
    }
    /* rt.exit=halt or nothing: halt forever with interrupts off (start.S). */
}
