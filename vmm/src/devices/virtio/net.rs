//! virtio-net (virtio 1.2, section 5.1) on a host TAP ([`super::tap`]): queue 0 receives, queue
//! 1 transmits, no control queue. Checksum and TSO offloads pass through in the
//! `virtio_net_hdr_v1` both ways (the TAP is told with `TUNSETOFFLOAD` what the driver accepts);
//! with `VIRTIO_NET_F_MRG_RXBUF` a received frame may span several receive buffers.
//!
//! Driven by the device loop only: the TAP sits in the device's own epoll, armed only while the
//! driver has receive buffers, so a guest that stops reading never makes the loop spin (frames
//! then queue in the TAP and the kernel drops the excess). Every chain from the guest is
//! untrusted: a chain with the wrong direction, outside guest memory, cut short (a loop) or a
//! frame over [`MAX_FRAME`] is dropped and counted, never a crash.

use virtio_queue::{Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddress};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use super::tap::{Tap, TapError, VNET_HDR_LEN};
use super::{device_type, drain_queue, VirtioDevice};
use crate::memory::GuestMemory;

const RX: usize = 0;
const TX: usize = 1;
const QUEUE_SIZE: u16 = 256;
/// Largest frame (virtio-net header included) either way: a 64 KiB TSO segment plus headers.
pub const MAX_FRAME: usize = VNET_HDR_LEN + 65_550;
/// Most frames moved per wake-up before the loop serves others (the rest stay readable).
const BATCH: usize = 64;

/// Feature bits (virtio 1.2, 5.1.3).
pub mod feature {
    /// Device handles partial checksums from the driver.
    pub const CSUM: u64 = 1 << 0;
    /// Driver handles partial checksums.
    pub const GUEST_CSUM: u64 = 1 << 1;
    /// Config space has the MAC.
    pub const MAC: u64 = 1 << 5;
    /// Driver takes TSOv4 frames.
    pub const GUEST_TSO4: u64 = 1 << 7;
    /// Driver takes TSOv6 frames.
    pub const GUEST_TSO6: u64 = 1 << 8;
    /// Device takes TSOv4 frames.
    pub const HOST_TSO4: u64 = 1 << 11;
    /// Device takes TSOv6 frames.
    pub const HOST_TSO6: u64 = 1 << 12;
    /// Received frames may span several buffers.
    pub const MRG_RXBUF: u64 = 1 << 15;
    /// Config space has the link status.
    pub const STATUS: u64 = 1 << 16;
}

const HDR_F_NEEDS_CSUM: u8 = 1;
const GSO_NONE: u8 = 0;
const GSO_TCPV4: u8 = 1;
const GSO_TCPV6: u8 = 4;
const LINK_UP: u16 = 1;

/// Counters of what the device dropped and why (tests and logs read them).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct NetStats {
    /// Frames delivered to the guest.
    pub rx_frames: u64,
    /// Frames sent to the TAP.
    pub tx_frames: u64,
    /// Receive chains the guest built wrongly (returned unused).
    pub rx_malformed: u64,
    /// Frames dropped because the guest's buffers could not hold them.
    pub rx_dropped: u64,
    /// Transmit chains the guest built wrongly or whose frame was refused (dropped).
    pub tx_malformed: u64,
    /// Frames the TAP did not take (full, down or refused by the kernel).
    pub tx_dropped: u64,
}

/// A virtio-net device.
pub struct Net {
    tap: Tap,
    epoll: Epoll,
    config: [u8; 8],
    acked: u64,
    /// A frame read from the TAP that found no receive buffer yet.
    rx_buf: Vec<u8>,
    rx_len: usize,
    /// Whether the TAP is in the epoll set (only while receive buffers may be available).
    rx_armed: bool,
    /// The driver set DRIVER_OK (features known); receive buffers may exist.
    activated: bool,
    tx_buf: Vec<u8>,
    /// What was dropped and why.
    pub stats: NetStats,
}

/// Error creating a network device.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// The TAP cannot be used.
    #[error(transparent)]
    Tap(#[from] TapError),
    /// The device's epoll failed.
    #[error("virtio-net epoll: {0}")]
    Epoll(std::io::Error),
}

impl Net {
    /// Attaches TAP `tap` for a guest with MAC `mac`.
    pub fn new(tap: &str, mac: [u8; 6]) -> Result<Self, NetError> {
        let tap = Tap::open(tap)?;
        let epoll = Epoll::new().map_err(NetError::Epoll)?;
        let mut config = [0u8; 8];
        config[..6].copy_from_slice(&mac);
        config[6..8].copy_from_slice(&LINK_UP.to_le_bytes());
        let net = Self {
            tap,
            epoll,
            config,
            acked: 0,
            rx_buf: vec![0; MAX_FRAME],
            rx_len: 0,
            rx_armed: false,
            activated: false,
            tx_buf: Vec::with_capacity(MAX_FRAME),
            stats: NetStats::default(),
        };
        Ok(net)
    }

    /// The TAP's name.
    pub fn tap_name(&self) -> &str {
        self.tap.name()
    }

    fn arm(&mut self, on: bool) {
        if on == self.rx_armed {
            return;
        }
        let fd = self.tap.fd();
        let r = if on {
            self.epoll
                .ctl(ControlOperation::Add, fd, EpollEvent::new(EventSet::IN, 0))
        } else {
            self.epoll
                .ctl(ControlOperation::Delete, fd, EpollEvent::default())
        };
        match r {
            Ok(()) => self.rx_armed = on,
            Err(e) => tracing::warn!("virtio-net: epoll on TAP {}: {e}", self.tap.name()),
        }
    }

    fn mrg_rxbuf(&self) -> bool {
        self.acked & feature::MRG_RXBUF != 0
    }

    /// Moves frames from the TAP into receive buffers until the TAP is empty, the buffers run
    /// out (the TAP is then disarmed until the driver adds buffers) or a batch is done.
    fn receive(&mut self, q: &mut Queue, mem: &GuestMemory) -> bool {
        let mut used = false;
        // The driver need not notify while buffers are left; asked again when they run out.
        let _ = q.disable_notification(mem);
        for _ in 0..BATCH {
            if self.rx_len == 0 {
                match self.tap.read_frame(&mut self.rx_buf) {
                    Ok(n) if n > VNET_HDR_LEN => self.rx_len = n,
                    Ok(_) => continue,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        self.arm(true);
                        return used;
                    }
                    Err(e) => {
                        // E.g. the TAP was deleted under us: stop watching it (an fd that stays
                        // readable with an error would spin the loop); the driver's next
                        // receive notification tries again.
                        tracing::warn!("virtio-net: reading TAP {}: {e}", self.tap.name());
                        self.arm(false);
                        return used;
                    }
                }
            }
            match self.deliver(q, mem) {
                Delivery::Done => {
                    used = true;
                    self.stats.rx_frames += 1;
                    self.rx_len = 0;
                }
                Delivery::Dropped => {
                    used = true;
                    self.stats.rx_dropped += 1;
                    self.rx_len = 0;
                }
                Delivery::NoBuffers => {
                    if self.more_buffers_since(q, mem) {
                        continue;
                    }
                    self.arm(false);
                    return used;
                }
            }
        }
        used
    }

    /// After the available buffers proved too few: asks the driver to notify when it adds one
    /// (for EVENT_IDX, past every buffer it has made available so far, even those handed back
    /// unused), then re-checks so a buffer added meanwhile is not missed. True: more arrived.
    fn more_buffers_since(&self, q: &mut Queue, mem: &GuestMemory) -> bool {
        let acquire = std::sync::atomic::Ordering::Acquire;
        let Ok(seen) = q.avail_idx(mem, acquire) else {
            return false;
        };
        let next = q.next_avail();
        q.set_next_avail(seen.0);
        let _ = q.enable_notification(mem);
        q.set_next_avail(next);
        q.avail_idx(mem, acquire).is_ok_and(|now| now != seen)
    }

    /// Writes the pending frame into one (or, with MRG_RXBUF, several) receive chains.
    fn deliver(&mut self, q: &mut Queue, mem: &GuestMemory) -> Delivery {
        let mrg = self.mrg_rxbuf();
        let frame = &mut self.rx_buf[..self.rx_len];
        // The TAP leaves num_buffers alone: it is ours to fill.
        frame[10..12].copy_from_slice(&1u16.to_le_bytes());
        let mut start = q.next_avail();
        let mut chains: Vec<(u16, u32)> = Vec::new();
        let mut first: Vec<(GuestAddress, u32)> = Vec::new();
        let mut off = 0usize;
        while off < frame.len() {
            let Some(chain) = q.pop_descriptor_chain(mem) else {
                // Not enough buffers for the whole frame: give back what was taken, keep the frame.
                q.set_next_avail(start);
                return Delivery::NoBuffers;
            };
            let head = chain.head_index();
            let descs: Vec<_> = chain.collect();
            let bad = descs.is_empty()
                || descs.last().is_some_and(|d| d.has_next())
                || descs.iter().any(|d| !d.is_write_only());
            if bad {
                self.stats.rx_malformed += 1;
                if !chains.is_empty() {
                    // A bad chain in the middle of a merged frame: drop the frame.
                    chains.push((head, 0));
                    break;
                }
                if q.add_used(mem, head, 0).is_err() {
                    return Delivery::Dropped;
                }
                // Returned for good: a later roll-back must not hand it out again.
                start = q.next_avail();
                continue;
            }
            let mut written = 0u32;
            let mut ok = true;
            for d in &descs {
                if off >= frame.len() {
                    break;
                }
                let n = (d.len() as usize).min(frame.len() - off);
                if mem.write_slice(&frame[off..off + n], d.addr()).is_err() {
                    ok = false;
                    break;
                }
                if chains.is_empty() {
                    first.push((d.addr(), d.len()));
                }
                off += n;
                written += n as u32;
            }
            chains.push((head, written));
            if !ok {
                self.stats.rx_malformed += 1;
                break;
            }
            if !mrg {
                break;
            }
        }
        let complete = off >= frame.len();
        let count = chains.len() as u16;
        if !complete {
            for (head, _) in chains {
                let _ = q.add_used(mem, head, 0);
            }
            return Delivery::Dropped;
        };
        // num_buffers (header bytes 10..12) is known only now; the first chain holds the header.
        if count > 1 && write_frame_bytes(mem, &first, 10, &count.to_le_bytes()).is_none() {
            self.stats.rx_malformed += 1;
        }
        for (head, len) in chains {
            if q.add_used(mem, head, len).is_err() {
                return Delivery::Dropped;
            }
        }
        Delivery::Done
    }

    /// Sends every available transmit chain to the TAP.
    fn transmit(&mut self, q: &mut Queue, mem: &GuestMemory) -> bool {
        drain_queue(q, mem, |chain| {
            let head = chain.head_index();
            match self.gather(chain, mem) {
                Some(()) => match self.tap.write_frame(&self.tx_buf) {
                    Ok(_) => self.stats.tx_frames += 1,
                    Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                        self.stats.tx_malformed += 1
                    }
                    Err(_) => self.stats.tx_dropped += 1,
                },
                None => self.stats.tx_malformed += 1,
            }
            (head, 0)
        })
        .0
    }

    /// Copies a transmit chain into `tx_buf` and checks its header against what was
    /// negotiated; `None` for a chain to drop.
    fn gather<M>(
        &mut self,
        chain: virtio_queue::DescriptorChain<M>,
        mem: &GuestMemory,
    ) -> Option<()>
    where
        M: std::ops::Deref,
        M::Target: vm_memory::GuestMemoryBackend,
    {
        self.tx_buf.clear();
        let mut last_next = false;
        for d in chain {
            last_next = d.has_next();
            let len = d.len() as usize;
            if d.is_write_only() || self.tx_buf.len() + len > MAX_FRAME {
                return None;
            }
            let at = self.tx_buf.len();
            self.tx_buf.resize(at + len, 0);
            mem.read_slice(&mut self.tx_buf[at..], d.addr()).ok()?;
        }
        if last_next || self.tx_buf.len() < VNET_HDR_LEN + 14 {
            return None;
        }
        let (flags, gso) = (self.tx_buf[0], self.tx_buf[1]);
        if flags & HDR_F_NEEDS_CSUM != 0 && self.acked & feature::CSUM == 0 {
            return None;
        }
        let gso_ok = match gso & 0x7f {
            GSO_NONE => true,
            GSO_TCPV4 => self.acked & feature::HOST_TSO4 != 0,
            GSO_TCPV6 => self.acked & feature::HOST_TSO6 != 0,
            _ => false,
        };
        gso_ok.then_some(())
    }
}

/// Writes `bytes` at `offset` of a frame laid out over `descs` (guest buffers in order).
fn write_frame_bytes(
    mem: &GuestMemory,
    descs: &[(GuestAddress, u32)],
    mut offset: usize,
    bytes: &[u8],
) -> Option<()> {
    let mut rest = bytes;
    for &(addr, len) in descs {
        let len = len as usize;
        if offset >= len {
            offset -= len;
            continue;
        }
        let n = rest.len().min(len - offset);
        mem.write_slice(&rest[..n], addr.checked_add(offset as u64)?)
            .ok()?;
        rest = &rest[n..];
        offset = 0;
        if rest.is_empty() {
            return Some(());
        }
    }
    None
}

enum Delivery {
    Done,
    Dropped,
    NoBuffers,
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        device_type::NET
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        use feature::*;
        let event_idx = 1 << virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
        CSUM | GUEST_CSUM
            | MAC
            | GUEST_TSO4
            | GUEST_TSO6
            | HOST_TSO4
            | HOST_TSO6
            | MRG_RXBUF
            | STATUS
            | event_idx
    }

    fn config_space(&self) -> &[u8] {
        &self.config
    }

    fn activate(&mut self, driver_features: u64) {
        use feature::*;
        self.acked = driver_features;
        self.activated = true;
        self.arm(true);
        let has = |f: u64| driver_features & f != 0;
        let mut tun = 0;
        if has(GUEST_CSUM) {
            tun |= libc::TUN_F_CSUM;
            if has(GUEST_TSO4) {
                tun |= libc::TUN_F_TSO4;
            }
            if has(GUEST_TSO6) {
                tun |= libc::TUN_F_TSO6;
            }
        }
        if let Err(e) = self.tap.set_offload(tun) {
            tracing::warn!("virtio-net: {e}; offloads stay off");
        }
    }

    fn backend_fd(&self) -> Option<std::os::fd::RawFd> {
        use std::os::fd::AsRawFd;
        Some(self.epoll.as_raw_fd())
    }

    fn process_queue(
        &mut self,
        index: usize,
        queues: &mut [Queue],
        mem: &GuestMemory,
    ) -> Vec<usize> {
        let Some(q) = queues.get_mut(index) else {
            return Vec::new();
        };
        let used = match index {
            RX => self.receive(q, mem),
            TX => self.transmit(q, mem),
            _ => false,
        };
        if used {
            vec![index]
        } else {
            Vec::new()
        }
    }

    fn restored(&mut self, queues: &mut [Queue], mem: &GuestMemory) -> Vec<usize> {
        // Chains the driver made available before the snapshot had their notification consumed
        // by the template's VMM, never by ours: serve them now, or a driver that waits for a
        // transmit buffer back would wait forever.
        let mut used = Vec::new();
        for index in [TX, RX] {
            used.extend(self.process_queue(index, queues, mem));
        }
        used
    }

    fn process_backend(&mut self, queues: &mut [Queue], mem: &GuestMemory) -> Vec<usize> {
        let mut events = [EpollEvent::default(); 1];
        let _ = self.epoll.wait(0, &mut events);
        match queues.get_mut(RX) {
            Some(q) if q.ready() && self.activated => {
                if self.receive(q, mem) {
                    return vec![RX];
                }
            }
            // No receive queue (yet, or after a reset): stop watching until the driver is up.
            _ => {
                self.activated = false;
                self.arm(false);
            }
        }
        Vec::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::testing::{memory, TestQueue, NEXT, WRITE};
    use std::os::fd::AsRawFd;
    use vm_memory::GuestAddress as GA;

    /// Runs `f` on a thread inside a fresh network namespace holding TAP `rvu0` (host side
    /// 10.88.0.1/24, up); None (and a SKIPPED line) where that cannot be set up.
    fn in_netns<T: Send + 'static>(
        test: &str,
        f: impl FnOnce(&test_guests::netns::Netns) -> T + Send + 'static,
    ) -> Option<T> {
        if let Some(why) = test_guests::netns::unavailable() {
            println!("SKIPPED: {test}: {why}");
            return None;
        }
        let ns = test_guests::netns::Netns::new().unwrap();
        ns.add_tap("rvu0", "10.88.0.1/24").unwrap();
        let t = std::thread::spawn(move || {
            let f_ns = std::fs::File::open(format!("/run/netns/{}", ns.name)).unwrap();
            // SAFETY: setns on an fd we own; it moves only this thread, which ends with the test.
            let r = unsafe { libc::setns(f_ns.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(r, 0, "setns");
            f(&ns)
        });
        Some(t.join().unwrap())
    }

    fn hdr(mem: &GuestMemory, at: u64, flags: u8, gso: u8) {
        let mut h = [0u8; VNET_HDR_LEN];
        h[0] = flags;
        h[1] = gso;
        mem.write_slice(&h, GA(at)).unwrap();
    }

    #[test]
    fn malformed_transmit_chains_are_dropped_and_counted() {
        in_netns("malformed_transmit_chains_are_dropped_and_counted", |_| {
            let mut net = Net::new("rvu0", [2, 0, 0, 0, 0, 1]).unwrap();
            net.activate(0);
            let mem = memory();
            let mut q = TestQueue::new(&mem, 0x1000);
            let frame = 0x8000u64;
            hdr(&mem, frame, 0, GSO_NONE);
            // Broadcast Ethernet frame with an unknown ethertype: harmless to send.
            let mut eth = [0xffu8; 60];
            eth[6..12].copy_from_slice(&[2, 0, 0, 0, 0, 1]);
            eth[12..14].copy_from_slice(&[0x88, 0xb5]);
            mem.write_slice(&eth, GA(frame + VNET_HDR_LEN as u64))
                .unwrap();
            let good = (VNET_HDR_LEN + 60) as u32;
            type Case<'a> = Box<dyn Fn(&TestQueue) + 'a>;
            let cases: Vec<Case> = vec![
                // Device-writable buffer in a transmit chain.
                Box::new(|q| q.desc(&mem, 0, frame, good, WRITE, 0)),
                // A loop: 0 -> 1 -> 0.
                Box::new(|q| {
                    q.desc(&mem, 0, frame, 20, NEXT, 1);
                    q.desc(&mem, 1, frame, 20, NEXT, 0);
                }),
                // Outside guest memory.
                Box::new(|q| q.desc(&mem, 0, 0xffff_0000, good, 0, 0)),
                // Oversized: more than MAX_FRAME bytes.
                Box::new(|q| q.desc(&mem, 0, 0x10000, MAX_FRAME as u32 + 1, 0, 0)),
                // Shorter than a header and an Ethernet header.
                Box::new(|q| q.desc(&mem, 0, frame, 20, 0, 0)),
                // Next index beyond the queue.
                Box::new(|q| q.desc(&mem, 0, frame, 20, NEXT, 200)),
            ];
            for (i, case) in cases.iter().enumerate() {
                case(&q);
                q.submit(&mem, 0);
                net.transmit(&mut q.queue, &mem);
                assert_eq!(net.stats.tx_malformed, i as u64 + 1, "case {i}");
            }
            // Offloads the driver did not negotiate: a partial checksum, a TSO frame, a
            // GSO type that does not exist.
            for (flags, gso) in [(HDR_F_NEEDS_CSUM, GSO_NONE), (0, GSO_TCPV4), (0, 9)] {
                hdr(&mem, frame, flags, gso);
                q.desc(&mem, 0, frame, good, 0, 0);
                q.submit(&mem, 0);
                net.transmit(&mut q.queue, &mem);
            }
            assert_eq!(net.stats.tx_malformed, cases.len() as u64 + 3);
            // Header and frame split over two descriptors, as drivers do: sent.
            hdr(&mem, frame, 0, GSO_NONE);
            q.desc(&mem, 0, frame, VNET_HDR_LEN as u32, NEXT, 1);
            q.desc(&mem, 1, frame + VNET_HDR_LEN as u64, 60, 0, 0);
            q.submit(&mem, 0);
            net.transmit(&mut q.queue, &mem);
            assert_eq!((net.stats.tx_frames, net.stats.tx_dropped), (1, 0));
            // Every chain went back to the driver.
            assert_eq!(q.used_idx(&mem), cases.len() as u16 + 4);
        });
    }

    #[test]
    fn a_driver_index_beyond_the_queue_does_not_spin_transmit() {
        in_netns(
            "a_driver_index_beyond_the_queue_does_not_spin_transmit",
            |_| {
                let mut net = Net::new("rvu0", [2, 0, 0, 0, 0, 1]).unwrap();
                net.activate(0);
                let mem = memory();
                let q = TestQueue::new(&mem, 0x1000);
                // The driver claims 1000 chains in a queue of far fewer: nothing can be popped.
                mem.write_obj(1000u16, GA(0x1000 + 0x1000 + 2)).unwrap();
                let mut queue = q.queue;
                assert!(!net.transmit(&mut queue, &mem));
                assert_eq!(net.stats.tx_frames + net.stats.tx_malformed, 0);
            },
        );
    }

    #[test]
    fn receive_skips_bad_buffers_drops_what_does_not_fit_and_delivers_the_rest() {
        in_netns(
            "receive_skips_bad_buffers_drops_what_does_not_fit_and_delivers_the_rest",
            |ns| {
                let mut net = Net::new("rvu0", [2, 0, 0, 0, 0, 1]).unwrap();
                let mem = memory();
                let mut q = TestQueue::new(&mem, 0x1000);
                net.activate(0);
                // Broadcast pings leave through the TAP every 20 ms: frames to receive.
                let mut pinger = ns
                    .command("ping")
                    .args(["-b", "-c", "500", "-i", "0.02", "10.88.0.255"])
                    .stdout(std::process::Stdio::null())
                    .stderr(std::process::Stdio::null())
                    .spawn()
                    .unwrap();
                let next = |net: &mut Net, q: &mut TestQueue| {
                    let before = net.stats;
                    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
                    while net.stats == before {
                        assert!(
                            std::time::Instant::now() < deadline,
                            "no frame from the TAP"
                        );
                        net.receive(&mut q.queue, &mem);
                        std::thread::sleep(std::time::Duration::from_millis(5));
                    }
                };
                // A buffer the device may not write to: returned unused, the frame kept.
                q.desc(&mem, 0, 0x8000, 2048, 0, 0);
                q.submit(&mem, 0);
                next(&mut net, &mut q);
                assert_eq!(net.stats.rx_malformed, 1);
                // Too small for the frame (no MRG_RXBUF): the frame is dropped.
                q.desc(&mem, 1, 0x8000, 20, WRITE, 0);
                q.submit(&mem, 1);
                next(&mut net, &mut q);
                assert_eq!(net.stats.rx_dropped, 1);
                // A good buffer gets a whole frame: header with num_buffers 1, then Ethernet.
                mem.write_slice(&[0xaa; 64], GA(0x9000)).unwrap();
                q.desc(&mem, 2, 0x9000, 2048, WRITE, 0);
                q.submit(&mem, 2);
                next(&mut net, &mut q);
                assert_eq!(net.stats.rx_frames, 1);
                let (id, len) = q.used(&mem, q.used_idx(&mem) - 1);
                assert_eq!(id, 2);
                assert!(len as usize >= VNET_HDR_LEN + 42, "{len}");
                let num_buffers: u16 = mem.read_obj(GA(0x9000 + 10)).unwrap();
                assert_eq!(num_buffers, 1);
                let mut src = [0u8; 6];
                mem.read_slice(&mut src, GA(0x9000 + VNET_HDR_LEN as u64 + 6))
                    .unwrap();
                assert_ne!(src, [0xaa; 6], "an Ethernet source address was written");
                // No buffers left: the TAP leaves the epoll set (no busy loop) until the driver
                // adds one.
                let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
                while net.rx_armed {
                    assert!(
                        std::time::Instant::now() < deadline,
                        "TAP still watched without receive buffers"
                    );
                    net.receive(&mut q.queue, &mem);
                    std::thread::sleep(std::time::Duration::from_millis(5));
                }
                let held = net.stats;
                // A new buffer re-arms it and gets the frame that waited.
                q.desc(&mem, 3, 0x9000, 2048, WRITE, 0);
                q.submit(&mem, 3);
                net.receive(&mut q.queue, &mem);
                assert_eq!(net.stats.rx_frames, held.rx_frames + 1);
                let _ = pinger.kill();
                let _ = pinger.wait();
            },
        );
    }

    #[test]
    fn mergeable_receive_spreads_a_frame_over_small_buffers() {
        in_netns(
            "mergeable_receive_spreads_a_frame_over_small_buffers",
            |ns| {
                let mut net = Net::new("rvu0", [2, 0, 0, 0, 0, 1]).unwrap();
                let mem = memory();
                let mut q = TestQueue::new(&mem, 0x1000);
                net.activate(feature::MRG_RXBUF);
                let mut pinger = ns
                    .command("ping")
                    .args(["-b", "-c", "500", "-i", "0.02", "10.88.0.255"])
                    .stdout(std::process::Stdio::null())
                    .stderr(std::process::Stdio::null())
                    .spawn()
                    .unwrap();
                // Two 32-byte buffers cannot hold a broadcast ping (12 + 98 bytes): the frame waits
                // and the buffers stay the driver's.
                for i in 0..2u16 {
                    q.desc(&mem, i, 0x8000 + u64::from(i) * 0x100, 32, WRITE, 0);
                    q.submit(&mem, i);
                }
                let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
                while net.rx_armed {
                    assert!(
                        std::time::Instant::now() < deadline,
                        "no frame from the TAP"
                    );
                    net.receive(&mut q.queue, &mem);
                    std::thread::sleep(std::time::Duration::from_millis(5));
                }
                assert_eq!(
                    q.used_idx(&mem),
                    0,
                    "buffers of a frame that did not fit were used"
                );
                assert_eq!(net.stats.rx_frames, 0);
                // Enough buffers now: the frame spans four of them.
                for i in 2..4u16 {
                    q.desc(&mem, i, 0x8000 + u64::from(i) * 0x100, 32, WRITE, 0);
                    q.submit(&mem, i);
                }
                net.receive(&mut q.queue, &mem);
                assert_eq!(net.stats.rx_frames, 1, "{:?}", net.stats);
                // The first frame (whatever the namespace sent first: a ping or IPv6 chatter) did
                // not fit in two buffers; it takes the first `n` of the four, in order.
                let n = q.used_idx(&mem);
                assert!((3..=4).contains(&n), "{n} buffers used");
                let lens: Vec<u32> = (0..n).map(|i| q.used(&mem, i).1).collect();
                assert!(
                    lens.iter().sum::<u32>() > 64
                        && lens[..n as usize - 1].iter().all(|&l| l == 32),
                    "{lens:?}"
                );
                assert_eq!(
                    (0..n).map(|i| q.used(&mem, i).0).collect::<Vec<_>>(),
                    (0..u32::from(n)).collect::<Vec<_>>()
                );
                let num_buffers: u16 = mem.read_obj(GA(0x8000 + 10)).unwrap();
                assert_eq!(num_buffers, n);
                let _ = pinger.kill();
                let _ = pinger.wait();
            },
        );
    }
}
