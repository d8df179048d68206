//! A CRI pod's network (a namespace set up by CNI, named in the OCI spec's `linux.namespaces`)
//! joined to a VM's TAP the way Kata does it: the TAP moves into the pod's namespace and two tc
//! `mirred` redirects (ingress of the pod's interface → egress of the TAP, and back) pass every
//! frame between them, so CNI plugins (`bridge`, `host-local`, ...) work unchanged.
//!
//! The guest must answer for the pod interface's MAC: either the pod interface takes the guest's
//! MAC ([`connect`] with `guest_mac`, for a warm clone whose MAC is fixed at its restore), or the
//! guest sets the returned [`PodLink::mac`] itself (the agent's `set_network`). The guest's
//! addresses and routes are the pod interface's ([`PodLink`]), given through `set_network` (or,
//! for the test guest, the identity page's `ipv4`).

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use vmm_api::MacAddr;

use super::cmd::{self, NetError};

/// The pod side of the link, as CNI left it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodLink {
    /// The pod's network namespace (a path, e.g. `/var/run/netns/cni-…`).
    pub netns: PathBuf,
    /// The pod's interface (CNI's `eth0`).
    pub ifname: String,
    /// Its MAC (after [`connect`]: the guest's, when one was given).
    pub mac: MacAddr,
    /// Its MTU.
    pub mtu: u32,
    /// Its IPv4 addresses with prefix lengths.
    pub ipv4: Vec<(Ipv4Addr, u8)>,
    /// The namespace's default IPv4 gateway, if any.
    pub gateway: Option<Ipv4Addr>,
    /// The VM's TAP, now inside the namespace.
    pub tap: String,
}

#[derive(Deserialize)]
struct IpLink {
    ifname: String,
    #[serde(default)]
    address: Option<String>,
    #[serde(default)]
    mtu: Option<u32>,
    #[serde(default)]
    link_type: Option<String>,
    #[serde(default)]
    addr_info: Vec<IpAddr>,
}

#[derive(Deserialize)]
struct IpAddr {
    family: String,
    local: String,
    prefixlen: u8,
}

#[derive(Deserialize)]
struct IpRoute {
    #[serde(default)]
    gateway: Option<String>,
}

fn nsenter(
    netns: &Path,
    program: &str,
    args: &[&str],
    stdin: Option<&str>,
) -> Result<String, NetError> {
    let net = format!("--net={}", netns.display());
    let mut full = vec![net.as_str(), program];
    full.extend(args);
    cmd::run("nsenter", &full, stdin)
}

/// The pod's interface `ifname` (or, with `None`, its only non-loopback Ethernet interface
/// with an IPv4 address) and its addresses, MAC, MTU and default gateway.
pub fn inspect(netns: &Path, ifname: Option<&str>) -> Result<PodLink, NetError> {
    let out = nsenter(netns, "ip", &["-j", "addr", "show"], None)?;
    let links: Vec<IpLink> = serde_json::from_str(&out).map_err(|e| NetError::Command {
        what: format!("ip -j addr show in {}", netns.display()),
        detail: format!("unreadable output: {e}"),
    })?;
    let mut candidates = links.into_iter().filter(|l| match ifname {
        Some(n) => l.ifname == n,
        None => {
            l.link_type.as_deref() == Some("ether")
                && l.addr_info.iter().any(|a| a.family == "inet")
        }
    });
    let link = candidates.next().ok_or_else(|| {
        NetError::Config(format!(
            "no {} in the pod network namespace {}: did CNI set it up?",
            ifname.map_or("interface with an IPv4 address".into(), |n| format!(
                "interface {n}"
            )),
            netns.display()
        ))
    })?;
    if ifname.is_none() && candidates.next().is_some() {
        return Err(NetError::Config(format!(
            "the pod network namespace {} has several interfaces with IPv4 addresses: name the one to connect",
            netns.display()
        )));
    }
    let mac = link
        .address
        .as_deref()
        .and_then(|m| m.parse::<MacAddr>().ok())
        .ok_or_else(|| {
            NetError::Config(format!(
                "interface {} has no usable MAC address",
                link.ifname
            ))
        })?;
    let ipv4 = link
        .addr_info
        .iter()
        .filter(|a| a.family == "inet")
        .filter_map(|a| Some((a.local.parse().ok()?, a.prefixlen)))
        .collect();
    let routes = nsenter(netns, "ip", &["-j", "-4", "route", "show", "default"], None)?;
    let gateway = serde_json::from_str::<Vec<IpRoute>>(&routes)
        .ok()
        .and_then(|r| r.into_iter().find_map(|r| r.gateway?.parse().ok()));
    Ok(PodLink {
        netns: netns.to_path_buf(),
        ifname: link.ifname,
        mac,
        mtu: link.mtu.unwrap_or(1500),
        ipv4,
        gateway,
        tap: String::new(),
    })
}

/// Connects the pod namespace `netns` to the VM's TAP `tap` (in this process's namespace,
/// already opened by the VMM): the TAP moves into the pod's namespace (the VMM's open file
/// follows it), gets the pod interface's MTU and comes up, and tc mirred redirects join the two
/// both ways. With `guest_mac`, the pod interface takes that MAC so frames for it reach the
/// guest. Undo with [`disconnect`] (the pod's namespace going away also removes it all).
pub fn connect(
    netns: &Path,
    ifname: Option<&str>,
    tap: &str,
    guest_mac: Option<MacAddr>,
) -> Result<PodLink, NetError> {
    let mut link = inspect(netns, ifname)?;
    let ns = netns.to_string_lossy();
    cmd::ip(&["link", "set", "dev", tap, "netns", &ns])?;
    link.tap = tap.into();
    let result = (|| {
        let mut ip = format!("link set {tap} mtu {} up\n", link.mtu);
        if let Some(mac) = guest_mac {
            ip += &format!("link set {} address {mac}\n", link.ifname);
        }
        nsenter(netns, "ip", &["-batch", "-"], Some(&ip))?;
        let tc = format!(
            "qdisc add dev {i} ingress\n\
             filter add dev {i} parent ffff: protocol all u32 match u8 0 0 action mirred egress redirect dev {tap}\n\
             qdisc add dev {tap} ingress\n\
             filter add dev {tap} parent ffff: protocol all u32 match u8 0 0 action mirred egress redirect dev {i}\n",
            i = link.ifname
        );
        nsenter(netns, "tc", &["-batch", "-"], Some(&tc))
    })();
    if let Err(e) = result {
        let _ = disconnect(&link);
        return Err(e);
    }
    if let Some(mac) = guest_mac {
        link.mac = mac;
    }
    Ok(link)
}

/// Removes what [`connect`] added: the pod interface's ingress redirect and the TAP (with its
/// own filter). The pod interface keeps the MAC it was given.
pub fn disconnect(link: &PodLink) -> Result<(), NetError> {
    // Either may be gone already (a failed connect, a namespace torn down).
    let _ = nsenter(
        &link.netns,
        "tc",
        &["qdisc", "del", "dev", &link.ifname, "ingress"],
        None,
    );
    match nsenter(&link.netns, "ip", &["link", "del", &link.tap], None) {
        Err(NetError::Command { detail, .. }) if detail.contains("Cannot find device") => Ok(()),
        r => r.map(drop),
    }
}
