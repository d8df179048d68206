//! One `runv-vmm --shell` process and its control connection.
//!
//! The shell inherits one end of a socketpair as its control connection (`--control-fd 3`), so
//! the first request can be written as soon as the process exists and is answered once the
//! shell is ready: readiness holds by construction, with no polling of `connect`. The shell also
//! listens on `<run_dir>/<name>.sock` for other clients.
//!
//! A jailed shell ([`ShellSpec::jail`]) is `runv-vmm --jail`: its files go in its own directory
//! `<run_dir>/<name>/` (owned by the jail uid, bound read-write into the jail at the same
//! path), its jail root is `<run_dir>/<name>.root`, its cgroup `runv/<name>`, and the
//! template snapshot directories it may restore from are bound read-only at the same path, so
//! every path in a control request means the same inside the jail as on the host.

use std::io::{BufRead, BufReader};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::time::Duration;

use vmm_api::{ClientError, ControlClient, RestoreOptions, RestoreReply, StatusReply};

/// The fd number a shell's inherited control connection gets.
const CONTROL_FD: i32 = 3;
/// How long a new shell may take to answer its first `status`.
const READY_TIMEOUT: Duration = Duration::from_secs(10);

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
    /// A control request failed or was refused.
    #[error("shell {name}: {source}")]
    Control {
        /// The shell's name.
        name: String,
        /// Cause.
        source: ClientError,
    },
    /// Its TAP or sandbox network could not be set up.
    #[error("sandbox network: {0}")]
    Net(#[from] crate::network::NetError),
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
    /// Directory for the shells' control sockets.
    pub run_dir: PathBuf,
    /// Jail each shell (`runv-vmm --jail`); `None` runs it unconfined, as root.
    pub jail: Option<ShellJail>,
}

/// How a pool jails its shells.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShellJail {
    /// uid and gid every jailed VMM of the pool runs as (one pool id; each VMM is alone in
    /// its own pid and mount namespaces).
    pub uid: u32,
    /// gid of the jailed VMMs.
    pub gid: u32,
    /// Snapshot directories (or other files) bound read-only into each jail at the same path.
    pub read_only: Vec<PathBuf>,
    /// Directories bound read-write at the same path (besides the shell's own files
    /// directory): a uffd template's directory while its clones still record a working set.
    pub read_write: Vec<PathBuf>,
}

impl ShellJail {
    /// The pool default: uid/gid [`vmm_api::jail::DEFAULT_JAIL_ID`], nothing bound yet.
    pub fn pool_default() -> Self {
        Self {
            uid: vmm_api::jail::DEFAULT_JAIL_ID,
            gid: vmm_api::jail::DEFAULT_JAIL_ID,
            read_only: Vec::new(),
            read_write: Vec::new(),
        }
    }
}

impl ShellSpec {
    /// The directory holding shell `name`'s socket, vsock socket and log.
    pub fn files_dir(&self, name: &str) -> PathBuf {
        match self.jail {
            Some(_) => self.run_dir.join(name),
            None => self.run_dir.clone(),
        }
    }
}

/// Removes everything shell `name` in `run_dir` may have left once its VMM is gone, jailed or
/// not, on any path (`kill -9` included): its files, its directory, its jail root and cgroup.
/// Idempotent; waits up to a second for a killed VMM to leave its cgroup.
pub fn remove_leftovers(run_dir: &Path, name: &str) {
    for ext in ["sock", "vsock", "log"] {
        let _ = std::fs::remove_file(run_dir.join(format!("{name}.{ext}")));
    }
    let _ = std::fs::remove_dir_all(run_dir.join(name));
    let root = run_dir.join(format!("{name}.root"));
    if root.exists() || vmm_api::jail::Cgroup::of(name).exists() {
        if let Err(e) = vmm_api::jail::cleanup(&root, name) {
            tracing::warn!("cleaning up the jail of {name}: {e}");
        }
    }
}

/// A running shell (and, after [`ShellProcess::restore`], the clone it became).
pub struct ShellProcess {
    name: String,
    child: Child,
    control: ControlClient,
    stdout: Option<BufReader<ChildStdout>>,
    socket: PathBuf,
    /// Its TAP and sandbox network; dropped (torn down) after the VMM is ended.
    net: Option<crate::network::SandboxNet>,
    /// Whether it runs jailed (its files then live in `<run_dir>/<name>/`).
    jailed: bool,
}

/// Creates `dir` (mode 0700) owned by the jail's uid/gid, so that only the jailed VMM (and
/// root) can use what it makes there.
fn make_owned_dir(dir: &Path, uid: u32, gid: u32) -> Result<(), ShellError> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(dir)
        .map_err(io(format!("creating {}", dir.display())))?;
    std::os::unix::fs::chown(dir, Some(uid), Some(gid))
        .map_err(io(format!("chown {} to the jail uid", dir.display())))
}

impl ShellProcess {
    /// Starts a shell named `name` and waits until it answers `status`.
    pub fn spawn(spec: &ShellSpec, name: &str) -> Result<Self, ShellError> {
        let dir = spec.files_dir(name);
        let socket = dir.join(format!("{name}.sock"));
        let (ours, theirs) = UnixStream::pair().map_err(io("creating a socketpair"))?;
        let their_fd = theirs.as_raw_fd();
        let mut cmd = Command::new(&spec.vmm);
        if let Some(j) = &spec.jail {
            make_owned_dir(&dir, j.uid, j.gid)?;
            let jail = vmm_api::jail::JailSpec {
                root: spec.run_dir.join(format!("{name}.root")),
                id: name.into(),
                uid: j.uid,
                gid: j.gid,
                read_only: j.read_only.clone(),
                read_write: std::iter::once(dir.clone())
                    .chain(j.read_write.iter().cloned())
                    .collect(),
                mem_mib: spec.mem_mib + vmm_api::jail::MEMORY_OVERHEAD_MIB,
                pids_max: vmm_api::jail::DEFAULT_PIDS_MAX,
            };
            cmd.args(jail.args());
        }
        cmd.arg("--shell")
            .args(["--mem-mib", &spec.mem_mib.to_string()])
            .args(["--vcpus", &spec.vcpus.to_string()])
            .arg("--control")
            .arg(&socket)
            .args(["--control-fd", &CONTROL_FD.to_string()])
            .stdout(Stdio::piped())
            .stdin(Stdio::null());
        // SAFETY: the closure runs in the forked child before exec and only calls
        // async-signal-safe functions (dup2, fcntl) on fds it inherited.
        unsafe {
            cmd.pre_exec(move || {
                if their_fd == CONTROL_FD {
                    // dup2 onto itself keeps close-on-exec: clear it instead.
                    if libc::fcntl(CONTROL_FD, libc::F_SETFD, 0) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                } else if libc::dup2(their_fd, CONTROL_FD) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            })
        };
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => {
                remove_leftovers(&spec.run_dir, name);
                return Err(io(format!("spawning {}", spec.vmm.display()))(e));
            }
        };
        drop(theirs);
        let stdout = child.stdout.take().map(BufReader::new);
        let control = match ControlClient::from_stream(ours) {
            Ok(c) => c,
            Err(source) => {
                let _ = child.kill();
                let _ = child.wait();
                remove_leftovers(&spec.run_dir, name);
                return Err(ShellError::Control {
                    name: name.into(),
                    source,
                });
            }
        };
        let mut shell = Self {
            name: name.into(),
            child,
            control,
            stdout,
            socket,
            net: None,
            jailed: spec.jail.is_some(),
        };
        shell
            .control
            .set_timeout(READY_TIMEOUT)
            .map_err(|e| shell.err(e))?;
        shell.status()?;
        shell
            .control
            .set_timeout(vmm_api::DEFAULT_TIMEOUT)
            .map_err(|e| shell.err(e))?;
        Ok(shell)
    }

    fn err(&self, source: ClientError) -> ShellError {
        ShellError::Control {
            name: self.name.clone(),
            source,
        }
    }

    /// The typed control connection (requests other than the ones below).
    pub fn client(&mut self) -> &mut ControlClient {
        &mut self.control
    }

    /// `status` of the shell or the clone it became.
    pub fn status(&mut self) -> Result<StatusReply, ShellError> {
        self.control.status().map_err(|e| self.err(e))
    }

    /// Restores a snapshot into this shell (per-clone settings in `opts`).
    pub fn restore(&mut self, opts: &RestoreOptions) -> Result<RestoreReply, ShellError> {
        self.control.restore(opts).map_err(|e| self.err(e))
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

    /// Whether the VMM has exited (without waiting): its exit status once it has.
    pub fn try_wait(&mut self) -> Option<std::process::ExitStatus> {
        let status = self.child.try_wait().ok().flatten();
        if let Some(s) = status {
            if std::os::unix::process::ExitStatusExt::signal(&s) == Some(libc::SIGSYS) {
                tracing::error!(
                    "VMM {} (pid {}) was killed by SIGSYS: a seccomp violation; the kernel audit \
                     log (type=1326) names the thread and syscall",
                    self.name,
                    self.child.id()
                );
            }
        }
        status
    }

    /// The shell's name (its control socket is `<run_dir>/<name>.sock`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Lets the VMM outlive this handle: nothing is killed, waited for or removed (a daemon
    /// that exits with leased sandboxes running). Returns the process id.
    pub fn detach(self) -> u32 {
        let pid = self.child.id();
        std::mem::forget(self);
        pid
    }

    /// Gives the VM its TAP and network (torn down when the VM ends).
    pub fn set_net(&mut self, net: crate::network::SandboxNet) {
        self.net = Some(net);
    }

    /// Its TAP and network, if it has them.
    pub fn net_mut(&mut self) -> Option<&mut crate::network::SandboxNet> {
        self.net.as_mut()
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The process that runs the VM: the jail keeper's only child when jailed (in the jail's
    /// own namespaces; `None` if it is gone), else [`ShellProcess::pid`].
    pub fn vmm_pid(&self) -> Option<u32> {
        let keeper = self.pid();
        if !self.jailed {
            return Some(keeper);
        }
        std::fs::read_dir("/proc")
            .ok()?
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
            .find(|pid| parent_of(*pid) == Some(keeper))
    }

    /// The control socket other clients can connect to.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The directory holding this shell's socket, vsock socket and log (`<run_dir>/<name>`
    /// when jailed, else the run dir).
    pub fn files_dir(&self) -> &Path {
        self.socket.parent().unwrap_or(Path::new("/"))
    }

    /// Whether it runs jailed (its files in its own directory, [`ShellProcess::files_dir`]).
    pub fn is_jailed(&self) -> bool {
        self.jailed
    }

    /// Asks the VMM to shut down and waits for it.
    pub fn shutdown(mut self) -> Result<std::process::ExitStatus, ShellError> {
        // A VMM that already exited (e.g. after a failed restore) cannot answer; waiting is
        // what matters.
        let _ = self.control.shutdown();
        self.child.wait().map_err(io("waiting for the VMM"))
    }
}

/// The parent pid of `pid` (from `/proc/<pid>/stat`; the command name may hold spaces).
pub(crate) fn parent_of(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(')')?
        .1
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

impl Drop for ShellProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            // SAFETY: kill(2) on our own child process; SIGTERM ends a VMM cleanly.
            unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
            let _ = self.child.wait();
        }
        let _ = std::fs::remove_file(&self.socket);
        if self.jailed {
            if let Some(run_dir) = self.files_dir().parent() {
                remove_leftovers(run_dir, &self.name);
            }
        }
    }
}
