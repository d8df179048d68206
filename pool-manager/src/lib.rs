//! The pool manager's library: templates, pools of ready VMs and leased sandboxes.
//!
//! A [`ShellProcess`] is a `runv-vmm --shell` process: a KVM VM with memslots and vCPUs but no
//! guest, waiting on its control socket. [`Pool`] keeps, per template, shells (and warm clones)
//! ready, refilled by background threads, so creating a VM (about 8 ms of KVM work here) is
//! never on the request path: a clone costs the `restore` command only. [`ShellPool`] is the
//! minimal template-less pool used by the VMM's tests.

mod build_jail;
pub mod manager;
pub mod metrics;
pub mod names;
pub mod network;
pub mod pool;
pub mod priority;
pub mod sandbox;
pub mod server;
pub mod shell;
pub mod template;
pub mod warm;

pub use manager::{AcquireRequest, ErrorClass, Pool, PoolConfig, PoolCounters, PoolError};
pub use pool::ShellPool;
pub use sandbox::{
    BuildProgress, PoolInfo, PoolTargets, SandboxInfo, SandboxState, TemplateInfo, TemplateStatus,
    Tier,
};
pub use shell::{remove_leftovers, ShellError, ShellJail, ShellProcess, ShellSpec};
pub use template::{BuildStep, ReadyCheck, Template, TemplateError, TemplateMeta, TemplateSpec};
pub use vmm_api;
