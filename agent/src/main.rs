//! `runv-agent`: serves the agent protocol on `--listen unix:PATH` (host) or `vsock:PORT` (guest).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Parser;

#[derive(Parser)]
#[command(
    name = "runv-agent",
    about = "runv's guest agent: runs OCI containers on request"
)]
struct Args {
    /// Where to listen: unix:PATH or vsock:PORT.
    #[arg(long, default_value = "vsock:1024")]
    listen: String,
    /// Scratch directory for overlay roots.
    #[arg(long, default_value = "/run/runv-agent")]
    state_dir: PathBuf,
    /// cgroupfs mount point.
    #[arg(long, default_value = "/sys/fs/cgroup")]
    cgroup_root: PathBuf,
    /// Parent cgroup of the containers.
    #[arg(long, default_value = "runv")]
    cgroup_group: String,
}

fn main() -> Result<()> {
    let started = Instant::now();
    // Before any thread exists, so that every thread inherits the mask and only the signalfd
    // sees SIGTERM/SIGINT.
    let term_fd = block_termination_signals();
    let pid1 = std::process::id() == 1;
    if pid1 {
        for e in agent::pid1::mount_basics() {
            eprintln!("runv-agent: {e}");
        }
    }
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_env("RUNV_LOG"))
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let cgroups = agent::cgroup::CgroupRoot::detect(&args.cgroup_root, &args.cgroup_group);
    let rt = agent::runtime::Runtime::new(args.state_dir.clone(), cgroups.clone())
        .with_context(|| format!("creating {}", args.state_dir.display()))?;
    if let Some(path) = args.listen.strip_prefix("unix:") {
        let path = PathBuf::from(path);
        if path.exists() {
            if std::os::unix::net::UnixStream::connect(&path).is_ok() {
                bail!(
                    "{} is in use by a running agent: pick another path",
                    path.display()
                );
            }
            std::fs::remove_file(&path)
                .with_context(|| format!("removing stale {}", path.display()))?;
        }
        let l = std::os::unix::net::UnixListener::bind(&path)
            .with_context(|| format!("binding {}", path.display()))?;
        terminate_on_signals(term_fd, path.clone(), cgroups);
        for conn in l.incoming() {
            match conn {
                Ok(s) => {
                    let rt = rt.clone();
                    std::thread::spawn(move || agent::server::serve(rt, s, pid1, started));
                }
                Err(e) => tracing::warn!("accept: {e}"),
            }
        }
        Ok(())
    } else if let Some(port) = args.listen.strip_prefix("vsock:") {
        let port: u32 = port.parse().context("vsock port")?;
        terminate_on_signals(term_fd, PathBuf::new(), cgroups);
        serve_vsock(rt, port, pid1, started)
    } else {
        bail!("--listen {}: use unix:PATH or vsock:PORT", args.listen)
    }
}

/// Blocks SIGTERM/SIGINT and returns a signalfd reporting them.
fn block_termination_signals() -> i32 {
    // SAFETY: building a signal set on a local and blocking it for this (only) thread.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        libc::signalfd(-1, &set, libc::SFD_CLOEXEC)
    }
}

/// Removes the socket and exits on SIGTERM/SIGINT (as PID 1: powers the guest off).
fn terminate_on_signals(fd: i32, socket: PathBuf, cgroups: agent::cgroup::CgroupRoot) {
    std::thread::spawn(move || {
        let mut buf = [0u8; 128];
        // SAFETY: reading a signalfd_siginfo into a local buffer.
        unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
        let _ = std::fs::remove_file(&socket);
        cgroups.remove_parent();
        if std::process::id() == 1 {
            // SAFETY: sync and power off, as init does on shutdown.
            unsafe {
                libc::sync();
                libc::reboot(libc::RB_POWER_OFF);
            }
        }
        // SAFETY: _exit skips atexit handlers and stdio locks that other threads may hold.
        unsafe { libc::_exit(0) };
    });
}

fn serve_vsock(
    rt: Arc<agent::runtime::Runtime>,
    port: u32,
    pid1: bool,
    started: Instant,
) -> Result<()> {
    use std::os::fd::FromRawFd;
    // SAFETY: socket(2) with constant arguments; the result is checked and then owned.
    let fd = unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error())
            .context("creating an AF_VSOCK socket (is this a VM with virtio-vsock?)");
    }
    // SAFETY: fd was just created.
    let listener = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
    let addr = libc::sockaddr_vm {
        svm_family: libc::AF_VSOCK as libc::sa_family_t,
        svm_reserved1: 0,
        svm_port: port,
        svm_cid: libc::VMADDR_CID_ANY,
        svm_zero: [0; 4],
    };
    // SAFETY: bind/listen with a valid sockaddr_vm of the stated size.
    unsafe {
        if libc::bind(
            fd,
            (&addr as *const libc::sockaddr_vm).cast(),
            std::mem::size_of::<libc::sockaddr_vm>() as u32,
        ) != 0
            || libc::listen(fd, 16) != 0
        {
            return Err(std::io::Error::last_os_error())
                .context(format!("listening on vsock port {port}"));
        }
    }
    loop {
        // SAFETY: accept on our listening socket; the result is checked and owned.
        let c = unsafe {
            libc::accept4(
                std::os::fd::AsRawFd::as_raw_fd(&listener),
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                libc::SOCK_CLOEXEC,
            )
        };
        if c < 0 {
            tracing::warn!("vsock accept: {}", std::io::Error::last_os_error());
            continue;
        }
        // SAFETY: c is a fresh connected socket we own; a File is a plain fd wrapper.
        let stream = unsafe { std::fs::File::from_raw_fd(c) };
        let rt = rt.clone();
        std::thread::spawn(move || agent::server::serve(rt, stream, pid1, started));
    }
}
