//! The pool's shared state under its one mutex, and the operations on it that the API and
//! the worker threads share.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use crossbeam_channel::Sender;
use vmm_api::{RestoreOptions, SerialOutput};

use crate::names;
use crate::network::{Leases, PoolNetwork, SandboxNet};
use crate::sandbox::{PoolInfo, PoolTargets, SandboxInfo, TemplateInfo, TemplateStatus};
use crate::shell::{ShellError, ShellProcess, ShellSpec};
use crate::template::{Template, TemplateError};

use super::types::{PoolConfig, PoolCounters, PoolError};

/// The VMM behind a leased sandbox.
pub(super) enum LeasedVm {
    Owned(ShellProcess),
    Adopted { pid: u32, net: Option<SandboxNet> },
    Gone,
}

/// A leased sandbox.
pub(super) struct Leased {
    pub(super) info: SandboxInfo,
    pub(super) vm: LeasedVm,
    pub(super) deadline: Option<Instant>,
}

/// A template and its pools.
pub(super) struct Entry {
    pub(super) template: Option<Template>,
    pub(super) info: TemplateInfo,
    pub(super) targets: PoolTargets,
    pub(super) shells: Vec<ShellProcess>,
    pub(super) warm: Vec<ShellProcess>,
    pub(super) starting_shells: usize,
    pub(super) starting_warm: usize,
    pub(super) failures: u32,
    pub(super) retry_at: Instant,
}

/// Everything under the pool's mutex.
#[derive(Default)]
pub(super) struct State {
    pub(super) templates: BTreeMap<String, Entry>,
    pub(super) sandboxes: BTreeMap<String, Leased>,
    /// Ids of acquires in flight, with their template.
    pub(super) reserved: BTreeMap<String, String>,
    /// Templates being built: the step each is at and when it started.
    pub(super) building: BTreeMap<String, (crate::template::BuildStep, Instant)>,
    pub(super) stopping: bool,
    /// When the last acquire was served (the refill waits [`super::workers::REFILL_QUIET`]
    /// after it while the template still has a ready VM).
    pub(super) last_acquire: Option<Instant>,
}

/// Work for the reaper thread.
pub(super) enum Reap {
    Vm(ShellProcess),
    Adopted(SandboxInfo, Option<SandboxNet>),
    Files(Vec<PathBuf>),
    Stop,
}

/// What the API and the threads share.
pub(super) struct Shared {
    pub(super) cfg: PoolConfig,
    pub(super) state: Mutex<State>,
    pub(super) wake: Condvar,
    pub(super) reap: Sender<Reap>,
    pub(super) counters: PoolCounters,
    /// Where the monitor keeps the leased sandboxes recorded ([`super::Pool::record_to`]).
    pub(super) record: Mutex<Option<PathBuf>>,
    /// Address blocks leased to sandbox networks (pooled and leased VMs).
    pub(super) leases: Arc<Mutex<Leases>>,
    /// Names of the VMs being spawned: from before their directory exists until their VMM runs
    /// as this process's child, where [`super::Pool::clean_orphans`] would not see them.
    pub(super) making: Mutex<std::collections::HashSet<String>>,
}

pub(super) fn now_s() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// 12 random hex digits for VM and sandbox names.
pub(super) fn random_hex() -> String {
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

pub(super) fn not_found_sandbox(id: &str) -> PoolError {
    PoolError::NotFound(format!(
        "no sandbox {id:?}: list them with GET /v1/sandboxes"
    ))
}

/// Whether `pid` runs: it exists and is not a zombie (a VMM whose parent, an earlier daemon,
/// is gone is reaped by init, which may take its time).
pub(crate) fn pid_alive(pid: u32) -> bool {
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

pub(super) fn info_files(info: &SandboxInfo) -> Vec<PathBuf> {
    vec![
        info.control.clone(),
        info.vsock_uds.clone(),
        info.debug_log.clone(),
    ]
}

pub(super) struct VmPaths {
    pub(super) log: PathBuf,
    pub(super) vsock: PathBuf,
}

impl Entry {
    pub(super) fn new(name: &str, t: Result<Template, TemplateError>) -> Self {
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
    pub(super) fn entry(&self, name: &str) -> Result<&Entry, PoolError> {
        names::validate("template", name)?;
        self.templates
            .get(name)
            .ok_or_else(|| not_found_template(name))
    }

    pub(super) fn entry_mut(&mut self, name: &str) -> Result<&mut Entry, PoolError> {
        names::validate("template", name)?;
        self.templates
            .get_mut(name)
            .ok_or_else(|| not_found_template(name))
    }

    pub(super) fn template_info(&self, e: &Entry) -> TemplateInfo {
        let mut info = e.info.clone();
        info.sandboxes = self
            .sandboxes
            .values()
            .filter(|l| l.info.template == info.name)
            .count();
        info
    }

    pub(super) fn pool_info(&self, name: &str) -> PoolInfo {
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

/// Copies `from` to a new file `to` (mode 0600) owned by `uid:gid`.
fn copy_owned(from: &Path, to: &Path, uid: u32, gid: u32) -> Result<(), ShellError> {
    let fail = |what: &str| {
        let what = format!("{what} {} (a disk slot's placeholder)", to.display());
        move |source| ShellError::Io { what, source }
    };
    std::fs::copy(from, to).map_err(fail(&format!("copying {} to", from.display())))?;
    std::os::unix::fs::chown(to, Some(uid), Some(gid)).map_err(fail("chown to the jail uid of"))?;
    std::fs::set_permissions(
        to,
        <std::fs::Permissions as std::os::unix::fs::PermissionsExt>::from_mode(0o600),
    )
    .map_err(fail("chmod 0600 of"))
}

pub(super) fn not_found_template(name: &str) -> PoolError {
    PoolError::NotFound(format!(
        "no template {name:?}: build it first (POST /v1/templates) or list them (GET /v1/templates)"
    ))
}

impl Shared {
    pub(super) fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(super) fn vm_paths(&self, vm: &ShellProcess) -> VmPaths {
        let (dir, name) = (vm.files_dir(), vm.name());
        VmPaths {
            log: dir.join(format!("{name}.log")),
            vsock: dir.join(format!("{name}.vsock")),
        }
    }

    pub(super) fn spawn_shell(&self, t: &Template) -> Result<ShellProcess, ShellError> {
        // Every VMM runs jailed where the pool has a jail: a uffd clone opens the jail's own
        // /dev/userfaultfd, a networked one gets its TAP lent into its namespace for the
        // restore, and disks reach a slot as descriptors (`ControlClient::attach_disk`).
        let jail = match self.cfg.jail.as_ref() {
            Some(j) => {
                let mut j = j.clone();
                // The jailed VMM reads the template as the pool gid; a uffd template without a
                // working set yet is bound read-write so the clone can publish the one it
                // records (into a sticky directory: it cannot touch the template's files).
                let record = crate::template::records_working_set(t);
                let granted = if record {
                    j.read_write.push(t.tmpfs.clone());
                    crate::template::grant_record(&t.tmpfs, j.gid)
                } else {
                    j.read_only.push(t.tmpfs.clone());
                    crate::template::grant_read(&t.tmpfs, j.gid)
                };
                granted.map_err(|source| ShellError::Io {
                    what: format!("letting jail gid {} read {}", j.gid, t.tmpfs.display()),
                    source,
                })?;
                Some(j)
            }
            None => None,
        };
        let spec = ShellSpec {
            vmm: self.cfg.vmm.clone(),
            mem_mib: t.meta.spec.mem_mib,
            vcpus: t.meta.spec.vcpus,
            run_dir: self.cfg.run_dir.clone(),
            jail,
        };
        let name = format!("vm-{}", random_hex());
        let making = || self.making.lock().unwrap_or_else(|p| p.into_inner());
        making().insert(name.clone());
        let spawned = ShellProcess::spawn(&spec, &name);
        making().remove(&name);
        spawned
    }

    /// Restores template `t` into shell `vm` as clone `id` (cow, debug log and vsock socket
    /// next to its control socket); `warm` leaves it paused, its identity written at activation.
    pub(super) fn restore(
        &self,
        vm: &mut ShellProcess,
        t: &Template,
        id: &str,
        warm: bool,
        ipv4: Option<std::net::Ipv4Addr>,
    ) -> Result<u64, ShellError> {
        let paths = self.vm_paths(vm);
        let mut opts = RestoreOptions::new(&t.tmpfs, t.meta.spec.mem_mode);
        // A jailed VMM opens its TAP by name in its own network namespace: the TAP is lent
        // there for the restore and taken back afterwards (the open TAP file follows it).
        let lent = if vm.is_jailed() && vm.net_mut().is_some() {
            let pid = vm.vmm_pid().ok_or_else(|| ShellError::Io {
                what: format!("lending TAP of {} to its jailed VMM", vm.name()),
                source: std::io::Error::other("its jail keeper has no child: the VMM has exited"),
            })?;
            if let Some(net) = vm.net_mut() {
                net.lend(pid)?;
            }
            Some(pid)
        } else {
            None
        };
        if let Some(net) = vm.net_mut() {
            opts.net = Some(vmm_api::NetConfig {
                tap: net.tap().into(),
                mac: None,
                ipv4,
            });
        }
        opts.clone_id = id.into();
        opts.serial = SerialOutput::None;
        opts.debug_log = Some(paths.log.to_string_lossy().into_owned());
        opts.vsock_uds = Some(paths.vsock);
        // The snapshot names the build directory's placeholders: point at the published ones,
        // or, jailed, at the VM's own copies (see `slot_placeholders`).
        opts.block = self.slot_placeholders(vm, t)?;
        if warm {
            crate::warm::set_paused(&mut opts);
        }
        let restored = vm.restore(&opts).map(|r| r.generation);
        if let (Some(pid), Some(net)) = (lent, vm.net_mut()) {
            // Back even after a failed restore: the pool tears it down in its own namespace.
            match (net.take_back(pid), &restored) {
                (Err(e), Ok(_)) => return Err(e.into()),
                (Err(e), Err(_)) => tracing::warn!("taking TAP {} back: {e}", net.tap()),
                (Ok(()), _) => {}
            }
        }
        restored
    }

    /// The placeholders a clone of `t` restores in its disk slots. Unjailed: the template's.
    /// Jailed: copies in the VM's own directory (bound read-write into its jail, removed with
    /// it), owned by the jail uid: the VMM opens a slot's placeholder read-write and must not
    /// write through it into a file every clone shares. Attached disks come as descriptors
    /// (`ControlClient::attach_disk`), so nothing else of the host's needs binding in.
    fn slot_placeholders(
        &self,
        vm: &ShellProcess,
        t: &Template,
    ) -> Result<Vec<vmm_api::BlockOverride>, ShellError> {
        let jail = self.cfg.jail.as_ref().filter(|_| vm.is_jailed());
        (0..usize::from(t.meta.spec.slots))
            .map(|slot| {
                let published = crate::template::slot_placeholder(&t.durable, slot);
                let path = match jail {
                    None => published,
                    Some(j) => {
                        let own = vm.files_dir().join(format!("slot{slot}.placeholder"));
                        copy_owned(&published, &own, j.uid, j.gid)?;
                        own
                    }
                };
                Ok(vmm_api::BlockOverride { index: slot, path })
            })
            .collect()
    }

    /// A shell for `t`, with its own TAP when the template has a network device.
    pub(super) fn spawn_vm(&self, t: &Template) -> Result<ShellProcess, ShellError> {
        let mut vm = self.spawn_shell(t)?;
        if t.meta.spec.net {
            let owner = self.cfg.jail.as_ref().filter(|_| vm.is_jailed());
            let net = match owner {
                // Owned by the jail's uid/gid: the unprivileged VMM may attach it.
                Some(j) => {
                    SandboxNet::create_owned_tap(vm.name(), self.leases.clone(), j.uid, j.gid)?
                }
                None => SandboxNet::create_tap(vm.name(), self.leases.clone())?,
            };
            vm.set_net(net);
        }
        Ok(vm)
    }

    /// A pooled VM of tier `warm`/shell for `t`. A warm clone of a pool with a `network` gets
    /// its sandbox network now (its address goes to the guest at activation).
    pub(super) fn make_pooled(
        &self,
        t: &Template,
        warm: bool,
        network: Option<PoolNetwork>,
    ) -> Result<ShellProcess, ShellError> {
        let mut vm = self.spawn_vm(t)?;
        if warm {
            self.restore(&mut vm, t, "", true, None)?;
            let name = vm.name().to_string();
            if let (Some(n), Some(net)) = (network, vm.net_mut()) {
                net.reserve(&n)?;
                net.attach(&name)?;
            }
        }
        Ok(vm)
    }

    pub(super) fn reap_leased(&self, l: Leased) {
        let job = match l.vm {
            LeasedVm::Owned(vm) => Reap::Vm(vm),
            LeasedVm::Adopted { net, .. } => Reap::Adopted(l.info, net),
            LeasedVm::Gone => Reap::Files(info_files(&l.info)),
        };
        let _ = self.reap.send(job);
    }

    pub(super) fn save_targets(&self) {
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

/// Live VMM processes serving a control socket `<run>/vm-*.sock`: (pid, parent pid, socket),
/// from `/proc/<pid>/cmdline` (`--control PATH`) and `/proc/<pid>/stat`.
pub(super) fn vmm_processes(run: &std::path::Path) -> Vec<(u32, u32, PathBuf)> {
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let prefix = run.join("vm-");
    let prefix = prefix.as_os_str().as_encoded_bytes();
    let mut out = Vec::new();
    for p in procs.flatten() {
        let Some(pid) = p.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
        let Some(socket) = args
            .windows(2)
            .find(|w| w[0] == b"--control" && w[1].starts_with(prefix))
            .map(|w| PathBuf::from(String::from_utf8_lossy(w[1]).into_owned()))
        else {
            continue;
        };
        let ppid = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|s| {
                let (_, rest) = s.rsplit_once(')')?;
                let mut f = rest.split_whitespace();
                let state = f.next()?;
                if state == "Z" || state == "X" {
                    return None;
                }
                f.next()?.parse().ok()
            });
        if let Some(ppid) = ppid {
            out.push((pid, ppid, socket));
        }
    }
    // A jailed VMM shows twice (the jail's keeper and, as its child, the VMM proper, with the
    // same command line): only the keeper counts; it forwards signals to the VMM.
    let pids: std::collections::HashSet<u32> = out.iter().map(|(p, _, _)| *p).collect();
    out.retain(|(_, ppid, _)| !pids.contains(ppid));
    out
}
