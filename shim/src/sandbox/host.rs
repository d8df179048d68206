//! The `host` backend: one `runv-agent --listen unix:<root>/<id>/agent.sock` host process per
//! container. Namespaces and cgroups only: no VM isolation.

use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use protocol::client::Client;

use super::{Sandbox, SandboxError};
use crate::state::ContainerDir;

/// The file descriptor the agent inherits its listening socket as (`--listen fd:3`).
const AGENT_LISTEN_FD: i32 = 3;

/// Finds `runv-agent`: `$RUNV_AGENT`, then next to the running executable, then `$PATH`.
pub fn find_agent() -> Result<PathBuf, SandboxError> {
    if let Some(p) = std::env::var_os("RUNV_AGENT") {
        let p = PathBuf::from(p);
        return if p.is_file() {
            Ok(p)
        } else {
            Err(SandboxError::NoAgent)
        };
    }
    let beside = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(|d| d.join("runv-agent")));
    let on_path = std::env::var_os("PATH")
        .map(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join("runv-agent"))
                .collect::<Vec<_>>()
        })
        .unwrap_or_default();
    beside
        .into_iter()
        .chain(on_path)
        .find(|p| p.is_file())
        .ok_or(SandboxError::NoAgent)
}

/// A container's agent running on the host.
pub struct HostSandbox {
    child: Option<Child>,
    socket: PathBuf,
    /// The agent's stderr.
    log: PathBuf,
}

impl HostSandbox {
    /// Starts the agent for the container in `dir`. Its socket is bound and listening before
    /// the agent runs (socket activation: the agent inherits it as fd 3), so clients connect at
    /// once and their requests wait in the backlog until the agent has started: nobody polls.
    pub fn launch(dir: &ContainerDir) -> Result<Self, SandboxError> {
        let bin = find_agent()?;
        let socket = dir.agent_socket();
        let log = dir.path.join("agent.log");
        let listener = std::os::unix::net::UnixListener::bind(&socket)
            .map_err(|e| SandboxError::Bind(socket.clone(), e))?;
        let stderr = std::fs::File::create(&log)
            .map(Stdio::from)
            .unwrap_or_else(|_| Stdio::null());
        let mut cmd = Command::new(&bin);
        cmd.arg("--listen")
            .arg(format!("fd:{AGENT_LISTEN_FD}"))
            .arg("--state-dir")
            .arg(dir.path.join("agent"))
            .arg("--cgroup-group")
            .arg(cgroup_group(&dir.id))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr);
        let listen_fd = listener.as_raw_fd();
        // SAFETY: the closure runs in the forked child before exec and only calls dup2(2),
        // fcntl(2), setsid(2) and prctl(2), which are async-signal-safe: the listening socket
        // becomes fd 3 without close-on-exec, the agent gets its own session and process group
        // (a signal to its group never reaches the monitor) and ends with the monitor.
        unsafe {
            cmd.pre_exec(move || {
                if listen_fd == AGENT_LISTEN_FD {
                    if libc::fcntl(listen_fd, libc::F_SETFD, 0) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                } else if libc::dup2(listen_fd, AGENT_LISTEN_FD) != AGENT_LISTEN_FD {
                    return Err(std::io::Error::last_os_error());
                }
                libc::setsid();
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().map_err(|e| {
            let _ = std::fs::remove_file(&socket);
            SandboxError::Spawn(bin.clone(), e)
        })?;
        // The agent holds the socket now: once it is gone, connecting is refused.
        drop(listener);
        Ok(Self {
            child: Some(child),
            socket,
            log,
        })
    }

    /// The agent's socket.
    pub fn socket(&self) -> &Path {
        &self.socket
    }
}

/// The agent's parent cgroup for container `id`.
pub fn cgroup_group(id: &str) -> String {
    format!("runv-{id}")
}

impl Sandbox for HostSandbox {
    fn client(&self) -> Result<Client, SandboxError> {
        Client::connect(&self.socket).map_err(|e| SandboxError::AgentGone(self.log.clone(), e))
    }

    fn agent_log(&self) -> Option<&Path> {
        Some(&self.log)
    }

    fn pid(&self) -> i32 {
        self.child.as_ref().map_or(0, |c| c.id() as i32)
    }

    fn shutdown(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: kill(2) on our own child, not yet reaped; SIGTERM ends the agent cleanly
            // (it removes its cgroup group).
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(5);
            loop {
                match c.try_wait() {
                    Ok(Some(_)) | Err(_) => break,
                    Ok(None) if Instant::now() >= deadline => {
                        let _ = c.kill();
                        let _ = c.wait();
                        break;
                    }
                    Ok(None) => std::thread::sleep(Duration::from_millis(2)),
                }
            }
            // The socket is ours (we bound it), and nobody listens on it any more.
            let _ = std::fs::remove_file(&self.socket);
        }
    }
}

impl Drop for HostSandbox {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Kills whatever is left in the cgroups of container `id`'s agent and removes them: the
/// container's processes outlive an agent that was killed together with its monitor.
/// Returns the number of processes signalled.
pub fn reap_leftovers(id: &str) -> usize {
    let root = Path::new("/sys/fs/cgroup");
    let group = cgroup_group(id);
    let mut dirs = vec![root.join(&group)];
    if let Ok(ctls) = std::fs::read_dir(root) {
        dirs.extend(ctls.flatten().map(|c| c.path().join(&group)));
    }
    let mut killed = 0;
    for d in dirs.iter().filter(|d| d.is_dir()) {
        let mut tree = Vec::new();
        collect_dirs(d, &mut tree, 0);
        // Deepest first, so each rmdir finds its children gone.
        for cg in tree.iter().rev() {
            let procs = std::fs::read_to_string(cg.join("cgroup.procs")).unwrap_or_default();
            for pid in procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
                // SAFETY: kill(2) on a process listed in this container's own cgroup.
                unsafe { libc::kill(pid, libc::SIGKILL) };
                killed += 1;
            }
            let deadline = Instant::now() + Duration::from_secs(5);
            while std::fs::remove_dir(cg).is_err() && cg.exists() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(2));
            }
        }
    }
    killed
}

/// `dir` and its cgroup subdirectories, parents first (bounded depth).
fn collect_dirs(dir: &Path, out: &mut Vec<PathBuf>, depth: usize) {
    out.push(dir.to_path_buf());
    if depth >= 8 {
        return;
    }
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                collect_dirs(&e.path(), out, depth + 1);
            }
        }
    }
}
