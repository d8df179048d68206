/*
 * rt.agent[=PORT]: a minimal responder for the runv agent protocol (protocol/src/frame.rs,
 * message.rs) on vsock PORT (default 1024, runv-agent's port). Included by main.c after the
 * virtio and vsock helpers it uses.
 *
 * Frames are `"RV" | version u16 | kind u8 | flags u8 | id u32 | len u32 | reserved u16 |
 * JSON`, big endian. Requests are matched by their "op" value only:
 *   ping          -> {"result":"pong","version":1,"uptime_ms":0,"ready":true,...}
 *   reseed        -> {"result":"ok"}, reports "PASS agent_hook op=reseed bytes=N"
 *   set_clock     -> {"result":"ok"}, reports "PASS agent_hook op=set_clock unix_nanos=N"
 *   set_hostname  -> {"result":"ok"}, reports "PASS agent_hook op=set_hostname name=S"
 *   set_network   -> {"result":"ok"}, reports "PASS agent_hook op=set_network ipv4=A/N gw=G
 *                    mac=M dns=D" (the first address, route gateway, MAC and name server; "-"
 *                    for one that is absent); nothing is applied
 *   anything else -> {"result":"error","code":"bad_request",...}
 * A frame that is not a valid request header gets a bad_frame error and the connection is
 * reset. One connection at a time: a new one replaces the old. Reports
 * "PASS agent_listening port=N" once listening; then serves forever, across snapshots (a
 * clone's TRANSPORT_RESET event drops a connection opened before the restore, told by the
 * identity page's generation; the VMM may deliver the event after the clone's first
 * connection).
 *
 * When a virtio-blk device is announced, slot 0 (the first) is also watched (every 64 polling
 * rounds, and before an unknown request is refused): on each config generation change the agent
 * reports "PASS agent_disk capacity=C serial=S magic=HEX" (serial
 * by GET_ID; magic the little-endian u32 at byte 1024, sector 2, where EROFS and ext4 keep
 * their superblock magic; 0 when the disk is shorter). Hashing a whole sector would cost ~2.5 ms
 * of emulated instructions on our hosts, in front of the next request.
 */

static u8 ag_in[4096];   /* received, not yet consumed bytes of the connection */
static u32 ag_len;
static u8 ag_out[320];   /* one response frame */
static u32 ag_peer;      /* host port of the connection, 0 = none */
static u32 ag_port;      /* our vsock port */
static u64 ag_peer_gen;  /* identity generation when the connection was opened */
#define AG_GEN (*(volatile const u64 *)(IDENTITY_PAGE + 8))

/* ---- slot 0 watch: its own queue, so it does not share vqs[] with vsock ----------------- */
static struct vq ag_bq __attribute__((aligned(4096)));
static u64 ag_blk;       /* MMIO base of the watched virtio-blk device, 0 = none */
static u32 ag_blk_gen;

static u32 ag_brd(u32 off) { return *(volatile u32 *)(ag_blk + off); }

static u8 ag_blk_request(u32 type, u64 sector, u32 len) {
    u64 save = vio_base;
    vio_base = ag_blk;
    blk_hdr.type = type;
    blk_hdr.sector = sector;
    blk_status = 0xff;
    ag_bq.desc[0] = (struct vq_desc){(u64)&blk_hdr, 16, VRING_NEXT, 1};
    ag_bq.desc[1] = (struct vq_desc){(u64)blk_buf, len, VRING_NEXT | VRING_WRITE, 2};
    ag_bq.desc[2] = (struct vq_desc){(u64)&blk_status, 1, VRING_WRITE, 0};
    u8 st = vq_submit(&ag_bq, 0) ? blk_status : 0xfe;
    vio_base = save;
    return st;
}

/* vio_init for one queue on ag_bq (vio_init itself always uses vqs[]). */
static const char *ag_blk_init(void) {
    vio_wr(0x70, 0);
    vio_wr(0x70, 1 | 2);
    vio_wr(0x24, 0); vio_wr(0x20, 0);
    vio_wr(0x24, 1); vio_wr(0x20, 1);     /* VIRTIO_F_VERSION_1 */
    vio_wr(0x70, 1 | 2 | 8);
    if (!(vio_rd(0x70) & 8)) return "blk FEATURES_OK refused";
    vio_wr(0x30, 0);
    if (vio_rd(0x34) < VQ_SIZE) return "blk queue too small";
    vio_wr(0x38, VQ_SIZE);
    vio_wr(0x80, (u32)(u64)ag_bq.desc);   vio_wr(0x84, 0);
    vio_wr(0x90, (u32)(u64)&ag_bq.avail); vio_wr(0x94, 0);
    vio_wr(0xa0, (u32)(u64)&ag_bq.used);  vio_wr(0xa4, 0);
    vio_wr(0x44, 1);
    ag_bq.index = 0;
    ag_bq.last_used = ag_bq.used.idx;
    vio_wr(0x70, 1 | 2 | 8 | 4);
    ag_blk = vio_base;
    ag_blk_gen = vio_rd(0xfc);
    return 0;
}

static void ag_blk_check(void) {
    u32 g = ag_brd(0xfc);
    if (g == ag_blk_gen) return;
    u64 cap;
    do { g = ag_brd(0xfc); cap = ag_brd(0x100) | ((u64)ag_brd(0x104) << 32); } while (g != ag_brd(0xfc));
    ag_blk_gen = g;
    *(volatile u32 *)(ag_blk + 0x64) = 2; /* acknowledge the configuration-change interrupt */
    for (u32 i = 0; i < 21; i++) blk_buf[i] = 0;
    u8 st = ag_blk_request(8, 0, 20);
    static char serial[21];
    for (u32 i = 0; i < 21; i++) serial[i] = st ? 0 : (char)blk_buf[i];
    u32 magic = 0;
    if (cap > 2 && !(st = ag_blk_request(0, 2, 512))) magic = *(const u32 *)blk_buf;
    if (st) { r_str("FAIL agent_disk: status "); r_dec(st); r_send(); return; }
    r_str("PASS agent_disk capacity="); r_dec(cap);
    r_str(" serial="); r_str(serial);
    r_str(" magic="); r_hex(magic);
    r_send();
}

/* ---- frames ---------------------------------------------------------------------------- */
static u32 be32(const u8 *p) { return (u32)p[0] << 24 | (u32)p[1] << 16 | (u32)p[2] << 8 | p[3]; }

/* Pointer just past `"key":` in the payload, or 0. serde_json writes no spaces. */
static const u8 *ag_field(const u8 *p, u32 n, const char *key) {
    u32 k = 0;
    while (key[k]) k++;
    for (u32 i = 0; i + k + 3 <= n; i++) {
        if (p[i] != '"' || p[i + k + 1] != '"' || p[i + k + 2] != ':') continue;
        u32 j = 0;
        while (j < k && p[i + 1 + j] == (u8)key[j]) j++;
        if (j == k) return p + i + k + 3;
    }
    return 0;
}

static const char ag_pong[] = "{\"result\":\"pong\",\"version\":1,\"uptime_ms\":0,"
                              "\"ready\":true,\"agent_version\":\"runv-test-guest\"}";
static const char *ag_last;  /* payload now in ag_out */
static u32 ag_last_len;

/* Puts `json` in ag_out after the header. The payloads are constants: each instruction is
 * emulated here (~1 us), so one is copied only when it differs from the last one. */
static void ag_payload(const char *json) {
    if (json == ag_last) return;
    u32 n = 0;
    for (; json[n] && n < sizeof ag_out - 16; n++) ag_out[16 + n] = (u8)json[n];
    ag_last = json;
    ag_last_len = n;
}

/* Sends one Response frame (kind 2) for request `id` with `json` as payload. */
static void ag_respond(const u8 *id, const char *json) {
    ag_payload(json);
    u32 n = ag_last_len;
    const u8 h[16] = {'R', 'V', 0, 1, 2, 0, id[0], id[1], id[2], id[3],
                      (u8)(n >> 24), (u8)(n >> 16), (u8)(n >> 8), (u8)n, 0, 0};
    for (u32 i = 0; i < 16; i++) ag_out[i] = h[i];
    vs_send(ag_port, ag_peer, OP_RW, 0, ag_out, 16 + n);
}

static const char ag_ok[] = "{\"result\":\"ok\"}";

/* Reports the JSON string at v (up to 64 plain characters), "-" when v is not a string. */
static void ag_str(const u8 *v, const u8 *end) {
    char t[65];
    u32 k = 0;
    if (v && v < end && *v == '"')
        for (v++; v < end && k < 64 && *v != '"' && *v != '\\' && *v != ' '; v++) t[k++] = (char)*v;
    if (!k) t[k++] = '-';
    t[k] = 0;
    r_str(t);
}

/* Answers one request payload. */
static void ag_request(const u8 *id, const u8 *p, u32 n) {
    const u8 *op = ag_field(p, n, "op");
    const u8 *end = p + n;
    const u8 *v;
    if (op && prefix((const char *)op, "\"ping\"")) {
        ag_respond(id, ag_pong);
        return;
    }
    if (op && prefix((const char *)op, "\"reseed\"") && (v = ag_field(p, n, "entropy")) && *v == '[') {
        u32 bytes = v + 1 < end && v[1] != ']';
        for (; v < end && *v != ']'; v++) bytes += *v == ',';
        r_str("PASS agent_hook op=reseed bytes="); r_dec(bytes); r_send();
        ag_respond(id, ag_ok);
        return;
    }
    if (op && prefix((const char *)op, "\"set_clock\"") && (v = ag_field(p, n, "unix_nanos"))) {
        r_str("PASS agent_hook op=set_clock unix_nanos=");
        char t[24];
        u32 k = 0;
        for (; v < end && k < 23 && (*v == '-' || (*v >= '0' && *v <= '9')); v++) t[k++] = (char)*v;
        t[k] = 0;
        r_str(t); r_send();
        ag_respond(id, ag_ok);
        return;
    }
    if (op && prefix((const char *)op, "\"set_hostname\"") && (v = ag_field(p, n, "hostname")) && *v == '"') {
        r_str("PASS agent_hook op=set_hostname name="); ag_str(v, end); r_send();
        ag_respond(id, ag_ok);
        return;
    }
    if (op && prefix((const char *)op, "\"set_network\"")) {
        r_str("PASS agent_hook op=set_network ipv4=");
        v = ag_field(p, n, "addresses");
        ag_str(v && *v == '[' ? v + 1 : 0, end);
        r_str(" gw="); ag_str(ag_field(p, n, "gateway"), end);
        r_str(" mac="); ag_str(ag_field(p, n, "mac"), end);
        r_str(" dns=");
        v = ag_field(p, n, "dns");
        ag_str(v && *v == '[' ? v + 1 : 0, end);
        r_send();
        ag_respond(id, ag_ok);
        return;
    }
    /* A disk attached before this request (a container's root before `create`) is reported
     * before the refusal, however soon the host detaches it again. */
    if (ag_blk) ag_blk_check();
    ag_respond(id, "{\"result\":\"error\",\"code\":\"bad_request\",\"message\":\"the runv test guest "
                   "agent answers ping, reseed, set_clock, set_hostname and set_network only: it "
                   "cannot run containers\"}");
}

/* Answers every complete frame of buf[0..n]; *used = the bytes they took. 0 when the stream is
 * broken (the connection is then reset). */
static int ag_frames(const u8 *buf, u32 n, u32 *used) {
    u32 at = 0;
    *used = 0;
    while (n - at >= 16) {
        const u8 *h = buf + at;
        u32 len = be32(h + 10);
        if (h[0] != 'R' || h[1] != 'V' || h[2] != 0 || h[3] != 1 || h[5] || h[14] || h[15] ||
            len > sizeof ag_in - 16) {
            static const u8 zero[4];
            ag_respond(zero, "{\"result\":\"error\",\"code\":\"bad_frame\",\"message\":\"not a "
                             "runv agent protocol v1 frame (or over 4080 bytes): reconnect\"}");
            return 0;
        }
        if (n - at < 16 + len) break;
        if (h[4] == 1) ag_request(h + 6, h + 16, len);
        at += 16 + len;
    }
    *used = at;
    return 1;
}

/* One rx packet. */
static void ag_packet(const struct vsock_hdr *h) {
    if (h->dst_port != ag_port) return;
    if (h->op == OP_REQUEST) {
        ag_peer = h->src_port;
        ag_peer_gen = AG_GEN;
        ag_len = 0;
        vs_fwd_cnt = 0;
        vs_send(ag_port, ag_peer, OP_RESPONSE, 0, 0, 0);
        return;
    }
    if (h->src_port != ag_peer || !ag_peer) return;
    if (h->op == OP_RW) {
        vs_fwd_cnt += h->len;
        const u8 *d = (const u8 *)h + sizeof *h;
        u32 used;
        int ok;
        if (!ag_len) {
            /* The usual case, whole frames in one packet: answered where they lie. */
            ok = ag_frames(d, h->len, &used);
            for (u32 i = used; ok && i < h->len && ag_len < sizeof ag_in; i++) ag_in[ag_len++] = d[i];
        } else {
            for (u32 i = 0; i < h->len && ag_len < sizeof ag_in; i++) ag_in[ag_len++] = d[i];
            ok = ag_frames(ag_in, ag_len, &used);
            for (u32 i = used; ok && i < ag_len; i++) ag_in[i - used] = ag_in[i];
            if (ok) ag_len -= used;
        }
        if (!ok) {
            vs_send(ag_port, ag_peer, OP_RST, 0, 0, 0);
            ag_peer = 0;
        }
    } else if (h->op == OP_CREDIT_UPDATE + 1) { /* CREDIT_REQUEST */
        vs_send(ag_port, ag_peer, OP_CREDIT_UPDATE, 0, 0, 0);
    } else if (h->op == OP_SHUTDOWN || h->op == OP_RST) {
        if (h->op == OP_SHUTDOWN) vs_send(ag_port, ag_peer, OP_RST, 0, 0, 0);
        ag_peer = 0;
    }
}

static void task_agent(u32 port) {
    const char *why;
    ag_port = port;
    if (vio_find(2) && (why = ag_blk_init())) { fail("agent", why); return; }
    if ((why = vs_init())) { fail("agent", why); return; }
    vs_post_event();
    ag_payload(ag_pong); /* a clone's first answer is a ping's: have it ready in the template */
    r_str("PASS agent_listening port="); r_dec(port); r_send();
    for (u32 tick = 0;; tick++) {
        barrier();
        if (*(volatile u16 *)&vqs[2].used.idx != vqs[2].last_used) {
            vqs[2].last_used++;
            /* TRANSPORT_RESET after a restore: only connections from before it are gone. The
             * VMM may deliver it after a clone's first connection, which must survive. */
            if (vs_event == 0 && ag_peer_gen != AG_GEN) { ag_peer = 0; ag_len = 0; }
            vs_post_event();
        }
        if (*(volatile u16 *)&vqs[0].used.idx != vqs[0].last_used) {
            u16 slot = vqs[0].last_used++ % VQ_SIZE;
            u16 b = (u16)vqs[0].used.ring[slot].id;
            if (b < VQ_SIZE) {
                ag_packet((const struct vsock_hdr *)vs_rx[b]);
                vs_post_rx(b);
            }
        }
        /* An MMIO read is an exit (~15 us): look at slot 0 every 64 rounds only. */
        if (ag_blk && !(tick & 63)) ag_blk_check();
    }
}
