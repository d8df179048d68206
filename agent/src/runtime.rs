//! Containers and their processes: the registry, the reaper, and the lifecycle operations.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use protocol::{ContainerState, ContainerStats, ContainerStatus, ErrorCode, ExitStatus};

use crate::cgroup::{Cgroup, CgroupRoot, Limits};
use crate::error::OpError;
use crate::rootdev::{self, ImageRoot, LoopDevice, RootDevError};
use crate::spawn::{self, ChildStdio, Pending, Plan};
use crate::stdio::ProcIo;
use crate::sync::LockOrRecover;
use crate::threads;

/// Collects the exit statuses of every child (`waitpid(-1)`), as PID 1 must, and hands them to
/// whoever waits for a pid; statuses nobody claims (orphans re-parented to us) are dropped.
pub struct Reaper {
    state: Mutex<ReaperState>,
    cv: Condvar,
}

#[derive(Default)]
struct ReaperState {
    exited: HashMap<i32, i32>,
    watched: std::collections::HashSet<i32>,
}

impl Reaper {
    /// Starts the reaper thread.
    pub fn start() -> std::io::Result<Arc<Self>> {
        let r = Arc::new(Self {
            state: Mutex::new(ReaperState::default()),
            cv: Condvar::new(),
        });
        let r2 = r.clone();
        threads::spawn("reaper", move || loop {
            let mut status = 0;
            // SAFETY: waitpid with a valid status pointer.
            let pid = unsafe { libc::waitpid(-1, &mut status, 0) };
            if pid <= 0 {
                std::thread::sleep(Duration::from_millis(2));
                continue;
            }
            let mut st = r2.state.lock_or_recover();
            if st.watched.remove(&pid) {
                st.exited.insert(pid, status);
                r2.cv.notify_all();
            }
        })?;
        Ok(r)
    }

    /// Registers interest in `pid` (before it can exit unobserved: call right after spawning).
    pub fn watch(&self, pid: i32) {
        self.state.lock_or_recover().watched.insert(pid);
    }

    /// Waits for `pid`'s raw wait status, up to `timeout`.
    pub fn wait(&self, pid: i32, timeout: Option<Duration>) -> Option<i32> {
        let deadline = timeout.map(|t| Instant::now() + t);
        let mut st = self.state.lock_or_recover();
        loop {
            if let Some(s) = st.exited.remove(&pid) {
                return Some(s);
            }
            match deadline {
                None => st = self.cv.wait(st).unwrap_or_else(|p| p.into_inner()),
                Some(d) => {
                    let now = Instant::now();
                    if now >= d {
                        return None;
                    }
                    st = self
                        .cv
                        .wait_timeout(st, d - now)
                        .unwrap_or_else(|p| p.into_inner())
                        .0;
                }
            }
        }
    }
}

/// Called once with a process's exit status.
pub type ExitWaiter = Box<dyn FnOnce(ExitStatus) + Send>;

/// A process's exit status once known, and who waits for it.
#[derive(Default)]
struct Exit {
    status: Option<ExitStatus>,
    waiters: Vec<ExitWaiter>,
}

/// A process of a container (its init or an exec).
pub struct Proc {
    /// Agent-side pid.
    pub pid: i32,
    exit: Mutex<Exit>,
    /// Resources to release when the process is gone (stream pumps, stdin).
    pub io: Mutex<ProcIo>,
}

impl Proc {
    fn new(pid: i32, io: ProcIo) -> Arc<Self> {
        Arc::new(Self {
            pid,
            exit: Mutex::new(Exit::default()),
            io: Mutex::new(io),
        })
    }

    /// Runs `f` with the exit status once the process exited (right away if it has), on the
    /// thread that saw the exit: no thread per waiter.
    pub fn when_exited(&self, f: ExitWaiter) {
        let mut e = self.exit.lock_or_recover();
        match e.status {
            Some(s) => {
                drop(e);
                f(s);
            }
            None => e.waiters.push(f),
        }
    }

    /// Exit status, if exited.
    pub fn exited(&self) -> Option<ExitStatus> {
        self.exit.lock_or_recover().status
    }

    fn set_exit(&self, s: ExitStatus) {
        let waiters = {
            let mut e = self.exit.lock_or_recover();
            e.status = Some(s);
            std::mem::take(&mut e.waiters)
        };
        for w in waiters {
            w(s);
        }
    }
}

/// A container.
pub struct Container {
    /// Id.
    pub id: String,
    rootfs: PathBuf,
    scratch: Option<PathBuf>,
    /// The loop device of an `Image` root, held until destroy.
    loop_dev: Mutex<Option<LoopDevice>>,
    cgroup: Cgroup,
    /// The container's process.
    pub init: Arc<Proc>,
    pending: Mutex<Option<Pending>>,
    execs: Mutex<HashMap<String, Arc<Proc>>>,
    /// Frozen by `pause`.
    paused: std::sync::atomic::AtomicBool,
}

impl Container {
    fn status(&self) -> ContainerStatus {
        if self.init.exited().is_some() {
            ContainerStatus::Stopped
        } else if self.pending.lock_or_recover().is_some() {
            ContainerStatus::Created
        } else if self.paused.load(std::sync::atomic::Ordering::SeqCst) {
            ContainerStatus::Paused
        } else {
            ContainerStatus::Running
        }
    }

    /// The process `exec_id` (or init).
    pub fn process(&self, exec_id: Option<&str>) -> Result<Arc<Proc>, OpError> {
        match exec_id {
            None => Ok(self.init.clone()),
            Some(e) => self.execs.lock_or_recover().get(e).cloned().ok_or_else(|| {
                OpError::new(
                    ErrorCode::NotFound,
                    format!("container {} has no exec {e}", self.id),
                )
            }),
        }
    }
}

/// Every container of this agent.
pub struct Runtime {
    containers: Mutex<HashMap<String, Arc<Container>>>,
    /// The reaper.
    pub reaper: Arc<Reaper>,
    cgroups: CgroupRoot,
    state_dir: PathBuf,
}

fn to_exit(raw: i32, oom_kills: u64) -> ExitStatus {
    if libc::WIFSIGNALED(raw) {
        let sig = libc::WTERMSIG(raw);
        ExitStatus {
            code: 128 + sig,
            signal: Some(sig),
            oom_killed: sig == libc::SIGKILL && oom_kills > 0,
        }
    } else {
        ExitStatus {
            code: libc::WEXITSTATUS(raw),
            signal: None,
            oom_killed: false,
        }
    }
}

fn valid_id(id: &str) -> Result<(), OpError> {
    if id.is_empty()
        || id.len() > 128
        || !id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        || id.starts_with('.')
    {
        return Err(OpError::new(
            ErrorCode::BadRequest,
            format!("container id {id:?}: use 1-128 characters of [A-Za-z0-9._-], not starting with '.'"),
        ));
    }
    Ok(())
}

impl Runtime {
    /// A runtime keeping scratch directories in `state_dir` and cgroups under `cgroups`.
    pub fn new(state_dir: PathBuf, cgroups: CgroupRoot) -> std::io::Result<Arc<Self>> {
        std::fs::create_dir_all(&state_dir)?;
        // Exec'd processes are re-parented to us when their helper exits.
        // SAFETY: prctl with integer arguments.
        unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
        Ok(Arc::new(Self {
            containers: Mutex::new(HashMap::new()),
            reaper: Reaper::start()?,
            cgroups,
            state_dir,
        }))
    }

    /// The container `id`.
    pub fn get(&self, id: &str) -> Result<Arc<Container>, OpError> {
        self.containers
            .lock_or_recover()
            .get(id)
            .cloned()
            .ok_or_else(|| OpError::new(ErrorCode::NotFound, format!("no container {id}")))
    }

    /// Ids of all containers.
    pub fn list(&self) -> Vec<String> {
        let mut v: Vec<String> = self.containers.lock_or_recover().keys().cloned().collect();
        v.sort();
        v
    }

    /// Creates container `id`: cgroup, namespaces, root file system; its process waits for
    /// [`Runtime::start`]. `io` are the agent-side stdio resources, `stdio` the child's fds.
    pub fn create(
        self: &Arc<Self>,
        id: &str,
        spec: &oci_spec::runtime::Spec,
        source: &protocol::RootfsSource,
        stdio: &ChildStdio,
        io: ProcIo,
        on_exit: impl FnOnce(&str, ExitStatus) + Send + 'static,
    ) -> Result<Arc<Container>, OpError> {
        valid_id(id)?;
        let dir = match source {
            protocol::RootfsSource::Bind { path } => Some(path),
            protocol::RootfsSource::Overlay { lower } => Some(lower),
            protocol::RootfsSource::Block { .. } | protocol::RootfsSource::Image { .. } => None,
        };
        if let Some(dir) = dir {
            if !std::path::Path::new(dir).is_dir() {
                return Err(OpError::new(
                    ErrorCode::NotFound,
                    format!("root file system {dir} does not exist or is not a directory: unpack the bundle first"),
                ));
            }
        }
        // Image roots: find (Block) or attach (Image) the device now; a loop device is dropped,
        // so detached, on every failure path below, and on destroy.
        let (image, loop_dev) = image_root(source)?;
        let mut map = self.containers.lock_or_recover();
        if map.contains_key(id) {
            return Err(OpError::new(
                ErrorCode::AlreadyExists,
                format!("container {id} exists: destroy it first or pick another id"),
            ));
        }
        let scratch = self.state_dir.join(id);
        let overlay = !matches!(source, protocol::RootfsSource::Bind { .. });
        if overlay {
            std::fs::create_dir_all(&scratch).map_err(|e| {
                OpError::new(
                    ErrorCode::Io,
                    format!("creating {}: {e}", scratch.display()),
                )
            })?;
        }
        let cleanup_scratch = || {
            if overlay {
                let _ = std::fs::remove_dir(&scratch);
            }
        };
        let (mut plan, rootfs) =
            match Plan::for_container_with(spec, source, &scratch, image.as_ref()) {
                Ok(p) => p,
                Err(e) => {
                    cleanup_scratch();
                    return Err(e.into());
                }
            };
        let cgroup = match Limits::from_spec(spec).and_then(|l| self.cgroups.create(id, &l)) {
            Ok(c) => c,
            Err(e) => {
                cleanup_scratch();
                return Err(OpError::new(ErrorCode::Io, e.to_string()));
            }
        };
        if let Err(e) = plan.bind_cgroup(&cgroup) {
            cgroup.remove();
            cleanup_scratch();
            return Err(e.into());
        }
        let join = |pid: i32| cgroup.add(pid).map_err(|e| e.to_string());
        let pending = match spawn::spawn(&plan, stdio, &join) {
            Ok(p) => p,
            Err(e) => {
                cgroup.remove();
                cleanup_scratch();
                return Err(e.into());
            }
        };
        let pid = pending.pid;
        self.reaper.watch(pid);
        let init = Proc::new(pid, io);
        let c = Arc::new(Container {
            id: id.to_string(),
            rootfs,
            scratch: overlay.then_some(scratch),
            loop_dev: Mutex::new(loop_dev),
            cgroup,
            init: init.clone(),
            pending: Mutex::new(Some(pending)),
            execs: Mutex::new(HashMap::new()),
            paused: std::sync::atomic::AtomicBool::new(false),
        });
        if let Err(e) = self.watch_exit(c.clone(), init, on_exit) {
            // Nobody would ever collect this process: take it down before refusing.
            drop(c.pending.lock_or_recover().take());
            // SAFETY: kill(2) on the process we just cloned.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            self.reaper.wait(pid, Some(Duration::from_secs(5)));
            c.cgroup.remove();
            if let Some(s) = &c.scratch {
                let _ = std::fs::remove_dir(s);
            }
            return Err(OpError::no_thread(&format!("watching container {id}"), &e));
        }
        map.insert(id.to_string(), c.clone());
        drop(map);
        Ok(c)
    }

    /// Starts the thread that waits for `proc`'s exit, lets its output drain, then tells its
    /// waiters and `on_exit`.
    fn watch_exit(
        self: &Arc<Self>,
        c: Arc<Container>,
        proc: Arc<Proc>,
        on_exit: impl FnOnce(&str, ExitStatus) + Send + 'static,
    ) -> std::io::Result<()> {
        let rt = self.clone();
        threads::spawn("exit-watcher", move || {
            let raw = rt.reaper.wait(proc.pid, None).unwrap_or(0);
            let status = to_exit(raw, c.cgroup.oom_kills());
            // Let the output pumps drain before anyone hears of the exit.
            ProcIo::finish(&proc.io, Duration::from_secs(2));
            proc.set_exit(status);
            on_exit(&c.id, status);
        })?;
        Ok(())
    }

    /// Starts a created container.
    pub fn start(&self, id: &str) -> Result<(), OpError> {
        let c = self.get(id)?;
        let pending = c.pending.lock_or_recover().take().ok_or_else(|| {
            OpError::new(
                ErrorCode::InvalidState,
                format!("container {id} was already started"),
            )
        })?;
        spawn::start(pending)?;
        Ok(())
    }

    /// Runs an extra process in a running container.
    pub fn exec(
        self: &Arc<Self>,
        id: &str,
        exec_id: &str,
        process: &oci_spec::runtime::Process,
        stdio: &ChildStdio,
        io: ProcIo,
        on_exit: impl FnOnce(&str, ExitStatus) + Send + 'static,
    ) -> Result<i32, OpError> {
        valid_id(exec_id)?;
        let c = self.get(id)?;
        if c.status() != ContainerStatus::Running {
            return Err(OpError::new(
                ErrorCode::InvalidState,
                format!("container {id} is not running"),
            ));
        }
        if c.execs.lock_or_recover().contains_key(exec_id) {
            return Err(OpError::new(
                ErrorCode::AlreadyExists,
                format!("exec {exec_id} exists in {id}"),
            ));
        }
        let plan = Plan::for_exec(process, c.init.pid)?;
        let join = |pid: i32| c.cgroup.add(pid).map_err(|e| e.to_string());
        let pending = spawn::spawn(&plan, stdio, &join)?;
        let pid = pending.pid;
        // The helper (`pending.intermediate`) exits right away; the reaper collects it unwatched.
        self.reaper.watch(pid);
        let proc = Proc::new(pid, io);
        if let Err(e) = self.watch_exit(c.clone(), proc.clone(), on_exit) {
            // Never started: its start pipe closes and it exits; the reaper collects it.
            drop(pending);
            // SAFETY: kill(2) on the process we just cloned.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            self.reaper.wait(pid, Some(Duration::from_secs(5)));
            return Err(OpError::no_thread(&format!("watching exec {exec_id}"), &e));
        }
        c.execs.lock_or_recover().insert(exec_id.to_string(), proc);
        spawn::start(pending)?;
        Ok(pid)
    }

    /// Sends `signal` to a process, or to all of the container's.
    pub fn signal(
        &self,
        id: &str,
        exec_id: Option<&str>,
        signal: i32,
        all: bool,
    ) -> Result<(), OpError> {
        let c = self.get(id)?;
        if !(1..=64).contains(&signal) {
            return Err(OpError::new(
                ErrorCode::BadRequest,
                format!("signal {signal} is not 1..=64"),
            ));
        }
        let pids = if all {
            c.cgroup.pids()
        } else {
            vec![c.process(exec_id)?.pid]
        };
        for p in pids {
            // SAFETY: kill(2) on a pid of this container.
            if unsafe { libc::kill(p, signal) } != 0 && !all {
                return Err(OpError::new(
                    ErrorCode::InvalidState,
                    format!("signalling {p}: {}", std::io::Error::last_os_error()),
                ));
            }
        }
        // A frozen process cannot act on SIGKILL: thaw a paused container so it dies (as runc).
        if signal == libc::SIGKILL && c.paused.load(std::sync::atomic::Ordering::SeqCst) {
            c.cgroup.freeze(false).map_err(|e| {
                OpError::new(
                    ErrorCode::Io,
                    format!("thawing container {id} to let SIGKILL act: {e}"),
                )
            })?;
            c.paused.store(false, std::sync::atomic::Ordering::SeqCst);
        }
        Ok(())
    }

    /// State of container `id`.
    pub fn state(&self, id: &str) -> Result<ContainerState, OpError> {
        let c = self.get(id)?;
        Ok(ContainerState {
            id: c.id.clone(),
            status: c.status(),
            pid: c.init.pid,
            rootfs: c.rootfs.display().to_string(),
            exit: c.init.exited(),
        })
    }

    /// Pids of container `id`.
    pub fn ps(&self, id: &str) -> Result<Vec<i32>, OpError> {
        Ok(self.get(id)?.cgroup.pids())
    }

    /// Resource usage of container `id`.
    pub fn stats(&self, id: &str) -> Result<ContainerStats, OpError> {
        let c = self.get(id)?;
        let (memory_current, memory_max, pids_current, cpu_usage_usec) = c.cgroup.usage();
        Ok(ContainerStats {
            id: c.id.clone(),
            memory_current,
            memory_max,
            pids_current,
            cpu_usage_usec,
            oom_kills: c.cgroup.oom_kills(),
        })
    }

    /// Changes the cgroup limits of container `id` (those given; the rest stay).
    pub fn update(&self, id: &str, r: &protocol::Resources) -> Result<(), OpError> {
        let c = self.get(id)?;
        let limits = Limits {
            memory: r.memory,
            pids: r.pids,
            cpu: r.cpu_quota.map(|q| (q, r.cpu_period.unwrap_or(100_000))),
            devices: Vec::new(),
        };
        c.cgroup.update(&limits).map_err(|e| {
            OpError::new(
                ErrorCode::Io,
                format!("updating the cgroup limits of {id}: {e}"),
            )
        })
    }

    /// Freezes (`pause`) or thaws (`resume`) every process of container `id`: a running
    /// container pauses, a paused one resumes; anything else is refused.
    pub fn set_paused(&self, id: &str, pause: bool) -> Result<(), OpError> {
        use std::sync::atomic::Ordering;
        let c = self.get(id)?;
        let (from, verb) = if pause {
            (ContainerStatus::Running, "pause")
        } else {
            (ContainerStatus::Paused, "resume")
        };
        let status = c.status();
        if status != from {
            return Err(OpError::new(
                ErrorCode::InvalidState,
                format!(
                    "container {id} is {}, not {}: cannot {verb} it",
                    status.name(),
                    from.name()
                ),
            ));
        }
        c.cgroup
            .freeze(pause)
            .map_err(|e| OpError::new(ErrorCode::Io, format!("{verb} of container {id}: {e}")))?;
        c.paused.store(pause, Ordering::SeqCst);
        Ok(())
    }

    /// Kills every process of container `id`, waits for them, and removes it.
    pub fn destroy(&self, id: &str) -> Result<(), OpError> {
        let c = self
            .containers
            .lock_or_recover()
            .remove(id)
            .ok_or_else(|| OpError::new(ErrorCode::NotFound, format!("no container {id}")))?;
        // A never-started process sees its start pipe close and exits.
        drop(c.pending.lock_or_recover().take());
        c.cgroup.kill_all_and_remove();
        // SAFETY: kill(2) on the container's init, in case it escaped the cgroup.
        unsafe { libc::kill(c.init.pid, libc::SIGKILL) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while c.init.exited().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        let execs: Vec<_> = c.execs.lock_or_recover().values().cloned().collect();
        for e in execs {
            while e.exited().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        if let Some(s) = &c.scratch {
            let _ = std::fs::remove_dir(s);
        }
        // The mounts died with the container's mount namespace: closing the handle lets the
        // kernel autoclear the loop device.
        drop(c.loop_dev.lock_or_recover().take());
        if c.init.exited().is_none() {
            return Err(OpError::new(
                ErrorCode::Internal,
                format!("container {id}'s process did not exit after SIGKILL"),
            ));
        }
        Ok(())
    }
}

/// The device of a `Block` or `Image` root (`None` for directory roots) and, for `Image`, the
/// loop device to hold.
fn image_root(
    source: &protocol::RootfsSource,
) -> Result<(Option<ImageRoot>, Option<LoopDevice>), OpError> {
    use protocol::{RootfsSource, Writable};
    let (fstype, writable) = match source {
        RootfsSource::Bind { .. } | RootfsSource::Overlay { .. } => return Ok((None, None)),
        RootfsSource::Block {
            fstype, writable, ..
        }
        | RootfsSource::Image {
            fstype, writable, ..
        } => (fstype, writable),
    };
    let fstype = rootdev::check_fstype(fstype).map_err(rootdev_error)?;
    let sys_block = Path::new("/sys/block");
    let scratch_device = match writable {
        Writable::Tmpfs => None,
        Writable::Block { serial } => {
            let dev = rootdev::find_by_serial(sys_block, serial).map_err(rootdev_error)?;
            rootdev::check_device(&dev, "ext4").map_err(rootdev_error)?;
            Some(dev)
        }
    };
    Ok(match source {
        RootfsSource::Block { serial, .. } => {
            let dev = rootdev::find_by_serial(sys_block, serial).map_err(rootdev_error)?;
            rootdev::check_device(&dev, fstype).map_err(rootdev_error)?;
            (
                Some(ImageRoot {
                    device: dev,
                    fstype,
                    scratch_device,
                }),
                None,
            )
        }
        RootfsSource::Image { path, .. } => {
            if !Path::new(path).is_absolute() {
                return Err(OpError::new(
                    ErrorCode::BadRequest,
                    format!("image path {path:?} is not absolute: give an absolute path"),
                ));
            }
            let l = LoopDevice::attach(Path::new(path), fstype).map_err(rootdev_error)?;
            (
                Some(ImageRoot {
                    device: l.path().to_path_buf(),
                    fstype,
                    scratch_device,
                }),
                Some(l),
            )
        }
        RootfsSource::Bind { .. } | RootfsSource::Overlay { .. } => (None, None),
    })
}

fn rootdev_error(e: RootDevError) -> OpError {
    let code = match &e {
        RootDevError::NoSerial { .. } => ErrorCode::NotFound,
        RootDevError::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound => {
            ErrorCode::NotFound
        }
        RootDevError::Io { .. } | RootDevError::NoLoop { .. } => ErrorCode::Io,
        _ => ErrorCode::BadRequest,
    };
    OpError::new(code, e.to_string())
}
