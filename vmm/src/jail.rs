//! `runv-vmm --jail`: the launcher step that confines the VMM before it opens anything.
//!
//! [`enter`] forks once. The parent (the *keeper*, still root, outside every namespace but the
//! pid one it made for its child) puts the child in its cgroup, forwards SIGTERM/SIGINT to it,
//! waits for it, removes the jail's cgroup and root directory ([`vmm_api::jail::cleanup`]) and
//! exits as the child did (re-raising the signal that killed it, so a SIGSYS from seccomp still
//! shows). The child returns from [`enter`] as pid 1 of new pid, mount, ipc and uts namespaces
//! (and a new network namespace unless asked to keep or join one), pivoted into a fresh tmpfs
//! on the jail root that holds only `/dev/{kvm,net/tun,userfaultfd}` and the bind mounts asked
//! for (same path inside as on the host), with the root read-only, an unprivileged uid/gid, no
//! capabilities (bounding set emptied) and `no_new_privs`. The VMM proper then runs unchanged.
//!
//! The jail's mounts live in its own mount namespace and vanish with its last process, so a
//! `kill -9` of either process leaves only the cgroup and the empty root directory, which the
//! keeper (or, if the keeper itself was killed, the spawner) removes.

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sched::CloneFlags;
use nix::sys::signal::{SigSet, Signal};
use nix::sys::stat::{Mode, SFlag};
use nix::unistd::{ForkResult, Gid, Uid};
use vmm_api::jail::{Cgroup, JailSpec};

/// Which network namespace the jailed VMM runs in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Netns {
    /// A new, empty one (no TAP can be reached).
    New,
    /// The spawner's (where its TAP lives).
    Keep,
    /// The one bound at this path (e.g. `/var/run/netns/NAME`).
    Join(PathBuf),
}

impl std::str::FromStr for Netns {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "new" => Ok(Self::New),
            "keep" => Ok(Self::Keep),
            p if p.starts_with('/') => Ok(Self::Join(p.into())),
            _ => Err(format!(
                "{s:?}: use new, keep or the absolute path of a network namespace"
            )),
        }
    }
}

/// Error setting up the jail (in the launcher, before the VMM runs).
#[derive(Debug, thiserror::Error)]
pub enum JailSetupError {
    /// The request is unusable.
    #[error("--jail: {0}")]
    Invalid(String),
    /// A step failed.
    #[error("jail setup: {what}: {source}")]
    Sys {
        /// The step.
        what: String,
        /// Cause.
        source: nix::Error,
    },
    /// The cgroup or directory could not be made.
    #[error("jail setup: {0}")]
    Host(#[from] vmm_api::jail::JailError),
}

fn sys(what: impl Into<String>) -> impl FnOnce(nix::Error) -> JailSetupError {
    let what = what.into();
    move |source| JailSetupError::Sys { what, source }
}

/// The device nodes a jail gets (made afresh, owned by the jail's uid, mode 0600).
const DEVICES: [&str; 3] = ["/dev/kvm", "/dev/net/tun", "/dev/userfaultfd"];

/// Enters the jail: returns only in the jailed child; the keeper parent exits the process when
/// the child ends.
pub fn enter(spec: &JailSpec, netns: &Netns) -> Result<(), JailSetupError> {
    check(spec)?;
    std::fs::create_dir_all(&spec.root)
        .map_err(|e| JailSetupError::Invalid(format!("creating {}: {e}", spec.root.display())))?;
    let cg = Cgroup::of(&spec.id);
    // A stale cgroup of the same id (a keeper that was killed) would refuse mkdir.
    let _ = cg.remove(std::time::Duration::ZERO);
    cg.create(spec.mem_mib, spec.pids_max)?;
    let (go_read, go_write) = nix::unistd::pipe().map_err(sys("creating a pipe"))?;
    let mut forwarded = SigSet::empty();
    for s in [Signal::SIGTERM, Signal::SIGINT, Signal::SIGCHLD] {
        forwarded.add(s);
    }
    // Blocked before the fork: a SIGTERM for the child that arrives before it reads its
    // signalfd waits instead of being dropped (pid 1 ignores unhandled signals).
    forwarded.thread_block().map_err(sys("blocking signals"))?;
    nix::sched::unshare(CloneFlags::CLONE_NEWPID).map_err(sys("unshare(CLONE_NEWPID)"))?;
    // SAFETY: the process is single-threaded here (before the VMM starts any thread), so the
    // child may run arbitrary code after fork.
    match unsafe { nix::unistd::fork() }.map_err(sys("fork"))? {
        ForkResult::Parent { child } => {
            drop(go_read);
            let pid = child.as_raw() as u32;
            if let Err(e) = cg.add(pid) {
                let _ = nix::sys::signal::kill(child, Signal::SIGKILL);
                let _ = nix::sys::wait::waitpid(child, None);
                let _ = vmm_api::jail::cleanup(&spec.root, &spec.id);
                return Err(e.into());
            }
            keep(child, go_write, &forwarded, spec)
        }
        ForkResult::Child => {
            drop(go_write);
            let mut unblock = SigSet::empty();
            unblock.add(Signal::SIGCHLD);
            unblock
                .thread_unblock()
                .map_err(sys("unblocking SIGCHLD"))?;
            // The keeper writes once we are in the cgroup; EOF means it died: stop.
            let mut b = [0u8; 1];
            if nix::unistd::read(go_read.as_raw_fd(), &mut b) != Ok(1) {
                std::process::exit(1);
            }
            confine(spec, netns)?;
            // Set only now: a change of uid clears the parent-death signal. The keeper holds
            // the pipe's write end until it exits: a hang-up means it is already gone.
            // SAFETY: prctl(PR_SET_PDEATHSIG) takes an integer signal; no memory is passed.
            if unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) } != 0 {
                return Err(sys("PR_SET_PDEATHSIG")(nix::Error::last()));
            }
            let mut fds = [nix::poll::PollFd::new(
                std::os::fd::AsFd::as_fd(&go_read),
                nix::poll::PollFlags::POLLIN,
            )];
            let _ = nix::poll::poll(&mut fds, nix::poll::PollTimeout::ZERO);
            if fds[0]
                .revents()
                .is_some_and(|r| r.contains(nix::poll::PollFlags::POLLHUP))
            {
                std::process::exit(1);
            }
            Ok(())
        }
    }
}

fn check(spec: &JailSpec) -> Result<(), JailSetupError> {
    if spec.uid == 0 || spec.gid == 0 {
        return Err(JailSetupError::Invalid(
            "the jail runs the VMM unprivileged: give a non-zero --jail-uid and --jail-gid".into(),
        ));
    }
    if !spec.root.is_absolute() {
        return Err(JailSetupError::Invalid(format!(
            "{}: give an absolute jail directory",
            spec.root.display()
        )));
    }
    if spec.id.is_empty() || spec.id.contains('/') || spec.id.starts_with('.') {
        return Err(JailSetupError::Invalid(format!(
            "jail id {:?}: a plain name (no '/', not starting with '.')",
            spec.id
        )));
    }
    for p in spec.read_only.iter().chain(&spec.read_write) {
        if !p.is_absolute() || !p.exists() {
            return Err(JailSetupError::Invalid(format!(
                "{}: a path bound into the jail must be absolute and exist",
                p.display()
            )));
        }
    }
    if !nix::unistd::geteuid().is_root() {
        return Err(JailSetupError::Invalid(
            "setting up a jail needs root (namespaces, mounts, cgroups)".into(),
        ));
    }
    Ok(())
}

/// The keeper: releases the child, forwards termination signals, waits, cleans up, exits.
fn keep(child: nix::unistd::Pid, go: std::os::fd::OwnedFd, signals: &SigSet, spec: &JailSpec) -> ! {
    use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
    // The keeper holds no fd of the VMM's: an inherited control socket or pipe must close
    // when the VMM ends. stdin/stdout go to /dev/null, stderr stays for the keeper's log.
    if let Ok(null) = std::fs::File::open("/dev/null") {
        let _ = nix::unistd::dup2(null.as_raw_fd(), 0);
        let _ = nix::unistd::dup2(null.as_raw_fd(), 1);
    }
    // SAFETY: close_range on fds above stderr except `go`, which the keeper keeps; nothing in
    // this thread uses the others afterwards.
    unsafe {
        let g = go.as_raw_fd() as libc::c_uint;
        libc::syscall(libc::SYS_close_range, 3u32, g - 1, 0u32);
        libc::syscall(libc::SYS_close_range, g + 1, u32::MAX, 0u32);
    }
    let _ = nix::unistd::write(&go, &[1]);
    // `go` stays open until the keeper exits (the child checks it for a hang-up).
    let status = loop {
        match signals.wait() {
            Ok(Signal::SIGCHLD) | Err(_) => {}
            Ok(s) => {
                let _ = nix::sys::signal::kill(child, s);
            }
        }
        match waitpid(child, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) => continue,
            Ok(s) => break s,
            Err(nix::Error::ECHILD) => break WaitStatus::Exited(child, 1),
            Err(_) => continue,
        }
    };
    if let Err(e) = vmm_api::jail::cleanup(&spec.root, &spec.id) {
        eprintln!("runv-vmm jail keeper: {e}; remove it by hand");
    }
    match status {
        WaitStatus::Signaled(_, sig, _) => {
            // Die the same way: the spawner sees the signal (SIGSYS = seccomp).
            // SAFETY: restoring the default action of a signal; no handler memory involved.
            unsafe { libc::signal(sig as i32, libc::SIG_DFL) };
            let mut set = SigSet::empty();
            set.add(sig);
            let _ = set.thread_unblock();
            let _ = nix::sys::signal::raise(sig);
            std::process::exit(128 + sig as i32)
        }
        WaitStatus::Exited(_, code) => std::process::exit(code),
        _ => std::process::exit(1),
    }
}

/// In the child: namespaces, the jail's file system, then dropping every privilege.
fn confine(spec: &JailSpec, netns: &Netns) -> Result<(), JailSetupError> {
    let mut flags = CloneFlags::CLONE_NEWNS | CloneFlags::CLONE_NEWIPC | CloneFlags::CLONE_NEWUTS;
    match netns {
        Netns::New => flags |= CloneFlags::CLONE_NEWNET,
        Netns::Keep => {}
        Netns::Join(p) => {
            let f = std::fs::File::open(p).map_err(|e| {
                JailSetupError::Invalid(format!("opening network namespace {}: {e}", p.display()))
            })?;
            nix::sched::setns(f, CloneFlags::CLONE_NEWNET)
                .map_err(sys(format!("joining network namespace {}", p.display())))?;
        }
    }
    nix::sched::unshare(flags).map_err(sys("unshare(mount, ipc, uts, net)"))?;
    nix::unistd::sethostname("runv-jail").map_err(sys("sethostname"))?;
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .map_err(sys("making / private"))?;
    build_root(spec)?;
    // The jail has no /proc: a Populate-mode clone reads its working set from this.
    crate::uffd::keep_pagemap()
        .map_err(|e| JailSetupError::Invalid(format!("opening /proc/self/pagemap: {e}")))?;
    pivot(&spec.root)?;
    drop_privileges(spec)
}

/// A fresh small tmpfs on the root with the device nodes and the bind mounts.
fn build_root(spec: &JailSpec) -> Result<(), JailSetupError> {
    let root = &spec.root;
    mount(
        Some("tmpfs"),
        root,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some("size=1m,nr_inodes=4096,mode=755"),
    )
    .map_err(sys(format!("mounting a tmpfs on {}", root.display())))?;
    let (uid, gid) = (Uid::from_raw(spec.uid), Gid::from_raw(spec.gid));
    for dev in DEVICES {
        let Ok(meta) = std::fs::metadata(dev) else {
            // Not on this host (e.g. no /dev/userfaultfd before Linux 6.1).
            continue;
        };
        let node = inside(root, Path::new(dev));
        mkdirs(root, node.parent().unwrap_or(root))?;
        nix::sys::stat::mknod(
            &node,
            SFlag::S_IFCHR,
            Mode::S_IRUSR | Mode::S_IWUSR,
            std::os::unix::fs::MetadataExt::rdev(&meta),
        )
        .map_err(sys(format!("mknod {}", node.display())))?;
        nix::unistd::chown(&node, Some(uid), Some(gid))
            .map_err(sys(format!("chown {}", node.display())))?;
    }
    let binds = spec
        .read_only
        .iter()
        .map(|p| (p, true))
        .chain(spec.read_write.iter().map(|p| (p, false)));
    for (src, ro) in binds {
        let dst = inside(root, src);
        mkdirs(root, dst.parent().unwrap_or(root))?;
        if src.is_dir() {
            std::fs::create_dir_all(&dst)
        } else {
            // Never truncate: under a directory bound earlier, `dst` is the real file.
            std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(false)
                .open(&dst)
                .map(drop)
        }
        .map_err(|e| JailSetupError::Invalid(format!("mount point {}: {e}", dst.display())))?;
        mount(
            Some(src.as_path()),
            &dst,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .map_err(sys(format!("binding {}", src.display())))?;
        let mut f = MsFlags::MS_BIND
            | MsFlags::MS_REMOUNT
            | MsFlags::MS_NOSUID
            | MsFlags::MS_NODEV
            | MsFlags::MS_NOEXEC;
        if ro {
            f |= MsFlags::MS_RDONLY;
        }
        mount(None::<&str>, &dst, None::<&str>, f, None::<&str>)
            .map_err(sys(format!("remounting {} restricted", dst.display())))?;
    }
    Ok(())
}

/// `path` (absolute, on the host) under the jail root.
fn inside(root: &Path, path: &Path) -> PathBuf {
    root.join(path.strip_prefix("/").unwrap_or(path))
}

fn mkdirs(root: &Path, dir: &Path) -> Result<(), JailSetupError> {
    std::fs::create_dir_all(dir).map_err(|e| {
        JailSetupError::Invalid(format!(
            "making {} in the jail {}: {e}",
            dir.display(),
            root.display()
        ))
    })
}

/// pivot_root into the jail root, detach the old root, make the new one read-only.
fn pivot(root: &Path) -> Result<(), JailSetupError> {
    nix::unistd::chdir(root).map_err(sys(format!("chdir {}", root.display())))?;
    // pivot_root(".", "."): the old root ends up stacked under the new one, then detached.
    nix::unistd::pivot_root(".", ".").map_err(sys("pivot_root"))?;
    umount2(".", MntFlags::MNT_DETACH).map_err(sys("detaching the old root"))?;
    nix::unistd::chdir("/").map_err(sys("chdir /"))?;
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        None::<&str>,
    )
    .map_err(sys("remounting the jail root read-only"))
}

fn drop_privileges(spec: &JailSpec) -> Result<(), JailSetupError> {
    // Empty the bounding set while CAP_SETPCAP is still held; EINVAL past the kernel's last cap.
    for cap in 0..64 {
        // SAFETY: prctl(PR_CAPBSET_DROP) takes integers; no memory is passed.
        if unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) } != 0
            && nix::Error::last() != nix::Error::EINVAL
        {
            return Err(sys(format!(
                "dropping capability {cap} from the bounding set"
            ))(nix::Error::last()));
        }
    }
    // SAFETY: prctl with integer arguments only.
    unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL,
            0,
            0,
            0,
        )
    };
    let (uid, gid) = (Uid::from_raw(spec.uid), Gid::from_raw(spec.gid));
    nix::unistd::setgroups(&[]).map_err(sys("setgroups([])"))?;
    nix::unistd::setresgid(gid, gid, gid).map_err(sys(format!("setresgid {gid}")))?;
    // From uid 0 to a non-zero uid (real, effective and saved): the kernel clears the
    // permitted and effective capability sets.
    nix::unistd::setresuid(uid, uid, uid).map_err(sys(format!("setresuid {uid}")))?;
    // SAFETY: prctl with integer arguments only.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(sys("PR_SET_NO_NEW_PRIVS")(nix::Error::last()));
    }
    // Other VMMs of the same pool uid must not ptrace this one.
    // SAFETY: prctl with integer arguments only.
    unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) };
    Ok(())
}
