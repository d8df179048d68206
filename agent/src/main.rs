//! `runv-agent`: serves the agent protocol on `--listen unix:PATH` or `fd:N` (host) or
//! `vsock:PORT` (guest).

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use agent::server::Server;
use anyhow::{bail, Context, Result};
use clap::Parser;
use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::socket::{self, AddressFamily, Backlog, SockFlag, SockType, VsockAddr};

#[derive(Parser)]
#[command(
    name = "runv-agent",
    about = "runv's guest agent: runs OCI containers on request"
)]
struct Args {
    /// Where to listen: unix:PATH, vsock:PORT, or fd:N (a listening unix socket inherited as
    /// file descriptor N, bound by the caller: it can connect before the agent runs).
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
    /// Time a peer may take to finish a frame it started, in ms (tests shorten it).
    #[arg(long, hide = true, default_value_t = agent::limits::FRAME_TIMEOUT.as_millis() as u64)]
    frame_timeout_ms: u64,
}

fn main() -> Result<()> {
    let started = Instant::now();
    // Before any thread exists, so that every thread inherits the mask and only the signalfd
    // sees SIGTERM/SIGINT.
    let term_fd = block_termination_signals().context("blocking SIGTERM/SIGINT")?;
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
    let server = Server::new(
        rt,
        pid1,
        started,
        Duration::from_millis(args.frame_timeout_ms),
    );
    if let Some(path) = args.listen.strip_prefix("unix:") {
        let path = PathBuf::from(path);
        remove_stale_socket(&path)?;
        let l = listen_unix(&path)?;
        terminate_on_signals(term_fd, Some(path.clone()), cgroups)?;
        serve_unix(&server, &l);
        Ok(())
    } else if let Some(fd) = args.listen.strip_prefix("fd:") {
        let l = inherited_listener(fd)?;
        // The socket's path belongs to whoever bound it: it removes it.
        terminate_on_signals(term_fd, None, cgroups)?;
        serve_unix(&server, &l);
        Ok(())
    } else if let Some(port) = args.listen.strip_prefix("vsock:") {
        let port: u32 = port.parse().context("vsock port")?;
        terminate_on_signals(term_fd, None, cgroups)?;
        serve_vsock(&server, port)
    } else {
        bail!(
            "--listen {}: use unix:PATH, fd:N or vsock:PORT",
            args.listen
        )
    }
}

fn serve_unix(server: &Arc<Server>, l: &std::os::unix::net::UnixListener) {
    for conn in l.incoming() {
        match conn {
            Ok(s) => server.accept(s),
            Err(e) => {
                tracing::warn!("accept: {e}");
                // EMFILE and the like: do not spin.
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

/// Takes over the listening unix socket inherited as file descriptor `fd` (socket activation),
/// after checking that it is one, and keeps it from the containers' processes (close-on-exec).
fn inherited_listener(fd: &str) -> Result<std::os::unix::net::UnixListener> {
    use nix::sys::socket::{getsockname, getsockopt, sockopt, UnixAddr};
    let n: std::os::fd::RawFd = fd
        .parse()
        .ok()
        .filter(|n| *n > 2)
        .with_context(|| format!("--listen fd:{fd}: give a file descriptor number above 2"))?;
    let not_listening = || {
        format!(
            "--listen fd:{n}: file descriptor {n} is not a listening unix socket: the caller \
             must bind and listen on it and leave it open across exec"
        )
    };
    // SAFETY: only borrowed for the checks below; an fd that is not open makes them fail.
    let borrowed = unsafe { std::os::fd::BorrowedFd::borrow_raw(n) };
    let listening = getsockopt(&borrowed, sockopt::AcceptConn).with_context(not_listening)?;
    getsockname::<UnixAddr>(n).with_context(not_listening)?;
    if !listening {
        bail!(not_listening());
    }
    nix::fcntl::fcntl(
        n,
        nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
    )
    .with_context(|| format!("--listen fd:{n}: setting close-on-exec"))?;
    // SAFETY: n is an open listening unix socket (checked above) handed to this process, which
    // becomes its only owner here.
    Ok(unsafe { std::os::unix::net::UnixListener::from_raw_fd(n) })
}

/// Listens on `path`. The socket is bound under a temporary name and renamed into place once
/// it listens, so a client that sees the path never meets a socket that refuses connections.
fn listen_unix(path: &Path) -> Result<std::os::unix::net::UnixListener> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".{}.tmp", std::process::id()));
    let tmp = PathBuf::from(tmp);
    let _ = std::fs::remove_file(&tmp);
    let l = std::os::unix::net::UnixListener::bind(&tmp)
        .with_context(|| format!("binding {}", tmp.display()))?;
    if let Err(e) = std::fs::rename(&tmp, path) {
        let _ = std::fs::remove_file(&tmp);
        return Err(e).with_context(|| format!("renaming {} to {}", tmp.display(), path.display()));
    }
    Ok(l)
}

/// Makes room for the listening socket at `path`: only a stale socket (one nobody listens on)
/// is removed; anything else there is an error, never deleted.
fn remove_stale_socket(path: &Path) -> Result<()> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e).with_context(|| format!("checking {}", path.display())),
    };
    if !meta.file_type().is_socket() {
        let what = if meta.file_type().is_symlink() {
            "a symbolic link"
        } else if meta.is_dir() {
            "a directory"
        } else if meta.is_file() {
            "a regular file"
        } else {
            "not a socket"
        };
        bail!(
            "--listen {}: the path exists and is {what}, not a stale socket; the agent does not \
             delete it: remove it yourself or pick another path",
            path.display()
        );
    }
    match std::os::unix::net::UnixStream::connect(path) {
        Ok(_) => bail!(
            "{} is in use by a running agent: pick another path",
            path.display()
        ),
        Err(e) if e.raw_os_error() == Some(libc::ECONNREFUSED) => std::fs::remove_file(path)
            .with_context(|| format!("removing stale socket {}", path.display())),
        Err(e) => Err(e).with_context(|| {
            format!(
                "{} is a socket the agent cannot probe: remove it or pick another path",
                path.display()
            )
        }),
    }
}

/// Blocks SIGTERM/SIGINT and returns a signalfd reporting them.
fn block_termination_signals() -> nix::Result<SignalFd> {
    let mut set = SigSet::empty();
    set.add(Signal::SIGTERM);
    set.add(Signal::SIGINT);
    set.thread_block()?;
    SignalFd::with_flags(&set, SfdFlags::SFD_CLOEXEC)
}

/// Removes the socket and exits on SIGTERM/SIGINT (as PID 1: powers the guest off).
fn terminate_on_signals(
    fd: SignalFd,
    socket: Option<PathBuf>,
    cgroups: agent::cgroup::CgroupRoot,
) -> Result<()> {
    agent::threads::spawn("signals", move || {
        let _ = fd.read_signal();
        if let Some(socket) = &socket {
            let _ = std::fs::remove_file(socket);
        }
        cgroups.remove_parent();
        if std::process::id() == 1 {
            // Sync and power off, as init does on shutdown.
            nix::unistd::sync();
            let _ = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_POWER_OFF);
        }
        // SAFETY: _exit skips atexit handlers and stdio locks that other threads may hold.
        unsafe { libc::_exit(0) };
    })
    .context("starting the signal thread")?;
    Ok(())
}

fn serve_vsock(server: &Arc<Server>, port: u32) -> Result<()> {
    let listener = socket::socket(
        AddressFamily::Vsock,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .context("creating an AF_VSOCK socket (is this a VM with virtio-vsock?)")?;
    socket::bind(
        listener.as_raw_fd(),
        &VsockAddr::new(libc::VMADDR_CID_ANY, port),
    )
    .and_then(|()| socket::listen(&listener, Backlog::new(16)?))
    .with_context(|| format!("listening on vsock port {port}"))?;
    loop {
        let c = match socket::accept4(listener.as_raw_fd(), SockFlag::SOCK_CLOEXEC) {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!("vsock accept: {e}");
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        // SAFETY: accept4 returned a fresh connected socket that nothing else owns.
        let stream = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(c) });
        server.accept(stream);
    }
}
