//! Devices: the PIO/MMIO buses, legacy PC devices and virtio-mmio devices.

pub mod bus;
pub mod legacy;
pub mod virtio;
