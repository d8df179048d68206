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
    let vm = match &args.restore {
        Some(dir) => vmm::Vmm::restore(&vmm::RestoreOptions {
            dir: dir.clone(),
            mem_mode: args.mem_mode,
            clone_id: args.clone_id.clone(),
            serial: args.serial.clone().unwrap_or_default(),
            debug_log: args.debug_log.clone(),
            control: args.control.clone(),
        })
        .with_context(|| format!("restoring the snapshot in {}", dir.display()))?,
        None => vmm::Vmm::build(config(args)?).context("building the VM")?,
    };
    let reason = vm.run(Some(std::os::fd::AsRawFd::as_raw_fd(&term)))?;
    tracing::info!(?reason, "VM ended");
    match reason {
        vmm::ExitReason::Error(msg) => bail!("VM failed: {msg}"),
        _ => Ok(()),
    }
}
