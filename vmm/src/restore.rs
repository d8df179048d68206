//! Restoring a snapshot into a VM shell: the clone data path (see docs/ARCHITECTURE.md,
//! "Data flow of a clone").

use std::sync::Arc;
use std::time::Instant;

use kvm_ioctls::Kvm;
use vmm_api::{MemoryMode, RestoreOptions};

use crate::boot;
use crate::error::{io_err, VmmError};
use crate::machine::{read_snapshot, MachineSnapshot};
use crate::persist;
use crate::serve::ControlPlane;
use crate::shell::Shell;
use crate::sync::LockOrRecover;
use crate::uffd::{self, PageServer};
use crate::vmm::Vmm;

impl Vmm {
    /// Restores a snapshot into a new VM; see [`Vmm::restore_into`].
    pub fn restore(opts: &RestoreOptions) -> Result<Self, VmmError> {
        Self::restore_with(opts, ControlPlane::default())
    }

    /// [`Vmm::restore`] serving `control` (e.g. an inherited control connection) besides
    /// `opts.control`.
    pub fn restore_with(opts: &RestoreOptions, control: ControlPlane) -> Result<Self, VmmError> {
        opts.validate().map_err(VmmError::Invalid)?;
        let kvm = Kvm::new().map_err(VmmError::Kvm)?;
        let host = snapshot::HostFingerprint::current(kvm.get_api_version());
        let snap = read_snapshot(&opts.dir, &host)?;
        let shell = Shell::with_kvm(kvm, snap.config.mem_mib, snap.config.vcpus)?;
        Self::restore_snapshot(shell, snap, &host, opts, control)
    }

    /// Restores the snapshot in `opts.dir` into a pre-created `shell` whose vCPUs never ran:
    /// guest memory is mapped (and, in `uffd` mode, served) first, then devices, VM and vCPU
    /// state. The guest sees a new identity generation, `opts.clone_id` and fresh entropy.
    pub fn restore_into(
        shell: Shell,
        opts: &RestoreOptions,
        control: ControlPlane,
    ) -> Result<Self, VmmError> {
        opts.validate().map_err(VmmError::Invalid)?;
        let host = snapshot::HostFingerprint::current(shell.kvm.get_api_version());
        let snap = read_snapshot(&opts.dir, &host)?;
        Self::restore_snapshot(shell, snap, &host, opts, control)
    }

    fn restore_snapshot(
        mut shell: Shell,
        snap: MachineSnapshot,
        host: &snapshot::HostFingerprint,
        opts: &RestoreOptions,
        mut control: ControlPlane,
    ) -> Result<Self, VmmError> {
        let t0 = Instant::now();
        let generation = persist::next_generation(snap.generation)?;
        if let Some(path) = &opts.control {
            if control.has_listener() {
                return Err(VmmError::Invalid(
                    "this VMM already serves a control socket, which the clone keeps: omit control"
                        .into(),
                ));
            }
            control.merge(ControlPlane::bind(path)?);
        }
        let mut config = snap.config;
        config.serial = opts.serial.clone();
        config.debug_log = opts.debug_log.clone();
        config.control = opts.control.clone();
        if let Some(uds) = &opts.vsock_uds {
            match &mut config.vsock {
                Some(v) => v.uds = uds.clone(),
                None => {
                    return Err(VmmError::Mismatch(
                        "a vsock socket was given but the snapshot has no vsock device".into(),
                    ))
                }
            }
        }
        for o in &opts.block {
            let (Some(b), Some(&bytes)) =
                (config.block.get_mut(o.index), snap.block_bytes.get(o.index))
            else {
                return Err(VmmError::Mismatch(format!(
                    "block override {}: the snapshot has {} block devices",
                    o.index,
                    config.block.len()
                )));
            };
            let len = std::fs::metadata(&o.path)
                .map_err(io_err(format!("block override {}", o.path.display())))?
                .len();
            if len != bytes {
                return Err(VmmError::Mismatch(format!(
                    "block override {} is {len} bytes; the snapshot's device {} has {bytes}: use a file of the same size",
                    o.path.display(),
                    o.index
                )));
            }
            b.path = o.path.clone();
        }
        config.validate_machine()?;
        let devices = config.block.len() + usize::from(config.vsock.is_some());
        if snap.vcpus.len() != usize::from(config.vcpus) || snap.devices.len() != devices {
            return Err(VmmError::Mismatch(format!(
                "snapshot state does not match its config: {} vCPU states for {} vCPUs, {} device states for {devices} devices",
                snap.vcpus.len(),
                config.vcpus,
                snap.devices.len()
            )));
        }
        if shell.ram.size != config.mem_mib << 20 || shell.vcpus() != config.vcpus {
            return Err(VmmError::Mismatch(format!(
                "the shell has {} MiB and {} vCPUs; the snapshot needs {} MiB and {}: use a shell of the template's size",
                shell.ram.size >> 20,
                shell.vcpus(),
                config.mem_mib,
                config.vcpus
            )));
        }
        let mem_path = opts.dir.join(snapshot::memory::MEMORY_FILE);
        let mem_file = std::fs::File::open(&mem_path)
            .map_err(io_err(format!("opening {}", mem_path.display())))?;
        let mem_len = mem_file
            .metadata()
            .map_err(io_err(format!("reading {}", mem_path.display())))?
            .len();
        if mem_len != shell.ram.size {
            return Err(VmmError::Mismatch(format!(
                "{} is {mem_len} bytes, the snapshot's guest RAM is {} (truncated or from another snapshot?)",
                mem_path.display(),
                shell.ram.size
            )));
        }
        let mem_file = Arc::new(mem_file);
        let pages = match opts.mem_mode {
            MemoryMode::Copy => {
                let memfd = shell.ram.map_memfd()?;
                snapshot::memory::copy_from(&mem_file, &mem_path, &memfd)?;
                None
            }
            MemoryMode::Cow => {
                shell.ram.map_file_private(mem_file)?;
                None
            }
            MemoryMode::Uffd => {
                // PVM-like hosts emulate guest code with accesses that never wait on
                // userfaultfd (an unserved page reads as all-ones): no lazy serving there.
                let mode = uffd::mode_for(&mem_file, !host.pvm_like);
                if mode == uffd::FaultMode::Missing {
                    shell.ram.map_anonymous()?;
                } else {
                    shell.ram.map_file_private(mem_file.clone())?;
                }
                Some(PageServer::start(
                    &shell.ram,
                    mem_file,
                    &opts.dir,
                    mode,
                    std::time::Duration::from_millis(opts.record_ms),
                )?)
            }
        };
        let mut vmm = Self::assemble(config, shell, control)?;
        vmm.pages = pages;
        vmm.mem_mode = Some(opts.mem_mode);
        vmm.source = Some(opts.dir.clone());
        for (t, state) in vmm.transports.iter().zip(&snap.devices) {
            t.lock()
                .unwrap_or_else(|p| p.into_inner())
                .restore(state)
                .map_err(|e| VmmError::Mismatch(format!("restoring a virtio device: {e}")))?;
        }
        persist::restore_vm(&vmm.vm, &snap.vm)?;
        for (fd, state) in vmm.vcpu_fds.iter().zip(&snap.vcpus) {
            let fd = fd.lock_or_recover();
            let refused = persist::restore_vcpu(&fd, state)?;
            if !refused.is_empty() {
                tracing::debug!(?refused, "host refused MSRs on restore; skipped");
            }
        }
        vmm.generation = generation;
        boot::write_identity(&vmm.ram.mem, vmm.generation, &opts.clone_id)?;
        tracing::debug!(elapsed = ?t0.elapsed(), mode = ?opts.mem_mode, "VM restored");
        Ok(vmm)
    }
}
