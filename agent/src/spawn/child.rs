//! The cloned child: one function per step, system calls only.
//!
//! The agent is multi-threaded and a cloned child inherits its locks but not its threads, so
//! nothing here allocates or calls into glibc where it would synchronise with other threads:
//! every string and array was prepared in the [`Plan`]; paths built here live in stack buffers
//! ([`FdPath`]). A failing step reports its [`Step`] and errno on the `ready` pipe and ends the
//! child with `_exit`.

use std::os::fd::{AsRawFd, RawFd};

use super::plan::{Caps, HostMount, MountOp, Plan, Rootfs, MAX_ARGS, MAX_ENV};
use super::resolve::{close, ensure_in_root, open_in_root, FdPath};
use super::{ChildStdio, Step};

/// The pipes of a child: it reports on `ready` and waits on `start`.
pub(super) struct ChildFds {
    pub(super) ready: RawFd,
    pub(super) start: RawFd,
}

/// Writes `(kind, value)` on the ready pipe (kind -1: a value; else a step with errno).
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
        pivot(root, fds);
        close(root);
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
    set_stdio(stdio, fds);
    // SAFETY: chdir with a C string from the plan.
    check(fds, Step::Chdir, unsafe { libc::chdir(plan.cwd.as_ptr()) });
    wait_for_start(fds);
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

/// The agent blocks SIGTERM/SIGINT (it reads them from a signalfd) and ignores SIGPIPE; both
/// would survive execve, so the container gets a clean slate.
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
    // SAFETY: restores a default disposition; no handler code is involved.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
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
            report(fds.ready, -1, pid);
            // SAFETY: ends the intermediate without running destructors.
            unsafe { libc::_exit(0) };
        }
    }
}

/// Keeps the container's mounts from propagating to the agent's namespace.
fn make_mounts_private(fds: &ChildFds) {
    let rc = mount(
        std::ptr::null(),
        c"/".as_ptr(),
        std::ptr::null(),
        libc::MS_REC | libc::MS_PRIVATE,
        std::ptr::null(),
    );
    check(fds, Step::MakePrivate, rc);
}

/// Mounts the root (bind, or tmpfs + overlay) at its host path and returns an O_PATH fd of it.
fn mount_root(r: &Rootfs, fds: &ChildFds) -> RawFd {
    for m in &r.setup {
        host_mount(m, fds);
    }
    // SAFETY: open with a C string from the plan (checked in the agent: not a symbolic link;
    // O_NOFOLLOW refuses one that appeared since).
    let fd = unsafe {
        libc::open(
            r.path.as_ptr(),
            libc::O_PATH | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC,
        )
    };
    check(fds, Step::MountRoot, fd);
    fd
}

fn host_mount(m: &HostMount, fds: &ChildFds) {
    for d in &m.mkdirs {
        // SAFETY: mkdir with a C string from the plan: agent-made directories in the tmpfs the
        // previous mount created.
        if unsafe { libc::mkdir(d.as_ptr(), 0o755) } < 0 && errno() != libc::EEXIST {
            fail(fds, Step::MountRoot, errno());
        }
    }
    let rc = mount(
        ptr(&m.source),
        m.target.as_ptr(),
        ptr(&m.fstype),
        m.flags,
        ptr(&m.data),
    );
    check(fds, Step::MountRoot, rc);
}

/// Resolves (creating if missing) the target inside `root` and mounts onto its fd, then applies
/// the bind remount and propagation to the new mount, re-resolved.
fn spec_mount(root: RawFd, m: &MountOp, fds: &ChildFds) {
    let target = match ensure_in_root(root, &m.target, m.file) {
        Ok(fd) => fd,
        Err(e) => fail(fds, Step::MountPoint, e),
    };
    let at = FdPath::new(target);
    let rc = mount(
        ptr(&m.source),
        at.as_ptr(),
        ptr(&m.fstype),
        m.flags,
        ptr(&m.data),
    );
    close(target);
    check(fds, Step::Mount, rc);
    if m.remount.is_none() && m.propagation == 0 {
        return;
    }
    // The fd above names the covered mount point; the new mount is what a fresh lookup finds.
    let mounted = match open_in_root(root, &m.target, m.target.names.len()) {
        Ok(fd) => fd,
        Err(e) => fail(fds, Step::Remount, e),
    };
    let at = FdPath::new(mounted);
    if let Some(flags) = m.remount {
        let rc = mount(
            std::ptr::null(),
            at.as_ptr(),
            std::ptr::null(),
            libc::MS_REMOUNT | libc::MS_BIND | flags,
            std::ptr::null(),
        );
        check(fds, Step::Remount, rc);
    }
    if m.propagation != 0 {
        let rc = mount(
            std::ptr::null(),
            at.as_ptr(),
            std::ptr::null(),
            m.propagation,
            std::ptr::null(),
        );
        check(fds, Step::Remount, rc);
    }
    close(mounted);
}

/// Makes the root `/`: pivot_root, or on the initramfs (which cannot be pivoted away from)
/// MS_MOVE over `/` and chroot, as runc's no-pivot does.
fn pivot(root: RawFd, fds: &ChildFds) {
    // SAFETY: fchdir on the root fd we opened.
    check(fds, Step::Pivot, unsafe { libc::fchdir(root) });
    // SAFETY: pivot_root with literal paths.
    if unsafe { libc::syscall(libc::SYS_pivot_root, c".".as_ptr(), c".".as_ptr()) } == 0 {
        // SAFETY: detaching the old root, stacked on `.`, by a literal path.
        check(fds, Step::Pivot, unsafe {
            libc::umount2(c".".as_ptr(), libc::MNT_DETACH)
        });
    } else if errno() == libc::EINVAL {
        let rc = mount(
            c".".as_ptr(),
            c"/".as_ptr(),
            std::ptr::null(),
            libc::MS_MOVE,
            std::ptr::null(),
        );
        check(fds, Step::Pivot, rc);
        // SAFETY: chroot with a literal path.
        check(fds, Step::Pivot, unsafe { libc::chroot(c".".as_ptr()) });
    } else {
        fail(fds, Step::Pivot, errno());
    }
    // SAFETY: chdir with a literal path.
    check(fds, Step::Pivot, unsafe { libc::chdir(c"/".as_ptr()) });
}

/// A masked path, as runc: `/dev/null` bound over a file, an empty read-only tmpfs over a
/// directory; a missing path is skipped (a missing /dev/null is an error: masking would be lost).
/// Runs after the pivot: links resolve in the container.
fn mask_path(path: &std::ffi::CStr, fds: &ChildFds) {
    let rc = mount(
        c"/dev/null".as_ptr(),
        path.as_ptr(),
        std::ptr::null(),
        libc::MS_BIND,
        std::ptr::null(),
    );
    if rc == 0 {
        return;
    }
    match errno() {
        libc::ENOENT if !exists(path) => {}
        libc::ENOENT => fail(fds, Step::Mask, libc::ENOENT), // no /dev/null in the container
        libc::ENOTDIR => {
            let rc = mount(
                c"tmpfs".as_ptr(),
                path.as_ptr(),
                c"tmpfs".as_ptr(),
                libc::MS_RDONLY,
                std::ptr::null(),
            );
            check(fds, Step::Mask, rc);
        }
        e => fail(fds, Step::Mask, e),
    }
}

/// Whether `path` exists (following links).
fn exists(path: &std::ffi::CStr) -> bool {
    // SAFETY: an all-zero stat is a valid buffer for fstatat to fill.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: fstatat with a C string from the plan and a local buffer.
    unsafe { libc::fstatat(libc::AT_FDCWD, path.as_ptr(), &mut st, 0) == 0 }
}

/// `struct mount_attr` of mount_setattr(2).
#[repr(C)]
struct MountAttr {
    attr_set: u64,
    attr_clr: u64,
    propagation: u64,
    userns_fd: u64,
}

/// A read-only path, as runc: bound onto itself, then made read-only recursively
/// (mount_setattr, kernel ≥ 5.12; a plain remount before that); a missing path is skipped.
fn readonly_path(path: &std::ffi::CStr, fds: &ChildFds) {
    let rc = mount(
        path.as_ptr(),
        path.as_ptr(),
        std::ptr::null(),
        libc::MS_BIND | libc::MS_REC,
        std::ptr::null(),
    );
    if rc < 0 {
        match errno() {
            libc::ENOENT => return,
            e => fail(fds, Step::Readonly, e),
        }
    }
    const MOUNT_ATTR_RDONLY: u64 = 1;
    let attr = MountAttr {
        attr_set: MOUNT_ATTR_RDONLY,
        attr_clr: 0,
        propagation: 0,
        userns_fd: 0,
    };
    // SAFETY: mount_setattr with a C string from the plan and a local attr of the size passed.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            libc::AT_FDCWD,
            path.as_ptr(),
            // Following links, as the bind above did.
            libc::AT_RECURSIVE,
            &attr as *const MountAttr,
            std::mem::size_of::<MountAttr>(),
        )
    };
    if rc == 0 {
        return;
    }
    if errno() != libc::ENOSYS {
        fail(fds, Step::Readonly, errno());
    }
    let rc = mount(
        std::ptr::null(),
        path.as_ptr(),
        std::ptr::null(),
        libc::MS_REMOUNT | libc::MS_BIND | libc::MS_RDONLY,
        std::ptr::null(),
    );
    check(fds, Step::Readonly, rc);
}

fn remount_root_readonly(fds: &ChildFds) {
    let rc = mount(
        std::ptr::null(),
        c"/".as_ptr(),
        std::ptr::null(),
        libc::MS_REMOUNT | libc::MS_BIND | libc::MS_RDONLY,
        std::ptr::null(),
    );
    check(fds, Step::Remount, rc);
}

fn set_hostname(plan: &Plan, fds: &ChildFds) {
    if let Some(h) = &plan.hostname {
        // SAFETY: sethostname with a C string from the plan and its length.
        let rc = unsafe { libc::sethostname(h.as_ptr(), h.as_bytes().len()) };
        check(fds, Step::Hostname, rc);
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
fn set_stdio(stdio: &ChildStdio, fds: &ChildFds) {
    // SAFETY: setsid has no arguments.
    check(fds, Step::Stdio, unsafe { libc::setsid() });
    if stdio.controlling_tty {
        // SAFETY: TIOCSCTTY on the pty slave fd the agent passed.
        let rc = unsafe { libc::ioctl(stdio.fds[0], libc::TIOCSCTTY, 0) };
        check(fds, Step::Stdio, rc);
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

/// Bounding set, groups, uid/gid, capability sets, ambient capabilities.
fn drop_privileges(plan: &Plan, fds: &ChildFds) {
    if let Some(c) = &plan.caps {
        drop_bounding(c.bounding, fds);
    }
    set_ids(plan, fds);
    if let Some(c) = &plan.caps {
        set_caps(c, fds);
    }
}

fn drop_bounding(bounding: u64, fds: &ChildFds) {
    for cap in 0..64u64 {
        if bounding & (1 << cap) != 0 {
            continue;
        }
        // SAFETY: prctl with integer arguments; EINVAL marks caps the kernel lacks.
        let rc = unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) };
        if rc < 0 && errno() != libc::EINVAL {
            fail(fds, Step::Bounding, errno());
        }
    }
}

/// Raw system calls: glibc's wrappers broadcast the change to every thread it knows of, and the
/// agent's other threads do not exist in this child (it would wait forever).
fn set_ids(plan: &Plan, fds: &ChildFds) {
    // SAFETY: prctl with integer arguments.
    let rc = unsafe { libc::prctl(libc::PR_SET_KEEPCAPS, 1, 0, 0, 0) };
    check(fds, Step::Ids, rc);
    let (uid, gid) = (u64::from(plan.uid), u64::from(plan.gid));
    // SAFETY: setgroups with the plan's array and its length.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_setgroups,
            plan.groups.len() as u64,
            plan.groups.as_ptr(),
        )
    };
    check(fds, Step::Ids, rc);
    // SAFETY: setresgid/setresuid with integer arguments.
    check(fds, Step::Ids, unsafe {
        libc::syscall(libc::SYS_setresgid, gid, gid, gid)
    });
    // SAFETY: as above.
    check(fds, Step::Ids, unsafe {
        libc::syscall(libc::SYS_setresuid, uid, uid, uid)
    });
}

fn set_caps(c: &Caps, fds: &ChildFds) {
    #[repr(C)]
    struct Header {
        version: u32,
        pid: i32,
    }
    #[repr(C)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    let h = Header {
        version: 0x2008_0522,
        pid: 0,
    };
    let half = |v: u64, hi: bool| if hi { (v >> 32) as u32 } else { v as u32 };
    let d = [false, true].map(|hi| Data {
        effective: half(c.effective, hi),
        permitted: half(c.permitted, hi),
        inheritable: half(c.inheritable, hi),
    });
    // SAFETY: capset (version 3) with a local header and the two data structs it reads.
    let rc = unsafe { libc::syscall(libc::SYS_capset, &h, d.as_ptr()) };
    check(fds, Step::Capset, rc);
    for cap in &c.ambient {
        // SAFETY: prctl with integer arguments; a cap missing from the inheritable or permitted
        // set cannot be raised, and the spec's ambient set is best effort (as runc's).
        unsafe {
            libc::prctl(
                libc::PR_CAP_AMBIENT,
                libc::PR_CAP_AMBIENT_RAISE as libc::c_ulong,
                *cap as libc::c_ulong,
                0,
                0,
            )
        };
    }
}

/// `struct sock_fprog` with seccompiler's instruction type.
#[repr(C)]
struct SockFprog {
    len: libc::c_ushort,
    filter: *const seccompiler::sock_filter,
}

/// Installs the profile's filters (see [`super::seccomp`]).
fn install_seccomp(plan: &Plan, fds: &ChildFds) {
    let Some(f) = &plan.seccomp else {
        return;
    };
    for p in &f.programs {
        let prog = SockFprog {
            len: p.len() as libc::c_ushort,
            filter: p.as_ptr(),
        };
        // SAFETY: seccomp(SET_MODE_FILTER) with a local sock_fprog pointing at the plan's
        // program of `len` instructions (seccompiler keeps them under BPF_MAXINSNS).
        let rc = unsafe {
            libc::syscall(
                libc::SYS_seccomp,
                libc::SECCOMP_SET_MODE_FILTER,
                f.flags,
                &prog as *const SockFprog,
            )
        };
        check(fds, Step::Seccomp, rc);
    }
}

/// execve each candidate path in turn; reports the most telling errno if none runs.
fn exec(plan: &Plan, fds: &ChildFds) -> ! {
    let mut argv: [*const libc::c_char; MAX_ARGS + 1] = [std::ptr::null(); MAX_ARGS + 1];
    for (i, a) in plan.argv.iter().take(MAX_ARGS).enumerate() {
        argv[i] = a.as_ptr();
    }
    let mut envp: [*const libc::c_char; MAX_ENV + 1] = [std::ptr::null(); MAX_ENV + 1];
    for (i, e) in plan.envp.iter().take(MAX_ENV).enumerate() {
        envp[i] = e.as_ptr();
    }
    let mut last = libc::ENOENT;
    for cand in &plan.exec_candidates {
        // SAFETY: execve with a C string and NULL-terminated pointer arrays into the plan.
        unsafe { libc::execve(cand.as_ptr(), argv.as_ptr(), envp.as_ptr()) };
        let e = errno();
        if e != libc::ENOENT && e != libc::ENOTDIR {
            last = e;
        }
    }
    report(fds.ready, Step::Exec as i32, last);
    // SAFETY: ends the child without running destructors; 127 is the shell's "not found".
    unsafe { libc::_exit(127) }
}
