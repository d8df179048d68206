//! Starting a container's process: a [`Plan`] is prepared in the agent from the OCI spec
//! ([`plan`]: paths, strings, ids, seccomp filters; every rejection happens there), then
//! `clone(2)` creates the child in new namespaces, and the child ([`child`]) only makes system
//! calls — it never allocates and uses raw system calls where glibc would synchronise with other
//! threads, because the agent is multi-threaded and a cloned child inherits its locks but not
//! its threads.
//!
//! Child steps: root file system, the spec's mounts (each target resolved inside the root, see
//! [`resolve`]), device nodes (`linux.devices`), `pivot_root`, the root's propagation,
//! sysctls, masked and read-only paths, hostname and domain name, rlimits, stdio (and terminal
//! size), working directory, umask; it then reports success (or the failing step and errno) on the
//! `ready` pipe and blocks on the `start` pipe. On start (now in the container's cgroup) it
//! unshares the cgroup namespace when the spec asks for one, drops privileges (bounding set,
//! groups, uid/gid, capabilities, no_new_privs), installs the seccomp filters ([`seccomp`]) and
//! `execve`s; an exec failure goes back on the `ready` pipe, which `O_CLOEXEC` closes on success.

mod child;
mod fields;
mod mounts;
mod names;
mod plan;
mod resolve;
mod seccomp;

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

pub use fields::unknown_field;
pub use plan::Plan;

/// Error preparing or starting a process.
#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    /// The spec or request is unusable; the message says what to change.
    #[error("{0}")]
    Invalid(String),
    /// A system call in the agent failed.
    #[error("{what}: {source}")]
    Sys {
        /// What failed.
        what: &'static str,
        /// Cause.
        source: std::io::Error,
    },
    /// Moving the new process into its cgroup failed.
    #[error("moving the container process into its cgroup: {0}")]
    Join(String),
    /// A step in the child failed.
    #[error("container setup failed at {step}: {source}")]
    Child {
        /// The step.
        step: &'static str,
        /// errno.
        source: std::io::Error,
    },
}

/// Child steps, reported with errno when they fail.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(i32)]
pub(crate) enum Step {
    MakePrivate,
    MountRoot,
    MountPoint,
    Mount,
    Remount,
    Pivot,
    Mask,
    Readonly,
    Hostname,
    Rlimit,
    Stdio,
    Chdir,
    Bounding,
    Ids,
    Capset,
    NoNewPrivs,
    Seccomp,
    Exec,
    Setns,
    Fork,
    Mknod,
    RootPropagation,
    Sysctl,
    Domainname,
    CgroupNs,
    Console,
    DevConsole,
}

impl Step {
    const ALL: [Step; 27] = [
        Step::MakePrivate,
        Step::MountRoot,
        Step::MountPoint,
        Step::Mount,
        Step::Remount,
        Step::Pivot,
        Step::Mask,
        Step::Readonly,
        Step::Hostname,
        Step::Rlimit,
        Step::Stdio,
        Step::Chdir,
        Step::Bounding,
        Step::Ids,
        Step::Capset,
        Step::NoNewPrivs,
        Step::Seccomp,
        Step::Exec,
        Step::Setns,
        Step::Fork,
        Step::Mknod,
        Step::RootPropagation,
        Step::Sysctl,
        Step::Domainname,
        Step::CgroupNs,
        Step::Console,
        Step::DevConsole,
    ];

    fn from_index(i: i32) -> Option<Self> {
        Self::ALL.iter().copied().find(|s| *s as i32 == i)
    }

    /// What the step does, for error messages.
    fn describe(self) -> &'static str {
        match self {
            Step::MakePrivate => "make / private",
            Step::MountRoot => "mount the root file system",
            Step::MountPoint => "resolve or create a mount point inside the root",
            Step::Mount => "mount",
            Step::Remount => "remount (read-only, flags or propagation)",
            Step::Pivot => "pivot_root",
            Step::Mask => "mask a path (maskedPaths)",
            Step::Readonly => "make a path read-only (readonlyPaths)",
            Step::Hostname => "sethostname",
            Step::Rlimit => "setrlimit",
            Step::Stdio => "stdio",
            Step::Chdir => "chdir",
            Step::Bounding => "drop the capability bounding set",
            Step::Ids => "setgroups/setgid/setuid",
            Step::Capset => "capset",
            Step::NoNewPrivs => "no_new_privs",
            Step::Seccomp => "install the seccomp filter",
            Step::Exec => "execve",
            Step::Setns => "setns",
            Step::Fork => "fork",
            Step::Mknod => "create a device node (linux.devices)",
            Step::RootPropagation => "set the root's propagation (linux.rootfsPropagation)",
            Step::Sysctl => "write a sysctl (linux.sysctl) through the container's /proc",
            Step::Domainname => "setdomainname",
            Step::CgroupNs => "unshare the cgroup namespace",
            Step::Console => "set the terminal size (process.consoleSize)",
            Step::DevConsole => "bind the terminal onto the container's /dev/console",
        }
    }
}

/// Stdio of a child: the fds it gets as 0, 1, 2; with a terminal, the pty slave.
pub struct ChildStdio {
    /// stdin, stdout, stderr.
    pub fds: [RawFd; 3],
    /// Make the pty its controlling terminal.
    pub controlling_tty: bool,
    /// The pty slave's path in the agent's mount namespace (e.g. `/dev/pts/3`): the child binds
    /// it onto the container's `/dev/console` through that path, since a bind mount cannot
    /// take its source from an fd of another mount namespace.
    pub tty_path: Option<std::ffi::CString>,
}

/// A child created and set up, blocked before exec.
pub struct Pending {
    /// Pid (agent's view).
    pub pid: i32,
    start_w: OwnedFd,
    ready_r: OwnedFd,
    /// Exec children: the intermediate process to reap.
    pub intermediate: Option<i32>,
}

fn pipe() -> Result<(OwnedFd, OwnedFd), SpawnError> {
    let mut fds = [0; 2];
    // SAFETY: fds is a valid 2-int array; the result is checked.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(SpawnError::Sys {
            what: "pipe2",
            source: std::io::Error::last_os_error(),
        });
    }
    // SAFETY: both fds were just created and are owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Report kind of the exec helper's inner pid. The helper and the inner child write the same
/// pipe, so the inner child's ready report (kind -1) may come first: the kinds tell them apart.
pub(crate) const PID_REPORT: i32 = -2;

/// Reads the exec helper's inner pid and, when it came first, the inner child's own report.
fn read_inner_pid(fd: RawFd) -> Result<(i32, Option<Option<i32>>), SpawnError> {
    match read_report_kind(fd)? {
        None => Err(SpawnError::Invalid("exec helper exited early".into())),
        Some((PID_REPORT, pid)) if pid > 0 => Ok((pid, None)),
        Some((-1, ready)) => match read_report_kind(fd)? {
            Some((PID_REPORT, pid)) if pid > 0 => Ok((pid, Some(Some(ready)))),
            _ => Err(SpawnError::Invalid("exec helper sent no valid pid".into())),
        },
        Some((kind, val)) => Err(report_error(kind, val)),
    }
}

fn report_error(kind: i32, val: i32) -> SpawnError {
    if kind == PID_REPORT {
        return SpawnError::Invalid(format!("unexpected exec helper pid report {val}"));
    }
    SpawnError::Child {
        step: Step::from_index(kind).map_or("?", Step::describe),
        source: std::io::Error::from_raw_os_error(val),
    }
}

/// Reads a child report: `Ok(None)` on EOF (exec happened), `Ok(Some(pid))` for a pid message.
fn read_report(fd: RawFd) -> Result<Option<i32>, SpawnError> {
    match read_report_kind(fd)? {
        None => Ok(None),
        Some((-1, val)) => Ok(Some(val)),
        Some((kind, val)) => Err(report_error(kind, val)),
    }
}

/// Reads one raw `(kind, value)` report; `Ok(None)` on EOF.
fn read_report_kind(fd: RawFd) -> Result<Option<(i32, i32)>, SpawnError> {
    let mut buf = [0u8; 8];
    let mut got = 0;
    while got < 8 {
        // SAFETY: reading into a local buffer of the stated size.
        let n = unsafe { libc::read(fd, buf[got..].as_mut_ptr().cast(), 8 - got) };
        if n == 0 {
            break;
        }
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(SpawnError::Sys {
                what: "reading the child's report",
                source: e,
            });
        }
        got += n as usize;
    }
    if got == 0 {
        return Ok(None);
    }
    let kind = i32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]]);
    let val = i32::from_le_bytes([buf[4], buf[5], buf[6], buf[7]]);
    Ok(Some((kind, val)))
}

/// Clones the child per `plan` with `stdio`; returns once it is set up and waiting for
/// [`start`], or with the step that failed (the child is then reaped).
///
/// `join` moves the new process into its cgroup as soon as its pid is known, while the child
/// still sets up its mounts: a cgroup v1 move waits for an RCU grace period (5-13 ms here, the
/// largest single cost of a container start), which so overlaps the child's work instead of
/// following it. The child cannot `execve` before [`start`], so it runs nothing of the
/// container's outside the cgroup either way.
pub fn spawn(
    plan: &Plan,
    stdio: &ChildStdio,
    join: &dyn Fn(i32) -> Result<(), String>,
) -> Result<Pending, SpawnError> {
    if plan.needs_cgroup() {
        return Err(SpawnError::Invalid(
            "internal: the plan's cgroup mounts were never bound to a cgroup (Plan::bind_cgroup)"
                .into(),
        ));
    }
    let (ready_r, ready_w) = pipe()?;
    let (start_r, start_w) = pipe()?;
    let fds = child::ChildFds {
        ready: ready_w.as_raw_fd(),
        start: start_r.as_raw_fd(),
    };
    let mut stack = vec![0u8; 256 * 1024];
    let cb = Box::new(|| child::child_main(plan, stdio, &fds));
    let flags = nix::sched::CloneFlags::from_bits_retain(plan.clone_flags);
    // SAFETY: the child runs `child::child_main`, which only makes system calls on data prepared
    // in the plan (no allocation, no locks) and ends in execve or _exit; the stack outlives the call
    // (the child has its own copy of the address space).
    let pid = unsafe { nix::sched::clone(cb, &mut stack, flags, Some(libc::SIGCHLD)) }
        .map_err(|e| SpawnError::Sys {
            what: "clone",
            source: std::io::Error::from_raw_os_error(e as i32),
        })?
        .as_raw();
    if plan.rootfs.is_some() {
        seccomp::remember(pid, plan.seccomp.as_ref());
    }
    drop(ready_w);
    drop(start_r);
    let reap = |p: i32| {
        // Never 0 or negative: kill(2) would hit a whole process group.
        if p <= 0 {
            return;
        }
        // SAFETY: p is our child; we reap it so it does not linger as a zombie.
        unsafe {
            libc::kill(p, libc::SIGKILL);
            libc::waitpid(p, std::ptr::null_mut(), 0);
        }
    };
    let (pid, intermediate, early) = if plan.fork_after_join {
        match read_inner_pid(ready_r.as_raw_fd()) {
            Ok((inner, early)) => (inner, Some(pid), early),
            Err(e) => {
                reap(pid);
                return Err(e);
            }
        }
    } else {
        (pid, None, None)
    };
    let joined = join(pid);
    let report = match early {
        Some(r) => Ok(r),
        None => read_report(ready_r.as_raw_fd()),
    };
    // A child whose setup failed may be gone before it could be moved: its own report is the
    // error worth giving.
    let report = match (joined, report) {
        (Err(e), Ok(_)) => Err(SpawnError::Join(e)),
        (_, report) => report,
    };
    match report {
        Ok(Some(0)) => Ok(Pending {
            pid,
            start_w,
            ready_r,
            intermediate,
        }),
        Ok(_) => {
            reap(pid);
            Err(SpawnError::Invalid(
                "child ended before it was ready".into(),
            ))
        }
        Err(e) => {
            reap(pid);
            if let Some(i) = intermediate {
                reap(i);
            }
            Err(e)
        }
    }
}

/// Releases a pending child into `execve`; an exec failure is returned (the child exits 127).
pub fn start(p: Pending) -> Result<i32, SpawnError> {
    // SAFETY: writing one byte from a local to a pipe we own.
    let n = unsafe { libc::write(p.start_w.as_raw_fd(), [1u8].as_ptr().cast(), 1) };
    if n != 1 {
        return Err(SpawnError::Sys {
            what: "releasing the container process",
            source: std::io::Error::last_os_error(),
        });
    }
    read_report(p.ready_r.as_raw_fd())?;
    Ok(p.pid)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn step_indices_round_trip() {
        for (i, s) in Step::ALL.iter().enumerate() {
            assert_eq!(*s as i32, i as i32);
            assert_eq!(Step::from_index(i as i32), Some(*s));
        }
        assert_eq!(Step::from_index(99), None);
        assert_eq!(Step::Seccomp.describe(), "install the seccomp filter");
    }
}
