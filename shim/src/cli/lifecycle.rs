//! create, start, run, kill, delete and the hidden monitor entry point.

use std::io::Read;
use std::os::fd::AsRawFd;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use protocol::{Request, Response};
use shim::bundle::Bundle;
use shim::monitor::{self, MonitorArgs};
use shim::sandbox::Kind;
use shim::state::{alive, ContainerDir, Status};

use super::fork::{self, MonitorProcess};
use super::{client, expect_ok, load, write_pid_file};
use crate::Cli;

/// The descriptor number the monitor gets its readiness pipe on.
const READY_FD: i32 = 3;

/// Options of `create` and `run`.
pub struct CreateOpts<'a> {
    /// Bundle directory.
    pub bundle: &'a Path,
    /// Pid file (the monitor's pid).
    pub pid_file: Option<&'a Path>,
    /// Console socket.
    pub console_socket: Option<&'a Path>,
    /// `--preserve-fds`.
    pub preserve_fds: u32,
    /// Container id.
    pub id: &'a str,
    /// `run` without `--detach`: a terminal may use runv's own stdio.
    pub foreground: bool,
}

/// `runv create`: checks everything, then leaves a monitor; returns it (our child).
pub fn create(cli: &Cli, o: &CreateOpts<'_>) -> Result<MonitorProcess> {
    shim::id::validate(o.id)?;
    let kind = Kind::parse(&cli.sandbox)?;
    if o.preserve_fds > 0 {
        bail!("--preserve-fds {} is not supported by runv (the sandbox cannot receive host descriptors); pass 0", o.preserve_fds);
    }
    let bundle = Bundle::load(o.bundle)?;
    let terminal = bundle
        .spec
        .process()
        .as_ref()
        .and_then(|p| p.terminal())
        .unwrap_or(false);
    if terminal && o.console_socket.is_none() && !o.foreground {
        bail!("process.terminal is true: pass --console-socket to receive the pty, run it in the foreground (`runv run` without --detach), or set process.terminal to false");
    }
    kind.preflight()?;
    let dir = ContainerDir::create(&cli.root, o.id)?;
    if kind == Kind::Host {
        eprintln!("runv: WARNING: container {}: --sandbox host runs it as host processes (namespaces and cgroups only, NO VM isolation)", o.id);
    }
    match setup(cli, &dir, &bundle, kind, o) {
        Ok(child) => Ok(child),
        Err(e) => {
            let _ = dir.remove();
            Err(e)
        }
    }
}

fn setup(
    cli: &Cli,
    dir: &ContainerDir,
    bundle: &Bundle,
    kind: Kind,
    o: &CreateOpts<'_>,
) -> Result<MonitorProcess> {
    std::fs::write(
        dir.path.join("config.json"),
        serde_json::to_vec(&bundle.spec)?,
    )
    .context("saving config.json in the state directory")?;
    dir.save(&monitor::initial_record(o.id, bundle, kind))?;
    let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).context("creating a pipe")?;
    let mut child = if fork::single_threaded() {
        let args = MonitorArgs {
            root: cli.root.clone(),
            id: o.id.into(),
            kind,
            console_socket: o.console_socket.map(std::path::absolute).transpose()?,
        };
        let pid = fork::fork_monitor(&args, std::fs::File::from(w))
            .context("starting the monitor (fork)")?;
        MonitorProcess::Forked(pid)
    } else {
        exec_monitor(cli, kind, o, w)?
    };
    let mut answer = String::new();
    let _ = std::fs::File::from(r).read_to_string(&mut answer);
    if answer.trim_end() != monitor::READY {
        let _ = child.wait();
        let why = answer.trim();
        bail!(
            "container {}: {}",
            o.id,
            if why.is_empty() {
                "the monitor exited before the container was created"
            } else {
                why
            }
        );
    }
    if let Some(p) = o.pid_file {
        write_pid_file(p, child.id() as i32)?;
    }
    Ok(child)
}

/// Starts the monitor as `runv __monitor` with `w` as its readiness pipe (fd 3).
fn exec_monitor(
    cli: &Cli,
    kind: Kind,
    o: &CreateOpts<'_>,
    w: std::os::fd::OwnedFd,
) -> Result<MonitorProcess> {
    let exe = std::env::current_exe().context("locating the runv executable")?;
    let mut cmd = Command::new(exe);
    cmd.arg("--root")
        .arg(&cli.root)
        .arg("--sandbox")
        .arg(kind.name())
        .arg("__monitor")
        .arg("--ready-fd")
        .arg(READY_FD.to_string());
    if let Some(s) = o.console_socket {
        cmd.arg("--console-socket").arg(std::path::absolute(s)?);
    }
    cmd.arg(o.id);
    let w_raw = w.as_raw_fd();
    // SAFETY: runs in the forked child before exec; only async-signal-safe calls (setsid, dup2,
    // fcntl) on descriptors the child owns. dup2 gives fd 3 without close-on-exec; when the pipe
    // already is fd 3 the flag is cleared instead.
    unsafe {
        cmd.pre_exec(move || {
            libc::setsid();
            let rc = if w_raw == READY_FD {
                libc::fcntl(READY_FD, libc::F_SETFD, 0)
            } else {
                libc::dup2(w_raw, READY_FD)
            };
            if rc < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd.spawn().context("starting the monitor")?;
    drop(w);
    Ok(MonitorProcess::Exec(child))
}

/// `runv start`.
pub fn start(cli: &Cli, id: &str) -> Result<()> {
    let (dir, r) = load(cli, id)?;
    let status = r.status();
    if status != Status::Created {
        bail!(
            "container {id} is {}, not created: only a created container can be started",
            status.name()
        );
    }
    let mut c = client(&dir, &r)?;
    // Recorded before the request so that the monitor's exit record cannot be overwritten.
    dir.update(|r| r.started = true)?;
    match c.call(&Request::Start { id: id.into() }) {
        Ok(Response::Started { .. }) => Ok(()),
        // A process that ends at once can end its sandbox before the reply reaches us: the
        // monitor records the exit before it stops the agent.
        Err(_) if dir.load().is_ok_and(|r| r.exit.is_some()) => Ok(()),
        other => {
            let _ = dir.update(|r| r.started = false);
            match other {
                Ok(Response::Error(e)) => bail!("starting container {id}: {}", e.message),
                Ok(r) => bail!("starting container {id}: unexpected answer {r:?}"),
                Err(e) => Err(anyhow!(e).context(format!("starting container {id}"))),
            }
        }
    }
}

/// `runv run`: create + start; in the foreground wait, delete, and return the exit status.
pub fn run(cli: &Cli, o: &CreateOpts<'_>, detach: bool) -> Result<i32> {
    let mut child = create(cli, o)?;
    if !detach {
        // Before start: a signal that arrives once the process runs must reach it.
        forward_signals(cli, o.id);
    }
    if let Err(e) = start(cli, o.id) {
        let _ = delete(cli, o.id, true);
        let _ = child.wait();
        return Err(e);
    }
    if detach {
        return Ok(0);
    }
    // The container's pty does the line discipline: our terminal passes keys through (as runc).
    let terminal = monitor::load_spec(&ContainerDir::new(&cli.root, o.id))
        .ok()
        .and_then(|s| s.process().as_ref().and_then(|p| p.terminal()))
        .unwrap_or(false);
    let saved = if terminal { raw_stdin() } else { None };
    let status = child.wait();
    if let Some(t) = saved {
        let _ =
            nix::sys::termios::tcsetattr(std::io::stdin(), nix::sys::termios::SetArg::TCSANOW, &t);
    }
    let status = status.context("waiting for the monitor")?;
    let code = status
        .code()
        .or_else(|| status.signal().map(|s| 128 + s))
        .unwrap_or(255);
    delete(cli, o.id, true)?;
    Ok(code)
}

/// Puts stdin in raw mode when it is a terminal; returns the settings to restore.
fn raw_stdin() -> Option<nix::sys::termios::Termios> {
    use nix::sys::termios;
    let saved = termios::tcgetattr(std::io::stdin()).ok()?;
    let mut raw = saved.clone();
    termios::cfmakeraw(&mut raw);
    termios::tcsetattr(std::io::stdin(), termios::SetArg::TCSANOW, &raw).ok()?;
    Some(saved)
}

/// Signals `runv run` passes on to the container's process, as runc does in the foreground.
const FORWARDED: [nix::sys::signal::Signal; 6] = {
    use nix::sys::signal::Signal::*;
    [SIGINT, SIGTERM, SIGHUP, SIGQUIT, SIGUSR1, SIGUSR2]
};

/// Blocks the forwarded signals in this process (the monitor is already started, so it does not
/// inherit the mask) and passes each one that arrives to the container's process.
fn forward_signals(cli: &Cli, id: &str) {
    use nix::sys::signal::{SigSet, SigmaskHow};
    let mut set = SigSet::empty();
    FORWARDED.iter().for_each(|s| set.add(*s));
    if nix::sys::signal::pthread_sigmask(SigmaskHow::SIG_BLOCK, Some(&set), None).is_err() {
        return;
    }
    let (root, id) = (cli.root.clone(), id.to_string());
    let _ = std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || loop {
            let Ok(sig) = set.wait() else { return };
            let dir = ContainerDir::new(&root, &id);
            let Ok(r) = dir.load() else { return };
            if let Ok(mut c) = client(&dir, &r) {
                let _ = c.call_timeout(
                    &Request::Signal {
                        id: id.clone(),
                        exec_id: None,
                        signal: sig as i32,
                        all: false,
                    },
                    Duration::from_secs(5),
                );
            }
        });
}

/// Parses a signal name (`KILL`, `SIGKILL`) or number.
pub fn parse_signal(s: &str) -> Result<i32> {
    if let Ok(n) = s.parse::<i32>() {
        if (1..=64).contains(&n) {
            return Ok(n);
        }
    }
    let up = s.to_ascii_uppercase();
    let name = if up.starts_with("SIG") {
        up
    } else {
        format!("SIG{up}")
    };
    name.parse::<nix::sys::signal::Signal>()
        .map(|s| s as i32)
        .map_err(|_| anyhow!("unknown signal {s:?}: use a name such as TERM or KILL, or a number"))
}

/// `runv kill`.
pub fn kill(cli: &Cli, id: &str, signal: &str, all: bool) -> Result<()> {
    let signal = parse_signal(signal)?;
    let (dir, r) = load(cli, id)?;
    let status = r.status();
    if !matches!(status, Status::Created | Status::Running) {
        bail!("container {id} is {}: nothing to signal", status.name());
    }
    let mut c = client(&dir, &r)?;
    let resp = c
        .call(&Request::Signal {
            id: id.into(),
            exec_id: None,
            signal,
            all,
        })
        .with_context(|| format!("signalling container {id}"))?;
    expect_ok(resp, &format!("signalling container {id}"))?;
    Ok(())
}

fn wait_gone(pid: i32, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while alive(pid) {
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    true
}

/// `runv delete`.
pub fn delete(cli: &Cli, id: &str, force: bool) -> Result<()> {
    shim::id::validate(id)?;
    let dir = ContainerDir::new(&cli.root, id);
    let r = match dir.load() {
        Ok(r) => r,
        // A damaged or half-written record: --force still removes what the id left behind.
        Err(shim::state::StateError::Corrupt(..)) if force => {
            shim::sandbox::host::reap_leftovers(id);
            dir.remove()?;
            return Ok(());
        }
        Err(e) => return Err(e.into()),
    };
    let status = r.status();
    if status == Status::Running && !force {
        bail!("container {id} is running: stop it (`runv kill {id}`) or use `runv delete --force {id}`");
    }
    if alive(r.monitor_pid) {
        if let Ok(mut c) = client(&dir, &r) {
            let _ = c.call_timeout(
                &Request::Signal {
                    id: id.into(),
                    exec_id: None,
                    signal: libc::SIGKILL,
                    all: true,
                },
                Duration::from_secs(5),
            );
        }
        if !wait_gone(r.monitor_pid, Duration::from_secs(10)) {
            // SAFETY: kill(2) on the monitor recorded for this container; it outlived SIGKILL
            // of its container by 10 s.
            unsafe { libc::kill(r.monitor_pid, libc::SIGKILL) };
            wait_gone(r.monitor_pid, Duration::from_secs(5));
        }
    }
    // The monitor ends the agent; one left by a killed monitor ends on its parent-death signal.
    if r.agent_pid > 0 && !wait_gone(r.agent_pid, Duration::from_secs(5)) {
        // SAFETY: kill(2) on the agent recorded for this container, which survived its monitor.
        unsafe { libc::kill(r.agent_pid, libc::SIGKILL) };
        wait_gone(r.agent_pid, Duration::from_secs(5));
    }
    // A monitor and agent killed from outside leave the container's processes behind.
    if r.sandbox == Kind::Host.name() {
        shim::sandbox::host::reap_leftovers(id);
    } else if r.sandbox == Kind::Vm.name() {
        // A killed monitor leaves its lease with the daemon and the VMM's files.
        shim::sandbox::vm::reap_leftovers(&dir);
    }
    dir.remove()?;
    Ok(())
}

/// The hidden `__monitor` command.
pub fn monitor(cli: &Cli, ready_fd: i32, console_socket: Option<PathBuf>, id: &str) -> Result<i32> {
    if ready_fd != READY_FD {
        bail!("__monitor is internal to runv");
    }
    fork::name_monitor();
    // SAFETY: fd 3 is the readiness pipe `create` passed; nothing else in this process uses it.
    let ready = unsafe { monitor::ready_pipe(ready_fd) };
    // Keep it from the agent and the container processes.
    // SAFETY: fcntl(2) on an fd we own.
    unsafe { libc::fcntl(ready_fd, libc::F_SETFD, libc::FD_CLOEXEC) };
    let args = MonitorArgs {
        root: cli.root.clone(),
        id: id.into(),
        kind: Kind::parse(&cli.sandbox)?,
        console_socket,
    };
    Ok(monitor::run(&args, ready))
}
