//! Requests, replies and the option types they carry.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Longest clone id (bytes): the identity page holds 64 bytes, NUL padded.
pub const MAX_CLONE_ID: usize = 63;

/// One control request (`{"cmd": "<name>", ...}` on the wire). Unknown fields are refused.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// VM (or shell) state: [`StatusReply`].
    Status {},
    /// Park every vCPU: [`StateReply`].
    Pause {},
    /// Unpark the vCPUs: [`StateReply`].
    Resume {},
    /// End the VM (or shell) cleanly: [`StateReply`].
    Shutdown {},
    /// Pause (if running) and write a snapshot into an existing directory: [`SnapshotReply`].
    Snapshot {
        /// Snapshot directory; it must exist and must not be the one this VM was restored from.
        dir: PathBuf,
    },
    /// Restore a snapshot into this idle shell: [`RestoreReply`].
    Restore(RestoreOptions),
    /// Give a clone restored with [`RestoreOptions::paused`] (and never run since) its identity
    /// (this clone id, fresh entropy, the restore's generation) and resume it: [`ActivateReply`].
    /// A warm pool restores clones ahead of time and activates one per acquire.
    Activate {
        /// Clone id written into the identity page (at most [`MAX_CLONE_ID`] bytes, no NUL).
        clone_id: String,
        /// The guest's IPv4 address, written into the identity page's `ipv4` field (a warm
        /// clone's network identity is given here, at acquire, not at its restore); absent:
        /// the field keeps what the restore wrote. Refused for a VM without a network device.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        ipv4: Option<std::net::Ipv4Addr>,
    },
    /// Swap disk slot `slot` (the block device with id `runv-slot<slot>`) of a running VM to
    /// `path`, a regular file or block device: [`DiskReply`]. The guest sees a capacity change
    /// (config generation bump and configuration-change interrupt), as for a resize.
    AttachDisk {
        /// Slot index: the block device's index in the config (`--block` order).
        slot: usize,
        /// New backing file (regular file or block device; symbolic links are refused).
        path: PathBuf,
        /// Refuse the guest's writes to it.
        #[serde(default)]
        read_only: bool,
        /// The disk comes as a file descriptor sent with this request line (`SCM_RIGHTS`):
        /// the VMM uses it and never opens `path`, which only labels the disk in errors. A
        /// jailed VMM cannot see the host's images, so this is how it gets them
        /// ([`crate::ControlClient::attach_disk`] sends one). Without it the VMM opens `path`.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        fd: bool,
    },
    /// Put slot `slot`'s placeholder (the template's or snapshot's backing file) back:
    /// [`DiskReply`]. Detaching a slot that holds its placeholder changes nothing.
    DetachDisk {
        /// Slot index.
        slot: usize,
    },
}

/// Id (virtio-blk serial) of disk slot `slot`: `runv-slot<slot>`.
pub fn slot_id(slot: usize) -> String {
    format!("{SLOT_ID_PREFIX}{slot}")
}

/// Prefix of a disk slot's id; see [`slot_id`].
pub const SLOT_ID_PREFIX: &str = "runv-slot";

impl Request {
    /// Whether a file descriptor comes with this request line (`attach_disk` with `fd: true`).
    pub fn carries_fd(&self) -> bool {
        matches!(self, Request::AttachDisk { fd: true, .. })
    }

    /// The request's name on the wire (`cmd`).
    pub fn name(&self) -> &'static str {
        match self {
            Request::Status {} => "status",
            Request::Pause {} => "pause",
            Request::Resume {} => "resume",
            Request::Shutdown {} => "shutdown",
            Request::Snapshot { .. } => "snapshot",
            Request::Restore(_) => "restore",
            Request::Activate { .. } => "activate",
            Request::AttachDisk { .. } => "attach_disk",
            Request::DetachDisk { .. } => "detach_disk",
        }
    }
}

/// How a restore maps the snapshot's memory.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MemoryMode {
    /// Read the memory file into fresh guest RAM.
    Copy,
    /// Map the memory file copy-on-write: clones share its page cache, writes stay private.
    #[default]
    Cow,
    /// `cow` served through userfaultfd, with working-set record and prefetch.
    Uffd,
}

impl std::str::FromStr for MemoryMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "copy" => Ok(Self::Copy),
            "cow" => Ok(Self::Cow),
            "uffd" => Ok(Self::Uffd),
            _ => Err(format!("memory mode {s:?}: use copy, cow or uffd")),
        }
    }
}

/// Where a VM's serial console goes (`stdout`, `none` or `file:PATH` as a string).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum SerialOutput {
    /// The VMM's stdout.
    #[default]
    Stdout,
    /// Discarded.
    None,
    /// Appended to a file.
    File(PathBuf),
}

/// A serial output spec that is none of `stdout`, `none`, `file:PATH`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("serial output {0:?}: use stdout, none or file:PATH")]
pub struct BadSerialOutput(pub String);

impl std::str::FromStr for SerialOutput {
    type Err = BadSerialOutput;
    fn from_str(s: &str) -> Result<Self, BadSerialOutput> {
        match s {
            "stdout" => Ok(Self::Stdout),
            "none" => Ok(Self::None),
            _ => match s.strip_prefix("file:") {
                Some(p) if !p.is_empty() => Ok(Self::File(p.into())),
                _ => Err(BadSerialOutput(s.into())),
            },
        }
    }
}

impl TryFrom<String> for SerialOutput {
    type Error = BadSerialOutput;
    fn try_from(s: String) -> Result<Self, BadSerialOutput> {
        s.parse()
    }
}

impl From<SerialOutput> for String {
    fn from(s: SerialOutput) -> String {
        match s {
            SerialOutput::Stdout => "stdout".into(),
            SerialOutput::None => "none".into(),
            SerialOutput::File(p) => format!("file:{}", p.display()),
        }
    }
}

/// A block device whose backing file a restore replaces.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BlockOverride {
    /// Index of the device in the snapshot's config (`--block` order).
    pub index: usize,
    /// New backing file; it must have the same size as the snapshot's.
    pub path: PathBuf,
}

/// Shortest working-set recording window: a shorter one would publish a set too small to
/// represent what clones touch.
pub const MIN_RECORD_MS: u64 = 100;
/// Longest working-set recording window.
pub const MAX_RECORD_MS: u64 = 60_000;

/// Default for [`RestoreOptions::record_ms`].
pub const DEFAULT_RECORD_MS: u64 = 2000;

fn default_record_ms() -> u64 {
    DEFAULT_RECORD_MS
}

/// Per-clone settings of a restore (the body of the `restore` request, and `runv-vmm --restore`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RestoreOptions {
    /// Snapshot directory.
    pub dir: PathBuf,
    /// Memory mode.
    #[serde(default)]
    pub mem_mode: MemoryMode,
    /// Clone id written into the identity page (at most [`MAX_CLONE_ID`] bytes, no NUL).
    #[serde(default)]
    pub clone_id: String,
    /// Serial console of the clone.
    #[serde(default)]
    pub serial: SerialOutput,
    /// Debug report log of the clone (`-` = stdout).
    #[serde(default)]
    pub debug_log: Option<String>,
    /// Control socket of the clone (a shell keeps its own connections and socket).
    #[serde(default)]
    pub control: Option<PathBuf>,
    /// Host-side Unix socket of the clone's vsock device.
    #[serde(default)]
    pub vsock_uds: Option<PathBuf>,
    /// Replaced block backing files.
    #[serde(default)]
    pub block: Vec<BlockOverride>,
    /// `uffd` mode: how long the first clone records its working set, in milliseconds.
    #[serde(default = "default_record_ms")]
    pub record_ms: u64,
    /// Restore but keep the vCPUs parked until an `activate` (a warm clone) or `resume`.
    #[serde(default)]
    pub paused: bool,
    /// The clone's own network device settings: its TAP, MAC and the address announced in its
    /// identity page (the snapshot's TAP is normally the template's, busy while it runs).
    #[serde(default)]
    pub net: Option<crate::NetConfig>,
}

impl RestoreOptions {
    /// Options for restoring `dir` in `mem_mode` with defaults for everything else.
    pub fn new(dir: impl Into<PathBuf>, mem_mode: MemoryMode) -> Self {
        Self {
            dir: dir.into(),
            mem_mode,
            clone_id: String::new(),
            serial: SerialOutput::default(),
            debug_log: None,
            control: None,
            vsock_uds: None,
            block: Vec::new(),
            record_ms: DEFAULT_RECORD_MS,
            paused: false,
            net: None,
        }
    }

    /// Checks what can be checked without the snapshot: the clone id fits the identity page
    /// and the recording window is in range.
    pub fn validate(&self) -> Result<(), String> {
        validate_clone_id(&self.clone_id)?;
        if let Some(n) = &self.net {
            n.validate().map_err(|e| e.to_string())?;
        }
        if !(MIN_RECORD_MS..=MAX_RECORD_MS).contains(&self.record_ms) {
            return Err(format!(
                "record_ms {}: use {MIN_RECORD_MS}..={MAX_RECORD_MS} (a shorter recording is not a representative working set)",
                self.record_ms
            ));
        }
        Ok(())
    }
}

/// Checks that `clone_id` fits the identity page: at most [`MAX_CLONE_ID`] bytes, no NUL.
pub fn validate_clone_id(clone_id: &str) -> Result<(), String> {
    if clone_id.len() > MAX_CLONE_ID || clone_id.contains('\0') {
        return Err(format!(
            "clone id {clone_id:?} is {} bytes: use at most {MAX_CLONE_ID} bytes and no NUL",
            clone_id.len()
        ));
    }
    Ok(())
}

/// What a VMM process is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VmState {
    /// A VM shell waiting for a `restore`.
    Shell,
    /// vCPUs running.
    Running,
    /// vCPUs parked.
    Paused,
    /// Ending.
    Stopping,
}

/// How a `uffd` clone's faults are raised and answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FaultMode {
    /// MINOR faults on a `MAP_PRIVATE` shmem mapping, answered with `UFFDIO_CONTINUE`.
    Minor,
    /// MISSING faults on anonymous memory, answered with `UFFDIO_COPY` from the file.
    Missing,
    /// No lazy serving (the host's KVM does not wait on userfaultfd): copy-on-write mapping,
    /// working set from the page tables, prefetch with `MADV_POPULATE_READ`.
    Populate,
}

/// Counters of a `uffd` clone's page server.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct UffdStats {
    /// Fault mode.
    pub mode: FaultMode,
    /// Faults served by the handler thread.
    pub faults: u64,
    /// Pages installed in bulk from the working set before the vCPUs ran.
    pub prefetched_pages: u64,
    /// Pages this clone recorded as the new working set (0 when it prefetched one).
    pub recorded_pages: u64,
    /// Time spent prefetching, in microseconds.
    pub prefetch_us: u64,
    /// Mean time to serve one fault, in microseconds.
    pub mean_fault_us: f64,
}

/// Reply to `status`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatusReply {
    /// [`crate::PROTOCOL_VERSION`] of the VMM.
    pub version: u32,
    /// What the process is doing.
    pub state: VmState,
    /// vCPUs.
    pub vcpus: u8,
    /// Guest RAM in MiB.
    pub mem_mib: u64,
    /// Identity generation (0 at cold boot; absent for a shell).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generation: Option<u64>,
    /// Memory mode of a restored VM.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mem_mode: Option<MemoryMode>,
    /// Page-server counters of a `uffd` clone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uffd: Option<UffdStats>,
}

/// Reply to `pause`, `resume` and `shutdown`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateReply {
    /// State after the request.
    pub state: VmState,
}

/// Reply to `snapshot`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SnapshotReply {
    /// State after the snapshot (paused).
    pub state: VmState,
    /// Time the snapshot took, in milliseconds.
    pub ms: f64,
    /// Bytes of non-zero guest memory written.
    pub memory_bytes: u64,
}

/// Reply to `restore`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RestoreReply {
    /// State after the restore (running).
    pub state: VmState,
    /// Time the restore took inside the VMM, in milliseconds.
    pub restore_ms: f64,
    /// Identity generation of the clone (the snapshot's + 1).
    pub generation: u64,
    /// Page-server counters of a `uffd` clone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uffd: Option<UffdStats>,
}

/// Reply to `activate`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ActivateReply {
    /// State after the request (running).
    pub state: VmState,
    /// Identity generation the guest now sees.
    pub generation: u64,
}

/// Reply to `attach_disk` and `detach_disk`: what the slot holds now.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskReply {
    /// The slot.
    pub slot: usize,
    /// Capacity the guest now sees, in 512-byte sectors.
    pub capacity_sectors: u64,
    /// The device's serial (virtio-blk id), `runv-slot<slot>`.
    pub serial: String,
}

/// Machine-readable class of an [`ApiError`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// The line is not a valid request (JSON, command, fields, values).
    BadRequest,
    /// The line is longer than [`crate::MAX_LINE`]; the connection is closed.
    TooLong,
    /// The request does not fit what the process is doing (e.g. `pause` on a shell).
    InvalidState,
    /// The request was valid but carrying it out failed; the message says why.
    Failed,
}

/// An error reply: `{"ok": false, "kind": ..., "error": ...}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{error} ({kind:?})")]
pub struct ApiError {
    /// Class of error.
    pub kind: ErrorKind,
    /// What failed and what to do.
    pub error: String,
}

impl ApiError {
    /// An error of `kind` with message `error`.
    pub fn new(kind: ErrorKind, error: impl Into<String>) -> Self {
        Self {
            kind,
            error: error.into(),
        }
    }
}
