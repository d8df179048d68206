//! Virtio devices and the virtio-mmio transport.
//!
//! Contract between the transport (`mmio.rs`, driven on vCPU threads through MMIO exits) and the
//! device back-ends (`vsock/`, `block.rs`, driven on the device event loop thread):
//! - the transport owns feature negotiation, queue configuration and the status state machine;
//! - on `DRIVER_OK` it calls [`VirtioDevice::activate`] with the configured queues, their
//!   notification eventfds (registered with KVM as ioeventfds by the VMM builder) and the
//!   interrupt trigger (an irqfd);
//! - the device processes queues on the event loop (it is an `event_manager::MutEventSubscriber`)
//!   and signals the guest through [`IrqTrigger`].
//!
//! Every descriptor the guest hands us is untrusted: bad addresses, loops, over-long chains and
//! wrong directions end in a device-level error (the request is failed or the device marks itself
//! `NEEDS_RESET`), never in a panic.

use std::sync::atomic::{AtomicU32, Ordering};

use vmm_sys_util::eventfd::EventFd;

use crate::memory::GuestMemory;

pub mod block;
pub mod mmio;
pub mod vsock;

/// Virtio device type ids (virtio 1.2, section 5).
pub mod device_type {
    /// Block device.
    pub const BLOCK: u32 = 2;
    /// Socket (vsock) device.
    pub const VSOCK: u32 = 19;
}

/// `VIRTIO_MMIO_INT_VRING`: the device used a buffer.
pub const INT_VRING: u32 = 0x1;
/// `VIRTIO_MMIO_INT_CONFIG`: the configuration changed.
pub const INT_CONFIG: u32 = 0x2;

/// The interrupt line of one virtio-mmio device: the `InterruptStatus` register plus an irqfd.
#[derive(Debug)]
pub struct IrqTrigger {
    /// Value of the `InterruptStatus` register, read and acknowledged by the transport.
    pub status: AtomicU32,
    /// irqfd wired by the VMM builder to the device's GSI.
    pub evt: EventFd,
}

impl IrqTrigger {
    /// Creates a trigger with a fresh non-blocking eventfd.
    pub fn new() -> std::io::Result<Self> {
        Ok(Self {
            status: AtomicU32::new(0),
            evt: EventFd::new(libc::EFD_NONBLOCK)?,
        })
    }

    /// Raises `kind` ([`INT_VRING`] or [`INT_CONFIG`]) and injects the interrupt.
    pub fn trigger(&self, kind: u32) -> std::io::Result<()> {
        self.status.fetch_or(kind, Ordering::SeqCst);
        self.evt.write(1)
    }
}

/// What a device receives when the driver sets `DRIVER_OK`.
pub struct ActivateContext {
    /// Guest memory the queues live in.
    pub mem: GuestMemory,
    /// Interrupt line shared with the transport.
    pub interrupt: std::sync::Arc<IrqTrigger>,
    /// The queues, configured and validated by the transport, in queue-index order.
    pub queues: Vec<virtio_queue::Queue>,
    /// Notification eventfd of each queue (same order), already registered as ioeventfds.
    pub queue_events: Vec<EventFd>,
    /// Features the driver acknowledged (a subset of [`VirtioDevice::avail_features`]).
    pub acked_features: u64,
}

/// Error activating a device.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    /// Wrong number of queues handed over.
    #[error("device expects {expected} queues, got {got}")]
    QueueCount {
        /// Queues the device needs.
        expected: usize,
        /// Queues received.
        got: usize,
    },
    /// The device back-end failed to start (socket, file, eventfd).
    #[error("device back-end failed to activate: {0}")]
    Backend(String),
}

/// A virtio device back-end behind the virtio-mmio transport.
pub trait VirtioDevice: Send {
    /// Virtio device type id ([`device_type`]).
    fn device_type(&self) -> u32;
    /// Maximum size of each queue; the length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// Features offered to the driver (must include `VIRTIO_F_VERSION_1`).
    fn avail_features(&self) -> u64;
    /// Reads the device-specific configuration space at `offset`; out-of-range bytes read as 0.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes the device-specific configuration space; out-of-range writes are ignored.
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// Starts processing the queues.
    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError>;
    /// Stops the device after the driver wrote 0 to `Status`; returns the queue eventfds so the
    /// transport can reuse them, or `None` if the device was not active.
    fn reset(&mut self) -> Option<Vec<EventFd>>;
}
