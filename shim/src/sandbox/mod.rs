//! Where a container runs. [`Kind::Host`] (now): a `runv-agent` host process per container,
//! namespaces and cgroups only, no VM. [`Kind::Vm`]: a clone from `runv-pool`, its agent
//! reached over vsock (`CONNECT <port>`), clone hooks run. Both hand out the same thing, a
//! [`protocol::client::Client`] of the container's agent, so the CLI, the monitor, bundle
//! handling and stdio relaying are shared.

pub mod host;
pub mod manage;
pub mod vm;

use std::path::PathBuf;

use protocol::client::{Client, ClientError};

use crate::state::{ContainerDir, Record};

/// Why a sandbox cannot be had or reached.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// An unknown `--sandbox` value.
    #[error("unknown sandbox {0:?}: use --sandbox vm or --sandbox host")]
    UnknownKind(String),
    /// The vm backend has nothing to clone from.
    #[error("the vm sandbox needs a VM template served by runv-pool (build one with `runv-pool template build NAME --kernel ...` and run the runv-pool daemon); none is configured. On hosts without virtualization use --sandbox host (or RUNV_SANDBOX=host), which runs containers as host processes without VM isolation")]
    NoTemplate,
    /// No agent binary.
    #[error("runv-agent not found: set RUNV_AGENT, put runv-agent next to runv, or on PATH (build it with scripts/build-agent.sh)")]
    NoAgent,
    /// Starting the agent failed.
    #[error("starting the agent {0}: {1}")]
    Spawn(PathBuf, std::io::Error),
    /// The agent's socket could not be made.
    #[error("binding the agent's socket {0}: {1}")]
    Bind(PathBuf, std::io::Error),
    /// The host agent this process started does not answer (it failed to start or died).
    #[error("the container's agent does not answer: {1} (it failed to start or died: see {0})")]
    AgentGone(PathBuf, ClientError),
    /// The vm backend failed.
    #[error(transparent)]
    Vm(#[from] vm::VmError),
    /// The agent of an existing container is unreachable.
    #[error("container {0}: cannot reach its agent: {1} (has it stopped? `runv delete {0}`)")]
    Unreachable(String, ClientError),
}

/// A sandbox backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Host processes (no VM isolation).
    Host,
    /// A microVM from runv-pool.
    Vm,
}

impl Kind {
    /// Parses `host` or `vm`.
    pub fn parse(s: &str) -> Result<Self, SandboxError> {
        match s {
            "host" => Ok(Self::Host),
            "vm" => Ok(Self::Vm),
            other => Err(SandboxError::UnknownKind(other.into())),
        }
    }

    /// The name recorded in state and the `runv.sandbox` annotation.
    pub fn name(self) -> &'static str {
        match self {
            Self::Host => "host",
            Self::Vm => "vm",
        }
    }

    /// Checks, before anything is created, that the backend can run containers here.
    pub fn preflight(self) -> Result<(), SandboxError> {
        match self {
            Self::Host => host::find_agent().map(|_| ()),
            Self::Vm => vm::preflight(),
        }
    }

    /// Starts a sandbox for the container in `dir` whose spec is `spec` (the vm backend takes
    /// its hostname and network from it). `first` names the first container's root file system
    /// when it is known already: the vm backend then builds its image while the clone is
    /// leased, and [`Sandbox::rootfs`] for it only attaches it.
    pub fn launch(
        self,
        dir: &ContainerDir,
        spec: Option<&oci_spec::runtime::Spec>,
        first: Option<FirstRootfs<'_>>,
    ) -> Result<Box<dyn Sandbox>, SandboxError> {
        match self {
            Self::Host => Ok(Box::new(host::HostSandbox::launch(dir)?)),
            Self::Vm => Ok(Box::new(vm::launch(dir, spec, first)?)),
        }
    }

    /// Adapts the spec the agent gets to this backend: in a VM, a network namespace path is the
    /// host's (the VM is joined to it, see [`vm::net`]), so it is dropped.
    pub fn guest_spec(self, spec: &mut oci_spec::runtime::Spec) {
        if self == Self::Vm {
            vm::net::strip_pod_netns(spec);
        }
    }
}

/// The first container of a sandbox and its root file system (a host directory), as known
/// when the sandbox is launched.
#[derive(Debug, Clone, Copy)]
pub struct FirstRootfs<'a> {
    /// The container's id.
    pub container: &'a str,
    /// Its root file system on the host.
    pub dir: &'a std::path::Path,
}

/// A running sandbox, owned by the container's monitor.
pub trait Sandbox {
    /// A new connection to its agent.
    fn client(&self) -> Result<Client, SandboxError>;
    /// The host pid standing for the sandbox (agent or VMM process).
    fn pid(&self) -> i32;
    /// How `container`'s root file system `rootfs` (a host directory) reaches the agent: the
    /// directory itself on the host, an EROFS image in a disk slot of its own in a VM.
    fn rootfs(
        &mut self,
        container: &str,
        rootfs: &std::path::Path,
    ) -> Result<protocol::RootfsSource, SandboxError> {
        let _ = container;
        Ok(protocol::RootfsSource::Bind {
            path: rootfs.display().to_string(),
        })
    }
    /// Gives back what [`Sandbox::rootfs`] took for `container` (a VM's disk slot), once the
    /// container is destroyed.
    fn release_rootfs(&mut self, container: &str) -> Result<(), SandboxError> {
        let _ = container;
        Ok(())
    }
    /// Where its agent's own errors go, for a caller whose connection to it broke (the host
    /// agent's stderr log; a VM's agent has none on the host).
    fn agent_log(&self) -> Option<&std::path::Path> {
        None
    }
    /// Ends the sandbox and waits for it (idempotent).
    fn shutdown(&mut self);
}

/// Connects to the agent of an existing container (any runv command but `create`).
pub fn connect(dir: &ContainerDir, record: &Record) -> Result<Client, SandboxError> {
    if record.sandbox == Kind::Vm.name() {
        return Ok(vm::connect_record(dir)?);
    }
    Client::connect(&dir.agent_socket()).map_err(|e| SandboxError::Unreachable(dir.id.clone(), e))
}
