//! The monitor: the small host process `create` leaves per container. It starts the sandbox,
//! creates the container in it, reports readiness (or the failure) to `create` over a pipe,
//! relays the container's stdio to the stdio it inherited (or to a console socket's pty), records
//! the exit status, ends the sandbox and exits with the container's status (runc's convention:
//! the code, or 128 + signal).

use std::fs::File;
use std::io::Write;
use std::os::fd::{AsFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use protocol::{Request, Response, StdioConfig};

use crate::relay::{relay, HostIo};
use crate::sandbox::{FirstRootfs, Kind, Sandbox, SandboxError};
use crate::state::{ContainerDir, Record};

/// What the monitor is told on its command line.
#[derive(Debug, Clone)]
pub struct MonitorArgs {
    /// `--root`.
    pub root: PathBuf,
    /// Container id.
    pub id: String,
    /// Sandbox backend.
    pub kind: Kind,
    /// Where to send the pty master (terminal processes).
    pub console_socket: Option<PathBuf>,
}

/// The first line `create` reads from the readiness pipe on success.
pub const READY: &str = "ready";

/// Runs the monitor; returns the process exit code. `ready` is the readiness pipe's write end.
pub fn run(args: &MonitorArgs, mut ready: File) -> i32 {
    let dir = ContainerDir::new(&args.root, &args.id);
    let mut sandbox: Option<Box<dyn Sandbox>> = None;
    match prepare(args, &dir, &mut sandbox) {
        Ok((mut client, streams, wait_id, io)) => {
            let _ = writeln!(ready, "{READY}");
            drop(ready);
            let code = match relay(&mut client, streams, wait_id, io) {
                Ok(s) => s.code,
                Err(e) => {
                    eprintln!("runv monitor {}: {e}", args.id);
                    255
                }
            };
            let _ = dir.update(|r| r.exit = Some(code));
            let _ = client.call(&Request::Destroy {
                id: args.id.clone(),
            });
            if let Some(mut s) = sandbox {
                s.shutdown();
            }
            code
        }
        Err(e) => {
            let _ = writeln!(ready, "{e:#}");
            if let Some(mut s) = sandbox {
                s.shutdown();
            }
            1
        }
    }
}

type Prepared = (protocol::client::Client, protocol::Streams, u32, HostIo);

fn prepare(
    args: &MonitorArgs,
    dir: &ContainerDir,
    sandbox: &mut Option<Box<dyn Sandbox>>,
) -> anyhow::Result<Prepared> {
    use anyhow::Context;
    let record = dir.load()?;
    let mut spec = load_spec(dir)?;
    let terminal = spec
        .process()
        .as_ref()
        .and_then(|p| p.terminal())
        .unwrap_or(false);
    let io = host_io(terminal, args.console_socket.as_deref())?;
    let first = FirstRootfs {
        container: &args.id,
        dir: &record.rootfs,
    };
    let sb = sandbox.insert(args.kind.launch(dir, Some(&spec), Some(first))?);
    args.kind.guest_spec(&mut spec);
    dir.update(|r| {
        r.monitor_pid = std::process::id() as i32;
        r.agent_pid = sb.pid();
    })?;
    let rootfs = sb.rootfs(&args.id, &record.rootfs)?;
    let mut client = sb.client()?;
    let r = client
        .call(&Request::Create {
            id: args.id.clone(),
            spec: Box::new(spec),
            rootfs,
            stdio: StdioConfig {
                terminal,
                stdin: true,
            },
        })
        .map_err(|e| match sb.agent_log() {
            // The host agent got its socket already bound, so a failed start shows up here.
            Some(log) => anyhow::Error::new(SandboxError::AgentGone(log.to_path_buf(), e)),
            None => anyhow::Error::new(e),
        })
        .context("creating the container")?;
    let (pid, streams) = match r {
        Response::Created { pid, streams, .. } => (pid, streams),
        Response::Error(e) => anyhow::bail!("creating the container: {}", e.message),
        other => anyhow::bail!("creating the container: unexpected answer {other:?}"),
    };
    dir.update(|r| r.init_pid = pid)?;
    let wait_id = client.send(&Request::Wait {
        id: args.id.clone(),
        exec_id: None,
    })?;
    Ok((client, streams, wait_id, io))
}

/// The bundle's spec as `create` saved it.
pub fn load_spec(dir: &ContainerDir) -> anyhow::Result<oci_spec::runtime::Spec> {
    let p = dir.path.join("config.json");
    let text = std::fs::read(&p).map_err(|e| anyhow::anyhow!("{}: {e}", p.display()))?;
    Ok(serde_json::from_slice(&text)?)
}

/// The host side of a process's stdio: a console socket's pty slave, or our own 0, 1, 2.
pub fn host_io(terminal: bool, console: Option<&Path>) -> anyhow::Result<HostIo> {
    if let Some(sock) = console.filter(|_| terminal) {
        let slave = crate::pty::send_console(sock)?;
        return Ok(HostIo {
            input: Some(slave.try_clone()?),
            out: slave.try_clone()?,
            err: slave,
        });
    }
    Ok(HostIo {
        input: Some(dup_std(std::io::stdin().as_fd())?),
        out: dup_std(std::io::stdout().as_fd())?,
        err: dup_std(std::io::stderr().as_fd())?,
    })
}

fn dup_std(fd: std::os::fd::BorrowedFd<'_>) -> std::io::Result<File> {
    let owned: OwnedFd = fd.try_clone_to_owned()?;
    Ok(File::from(owned))
}

/// Wraps an inherited pipe descriptor.
///
/// # Safety
/// `fd` must be an open descriptor that nothing else in this process owns.
pub unsafe fn ready_pipe(fd: i32) -> File {
    // SAFETY: the caller guarantees `fd` is open and unowned.
    unsafe { File::from_raw_fd(fd) }
}

/// The record `create` writes before the monitor runs.
pub fn initial_record(id: &str, bundle: &crate::bundle::Bundle, kind: Kind) -> Record {
    let mut annotations: std::collections::BTreeMap<String, String> = bundle
        .spec
        .annotations()
        .clone()
        .unwrap_or_default()
        .into_iter()
        .collect();
    annotations.insert("runv.sandbox".into(), kind.name().into());
    Record {
        id: id.into(),
        bundle: bundle.dir.clone(),
        rootfs: bundle.rootfs.clone(),
        created: crate::state::now_rfc3339(),
        sandbox: kind.name().into(),
        monitor_pid: 0,
        agent_pid: 0,
        init_pid: 0,
        started: false,
        exit: None,
        annotations,
        paused: false,
    }
}
