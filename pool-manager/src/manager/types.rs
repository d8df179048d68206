//! The pool's public configuration, request, counter and error types.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use crate::names::InvalidName;
use crate::shell::ShellError;
use crate::template::TemplateError;

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
    /// Jail every pooled VMM (`runv-vmm --jail`, see [`crate::ShellJail`]); `None` runs them
    /// unconfined as root. The daemon jails by default (`--no-jail` opts out).
    pub jail: Option<crate::ShellJail>,
}

/// Error of a pool operation; [`PoolError::class`] classifies it for an API.
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
    /// Setting up or tearing down a sandbox network failed.
    #[error("sandbox network: {0}")]
    Net(#[from] crate::network::NetError),
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
            PoolError::Net(crate::network::NetError::Config(_)) => ErrorClass::BadRequest,
            PoolError::Net(crate::network::NetError::Exhausted(_)) => ErrorClass::Conflict,
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
    /// Whether the sandbox gets a network: `None` = the pool's setting (a network when its
    /// targets have one), `Some(true)` requires the pool's network, `Some(false)` = none.
    pub network: Option<bool>,
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
