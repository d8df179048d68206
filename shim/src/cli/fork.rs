//! Starting the container's monitor process: a `fork(2)` of `runv create` that goes on in
//! [`shim::monitor::run`] where `create` is single-threaded (it always is on the host backend),
//! else a fresh `runv __monitor` (`exec`). The fork saves an exec and the dynamic loading of
//! runv on every container start (~1.5 ms here); the exec keeps a multi-threaded `create` safe,
//! since a forked child inherits other threads' locks but not the threads.

use std::fs::File;
use std::os::unix::process::ExitStatusExt;
use std::process::{Child, ExitStatus};

use shim::monitor::{self, MonitorArgs};

/// The monitor, our child either way.
pub enum MonitorProcess {
    /// Started with `runv __monitor`.
    Exec(Child),
    /// A fork of this process.
    Forked(i32),
}

impl MonitorProcess {
    /// Its pid.
    pub fn id(&self) -> u32 {
        match self {
            Self::Exec(c) => c.id(),
            Self::Forked(pid) => *pid as u32,
        }
    }

    /// Waits for it to exit.
    pub fn wait(&mut self) -> std::io::Result<ExitStatus> {
        match self {
            Self::Exec(c) => c.wait(),
            Self::Forked(pid) => loop {
                let mut status = 0;
                // SAFETY: waitpid(2) on our own child with a valid out pointer.
                let rc = unsafe { libc::waitpid(*pid, &mut status, 0) };
                if rc == *pid {
                    return Ok(ExitStatus::from_raw(status));
                }
                let e = std::io::Error::last_os_error();
                if e.kind() != std::io::ErrorKind::Interrupted {
                    return Err(e);
                }
            },
        }
    }
}

/// Names this process `runv-monitor` (its `comm`, what `ps -o comm` and `top` show), however
/// it was started.
pub fn name_monitor() {
    // SAFETY: prctl(2) PR_SET_NAME with a NUL-terminated string of at most 16 bytes.
    unsafe { libc::prctl(libc::PR_SET_NAME, c"runv-monitor".as_ptr()) };
}

/// Whether this process has exactly one thread (`/proc/self/task` lists one).
pub fn single_threaded() -> bool {
    std::fs::read_dir("/proc/self/task").is_ok_and(|d| d.count() == 1)
}

/// Forks the monitor: the child becomes a session leader, runs the monitor with `args` and
/// reports readiness on `ready`, then exits with the container's status; the parent gets its
/// pid. Call only when [`single_threaded`].
pub fn fork_monitor(args: &MonitorArgs, ready: File) -> std::io::Result<i32> {
    // SAFETY: the caller checked that this process is single-threaded, so the child inherits
    // no lock held by another thread; it runs the monitor and leaves through `exit`, never
    // returning into the caller's code.
    let pid = unsafe { libc::fork() };
    match pid {
        -1 => Err(std::io::Error::last_os_error()),
        0 => {
            // SAFETY: setsid(2) in the new child: its own session, as a re-executed monitor has.
            unsafe { libc::setsid() };
            name_monitor();
            let code = monitor::run(args, ready);
            std::process::exit(code)
        }
        pid => Ok(pid),
    }
}
