//! [`Pool`]: templates, per-template tiers of ready VMs, leased sandboxes, and the background
//! threads that refill, watch and reap them.
//!
//! Tiers, in the order an acquire tries them: **warm** clones (restored with their vCPUs
//! parked; an acquire writes the identity and resumes them), **shells** (`runv-vmm --shell`,
//! an acquire restores the template into one), and **cold** (a shell created on the spot): an
//! acquire never fails because the pool is empty. Refill runs on its own threads with a bounded
//! concurrency and an exponential backoff per template, and never holds the lock while a VM
//! starts, so it never delays an acquire. A monitor thread polls every VMM every
//! [`MONITOR_PERIOD`]: a pooled VM that died is dropped (and replaced by refill), a leased one is
//! marked [`SandboxState::Dead`] and its files removed; expired TTLs are released. Releases shut
//! VMs down on a reaper thread, off the request path.

use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crossbeam_channel::{Receiver, Sender};
use vmm_api::{ControlClient, MemoryMode, RestoreOptions, SerialOutput};

use crate::names::{self, InvalidName};
use crate::sandbox::{
    PoolInfo, PoolTargets, SandboxInfo, SandboxState, TemplateInfo, TemplateStatus, Tier,
};
use crate::shell::{ShellError, ShellProcess, ShellSpec};
use crate::template::{self, Template, TemplateError, TemplateSpec};

/// How often the monitor looks at every VMM and TTL.
pub const MONITOR_PERIOD: Duration = Duration::from_millis(100);
/// Longest refill backoff.
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// How long a reaped VMM may take to answer `shutdown`.
const REAP_TIMEOUT: Duration = Duration::from_secs(2);

/// Where the pool keeps its files and which VMM it runs.
#[derive(Debug, Clone)]
pub struct PoolConfig {
    /// `runv-vmm` binary.
    pub vmm: PathBuf,
    /// Durable state: `templates/`, `pools.json`.
    pub state_dir: PathBuf,
    /// Sockets and logs of the VMs.
    pub run_dir: PathBuf,
    /// tmpfs directory holding the templates clones map.
    pub tmpfs_dir: PathBuf,
    /// Threads creating pooled VMs (bounded refill concurrency).
    pub refill_workers: usize,
}

/// Error of a pool operation; [`PoolError::kind`] classifies it for an API.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    /// A name or id is invalid.
    #[error(transparent)]
    InvalidName(#[from] InvalidName),
    /// The request is invalid (the message says what to fix).
    #[error("{0}")]
    Invalid(String),
    /// Unknown template or sandbox.
    #[error("{0}")]
    NotFound(String),
    /// It conflicts with what exists (duplicate id, template in use, limit reached).
    #[error("{0}")]
    Conflict(String),
    /// The template is broken.
    #[error("template {name} is broken: {reason}")]
    Broken {
        /// Template.
        name: String,
        /// Why.
        reason: String,
    },
    /// Building or loading a template failed.
    #[error(transparent)]
    Template(#[from] TemplateError),
    /// A VMM failed.
    #[error(transparent)]
    Vm(#[from] ShellError),
    /// A file operation failed.
    #[error("{what}: {source}")]
    Io {
        /// What failed.
        what: String,
        /// Cause.
        source: std::io::Error,
    },
}

/// Classes of [`PoolError`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// The caller's input is wrong (400).
    BadRequest,
    /// Not found (404).
    NotFound,
    /// Conflicts with the current state (409).
    Conflict,
    /// The pool or a VMM failed (500).
    Internal,
}

impl PoolError {
    /// The class of this error.
    pub fn class(&self) -> ErrorClass {
        match self {
            PoolError::InvalidName(_) | PoolError::Invalid(_) => ErrorClass::BadRequest,
            PoolError::Template(TemplateError::Spec(_)) => ErrorClass::BadRequest,
            PoolError::NotFound(_) => ErrorClass::NotFound,
            PoolError::Conflict(_) | PoolError::Broken { .. } => ErrorClass::Conflict,
            _ => ErrorClass::Internal,
        }
    }
}

/// An acquire request.
#[derive(Debug, Clone, Default)]
pub struct AcquireRequest {
    /// Template name.
    pub template: String,
    /// Sandbox id (generated when absent).
    pub id: Option<String>,
    /// Released automatically after this long.
    pub ttl: Option<Duration>,
    /// Caller's labels.
    pub labels: BTreeMap<String, String>,
}

/// Counters since the pool started.
#[derive(Debug, Default)]
pub struct PoolCounters {
    /// Acquires served, by tier (warm, shell, cold).
    pub acquires: [AtomicU64; 3],
    /// Pooled VMs that failed to start.
    pub refill_failures: AtomicU64,
    /// Pooled VMs started.
    pub refilled: AtomicU64,
    /// VMMs found dead by the monitor (pooled and leased).
    pub vm_deaths: AtomicU64,
    /// Sandboxes released because their TTL expired.
    pub expired: AtomicU64,
}

enum LeasedVm {
    Owned(ShellProcess),
    Adopted { pid: u32 },
    Gone,
}

struct Leased {
    info: SandboxInfo,
    vm: LeasedVm,
    deadline: Option<Instant>,
}

struct Entry {
    template: Option<Template>,
    info: TemplateInfo,
    targets: PoolTargets,
    shells: Vec<ShellProcess>,
    warm: Vec<ShellProcess>,
    starting_shells: usize,
    starting_warm: usize,
    failures: u32,
    retry_at: Instant,
}

#[derive(Default)]
struct State {
    templates: BTreeMap<String, Entry>,
    sandboxes: BTreeMap<String, Leased>,
    /// Ids of acquires in flight, with their template.
    reserved: BTreeMap<String, String>,
    building: HashSet<String>,
    stopping: bool,
}

/// Work for the reaper thread.
enum Reap {
    Vm(ShellProcess),
    Adopted(SandboxInfo),
    Files(Vec<PathBuf>),
    Stop,
}

struct Shared {
    cfg: PoolConfig,
    state: Mutex<State>,
    wake: Condvar,
    reap: Sender<Reap>,
    counters: PoolCounters,
}

/// Templates, their pools and the leased sandboxes; see the module docs.
pub struct Pool {
    shared: Arc<Shared>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    reaper: Mutex<Option<JoinHandle<()>>>,
}

fn now_s() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// 12 random hex digits for VM and sandbox names.
fn random_hex() -> String {
    let mut b = [0u8; 6];
    // SAFETY: getrandom writes at most b.len() bytes into b.
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
    if n != b.len() as isize {
        // Never fails for 6 bytes on Linux ≥ 3.17; fall back to time and a counter.
        static N: AtomicU64 = AtomicU64::new(0);
        let t = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        b.copy_from_slice(&(t ^ N.fetch_add(1, Ordering::Relaxed) << 48).to_le_bytes()[..6]);
    }
    b.iter().map(|x| format!("{x:02x}")).collect()
}

impl Pool {
    /// Opens the pool: creates its directories, loads every template in
    /// `<state_dir>/templates` (restoring missing tmpfs copies; one that fails its checks is
    /// listed as broken), applies `<state_dir>/pools.json` and starts the threads.
    pub fn open(cfg: PoolConfig) -> Result<Self, PoolError> {
        let templates_dir = cfg.state_dir.join("templates");
        for d in [&templates_dir, &cfg.run_dir, &cfg.tmpfs_dir] {
            std::fs::create_dir_all(d).map_err(|source| PoolError::Io {
                what: format!("creating {}", d.display()),
                source,
            })?;
        }
        let mut state = State::default();
        let saved: BTreeMap<String, PoolTargets> = std::fs::read(cfg.state_dir.join("pools.json"))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        let dirs = std::fs::read_dir(&templates_dir).map_err(|source| PoolError::Io {
            what: format!("listing {}", templates_dir.display()),
            source,
        })?;
        for d in dirs.flatten() {
            let name = d.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') && name.ends_with(".building") {
                // A build that was interrupted.
                let _ = std::fs::remove_dir_all(d.path());
                continue;
            }
            if names::validate("template", &name).is_err() {
                continue; // foreign files
            }
            let mut entry = Entry::new(&name, template::open(&d.path(), &cfg.tmpfs_dir));
            entry.targets = saved.get(&name).copied().unwrap_or_default();
            state.templates.insert(name, entry);
        }
        let (tx, rx) = crossbeam_channel::unbounded();
        let shared = Arc::new(Shared {
            cfg,
            state: Mutex::new(state),
            wake: Condvar::new(),
            reap: tx,
            counters: PoolCounters::default(),
        });
        let mut threads = Vec::new();
        for _ in 0..shared.cfg.refill_workers.max(1) {
            let s = shared.clone();
            threads.push(std::thread::spawn(move || refill_loop(&s)));
        }
        let s = shared.clone();
        threads.push(std::thread::spawn(move || monitor_loop(&s)));
        let s = shared.clone();
        let reaper = Some(std::thread::spawn(move || reaper_loop(&s, rx)));
        Ok(Self {
            shared,
            threads: Mutex::new(threads),
            reaper: Mutex::new(reaper),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &PoolConfig {
        &self.shared.cfg
    }

    /// Counters since start.
    pub fn counters(&self) -> &PoolCounters {
        &self.shared.counters
    }

    /// Builds template `name` from `spec` (blocking: boots the guest, waits for readiness,
    /// snapshots) and registers it. Refused if the name exists or is being built.
    pub fn build_template(
        &self,
        name: &str,
        spec: &TemplateSpec,
    ) -> Result<TemplateInfo, PoolError> {
        names::validate("template", name)?;
        spec.validate()?;
        {
            let mut st = self.shared.lock();
            if st.templates.contains_key(name) || !st.building.insert(name.to_string()) {
                return Err(PoolError::Conflict(format!(
                    "template {name} already exists: delete it first or pick another name"
                )));
            }
        }
        let cfg = &self.shared.cfg;
        let built = template::build(
            &cfg.vmm,
            name,
            spec,
            &cfg.state_dir.join("templates"),
            &cfg.tmpfs_dir,
            &cfg.run_dir,
        );
        let mut st = self.shared.lock();
        st.building.remove(name);
        let t = built?;
        let entry = Entry::new(name, Ok(t));
        let info = entry.info.clone();
        st.templates.insert(name.to_string(), entry);
        Ok(info)
    }

    /// Every template.
    pub fn templates(&self) -> Vec<TemplateInfo> {
        let st = self.shared.lock();
        st.templates.values().map(|e| st.template_info(e)).collect()
    }

    /// One template.
    pub fn template(&self, name: &str) -> Result<TemplateInfo, PoolError> {
        let st = self.shared.lock();
        let e = st.entry(name)?;
        Ok(st.template_info(e))
    }

    /// Removes a template, its pooled VMs and files; refused while sandboxes of it live unless
    /// `force` (which releases them).
    pub fn remove_template(&self, name: &str, force: bool) -> Result<(), PoolError> {
        let mut st = self.shared.lock();
        st.entry(name)?;
        let live: Vec<String> = st
            .sandboxes
            .values()
            .filter(|l| l.info.template == name)
            .map(|l| l.info.id.clone())
            .collect();
        if !live.is_empty() && !force {
            return Err(PoolError::Conflict(format!(
                "template {name} has {} live sandboxes: release them or delete with force",
                live.len()
            )));
        }
        for id in live {
            if let Some(l) = st.sandboxes.remove(&id) {
                self.shared.reap_leased(l);
            }
        }
        let e = st.templates.remove(name).expect("checked above");
        drop(st);
        for vm in e.shells.into_iter().chain(e.warm) {
            let _ = self.shared.reap.send(Reap::Vm(vm));
        }
        if let Some(t) = e.template {
            t.remove();
        } else {
            let _ = std::fs::remove_dir_all(self.shared.cfg.state_dir.join("templates").join(name));
            let _ = std::fs::remove_dir_all(self.shared.cfg.tmpfs_dir.join(name));
        }
        self.shared.save_targets();
        Ok(())
    }

    /// Sets a template's pool targets; excess pooled VMs are shut down, missing ones are
    /// created in the background.
    pub fn set_pool(&self, name: &str, targets: PoolTargets) -> Result<PoolInfo, PoolError> {
        if targets.max_sandboxes != 0 && targets.warm + targets.shells > targets.max_sandboxes {
            return Err(PoolError::Invalid(format!(
                "warm {} + shells {} is larger than max_sandboxes {}: lower the pool or raise max_sandboxes",
                targets.warm, targets.shells, targets.max_sandboxes
            )));
        }
        let mut st = self.shared.lock();
        let e = st.entry_mut(name)?;
        e.targets = targets;
        e.failures = 0;
        e.retry_at = Instant::now();
        let extra_shells: Vec<_> = e
            .shells
            .drain(targets.shells.min(e.shells.len())..)
            .collect();
        let extra_warm: Vec<_> = e.warm.drain(targets.warm.min(e.warm.len())..).collect();
        let info = st.pool_info(name);
        drop(st);
        for vm in extra_shells.into_iter().chain(extra_warm) {
            let _ = self.shared.reap.send(Reap::Vm(vm));
        }
        self.shared.save_targets();
        self.shared.wake.notify_all();
        Ok(info)
    }

    /// Every template's pool.
    pub fn pools(&self) -> Vec<PoolInfo> {
        let st = self.shared.lock();
        st.templates.keys().map(|n| st.pool_info(n)).collect()
    }

    /// Process ids of a template's pooled VMs, by tier (warm clones, then shells).
    pub fn pooled_pids(&self, template: &str) -> Result<Vec<(Tier, u32)>, PoolError> {
        let st = self.shared.lock();
        let e = st.entry(template)?;
        Ok(e.warm
            .iter()
            .map(|vm| (Tier::Warm, vm.pid()))
            .chain(e.shells.iter().map(|vm| (Tier::Shell, vm.pid())))
            .collect())
    }

    /// Leases a sandbox of `req.template`: a warm clone, else a shell, else a shell created on
    /// the spot.
    pub fn acquire(&self, req: AcquireRequest) -> Result<SandboxInfo, PoolError> {
        let start = Instant::now();
        names::validate("template", &req.template)?;
        let id = match req.id {
            Some(id) => {
                names::validate("sandbox id", &id)?;
                id
            }
            None => format!("sb-{}", random_hex()),
        };
        let (template, pooled) = {
            let mut st = self.shared.lock();
            if st.stopping {
                return Err(PoolError::Conflict("the pool is shutting down".into()));
            }
            if st.sandboxes.contains_key(&id) || st.reserved.contains_key(&id) {
                return Err(PoolError::Conflict(format!(
                    "sandbox {id} already exists: pick another id"
                )));
            }
            // Leased and in flight: concurrent acquires cannot pass max_sandboxes together.
            let leased = st
                .sandboxes
                .values()
                .filter(|l| l.info.template == req.template)
                .count()
                + st.reserved.values().filter(|t| **t == req.template).count();
            let e = st.entry_mut(&req.template)?;
            let t = match (&e.template, &e.info.status) {
                (Some(t), TemplateStatus::Ready) => t.clone(),
                (_, TemplateStatus::Broken(reason)) => {
                    return Err(PoolError::Broken {
                        name: req.template.clone(),
                        reason: reason.clone(),
                    })
                }
                (None, _) => unreachable!("a template without files is broken"),
            };
            if e.targets.max_sandboxes != 0 && leased >= e.targets.max_sandboxes {
                return Err(PoolError::Conflict(format!(
                    "template {} has its max_sandboxes {} leased: release some or raise the limit",
                    req.template, e.targets.max_sandboxes
                )));
            }
            let pooled = match e.warm.pop() {
                Some(vm) => Some((vm, Tier::Warm)),
                None => e.shells.pop().map(|vm| (vm, Tier::Shell)),
            };
            st.reserved.insert(id.clone(), req.template.clone());
            (t, pooled)
        };
        self.shared.wake.notify_all();
        let result = self.make_clone(&template, &id, pooled);
        let mut st = self.shared.lock();
        st.reserved.remove(&id);
        let (vm, tier, generation) = match result {
            Ok(v) => v,
            Err(e) => {
                drop(st);
                return Err(self.restore_failed(&template, e));
            }
        };
        let acquire_ms = start.elapsed().as_secs_f64() * 1e3;
        self.shared.counters.acquires[tier as usize].fetch_add(1, Ordering::Relaxed);
        let paths = self.shared.vm_paths(vm.name());
        let info = SandboxInfo {
            id: id.clone(),
            template: req.template,
            generation,
            tier,
            vsock_uds: paths.vsock,
            control: vm.socket().to_path_buf(),
            debug_log: paths.log,
            pid: vm.pid(),
            acquire_ms,
            state: SandboxState::Running,
            expires_at: req.ttl.map(|t| now_s() + t.as_secs()),
            labels: req.labels,
        };
        if st.stopping {
            drop(st);
            let _ = self.shared.reap.send(Reap::Vm(vm));
            return Err(PoolError::Conflict("the pool is shutting down".into()));
        }
        st.sandboxes.insert(
            id,
            Leased {
                info: info.clone(),
                vm: LeasedVm::Owned(vm),
                deadline: req.ttl.map(|t| Instant::now() + t),
            },
        );
        Ok(info)
    }

    /// Turns a pooled VM (or, with none, a shell made now) into clone `id`: activates a warm
    /// clone, or restores into a shell. Returns the VM, the tier and the identity generation. A
    /// warm clone that fails to activate is dropped and the acquire made cold.
    fn make_clone(
        &self,
        t: &Template,
        id: &str,
        pooled: Option<(ShellProcess, Tier)>,
    ) -> Result<(ShellProcess, Tier, u64), ShellError> {
        let (mut vm, tier) = match pooled {
            Some((mut vm, Tier::Warm)) => match crate::warm::activate(vm.client(), id) {
                Ok(generation) => return Ok((vm, Tier::Warm, generation)),
                Err(e) => {
                    tracing::warn!("activating warm clone {}: {e}; serving cold", vm.name());
                    let _ = self.shared.reap.send(Reap::Vm(vm));
                    (self.shared.spawn_shell(t)?, Tier::Cold)
                }
            },
            Some((vm, tier)) => (vm, tier),
            None => (self.shared.spawn_shell(t)?, Tier::Cold),
        };
        match self.shared.restore(&mut vm, t, id, false) {
            Ok(()) => {
                let generation = vm.status().ok().and_then(|s| s.generation).unwrap_or(0);
                Ok((vm, tier, generation))
            }
            Err(e) => {
                let _ = self.shared.reap.send(Reap::Vm(vm));
                Err(e)
            }
        }
    }

    /// After a failed restore: checks the template and marks it broken if its snapshot is.
    fn restore_failed(&self, t: &Template, e: ShellError) -> PoolError {
        match t.check() {
            Err(broken) => {
                let reason = broken.to_string();
                let mut st = self.shared.lock();
                if let Some(entry) = st.templates.get_mut(&t.meta.name) {
                    entry.info.status = TemplateStatus::Broken(reason.clone());
                    let vms: Vec<_> = entry.shells.drain(..).chain(entry.warm.drain(..)).collect();
                    drop(st);
                    for vm in vms {
                        let _ = self.shared.reap.send(Reap::Vm(vm));
                    }
                }
                tracing::error!("template {} is broken: {reason}", t.meta.name);
                PoolError::Broken {
                    name: t.meta.name.clone(),
                    reason,
                }
            }
            Ok(()) => PoolError::Vm(e),
        }
    }

    /// Every leased sandbox.
    pub fn sandboxes(&self) -> Vec<SandboxInfo> {
        let st = self.shared.lock();
        st.sandboxes.values().map(|l| l.info.clone()).collect()
    }

    /// One leased sandbox.
    pub fn sandbox(&self, id: &str) -> Result<SandboxInfo, PoolError> {
        let st = self.shared.lock();
        st.sandboxes
            .get(id)
            .map(|l| l.info.clone())
            .ok_or_else(|| not_found_sandbox(id))
    }

    /// Ends a sandbox: it is unlisted at once and its VMM shut down in the background.
    pub fn release(&self, id: &str) -> Result<(), PoolError> {
        let mut st = self.shared.lock();
        let l = st
            .sandboxes
            .remove(id)
            .ok_or_else(|| not_found_sandbox(id))?;
        drop(st);
        self.shared.reap_leased(l);
        Ok(())
    }

    /// Takes over a sandbox a previous pool left running (see [`Pool::shutdown`]): kept if its
    /// VMM is alive and answers `status` on its control socket, else its files are removed.
    /// Returns whether it was adopted.
    pub fn adopt(&self, info: SandboxInfo) -> bool {
        let alive = pid_alive(info.pid)
            && ControlClient::connect(&info.control, Duration::from_millis(500))
                .and_then(|mut c| {
                    c.set_timeout(Duration::from_secs(1))?;
                    c.status()
                })
                .is_ok();
        let mut st = self.shared.lock();
        if !alive
            || !st.templates.contains_key(&info.template)
            || st.sandboxes.contains_key(&info.id)
        {
            drop(st);
            let _ = self.shared.reap.send(Reap::Files(info_files(&info)));
            return false;
        }
        let deadline = info
            .expires_at
            .map(|t| Instant::now() + Duration::from_secs(t.saturating_sub(now_s())));
        st.sandboxes.insert(
            info.id.clone(),
            Leased {
                vm: LeasedVm::Adopted { pid: info.pid },
                info,
                deadline,
            },
        );
        true
    }

    /// Stops the pool: no more refills or acquires, pooled VMs are shut down. Leased sandboxes
    /// are left running and returned (to be recorded and [`Pool::adopt`]ed by the next pool)
    /// when `keep_leased`, else shut down too.
    /// Later calls return nothing.
    pub fn shutdown(&self, keep_leased: bool) -> Vec<SandboxInfo> {
        let Some(reaper) = self.reaper.lock().unwrap_or_else(|p| p.into_inner()).take() else {
            return Vec::new();
        };
        let mut st = self.shared.lock();
        st.stopping = true;
        let templates = std::mem::take(&mut st.templates);
        let sandboxes = std::mem::take(&mut st.sandboxes);
        drop(st);
        self.shared.wake.notify_all();
        let threads = std::mem::take(&mut *self.threads.lock().unwrap_or_else(|p| p.into_inner()));
        for t in threads {
            let _ = t.join();
        }
        let mut kept = Vec::new();
        for e in templates.into_values() {
            for vm in e.shells.into_iter().chain(e.warm) {
                let _ = self.shared.reap.send(Reap::Vm(vm));
            }
        }
        for l in sandboxes.into_values() {
            if keep_leased && l.info.state == SandboxState::Running {
                if let LeasedVm::Owned(vm) = l.vm {
                    vm.detach();
                }
                kept.push(l.info);
            } else {
                self.shared.reap_leased(l);
            }
        }
        // Every other sender is done: the reaper drains what was queued before this.
        let _ = self.shared.reap.send(Reap::Stop);
        let _ = reaper.join();
        kept
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        self.shutdown(false);
    }
}

fn not_found_sandbox(id: &str) -> PoolError {
    PoolError::NotFound(format!(
        "no sandbox {id:?}: list them with GET /v1/sandboxes"
    ))
}

/// Whether `pid` runs: it exists and is not a zombie (a VMM whose parent, an earlier daemon,
/// is gone is reaped by init, which may take its time).
fn pid_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the parenthesized command name.
        Ok(stat) => {
            pid > 0
                && stat.rsplit_once(')').is_some_and(|(_, rest)| {
                    !matches!(rest.trim_start().chars().next(), Some('Z' | 'X'))
                })
        }
        Err(_) => false,
    }
}

fn info_files(info: &SandboxInfo) -> Vec<PathBuf> {
    vec![
        info.control.clone(),
        info.vsock_uds.clone(),
        info.debug_log.clone(),
    ]
}

struct VmPaths {
    log: PathBuf,
    vsock: PathBuf,
}

impl Entry {
    fn new(name: &str, t: Result<Template, TemplateError>) -> Self {
        let (template, status) = match t {
            Ok(t) => (Some(t), TemplateStatus::Ready),
            Err(e) => (None, TemplateStatus::Broken(e.to_string())),
        };
        let info = TemplateInfo {
            name: name.into(),
            spec: template.as_ref().map(|t| t.meta.spec.clone()),
            status,
            build_s: template.as_ref().map(|t| t.meta.build_s).unwrap_or(0.0),
            sandboxes: 0,
        };
        Self {
            template,
            info,
            targets: PoolTargets::default(),
            shells: Vec::new(),
            warm: Vec::new(),
            starting_shells: 0,
            starting_warm: 0,
            failures: 0,
            retry_at: Instant::now(),
        }
    }
}

impl State {
    fn entry(&self, name: &str) -> Result<&Entry, PoolError> {
        names::validate("template", name)?;
        self.templates
            .get(name)
            .ok_or_else(|| not_found_template(name))
    }

    fn entry_mut(&mut self, name: &str) -> Result<&mut Entry, PoolError> {
        names::validate("template", name)?;
        self.templates
            .get_mut(name)
            .ok_or_else(|| not_found_template(name))
    }

    fn template_info(&self, e: &Entry) -> TemplateInfo {
        let mut info = e.info.clone();
        info.sandboxes = self
            .sandboxes
            .values()
            .filter(|l| l.info.template == info.name)
            .count();
        info
    }

    fn pool_info(&self, name: &str) -> PoolInfo {
        let e = &self.templates[name];
        PoolInfo {
            template: name.into(),
            targets: e.targets,
            warm: e.warm.len(),
            shells: e.shells.len(),
            leased: self
                .sandboxes
                .values()
                .filter(|l| l.info.template == name)
                .count(),
            refill_failures: e.failures,
        }
    }
}

fn not_found_template(name: &str) -> PoolError {
    PoolError::NotFound(format!(
        "no template {name:?}: build it first (POST /v1/templates) or list them (GET /v1/templates)"
    ))
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn vm_paths(&self, vm: &str) -> VmPaths {
        VmPaths {
            log: self.cfg.run_dir.join(format!("{vm}.log")),
            vsock: self.cfg.run_dir.join(format!("{vm}.vsock")),
        }
    }

    fn spawn_shell(&self, t: &Template) -> Result<ShellProcess, ShellError> {
        let spec = ShellSpec {
            vmm: self.cfg.vmm.clone(),
            mem_mib: t.meta.spec.mem_mib,
            vcpus: t.meta.spec.vcpus,
            run_dir: self.cfg.run_dir.clone(),
        };
        ShellProcess::spawn(&spec, &format!("vm-{}", random_hex()))
    }

    /// Restores template `t` into shell `vm` as clone `id` (cow, debug log and vsock socket
    /// next to its control socket); `warm` leaves it paused, its identity written at activation.
    fn restore(
        &self,
        vm: &mut ShellProcess,
        t: &Template,
        id: &str,
        warm: bool,
    ) -> Result<(), ShellError> {
        let paths = self.vm_paths(vm.name());
        let mut opts = RestoreOptions::new(&t.tmpfs, MemoryMode::Cow);
        opts.clone_id = id.into();
        opts.serial = SerialOutput::None;
        opts.debug_log = Some(paths.log.to_string_lossy().into_owned());
        opts.vsock_uds = Some(paths.vsock);
        if warm {
            crate::warm::set_paused(&mut opts);
        }
        vm.restore(&opts).map(|_| ())
    }

    /// A pooled VM of tier `warm`/shell for `t`.
    fn make_pooled(&self, t: &Template, warm: bool) -> Result<ShellProcess, ShellError> {
        let mut vm = self.spawn_shell(t)?;
        if warm {
            self.restore(&mut vm, t, "", true)?;
        }
        Ok(vm)
    }

    fn reap_leased(&self, l: Leased) {
        let job = match l.vm {
            LeasedVm::Owned(vm) => Reap::Vm(vm),
            LeasedVm::Adopted { .. } => Reap::Adopted(l.info),
            LeasedVm::Gone => Reap::Files(info_files(&l.info)),
        };
        let _ = self.reap.send(job);
    }

    fn save_targets(&self) {
        let st = self.lock();
        let targets: BTreeMap<&String, PoolTargets> =
            st.templates.iter().map(|(n, e)| (n, e.targets)).collect();
        let json = serde_json::to_vec_pretty(&targets).expect("targets serialize");
        drop(st);
        let path = self.cfg.state_dir.join("pools.json");
        let tmp = self.cfg.state_dir.join(".pools.json.tmp");
        if let Err(e) = std::fs::write(&tmp, json).and_then(|()| std::fs::rename(&tmp, &path)) {
            tracing::warn!("saving {}: {e}", path.display());
        }
    }
}

/// A refill thread: starts the VM the most-lacking pool needs (warm before shells on a tie),
/// one at a time, with an exponential backoff per template after failures.
fn refill_loop(s: &Shared) {
    let mut st = s.lock();
    loop {
        if st.stopping {
            return;
        }
        let now = Instant::now();
        let job = st
            .templates
            .values_mut()
            .filter(|e| e.info.status == TemplateStatus::Ready && e.retry_at <= now)
            .flat_map(|e| {
                let warm = e
                    .targets
                    .warm
                    .saturating_sub(e.warm.len() + e.starting_warm);
                let shells = e
                    .targets
                    .shells
                    .saturating_sub(e.shells.len() + e.starting_shells);
                [
                    (warm, 1u8, e.info.name.clone(), true),
                    (shells, 0, e.info.name.clone(), false),
                ]
            })
            .filter(|j| j.0 > 0)
            .max_by_key(|j| (j.0, j.1));
        let Some((_, _, name, warm)) = job else {
            st = s
                .wake
                .wait_timeout(st, MONITOR_PERIOD)
                .unwrap_or_else(|p| p.into_inner())
                .0;
            continue;
        };
        let e = st.templates.get_mut(&name).expect("just found");
        if warm {
            e.starting_warm += 1;
        } else {
            e.starting_shells += 1;
        }
        let t = e.template.clone().expect("a ready template has files");
        drop(st);
        let made = s.make_pooled(&t, warm);
        st = s.lock();
        let stopping = st.stopping;
        let Some(e) = st.templates.get_mut(&name) else {
            if let Ok(vm) = made {
                let _ = s.reap.send(Reap::Vm(vm));
            }
            continue;
        };
        let (list, target) = if warm {
            e.starting_warm -= 1;
            (&mut e.warm, e.targets.warm)
        } else {
            e.starting_shells -= 1;
            (&mut e.shells, e.targets.shells)
        };
        match made {
            Ok(vm) if !stopping && list.len() < target => {
                list.push(vm);
                e.failures = 0;
                s.counters.refilled.fetch_add(1, Ordering::Relaxed);
            }
            Ok(vm) => {
                let _ = s.reap.send(Reap::Vm(vm));
            }
            Err(err) => {
                e.failures += 1;
                let backoff = Duration::from_millis(100)
                    .saturating_mul(1 << e.failures.min(10))
                    .min(MAX_BACKOFF);
                e.retry_at = Instant::now() + backoff;
                s.counters.refill_failures.fetch_add(1, Ordering::Relaxed);
                tracing::warn!("refilling {name}: {err} (retry in {backoff:?})");
            }
        }
    }
}

/// The monitor: notices dead VMMs and expired TTLs every [`MONITOR_PERIOD`].
fn monitor_loop(s: &Shared) {
    loop {
        let mut st = s.lock();
        if st.stopping {
            return;
        }
        let mut died = 0;
        for e in st.templates.values_mut() {
            for list in [&mut e.shells, &mut e.warm] {
                let before = list.len();
                list.retain_mut(|vm| vm.try_wait().is_none());
                died += before - list.len();
            }
        }
        let now = Instant::now();
        let mut expired = Vec::new();
        for (id, l) in st.sandboxes.iter_mut() {
            if l.deadline.is_some_and(|d| d <= now) {
                expired.push(id.clone());
                continue;
            }
            let dead = match &mut l.vm {
                LeasedVm::Owned(vm) => vm.try_wait().is_some(),
                LeasedVm::Adopted { pid } => !pid_alive(*pid),
                LeasedVm::Gone => false,
            };
            if dead {
                died += 1;
                l.info.state = SandboxState::Dead;
                tracing::warn!("sandbox {id}: its VMM (pid {}) died", l.info.pid);
                // An exited VMM: dropping the handle waits nothing and removes its socket.
                let _ = s.reap.send(Reap::Files(info_files(&l.info)));
                l.vm = LeasedVm::Gone;
            }
        }
        for id in expired {
            if let Some(l) = st.sandboxes.remove(&id) {
                s.counters.expired.fetch_add(1, Ordering::Relaxed);
                tracing::info!("sandbox {id}: TTL expired");
                s.reap_leased(l);
            }
        }
        drop(st);
        if died > 0 {
            s.counters
                .vm_deaths
                .fetch_add(died as u64, Ordering::Relaxed);
            s.wake.notify_all();
        }
        std::thread::sleep(MONITOR_PERIOD);
    }
}

/// The reaper: shuts VMs down and removes their files, off every request path.
fn reaper_loop(s: &Shared, rx: Receiver<Reap>) {
    let remove = |files: &[PathBuf]| {
        for f in files {
            let _ = std::fs::remove_file(f);
        }
    };
    while let Ok(job) = rx.recv() {
        match job {
            Reap::Vm(mut vm) => {
                let paths = s.vm_paths(vm.name());
                let _ = vm.client().set_timeout(REAP_TIMEOUT);
                let _ = vm.shutdown();
                remove(&[paths.log, paths.vsock]);
            }
            Reap::Adopted(info) => {
                if let Ok(mut c) = ControlClient::connect(&info.control, REAP_TIMEOUT) {
                    let _ = c.set_timeout(REAP_TIMEOUT);
                    let _ = c.shutdown();
                }
                let deadline = Instant::now() + REAP_TIMEOUT;
                while pid_alive(info.pid) && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(5));
                }
                remove(&info_files(&info));
            }
            Reap::Files(files) => remove(&files),
            Reap::Stop => return,
        }
    }
}
