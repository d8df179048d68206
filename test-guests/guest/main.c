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

static void r_str(const char *s) { while (*s && rlen < sizeof(rbuf) - 1) rbuf[rlen++] = *s++; }
static void r_dec(u64 v) {
    char t[21]; int n = 0;
    do { t[n++] = '0' + v % 10; v /= 10; } while (v);
    while (n && rlen < sizeof(rbuf) - 1) rbuf[rlen++] = t[--n];
}
static void r_hex(u64 v) {
    char t[17]; int n = 0;
    do { t[n++] = "0123456789abcdef"[v & 15]; v >>= 4; } while (v);
    while (n && rlen < sizeof(rbuf) - 1) rbuf[rlen++] = t[--n];
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

/* Finds token `key` (exactly, or followed by '='); returns a pointer past the key or 0. */
static const char *find_token(const char *key) {
    const char *s = cmdline;
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

static void task_boot(const u8 *zp) {
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
    u8 n = zp[ZP_E820_ENTRIES];
    if (n == 0 || n > 128) { fail("boot", "bad e820 entry count"); return; }
    u64 ram = 0;
    for (u8 i = 0; i < n; i++) {
        const u8 *e = zp + ZP_E820_TABLE + 20 * i;
        if (*(const u32 *)(e + 16) == 1) ram += *(const u64 *)(e + 8);
    }
    u64 cl = 0;
    while (cmdline[cl]) cl++;
    u32 rd = *(const u32 *)(zp + ZP_RAMDISK_IMAGE), rs = *(const u32 *)(zp + ZP_RAMDISK_SIZE);
    const u32 *id = (const u32 *)IDENTITY_PAGE;
    if (id[0] != 0x564e5552) { fail("boot", "identity page magic missing"); return; }
    r_str("PASS boot ram="); r_dec(ram);
    r_str(" e820="); r_dec(n);
    r_str(" cmdline_len="); r_dec(cl);
    r_str(" initrd_size="); r_dec(rs);
    r_str(" initrd_sum="); r_hex(rs ? fnv1a((const u8 *)(u64)rd, rs) : 0);
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

void guest_main(const u8 *zp) {
    cmdline = (const char *)(u64)*(const u32 *)(zp + ZP_CMD_LINE_PTR);
    report("READY");
    const char *a;
    if (find_token("rt.boot")) task_boot(zp);
    if ((a = find_token("rt.serial")) && *a == '=') task_serial(a + 1);
    a = find_token("rt.exit");
    if (a && prefix(a, "=reset")) outb(0x64, 0xfe);
    /* rt.exit=halt or nothing: halt forever with interrupts off (start.S). */
}
