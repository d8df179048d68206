//! Restoring a snapshot into a VM shell: the clone data path (see docs/ARCHITECTURE.md,
//! "Data flow of a clone"). [`Vmm::restore_into`] reads top to bottom as that path: open and
//! check the snapshot, apply the per-clone options, map (or copy, or serve) guest memory, wire
//! the devices, load device, VM and vCPU state, write the new identity.

use std::time::{Duration, Instant};

use kvm_ioctls::Kvm;
use snapshot::{HostFingerprint, SnapshotDir};
use vmm_api::{MemoryMode, RestoreOptions};

use crate::boot;
use crate::config::VmConfig;
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
        let host = HostFingerprint::current(kvm.get_api_version());
        let (source, snap) = read_snapshot(&opts.dir, &host)?;
        let shell = Shell::with_kvm(kvm, snap.config.mem_mib, snap.config.vcpus)?;
        Self::restore_snapshot(shell, source, snap, &host, opts, control)
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
        let host = HostFingerprint::current(shell.kvm.get_api_version());
        let (source, snap) = read_snapshot(&opts.dir, &host)?;
        Self::restore_snapshot(shell, source, snap, &host, opts, control)
    }

    fn restore_snapshot(
        mut shell: Shell,
        source: SnapshotDir,
        snap: MachineSnapshot,
        host: &HostFingerprint,
        opts: &RestoreOptions,
        mut control: ControlPlane,
    ) -> Result<Self, VmmError> {
        let t0 = Instant::now();
        let generation = persist::next_generation(snap.generation)?;
        let config = clone_config(&snap, opts)?;
        check_fits(&shell, &source, &snap, &config)?;
        if let Some(path) = &opts.control {
            if control.has_listener() {
                return Err(VmmError::Invalid(
                    "this VMM already serves a control socket, which the clone keeps: omit control"
                        .into(),
                ));
            }
            control.merge(ControlPlane::bind(path)?);
        }
        let pages = map_memory(&mut shell, &source, host, opts)?;
        let mut vmm = Self::assemble(config, shell, control)?;
        vmm.pages = pages;
        vmm.mem_mode = Some(opts.mem_mode);
        for (t, state) in vmm.transports.iter().zip(&snap.devices) {
            t.lock_or_recover()
                .restore(state)
                .map_err(|e| VmmError::Mismatch(format!("restoring a virtio device: {e}")))?;
        }
        persist::restore_vm(&vmm.vm, &snap.vm)?;
        for (fd, state) in vmm.vcpu_fds.iter().zip(&snap.vcpus) {
            let refused = persist::restore_vcpu(&fd.lock_or_recover(), state)?;
            if !refused.is_empty() {
                tracing::debug!(?refused, "host refused MSRs on restore; skipped");
            }
        }
        vmm.generation = generation;
        boot::write_identity(&vmm.ram.mem, generation, &opts.clone_id)?;
        boot::write_identity_net(&vmm.ram.mem, vmm.config.net.as_ref())?;
        vmm.source = Some(source);
        vmm.awaiting_activation = opts.paused.into();
        tracing::debug!(elapsed = ?t0.elapsed(), mode = ?opts.mem_mode, "VM restored");
        Ok(vmm)
    }
}

/// The snapshot's configuration with the per-clone settings of `opts`: console, debug log,
/// control socket, vsock socket, replaced block files (each the size of the one it replaces).
fn clone_config(snap: &MachineSnapshot, opts: &RestoreOptions) -> Result<VmConfig, VmmError> {
    let mut config = snap.config.clone();
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
    if let Some(net) = &opts.net {
        if config.net.is_none() {
            return Err(VmmError::Mismatch(
                "network settings were given but the snapshot has no network device".into(),
            ));
        }
        config.net = Some(net.clone());
    }
    for o in &opts.block {
        let (Some(b), Some(&bytes)) =
            (config.block.get_mut(o.index), snap.block_bytes.get(o.index))
        else {
            return Err(VmmError::Mismatch(format!(
                "block override {}: the snapshot has {} block devices",
                o.index,
                snap.config.block.len()
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
    Ok(config)
}

/// Checks that the state, the memory file and the shell all fit the snapshot's configuration.
fn check_fits(
    shell: &Shell,
    source: &SnapshotDir,
    snap: &MachineSnapshot,
    config: &VmConfig,
) -> Result<(), VmmError> {
    let devices = config.device_count();
    if snap.vcpus.len() != usize::from(config.vcpus) || snap.devices.len() != devices {
        return Err(VmmError::Mismatch(format!(
            "snapshot state does not match its config: {} vCPU states for {} vCPUs, {} device states for {devices} devices",
            snap.vcpus.len(),
            config.vcpus,
            snap.devices.len()
        )));
    }
    if source.mem_size() != config.mem_mib << 20 {
        return Err(VmmError::Mismatch(format!(
            "{} holds {} bytes of guest RAM, the snapshot's config says {} MiB",
            source.memory_path().display(),
            source.mem_size(),
            config.mem_mib
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
    Ok(())
}

/// Puts the snapshot's memory under the shell's memslots: copied into fresh RAM, mapped
/// copy-on-write, or (uffd) mapped or left empty and served by a page server that records or
/// prefetches the working set.
fn map_memory(
    shell: &mut Shell,
    source: &SnapshotDir,
    host: &HostFingerprint,
    opts: &RestoreOptions,
) -> Result<Option<PageServer>, VmmError> {
    let memory = source.memory();
    Ok(match opts.mem_mode {
        MemoryMode::Copy => {
            let memfd = shell.ram.map_memfd()?;
            snapshot::memory::copy_from(memory, source.memory_path(), &memfd, source.mem_size())?;
            None
        }
        MemoryMode::Cow => {
            shell.ram.map_file_private(memory.clone())?;
            None
        }
        MemoryMode::Uffd => {
            // PVM-like hosts emulate guest code with accesses that never wait on userfaultfd (an
            // unserved page reads as all-ones): no lazy serving there.
            let mode = uffd::mode_for(memory, !host.pvm_like);
            if mode == uffd::FaultMode::Missing {
                shell.ram.map_anonymous()?;
            } else {
                shell.ram.map_file_private(memory.clone())?;
            }
            Some(PageServer::start(
                &shell.ram,
                source,
                mode,
                Duration::from_millis(opts.record_ms),
            )?)
        }
    })
}
