//! The container spec containerd writes, adapted for the sandbox: what only makes sense on the
//! host is dropped, never a limit the container would then silently lose.

use oci_spec::runtime::Spec;

/// The cgroup v1 `cpu.shares` default: setting it changes nothing.
const DEFAULT_CPU_SHARES: u64 = 1024;

/// Adapts `spec` in place: drops `linux.cgroupsPath` (a host cgroup path means nothing inside the
/// sandbox; the agent places every container under its own group, `runv-<sandbox>/<id>`, which
/// the shim cleans up) and `cpu.shares` when it is the default 1024 that ctr always adds (any
/// other value is left for the agent, which refuses what it cannot enforce).
pub fn adapt(spec: &mut Spec) {
    let Some(l) = spec.linux_mut() else {
        return;
    };
    l.set_cgroups_path(None);
    if let Some(r) = l.resources_mut() {
        if let Some(cpu) = r.cpu_mut() {
            if cpu.shares() == Some(DEFAULT_CPU_SHARES) {
                cpu.set_shares(None);
            }
        }
        if r.cpu().as_ref().is_some_and(|c| {
            c.quota().is_none()
                && c.period().is_none()
                && c.shares().is_none()
                && c.cpus().is_none()
                && c.mems().is_none()
                && c.realtime_runtime().is_none()
                && c.realtime_period().is_none()
                && c.idle().is_none()
        }) {
            r.set_cpu(None);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(shares: u64) -> Spec {
        serde_json::from_value(serde_json::json!({
            "ociVersion": "1.0.2",
            "linux": {"cgroupsPath": "/default/c1",
                      "resources": {"cpu": {"shares": shares}, "memory": {"limit": 1048576}}}
        }))
        .unwrap()
    }

    #[test]
    fn drops_host_only_fields_but_keeps_limits() {
        let mut s = spec(1024);
        adapt(&mut s);
        let l = s.linux().as_ref().unwrap();
        assert_eq!(l.cgroups_path(), &None);
        let r = l.resources().as_ref().unwrap();
        assert!(r.cpu().is_none());
        assert_eq!(r.memory().as_ref().unwrap().limit(), Some(1048576));
        let mut s = spec(512);
        adapt(&mut s);
        let r = s.linux().as_ref().unwrap().resources().as_ref().unwrap();
        assert_eq!(r.cpu().as_ref().unwrap().shares(), Some(512));
    }
}
