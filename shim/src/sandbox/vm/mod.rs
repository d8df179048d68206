//! The `vm` backend: a clone of a pre-booted template VM per container.
//!
//! [`VmSandbox::start`] leases a clone from a [`Source`] (the `runv-pool` daemon when its socket
//! answers, else an embedded `pool_manager::Pool`), reaches the guest's agent over the clone's
//! vsock socket (`CONNECT <port>`), waits for its `ping` (a template whose guest runs no agent
//! fails here, naming the template) and runs the clone hooks (`reseed`, `set_clock`,
//! `set_hostname`, and `set_network` when it has a network: a CRI pod's namespace named by the
//! spec, joined to the clone's TAP, or the pool's network; see [`net`]). [`VmSandbox::attach_rootfs_for`] puts a container's EROFS image in a
//! disk slot of its own (the lowest free one of the template's `slots`, see [`slots`]; a CRI pod's
//! containers share the VM) with `attach_disk`, [`VmSandbox::detach_rootfs`] frees it, and returns the `RootfsSource::Block` the agent mounts. Releasing (or
//! dropping) the sandbox hands the clone back. [`launch_with`] builds the first container's
//! image while the clone is leased and its agent answers. This is a library API: `runv`
//! (through the [`super::Sandbox`] trait) and the containerd shim use the same calls.

pub mod agent;
pub mod config;
pub mod net;
pub mod slots;
pub mod source;

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use pool_manager::vmm_api::{self, ControlClient, DiskReply};
use pool_manager::SandboxInfo;
use protocol::client::Client;
use protocol::{RootfsSource, Writable};
use serde::{Deserialize, Serialize};

pub use agent::Hooks;
pub use config::VmConfig;
pub use net::NetPlan;
pub use slots::{SlotError, SlotTable};
pub use source::Source;

use super::{FirstRootfs, Sandbox, SandboxError};
use crate::state::ContainerDir;

/// Disk slot the first container's root file system goes to.
pub const ROOTFS_SLOT: usize = 0;
/// Where the monitor records its sandbox in the container directory.
const RECORD_FILE: &str = "sandbox.json";

/// Why the vm backend failed.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// No template configured.
    #[error("the vm sandbox needs a VM template: pass --template NAME, set RUNV_TEMPLATE, or put `template = \"NAME\"` in /etc/runv/config.toml (build one with runv-pool). On hosts without virtualization use --sandbox host (or RUNV_SANDBOX=host), which runs containers as host processes without VM isolation")]
    NoTemplate,
    /// The config file is unreadable or wrong.
    #[error("runv config {0}: {1}")]
    Config(PathBuf, String),
    /// No `runv-vmm` for the embedded pool.
    #[error("runv-vmm not found (no runv-pool daemon answered either): set RUNV_VMM, put runv-vmm next to runv or on PATH, or start `runv-pool serve`")]
    NoVmm,
    /// The template does not exist.
    #[error("template {0} does not exist in {1}: build it with runv-pool (`POST /v1/templates`) or pick another with --template")]
    UnknownTemplate(String, String),
    /// A pool operation failed.
    #[error("{0}")]
    Pool(String),
    /// The guest's agent did not answer.
    #[error("template {template}: the agent in its clone did not answer ping on vsock port {port} within {timeout:?} ({last}): build the template from a guest whose init is runv-agent (or the test guest with rt.agent)")]
    NoAgent {
        /// Template.
        template: String,
        /// vsock port.
        port: u32,
        /// How long we waited.
        timeout: Duration,
        /// The last failure.
        last: String,
    },
    /// A clone hook failed.
    #[error("clone hook {0} failed: {1}")]
    Hook(&'static str, String),
    /// The VMM's control API refused or failed.
    #[error("sandbox {0}: {1}")]
    Control(String, String),
    /// The spec names a pod network but the template's VMs have no network device.
    #[error("template {template} has no network device, but the container's spec names the network namespace {netns}: build the template with net (`runv-pool template build ... --net`)")]
    NoNetDevice {
        /// Template.
        template: String,
        /// The spec's network namespace.
        netns: String,
    },
    /// Joining the pod's network failed.
    #[error("joining the pod network {netns} to sandbox {id}: {why}")]
    PodNet {
        /// Sandbox.
        id: String,
        /// The pod's namespace.
        netns: String,
        /// Cause.
        why: String,
    },
    /// Building the root file system image failed.
    #[error("building the rootfs image: {0}")]
    Image(#[from] crate::image::ImageError),
    /// No disk slot for a container's root file system.
    #[error(transparent)]
    Slots(#[from] SlotError),
    /// The record of a container's sandbox is unreadable.
    #[error("{0}: {1} (`runv delete --force` removes the container)")]
    Record(PathBuf, String),
}

/// What the monitor records about its sandbox (`<container dir>/sandbox.json`): enough for
/// other runv commands to reach the agent and for `delete` to release a leftover.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VmRecord {
    /// The daemon's socket, when the clone came from the daemon.
    pub daemon: Option<PathBuf>,
    /// The guest agent's vsock port.
    pub agent_port: u32,
    /// The leased sandbox.
    pub info: SandboxInfo,
    /// The pod network joined to its TAP.
    #[serde(default)]
    pub pod: Option<net::PodJoin>,
}

/// A leased clone; released on [`VmSandbox::release`] or drop.
pub struct VmSandbox {
    cfg: VmConfig,
    source: Option<Source>,
    info: SandboxInfo,
    pod: Option<net::PodJoin>,
    first: Mutex<Option<Client>>,
    /// Which container's root is in which disk slot (read from the template on first use).
    slots: Mutex<Option<SlotTable>>,
    /// The first container's image, built while the clone was leased ([`launch_with`]).
    prepared: Mutex<Option<PreparedRootfs>>,
}

/// An image built for a container's root file system before [`Sandbox::rootfs`] asked for it.
#[derive(Debug)]
struct PreparedRootfs {
    container: String,
    dir: PathBuf,
    image: PathBuf,
}

impl std::fmt::Debug for VmSandbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmSandbox")
            .field("info", &self.info)
            .finish()
    }
}

impl VmSandbox {
    /// Leases a clone of `cfg.template` from `source` for `container`, waits for its agent and
    /// runs `hooks`. Returns the sandbox and the connection the hooks ran on.
    pub fn start(
        cfg: &VmConfig,
        source: &Source,
        container: &str,
        hooks: &Hooks,
    ) -> Result<(Self, Client), VmError> {
        Self::start_with(cfg, source, container, hooks, &NetPlan::default())
    }

    /// [`VmSandbox::start`] with a network plan: with a pod namespace the clone comes without
    /// the pool's network, its TAP is joined to the pod's interface and `set_network` gives the
    /// guest the pod's addresses; else the pool's network (if any) goes to `set_network`.
    pub fn start_with(
        cfg: &VmConfig,
        source: &Source,
        container: &str,
        hooks: &Hooks,
        plan: &NetPlan,
    ) -> Result<(Self, Client), VmError> {
        let network = plan.pod.as_ref().map(|_| false);
        let mut sb = Self::acquire_with(cfg, source, container, network)?;
        // On error `sb` is dropped: the pod link undone, the clone released.
        let mut hooks = hooks.clone();
        if let Some((netns, ifname)) = &plan.pod {
            let link = sb.join_pod(netns, ifname)?;
            hooks.network = Some(net::NetHook::from_pod(&link, plan.dns.clone()));
        } else if let Some(n) = &sb.info.network {
            hooks.network = Some(net::NetHook::from_pool(n, plan.dns.clone()));
        }
        let mut client = sb.agent_ready()?;
        hooks.run(&mut client)?;
        Ok((sb, client))
    }

    /// Only leases a clone of `cfg.template` (no agent contact, no hooks): for callers that
    /// order the steps themselves (benchmarks, a shim that attaches disks first).
    pub fn acquire(cfg: &VmConfig, source: &Source, container: &str) -> Result<Self, VmError> {
        Self::acquire_with(cfg, source, container, None)
    }

    fn acquire_with(
        cfg: &VmConfig,
        source: &Source,
        container: &str,
        network: Option<bool>,
    ) -> Result<Self, VmError> {
        let info = source.acquire(&cfg.template, container, network)?;
        Ok(Self {
            cfg: cfg.clone(),
            source: Some(source.clone()),
            info,
            pod: None,
            first: Mutex::new(None),
            slots: Mutex::new(None),
            prepared: Mutex::new(None),
        })
    }

    /// Joins the pod namespace `netns`'s interface `ifname` to the clone's TAP (tc mirred).
    fn join_pod(
        &mut self,
        netns: &Path,
        ifname: &str,
    ) -> Result<pool_manager::network::pod::PodLink, VmError> {
        let tap = self.info.tap.clone().ok_or_else(|| VmError::NoNetDevice {
            template: self.cfg.template.clone(),
            netns: netns.display().to_string(),
        })?;
        let link =
            pool_manager::network::pod::connect(netns, Some(ifname), &tap, None).map_err(|e| {
                VmError::PodNet {
                    id: self.info.id.clone(),
                    netns: netns.display().to_string(),
                    why: e.to_string(),
                }
            })?;
        self.pod = Some(net::PodJoin {
            netns: netns.to_path_buf(),
            ifname: ifname.into(),
            tap,
        });
        Ok(link)
    }

    /// The pod network joined to the clone's TAP, if any.
    pub fn pod(&self) -> Option<&net::PodJoin> {
        self.pod.as_ref()
    }

    /// The leased sandbox (ids, sockets, VMM pid).
    pub fn info(&self) -> &SandboxInfo {
        &self.info
    }

    /// What [`connect_record`] needs to reach this sandbox later.
    pub fn record(&self) -> VmRecord {
        VmRecord {
            daemon: match &self.source {
                Some(Source::Daemon(p)) => Some(p.clone()),
                _ => None,
            },
            agent_port: self.cfg.agent_port,
            info: self.info.clone(),
            pod: self.pod.clone(),
        }
    }

    /// Connects to the agent and waits (at most `cfg.agent_timeout`) for `ping`.
    pub fn agent_ready(&self) -> Result<Client, VmError> {
        agent::connect_ready(
            &self.info.vsock_uds,
            self.cfg.agent_port,
            self.cfg.agent_timeout,
        )
        .map_err(|last| VmError::NoAgent {
            template: self.cfg.template.clone(),
            port: self.cfg.agent_port,
            timeout: self.cfg.agent_timeout,
            last,
        })
    }

    fn control(&self) -> Result<ControlClient, VmError> {
        let fail = |e: vmm_api::ClientError| VmError::Control(self.info.id.clone(), e.to_string());
        let mut c =
            ControlClient::connect(&self.info.control, Duration::from_secs(5)).map_err(fail)?;
        c.set_timeout(Duration::from_secs(10)).map_err(fail)?;
        Ok(c)
    }

    /// Swaps disk slot `slot` to `path` (`attach_disk`): opened here and passed to the VMM as a
    /// descriptor, so a jailed clone gets it too.
    pub fn attach_disk(
        &self,
        slot: usize,
        path: &Path,
        read_only: bool,
    ) -> Result<DiskReply, VmError> {
        self.control()?
            .attach_disk(slot, path, read_only)
            .map_err(|e| {
                // A file that cannot be opened here says so itself; a refusal may be a missing slot.
                let hint = match e {
                vmm_api::ClientError::Open { .. } => "",
                _ => " (templates for runv need disk slots: build them with \"slots\": 1 or more)",
            };
                VmError::Control(
                    self.info.id.clone(),
                    format!("attach_disk slot {slot} {}: {e}{hint}", path.display()),
                )
            })
    }

    /// Puts slot `slot`'s placeholder back (`detach_disk`).
    pub fn detach_disk(&self, slot: usize) -> Result<DiskReply, VmError> {
        self.control()?
            .detach_disk(slot)
            .map_err(|e| VmError::Control(self.info.id.clone(), format!("detach_disk {slot}: {e}")))
    }

    /// The pod this VM serves (the container it was leased for).
    fn pod_name(&self) -> &str {
        self.info
            .labels
            .get("runv.container")
            .map_or(self.info.id.as_str(), String::as_str)
    }

    /// Takes the lowest free disk slot for `container` (the template's slot count is asked of
    /// the source on first use).
    fn take_slot(&self, container: &str) -> Result<usize, VmError> {
        let mut g = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        if g.is_none() {
            let source = self.source.as_ref().ok_or_else(|| {
                VmError::Control(self.info.id.clone(), "the sandbox was released".into())
            })?;
            *g = Some(SlotTable::new(source.template_slots(&self.cfg.template)?));
        }
        let table = g.as_mut().expect("the slot table was just set");
        Ok(table.take(container, self.pod_name(), &self.cfg.template)?)
    }

    fn free_slot(&self, slot: usize) {
        if let Some(t) = self
            .slots
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_mut()
        {
            t.free(slot);
        }
    }

    /// The disk slot holding `container`'s root, if any.
    pub fn rootfs_slot(&self, container: &str) -> Option<usize> {
        self.slots
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .and_then(|t| t.slot_of(container))
    }

    /// Attaches EROFS image `image` read-only as the first container's root (the pod's own
    /// name owns the slot, [`ROOTFS_SLOT`] on a fresh clone); see [`Self::attach_rootfs_for`].
    pub fn attach_rootfs(&self, image: &Path) -> Result<RootfsSource, VmError> {
        let pod = self.pod_name().to_string();
        self.attach_rootfs_for(&pod, image)
    }

    /// Attaches EROFS image `image` read-only to a free disk slot of `container`'s own; returns
    /// the root the agent mounts (by the slot's serial, tmpfs upper layer). Every slot in use:
    /// [`SlotError::Full`], naming the template to rebuild.
    pub fn attach_rootfs_for(
        &self,
        container: &str,
        image: &Path,
    ) -> Result<RootfsSource, VmError> {
        let slot = self.take_slot(container)?;
        match self.attach_disk(slot, image, true) {
            Ok(reply) => Ok(RootfsSource::Block {
                serial: reply.serial,
                fstype: "erofs".into(),
                writable: Writable::Tmpfs,
            }),
            Err(e) => {
                self.free_slot(slot);
                Err(e)
            }
        }
    }

    /// Detaches `container`'s root (`detach_disk`) and frees its slot (also when the detach
    /// fails: the next `attach_disk` swaps the slot's disk anyway). No slot: nothing to do.
    pub fn detach_rootfs(&self, container: &str) -> Result<(), VmError> {
        let Some(slot) = self.rootfs_slot(container) else {
            return Ok(());
        };
        let detached = self.detach_disk(slot).map(|_| ());
        self.free_slot(slot);
        detached
    }

    /// Parks the clone's vCPUs.
    pub fn pause(&self) -> Result<(), VmError> {
        self.control()?
            .pause()
            .map(|_| ())
            .map_err(|e| VmError::Control(self.info.id.clone(), format!("pause: {e}")))
    }

    /// Resumes the clone's vCPUs.
    pub fn resume(&self) -> Result<(), VmError> {
        self.control()?
            .resume()
            .map(|_| ())
            .map_err(|e| VmError::Control(self.info.id.clone(), format!("resume: {e}")))
    }

    /// Hands the clone back (idempotent), after undoing its pod link (tc redirects, TAP).
    /// With an embedded pool that only this sandbox holds, the pool is shut down too and its
    /// VMM reaped before this returns.
    pub fn release(&mut self) -> Result<(), VmError> {
        self.first.lock().unwrap_or_else(|p| p.into_inner()).take();
        let unjoined = match self.pod.take() {
            Some(p) => p.disconnect(),
            None => Ok(()),
        };
        let released = match self.source.take() {
            Some(s) => s.release(&self.info.id),
            None => Ok(()),
        };
        released?;
        unjoined.map_err(|why| VmError::Control(self.info.id.clone(), why))
    }
}

impl Drop for VmSandbox {
    fn drop(&mut self) {
        let _ = self.release();
    }
}

impl Sandbox for VmSandbox {
    fn client(&self) -> Result<Client, SandboxError> {
        if let Some(c) = self.first.lock().unwrap_or_else(|p| p.into_inner()).take() {
            return Ok(c);
        }
        Ok(self.agent_ready()?)
    }

    fn pid(&self) -> i32 {
        i32::try_from(self.info.pid).unwrap_or(0)
    }

    fn rootfs(&mut self, container: &str, rootfs: &Path) -> Result<RootfsSource, SandboxError> {
        let prepared = self
            .prepared
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
            .filter(|p| p.container == container && p.dir == rootfs);
        let image = match prepared {
            Some(p) => p.image,
            None => {
                let cache =
                    crate::image::ImageCache::new(&self.cfg.image_cache).map_err(VmError::from)?;
                cache.erofs_for(rootfs, None).map_err(VmError::from)?.path
            }
        };
        Ok(self.attach_rootfs_for(container, &image)?)
    }

    fn release_rootfs(&mut self, container: &str) -> Result<(), SandboxError> {
        Ok(self.detach_rootfs(container)?)
    }

    fn shutdown(&mut self) {
        if let Err(e) = self.release() {
            eprintln!("runv: {e}");
        }
    }
}

/// Whether the vm backend can run containers here: a template is configured and exists (asked
/// of the daemon when it answers, else looked up in the state directory).
pub fn preflight() -> Result<(), SandboxError> {
    let cfg = VmConfig::resolve(None)?;
    if std::os::unix::net::UnixStream::connect(&cfg.pool_socket).is_ok() {
        return Ok(Source::Daemon(cfg.pool_socket.clone()).check_template(&cfg.template)?);
    }
    let meta = cfg
        .state_dir
        .join("templates")
        .join(&cfg.template)
        .join("template.json");
    if !meta.is_file() {
        return Err(
            VmError::UnknownTemplate(cfg.template, cfg.state_dir.display().to_string()).into(),
        );
    }
    if cfg.vmm.is_none() && source::find_vmm().is_none() {
        return Err(VmError::NoVmm.into());
    }
    Ok(())
}

/// Starts the sandbox of the container in `dir` (for the `runv` monitor or the shim): the
/// configuration from the environment and config file, a source of its own, then
/// [`launch_with`].
pub fn launch(
    dir: &ContainerDir,
    spec: Option<&oci_spec::runtime::Spec>,
    first: Option<FirstRootfs<'_>>,
) -> Result<VmSandbox, SandboxError> {
    let cfg = VmConfig::resolve(None)?;
    let source = Source::open(&cfg)?;
    launch_with(&cfg, source, dir, spec, first)
}

/// Starts the sandbox of the container in `dir` from `source`: `spec`'s hostname (else the
/// container id) for the hook and its network ([`NetPlan::from_spec`]); records it in `dir`.
/// The `first` container's EROFS image is built (or found in the cache) on another thread
/// while the clone is leased and its agent answers, so [`Sandbox::rootfs`] for it only attaches
/// it; a build that fails there is retried, and reported, by [`Sandbox::rootfs`].
pub fn launch_with(
    cfg: &VmConfig,
    source: Source,
    dir: &ContainerDir,
    spec: Option<&oci_spec::runtime::Spec>,
    first: Option<FirstRootfs<'_>>,
) -> Result<VmSandbox, SandboxError> {
    let hostname = spec
        .and_then(|s| s.hostname().clone())
        .unwrap_or_else(|| dir.id.chars().take(63).collect());
    let plan = spec.map(NetPlan::from_spec).unwrap_or_default();
    let hooks = Hooks::fresh(Some(hostname))?;
    let (started, prepared) = std::thread::scope(|s| {
        let build = first.and_then(|f| {
            let cache_dir = &cfg.image_cache;
            std::thread::Builder::new()
                .name("rootfs-image".into())
                .spawn_scoped(s, move || {
                    crate::image::ImageCache::new(cache_dir)
                        .and_then(|c| c.erofs_for(f.dir, None))
                        .ok()
                        .map(|image| PreparedRootfs {
                            container: f.container.into(),
                            dir: f.dir.into(),
                            image: image.path,
                        })
                })
                .ok()
        });
        let started = VmSandbox::start_with(cfg, &source, &dir.id, &hooks, &plan);
        (started, build.and_then(|b| b.join().ok().flatten()))
    });
    let (sb, client) = started?;
    drop(source); // the sandbox holds the only reference to an embedded pool
    *sb.first.lock().unwrap_or_else(|p| p.into_inner()) = Some(client);
    *sb.prepared.lock().unwrap_or_else(|p| p.into_inner()) = prepared;
    let path = dir.path.join(RECORD_FILE);
    let json = serde_json::to_vec_pretty(&sb.record())
        .map_err(|e| VmError::Record(path.clone(), e.to_string()))?;
    std::fs::write(&path, json).map_err(|e| VmError::Record(path.clone(), e.to_string()))?;
    Ok(sb)
}

/// The recorded sandbox of the container in `dir`.
pub fn load_record(dir: &ContainerDir) -> Result<VmRecord, VmError> {
    let path = dir.path.join(RECORD_FILE);
    let bytes = std::fs::read(&path).map_err(|e| VmError::Record(path.clone(), e.to_string()))?;
    serde_json::from_slice(&bytes).map_err(|e| VmError::Record(path, e.to_string()))
}

/// A new connection to the agent of the container in `dir`.
pub fn connect_record(dir: &ContainerDir) -> Result<Client, VmError> {
    let r = load_record(dir)?;
    agent::connect(&r.info.vsock_uds, r.agent_port, Duration::from_secs(2)).map_err(|e| {
        VmError::Control(
            r.info.id.clone(),
            format!("reaching the agent over vsock: {e}"),
        )
    })
}

/// Pauses (`pause`) or resumes the recorded sandbox of the container in `dir` through its
/// VMM's control API.
pub fn pause_record(dir: &ContainerDir, pause: bool) -> Result<(), VmError> {
    let r = load_record(dir)?;
    let fail = |e: vmm_api::ClientError| VmError::Control(r.info.id.clone(), e.to_string());
    let mut c = ControlClient::connect(&r.info.control, Duration::from_secs(5)).map_err(fail)?;
    c.set_timeout(Duration::from_secs(10)).map_err(fail)?;
    if pause { c.pause() } else { c.resume() }
        .map(|_| ())
        .map_err(fail)
}

/// What a killed monitor or shim left: the pod link undone, the daemon's lease released, or an
/// embedded pool's VMM (still serving the recorded control socket) killed and its files removed.
pub fn reap_leftovers(dir: &ContainerDir) {
    let Ok(r) = load_record(dir) else { return };
    if let Some(p) = &r.pod {
        if let Err(e) = p.disconnect() {
            eprintln!("runv: {e}");
        }
    }
    if let Some(sock) = &r.daemon {
        let _ = Source::Daemon(sock.clone()).release(&r.info.id);
    } else {
        let cmdline = std::fs::read(format!("/proc/{}/cmdline", r.info.pid)).unwrap_or_default();
        let control = r.info.control.as_os_str().as_encoded_bytes();
        if r.info.pid > 0 && cmdline.windows(control.len()).any(|w| w == control) {
            // SAFETY: kill(2) on the VMM serving this sandbox's control socket (checked above).
            unsafe { libc::kill(r.info.pid as i32, libc::SIGKILL) };
        }
        for f in [&r.info.vsock_uds, &r.info.control, &r.info.debug_log] {
            let _ = std::fs::remove_file(f);
        }
    }
}
