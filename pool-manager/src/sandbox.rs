//! What the pool reports about templates, pools and sandboxes (the API's objects).

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::template::TemplateSpec;

/// Which tier served an acquire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Tier {
    /// A warm clone (restored, paused) was activated.
    Warm,
    /// A ready shell restored the template.
    Shell,
    /// The pool was empty: a shell was created on the spot.
    Cold,
}

impl Tier {
    /// All tiers, in order of preference.
    pub const ALL: [Tier; 3] = [Tier::Warm, Tier::Shell, Tier::Cold];

    /// Lower-case name.
    pub fn as_str(self) -> &'static str {
        match self {
            Tier::Warm => "warm",
            Tier::Shell => "shell",
            Tier::Cold => "cold",
        }
    }
}

/// Lifecycle of a leased sandbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SandboxState {
    /// The clone runs.
    Running,
    /// Its VMM died; it stays listed (cleaned up) until released.
    Dead,
}

/// A leased sandbox.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SandboxInfo {
    /// Sandbox id (also the clone id in the guest's identity page).
    pub id: String,
    /// Template it was cloned from.
    pub template: String,
    /// Identity generation the clone runs with.
    pub generation: u64,
    /// Tier that served it.
    pub tier: Tier,
    /// Host-side Unix socket of its vsock device.
    pub vsock_uds: PathBuf,
    /// Its VMM's control socket.
    pub control: PathBuf,
    /// Its debug report log.
    pub debug_log: PathBuf,
    /// VMM process id.
    pub pid: u32,
    /// Milliseconds from the acquire request to the clone running.
    pub acquire_ms: f64,
    /// Running or dead.
    pub state: SandboxState,
    /// Unix time (seconds) after which it is released, if it has a TTL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<u64>,
    /// Caller's labels.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Its network, if it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<crate::network::SandboxNetInfo>,
    /// Its VM's TAP, for a template built with `net`: inside `network.netns` when it has a
    /// network, else in the host's namespace, down — ready to be joined to a CRI pod's
    /// namespace with [`crate::network::pod::connect`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tap: Option<String>,
}

/// Health of a template.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", tag = "status", content = "reason")]
pub enum TemplateStatus {
    /// Clones can be made.
    Ready,
    /// Its snapshot failed a check: the reason says what (rebuild it).
    Broken(String),
}

/// A template as listed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TemplateInfo {
    /// Name.
    pub name: String,
    /// What it was built from (absent when its metadata is unreadable).
    pub spec: Option<TemplateSpec>,
    /// Ready or broken.
    #[serde(flatten)]
    pub status: TemplateStatus,
    /// Build time in seconds.
    pub build_s: f64,
    /// Live (leased) sandboxes of it.
    pub sandboxes: usize,
}

/// Targets of a template's pool.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolTargets {
    /// Warm clones kept ready.
    #[serde(default)]
    pub warm: usize,
    /// Shells kept ready.
    #[serde(default)]
    pub shells: usize,
    /// Most leased sandboxes of the template at once (0 = no limit).
    #[serde(default)]
    pub max_sandboxes: usize,
    /// Give sandboxes networks (namespace, TAP, an address block of this range, NAT with
    /// egress); the template must have been built with `net`. Absent: no networks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<crate::network::PoolNetwork>,
}

/// A template's pool as listed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PoolInfo {
    /// Template.
    pub template: String,
    /// Targets.
    pub targets: PoolTargets,
    /// Warm clones ready now.
    pub warm: usize,
    /// Shells ready now.
    pub shells: usize,
    /// Leased sandboxes.
    pub leased: usize,
    /// Consecutive refill failures (backoff grows with them).
    pub refill_failures: u32,
}

/// A template being built (`GET /v1/templates/{name}` while `POST /v1/templates` runs).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BuildProgress {
    /// Name.
    pub name: String,
    /// Always `building`.
    pub status: String,
    /// The step it is at.
    pub step: crate::template::BuildStep,
    /// Its 1-based number, of `steps`.
    pub step_no: usize,
    /// Steps in a build.
    pub steps: usize,
    /// What the step does.
    pub label: String,
    /// Seconds since the build started.
    pub elapsed_s: f64,
}
