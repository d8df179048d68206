//! `runv-vmm`: boots one microVM from a config file and/or flags.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Parser;
use vmm::config::{SerialOutput, VmConfig};

#[derive(Parser)]
#[command(name = "runv-vmm", about = "runv's KVM microVM monitor")]
struct Args {
    /// JSON config file; flags override its fields.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Kernel: ELF vmlinux or bzImage.
    #[arg(long)]
    kernel: Option<PathBuf>,
    /// Initrd image.
    #[arg(long)]
    initrd: Option<PathBuf>,
    /// Kernel command line.
    #[arg(long)]
    cmdline: Option<String>,
    /// How to enter an ELF kernel.
    #[arg(long, value_enum)]
    boot_protocol: Option<vmm::config::BootProtocol>,
    /// Guest RAM in MiB.
    #[arg(long)]
    mem_mib: Option<u64>,
    /// Number of vCPUs (1..=8).
    #[arg(long)]
    vcpus: Option<u64>,
    /// Serial console: stdout, none or file:PATH.
    #[arg(long)]
    serial: Option<SerialOutput>,
    /// Control socket path (JSON lines, see the vmm-api crate).
    #[arg(long)]
    control: Option<PathBuf>,
    /// An inherited, connected control socket (e.g. a socketpair end made by the spawner):
    /// requests can be sent before the VMM is ready and are answered once it is.
    #[arg(long, value_name = "FD")]
    control_fd: Option<i32>,
    /// Enable the debug report port; write reports to PATH (`-` = stdout).
    #[arg(long)]
    debug_log: Option<String>,
    /// virtio-blk device: path=PATH[,ro][,id=ID] (repeatable).
    #[arg(long)]
    block: Vec<vmm::config::BlockConfig>,
    /// virtio-vsock device: cid=N,uds=PATH.
    #[arg(long)]
    vsock: Option<vmm::config::VsockConfig>,
    /// virtio-net device on an existing TAP: tap=NAME[,mac=aa:bb:cc:dd:ee:ff][,ipv4=A.B.C.D]
    /// (ipv4 is announced in the identity page). With --restore: the clone's own TAP and MAC.
    #[arg(long)]
    net: Option<vmm::config::NetConfig>,
    /// Restore the snapshot in DIR instead of booting (serial, control and debug log apply).
    #[arg(long, conflicts_with_all = ["config", "kernel", "initrd", "cmdline", "mem_mib", "vcpus", "block", "vsock"])]
    restore: Option<PathBuf>,
    /// Memory mode of a restore: copy, cow (default) or uffd.
    #[arg(long, requires = "restore")]
    mem_mode: Option<vmm::MemoryMode>,
    /// Clone id the restored guest sees in its identity page (at most 63 bytes).
    #[arg(long, requires = "restore")]
    clone_id: Option<String>,
    /// Host-side Unix socket of the restored vsock device.
    #[arg(long, requires = "restore")]
    vsock_uds: Option<PathBuf>,
    /// Replace a restored block device's backing file: INDEX=PATH (repeatable).
    #[arg(long, requires = "restore", value_parser = parse_block_override)]
    restore_block: Vec<vmm::BlockOverride>,
    /// Create an idle VM shell (--mem-mib, --vcpus) and wait on --control/--control-fd for a
    /// `restore`.
    #[arg(long, conflicts_with_all = ["config", "kernel", "initrd", "cmdline", "block", "vsock", "net", "restore"])]
    shell: bool,
    /// seccomp filters on every thread: kill (default; a forbidden syscall kills the process
    /// with SIGSYS), log (allowed, logged by the kernel) or off.
    #[arg(long, value_enum, default_value_t = vmm::seccomp::SeccompMode::Kill)]
    seccomp: vmm::seccomp::SeccompMode,
    /// Jail the VMM with DIR as its root (see docs/ARCHITECTURE.md, "Jail"): new namespaces,
    /// only the named files inside (kernel, initrd, blocks, config and restore dir are bound
    /// read-only automatically; sockets and logs must be in a --jail-rw directory),
    /// an unprivileged uid/gid, no capabilities, its own cgroup. Needs root.
    #[arg(long, value_name = "DIR")]
    jail: Option<PathBuf>,
    /// The jail's name (its cgroup is runv/NAME); default: DIR's file name.
    #[arg(long, requires = "jail")]
    jail_id: Option<String>,
    /// uid the jailed VMM runs as.
    #[arg(long, requires = "jail", default_value_t = vmm_api::jail::DEFAULT_JAIL_ID)]
    jail_uid: u32,
    /// gid the jailed VMM runs as.
    #[arg(long, requires = "jail", default_value_t = vmm_api::jail::DEFAULT_JAIL_ID)]
    jail_gid: u32,
    /// A file or directory bound read-only at the same path inside the jail (repeatable).
    #[arg(long, requires = "jail")]
    jail_ro: Vec<PathBuf>,
    /// A directory bound read-write at the same path inside the jail (repeatable): where the
    /// control socket, vsock socket, serial file and debug log go.
    #[arg(long, requires = "jail")]
    jail_rw: Vec<PathBuf>,
    /// The jail's network namespace: new (default without --net), keep (default with --net:
    /// the TAP lives in the spawner's) or the path of one to join.
    #[arg(long, requires = "jail")]
    jail_netns: Option<vmm::jail::Netns>,
    /// The jail cgroup's memory limit in MiB (default: guest RAM + 128 MiB; 1 GiB + 128 MiB
    /// when the guest RAM is not given, as for --restore).
    #[arg(long, requires = "jail")]
    jail_mem_mib: Option<u64>,
    /// The jail cgroup's pids (tasks) limit.
    #[arg(long, requires = "jail", default_value_t = vmm_api::jail::DEFAULT_PIDS_MAX)]
    jail_pids: u64,
}

/// Enters the jail `--jail` asks for (returns in the jailed VMM; its keeper parent never
/// returns).
fn enter_jail(args: &Args, root: &std::path::Path) -> Result<()> {
    let mut read_only = args.jail_ro.clone();
    read_only.extend(
        [&args.kernel, &args.initrd, &args.config, &args.restore]
            .into_iter()
            .flatten()
            .cloned(),
    );
    let mut read_write = args.jail_rw.clone();
    for b in &args.block {
        if b.read_only {
            read_only.push(b.path.clone());
        } else {
            read_write.push(b.path.clone());
        }
    }
    read_write.extend(args.restore_block.iter().map(|b| b.path.clone()));
    let spec = vmm_api::jail::JailSpec {
        root: root.to_path_buf(),
        id: match &args.jail_id {
            Some(id) => id.clone(),
            None => root
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
        },
        uid: args.jail_uid,
        gid: args.jail_gid,
        read_only,
        read_write,
        mem_mib: args
            .jail_mem_mib
            .unwrap_or(args.mem_mib.unwrap_or(1024) + vmm_api::jail::MEMORY_OVERHEAD_MIB),
        pids_max: args.jail_pids,
    };
    let netns = args.jail_netns.clone().unwrap_or(if args.net.is_some() {
        vmm::jail::Netns::Keep
    } else {
        vmm::jail::Netns::New
    });
    vmm::jail::enter(&spec, &netns).context("jailing runv-vmm")
}

fn parse_block_override(s: &str) -> Result<vmm::BlockOverride, String> {
    let (index, path) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?}: expected INDEX=PATH"))?;
    Ok(vmm::BlockOverride {
        index: index
            .parse()
            .map_err(|e| format!("{s:?}: bad index: {e}"))?,
        path: path.into(),
    })
}

fn config(args: Args) -> Result<VmConfig> {
    let mut cfg = match &args.config {
        Some(p) => VmConfig::from_file(p)?,
        None => VmConfig::new(args.kernel.clone().unwrap_or_default()),
    };
    if let Some(k) = args.kernel {
        cfg.kernel = k;
    }
    if args.initrd.is_some() {
        cfg.initrd = args.initrd;
    }
    if let Some(p) = args.boot_protocol {
        cfg.boot_protocol = p;
    }
    if let Some(c) = args.cmdline {
        cfg.cmdline = c;
    }
    if let Some(m) = args.mem_mib {
        cfg.mem_mib = m;
    }
    if let Some(v) = args.vcpus {
        cfg.vcpus = vcpus_flag(v)?;
    }
    if let Some(s) = args.serial {
        cfg.serial = s;
    }
    if args.control.is_some() {
        cfg.control = args.control;
    }
    if args.debug_log.is_some() {
        cfg.debug_log = args.debug_log;
    }
    cfg.block.extend(args.block);
    if args.vsock.is_some() {
        cfg.vsock = args.vsock;
    }
    if args.net.is_some() {
        cfg.net = args.net;
    }
    Ok(cfg)
}

/// Checks a vCPU count flag against what a VM supports.
fn vcpus_flag(v: u64) -> Result<u8> {
    match u8::try_from(v) {
        Ok(n) if (1..=vmm::config::MAX_VCPUS).contains(&n) => Ok(n),
        _ => bail!("{v} vCPUs requested: use 1..={}", vmm::config::MAX_VCPUS),
    }
}

/// The control plane of a shell or restored VM from `--control` and `--control-fd`.
fn control_plane(path: Option<&PathBuf>, fd: Option<i32>) -> Result<vmm::ControlPlane> {
    let inherited = match fd {
        Some(fd) => Some(inherited_socket(fd)?),
        None => None,
    };
    let listener = match path {
        Some(p) => Some((
            vmm::control::bind_unix(p)?,
            vmm::control::SocketFile(p.clone()),
        )),
        None => None,
    };
    Ok(vmm::ControlPlane::new(listener, inherited)?)
}

/// Takes ownership of the inherited control socket `fd`, checking that it is a stream socket.
fn inherited_socket(fd: i32) -> Result<std::os::unix::net::UnixStream> {
    use std::os::fd::{BorrowedFd, FromRawFd, OwnedFd};
    if fd < 3 {
        bail!("--control-fd {fd}: use an inherited socket fd above 2 (0-2 are stdio)");
    }
    // SAFETY: only borrowed for the duration of the check; fcntl/getsockopt reject a bad fd.
    let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
    nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_GETFD)
        .with_context(|| format!("--control-fd {fd}: not an open file descriptor"))?;
    let kind = nix::sys::socket::getsockopt(&borrowed, nix::sys::socket::sockopt::SockType)
        .with_context(|| format!("--control-fd {fd}: not a socket"))?;
    if kind != nix::sys::socket::SockType::Stream {
        bail!("--control-fd {fd}: not a stream socket");
    }
    // Keep it out of children: it is ours now.
    nix::fcntl::fcntl(
        fd,
        nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
    )
    .with_context(|| format!("--control-fd {fd}: setting close-on-exec"))?;
    // SAFETY: the fd is open, a stream socket, inherited for us alone (the spawner's contract),
    // and owned by nothing else in this process.
    Ok(std::os::unix::net::UnixStream::from(unsafe {
        OwnedFd::from_raw_fd(fd)
    }))
}

/// Blocks SIGTERM/SIGINT in every thread and returns a signalfd that reports them.
fn termination_signalfd() -> Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    // SAFETY: sigset operations on a local, zero-initialised sigset_t; pthread_sigmask and
    // signalfd only read it; the returned fd is checked and then owned.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        if libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) != 0 {
            bail!("blocking SIGTERM/SIGINT failed");
        }
        let fd = libc::signalfd(-1, &set, libc::SFD_CLOEXEC | libc::SFD_NONBLOCK);
        if fd < 0 {
            return Err(std::io::Error::last_os_error()).context("creating a signalfd");
        }
        Ok(std::os::fd::OwnedFd::from_raw_fd(fd))
    }
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_env("RUNV_LOG"))
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    if args.restore.is_none() {
        // clap drops `requires` when a conflicting flag (e.g. --kernel) is present: check here.
        for (set, flag) in [
            (args.mem_mode.is_some(), "--mem-mode"),
            (args.clone_id.is_some(), "--clone-id"),
            (args.vsock_uds.is_some(), "--vsock-uds"),
            (!args.restore_block.is_empty(), "--restore-block"),
        ] {
            if set {
                bail!("{flag} applies to a restore: add --restore DIR, or drop {flag}");
            }
        }
    }
    if let Some(root) = args.jail.clone() {
        enter_jail(&args, &root)?;
    }
    vmm::seccomp::set_mode(args.seccomp).context("preparing the seccomp filters")?;
    if args.seccomp != vmm::seccomp::SeccompMode::Off {
        tracing::info!(
            mode = ?args.seccomp,
            "seccomp on: a syscall outside a thread's allow-list {}",
            if args.seccomp == vmm::seccomp::SeccompMode::Kill {
                "kills runv-vmm with SIGSYS (the kernel audit log names it: type=1326 ... syscall=N)"
            } else {
                "is allowed and logged by the kernel (type=1326)"
            }
        );
    }
    let confine =
        || vmm::seccomp::install(vmm::seccomp::ThreadKind::Vmm).context("confining runv-vmm");
    let term = termination_signalfd()?;
    let term_fd = Some(std::os::fd::AsRawFd::as_raw_fd(&term));
    let vm = if args.shell {
        if args.control.is_none() && args.control_fd.is_none() {
            bail!("--shell needs --control PATH or --control-fd FD: a shell waits for a restore request there");
        }
        let vcpus = vcpus_flag(args.vcpus.unwrap_or(1))?;
        let plane = control_plane(args.control.as_ref(), args.control_fd)?;
        let shell = vmm::Shell::create(args.mem_mib.unwrap_or(128), vcpus)
            .context("creating the VM shell")?;
        // Before any request is read: the restore runs confined.
        confine()?;
        match vmm::serve::shell_loop::wait_for_restore(shell, plane, term_fd)
            .context("restoring into the shell")?
        {
            vmm::ShellOutcome::Restored(vm) => *vm,
            vmm::ShellOutcome::Shutdown => return Ok(()),
        }
    } else if let Some(dir) = &args.restore {
        let mut opts = vmm::RestoreOptions::new(dir.clone(), args.mem_mode.unwrap_or_default());
        opts.clone_id = args.clone_id.clone().unwrap_or_default();
        opts.serial = args.serial.clone().unwrap_or_default();
        opts.debug_log = args.debug_log.clone();
        opts.vsock_uds = args.vsock_uds.clone();
        opts.block = args.restore_block.clone();
        opts.net = args.net.clone();
        opts.control = args.control.clone();
        let plane = control_plane(None, args.control_fd)?;
        confine()?;
        vmm::Vmm::restore_with(&opts, plane)
            .with_context(|| format!("restoring the snapshot in {}", dir.display()))?
    } else {
        if args.control_fd.is_some() {
            bail!("--control-fd is for --shell and --restore; a booted VM uses --control PATH");
        }
        let vm = vmm::Vmm::build(config(args)?).context("building the VM")?;
        confine()?;
        vm
    };
    let reason = vm.run(term_fd)?;
    tracing::info!(?reason, "VM ended");
    match reason {
        vmm::ExitReason::Error(msg) => bail!("VM failed: {msg}"),
        _ => Ok(()),
    }
}
