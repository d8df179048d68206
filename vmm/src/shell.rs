//! VM shells: everything a VM has before it has a guest, made ahead of time.
//!
//! A shell pays for everything KVM needs before a clone is requested: KVM VM, memslots over
//! reserved anonymous RAM, irqchip, PIT and vCPUs that never ran (~0.4 ms here, most of the rest
//! of a VM's ~8 ms setup was a wait that the memslots-first order avoids, see below). A restore then maps the clone's memory over the
//! reservation with `MAP_FIXED` (the memslots stay valid) and loads device, VM and vCPU state.
//! `runv-vmm --shell` keeps one waiting for a `restore` request ([`crate::serve::shell_loop`]).

use std::time::Instant;

use kvm_bindings::{kvm_pit_config, kvm_userspace_memory_region, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};

use crate::config::{MAX_MEM_MIB, MAX_VCPUS, MIN_MEM_MIB};
use crate::error::{vm_err, VmmError};
use crate::memory::GuestRam;

/// A KVM VM without a guest yet.
pub struct Shell {
    pub(crate) kvm: Kvm,
    pub(crate) vm: VmFd,
    pub(crate) ram: GuestRam,
    pub(crate) vcpu_fds: Vec<VcpuFd>,
}

impl Shell {
    /// Creates a VM with `mem_mib` MiB of reserved RAM and `vcpus` fresh vCPUs.
    pub fn create(mem_mib: u64, vcpus: u8) -> Result<Self, VmmError> {
        Self::with_kvm(Kvm::new().map_err(VmmError::Kvm)?, mem_mib, vcpus)
    }

    /// [`Shell::create`] on an already opened `/dev/kvm`.
    pub fn with_kvm(kvm: Kvm, mem_mib: u64, vcpus: u8) -> Result<Self, VmmError> {
        if !(MIN_MEM_MIB..=MAX_MEM_MIB).contains(&mem_mib) || !(1..=MAX_VCPUS).contains(&vcpus) {
            return Err(VmmError::Invalid(format!(
                "a shell of {mem_mib} MiB and {vcpus} vCPUs: use {MIN_MEM_MIB}..={MAX_MEM_MIB} MiB and 1..={MAX_VCPUS} vCPUs"
            )));
        }
        let t0 = Instant::now();
        let ram = GuestRam::reserve(mem_mib << 20)?;
        let vm = kvm.create_vm().map_err(vm_err("KVM_CREATE_VM"))?;
        vm.set_tss_address(0xfffb_d000)
            .map_err(vm_err("KVM_SET_TSS_ADDR"))?;
        // Memslots before the irqchip: once an in-kernel irqchip exists, the first
        // KVM_SET_USER_MEMORY_REGION of a VM waits ~7.5 ms of wall time on our hosts; before it,
        // it costs ~0.04 ms, and teardown halves too (measured by `examples/irqchip_order.rs`).
        for (slot, (host, guest, size)) in ram.regions().into_iter().enumerate() {
            let region = kvm_userspace_memory_region {
                slot: slot as u32,
                flags: 0,
                guest_phys_addr: guest,
                memory_size: size,
                userspace_addr: host,
            };
            // SAFETY: the region is a live mapping owned by `ram`, which lives as long as the
            // VM fd (the shell, then the Vmm, own both); later MAP_FIXED replacements keep the
            // same addresses and size.
            unsafe { vm.set_user_memory_region(region) }
                .map_err(vm_err("KVM_SET_USER_MEMORY_REGION"))?;
        }
        vm.create_irq_chip().map_err(vm_err("KVM_CREATE_IRQCHIP"))?;
        vm.create_pit2(kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        })
        .map_err(vm_err("KVM_CREATE_PIT2"))?;
        let vcpu_fds = (0..vcpus)
            .map(|id| vm.create_vcpu(u64::from(id)))
            .collect::<Result<Vec<_>, _>>()
            .map_err(vm_err("KVM_CREATE_VCPU"))?;
        tracing::debug!(elapsed = ?t0.elapsed(), "VM shell created");
        Ok(Self {
            kvm,
            vm,
            ram,
            vcpu_fds,
        })
    }

    /// Number of vCPUs.
    pub fn vcpus(&self) -> u8 {
        self.vcpu_fds.len() as u8
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn out_of_range_shells_are_refused() {
        for (mem, vcpus) in [(8, 1), (1 << 20, 1), (64, 0), (64, 9)] {
            let e = Shell::create(mem, vcpus)
                .err()
                .expect("refused")
                .to_string();
            assert!(e.contains("MiB") && e.contains("vCPUs"), "{e}");
        }
    }
}
