//! Managing a running sandbox, shared by `runv pause`/`resume`/`update` and the containerd
//! shim's Pause/Resume/Update: freezing (the vm backend parks the VM's vCPUs; the host backend
//! has no freezer) and the subset of OCI `linux.resources` the agent applies.

use protocol::Resources;

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

/// Whether a `kind` sandbox can be paused and resumed; the refusal says why not.
pub fn check_pausable(kind: Kind, pause: bool) -> Result<(), SandboxError> {
    match kind {
        Kind::Vm => Ok(()),
        Kind::Host => Err(SandboxError::NoFreezer(verb(pause), kind.name())),
    }
}

/// Pauses (`pause`) or resumes the `kind` sandbox recorded in `dir`: a VM's vCPUs through its
/// VMM's control API.
pub fn pause(kind: Kind, dir: &ContainerDir, pause: bool) -> Result<(), SandboxError> {
    check_pausable(kind, pause)?;
    Ok(vm::pause_record(dir, pause)?)
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
    fn resources_subset_and_host_refuses_pause() {
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
        assert!(check_pausable(Kind::Vm, true).is_ok());
        let e = check_pausable(Kind::Host, false).unwrap_err().to_string();
        assert!(
            e.contains("resume is not supported with --sandbox host"),
            "{e}"
        );
    }
}
