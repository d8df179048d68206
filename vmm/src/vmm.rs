//! The VM: building one from its configuration, booting it, and running it until it ends.
//! Restoring one is [`crate::restore`], snapshotting [`crate::save`], device wiring
//! [`crate::assemble`], the loops that serve it [`crate::serve`].

use std::os::fd::RawFd;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use crossbeam_channel::Receiver;
use kvm_bindings::KVM_MAX_CPUID_ENTRIES;
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use vmm_api::MemoryMode;
use vmm_sys_util::eventfd::EventFd;

use crate::assemble::{Backend, QueueEvent};
use crate::boot::{self, BootError, BootInfo};
use crate::config::{BootProtocol, VmConfig};
use crate::cpu::{self, CpuError};
use crate::devices::bus::Bus;
use crate::devices::virtio::mmio::MmioTransport;
use crate::error::{io_err, vm_err, VmmError};
use crate::memory::GuestRam;
use crate::serve::device_loop::DeviceLoop;
use crate::serve::ControlPlane;
use crate::shell::Shell;
use crate::sync::LockOrRecover;
use crate::uffd::{self, PageServer};
use crate::vcpu::{self, RunControl, VcpuThread};
use crate::{ExitReason, ExitSignal};

/// A built VM, ready to [`run`](Vmm::run).
pub struct Vmm {
    // Dropped first: the fault handler must stop before guest RAM is unmapped.
    pub(crate) pages: Option<PageServer>,
    pub(crate) config: VmConfig,
    pub(crate) ram: GuestRam,
    pub(crate) kvm: Kvm,
    // Keeps the VM fd (and so the irqchip, PIT and memslots) alive for the vCPUs' lifetime.
    pub(crate) vm: VmFd,
    // Locked by the vCPU thread around each KVM_RUN; free while the vCPU is paused, when the
    // device loop reads its state for a snapshot.
    pub(crate) vcpu_fds: Vec<Arc<Mutex<VcpuFd>>>,
    pub(crate) cmdline: String,
    pub(crate) generation: u64,
    pub(crate) pio: Arc<Bus>,
    pub(crate) mmio: Arc<Bus>,
    pub(crate) exit: Arc<ExitSignal>,
    pub(crate) control: ControlPlane,
    pub(crate) reports: Option<Receiver<String>>,
    pub(crate) queue_events: Vec<QueueEvent>,
    pub(crate) backends: Vec<Backend>,
    pub(crate) transports: Vec<Arc<Mutex<MmioTransport>>>,
    pub(crate) mem_mode: Option<MemoryMode>,
    /// Set for a clone restored paused that has not run yet: `run` starts its vCPUs parked and
    /// `activate` gives it its identity.
    pub(crate) awaiting_activation: std::sync::atomic::AtomicBool,
    /// The snapshot a clone was restored from (its files back the clone's memory).
    pub(crate) source: Option<snapshot::SnapshotDir>,
    // irqfds must outlive the VM's use of them.
    pub(crate) _irq_fds: Vec<EventFd>,
}

impl Vmm {
    /// Builds the VM: memory, KVM VM and vCPUs, boot state and devices. Nothing runs yet.
    pub fn build(config: VmConfig) -> Result<Self, VmmError> {
        config.validate()?;
        let t0 = Instant::now();
        let control = match &config.control {
            Some(path) => ControlPlane::bind(path)?,
            None => ControlPlane::default(),
        };
        let mut shell = Shell::create(config.mem_mib, config.vcpus)?;
        shell.ram.map_memfd()?;
        let vmm = Self::assemble(config, shell, control)?;
        vmm.boot()?;
        tracing::debug!(elapsed = ?t0.elapsed(), "VM built");
        Ok(vmm)
    }

    /// Counters of the userfaultfd page server (`uffd` restores only).
    pub fn uffd_stats(&self) -> Option<uffd::UffdStats> {
        self.pages.as_ref().map(PageServer::stats)
    }

    /// Loads the kernel and writes the boot state: memory structures and vCPU registers.
    fn boot(&self) -> Result<(), VmmError> {
        let (config, ram) = (&self.config, &self.ram);
        let (entry, setup_header) = boot::load_kernel(&ram.mem, &config.kernel)?;
        let initrd = match &config.initrd {
            Some(p) => Some(boot::load_initrd(&ram.mem, p, ram.size, entry.kernel_end)?),
            None => None,
        };
        let info = BootInfo {
            mem_size: ram.size,
            cmdline: &self.cmdline,
            initrd,
            setup_header,
        };
        let pvh_entry = match (config.boot_protocol, entry.pvh_entry) {
            (BootProtocol::Linux64, _) => None,
            (BootProtocol::Auto, e) => e,
            (BootProtocol::Pvh, Some(e)) => Some(e),
            (BootProtocol::Pvh, None) => return Err(BootError::NoPvhEntry.into()),
        };
        match pvh_entry {
            Some(_) => boot::write_pvh_start_info(&ram.mem, &info)?,
            None => boot::write_boot_params(&ram.mem, &info)?,
        }
        boot::write_cpu_tables(&ram.mem)?;
        boot::write_mptable(&ram.mem, config.vcpus)?;
        boot::write_identity(&ram.mem, 0, "")?;
        boot::write_identity_net(&ram.mem, config.net.as_ref())?;

        let supported = self
            .kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(vm_err("KVM_GET_SUPPORTED_CPUID"))?;
        for (id, fd) in self.vcpu_fds.iter().enumerate() {
            let id = id as u8;
            let fd = fd.lock_or_recover();
            let kvm_err = |op| {
                move |source| CpuError::Kvm {
                    op,
                    cpu: id,
                    source,
                }
            };
            fd.set_cpuid2(&cpu::vcpu_cpuid(&supported, id, config.vcpus))
                .map_err(kvm_err("KVM_SET_CPUID2"))?;
            cpu::set_boot_msrs(&fd, id)?;
            cpu::set_lint(&fd, id)?;
            if id == 0 {
                let sregs = fd.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?;
                let (regs, sregs) = match pvh_entry {
                    Some(e) => (boot::pvh_regs(e), boot::pvh_sregs(sregs)),
                    None => (boot::boot_regs(entry.entry), boot::boot_sregs(sregs)),
                };
                fd.set_regs(&regs).map_err(kvm_err("KVM_SET_REGS"))?;
                fd.set_sregs(&sregs).map_err(kvm_err("KVM_SET_SREGS"))?;
                fd.set_fpu(&boot::boot_fpu())
                    .map_err(kvm_err("KVM_SET_FPU"))?;
            }
        }
        Ok(())
    }

    /// Debug reports of the guest (only with `debug_log` set); readable while the VM runs.
    pub fn reports(&self) -> Option<Receiver<String>> {
        self.reports.clone()
    }

    /// A handle that ends the VM from another thread.
    pub fn exit_handle(&self) -> Arc<ExitSignal> {
        self.exit.clone()
    }

    /// Takes over a shell's control plane: its connections (the one that asked for the restore
    /// included) and its socket.
    pub(crate) fn adopt_control(&mut self, plane: ControlPlane) {
        let own = std::mem::take(&mut self.control);
        self.control = plane;
        self.control.merge(own);
    }

    /// Runs the VM until it ends; `term_fd` (a signalfd for SIGTERM/SIGINT) also ends it.
    ///
    /// Every vCPU thread is joined and every fd and socket file is released before returning.
    pub fn run(mut self, term_fd: Option<RawFd>) -> Result<ExitReason, VmmError> {
        vcpu::install_kick_handler().map_err(io_err("installing the vCPU kick handler"))?;
        let mut plane = std::mem::take(&mut self.control);
        let ctl = Arc::new(RunControl::new(
            self.awaiting_activation
                .load(std::sync::atomic::Ordering::Relaxed),
        ));
        let mut threads: Vec<VcpuThread> = Vec::new();
        for (id, fd) in self.vcpu_fds.iter().enumerate() {
            match vcpu::spawn(
                id as u8,
                fd.clone(),
                self.pio.clone(),
                self.mmio.clone(),
                self.exit.clone(),
                ctl.clone(),
            ) {
                Ok(t) => threads.push(t),
                Err(e) => {
                    vcpu::stop(&ctl, &mut threads);
                    return Err(io_err("spawning a vCPU thread")(e));
                }
            }
        }
        let result = DeviceLoop {
            vmm: &self,
            ctl: &ctl,
            threads: &threads,
        }
        .run(term_fd, &mut plane);
        vcpu::stop(&ctl, &mut threads);
        result?;
        Ok(self.exit.reason().unwrap_or(ExitReason::Shutdown))
    }
}
