//! The virtio-mmio transport, version 2 (virtio 1.2, section 4.2.2).

use std::sync::Arc;

use virtio_queue::{Queue, QueueT};
use vmm_sys_util::eventfd::EventFd;

use super::{VirtioDevice, VIRTIO_F_VERSION_1};
use crate::devices::bus::BusDevice;
use crate::memory::GuestMemory;

const MAGIC: u32 = 0x7472_6976; // "virt"
const VENDOR: u32 = 0x5255_4e56; // "RUNV"
/// Offset of `QueueNotify`, where the VMM registers one ioeventfd per queue.
pub const QUEUE_NOTIFY: u64 = 0x50;
const INT_VRING: u32 = 1;
/// Interrupt status bit of a configuration change (`VIRTIO_MMIO_INT_CONFIG`).
pub const INT_CONFIG: u32 = 2;

/// Device status bits.
mod status {
    pub const DRIVER_OK: u32 = 4;
    pub const FEATURES_OK: u32 = 8;
    pub const NEEDS_RESET: u32 = 0x40;
    pub const FAILED: u32 = 0x80;
}

/// Saved state of one virtqueue (mirrors `virtio_queue::QueueState`, which is not serde).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct QueueSnapshot {
    /// Maximum size offered by the device.
    pub max_size: u16,
    /// Next available-ring index the device will read.
    pub next_avail: u16,
    /// Next used-ring index the device will write.
    pub next_used: u16,
    /// `VIRTIO_F_RING_EVENT_IDX` negotiated.
    pub event_idx_enabled: bool,
    /// Size the driver selected.
    pub size: u16,
    /// Configuration finished.
    pub ready: bool,
    /// Descriptor table address.
    pub desc_table: u64,
    /// Available ring address.
    pub avail_ring: u64,
    /// Used ring address.
    pub used_ring: u64,
}

/// Saved state of a virtio-mmio transport (the device back-end is recreated from the config).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TransportState {
    /// Virtio device type, checked on restore.
    pub device_type: u32,
    /// Device status register.
    pub status: u32,
    /// Features the driver accepted.
    pub driver_features: u64,
    /// Feature word selectors and queue selector.
    pub selectors: [u32; 3],
    /// Pending interrupt bits.
    pub interrupt_status: u32,
    /// Configuration generation.
    pub config_generation: u32,
    /// Every queue.
    pub queues: Vec<QueueSnapshot>,
}

/// A virtio device as seen through its MMIO window.
pub struct MmioTransport {
    device: Box<dyn VirtioDevice>,
    mem: GuestMemory,
    queues: Vec<Queue>,
    queue_evts: Vec<EventFd>,
    irq: Arc<EventFd>,
    interrupt_status: u32,
    status: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u32,
    config_generation: u32,
}

impl MmioTransport {
    /// Wraps `device`; its queue eventfds and irqfd are created here for the VMM to register.
    pub fn new(mem: GuestMemory, device: Box<dyn VirtioDevice>) -> std::io::Result<Self> {
        let mut queues = Vec::new();
        let mut queue_evts = Vec::new();
        for &max in device.queue_max_sizes() {
            queues.push(Queue::new(max).map_err(|e| std::io::Error::other(e.to_string()))?);
            queue_evts.push(EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)?);
        }
        Ok(Self {
            device,
            mem,
            queues,
            queue_evts,
            irq: Arc::new(EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)?),
            interrupt_status: 0,
            status: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            queue_sel: 0,
            config_generation: 0,
        })
    }

    /// The notification eventfd of each queue (register as ioeventfds on `QUEUE_NOTIFY`).
    pub fn queue_events(&self) -> &[EventFd] {
        &self.queue_evts
    }

    /// The interrupt eventfd (register as an irqfd on the device's GSI).
    pub fn irq(&self) -> &EventFd {
        &self.irq
    }

    /// Saves the transport and queue state (the caller keeps the device from running).
    pub fn save(&self) -> TransportState {
        TransportState {
            device_type: self.device.device_type(),
            status: self.status,
            driver_features: self.driver_features,
            selectors: [
                self.device_features_sel,
                self.driver_features_sel,
                self.queue_sel,
            ],
            interrupt_status: self.interrupt_status,
            config_generation: self.config_generation,
            queues: self
                .queues
                .iter()
                .map(|q| {
                    let s = q.state();
                    QueueSnapshot {
                        max_size: s.max_size,
                        next_avail: s.next_avail,
                        next_used: s.next_used,
                        event_idx_enabled: s.event_idx_enabled,
                        size: s.size,
                        ready: s.ready,
                        desc_table: s.desc_table,
                        avail_ring: s.avail_ring,
                        used_ring: s.used_ring,
                    }
                })
                .collect(),
        }
    }

    /// Restores saved state into this freshly created transport, then lets the device react to
    /// the restore (vsock: a transport reset event). A queue the state describes wrongly is
    /// refused; one that points outside guest memory marks the device NEEDS_RESET, as when a
    /// driver configures it so.
    pub fn restore(&mut self, s: &TransportState) -> Result<(), String> {
        if s.device_type != self.device.device_type() || s.queues.len() != self.queues.len() {
            return Err(format!(
                "snapshot has a device of type {} with {} queues where the config has type {} with {}",
                s.device_type,
                s.queues.len(),
                self.device.device_type(),
                self.queues.len()
            ));
        }
        let mut queues = Vec::with_capacity(s.queues.len());
        for (i, (q, max)) in s
            .queues
            .iter()
            .zip(self.device.queue_max_sizes())
            .enumerate()
        {
            if q.max_size != *max {
                return Err(format!(
                    "queue {i}: max size {} in the snapshot, {max} here",
                    q.max_size
                ));
            }
            let state = virtio_queue::QueueState {
                max_size: q.max_size,
                next_avail: q.next_avail,
                next_used: q.next_used,
                event_idx_enabled: q.event_idx_enabled,
                size: q.size,
                ready: q.ready,
                desc_table: q.desc_table,
                avail_ring: q.avail_ring,
                used_ring: q.used_ring,
            };
            queues.push(Queue::try_from(state).map_err(|e| format!("queue {i}: {e}"))?);
        }
        self.queues = queues;
        self.status = s.status;
        self.driver_features = s.driver_features;
        [
            self.device_features_sel,
            self.driver_features_sel,
            self.queue_sel,
        ] = s.selectors;
        self.interrupt_status = s.interrupt_status;
        self.config_generation = s.config_generation;
        if self.status & status::DRIVER_OK != 0
            && self
                .queues
                .iter()
                .any(|q| q.ready() && !q.is_valid(&self.mem))
        {
            tracing::warn!("virtio: restored queue is invalid; device needs reset");
            self.status |= status::NEEDS_RESET;
        }
        if self.active() {
            self.device.activate(self.driver_features);
            let used = self.device.restored(&mut self.queues, &self.mem);
            self.interrupt(&used);
        }
        Ok(())
    }

    fn device_features(&self) -> u64 {
        self.device.features() | VIRTIO_F_VERSION_1
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        // Queue configuration is only writable before DRIVER_OK.
        if self.status & status::DRIVER_OK != 0 {
            return None;
        }
        self.queues.get_mut(self.queue_sel as usize)
    }

    fn reset(&mut self) {
        for q in &mut self.queues {
            q.reset();
        }
        self.interrupt_status = 0;
        self.status = 0;
        self.driver_features = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.queue_sel = 0;
    }

    fn set_status(&mut self, v: u32) {
        if v == 0 {
            self.reset();
            return;
        }
        if v & status::FEATURES_OK != 0 && self.status & status::FEATURES_OK == 0 {
            // Features the driver accepted must be a subset of ours and include VERSION_1.
            let f = self.driver_features;
            if f & !self.device_features() != 0 || f & VIRTIO_F_VERSION_1 == 0 {
                self.status = v & !status::FEATURES_OK;
                return;
            }
        }
        if v & status::DRIVER_OK != 0 && self.status & status::DRIVER_OK == 0 {
            let event_idx = self.driver_features
                & (1 << virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX)
                != 0;
            for q in &mut self.queues {
                q.set_event_idx(event_idx);
                if q.ready() && !q.is_valid(&self.mem) {
                    tracing::warn!("virtio: guest configured an invalid queue; device needs reset");
                    self.status = v | status::NEEDS_RESET;
                    return;
                }
            }
            self.status = v;
            if self.active() {
                self.device.activate(self.driver_features);
            }
            return;
        }
        self.status = v;
    }

    fn active(&self) -> bool {
        self.status & status::DRIVER_OK != 0
            && self.status & (status::NEEDS_RESET | status::FAILED) == 0
    }

    /// Processes queue `index` after a notification (from the ioeventfd or a trapped write).
    pub fn notify(&mut self, index: usize) {
        if !self.active() || !self.queues.get(index).is_some_and(|q| q.ready()) {
            return;
        }
        let used = self
            .device
            .process_queue(index, &mut self.queues, &self.mem);
        self.interrupt(&used);
    }

    /// The device back-end, e.g. to swap a block device's backing file; call
    /// [`MmioTransport::config_changed`] after changing its configuration space.
    pub fn device_mut(&mut self) -> &mut dyn VirtioDevice {
        &mut *self.device
    }

    /// The device back-end.
    pub fn device(&self) -> &dyn VirtioDevice {
        &*self.device
    }

    /// Tells the driver that the configuration space changed: bumps the configuration
    /// generation and, once the driver is up, raises a configuration-change interrupt.
    pub fn config_changed(&mut self) {
        self.config_generation = self.config_generation.wrapping_add(1);
        if self.active() {
            self.interrupt_status |= INT_CONFIG;
            if let Err(e) = self.irq.write(1) {
                tracing::warn!("virtio: raising the configuration interrupt failed: {e}");
            }
        }
    }

    /// The back-end's fd for the device loop, if it has one.
    pub fn backend_fd(&self) -> Option<std::os::fd::RawFd> {
        self.device.backend_fd()
    }

    /// Runs the back-end after its fd became readable.
    pub fn backend_event(&mut self) {
        // Always let the back-end consume its events (accepting clients, say); it touches only
        // queues the driver made ready.
        let used = self.device.process_backend(&mut self.queues, &self.mem);
        if self.active() {
            self.interrupt(&used);
        }
    }

    fn interrupt(&mut self, used: &[usize]) {
        let needed = used.iter().any(|&i| {
            self.queues
                .get_mut(i)
                .is_some_and(|q| q.needs_notification(&self.mem).unwrap_or(true))
        });
        if needed {
            self.interrupt_status |= INT_VRING;
            if let Err(e) = self.irq.write(1) {
                tracing::warn!("virtio: raising the interrupt failed: {e}");
            }
        }
    }

    fn read_reg(&mut self, offset: u64) -> u32 {
        let q = self.queues.get(self.queue_sel as usize);
        match offset {
            0x00 => MAGIC,
            0x04 => 2,
            0x08 => self.device.device_type(),
            0x0c => VENDOR,
            0x10 => match self.device_features_sel {
                0 => self.device_features() as u32,
                1 => (self.device_features() >> 32) as u32,
                _ => 0,
            },
            0x34 => q.map_or(0, |q| u32::from(q.max_size())),
            0x44 => q.map_or(0, |q| u32::from(q.ready())),
            0x60 => self.interrupt_status,
            0x70 => self.status,
            0xfc => self.config_generation,
            _ => 0,
        }
    }

    fn write_reg(&mut self, offset: u64, v: u32) {
        match offset {
            0x14 => self.device_features_sel = v,
            0x20 if self.status & status::FEATURES_OK == 0 => match self.driver_features_sel {
                0 => self.driver_features = (self.driver_features & !0xffff_ffff) | u64::from(v),
                1 => {
                    self.driver_features =
                        (self.driver_features & 0xffff_ffff) | (u64::from(v) << 32)
                }
                _ => {}
            },
            0x24 => self.driver_features_sel = v,
            0x30 => self.queue_sel = v,
            0x38 => {
                if let Some(q) = self.selected_queue() {
                    q.set_size(v as u16);
                }
            }
            0x44 => {
                if let Some(q) = self.selected_queue() {
                    q.set_ready(v == 1);
                }
            }
            QUEUE_NOTIFY => self.notify(v as usize),
            0x64 => self.interrupt_status &= !v,
            0x70 => self.set_status(v),
            0x80 | 0x84 | 0x90 | 0x94 | 0xa0 | 0xa4 => {
                let (lo, hi) = if offset & 4 == 0 {
                    (Some(v), None)
                } else {
                    (None, Some(v))
                };
                if let Some(q) = self.selected_queue() {
                    match offset & !4 {
                        0x80 => q.set_desc_table_address(lo, hi),
                        0x90 => q.set_avail_ring_address(lo, hi),
                        _ => q.set_used_ring_address(lo, hi),
                    }
                }
            }
            _ => {}
        }
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= 0x100 {
            self.device.read_config(offset - 0x100, data);
        } else if let Ok(out) = <&mut [u8; 4]>::try_from(&mut *data) {
            *out = self.read_reg(offset).to_le_bytes();
        } else {
            data.fill(0);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        // Our devices have read-only configuration; registers are 32-bit only.
        if let (true, Ok(bytes)) = (offset < 0x100, <[u8; 4]>::try_from(data)) {
            self.write_reg(offset, u32::from_le_bytes(bytes));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::block::Block;
    use crate::devices::virtio::testing::memory;

    fn transport() -> (MmioTransport, tempfile::NamedTempFile) {
        let f = tempfile::NamedTempFile::new().unwrap();
        f.as_file().set_len(4096).unwrap();
        let blk = Block::new(f.path(), false, None).unwrap();
        (MmioTransport::new(memory(), Box::new(blk)).unwrap(), f)
    }

    fn rd(t: &mut MmioTransport, off: u64) -> u32 {
        let mut b = [0u8; 4];
        t.read(off, &mut b);
        u32::from_le_bytes(b)
    }

    fn wr(t: &mut MmioTransport, off: u64, v: u32) {
        t.write(off, &v.to_le_bytes());
    }

    /// Drives the driver side of initialisation up to FEATURES_OK with `features`.
    fn negotiate(t: &mut MmioTransport, features: u64) -> u32 {
        wr(t, 0x70, 0);
        wr(t, 0x70, 3);
        wr(t, 0x24, 0);
        wr(t, 0x20, features as u32);
        wr(t, 0x24, 1);
        wr(t, 0x20, (features >> 32) as u32);
        wr(t, 0x70, 3 | status::FEATURES_OK);
        rd(t, 0x70)
    }

    fn setup_queue(t: &mut MmioTransport, desc: u64, avail: u64, used: u64) {
        wr(t, 0x30, 0);
        wr(t, 0x38, 16);
        for (off, addr) in [(0x80, desc), (0x90, avail), (0xa0, used)] {
            wr(t, off, addr as u32);
            wr(t, off + 4, (addr >> 32) as u32);
        }
        wr(t, 0x44, 1);
    }

    #[test]
    fn identifies_and_negotiates() {
        let (mut t, _f) = transport();
        assert_eq!(rd(&mut t, 0x00), MAGIC);
        assert_eq!(rd(&mut t, 0x04), 2);
        assert_eq!(rd(&mut t, 0x08), 2);
        wr(&mut t, 0x14, 1);
        assert_eq!(rd(&mut t, 0x10) & 1, 1, "VERSION_1 offered");
        // Without VERSION_1, FEATURES_OK does not stick.
        assert_eq!(negotiate(&mut t, 0) & status::FEATURES_OK, 0);
        // Features we never offered are refused too.
        assert_eq!(
            negotiate(&mut t, VIRTIO_F_VERSION_1 | (1 << 40)) & status::FEATURES_OK,
            0
        );
        let event_idx = 1u64 << virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
        let st = negotiate(&mut t, VIRTIO_F_VERSION_1 | event_idx);
        assert_ne!(st & status::FEATURES_OK, 0);
        setup_queue(&mut t, 0x1000, 0x2000, 0x3000);
        wr(&mut t, 0x70, st | status::DRIVER_OK);
        assert_eq!(rd(&mut t, 0x70) & status::NEEDS_RESET, 0);
        assert!(
            t.queues[0].event_idx_enabled(),
            "EVENT_IDX reaches the queue"
        );
        // Queue registers are frozen after DRIVER_OK; a reset clears everything.
        wr(&mut t, 0x38, 4);
        assert_eq!(t.queues[0].size(), 16);
        wr(&mut t, 0x70, 0);
        assert_eq!(rd(&mut t, 0x70), 0);
        assert!(!t.queues[0].ready());
    }

    #[test]
    fn config_changes_bump_the_generation_and_interrupt_a_live_driver() {
        let (mut t, _f) = transport();
        t.config_changed();
        assert_eq!(rd(&mut t, 0xfc), 1);
        assert_eq!(rd(&mut t, 0x60), 0, "no interrupt before DRIVER_OK");
        let st = negotiate(&mut t, VIRTIO_F_VERSION_1);
        setup_queue(&mut t, 0x1000, 0x2000, 0x3000);
        wr(&mut t, 0x70, st | status::DRIVER_OK);
        let _ = t.irq().read();
        t.config_changed();
        assert_eq!(rd(&mut t, 0xfc), 2);
        assert_eq!(rd(&mut t, 0x60), INT_CONFIG);
        assert_eq!(t.irq().read().unwrap(), 1, "irqfd signalled");
        wr(&mut t, 0x64, INT_CONFIG);
        assert_eq!(rd(&mut t, 0x60), 0);
    }

    #[test]
    fn queue_outside_guest_memory_needs_reset() {
        let (mut t, _f) = transport();
        let st = negotiate(&mut t, VIRTIO_F_VERSION_1);
        setup_queue(&mut t, 0x1_0000_0000, 0x2000, 0x3000);
        wr(&mut t, 0x70, st | status::DRIVER_OK);
        assert_ne!(rd(&mut t, 0x70) & status::NEEDS_RESET, 0);
        // Notifications to a broken device are ignored, not a crash.
        wr(&mut t, QUEUE_NOTIFY, 0);
        wr(&mut t, QUEUE_NOTIFY, 99);
        assert_eq!(rd(&mut t, 0x60), 0);
    }

    #[test]
    fn odd_accesses_are_harmless() {
        let (mut t, _f) = transport();
        let mut b = [0xaau8; 2];
        t.read(0x00, &mut b);
        assert_eq!(b, [0, 0], "non-32-bit register reads return zeros");
        t.write(0x70, &[1, 2]);
        assert_eq!(rd(&mut t, 0x70), 0);
        wr(&mut t, 0x30, 7);
        assert_eq!(
            rd(&mut t, 0x34),
            0,
            "a queue that does not exist has size 0"
        );
        let mut cap = [0u8; 8];
        t.read(0x100, &mut cap);
        assert_eq!(
            u64::from_le_bytes(cap),
            8,
            "config space: capacity in sectors"
        );
        let mut beyond = [0xffu8; 4];
        t.read(0x1000, &mut beyond);
        assert_eq!(beyond, [0; 4]);
    }

    #[test]
    fn saved_state_round_trips_and_bad_state_is_refused() {
        let (mut t, _f) = transport();
        let st = negotiate(&mut t, VIRTIO_F_VERSION_1);
        setup_queue(&mut t, 0x1000, 0x2000, 0x3000);
        wr(&mut t, 0x70, st | status::DRIVER_OK);
        let saved = t.save();
        let (mut fresh, _g) = transport();
        fresh.restore(&saved).unwrap();
        assert_eq!(fresh.save(), saved);
        assert_ne!(rd(&mut fresh, 0x70) & status::DRIVER_OK, 0);

        let mut wrong_type = saved.clone();
        wrong_type.device_type = 19;
        let e = fresh.restore(&wrong_type).unwrap_err();
        assert!(e.contains("type 19"), "{e}");
        let mut wrong_max = saved.clone();
        wrong_max.queues[0].max_size = 7;
        assert!(fresh.restore(&wrong_max).unwrap_err().contains("max size"));
        let mut bad_size = saved.clone();
        bad_size.queues[0].size = 3;
        assert!(fresh.restore(&bad_size).unwrap_err().contains("queue 0"));
        // A queue outside guest memory restores as NEEDS_RESET, as if the driver had set it.
        let mut outside = saved;
        outside.queues[0].desc_table = 1 << 40;
        fresh.restore(&outside).unwrap();
        assert_ne!(rd(&mut fresh, 0x70) & status::NEEDS_RESET, 0);
    }
}
