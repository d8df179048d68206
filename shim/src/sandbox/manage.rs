//! Managing a running sandbox, shared by `runv pause`/`resume`/`update` and the containerd
//! shim's Pause/Resume/Update: freezing (the vm backend parks the VM's vCPUs; the host backend
//! freezes the container's processes through the agent's cgroup freezer) and the subset of OCI
//! `linux.resources` the agent applies.

use protocol::{Request, Resources};

use super::{vm, Kind, SandboxError};
use crate::state::ContainerDir;

/// `pause` or `resume`, for messages.
pub fn verb(pause: bool) -> &'static str {
    if pause {
        "pause"
    } else {
        "resume"
    }
}

/// What `pause` freezes on a backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Freezer {
    /// The whole VM (its vCPUs, through the VMM's control API): every container in it.
    Vm,
    /// One container's processes (its cgroup's freezer, through the agent): [`agent_request`].
    Agent,
}

/// How a `kind` sandbox pauses.
pub fn freezer(kind: Kind) -> Freezer {
    match kind {
        Kind::Vm => Freezer::Vm,
        Kind::Host => Freezer::Agent,
    }
}

/// Pauses (`pause`) or resumes the VM of the vm sandbox recorded in `dir`.
pub fn pause_vm(dir: &ContainerDir, pause: bool) -> Result<(), SandboxError> {
    Ok(vm::pause_record(dir, pause)?)
}

/// The agent request that freezes (`pause`) or thaws container `id`.
pub fn agent_request(id: &str, pause: bool) -> Request {
    let id = id.to_string();
    if pause {
        Request::Pause { id }
    } else {
        Request::Resume { id }
    }
}

/// The limits of an OCI `linux.resources` runv applies (memory, pids, cpu quota and period);
/// zero or negative values mean "unset", as in runc.
pub fn resources(r: &oci_spec::runtime::LinuxResources) -> Resources {
    let cpu = r.cpu().as_ref();
    Resources {
        memory: r
            .memory()
            .as_ref()
            .and_then(|m| m.limit())
            .filter(|&l| l > 0),
        pids: r.pids().as_ref().map(|p| p.limit()).filter(|&l| l > 0),
        cpu_quota: cpu.and_then(|c| c.quota()).filter(|&q| q > 0),
        cpu_period: cpu.and_then(|c| c.period()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resources_subset_and_freezers() {
        let r: oci_spec::runtime::LinuxResources = serde_json::from_str(
            r#"{"memory":{"limit":67108864},"pids":{"limit":0},"cpu":{"quota":5000,"period":10000}}"#,
        )
        .unwrap();
        assert_eq!(
            resources(&r),
            Resources {
                memory: Some(67108864),
                pids: None,
                cpu_quota: Some(5000),
                cpu_period: Some(10000),
            }
        );
        assert_eq!(freezer(Kind::Vm), Freezer::Vm);
        assert_eq!(freezer(Kind::Host), Freezer::Agent);
        assert_eq!(agent_request("c", true), Request::Pause { id: "c".into() });
        assert_eq!(
            agent_request("c", false),
            Request::Resume { id: "c".into() }
        );
    }
}
