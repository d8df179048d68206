//! Guest RAM: a memfd mapped into the VMM and registered with KVM.

/// Guest memory as used by the whole VMM and its devices.
pub type GuestMemory = vm_memory::GuestMemoryMmap<()>;
