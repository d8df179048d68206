//! One `runv-vmm --shell` process and its control connection.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// Error driving a shell.
#[derive(Debug, thiserror::Error)]
pub enum ShellError {
    /// Spawning or talking to the process failed.
    #[error("{what}: {source}")]
    Io {
        /// What failed.
        what: String,
        /// Cause.
        source: std::io::Error,
    },
    /// The shell answered with an error.
    #[error("{request} refused by the VMM: {reply}")]
    Refused {
        /// The request.
        request: String,
        /// The reply.
        reply: String,
    },
    /// The shell did not become ready in time.
    #[error("shell at {0} did not answer within {1:?}: is runv-vmm working (try it by hand with --shell)?")]
    Timeout(PathBuf, Duration),
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> ShellError {
    let what = what.into();
    move |source| ShellError::Io { what, source }
}

/// What shells to create.
#[derive(Debug, Clone)]
pub struct ShellSpec {
    /// The `runv-vmm` binary.
    pub vmm: PathBuf,
    /// Guest RAM in MiB (must match the template's).
    pub mem_mib: u64,
    /// vCPUs (must match the template's).
    pub vcpus: u8,
    /// Directory for control sockets.
    pub run_dir: PathBuf,
}

/// A running shell (and, after [`ShellProcess::restore`], the clone it became).
pub struct ShellProcess {
    child: Child,
    control: UnixStream,
    replies: BufReader<UnixStream>,
    stdout: Option<BufReader<ChildStdout>>,
    socket: PathBuf,
}

impl ShellProcess {
    /// Starts a shell named `name` and waits until it answers `status`.
    pub fn spawn(spec: &ShellSpec, name: &str) -> Result<Self, ShellError> {
        let socket = spec.run_dir.join(format!("{name}.sock"));
        let mut child = Command::new(&spec.vmm)
            .arg("--shell")
            .args(["--mem-mib", &spec.mem_mib.to_string()])
            .args(["--vcpus", &spec.vcpus.to_string()])
            .arg("--control")
            .arg(&socket)
            .stdout(Stdio::piped())
            .stdin(Stdio::null())
            .spawn()
            .map_err(io(format!("spawning {}", spec.vmm.display())))?;
        let stdout = child.stdout.take().map(BufReader::new);
        let deadline = Instant::now() + Duration::from_secs(10);
        let control = loop {
            match UnixStream::connect(&socket) {
                Ok(s) => break s,
                Err(_) if Instant::now() < deadline => {
                    if let Ok(Some(status)) = child.try_wait() {
                        return Err(ShellError::Io {
                            what: format!("shell {name}"),
                            source: std::io::Error::other(format!("exited early: {status}")),
                        });
                    }
                    std::thread::sleep(Duration::from_micros(200));
                }
                Err(_) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(ShellError::Timeout(socket, Duration::from_secs(10)));
                }
            }
        };
        let replies = BufReader::new(control.try_clone().map_err(io("cloning a socket"))?);
        let mut shell = Self {
            child,
            control,
            replies,
            stdout,
            socket,
        };
        shell.request(r#"{"cmd":"status"}"#)?;
        Ok(shell)
    }

    /// Sends one control request and returns the reply (an error reply is an error).
    pub fn request(&mut self, req: &str) -> Result<Value, ShellError> {
        writeln!(self.control, "{req}").map_err(io("writing to the shell"))?;
        let mut line = String::new();
        self.replies
            .read_line(&mut line)
            .map_err(io("reading the shell's reply"))?;
        let v: Value = serde_json::from_str(&line).map_err(|e| ShellError::Refused {
            request: req.into(),
            reply: format!("{line:?} ({e})"),
        })?;
        if v["ok"] != true {
            return Err(ShellError::Refused {
                request: req.into(),
                reply: line.trim().into(),
            });
        }
        Ok(v)
    }

    /// Restores `snapshot` into this shell. `extra` is merged into the request (per-clone
    /// settings: `clone_id`, `serial`, `debug_log`, `vsock_uds`, `block`).
    pub fn restore(
        &mut self,
        snapshot: &Path,
        mem_mode: &str,
        extra: Value,
    ) -> Result<Value, ShellError> {
        let mut req = serde_json::json!({
            "cmd": "restore",
            "dir": snapshot,
            "mem_mode": mem_mode,
        });
        if let (Some(r), Value::Object(e)) = (req.as_object_mut(), extra) {
            r.extend(e);
        }
        self.request(&req.to_string())
    }

    /// Reads the next line the clone writes on stdout (its debug reports with `debug_log: "-"`).
    pub fn next_stdout_line(&mut self) -> Result<String, ShellError> {
        let out = self.stdout.as_mut().ok_or_else(|| ShellError::Io {
            what: "reading the clone's stdout".into(),
            source: std::io::Error::other("stdout already closed"),
        })?;
        let mut line = String::new();
        if out
            .read_line(&mut line)
            .map_err(io("reading the clone's stdout"))?
            == 0
        {
            return Err(ShellError::Io {
                what: "reading the clone's stdout".into(),
                source: std::io::Error::other("the VMM exited"),
            });
        }
        Ok(line)
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Asks the VMM to shut down and waits for it.
    pub fn shutdown(mut self) -> Result<std::process::ExitStatus, ShellError> {
        let _ = writeln!(self.control, r#"{{"cmd":"shutdown"}}"#);
        self.child.wait().map_err(io("waiting for the VMM"))
    }
}

impl Drop for ShellProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            // SAFETY: kill(2) on our own child process; SIGTERM ends a VMM cleanly.
            unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
            let _ = self.child.wait();
        }
        let _ = std::fs::remove_file(&self.socket);
    }
}
