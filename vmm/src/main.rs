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
    /// Control socket path (JSON lines).
    #[arg(long)]
    control: Option<PathBuf>,
    /// Enable the debug report port; write reports to PATH (`-` = stdout).
    #[arg(long)]
    debug_log: Option<String>,
    /// virtio-blk device: path=PATH[,ro][,id=ID] (repeatable).
    #[arg(long)]
    block: Vec<vmm::config::BlockConfig>,
    /// virtio-vsock device: cid=N,uds=PATH.
    #[arg(long)]
    vsock: Option<vmm::config::VsockConfig>,
    /// Restore the snapshot in DIR instead of booting (serial, control and debug log apply).
    #[arg(long, conflicts_with_all = ["config", "kernel", "initrd", "cmdline", "mem_mib", "vcpus", "block", "vsock"])]
    restore: Option<PathBuf>,
    /// Memory mode of a restore.
    #[arg(long, value_enum, default_value = "cow", requires = "restore")]
    mem_mode: vmm::MemoryMode,
    /// Clone id the restored guest sees in its identity page.
    #[arg(long, default_value = "", requires = "restore")]
    clone_id: String,
    /// Host-side Unix socket of the restored vsock device.
    #[arg(long, requires = "restore")]
    vsock_uds: Option<PathBuf>,
    /// Replace a restored block device's backing file: INDEX=PATH (repeatable).
    #[arg(long, requires = "restore", value_parser = parse_block_override)]
    restore_block: Vec<vmm::BlockOverride>,
    /// Create an idle VM shell (--mem-mib, --vcpus) and wait on --control for a `restore`.
    #[arg(long, requires = "control", conflicts_with_all = ["config", "kernel", "initrd", "cmdline", "block", "vsock", "restore"])]
    shell: bool,
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
        cfg.vcpus = u8::try_from(v).unwrap_or(u8::MAX);
        if u64::from(cfg.vcpus) != v {
            bail!("{v} vCPUs requested: use 1..={}", vmm::config::MAX_VCPUS);
        }
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
    Ok(cfg)
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
    let term = termination_signalfd()?;
    let term_fd = Some(std::os::fd::AsRawFd::as_raw_fd(&term));
    let mut connections = Vec::new();
    let vm = if args.shell {
        let control = args.control.clone().context("--shell needs --control")?;
        let vcpus = u8::try_from(args.vcpus.unwrap_or(1)).context("--vcpus out of range")?;
        let listener = vmm::control::bind_unix(&control)?;
        let socket = vmm::control::SocketFile(control);
        let shell = vmm::Shell::create(args.mem_mib.unwrap_or(128), vcpus)
            .context("creating the VM shell")?;
        match vmm::shell::wait_for_restore(shell, listener, socket, term_fd)
            .context("restoring into the shell")?
        {
            vmm::ShellOutcome::Restored(vm, conn) => {
                connections.push(conn);
                *vm
            }
            vmm::ShellOutcome::Shutdown => return Ok(()),
        }
    } else if let Some(dir) = &args.restore {
        let mut opts = vmm::RestoreOptions::new(dir.clone(), args.mem_mode);
        opts.clone_id = args.clone_id.clone();
        opts.serial = args.serial.clone().unwrap_or_default();
        opts.debug_log = args.debug_log.clone();
        opts.control = args.control.clone();
        opts.vsock_uds = args.vsock_uds.clone();
        opts.block = args.restore_block.clone();
        vmm::Vmm::restore(&opts)
            .with_context(|| format!("restoring the snapshot in {}", dir.display()))?
    } else {
        vmm::Vmm::build(config(args)?).context("building the VM")?
    };
    let reason = vm.run_with(term_fd, connections)?;
    tracing::info!(?reason, "VM ended");
    match reason {
        vmm::ExitReason::Error(msg) => bail!("VM failed: {msg}"),
        _ => Ok(()),
    }
}
