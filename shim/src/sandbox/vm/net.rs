//! The vm backend's network. A spec that names a network namespace by path (what CRI/CNI gives a
//! pod) gets a clone without the pool's network whose TAP is joined to the pod's interface
//! (`pool_manager::network::pod::connect`, tc mirred); the guest then takes the pod interface's
//! addresses, default route and MAC, and the name servers of the spec's `/etc/resolv.conf` mount,
//! through the agent's `set_network` hook. Without a path the sandbox has the pool's network when
//! its pool has one (`set_network` with the pool's address), else none.

use std::path::{Path, PathBuf};

use oci_spec::runtime::{LinuxNamespaceType, Spec};
use pool_manager::network::{pod, SandboxNetInfo};
use protocol::{InterfaceConfig, Request, RouteConfig};
use serde::{Deserialize, Serialize};

/// The pod interface CNI makes (`CNI_IFNAME`), joined to the VM.
pub const POD_IFNAME: &str = "eth0";
/// The guest's interface the network goes to.
pub const GUEST_IFNAME: &str = "eth0";

/// How a sandbox gets its network.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NetPlan {
    /// The pod namespace (and its interface) to join, when the spec names one.
    pub pod: Option<(PathBuf, String)>,
    /// Name servers for the guest.
    pub dns: Vec<String>,
}

impl NetPlan {
    /// The plan of `spec`: its network namespace path (joined on [`POD_IFNAME`]) and the name
    /// servers of its `/etc/resolv.conf` mount.
    pub fn from_spec(spec: &Spec) -> Self {
        Self {
            pod: pod_netns(spec).map(|p| (p, POD_IFNAME.to_string())),
            dns: spec_dns(spec),
        }
    }
}

/// The network namespace `spec` names by path, if any.
pub fn pod_netns(spec: &Spec) -> Option<PathBuf> {
    spec.linux()
        .as_ref()?
        .namespaces()
        .as_ref()?
        .iter()
        .find(|n| n.typ() == LinuxNamespaceType::Network)
        .and_then(|n| n.path().clone())
}

/// Drops a network namespace path from the spec the guest's agent gets: the path is the host's
/// (the VM is joined to it); the container shares the guest's network, which has the pod's
/// addresses.
pub fn strip_pod_netns(spec: &mut Spec) {
    let Some(ns) = spec
        .linux_mut()
        .as_mut()
        .and_then(|l| l.namespaces_mut().as_mut())
    else {
        return;
    };
    ns.retain(|n| !(n.typ() == LinuxNamespaceType::Network && n.path().is_some()));
}

/// The `nameserver` addresses of the file the spec mounts on `/etc/resolv.conf` (CRI writes
/// the pod's DNS there); none when it mounts none or the file is unreadable.
pub fn spec_dns(spec: &Spec) -> Vec<String> {
    let source = spec.mounts().as_ref().and_then(|ms| {
        ms.iter()
            .find(|m| m.destination() == Path::new("/etc/resolv.conf"))
            .and_then(|m| m.source().clone())
    });
    source
        .and_then(|s| std::fs::read_to_string(s).ok())
        .map(|t| resolv_nameservers(&t))
        .unwrap_or_default()
}

/// The `nameserver` lines' addresses of resolv.conf text.
pub fn resolv_nameservers(text: &str) -> Vec<String> {
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("nameserver"))
        .filter_map(|a| a.split_whitespace().next())
        .filter(|a| a.parse::<std::net::IpAddr>().is_ok())
        .map(str::to_owned)
        .collect()
}

/// What the `set_network` hook sends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetHook {
    /// The guest's interfaces.
    pub interfaces: Vec<InterfaceConfig>,
    /// Its routes.
    pub routes: Vec<RouteConfig>,
    /// Name servers.
    pub dns: Vec<String>,
}

impl NetHook {
    /// The pod interface's addresses, MTU and MAC, its default gateway.
    pub fn from_pod(link: &pod::PodLink, dns: Vec<String>) -> Self {
        Self {
            interfaces: vec![InterfaceConfig {
                name: GUEST_IFNAME.into(),
                mac: Some(link.mac.to_string()),
                addresses: link.ipv4.iter().map(|(a, n)| format!("{a}/{n}")).collect(),
                mtu: Some(link.mtu),
            }],
            routes: gateway_route(link.gateway),
            dns,
        }
    }

    /// The pool's address for the sandbox, its gateway (the TAP).
    pub fn from_pool(info: &SandboxNetInfo, dns: Vec<String>) -> Self {
        Self {
            interfaces: vec![InterfaceConfig {
                name: GUEST_IFNAME.into(),
                mac: None,
                addresses: vec![format!("{}/{}", info.ipv4, info.prefix)],
                mtu: None,
            }],
            routes: gateway_route(Some(info.gateway)),
            dns,
        }
    }

    /// The request.
    pub fn request(&self) -> Request {
        Request::SetNetwork {
            interfaces: self.interfaces.clone(),
            routes: self.routes.clone(),
            dns: self.dns.clone(),
        }
    }
}

fn gateway_route(gw: Option<std::net::Ipv4Addr>) -> Vec<RouteConfig> {
    gw.map(|g| RouteConfig {
        destination: "default".into(),
        gateway: g.to_string(),
    })
    .into_iter()
    .collect()
}

/// A pod link a sandbox holds (recorded with it, so `delete` can undo it after a crash).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodJoin {
    /// The pod's network namespace.
    pub netns: PathBuf,
    /// Its interface.
    pub ifname: String,
    /// The VM's TAP, now in that namespace.
    pub tap: String,
}

impl PodJoin {
    /// Removes the tc redirects and the TAP from the pod's namespace.
    pub fn disconnect(&self) -> Result<(), String> {
        let link = pod::PodLink {
            netns: self.netns.clone(),
            ifname: self.ifname.clone(),
            mac: pool_manager::vmm_api::MacAddr([0; 6]),
            mtu: 0,
            ipv4: Vec::new(),
            gateway: None,
            tap: self.tap.clone(),
        };
        pod::disconnect(&link).map_err(|e| {
            format!(
                "disconnecting TAP {} from {} in {}: {e}",
                self.tap,
                self.ifname,
                self.netns.display()
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_netns_and_dns() {
        let dir = tempfile::tempdir().unwrap();
        let resolv = dir.path().join("resolv.conf");
        std::fs::write(
            &resolv,
            "search x\nnameserver 10.96.0.10\nnameserver bogus\n",
        )
        .unwrap();
        let mut spec: Spec = serde_json::from_value(serde_json::json!({
            "ociVersion": "1.0.2",
            "mounts": [{"destination": "/etc/resolv.conf", "source": resolv, "type": "bind"}],
            "linux": {"namespaces": [{"type": "pid"},
                                     {"type": "network", "path": "/var/run/netns/cni-1"}]}
        }))
        .unwrap();
        let plan = NetPlan::from_spec(&spec);
        assert_eq!(
            plan.pod,
            Some((PathBuf::from("/var/run/netns/cni-1"), "eth0".into()))
        );
        assert_eq!(plan.dns, vec!["10.96.0.10".to_string()]);
        strip_pod_netns(&mut spec);
        assert_eq!(pod_netns(&spec), None);
        let ns = spec
            .linux()
            .as_ref()
            .unwrap()
            .namespaces()
            .as_ref()
            .unwrap();
        assert_eq!(ns.len(), 1);
        assert_eq!(NetPlan::from_spec(&spec).pod, None);
    }
}
