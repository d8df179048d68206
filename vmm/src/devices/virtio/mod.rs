//! Virtio devices behind the virtio-mmio transport.
//!
//! The transport ([`mmio::MmioTransport`]) owns feature negotiation, the queues and the status
//! state machine; it is driven by vCPU MMIO exits for its registers and by the device loop for
//! queue notifications (KVM ioeventfds on `QueueNotify`), and interrupts the guest through an
//! irqfd. Back-ends implement [`VirtioDevice`]. Every descriptor the guest hands over is untrusted:
//! a bad address, loop, over-long chain or wrong direction fails that request, never the VMM.

use virtio_queue::Queue;

use crate::memory::GuestMemory;

pub mod block;
#[doc(hidden)]
pub mod fuzzing;
pub mod mmio;
pub mod net;
pub mod tap;
#[cfg(test)]
pub mod testing;
pub mod vsock;

/// Virtio device type ids (virtio 1.2, section 5).
pub mod device_type {
    /// Network device.
    pub const NET: u32 = 1;
    /// Block device.
    pub const BLOCK: u32 = 2;
    /// Socket device.
    pub const VSOCK: u32 = 19;
}

/// `VIRTIO_F_VERSION_1`.
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;

/// A virtio device back-end.
pub trait VirtioDevice: Send {
    /// Virtio device type id.
    fn device_type(&self) -> u32;
    /// Maximum size of each queue; the length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// Features offered to the driver (the transport adds `VIRTIO_F_VERSION_1`).
    fn features(&self) -> u64;
    /// The device configuration space (read-only for our devices).
    fn config_space(&self) -> &[u8];
    /// Reads the device configuration space; bytes beyond it read as 0.
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(self.config_space(), offset, data);
    }
    /// Processes a notification of queue `index`; `queues` are all of the device's queues.
    /// Returns the indices of queues whose used rings changed (to interrupt the guest).
    fn process_queue(
        &mut self,
        index: usize,
        queues: &mut [Queue],
        mem: &GuestMemory,
    ) -> Vec<usize>;
    /// An fd (typically an epoll fd of the back-end's own sockets) the device loop watches for
    /// readability; when it fires, [`VirtioDevice::process_backend`] runs.
    fn backend_fd(&self) -> Option<std::os::fd::RawFd> {
        None
    }
    /// The driver set DRIVER_OK having accepted `driver_features` (also called after a restore
    /// of a driven device); e.g. virtio-net configures the TAP's offloads here.
    fn activate(&mut self, _driver_features: u64) {}
    /// Called once after the transport state was restored from a snapshot into a fresh device
    /// (host-side connections are gone); returns the queues whose used rings changed.
    fn restored(&mut self, _queues: &mut [Queue], _mem: &GuestMemory) -> Vec<usize> {
        Vec::new()
    }
    /// This device as a block device (whose backing file can be swapped), if it is one.
    fn as_block_mut(&mut self) -> Option<&mut block::Block> {
        None
    }
    /// This device as a block device, if it is one.
    fn as_block(&self) -> Option<&block::Block> {
        None
    }
    /// Handles back-end events; returns the queues whose used rings changed.
    fn process_backend(&mut self, _queues: &mut [Queue], _mem: &GuestMemory) -> Vec<usize> {
        Vec::new()
    }
}

/// Runs `f` on queue `index` (when it exists); `Some(index)` when `f` says the used ring changed.
pub fn used_if(
    queues: &mut [Queue],
    index: usize,
    f: impl FnOnce(&mut Queue) -> bool,
) -> Option<usize> {
    queues.get_mut(index).is_some_and(f).then_some(index)
}

/// Serves every chain the driver made available on `queue`, one at a time with `serve`, which
/// answers with the chain's head and the length it wrote. Re-checks after re-enabling notifications (EVENT_IDX) so no chain is
/// missed, but stops when more is announced that cannot be popped (a driver index beyond the
/// queue size): a guest must not spin the device loop (found by fuzz/virtio_blk and virtio_net).
/// Returns whether the used ring changed, and whether it stopped because the used ring could
/// not be written.
pub fn drain_queue(
    queue: &mut Queue,
    mem: &GuestMemory,
    mut serve: impl FnMut(virtio_queue::DescriptorChain<&GuestMemory>) -> (u16, u32),
) -> (bool, bool) {
    use virtio_queue::QueueT;
    let mut used = false;
    loop {
        if queue.disable_notification(mem).is_err() {
            return (used, false);
        }
        let mut popped = false;
        while let Some(chain) = queue.pop_descriptor_chain(mem) {
            popped = true;
            let (head, len) = serve(chain);
            if queue.add_used(mem, head, len).is_err() {
                return (used, true);
            }
            used = true;
        }
        match queue.enable_notification(mem) {
            Ok(true) if popped => continue,
            _ => return (used, false),
        }
    }
}

/// Copies `src[offset..]` into `data`, zero-filling beyond the end.
pub fn read_config_bytes(src: &[u8], offset: u64, data: &mut [u8]) {
    for (i, b) in data.iter_mut().enumerate() {
        *b = usize::try_from(offset)
            .ok()
            .and_then(|o| o.checked_add(i))
            .and_then(|o| src.get(o))
            .copied()
            .unwrap_or(0);
    }
}
