//! Templates: a snapshot of a booted, paused guest that clones are restored from.
//!
//! A template named `N` lives durably in `<state-dir>/templates/N/` (`state.bin`, `memory.bin`
//! and `template.json`, the [`TemplateMeta`] written here because `state.bin`'s machine state
//! belongs to the `vmm` crate) and is copied to a tmpfs directory (`/dev/shm/runv/N` by default)
//! that clones map their memory from. A missing tmpfs copy is made again from the durable one.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::names;

/// The metadata file of a template directory.
pub const META_FILE: &str = "template.json";
/// How long a template guest may take to report ready.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// The vsock port `runv-agent` listens on in a guest (its `--listen vsock:1024` default).
pub const AGENT_PORT: u32 = 1024;

/// How template build knows the guest is ready to be snapshotted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ReadyCheck {
    /// The guest's debug report `READY` (and `PASS counter_started` when the command line runs
    /// `rt.counter`): the test guest.
    #[default]
    Report,
    /// `runv-agent` answers `ping` with `ready: true` over vsock port [`AGENT_PORT`]: a Linux
    /// guest whose init is the agent.
    Agent,
}

/// What to boot for a template.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TemplateSpec {
    /// Kernel (or test guest) to boot.
    pub kernel: PathBuf,
    /// Optional initrd.
    #[serde(default)]
    pub initrd: Option<PathBuf>,
    /// Kernel command line.
    #[serde(default)]
    pub cmdline: String,
    /// Guest RAM in MiB.
    #[serde(default = "default_mem")]
    pub mem_mib: u64,
    /// vCPUs.
    #[serde(default = "default_vcpus")]
    pub vcpus: u8,
    /// Readiness check.
    #[serde(default)]
    pub ready: ReadyCheck,
    /// Disk slots (0..=8): virtio-blk devices `runv-slot0`... backed by one-sector placeholder
    /// files in the template directory, swapped per clone with `attach_disk` (runv's root file
    /// systems). 0 (the default) keeps templates built before slots existed valid.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub slots: u8,
    /// Build it with a virtio-net device (on a TAP made for the build and removed after), so
    /// that its sandboxes can have networks.
    #[serde(default)]
    pub net: bool,
    /// How its clones map its memory: `cow` (the default: page cache shared by every clone)
    /// or `uffd` (served through userfaultfd with the working set recorded by the build's
    /// first clone and prefetched by the others). `copy` is accepted.
    #[serde(default, skip_serializing_if = "is_cow")]
    pub mem_mode: vmm_api::MemoryMode,
    /// Warm-up: how long the guest keeps running after it is ready and before it is
    /// snapshotted (caches filled, lazy initialisation done), 0..=600000 ms.
    #[serde(default, skip_serializing_if = "is_zero_u64")]
    pub warmup_ms: u64,
}

fn is_cow(m: &vmm_api::MemoryMode) -> bool {
    *m == vmm_api::MemoryMode::Cow
}

fn is_zero_u64(n: &u64) -> bool {
    *n == 0
}

fn is_zero(n: &u8) -> bool {
    *n == 0
}

/// Disk slots a template gets when a build request (CLI or HTTP API) names none: room for a
/// pod's pause container and three more containers, each root in a slot of its own. (A
/// `template.json` without the field means 0: templates built before slots existed.)
pub const DEFAULT_BUILD_SLOTS: u8 = 4;

/// The placeholder file of disk slot `slot` in a template directory.
pub fn slot_placeholder(dir: &Path, slot: usize) -> PathBuf {
    dir.join(format!("slot{slot}.placeholder"))
}

fn default_mem() -> u64 {
    128
}
fn default_vcpus() -> u8 {
    1
}

/// `template.json`: what a template was built from and the shape shells must have.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TemplateMeta {
    /// Template name.
    pub name: String,
    /// What it was booted from.
    pub spec: TemplateSpec,
    /// Seconds the build took (boot to published snapshot).
    pub build_s: f64,
    /// Unix time of the build, in seconds.
    pub built_at: u64,
}

/// Error building or loading a template.
#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    /// A file operation failed.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// The spec cannot be built.
    #[error("{0}")]
    Spec(String),
    /// The template guest failed or did not become ready.
    #[error("template guest: {0}")]
    Guest(String),
    /// The snapshot is damaged or missing.
    #[error("snapshot {path}: {detail}; rebuild the template")]
    Snapshot {
        /// Snapshot directory.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
}

fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> TemplateError {
    let path = path.to_path_buf();
    move |source| TemplateError::Io { what, path, source }
}

impl TemplateSpec {
    /// Checks the spec before anything is booted.
    pub fn validate(&self) -> Result<(), TemplateError> {
        if !(1..=8).contains(&self.vcpus) {
            return Err(TemplateError::Spec(format!(
                "vcpus {}: use 1 to 8",
                self.vcpus
            )));
        }
        if !(16..=65536).contains(&self.mem_mib) {
            return Err(TemplateError::Spec(format!(
                "mem_mib {}: use 16 to 65536",
                self.mem_mib
            )));
        }
        for p in std::iter::once(&self.kernel).chain(self.initrd.as_ref()) {
            if !p.is_file() {
                return Err(TemplateError::Spec(format!(
                    "{} is not a readable file: give the path of a kernel/initrd on the daemon's host",
                    p.display()
                )));
            }
        }
        if self.warmup_ms > 600_000 {
            return Err(TemplateError::Spec(format!(
                "warmup_ms {}: use 0 to 600000",
                self.warmup_ms
            )));
        }
        if self.slots > 8 {
            return Err(TemplateError::Spec(format!(
                "slots {}: use 0 to 8",
                self.slots
            )));
        }
        if self.cmdline.len() > 2048 || self.cmdline.contains('\0') {
            return Err(TemplateError::Spec(
                "cmdline: at most 2048 bytes and no NUL".into(),
            ));
        }
        Ok(())
    }
}

/// An opened, checked template (its tmpfs copy).
#[derive(Debug, Clone)]
pub struct Template {
    /// Metadata.
    pub meta: TemplateMeta,
    /// Durable directory.
    pub durable: PathBuf,
    /// tmpfs directory clones restore from.
    pub tmpfs: PathBuf,
}

/// Boots `spec` with `vmm`, waits for readiness, snapshots into `<templates>/<name>` (published
/// by a rename) and copies it to `<tmpfs_root>/<name>`. `run_dir` holds the build VM's sockets.
/// With `jail` the build VM runs jailed (see [`crate::build_jail`]); a networked one joins a
/// network namespace made for the build that holds its TAP ([`crate::network::BuildNet`]).
#[allow(clippy::too_many_arguments)]
pub fn build(
    vmm: &Path,
    name: &str,
    spec: &TemplateSpec,
    templates: &Path,
    tmpfs_root: &Path,
    run_dir: &Path,
    jail: Option<&crate::ShellJail>,
    progress: &dyn Fn(BuildStep),
) -> Result<Template, TemplateError> {
    names::validate("template", name).map_err(|e| TemplateError::Spec(e.to_string()))?;
    spec.validate()?;
    let start = Instant::now();
    let building = templates.join(format!(".{name}.building"));
    let _ = std::fs::remove_dir_all(&building);
    std::fs::create_dir_all(&building).map_err(io("creating", &building))?;
    let result = boot_and_snapshot(vmm, name, spec, &building, run_dir, jail, progress);
    let result = result.and_then(|()| {
        progress(BuildStep::Publishing);
        let meta = TemplateMeta {
            name: name.into(),
            spec: spec.clone(),
            build_s: start.elapsed().as_secs_f64(),
            built_at: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
        };
        let path = building.join(META_FILE);
        let json = serde_json::to_vec_pretty(&meta).expect("metadata serializes");
        std::fs::write(&path, json).map_err(io("writing", &path))?;
        let durable = templates.join(name);
        let _ = std::fs::remove_dir_all(&durable);
        std::fs::rename(&building, &durable).map_err(io("publishing", &durable))?;
        Ok(durable)
    });
    let durable = match result {
        Ok(d) => d,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&building);
            return Err(e);
        }
    };
    let tmpfs = tmpfs_root.join(name);
    let _ = std::fs::remove_dir_all(&tmpfs);
    progress(BuildStep::Verifying);
    open(&durable, tmpfs_root)
}

/// The steps of a template build, in order (reported while it runs: `GET /v1/templates/{name}`
/// and `runv-pool template build`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BuildStep {
    /// Starting the VMM and booting the guest.
    Booting,
    /// Waiting for the readiness check (`report` or `agent`).
    WaitingReady,
    /// The warm-up (`warmup_ms`; skipped without one).
    WarmingUp,
    /// Pausing and snapshotting the guest.
    Snapshotting,
    /// Writing the metadata and publishing the durable copy.
    Publishing,
    /// Copying it to tmpfs and checking the snapshot opens.
    Verifying,
    /// Restoring a first clone (the pool does it): proves the snapshot restores, and records
    /// the working set of a `uffd` template.
    FirstClone,
}

impl BuildStep {
    /// How many steps a build has.
    pub const COUNT: usize = 7;

    /// 1-based position of the step.
    pub fn number(self) -> usize {
        self as usize + 1
    }

    /// What the step does, for people.
    pub fn label(self) -> &'static str {
        match self {
            Self::Booting => "booting the guest",
            Self::WaitingReady => "waiting for the guest to be ready",
            Self::WarmingUp => "warming up",
            Self::Snapshotting => "pausing and snapshotting",
            Self::Publishing => "publishing the durable copy",
            Self::Verifying => "copying to tmpfs and verifying",
            Self::FirstClone => "restoring a first clone",
        }
    }
}

fn boot_and_snapshot(
    vmm: &Path,
    name: &str,
    spec: &TemplateSpec,
    snap: &Path,
    run_dir: &Path,
    jail: Option<&crate::ShellJail>,
    progress: &dyn Fn(BuildStep),
) -> Result<(), TemplateError> {
    progress(BuildStep::Booting);
    let log = snap.join("build.log");
    let jail = match jail {
        Some(j) => Some(crate::build_jail::BuildJail::prepare(
            j,
            run_dir,
            name,
            snap,
            spec.mem_mib,
        )?),
        None => None,
    };
    let sockets = jail
        .as_ref()
        .map_or_else(|| run_dir.to_path_buf(), |j| j.files_dir());
    let control = sockets.join(format!("build-{name}.sock"));
    let vsock = sockets.join(format!("build-{name}.vsock"));
    let mut cmd = Command::new(vmm);
    if let Some(j) = &jail {
        cmd.args(j.args());
    }
    cmd.arg("--kernel")
        .arg(&spec.kernel)
        .args(["--cmdline", &spec.cmdline])
        .args(["--mem-mib", &spec.mem_mib.to_string()])
        .args(["--vcpus", &spec.vcpus.to_string()])
        .args(["--serial", "none"])
        .arg("--debug-log")
        .arg(&log)
        .arg("--control")
        .arg(&control)
        .arg("--vsock")
        .arg(format!("cid=3,uds={}", vsock.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    if let Some(i) = &spec.initrd {
        cmd.arg("--initrd").arg(i);
    }
    for slot in 0..usize::from(spec.slots) {
        let p = slot_placeholder(snap, slot);
        std::fs::write(&p, [0u8; 512]).map_err(io("writing", &p))?;
        if let Some(j) = &jail {
            j.own(&p)?;
        }
        cmd.arg("--block").arg(format!(
            "path={},id={}",
            p.display(),
            vmm_api::slot_id(slot)
        ));
    }
    // The build VM's TAP: removed with it (clones get their own).
    let tap = if spec.net {
        Some(build_tap(name, jail.as_ref(), &mut cmd)?)
    } else {
        None
    };
    let mut child = cmd
        .spawn()
        .map_err(|e| TemplateError::Guest(format!("spawning {}: {e}", vmm.display())))?;
    let outcome = (|| {
        progress(BuildStep::WaitingReady);
        match spec.ready {
            ReadyCheck::Report => wait_ready(&mut child, &log, &spec.cmdline)?,
            ReadyCheck::Agent => wait_agent(&mut child, &vsock)?,
        }
        if spec.warmup_ms > 0 {
            progress(BuildStep::WarmingUp);
            warm_up(&mut child, Duration::from_millis(spec.warmup_ms))?;
        }
        let mut c = vmm_api::ControlClient::connect(&control, Duration::from_secs(5))
            .map_err(|e| TemplateError::Guest(e.to_string()))?;
        progress(BuildStep::Snapshotting);
        c.snapshot(snap)
            .map_err(|e| TemplateError::Guest(format!("snapshot: {e}")))?;
        let _ = c.shutdown();
        Ok(())
    })();
    if outcome.is_err() {
        let _ = child.kill();
    }
    let status = child.wait();
    drop(tap);
    let _ = std::fs::remove_file(&log);
    let _ = std::fs::remove_file(&vsock);
    let _ = std::fs::remove_file(&control);
    let given_back = jail.as_ref().map(|j| j.give_back(snap)).transpose();
    drop(jail);
    outcome?;
    given_back?;
    match status {
        Ok(s) if s.success() => Ok(()),
        Ok(s) => Err(TemplateError::Guest(format!(
            "the template VM exited with {s} after its snapshot"
        ))),
        Err(e) => Err(TemplateError::Guest(format!("waiting for the VMM: {e}"))),
    }
}

/// The network of a build VM: a TAP in the host's namespace for an unjailed VMM; for a jailed
/// one a namespace of its own holding the TAP, owned by the jail uid, which the VMM joins.
/// Adds the VMM's arguments for it to `cmd`.
fn build_tap(
    name: &str,
    jail: Option<&crate::build_jail::BuildJail>,
    cmd: &mut Command,
) -> Result<BuildTap, TemplateError> {
    use std::hash::BuildHasher;
    // A random suffix (RandomState is seeded randomly): two builds never share a TAP.
    let r = std::collections::hash_map::RandomState::new().hash_one(name);
    let vm = format!("vm-b{:011x}", r >> 20);
    let failed = |e: crate::network::NetError| {
        TemplateError::Guest(format!("creating the build VM's TAP: {e}"))
    };
    let tap = match jail {
        Some(j) => {
            let (uid, gid) = j.owner();
            let tap = format!("{}{}", crate::network::TAP_PREFIX, &vm[3..]);
            let net = crate::network::BuildNet::create(j.id(), &tap, uid, gid).map_err(failed)?;
            cmd.arg("--jail-netns").arg(net.netns_path());
            BuildTap::Jailed(net)
        }
        None => BuildTap::Host(
            crate::network::SandboxNet::create_tap(&vm, Default::default()).map_err(failed)?,
        ),
    };
    let name = match &tap {
        BuildTap::Jailed(n) => n.tap(),
        BuildTap::Host(t) => t.tap(),
    };
    cmd.args(["--net", &format!("tap={name}")]);
    Ok(tap)
}

/// A build VM's TAP (see [`build_tap`]); removed on drop.
enum BuildTap {
    /// In the host's namespace.
    Host(crate::network::SandboxNet),
    /// In a namespace of its own, with it.
    Jailed(crate::network::BuildNet),
}

/// Waits until the debug log holds the ready reports, the guest fails, or the VMM exits.
fn wait_ready(
    child: &mut std::process::Child,
    log: &Path,
    cmdline: &str,
) -> Result<(), TemplateError> {
    let counter = cmdline.split_whitespace().any(|t| t == "rt.counter");
    // The test guest's agent responder must be listening before the snapshot.
    let agent = cmdline
        .split_whitespace()
        .any(|t| t == "rt.agent" || t.starts_with("rt.agent="));
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if let Some(fail) = text.lines().find(|l| l.starts_with("REPORT FAIL")) {
            return Err(TemplateError::Guest(format!("the guest reported {fail}")));
        }
        let ready = text.lines().any(|l| l == "REPORT READY");
        let started = !counter
            || text
                .lines()
                .any(|l| l.starts_with("REPORT PASS counter_started"));
        let listening = !agent
            || text
                .lines()
                .any(|l| l.starts_with("REPORT PASS agent_listening"));
        if ready && started && listening {
            return Ok(());
        }
        if let Ok(Some(s)) = child.try_wait() {
            return Err(exited(child, s));
        }
        if Instant::now() > deadline {
            return Err(TemplateError::Guest(format!(
                "no READY report within {READY_TIMEOUT:?}: is the kernel a runv test guest / does its command line run the tasks?"
            )));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Lets the guest run for `how_long`; an exit of the VMM meanwhile is an error.
fn warm_up(child: &mut std::process::Child, how_long: Duration) -> Result<(), TemplateError> {
    let end = Instant::now() + how_long;
    while Instant::now() < end {
        if let Ok(Some(s)) = child.try_wait() {
            return Err(exited(child, s));
        }
        std::thread::sleep(Duration::from_millis(10).min(end - Instant::now()));
    }
    Ok(())
}

/// The VMM's exit as an error, with its stderr.
fn exited(child: &mut std::process::Child, s: std::process::ExitStatus) -> TemplateError {
    let mut err = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut err);
    }
    TemplateError::Guest(format!(
        "the VMM exited ({s}) before the guest was ready: {}",
        err.trim()
    ))
}

/// Waits until `runv-agent` in the guest answers `ping` with `ready: true` through the VM's
/// vsock socket (`CONNECT <port>` handshake), retrying every 100 ms.
fn wait_agent(child: &mut std::process::Child, vsock: &Path) -> Result<(), TemplateError> {
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        let last = match ping_agent(vsock) {
            Ok(()) => return Ok(()),
            Err(e) => e,
        };
        if let Ok(Some(s)) = child.try_wait() {
            return Err(exited(child, s));
        }
        if Instant::now() > deadline {
            return Err(TemplateError::Guest(format!(
                "the agent did not answer ping on vsock port {AGENT_PORT} within {READY_TIMEOUT:?} (last: {last}): does the guest run runv-agent?"
            )));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn ping_agent(vsock: &Path) -> Result<(), String> {
    use std::io::BufRead;
    let mut s = std::os::unix::net::UnixStream::connect(vsock).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(6)))
        .map_err(|e| e.to_string())?;
    s.write_all(format!("CONNECT {AGENT_PORT}\n").as_bytes())
        .map_err(|e| e.to_string())?;
    // Read the handshake line byte by byte so no protocol bytes are consumed.
    let mut line = Vec::new();
    let mut r = std::io::BufReader::with_capacity(1, s.try_clone().map_err(|e| e.to_string())?);
    r.read_until(b'\n', &mut line).map_err(|e| e.to_string())?;
    if !line.starts_with(b"OK ") {
        return Err(format!(
            "vsock handshake: {:?}",
            String::from_utf8_lossy(&line)
        ));
    }
    let mut c = protocol::client::Client::from_stream(s).map_err(|e| e.to_string())?;
    match c.call_timeout(&protocol::Request::Ping, Duration::from_secs(2)) {
        Ok(protocol::Response::Pong { ready: true, .. }) => Ok(()),
        Ok(other) => Err(format!("ping answered {other:?}")),
        Err(e) => Err(e.to_string()),
    }
}

/// Lets group `gid` (the jailed VMMs') read the snapshot in `dir`: the directory becomes
/// `root:gid 0750` and its files `root:gid 0640` (a snapshot is written `0600`).
pub fn grant_read(dir: &Path, gid: u32) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::os::unix::fs::chown(dir, Some(0), Some(gid))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o750))?;
    for f in std::fs::read_dir(dir)? {
        let f = f?;
        if f.file_type()?.is_file() {
            std::os::unix::fs::chown(f.path(), Some(0), Some(gid))?;
            std::fs::set_permissions(f.path(), std::fs::Permissions::from_mode(0o640))?;
        }
    }
    Ok(())
}

/// Like [`grant_read`], and lets a clone in group `gid` publish the template's working set
/// there: the directory becomes `root:gid 01770` (sticky: the group may add files, never
/// remove or replace the template's own, which stay `root:gid 0640`).
pub fn grant_record(dir: &Path, gid: u32) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    grant_read(dir, gid)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o1770))
}

/// Whether clones of `t` still record a working set (a uffd template without one yet).
pub fn records_working_set(t: &Template) -> bool {
    t.meta.spec.mem_mode == vmm_api::MemoryMode::Uffd
        && !t.tmpfs.join(snapshot::workingset::WORKINGSET_FILE).exists()
}

/// Opens the template in `durable`: reads `template.json`, makes the tmpfs copy under
/// `tmpfs_root` if it is missing, and checks the copy as a snapshot.
pub fn open(durable: &Path, tmpfs_root: &Path) -> Result<Template, TemplateError> {
    let meta_path = durable.join(META_FILE);
    let bytes = std::fs::read(&meta_path).map_err(io("reading", &meta_path))?;
    let meta: TemplateMeta =
        serde_json::from_slice(&bytes).map_err(|e| TemplateError::Snapshot {
            path: durable.to_path_buf(),
            detail: format!("{META_FILE}: {e}"),
        })?;
    let tmpfs = tmpfs_root.join(&meta.name);
    if !tmpfs.join("state.bin").exists() || !tmpfs.join("memory.bin").exists() {
        let _ = std::fs::remove_dir_all(&tmpfs);
        let part = tmpfs_root.join(format!(".{}.copying", meta.name));
        let _ = std::fs::remove_dir_all(&part);
        std::fs::create_dir_all(&part).map_err(io("creating", &part))?;
        for f in ["state.bin", "memory.bin"] {
            sparse_copy(&durable.join(f), &part.join(f))?;
        }
        std::fs::rename(&part, &tmpfs).map_err(io("publishing", &tmpfs))?;
    }
    let t = Template {
        meta,
        durable: durable.to_path_buf(),
        tmpfs,
    };
    t.check()?;
    Ok(t)
}

impl Template {
    /// Checks the tmpfs copy the way a restore opens it (state checksum, memory trailer and
    /// length) and that its RAM matches `template.json`.
    pub fn check(&self) -> Result<(), TemplateError> {
        let (dir, ()) = snapshot::SnapshotDir::open::<AnyState>(&self.tmpfs, None)
            .map(|(d, _)| (d, ()))
            .map_err(|e| TemplateError::Snapshot {
                path: self.tmpfs.clone(),
                detail: e.to_string(),
            })?;
        if dir.mem_size() != self.meta.spec.mem_mib << 20 {
            return Err(TemplateError::Snapshot {
                path: self.tmpfs.clone(),
                detail: format!(
                    "{} bytes of RAM but {META_FILE} says {} MiB",
                    dir.mem_size(),
                    self.meta.spec.mem_mib
                ),
            });
        }
        Ok(())
    }

    /// Removes both copies.
    pub fn remove(&self) {
        let _ = std::fs::remove_dir_all(&self.tmpfs);
        let _ = std::fs::remove_dir_all(&self.durable);
    }
}

/// Copies `src` to a new file `dst`, keeping holes (only data extents are written).
fn sparse_copy(src: &Path, dst: &Path) -> Result<(), TemplateError> {
    let mut from = File::open(src).map_err(io("opening", src))?;
    let len = from.metadata().map_err(io("stat", src))?.len();
    let mut to = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(dst)
        .map_err(io("creating", dst))?;
    to.set_len(len).map_err(io("sizing", dst))?;
    let extents = snapshot::memory::data_extents(&from, len).map_err(io("scanning", src))?;
    let mut buf = vec![0u8; 1 << 20];
    for (start, end) in extents {
        from.seek(SeekFrom::Start(start))
            .map_err(io("seeking", src))?;
        to.seek(SeekFrom::Start(start))
            .map_err(io("seeking", dst))?;
        let mut left = end - start;
        while left > 0 {
            let n = left.min(buf.len() as u64) as usize;
            from.read_exact(&mut buf[..n]).map_err(io("reading", src))?;
            to.write_all(&buf[..n]).map_err(io("writing", dst))?;
            left -= n as u64;
        }
    }
    to.sync_all().map_err(io("syncing", dst))?;
    Ok(())
}

/// The machine state of `state.bin`, accepted without decoding it (it is the `vmm` crate's):
/// every byte is consumed so the snapshot crate's checks run.
struct AnyState;

impl<'de> Deserialize<'de> for AnyState {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = AnyState;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("any bytes")
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut s: A,
            ) -> Result<AnyState, A::Error> {
                // bincode ends the sequence with an error at the end of the input.
                while let Ok(Some(_)) = s.next_element::<u8>() {}
                Ok(AnyState)
            }
        }
        d.deserialize_tuple(usize::MAX, V)
    }
}
