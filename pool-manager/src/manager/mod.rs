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

mod state;
mod types;
mod workers;

pub(crate) use state::pid_alive;
use state::*;
pub use types::{AcquireRequest, ErrorClass, PoolConfig, PoolCounters, PoolError};
use workers::*;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vmm_api::ControlClient;

use crate::names;
use crate::network::{PoolNetwork, SandboxNet};
use crate::sandbox::{
    BuildProgress, PoolInfo, PoolTargets, SandboxInfo, SandboxState, TemplateInfo, TemplateStatus,
    Tier,
};
use crate::shell::{ShellError, ShellProcess};
use crate::template::{self, Template, TemplateSpec};

/// How often the monitor looks at every VMM and TTL.
pub const MONITOR_PERIOD: Duration = Duration::from_millis(100);
/// Longest refill backoff.
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// How long a reaped VMM may take to answer `shutdown`.
const REAP_TIMEOUT: Duration = Duration::from_secs(2);

/// Templates, their pools and the leased sandboxes; see the module docs.
pub struct Pool {
    shared: Arc<Shared>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    reaper: Mutex<Option<JoinHandle<()>>>,
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
            record: Mutex::new(None),
            leases: Default::default(),
            making: Default::default(),
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
            if st.templates.contains_key(name) || st.building.contains_key(name) {
                return Err(PoolError::Conflict(format!(
                    "template {name} already exists: delete it first or pick another name"
                )));
            }
            st.building.insert(
                name.to_string(),
                (template::BuildStep::Booting, Instant::now()),
            );
        }
        let cfg = &self.shared.cfg;
        let progress = |step: template::BuildStep| {
            tracing::info!(
                "template {name}: [{}/{}] {}",
                step.number(),
                template::BuildStep::COUNT,
                step.label()
            );
            if let Some(b) = self.shared.lock().building.get_mut(name) {
                b.0 = step;
            }
        };
        let built = template::build(
            &cfg.vmm,
            name,
            spec,
            &cfg.state_dir.join("templates"),
            &cfg.tmpfs_dir,
            &cfg.run_dir,
            cfg.jail.as_ref(),
            &progress,
        );
        let verified = built.map_err(PoolError::from).and_then(|t| {
            progress(template::BuildStep::FirstClone);
            match self.first_clone(&t) {
                Ok(()) => Ok(t),
                Err(e) => {
                    t.remove();
                    Err(e)
                }
            }
        });
        let mut st = self.shared.lock();
        st.building.remove(name);
        let t = verified?;
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

    /// Restores one clone of a freshly built template and runs it briefly: a template that
    /// cannot be cloned is never published, and a `uffd` template gets its working set, recorded
    /// by this clone over its recording window and prefetched by every later clone.
    fn first_clone(&self, t: &Template) -> Result<(), PoolError> {
        let failed = |what: String| {
            PoolError::Template(template::TemplateError::Guest(format!(
                "the first clone of template {} {what}: the template is not published",
                t.meta.name
            )))
        };
        let mut vm = self
            .shared
            .spawn_vm(t)
            .map_err(|e| failed(format!("has no VM: {e}")))?;
        let ran = self
            .shared
            .restore(&mut vm, t, "first-clone", false, None)
            .map_err(|e| failed(format!("failed to restore: {e}")))
            .and_then(|_| {
                let window = match t.meta.spec.mem_mode {
                    vmm_api::MemoryMode::Uffd => {
                        Duration::from_millis(vmm_api::DEFAULT_RECORD_MS + 100)
                    }
                    _ => Duration::from_millis(20),
                };
                std::thread::sleep(window);
                let status = vm
                    .status()
                    .map_err(|e| failed(format!("stopped answering: {e}")))?;
                if status.state != vmm_api::VmState::Running {
                    return Err(failed(format!("is {:?}, not running", status.state)));
                }
                Ok(())
            });
        let paths = self.shared.vm_paths(&vm);
        let _ = vm.shutdown();
        let _ = std::fs::remove_file(paths.log);
        let _ = std::fs::remove_file(paths.vsock);
        ran?;
        if t.meta.spec.mem_mode == vmm_api::MemoryMode::Uffd
            && !t.tmpfs.join("workingset.bin").exists()
        {
            tracing::warn!(
                "template {}: its first uffd clone published no working set; clones fault every page in",
                t.meta.name
            );
        }
        Ok(())
    }

    /// Where the build of template `name` is, while it runs.
    pub fn build_progress(&self, name: &str) -> Option<BuildProgress> {
        let st = self.shared.lock();
        let (step, started) = st.building.get(name)?;
        Some(BuildProgress {
            name: name.to_string(),
            status: "building".into(),
            step: *step,
            step_no: step.number(),
            steps: template::BuildStep::COUNT,
            label: step.label().into(),
            elapsed_s: started.elapsed().as_secs_f64(),
        })
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
        if let Some(n) = &targets.network {
            n.validate()?;
            if let Some(why) = crate::network::unavailable(n.egress) {
                return Err(PoolError::Invalid(format!(
                    "pool network: this host cannot give sandboxes networks: {why}"
                )));
            }
        }
        let mut st = self.shared.lock();
        let e = st.entry_mut(name)?;
        if targets.network.is_some() && !e.info.spec.as_ref().is_some_and(|s| s.net) {
            return Err(PoolError::Invalid(format!(
                "template {name} has no network device: build it with net: true to give its sandboxes networks"
            )));
        }
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
        let (template, pooled, network) = {
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
                (None, _) => {
                    return Err(PoolError::Broken {
                        name: req.template.clone(),
                        reason: "its files are missing".into(),
                    })
                }
            };
            let network = match (req.network, e.targets.network) {
                (Some(false), _) => None,
                (_, Some(n)) => Some(n),
                (None, None) => None,
                (Some(true), None) => {
                    return Err(PoolError::Invalid(format!(
                        "template {}'s pool has no network: set one (PUT /v1/pools/{} with \"network\") or acquire without",
                        req.template, req.template
                    )))
                }
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
            (t, pooled, network)
        };
        let result = self.make_clone(&template, &id, pooled, network);
        // Refill after the clone is served: the refill's VM creation must not compete with the
        // acquire for the cores.
        self.shared.wake.notify_all();
        let mut st = self.shared.lock();
        st.last_acquire = Some(Instant::now());
        st.reserved.remove(&id);
        let (mut vm, tier, generation) = match result {
            Ok(v) => v,
            Err(e) => {
                drop(st);
                return Err(self.restore_failed(&template, e));
            }
        };
        let acquire_ms = start.elapsed().as_secs_f64() * 1e3;
        self.shared.counters.acquires[tier as usize].fetch_add(1, Ordering::Relaxed);
        let paths = self.shared.vm_paths(&vm);
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
            network: vm.net_mut().and_then(|n| n.info().cloned()),
            tap: vm.net_mut().map(|n| n.tap().to_string()),
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
    /// clone, or restores into a shell; with `network`, the clone gets its sandbox network
    /// (a warm clone usually has it already and gets only its address, at activation). Returns
    /// the VM, the tier and the identity generation. A warm clone that fails to activate is
    /// dropped and the acquire made cold.
    fn make_clone(
        &self,
        t: &Template,
        id: &str,
        pooled: Option<(ShellProcess, Tier)>,
        network: Option<PoolNetwork>,
    ) -> Result<(ShellProcess, Tier, u64), ShellError> {
        if let Some((vm, _)) = &pooled {
            // Made by the refill at a lower priority: the lease runs at normal priority.
            if let Err(e) = crate::priority::set_process(vm.pid(), 0) {
                tracing::warn!("raising {} to normal priority: {e}", vm.name());
            }
        }
        let (mut vm, tier) = match pooled {
            Some((mut vm, Tier::Warm)) => {
                let activated = warm_network(&mut vm, network).and_then(|ip| {
                    crate::warm::activate(vm.client(), id, ip).map_err(|source| {
                        ShellError::Control {
                            name: vm.name().into(),
                            source,
                        }
                    })
                });
                match activated {
                    Ok(generation) => return Ok((vm, Tier::Warm, generation)),
                    Err(e) => {
                        tracing::warn!("activating warm clone {}: {e}; serving cold", vm.name());
                        let _ = self.shared.reap.send(Reap::Vm(vm));
                        (self.shared.spawn_vm(t)?, Tier::Cold)
                    }
                }
            }
            Some((vm, tier)) => (vm, tier),
            None => (self.shared.spawn_vm(t)?, Tier::Cold),
        };
        let name = vm.name().to_string();
        let restored = (|| {
            let ip = match (network, vm.net_mut()) {
                (Some(n), Some(net)) => Some(net.reserve(&n)?),
                _ => None,
            };
            let generation = self.shared.restore(&mut vm, t, id, false, ip)?;
            if let (Some(_), Some(net)) = (ip, vm.net_mut()) {
                net.attach(&name)?;
            }
            Ok(generation)
        })();
        match restored {
            Ok(generation) => Ok((vm, tier, generation)),
            Err(e) => {
                let _ = self.shared.reap.send(Reap::Vm(vm));
                Err(e)
            }
        }
    }

    /// How many address blocks sandbox networks hold now (pooled warm clones' and leased
    /// sandboxes'): 0 once every networked VM is gone.
    pub fn network_leases(&self) -> usize {
        self.shared
            .leases
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .len()
    }

    /// After a failed restore: checks the template and marks it broken if its snapshot is.
    fn restore_failed(&self, t: &Template, e: ShellError) -> PoolError {
        if let ShellError::Net(e) = e {
            return PoolError::Net(e);
        }
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
        let net = info
            .network
            .clone()
            .map(|n| SandboxNet::adopt(n, self.shared.leases.clone()));
        let mut st = self.shared.lock();
        if !alive
            || !st.templates.contains_key(&info.template)
            || st.sandboxes.contains_key(&info.id)
        {
            drop(st);
            // Its network goes (a dead VMM's, or one we cannot track).
            drop(net);
            let _ = self.shared.reap.send(Reap::Files(info_files(&info)));
            return false;
        }
        let deadline = info
            .expires_at
            .map(|t| Instant::now() + Duration::from_secs(t.saturating_sub(now_s())));
        st.sandboxes.insert(
            info.id.clone(),
            Leased {
                vm: LeasedVm::Adopted { pid: info.pid, net },
                info,
                deadline,
            },
        );
        true
    }

    /// Keeps the leased sandboxes recorded in `path` (JSON list of [`SandboxInfo`], replaced
    /// atomically by the monitor within [`MONITOR_PERIOD`] of a change), so that a daemon that
    /// is killed can be followed by one that [`Pool::adopt`]s them.
    pub fn record_to(&self, path: PathBuf) {
        *self.shared.record.lock().unwrap_or_else(|p| p.into_inner()) = Some(path);
    }

    /// Ends what a previous pool left in the run dir and this one does not own (a daemon that
    /// was killed leaves its pooled VMs behind): every VMM whose command line controls a
    /// `<run_dir>/vm-*.sock` and that is neither this process's child nor an adopted sandbox gets
    /// SIGTERM, `vm-*` files that no live VMM claims (and `build-*` jail directories, unless
    /// this pool is building) are removed, and so are the sandbox networks
    /// (namespaces `runv-vm-*`, TAPs, veths, nftables rules) of VMs that no live VMM on the host
    /// runs ([`crate::network::orphans`]). Call it after [`Pool::adopt`]ing the recorded
    /// sandboxes; returns how many VMMs were ended.
    pub fn clean_orphans(&self) -> usize {
        let run = &self.shared.cfg.run_dir;
        // Listed first, then the VMs this pool is spawning, then the live VMMs: a file or
        // network object made later belongs to a VM spawned later, whose VMM runs by the time
        // the processes are read; one made earlier belongs to a VM in `making` or to a VMM that
        // shows up in the process list (or to none: an orphan).
        let entries: Vec<PathBuf> = std::fs::read_dir(run)
            .map(|d| d.flatten().map(|e| e.path()).collect())
            .unwrap_or_default();
        let nets = crate::network::orphans::find();
        let making = self
            .shared
            .making
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let adopted: std::collections::HashSet<u32> = {
            let st = self.shared.lock();
            st.sandboxes
                .values()
                .filter(|l| matches!(l.vm, LeasedVm::Adopted { .. }))
                .map(|l| l.info.pid)
                .collect()
        };
        let me = std::process::id();
        let mut claimed = std::collections::HashSet::new();
        let mut ended = 0;
        let mut ended_pids = std::collections::HashSet::new();
        let mut ended_vms = std::collections::HashSet::new();
        for (pid, ppid, socket) in vmm_processes(run) {
            if ppid == me || adopted.contains(&pid) {
                // The VMM's name: its socket's file name (`<run>/vm-X.sock`, or
                // `<run>/vm-X/vm-X.sock` when jailed).
                if let Some(n) = socket.file_stem().and_then(|n| n.to_str()) {
                    claimed.insert(n.to_owned());
                }
                continue;
            }
            // SAFETY: kill(2) with SIGTERM on a VMM serving a socket in our run dir that no
            // live pool owns; SIGTERM ends a VMM cleanly.
            unsafe { libc::kill(pid as i32, libc::SIGTERM) };
            tracing::info!(
                "ended VMM {pid} ({}) left by an earlier pool",
                socket.display()
            );
            ended += 1;
            ended_pids.insert(pid);
            if let Some(vm) = socket.file_stem() {
                ended_vms.insert(vm.to_string_lossy().into_owned());
            }
        }
        let mut live = crate::network::orphans::live_vms(&ended_pids);
        // VMs whose network a live pool is making: their VMMs do not run yet.
        live.extend(crate::network::claimed());
        crate::network::orphans::remove(&nets, &live, &ended_vms);
        let mut stale = Vec::new();
        for path in entries {
            let Some(name) = path.file_name().map(|n| n.to_string_lossy().into_owned()) else {
                continue;
            };
            // A template build's jail directory or root (`build-<hex>[.root]`), unless this
            // pool is building.
            if name.starts_with("build-") {
                if self.shared.lock().building.is_empty() {
                    stale.push(path);
                }
                continue;
            }
            let Some(vm) = name.strip_prefix("vm-").and_then(|n| n.split('.').next()) else {
                continue;
            };
            let vm = format!("vm-{vm}");
            if !claimed.contains(&vm) && !making.contains(&vm) {
                stale.push(path);
            }
        }
        let _ = self.shared.reap.send(Reap::Files(stale));
        ended
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

/// A warm clone's network at acquire: set up (if the pool's network came after it was pooled)
/// and its guest address returned with `network`; taken down without.
fn warm_network(
    vm: &mut ShellProcess,
    network: Option<PoolNetwork>,
) -> Result<Option<std::net::Ipv4Addr>, ShellError> {
    let name = vm.name().to_string();
    match (network, vm.net_mut()) {
        (Some(n), Some(net)) => {
            if net.info().is_none() {
                net.reserve(&n)?;
                net.attach(&name)?;
            }
            Ok(net.info().map(|i| i.ipv4))
        }
        (None, Some(net)) => {
            net.detach_keep_tap()?;
            Ok(None)
        }
        (Some(_), None) => Err(ShellError::Net(crate::network::NetError::State(
            "the warm clone has no network device".into(),
        ))),
        (None, None) => Ok(None),
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        self.shutdown(false);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clean_orphans_keeps_the_files_of_a_vm_being_spawned_and_removes_an_orphans() {
        let dir = tempfile::tempdir().unwrap();
        let pool = Pool::open(PoolConfig {
            vmm: PathBuf::from("/nonexistent/runv-vmm"),
            state_dir: dir.path().join("state"),
            run_dir: dir.path().join("run"),
            tmpfs_dir: dir.path().join("shm"),
            refill_workers: 1,
            jail: None,
        })
        .unwrap();
        let run = dir.path().join("run");
        // What a jailed shell has before its VMM runs (`ShellProcess::spawn` makes its
        // directory first), and what a VM whose VMM is gone leaves.
        let (making, orphan) = (run.join("vm-00000000000a"), run.join("vm-00000000000b"));
        std::fs::create_dir_all(&making).unwrap();
        std::fs::create_dir_all(&orphan).unwrap();
        std::fs::write(run.join("vm-00000000000b.log"), b"").unwrap();
        pool.shared
            .making
            .lock()
            .unwrap()
            .insert("vm-00000000000a".into());
        assert_eq!(pool.clean_orphans(), 0);
        pool.shutdown(false); // the reaper has removed what it was sent
        assert!(
            making.exists(),
            "the directory of a VM being spawned was removed"
        );
        assert!(!orphan.exists() && !run.join("vm-00000000000b.log").exists());
    }
}
