//! [`VmmError`]: the top-level error of building, restoring, snapshotting and running a VM.
//! Lower modules return their own errors (or `io::Error`); this one wraps them with context.

use crate::memory::MemoryError;

/// Error building or running a VM.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    /// Invalid configuration.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// /dev/kvm unusable.
    #[error("opening /dev/kvm failed: {0} (is KVM available and are you allowed to use it?)")]
    Kvm(kvm_ioctls::Error),
    /// A VM-level KVM ioctl failed.
    #[error("{op} failed: {source}")]
    VmIoctl {
        /// The ioctl.
        op: &'static str,
        /// Cause.
        source: kvm_ioctls::Error,
    },
    /// Guest memory.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// Boot state.
    #[error(transparent)]
    Boot(#[from] crate::boot::BootError),
    /// vCPU configuration.
    #[error(transparent)]
    Cpu(#[from] crate::cpu::CpuError),
    /// A block device's backing file.
    #[error(transparent)]
    Block(#[from] crate::devices::virtio::block::BlockError),
    /// Snapshot state file.
    #[error(transparent)]
    Snapshot(#[from] snapshot::SnapshotError),
    /// Snapshot memory file.
    #[error(transparent)]
    SnapshotMemory(#[from] snapshot::memory::MemoryFileError),
    /// KVM state save/restore.
    #[error(transparent)]
    Persist(#[from] crate::persist::PersistError),
    /// userfaultfd page serving.
    #[error(transparent)]
    Uffd(#[from] crate::uffd::UffdError),
    /// A snapshot does not fit the shell or the restore options.
    #[error("{0}")]
    Mismatch(String),
    /// The request or option is not valid here.
    #[error("{0}")]
    Invalid(String),
    /// The vsock device.
    #[error(transparent)]
    Vsock(#[from] crate::devices::virtio::vsock::VsockError),
    /// The network device (its TAP).
    #[error(transparent)]
    Net(#[from] crate::devices::virtio::net::NetError),
    /// Control socket.
    #[error(transparent)]
    Control(#[from] crate::control::ControlError),
    /// Opening an output file, an eventfd, a thread, epoll.
    #[error("{what}: {source}")]
    Io {
        /// What failed.
        what: String,
        /// Cause.
        source: std::io::Error,
    },
}

/// Wraps an `io::Error` with what was being done.
pub(crate) fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> VmmError {
    let what = what.into();
    move |source| VmmError::Io { what, source }
}

/// Wraps a failed VM ioctl with its name.
pub(crate) fn vm_err(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmmError {
    move |source| VmmError::VmIoctl { op, source }
}
