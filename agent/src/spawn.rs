//! Starting a container's process: everything is prepared in the agent (paths, strings, ids),
//! then `clone(2)` creates the child in new namespaces, and the child only makes system calls —
//! it never allocates and uses raw system calls where glibc would synchronise with other threads,
//! because the agent is multi-threaded and a cloned child inherits its locks but not its threads.
//!
//! Child steps: mounts (rootfs bind or overlay, the spec's mounts, device nodes), `pivot_root`,
//! hostname, rlimits, stdio, working directory; it then reports success (or the failing step and
//! errno) on the `ready` pipe and blocks on the `start` pipe. On start it drops privileges
//! (bounding set, groups, uid/gid, capabilities, no_new_privs) and `execve`s; an exec failure
//! goes back on the `ready` pipe, which `O_CLOEXEC` closes on success.

use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};

use oci_spec::runtime::{LinuxNamespaceType, Spec};
use protocol::RootfsSource;

/// Error preparing or starting a process.
#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    /// The spec or request is unusable.
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
    /// A step in the child failed.
    #[error("container setup failed at {step}: {source}")]
    Child {
        /// The step.
        step: &'static str,
        /// errno.
        source: std::io::Error,
    },
}

fn cstr(s: impl AsRef<[u8]>) -> Result<CString, SpawnError> {
    CString::new(s.as_ref().to_vec())
        .map_err(|_| SpawnError::Invalid("a path or string contains a NUL byte".into()))
}

fn cpath(p: &Path) -> Result<CString, SpawnError> {
    cstr(p.as_os_str().as_encoded_bytes())
}

/// Child steps, reported with errno when they fail.
const STEPS: &[&str] = &[
    "make / private",
    "mount the root file system",
    "create a mount point",
    "mount",
    "remount read-only",
    "pivot_root",
    "sethostname",
    "setrlimit",
    "stdio",
    "chdir",
    "wait for start",
    "drop the capability bounding set",
    "setgroups/setgid/setuid",
    "capset",
    "no_new_privs",
    "execve",
    "setns",
    "fork",
];

/// One mount the child performs.
struct MountOp {
    source: Option<CString>,
    target: CString,
    fstype: Option<CString>,
    flags: libc::c_ulong,
    data: Option<CString>,
    /// Directories (or, for a file bind, the file) to create first, outermost first.
    mkdirs: Vec<CString>,
    touch: Option<CString>,
    remount_ro: bool,
}

/// Everything the child needs, as C data.
pub struct Plan {
    clone_flags: libc::c_int,
    mounts: Vec<MountOp>,
    root: Option<CString>,
    root_readonly: bool,
    hostname: Option<CString>,
    rlimits: Vec<(libc::c_int, libc::rlimit)>,
    cwd: CString,
    exec_candidates: Vec<CString>,
    argv: Vec<CString>,
    envp: Vec<CString>,
    uid: libc::uid_t,
    gid: libc::gid_t,
    groups: Vec<libc::gid_t>,
    bounding: Option<u64>,
    caps: Option<[u64; 3]>,
    ambient: Vec<u64>,
    no_new_privs: bool,
    /// Namespaces to join (exec into a running container).
    join: Vec<OwnedFd>,
    /// Fork once more after joining (the pid namespace applies to children).
    fork_after_join: bool,
}

/// Stdio of a child: the fds it gets as 0, 1, 2; with a terminal, the pty slave.
pub struct ChildStdio {
    /// stdin, stdout, stderr.
    pub fds: [RawFd; 3],
    /// Make the pty its controlling terminal.
    pub controlling_tty: bool,
}

fn cap_number(name: &str) -> Option<u64> {
    const CAPS: &[&str] = &[
        "CHOWN",
        "DAC_OVERRIDE",
        "DAC_READ_SEARCH",
        "FOWNER",
        "FSETID",
        "KILL",
        "SETGID",
        "SETUID",
        "SETPCAP",
        "LINUX_IMMUTABLE",
        "NET_BIND_SERVICE",
        "NET_BROADCAST",
        "NET_ADMIN",
        "NET_RAW",
        "IPC_LOCK",
        "IPC_OWNER",
        "SYS_MODULE",
        "SYS_RAWIO",
        "SYS_CHROOT",
        "SYS_PTRACE",
        "SYS_PACCT",
        "SYS_ADMIN",
        "SYS_BOOT",
        "SYS_NICE",
        "SYS_RESOURCE",
        "SYS_TIME",
        "SYS_TTY_CONFIG",
        "MKNOD",
        "LEASE",
        "AUDIT_WRITE",
        "AUDIT_CONTROL",
        "SETFCAP",
        "MAC_OVERRIDE",
        "MAC_ADMIN",
        "SYSLOG",
        "WAKE_ALARM",
        "BLOCK_SUSPEND",
        "AUDIT_READ",
        "PERFMON",
        "BPF",
        "CHECKPOINT_RESTORE",
    ];
    let n = name.strip_prefix("CAP_")?;
    CAPS.iter().position(|c| *c == n).map(|i| i as u64)
}

fn cap_mask(set: &Option<oci_spec::runtime::Capabilities>) -> Result<u64, SpawnError> {
    let mut mask = 0u64;
    for c in set.iter().flatten() {
        let name = serde_json::to_value(c)
            .ok()
            .and_then(|v| v.as_str().map(String::from))
            .unwrap_or_default();
        match cap_number(&name) {
            Some(n) => mask |= 1 << n,
            None => tracing::warn!("capability {name} unknown to this agent; ignored"),
        }
    }
    Ok(mask)
}

fn rlimit_resource(name: &str) -> Option<libc::c_int> {
    Some(match name {
        "RLIMIT_CPU" => libc::RLIMIT_CPU,
        "RLIMIT_FSIZE" => libc::RLIMIT_FSIZE,
        "RLIMIT_DATA" => libc::RLIMIT_DATA,
        "RLIMIT_STACK" => libc::RLIMIT_STACK,
        "RLIMIT_CORE" => libc::RLIMIT_CORE,
        "RLIMIT_RSS" => libc::RLIMIT_RSS,
        "RLIMIT_NPROC" => libc::RLIMIT_NPROC,
        "RLIMIT_NOFILE" => libc::RLIMIT_NOFILE,
        "RLIMIT_MEMLOCK" => libc::RLIMIT_MEMLOCK,
        "RLIMIT_AS" => libc::RLIMIT_AS,
        "RLIMIT_LOCKS" => libc::RLIMIT_LOCKS,
        "RLIMIT_SIGPENDING" => libc::RLIMIT_SIGPENDING,
        "RLIMIT_MSGQUEUE" => libc::RLIMIT_MSGQUEUE,
        "RLIMIT_NICE" => libc::RLIMIT_NICE,
        "RLIMIT_RTPRIO" => libc::RLIMIT_RTPRIO,
        "RLIMIT_RTTIME" => libc::RLIMIT_RTTIME,
        _ => return None,
    } as libc::c_int)
}

fn mount_flags(options: &[String]) -> (libc::c_ulong, Vec<String>, bool, bool) {
    let mut flags = 0;
    let mut data = Vec::new();
    let (mut bind, mut ro) = (false, false);
    for o in options {
        match o.as_str() {
            "ro" => ro = true,
            "rw" => {}
            "nosuid" => flags |= libc::MS_NOSUID,
            "nodev" => flags |= libc::MS_NODEV,
            "noexec" => flags |= libc::MS_NOEXEC,
            "relatime" => flags |= libc::MS_RELATIME,
            "strictatime" => flags |= libc::MS_STRICTATIME,
            "noatime" => flags |= libc::MS_NOATIME,
            "bind" => bind = true,
            "rbind" => {
                bind = true;
                flags |= libc::MS_REC;
            }
            "private" | "rprivate" | "slave" | "rslave" | "shared" | "rshared" => {}
            other => data.push(other.to_string()),
        }
    }
    if bind {
        flags |= libc::MS_BIND;
    } else if ro {
        flags |= libc::MS_RDONLY;
    }
    (flags, data, bind, ro)
}

/// `root`/`dest` and the directories to create for it.
fn under_root(root: &Path, dest: &Path) -> Result<(PathBuf, Vec<CString>), SpawnError> {
    let mut path = root.to_path_buf();
    let mut dirs = Vec::new();
    for c in dest.components() {
        match c {
            std::path::Component::Normal(n) => {
                path.push(n);
                dirs.push(cpath(&path)?);
            }
            std::path::Component::ParentDir => {
                return Err(SpawnError::Invalid(format!(
                    "mount destination {} escapes the root with ..",
                    dest.display()
                )))
            }
            _ => {}
        }
    }
    Ok((path, dirs))
}

/// Device nodes bind-mounted from the agent's /dev when the spec mounts a tmpfs on /dev.
const DEVICES: &[&str] = &["null", "zero", "full", "random", "urandom", "tty"];

impl Plan {
    /// Prepares the container process of `spec` with root file system `root` (already resolved:
    /// the bind directory or where the overlay will be mounted). `overlay` is `(scratch, lower)`
    /// when the root is an overlay on a tmpfs at `scratch`.
    pub fn for_container(
        spec: &Spec,
        source: &RootfsSource,
        scratch: &Path,
    ) -> Result<(Self, PathBuf), SpawnError> {
        let process = spec
            .process()
            .as_ref()
            .ok_or_else(|| SpawnError::Invalid("the spec has no process".into()))?;
        let mut flags =
            libc::CLONE_NEWNS | libc::CLONE_NEWPID | libc::CLONE_NEWUTS | libc::CLONE_NEWIPC;
        if let Some(ns) = spec.linux().as_ref().and_then(|l| l.namespaces().as_ref()) {
            if ns
                .iter()
                .any(|n| n.typ() == LinuxNamespaceType::Network && n.path().is_none())
            {
                flags |= libc::CLONE_NEWNET;
            }
        }
        let readonly = spec
            .root()
            .as_ref()
            .and_then(|r| r.readonly())
            .unwrap_or(false);
        let mut mounts = Vec::new();
        let root = match source {
            RootfsSource::Bind { path } => {
                let p = PathBuf::from(path);
                mounts.push(MountOp {
                    source: Some(cpath(&p)?),
                    target: cpath(&p)?,
                    fstype: None,
                    flags: libc::MS_BIND | libc::MS_REC,
                    data: None,
                    mkdirs: Vec::new(),
                    touch: None,
                    remount_ro: false,
                });
                p
            }
            RootfsSource::Overlay { lower } => {
                mounts.push(MountOp {
                    source: Some(cstr("tmpfs")?),
                    target: cpath(scratch)?,
                    fstype: Some(cstr("tmpfs")?),
                    flags: 0,
                    data: Some(cstr("mode=0755")?),
                    mkdirs: Vec::new(),
                    touch: None,
                    remount_ro: false,
                });
                let merged = scratch.join("merged");
                let (upper, work) = (scratch.join("upper"), scratch.join("work"));
                mounts.push(MountOp {
                    source: Some(cstr("overlay")?),
                    target: cpath(&merged)?,
                    fstype: Some(cstr("overlay")?),
                    flags: 0,
                    data: Some(cstr(format!(
                        "lowerdir={lower},upperdir={},workdir={}",
                        upper.display(),
                        work.display()
                    ))?),
                    mkdirs: vec![cpath(&upper)?, cpath(&work)?, cpath(&merged)?],
                    touch: None,
                    remount_ro: false,
                });
                merged
            }
        };
        let mut dev_tmpfs = false;
        for m in spec.mounts().iter().flatten() {
            let dest = m.destination();
            let (target, mkdirs) = under_root(&root, dest)?;
            let typ = m.typ().clone().unwrap_or_default();
            let options = m.options().clone().unwrap_or_default();
            let (flags, data, bind, ro) = mount_flags(&options);
            if typ == "cgroup" || typ == "cgroup2" || typ == "mqueue" {
                // Containers see no cgroupfs; mqueue needs an IPC namespace mount we skip.
                continue;
            }
            if dest == Path::new("/dev") && typ == "tmpfs" {
                dev_tmpfs = true;
            }
            let src = m.source().as_ref().map(|s| s.as_path());
            let file_bind = bind && src.is_some_and(|s| s.is_file());
            let (mkdirs, touch) = if file_bind {
                let n = mkdirs.len();
                (
                    mkdirs[..n.saturating_sub(1)].to_vec(),
                    Some(cpath(&target)?),
                )
            } else {
                (mkdirs, None)
            };
            mounts.push(MountOp {
                source: Some(match src {
                    Some(s) => cpath(s)?,
                    None => cstr(&typ)?,
                }),
                target: cpath(&target)?,
                fstype: (!bind).then(|| cstr(&typ)).transpose()?,
                flags,
                data: (!data.is_empty())
                    .then(|| cstr(data.join(",")))
                    .transpose()?,
                mkdirs,
                touch,
                remount_ro: bind && ro,
            });
        }
        if dev_tmpfs {
            for d in DEVICES {
                let (target, mkdirs) = under_root(&root, &Path::new("/dev").join(d))?;
                let n = mkdirs.len();
                mounts.push(MountOp {
                    source: Some(cstr(format!("/dev/{d}"))?),
                    target: cpath(&target)?,
                    fstype: None,
                    flags: libc::MS_BIND,
                    data: None,
                    mkdirs: mkdirs[..n - 1].to_vec(),
                    touch: Some(cpath(&target)?),
                    remount_ro: false,
                });
            }
        }
        let mut plan = Self::for_process(process)?;
        plan.clone_flags = flags;
        plan.mounts = mounts;
        plan.root = Some(cpath(&root)?);
        plan.root_readonly = readonly;
        plan.hostname = spec.hostname().as_ref().map(cstr).transpose()?;
        Ok((plan, root))
    }

    /// Prepares `process` to run in namespaces of `init_pid` (exec into a running container).
    pub fn for_exec(
        process: &oci_spec::runtime::Process,
        init_pid: i32,
    ) -> Result<Self, SpawnError> {
        let mut plan = Self::for_process(process)?;
        // Order matters: user-visible namespaces first, mount last (it changes /proc).
        for ns in ["ipc", "uts", "net", "pid", "mnt"] {
            let path = format!("/proc/{init_pid}/ns/{ns}");
            let fd = std::fs::File::open(&path).map_err(|source| SpawnError::Sys {
                what: "opening the container's namespaces",
                source,
            })?;
            plan.join.push(OwnedFd::from(fd));
        }
        plan.fork_after_join = true;
        Ok(plan)
    }

    fn for_process(p: &oci_spec::runtime::Process) -> Result<Self, SpawnError> {
        let args = p.args().clone().unwrap_or_default();
        let Some(arg0) = args.first() else {
            return Err(SpawnError::Invalid("process.args is empty".into()));
        };
        let env = p.env().clone().unwrap_or_default();
        if args.len() > 255 || env.len() > 511 {
            return Err(SpawnError::Invalid(format!(
                "{} args and {} env entries: at most 255 and 511",
                args.len(),
                env.len()
            )));
        }
        let exec_candidates = if arg0.contains('/') {
            vec![cstr(arg0)?]
        } else {
            let path = env
                .iter()
                .find_map(|e| e.strip_prefix("PATH="))
                .unwrap_or("/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin");
            path.split(':')
                .filter(|d| !d.is_empty())
                .map(|d| cstr(format!("{d}/{arg0}")))
                .collect::<Result<_, _>>()?
        };
        let mut rlimits = Vec::new();
        for r in p.rlimits().iter().flatten() {
            let name = serde_json::to_value(r.typ())
                .ok()
                .and_then(|v| v.as_str().map(String::from))
                .unwrap_or_default();
            let res = rlimit_resource(&name)
                .ok_or_else(|| SpawnError::Invalid(format!("unknown rlimit {name}")))?;
            rlimits.push((
                res,
                libc::rlimit {
                    rlim_cur: r.soft(),
                    rlim_max: r.hard(),
                },
            ));
        }
        let user = p.user();
        let (bounding, caps, ambient) = match p.capabilities() {
            Some(c) => {
                let ambient = cap_mask(c.ambient())?;
                (
                    Some(cap_mask(c.bounding())?),
                    Some([
                        cap_mask(c.effective())?,
                        cap_mask(c.permitted())?,
                        cap_mask(c.inheritable())?,
                    ]),
                    (0..64).filter(|b| ambient & (1 << b) != 0).collect(),
                )
            }
            None => (None, None, Vec::new()),
        };
        Ok(Self {
            clone_flags: 0,
            mounts: Vec::new(),
            root: None,
            root_readonly: false,
            hostname: None,
            rlimits,
            cwd: cpath(p.cwd())?,
            exec_candidates,
            argv: args.iter().map(cstr).collect::<Result<_, _>>()?,
            envp: env.iter().map(cstr).collect::<Result<_, _>>()?,
            uid: user.uid(),
            gid: user.gid(),
            groups: user.additional_gids().clone().unwrap_or_default(),
            bounding,
            caps,
            ambient,
            no_new_privs: p.no_new_privileges().unwrap_or(false),
            join: Vec::new(),
            fork_after_join: false,
        })
    }
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

/// Reads a child report: `Ok(None)` on EOF (exec happened), `Ok(Some(pid))` for a pid message.
fn read_report(fd: RawFd) -> Result<Option<i32>, SpawnError> {
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
    match kind {
        -1 => Ok(Some(val)),
        step => Err(SpawnError::Child {
            step: STEPS.get(step as usize).copied().unwrap_or("?"),
            source: std::io::Error::from_raw_os_error(val),
        }),
    }
}

/// Clones the child per `plan` with `stdio`; returns once it is set up and waiting for
/// [`start`], or with the step that failed (the child is then reaped).
pub fn spawn(plan: &Plan, stdio: &ChildStdio) -> Result<Pending, SpawnError> {
    let (ready_r, ready_w) = pipe()?;
    let (start_r, start_w) = pipe()?;
    let fds = ChildFds {
        ready: ready_w.as_raw_fd(),
        start: start_r.as_raw_fd(),
    };
    let mut stack = vec![0u8; 256 * 1024];
    let cb = Box::new(|| child_main(plan, stdio, &fds));
    let flags = nix::sched::CloneFlags::from_bits_retain(plan.clone_flags);
    // SAFETY: the child runs `child_main`, which only makes system calls on data prepared
    // above (no allocation, no locks) and ends in execve or _exit; the stack outlives the call
    // (the child has its own copy of the address space).
    let pid = unsafe { nix::sched::clone(cb, &mut stack, flags, Some(libc::SIGCHLD)) }
        .map_err(|e| SpawnError::Sys {
            what: "clone",
            source: std::io::Error::from_raw_os_error(e as i32),
        })?
        .as_raw();
    drop(ready_w);
    drop(start_r);
    let reap = |p: i32| {
        // SAFETY: p is our child; we reap it so it does not linger as a zombie.
        unsafe {
            libc::kill(p, libc::SIGKILL);
            libc::waitpid(p, std::ptr::null_mut(), 0);
        }
    };
    let (pid, intermediate) = if plan.fork_after_join {
        match read_report(ready_r.as_raw_fd()) {
            Ok(Some(inner)) => (inner, Some(pid)),
            Ok(None) => {
                reap(pid);
                return Err(SpawnError::Invalid("exec helper exited early".into()));
            }
            Err(e) => {
                reap(pid);
                return Err(e);
            }
        }
    } else {
        (pid, None)
    };
    match read_report(ready_r.as_raw_fd()) {
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

struct ChildFds {
    ready: RawFd,
    start: RawFd,
}

/// Writes `(kind, value)` on the ready pipe (kind -1: a value; else a step index with errno).
fn report(fd: RawFd, kind: i32, val: i32) {
    let mut b = [0u8; 8];
    b[..4].copy_from_slice(&kind.to_le_bytes());
    b[4..].copy_from_slice(&val.to_le_bytes());
    // SAFETY: writing a local buffer to an fd the child owns.
    unsafe { libc::write(fd, b.as_ptr().cast(), 8) };
}

fn step_of(name: &str) -> i32 {
    STEPS.iter().position(|s| *s == name).unwrap_or(0) as i32
}

fn errno() -> i32 {
    std::io::Error::last_os_error()
        .raw_os_error()
        .unwrap_or(libc::EIO)
}

/// Reports the failed step with errno and ends the child.
fn die(fd: RawFd, step: &str) -> ! {
    report(fd, step_of(step), errno());
    // SAFETY: ends the child without running any of the agent's destructors or atexit hooks.
    unsafe { libc::_exit(126) }
}

macro_rules! check {
    ($fds:expr, $step:expr, $e:expr) => {
        if $e < 0 {
            die($fds.ready, $step);
        }
    };
}

fn ptr(c: &Option<CString>) -> *const libc::c_char {
    c.as_ref().map_or(std::ptr::null(), |c| c.as_ptr())
}

/// The child: system calls only.
fn child_main(plan: &Plan, stdio: &ChildStdio, fds: &ChildFds) -> isize {
    // SAFETY (whole function): every pointer passed is to data in `plan`/`stdio` (valid C
    // strings, arrays) that this child's copy of the address space keeps alive; every result
    // is checked and a failure ends the child with _exit after reporting errno.
    unsafe {
        // The agent blocks SIGTERM/SIGINT (it reads them from a signalfd) and ignores SIGPIPE;
        // both would survive execve, so give the container a clean slate.
        let empty: libc::sigset_t = std::mem::zeroed();
        libc::syscall(
            libc::SYS_rt_sigprocmask,
            libc::SIG_SETMASK,
            &empty,
            std::ptr::null_mut::<libc::sigset_t>(),
            8,
        );
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        for ns in &plan.join {
            check!(fds, "setns", libc::setns(ns.as_raw_fd(), 0));
        }
        if plan.fork_after_join {
            // The raw system call: glibc's fork() runs atfork handlers and takes locks that
            // threads absent from this child may hold.
            let pid = libc::syscall(libc::SYS_fork) as i32;
            check!(fds, "fork", pid);
            if pid > 0 {
                report(fds.ready, -1, pid);
                libc::_exit(0);
            }
        }
        if plan.root.is_some() {
            check!(
                fds,
                "make / private",
                libc::mount(
                    std::ptr::null(),
                    c"/".as_ptr(),
                    std::ptr::null(),
                    libc::MS_REC | libc::MS_PRIVATE,
                    std::ptr::null()
                )
            );
        }
        for m in &plan.mounts {
            for d in &m.mkdirs {
                if libc::mkdir(d.as_ptr(), 0o755) < 0 && errno() != libc::EEXIST {
                    check!(fds, "create a mount point", -1);
                }
            }
            if let Some(t) = &m.touch {
                let fd = libc::open(
                    t.as_ptr(),
                    libc::O_CREAT | libc::O_WRONLY | libc::O_CLOEXEC,
                    0o644,
                );
                if fd < 0 && errno() != libc::EISDIR {
                    check!(fds, "create a mount point", -1);
                }
                if fd >= 0 {
                    libc::close(fd);
                }
            }
            check!(
                fds,
                "mount",
                libc::mount(
                    ptr(&m.source),
                    m.target.as_ptr(),
                    ptr(&m.fstype),
                    m.flags,
                    ptr(&m.data).cast()
                )
            );
            if m.remount_ro {
                check!(
                    fds,
                    "remount read-only",
                    libc::mount(
                        std::ptr::null(),
                        m.target.as_ptr(),
                        std::ptr::null(),
                        libc::MS_REMOUNT | libc::MS_BIND | libc::MS_RDONLY,
                        std::ptr::null()
                    )
                );
            }
        }
        if let Some(root) = &plan.root {
            check!(fds, "pivot_root", libc::chdir(root.as_ptr()));
            if libc::syscall(libc::SYS_pivot_root, c".".as_ptr(), c".".as_ptr()) == 0 {
                check!(
                    fds,
                    "pivot_root",
                    libc::umount2(c".".as_ptr(), libc::MNT_DETACH)
                );
            } else if errno() == libc::EINVAL {
                // The agent's own root is the initramfs, which cannot be pivoted away from:
                // move the container's root over `/` and chroot into it, as runc's no-pivot does.
                check!(
                    fds,
                    "pivot_root",
                    libc::mount(
                        c".".as_ptr(),
                        c"/".as_ptr(),
                        std::ptr::null(),
                        libc::MS_MOVE,
                        std::ptr::null()
                    )
                );
                check!(fds, "pivot_root", libc::chroot(c".".as_ptr()));
            } else {
                die(fds.ready, "pivot_root");
            }
            check!(fds, "pivot_root", libc::chdir(c"/".as_ptr()));
            if plan.root_readonly {
                check!(
                    fds,
                    "remount read-only",
                    libc::mount(
                        std::ptr::null(),
                        c"/".as_ptr(),
                        std::ptr::null(),
                        libc::MS_REMOUNT | libc::MS_BIND | libc::MS_RDONLY,
                        std::ptr::null()
                    )
                );
            }
        }
        if let Some(h) = &plan.hostname {
            check!(
                fds,
                "sethostname",
                libc::sethostname(h.as_ptr(), h.as_bytes().len())
            );
        }
        for (res, lim) in &plan.rlimits {
            check!(fds, "setrlimit", libc::setrlimit(*res as _, lim));
        }
        check!(fds, "stdio", libc::setsid());
        if stdio.controlling_tty {
            check!(fds, "stdio", libc::ioctl(stdio.fds[0], libc::TIOCSCTTY, 0));
        }
        for (i, fd) in stdio.fds.iter().enumerate() {
            check!(fds, "stdio", libc::dup2(*fd, i as i32));
        }
        check!(fds, "chdir", libc::chdir(plan.cwd.as_ptr()));
        report(fds.ready, -1, 0);
        let mut b = [0u8; 1];
        if libc::read(fds.start, b.as_mut_ptr().cast(), 1) != 1 {
            // The agent gave up on this container.
            libc::_exit(125);
        }
        if let Some(bounding) = plan.bounding {
            for cap in 0..64u64 {
                if bounding & (1 << cap) == 0
                    && libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) < 0
                    && errno() != libc::EINVAL
                {
                    check!(fds, "drop the capability bounding set", -1);
                }
            }
        }
        check!(
            fds,
            "setgroups/setgid/setuid",
            libc::prctl(libc::PR_SET_KEEPCAPS, 1, 0, 0, 0)
        );
        // Raw system calls: glibc's wrappers broadcast the change to every thread it knows of,
        // and the agent's other threads do not exist in this child (it would wait forever).
        let sys = |n, a: u64, b: u64, c: u64| libc::syscall(n, a, b, c) as i32;
        let (uid, gid) = (u64::from(plan.uid), u64::from(plan.gid));
        check!(
            fds,
            "setgroups/setgid/setuid",
            sys(
                libc::SYS_setgroups,
                plan.groups.len() as u64,
                plan.groups.as_ptr() as u64,
                0
            )
        );
        check!(
            fds,
            "setgroups/setgid/setuid",
            sys(libc::SYS_setresgid, gid, gid, gid)
        );
        check!(
            fds,
            "setgroups/setgid/setuid",
            sys(libc::SYS_setresuid, uid, uid, uid)
        );
        if let Some([eff, perm, inh]) = plan.caps {
            #[repr(C)]
            struct Header {
                version: u32,
                pid: i32,
            }
            #[repr(C)]
            #[derive(Clone, Copy)]
            struct Data {
                effective: u32,
                permitted: u32,
                inheritable: u32,
            }
            let h = Header {
                version: 0x2008_0522,
                pid: 0,
            };
            let d = [
                Data {
                    effective: eff as u32,
                    permitted: perm as u32,
                    inheritable: inh as u32,
                },
                Data {
                    effective: (eff >> 32) as u32,
                    permitted: (perm >> 32) as u32,
                    inheritable: (inh >> 32) as u32,
                },
            ];
            check!(
                fds,
                "capset",
                libc::syscall(libc::SYS_capset, &h, d.as_ptr()) as i32
            );
            for cap in &plan.ambient {
                let _ = libc::prctl(
                    libc::PR_CAP_AMBIENT,
                    libc::PR_CAP_AMBIENT_RAISE as libc::c_ulong,
                    *cap as libc::c_ulong,
                    0,
                    0,
                );
            }
        }
        if plan.no_new_privs {
            check!(
                fds,
                "no_new_privs",
                libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
            );
        }
        let mut argv: [*const libc::c_char; 256] = [std::ptr::null(); 256];
        for (i, a) in plan.argv.iter().take(255).enumerate() {
            argv[i] = a.as_ptr();
        }
        let mut envp: [*const libc::c_char; 512] = [std::ptr::null(); 512];
        for (i, e) in plan.envp.iter().take(511).enumerate() {
            envp[i] = e.as_ptr();
        }
        let mut last = libc::ENOENT;
        for cand in &plan.exec_candidates {
            libc::execve(cand.as_ptr(), argv.as_ptr(), envp.as_ptr());
            let e = errno();
            if e != libc::ENOENT && e != libc::ENOTDIR {
                last = e;
            }
        }
        report(fds.ready, step_of("execve"), last);
        libc::_exit(127);
    }
}
