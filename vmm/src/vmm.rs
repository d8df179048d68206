//! Building a VM from its configuration and running its device loop.

use std::collections::HashMap;
use std::fs::OpenOptions;
use std::io::{ErrorKind, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixListener;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use crossbeam_channel::{Receiver, Sender};
use kvm_bindings::KVM_MAX_CPUID_ENTRIES;
use kvm_ioctls::{IoEventAddress, Kvm, VcpuFd, VmFd};
use serde_json::json;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use crate::boot::{self, BootError, BootInfo};
use crate::config::{BootProtocol, SerialOutput, VmConfig};
use crate::control::{self, Connection, ControlError, Request, SocketFile};
use crate::cpu::{self, CpuError};
use crate::devices::bus::Bus;
use crate::devices::legacy::{DebugPort, EventFdTrigger, Serial, Sink, I8042};
use crate::devices::virtio::block::Block;
use crate::devices::virtio::mmio::{MmioTransport, TransportState, QUEUE_NOTIFY};
use crate::devices::virtio::vsock::Vsock;
use crate::devices::virtio::VirtioDevice;
use crate::layout::*;
use crate::memory::{Backing, GuestRam, MemoryError};
use crate::persist;
use crate::shell::Shell;
use crate::uffd::{self, PageServer, UffdError};
use crate::vcpu::{self, RunControl, VcpuThread};
use crate::{ExitReason, ExitSignal};

/// Error building or running a VM.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    /// Invalid configuration.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// /dev/kvm unusable.
    #[error("opening /dev/kvm failed: {0} (is KVM available and are you allowed to use it?)")]
    Kvm(kvm_ioctls::Error),
    /// A VM-level KVM ioctl failed.
    #[error("{op} failed: {source}")]
    VmIoctl {
        /// The ioctl.
        op: &'static str,
        /// Cause.
        source: kvm_ioctls::Error,
    },
    /// Guest memory.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// Boot state.
    #[error(transparent)]
    Boot(#[from] BootError),
    /// vCPU configuration.
    #[error(transparent)]
    Cpu(#[from] CpuError),
    /// A block device's backing file.
    #[error(transparent)]
    Block(#[from] crate::devices::virtio::block::BlockError),
    /// Snapshot state file.
    #[error(transparent)]
    Snapshot(#[from] snapshot::SnapshotError),
    /// Snapshot memory file.
    #[error(transparent)]
    SnapshotMemory(#[from] snapshot::memory::MemoryFileError),
    /// KVM state save/restore.
    #[error(transparent)]
    Persist(#[from] crate::persist::PersistError),
    /// userfaultfd page serving.
    #[error(transparent)]
    Uffd(#[from] UffdError),
    /// A snapshot does not fit the shell or the restore options.
    #[error("{0}")]
    Mismatch(String),
    /// The vsock device.
    #[error(transparent)]
    Vsock(#[from] crate::devices::virtio::vsock::VsockError),
    /// Control socket.
    #[error(transparent)]
    Control(#[from] ControlError),
    /// Opening an output file, an eventfd, a thread, epoll.
    #[error("{what}: {source}")]
    Io {
        /// What failed.
        what: String,
        /// Cause.
        source: std::io::Error,
    },
}

pub(crate) fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> VmmError {
    let what = what.into();
    move |source| VmmError::Io { what, source }
}

/// Registers `fd` for input on `epoll` under `token`.
pub(crate) fn epoll_add(epoll: &Epoll, fd: RawFd, token: u64) -> Result<(), VmmError> {
    epoll
        .ctl(
            ControlOperation::Add,
            fd,
            EpollEvent::new(EventSet::IN, token),
        )
        .map_err(io_err("registering an fd with epoll"))
}

/// Waits for events (no timeout), retrying on EINTR; returns how many arrived.
pub(crate) fn epoll_wait(epoll: &Epoll, events: &mut [EpollEvent]) -> Result<usize, VmmError> {
    loop {
        match epoll.wait(-1, events) {
            Ok(n) => return Ok(n),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(io_err("waiting on epoll")(e)),
        }
    }
}

/// Makes an accepted control stream a [`Connection`] watched by `epoll` under its fd.
pub(crate) fn register_connection(
    epoll: &Epoll,
    conns: &mut HashMap<u64, Connection>,
    stream: std::os::unix::net::UnixStream,
) -> Result<(), VmmError> {
    if let Ok(c) = Connection::new(stream) {
        let token = c.stream.as_raw_fd() as u64;
        epoll_add(epoll, c.stream.as_raw_fd(), token)?;
        conns.insert(token, c);
    }
    Ok(())
}

pub(crate) fn vm_err(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmmError {
    move |source| VmmError::VmIoctl { op, source }
}

fn bind_control(
    path: Option<&std::path::Path>,
) -> Result<Option<(UnixListener, SocketFile)>, VmmError> {
    Ok(match path {
        Some(p) => Some((control::bind_unix(p)?, SocketFile(p.to_path_buf()))),
        None => None,
    })
}

fn open_sink(spec: &str) -> Result<Sink, VmmError> {
    if spec == "-" {
        return Ok(Box::new(std::io::stdout()));
    }
    let f = OpenOptions::new()
        .create(true)
        .append(true)
        .open(spec)
        .map_err(io_err(format!("opening {spec}")))?;
    Ok(Box::new(f))
}

/// A built VM, ready to [`run`](Vmm::run).
pub struct Vmm {
    // Dropped first: the fault handler must stop before guest RAM is unmapped.
    pages: Option<PageServer>,
    config: VmConfig,
    ram: GuestRam,
    kvm: Kvm,
    // Keeps the VM fd (and so the irqchip, PIT and memslots) alive for the vCPUs' lifetime.
    vm: VmFd,
    // Locked by the vCPU thread around each KVM_RUN; free while the vCPU is paused, when the
    // device loop reads its state for a snapshot.
    vcpu_fds: Vec<Arc<Mutex<VcpuFd>>>,
    cmdline: String,
    generation: u64,
    pio: Arc<Bus>,
    mmio: Arc<Bus>,
    exit: Arc<ExitSignal>,
    control: Option<(UnixListener, SocketFile)>,
    reports: Option<Receiver<String>>,
    queue_events: Vec<QueueEvent>,
    backends: Vec<Backend>,
    transports: Vec<Arc<Mutex<MmioTransport>>>,
    mem_mode: Option<MemoryMode>,
    // irqfds must outlive the VM's use of them.
    _irq_fds: Vec<EventFd>,
}

/// How a restore maps the snapshot's memory.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum MemoryMode {
    /// Read the memory file into fresh guest RAM.
    Copy,
    /// Map the memory file copy-on-write: clones share its page cache, writes stay private.
    Cow,
    /// `cow` served through userfaultfd, with working-set record and prefetch.
    Uffd,
}

fn default_mem_mode() -> MemoryMode {
    MemoryMode::Cow
}

fn default_record_ms() -> u64 {
    2000
}

/// A block device whose backing file a restore replaces.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct BlockOverride {
    /// Index of the device in the snapshot's config (`--block` order).
    pub index: usize,
    /// New backing file; it must have the same size as the snapshot's.
    pub path: std::path::PathBuf,
}

/// Per-clone settings of a restore (also the body of the control `restore` command).
#[derive(Debug, Clone, serde::Deserialize)]
pub struct RestoreOptions {
    /// Snapshot directory.
    pub dir: std::path::PathBuf,
    /// Memory mode.
    #[serde(default = "default_mem_mode")]
    pub mem_mode: MemoryMode,
    /// Clone id written into the identity page.
    #[serde(default)]
    pub clone_id: String,
    /// Serial console of the clone.
    #[serde(default)]
    pub serial: SerialOutput,
    /// Debug report log of the clone.
    #[serde(default)]
    pub debug_log: Option<String>,
    /// Control socket of the clone (a shell keeps its own).
    #[serde(default)]
    pub control: Option<std::path::PathBuf>,
    /// Host-side Unix socket of the clone's vsock device.
    #[serde(default)]
    pub vsock_uds: Option<std::path::PathBuf>,
    /// Replaced block backing files.
    #[serde(default)]
    pub block: Vec<BlockOverride>,
    /// `uffd` mode: how long the first clone records its working set, in milliseconds.
    #[serde(default = "default_record_ms")]
    pub record_ms: u64,
}

impl RestoreOptions {
    /// Options for restoring `dir` in `mem_mode` with defaults for everything else.
    pub fn new(dir: impl Into<std::path::PathBuf>, mem_mode: MemoryMode) -> Self {
        Self {
            dir: dir.into(),
            mem_mode,
            clone_id: String::new(),
            serial: SerialOutput::default(),
            debug_log: None,
            control: None,
            vsock_uds: None,
            block: Vec::new(),
            record_ms: default_record_ms(),
        }
    }
}

/// What `state.bin` of a runv snapshot holds.
#[derive(serde::Serialize, serde::Deserialize)]
pub struct MachineSnapshot {
    /// The VM's configuration (devices, sizes); per-clone fields are overridden on restore.
    pub config: VmConfig,
    /// Identity generation at snapshot time.
    pub generation: u64,
    /// VM-wide KVM state.
    pub vm: persist::VmState,
    /// Per-vCPU KVM state.
    pub vcpus: Vec<persist::VcpuState>,
    /// virtio-mmio transports in MMIO slot order (block devices, then vsock).
    pub devices: Vec<TransportState>,
    /// Size of each block device's backing file (a replacement must match).
    pub block_bytes: Vec<u64>,
}

/// Opens the snapshot in `dir` (state checked, taken on a host like `host`; memory file opened
/// and tied to the state by the snapshot id).
// snapshot: returns the opened SnapshotDir too (was read_state + a later memory.bin open).
pub fn read_snapshot(
    dir: &std::path::Path,
    host: &snapshot::HostFingerprint,
) -> Result<(snapshot::SnapshotDir, MachineSnapshot), VmmError> {
    Ok(snapshot::SnapshotDir::open(dir, Some(host))?)
}

impl Vmm {
    /// Builds the VM: memory, KVM VM and vCPUs, boot state and devices. Nothing runs yet.
    pub fn build(config: VmConfig) -> Result<Self, VmmError> {
        config.validate()?;
        let t0 = Instant::now();
        let control = bind_control(config.control.as_deref())?;
        let mut shell = Shell::create(config.mem_mib, config.vcpus)?;
        shell.ram.map_memfd()?;
        let vmm = Self::assemble(config, shell, control)?;
        vmm.boot()?;
        tracing::debug!(elapsed = ?t0.elapsed(), "VM built");
        Ok(vmm)
    }

    /// Restores a snapshot into a new VM; see [`Vmm::restore_into`].
    pub fn restore(opts: &RestoreOptions) -> Result<Self, VmmError> {
        let kvm = Kvm::new().map_err(VmmError::Kvm)?;
        let host = snapshot::HostFingerprint::current(kvm.get_api_version());
        let (snap_dir, snap) = read_snapshot(&opts.dir, &host)?;
        let control = bind_control(opts.control.as_deref())?;
        let shell = Shell::with_kvm(kvm, snap.config.mem_mib, snap.config.vcpus)?;
        Self::restore_snapshot(shell, snap_dir, snap, &host, opts, control)
    }

    /// Restores the snapshot in `opts.dir` into a pre-created `shell` whose vCPUs never ran:
    /// guest memory is mapped (and, in `uffd` mode, served) first, then devices, VM and vCPU
    /// state. The guest sees a new identity generation, `opts.clone_id` and fresh entropy.
    pub fn restore_into(
        shell: Shell,
        opts: &RestoreOptions,
        control: Option<(UnixListener, SocketFile)>,
    ) -> Result<Self, VmmError> {
        let host = snapshot::HostFingerprint::current(shell.kvm.get_api_version());
        let (snap_dir, snap) = read_snapshot(&opts.dir, &host)?;
        Self::restore_snapshot(shell, snap_dir, snap, &host, opts, control)
    }

    fn restore_snapshot(
        mut shell: Shell,
        snap_dir: snapshot::SnapshotDir,
        snap: MachineSnapshot,
        host: &snapshot::HostFingerprint,
        opts: &RestoreOptions,
        control: Option<(UnixListener, SocketFile)>,
    ) -> Result<Self, VmmError> {
        let t0 = Instant::now();
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
        // snapshot: memory.bin was opened and checked (trailer id, length) by SnapshotDir::open.
        if snap_dir.mem_size() != shell.ram.size {
            return Err(VmmError::Mismatch(format!(
                "{} holds {} bytes of guest RAM, the snapshot's config says {}",
                snap_dir.memory_path().display(),
                snap_dir.mem_size(),
                shell.ram.size
            )));
        }
        let mem_file = snap_dir.memory().clone();
        let pages = match opts.mem_mode {
            MemoryMode::Copy => {
                let memfd = shell.ram.map_memfd()?;
                snapshot::memory::copy_from(
                    &mem_file,
                    snap_dir.memory_path(),
                    &memfd,
                    snap_dir.mem_size(),
                )?;
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
                    shell.ram.map_file_private(mem_file)?;
                }
                Some(PageServer::start(
                    &shell.ram,
                    &snap_dir,
                    mode,
                    std::time::Duration::from_millis(opts.record_ms),
                )?)
            }
        };
        let mut vmm = Self::assemble(config, shell, control)?;
        vmm.pages = pages;
        vmm.mem_mode = Some(opts.mem_mode);
        for (t, state) in vmm.transports.iter().zip(&snap.devices) {
            t.lock()
                .unwrap_or_else(|p| p.into_inner())
                .restore(state)
                .map_err(|e| VmmError::Mismatch(format!("restoring a virtio device: {e}")))?;
        }
        persist::restore_vm(&vmm.vm, &snap.vm)?;
        for (fd, state) in vmm.vcpu_fds.iter().zip(&snap.vcpus) {
            let fd = fd.lock().unwrap_or_else(|p| p.into_inner());
            let refused = persist::restore_vcpu(&fd, state)?;
            if !refused.is_empty() {
                tracing::debug!(?refused, "host refused MSRs on restore; skipped");
            }
        }
        vmm.generation = snap.generation + 1;
        boot::write_identity(&vmm.ram.mem, vmm.generation, &opts.clone_id)?;
        tracing::debug!(elapsed = ?t0.elapsed(), mode = ?opts.mem_mode, "VM restored");
        Ok(vmm)
    }

    /// Counters of the userfaultfd page server (`uffd` restores only).
    pub fn uffd_stats(&self) -> Option<uffd::UffdStats> {
        self.pages.as_ref().map(PageServer::stats)
    }

    /// Creates everything a VM has before it is booted or restored: control socket, KVM VM with
    /// irqchip, PIT and memslots, devices, and vCPUs that have never run.
    fn assemble(
        config: VmConfig,
        shell: Shell,
        control: Option<(UnixListener, SocketFile)>,
    ) -> Result<Self, VmmError> {
        let Shell {
            kvm,
            vm,
            ram,
            vcpu_fds,
        } = shell;
        let mut mmio = Bus::new();
        let mut irq_fds = Vec::new();
        let mut queue_events = Vec::new();
        let mut cmdline = config.cmdline.clone();
        let mut backends = Vec::new();
        let mut devices: Vec<Box<dyn VirtioDevice>> = Vec::new();
        let mut transports = Vec::new();
        for b in &config.block {
            devices.push(Box::new(Block::new(&b.path, b.read_only, b.id.as_deref())?));
        }
        if let Some(v) = &config.vsock {
            devices.push(Box::new(Vsock::new(v.cid, &v.uds)?));
        }
        for (i, dev) in devices.into_iter().enumerate() {
            let base = VIRTIO_MMIO_BASE + i as u64 * VIRTIO_MMIO_SIZE;
            let gsi = VIRTIO_IRQ_BASE + i as u32;
            let transport = MmioTransport::new(ram.mem.clone(), dev)
                .map_err(io_err("creating virtio-mmio eventfds"))?;
            for (q, evt) in transport.queue_events().iter().enumerate() {
                vm.register_ioevent(evt, &IoEventAddress::Mmio(base + QUEUE_NOTIFY), q as u32)
                    .map_err(vm_err("KVM_IOEVENTFD"))?;
            }
            vm.register_irqfd(transport.irq(), gsi)
                .map_err(vm_err("KVM_IRQFD (virtio)"))?;
            let events: Vec<EventFd> = transport
                .queue_events()
                .iter()
                .map(EventFd::try_clone)
                .collect::<Result<_, _>>()
                .map_err(io_err("cloning a queue eventfd"))?;
            let backend_fd = transport.backend_fd();
            let transport = Arc::new(Mutex::new(transport));
            transports.push(transport.clone());
            if let Some(fd) = backend_fd {
                backends.push(Backend {
                    fd,
                    transport: transport.clone(),
                });
            }
            for (q, evt) in events.into_iter().enumerate() {
                queue_events.push(QueueEvent {
                    evt,
                    transport: transport.clone(),
                    queue: q,
                });
            }
            mmio.insert(transport, base, VIRTIO_MMIO_SIZE)
                .map_err(|e| {
                    io_err("placing a virtio device")(std::io::Error::other(e.to_string()))
                })?;
            if !cmdline.is_empty() {
                cmdline.push(' ');
            }
            cmdline += &format!("virtio_mmio.device=4K@{base:#x}:{gsi}");
        }

        let vcpu_fds = vcpu_fds
            .into_iter()
            .map(|fd| Arc::new(Mutex::new(fd)))
            .collect();

        let exit = Arc::new(ExitSignal::new().map_err(io_err("creating the exit eventfd"))?);
        let mut pio = Bus::new();
        let serial_irq = EventFd::new(libc::EFD_NONBLOCK).map_err(io_err("creating an eventfd"))?;
        vm.register_irqfd(&serial_irq, SERIAL_IRQ)
            .map_err(vm_err("KVM_IRQFD (serial)"))?;
        let serial_out: Sink = match &config.serial {
            SerialOutput::Stdout => Box::new(std::io::stdout()),
            SerialOutput::None => Box::new(std::io::sink()),
            SerialOutput::File(p) => open_sink(&p.to_string_lossy())?,
        };
        let serial_trigger = serial_irq
            .try_clone()
            .map_err(io_err("cloning an eventfd"))?;
        let serial = Serial(vm_superio::Serial::new(
            EventFdTrigger(serial_trigger),
            serial_out,
        ));
        let insert_err = |e: crate::devices::bus::BusError| VmmError::Io {
            what: "placing a device".into(),
            source: std::io::Error::other(e.to_string()),
        };
        pio.insert(Arc::new(Mutex::new(serial)), SERIAL_PORT_BASE.into(), 8)
            .map_err(insert_err)?;
        let i8042 = I8042::new(exit.clone()).map_err(io_err("creating the i8042 eventfd"))?;
        pio.insert(Arc::new(Mutex::new(i8042)), I8042_PORT_BASE.into(), 5)
            .map_err(insert_err)?;
        let reports = match &config.debug_log {
            Some(spec) => {
                let (tx, rx): (Sender<String>, Receiver<String>) = crossbeam_channel::unbounded();
                let port = DebugPort::new(ram.mem.clone(), open_sink(spec)?, vec![tx]);
                pio.insert(Arc::new(Mutex::new(port)), DEBUG_REPORT_PORT.into(), 4)
                    .map_err(insert_err)?;
                Some(rx)
            }
            None => None,
        };
        Ok(Self {
            pages: None,
            config,
            ram,
            kvm,
            vm,
            vcpu_fds,
            cmdline,
            generation: 0,
            pio: Arc::new(pio),
            mmio: Arc::new(mmio),
            exit,
            control,
            reports,
            queue_events,
            backends,
            transports,
            mem_mode: None,
            _irq_fds: {
                irq_fds.push(serial_irq);
                irq_fds
            },
        })
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

        let supported = self
            .kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(vm_err("KVM_GET_SUPPORTED_CPUID"))?;
        for (id, fd) in self.vcpu_fds.iter().enumerate() {
            let id = id as u8;
            let fd = fd.lock().unwrap_or_else(|p| p.into_inner());
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

    /// Writes a snapshot of this (paused) VM into `dir`, which must exist.
    fn snapshot(&self, dir: &std::path::Path) -> Result<snapshot::memory::MemoryStats, VmmError> {
        let devices = self
            .transports
            .iter()
            .map(|t| t.lock().unwrap_or_else(|p| p.into_inner()).save())
            .collect();
        let block_bytes = self
            .config
            .block
            .iter()
            .map(|b| {
                std::fs::metadata(&b.path)
                    .map(|m| m.len())
                    .map_err(io_err(format!("block device {}", b.path.display())))
            })
            .collect::<Result<_, _>>()?;
        let vm = persist::save_vm(&self.vm)?;
        let mut vcpus = Vec::new();
        for fd in &self.vcpu_fds {
            let fd = fd.lock().unwrap_or_else(|p| p.into_inner());
            vcpus.push(persist::save_vcpu(&self.kvm, &fd)?);
        }
        // snapshot: everything is written aside and published by `commit` (nothing in `dir`
        // changes before it; a failure leaves the previous snapshot there intact).
        let mut writer = snapshot::SnapshotWriter::create(dir)?;
        let mem = if let Backing::Memfd(memfd) = &self.ram.backing {
            writer.write_memory(memfd, self.ram.size)?
        } else {
            // A copy-on-write or userfaultfd clone: its writes live only in its mapping. Read through
            // it in chunks that never cross a region boundary (both are 1 MiB aligned).
            writer.write_memory_with(self.ram.size, &[(0, self.ram.size)], |off, buf| {
                self.ram.read_at(off, buf)
            })?
        };
        let state = MachineSnapshot {
            config: self.config.clone(),
            generation: self.generation,
            vm,
            vcpus,
            devices,
            block_bytes,
        };
        writer.commit(
            env!("CARGO_PKG_VERSION"),
            snapshot::HostFingerprint::current(self.kvm.get_api_version()),
            &state,
        )?;
        Ok(mem)
    }

    /// Debug reports of the guest (only with `debug_log` set); readable while the VM runs.
    pub fn reports(&self) -> Option<Receiver<String>> {
        self.reports.clone()
    }

    /// A handle that ends the VM from another thread.
    pub fn exit_handle(&self) -> Arc<ExitSignal> {
        self.exit.clone()
    }

    /// Runs the VM until it ends; `term_fd` (a signalfd for SIGTERM/SIGINT) also ends it.
    ///
    /// Every vCPU thread is joined and every fd and socket file is released before returning.
    pub fn run(self, term_fd: Option<RawFd>) -> Result<ExitReason, VmmError> {
        self.run_with(term_fd, Vec::new())
    }

    /// [`run`](Vmm::run), also serving control connections accepted before the VM existed
    /// (a shell's `restore` client).
    pub fn run_with(
        self,
        term_fd: Option<RawFd>,
        connections: Vec<std::os::unix::net::UnixStream>,
    ) -> Result<ExitReason, VmmError> {
        vcpu::install_kick_handler().map_err(io_err("installing the vCPU kick handler"))?;
        let ctl = Arc::new(RunControl::default());
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
        .run(term_fd, connections);
        vcpu::stop(&ctl, &mut threads);
        result?;
        Ok(self.exit.reason().unwrap_or(ExitReason::Shutdown))
    }
}

/// A queue's notification eventfd and the transport to poke when it fires.
struct QueueEvent {
    evt: EventFd,
    transport: Arc<Mutex<MmioTransport>>,
    queue: usize,
}

/// A device back-end's fd (its own epoll) and its transport.
struct Backend {
    fd: RawFd,
    transport: Arc<Mutex<MmioTransport>>,
}

/// Back-end `i` uses token `TOKEN_BACKEND_BASE + i`.
const TOKEN_BACKEND_BASE: u64 = 1 << 40;
/// Queue event `i` uses token `TOKEN_QUEUE_BASE + i` (connections use their fd, below 2^31).
const TOKEN_QUEUE_BASE: u64 = 1 << 32;
const TOKEN_EXIT: u64 = u64::MAX;
const TOKEN_TERM: u64 = u64::MAX - 1;
const TOKEN_LISTENER: u64 = u64::MAX - 2;

/// What the device loop serves.
struct DeviceLoop<'a> {
    vmm: &'a Vmm,
    ctl: &'a RunControl,
    threads: &'a [VcpuThread],
}

impl DeviceLoop<'_> {
    /// Waits for the exit event, termination signals, queue notifications and control requests.
    fn run(
        &self,
        term_fd: Option<RawFd>,
        initial: Vec<std::os::unix::net::UnixStream>,
    ) -> Result<(), VmmError> {
        let exit = &*self.vmm.exit;
        let listener = self.vmm.control.as_ref().map(|c| &c.0);
        let (queue_events, backends) = (&self.vmm.queue_events, &self.vmm.backends);
        let epoll = Epoll::new().map_err(io_err("creating epoll"))?;
        let add = |fd: RawFd, token: u64| epoll_add(&epoll, fd, token);
        add(exit.eventfd().as_raw_fd(), TOKEN_EXIT)?;
        if let Some(fd) = term_fd {
            add(fd, TOKEN_TERM)?;
        }
        if let Some(l) = listener {
            add(l.as_raw_fd(), TOKEN_LISTENER)?;
        }
        for (i, q) in queue_events.iter().enumerate() {
            add(q.evt.as_raw_fd(), TOKEN_QUEUE_BASE + i as u64)?;
        }
        for (i, b) in backends.iter().enumerate() {
            add(b.fd, TOKEN_BACKEND_BASE + i as u64)?;
        }
        let mut conns: HashMap<u64, Connection> = HashMap::new();
        for stream in initial {
            register_connection(&epoll, &mut conns, stream)?;
        }
        let mut events = vec![EpollEvent::default(); 16];
        while exit.reason().is_none() {
            let n = epoll_wait(&epoll, &mut events)?;
            for ev in &events[..n] {
                match ev.data() {
                    TOKEN_EXIT => {}
                    TOKEN_TERM => exit.exit(ExitReason::Signal),
                    TOKEN_LISTENER => {
                        if let Some(l) = listener {
                            while let Ok((stream, _)) = l.accept() {
                                register_connection(&epoll, &mut conns, stream)?;
                            }
                        }
                    }
                    token if token >= TOKEN_BACKEND_BASE => {
                        if let Some(b) = backends.get((token - TOKEN_BACKEND_BASE) as usize) {
                            b.transport
                                .lock()
                                .unwrap_or_else(|p| p.into_inner())
                                .backend_event();
                        }
                    }
                    token if token >= TOKEN_QUEUE_BASE => {
                        if let Some(q) = queue_events.get((token - TOKEN_QUEUE_BASE) as usize) {
                            let _ = q.evt.read();
                            q.transport
                                .lock()
                                .unwrap_or_else(|p| p.into_inner())
                                .notify(q.queue);
                        }
                    }
                    token => {
                        let keep = match conns.get_mut(&token) {
                            Some(c) => self.serve_connection(c),
                            None => true,
                        };
                        if !keep {
                            if let Some(c) = conns.remove(&token) {
                                let _ = epoll.ctl(
                                    ControlOperation::Delete,
                                    c.stream.as_raw_fd(),
                                    EpollEvent::default(),
                                );
                            }
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// Reads what is available on a control connection and answers each complete line; returns
    /// false when the connection should be closed.
    fn serve_connection(&self, c: &mut Connection) -> bool {
        let open = c.read_available();
        while let Some(pos) = c.buf.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = c.buf.drain(..=pos).collect();
            let reply = match control::parse(&line[..pos]) {
                Err(e) => e,
                Ok(req) => self.handle(req),
            };
            let mut out = reply.to_string().into_bytes();
            out.push(b'\n');
            // Replies are small; a client that does not read them loses its connection.
            let _ = c.stream.set_nonblocking(false);
            let ok = c.stream.write_all(&out).is_ok();
            let _ = c.stream.set_nonblocking(true);
            if !ok {
                return false;
            }
        }
        if c.buf.len() > control::MAX_REQUEST {
            let _ = c
                .stream
                .write_all(b"{\"ok\":false,\"error\":\"request line too long\"}\n");
            return false;
        }
        open
    }

    fn handle(&self, req: Request) -> serde_json::Value {
        let (config, ram, exit) = (&self.vmm.config, &self.vmm.ram, &self.vmm.exit);
        let (ctl, threads) = (self.ctl, self.threads);
        match req {
            Request::Status => {
                let mut v = json!({
                    "ok": true,
                    "state": if ctl.is_paused() { "paused" } else { "running" },
                    "vcpus": config.vcpus,
                    "mem_mib": ram.size >> 20,
                    "generation": self.vmm.generation,
                    "mem_mode": self.vmm.mem_mode,
                });
                if let Some(s) = self.vmm.uffd_stats() {
                    v["uffd"] = json!(s);
                }
                v
            }
            Request::Restore(_) => {
                json!({"ok": false, "error": "this VMM already runs a VM; restore into an idle shell (runv-vmm --shell)"})
            }
            Request::Pause => {
                vcpu::pause(ctl, threads);
                json!({"ok": true, "state": "paused"})
            }
            Request::Resume => {
                vcpu::resume(ctl);
                json!({"ok": true, "state": "running"})
            }
            Request::Shutdown => {
                exit.exit(ExitReason::Shutdown);
                json!({"ok": true, "state": "stopping"})
            }
            Request::Snapshot { dir } => {
                vcpu::pause(ctl, threads);
                let t0 = Instant::now();
                match self.vmm.snapshot(&dir) {
                    Ok(mem) => json!({
                        "ok": true,
                        "state": "paused",
                        "ms": t0.elapsed().as_secs_f64() * 1e3,
                        "memory_bytes": mem.data_bytes,
                    }),
                    Err(e) => json!({"ok": false, "error": e.to_string()}),
                }
            }
        }
    }
}
