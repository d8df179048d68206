//! The cloned child: one function per step, system calls only.
//!
//! The agent is multi-threaded and a cloned child inherits its locks but not its threads, so
//! nothing here allocates or calls into glibc where it would synchronise with other threads:
//! every string and array was prepared in the [`Plan`]; paths built here live in stack buffers
//! ([`FdPath`](super::resolve::FdPath)). A failing step reports its [`Step`] and errno on the `ready` pipe and ends the
//! child with `_exit`.

mod creds;
mod fs;

use std::os::fd::{AsRawFd, RawFd};

use super::plan::Plan;
use super::resolve::close;
use super::{ChildStdio, Step};
use creds::{drop_privileges, exec, install_seccomp};
use fs::{
    bind_console, make_device, make_mounts_private, mask_path, mount_root, pivot, readonly_path,
    remount_root_readonly, root_propagation, spec_mount, write_sysctls,
};

/// The pipes of a child: it reports on `ready` and waits on `start`.
pub(super) struct ChildFds {
    pub(super) ready: RawFd,
    pub(super) start: RawFd,
}

/// Writes `(kind, value)` on the ready pipe (kind -1: a value; `PID_REPORT`: the exec helper's
/// inner pid; else a step with errno).
pub(super) fn report(fd: RawFd, kind: i32, val: i32) {
    let mut b = [0u8; 8];
    b[..4].copy_from_slice(&kind.to_le_bytes());
    b[4..].copy_from_slice(&val.to_le_bytes());
    // SAFETY: writing a local buffer to an fd the child owns.
    unsafe { libc::write(fd, b.as_ptr().cast(), 8) };
}

fn errno() -> i32 {
    std::io::Error::last_os_error()
        .raw_os_error()
        .unwrap_or(libc::EIO)
}

/// Reports `step` failing with `err` and ends the child.
fn fail(fds: &ChildFds, step: Step, err: i32) -> ! {
    report(fds.ready, step as i32, err);
    // SAFETY: ends the child without running any of the agent's destructors or atexit hooks.
    unsafe { libc::_exit(126) }
}

/// Ends the child with `step`'s errno when `rc` is negative.
fn check(fds: &ChildFds, step: Step, rc: impl Into<i64>) {
    if rc.into() < 0 {
        fail(fds, step, errno());
    }
}

fn ptr(c: &Option<std::ffi::CString>) -> *const libc::c_char {
    c.as_ref().map_or(std::ptr::null(), |c| c.as_ptr())
}

/// mount(2) with optional C strings.
fn mount(
    source: *const libc::c_char,
    target: *const libc::c_char,
    fstype: *const libc::c_char,
    flags: libc::c_ulong,
    data: *const libc::c_char,
) -> libc::c_int {
    // SAFETY: every pointer is null or a NUL-terminated string kept alive by the caller (the
    // plan, a stack buffer or a literal); mount(2) only reads them.
    unsafe { libc::mount(source, target, fstype, flags, data.cast()) }
}

/// The child's entry point, called by `clone`.
pub(super) fn child_main(plan: &Plan, stdio: &ChildStdio, fds: &ChildFds) -> isize {
    reset_signals();
    join_namespaces(plan, fds);
    if let Some(r) = &plan.rootfs {
        make_mounts_private(fds);
        let root = mount_root(r, fds);
        for m in &r.mounts {
            spec_mount(root, m, fds);
        }
        for d in &r.devices {
            make_device(root, d, fds);
        }
        if let Some(tty) = &stdio.tty_path {
            bind_console(root, &r.console, tty, fds);
        }
        pivot(root, fds);
        close(root);
        root_propagation(r.propagation, fds);
        // Before readonlyPaths, which usually make /proc/sys read-only.
        write_sysctls(&r.sysctls, fds);
        for p in &r.masked {
            mask_path(p, fds);
        }
        for p in &r.readonly_paths {
            readonly_path(p, fds);
        }
        if r.readonly {
            remount_root_readonly(fds);
        }
    }
    set_hostname(plan, fds);
    set_rlimits(plan, fds);
    set_stdio(plan, stdio, fds);
    // SAFETY: chdir with a C string from the plan.
    check(fds, Step::Chdir, unsafe { libc::chdir(plan.cwd.as_ptr()) });
    if let Some(m) = plan.umask {
        // SAFETY: umask(2) cannot fail.
        unsafe { libc::umask(m) };
    }
    wait_for_start(fds);
    if plan.cgroupns {
        // Now in the container's cgroup (the agent moved it there before start): that cgroup
        // becomes the namespace's root.
        // SAFETY: unshare with a flag constant.
        check(fds, Step::CgroupNs, unsafe {
            libc::unshare(libc::CLONE_NEWCGROUP)
        });
    }
    if !plan.no_new_privs {
        // Without no_new_privs only a privileged process may install a filter: before the drop.
        install_seccomp(plan, fds);
    }
    drop_privileges(plan, fds);
    if plan.no_new_privs {
        // SAFETY: prctl with integer arguments.
        let rc = unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) };
        check(fds, Step::NoNewPrivs, rc);
        // The very last step before execve.
        install_seccomp(plan, fds);
    }
    exec(plan, fds)
}

/// The agent blocks SIGTERM/SIGINT (it reads them from a signalfd) and ignores SIGPIPE, and it
/// may itself have been started with signals ignored (a background job of a shell ignores
/// SIGINT and SIGQUIT, nohup SIGHUP); a blocked mask and ignored signals survive execve, and a
/// shell cannot even trap a signal ignored at its start. So the container gets a clean slate:
/// nothing blocked, every disposition the default (as in a fresh process).
fn reset_signals() {
    // SAFETY: an all-zero sigset_t is the empty set.
    let empty: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: rt_sigprocmask with a local set of the kernel's size (8 bytes); raw, because
    // glibc's sigprocmask may take locks.
    unsafe {
        libc::syscall(
            libc::SYS_rt_sigprocmask,
            libc::SIG_SETMASK,
            &empty,
            std::ptr::null_mut::<libc::sigset_t>(),
            8,
        );
    }
    // The kernel's `struct sigaction` for SIG_DFL: handler 0 (SIG_DFL), no flags, no restorer,
    // an empty mask (8 bytes).
    let default = [0u64; 4];
    for sig in 1..=64 {
        // SAFETY: rt_sigaction with a local all-zero kernel sigaction (SIG_DFL) and no old
        // action; raw, as glibc refuses its own real-time signals. SIGKILL and SIGSTOP fail
        // with EINVAL, which is fine: they cannot be caught or ignored anyway.
        unsafe {
            libc::syscall(
                libc::SYS_rt_sigaction,
                sig,
                default.as_ptr(),
                std::ptr::null_mut::<u64>(),
                8,
            );
        }
    }
}

/// Exec into a running container: join its namespaces, then fork so the pid namespace
/// applies; the intermediate reports the inner pid and exits.
fn join_namespaces(plan: &Plan, fds: &ChildFds) {
    for ns in &plan.join {
        // SAFETY: setns on an fd the plan owns.
        check(fds, Step::Setns, unsafe { libc::setns(ns.as_raw_fd(), 0) });
    }
    if plan.fork_after_join {
        // SAFETY: the raw system call: glibc's fork() runs atfork handlers and takes locks that
        // threads absent from this child may hold. The child continues on a copy of this stack.
        let pid = unsafe { libc::syscall(libc::SYS_fork) } as i32;
        check(fds, Step::Fork, pid);
        if pid > 0 {
            // Its own kind: the inner child may report ready before this is written.
            report(fds.ready, super::PID_REPORT, pid);
            // SAFETY: ends the intermediate without running destructors.
            unsafe { libc::_exit(0) };
        }
    }
}

fn set_hostname(plan: &Plan, fds: &ChildFds) {
    if let Some(h) = &plan.hostname {
        // SAFETY: sethostname with a C string from the plan and its length.
        let rc = unsafe { libc::sethostname(h.as_ptr(), h.as_bytes().len()) };
        check(fds, Step::Hostname, rc);
    }
    if let Some(d) = &plan.domainname {
        // SAFETY: setdomainname with a C string from the plan and its length.
        let rc = unsafe { libc::setdomainname(d.as_ptr(), d.as_bytes().len()) };
        check(fds, Step::Domainname, rc);
    }
}

fn set_rlimits(plan: &Plan, fds: &ChildFds) {
    for (res, lim) in &plan.rlimits {
        // SAFETY: setrlimit with a resource number and an rlimit from the plan.
        check(fds, Step::Rlimit, unsafe {
            libc::setrlimit(*res as _, lim)
        });
    }
}

/// A new session, the terminal as controlling tty, and the stdio fds as 0, 1, 2.
fn set_stdio(plan: &Plan, stdio: &ChildStdio, fds: &ChildFds) {
    // SAFETY: setsid has no arguments.
    check(fds, Step::Stdio, unsafe { libc::setsid() });
    if stdio.controlling_tty {
        // SAFETY: TIOCSCTTY on the pty slave fd the agent passed.
        let rc = unsafe { libc::ioctl(stdio.fds[0], libc::TIOCSCTTY, 0) };
        check(fds, Step::Stdio, rc);
        if let Some(ws) = &plan.console {
            // SAFETY: TIOCSWINSZ with a plan-owned winsize on the pty slave fd.
            let rc = unsafe { libc::ioctl(stdio.fds[0], libc::TIOCSWINSZ, ws) };
            check(fds, Step::Console, rc);
        }
    }
    for (i, fd) in stdio.fds.iter().enumerate() {
        // SAFETY: dup2 of fds the agent passed onto 0..2.
        check(fds, Step::Stdio, unsafe { libc::dup2(*fd, i as i32) });
    }
}

/// Reports readiness and blocks until the agent writes the start byte (or gives up).
fn wait_for_start(fds: &ChildFds) {
    report(fds.ready, -1, 0);
    let mut b = [0u8; 1];
    // SAFETY: reading one byte into a local buffer.
    if unsafe { libc::read(fds.start, b.as_mut_ptr().cast(), 1) } != 1 {
        // SAFETY: the agent gave up on this container; end without destructors.
        unsafe { libc::_exit(125) };
    }
}
