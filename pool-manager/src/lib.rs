//! The pool manager's library: VM shells made ahead of time and turned into clones on request.
//!
//! A [`ShellProcess`] is a `runv-vmm --shell` process: a KVM VM with memslots and vCPUs but no
//! guest, waiting on its control socket. [`ShellPool`] keeps a number of them ready, refilled by
//! background threads, so creating a VM (about 8 ms of KVM work here) is never on the request
//! path: a clone costs the `restore` command only.

pub mod pool;
pub mod shell;

pub use pool::ShellPool;
pub use shell::{ShellError, ShellProcess, ShellSpec};
pub use vmm_api;
