//! The `set_network` clone hook: IPv4 addresses, MAC, MTU, link state and routes applied with
//! rtnetlink (`NETLINK_ROUTE` messages built here: the few this needs), DNS in `resolv.conf`.
//! A clone resumes with its template's addresses; this gives it its own.

use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::Path;

use nix::sys::socket::{
    recv, sendto, socket, AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol, SockType,
};
use protocol::{InterfaceConfig, RouteConfig};

const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const RTM_NEWLINK: u16 = 16;
const RTM_NEWADDR: u16 = 20;
const RTM_DELADDR: u16 = 21;
const RTM_GETADDR: u16 = 22;
const RTM_NEWROUTE: u16 = 24;
const F_REQUEST: u16 = 1;
const F_ACK: u16 = 4;
const F_DUMP: u16 = 0x300;
const F_REPLACE: u16 = 0x100;
const F_CREATE: u16 = 0x400;
const IFLA_ADDRESS: u16 = 1;
const IFLA_MTU: u16 = 4;
const IFA_ADDRESS: u16 = 1;
const IFA_LOCAL: u16 = 2;
const RTA_DST: u16 = 1;
const RTA_GATEWAY: u16 = 5;
const AF_INET: u8 = libc::AF_INET as u8;
const IFF_UP: u32 = libc::IFF_UP as u32;

/// Why the network could not be configured.
#[derive(Debug, thiserror::Error)]
pub enum NetconfError {
    /// A value in the request does not parse.
    #[error("set_network: {0}")]
    Bad(String),
    /// No such interface in the guest.
    #[error("set_network: no interface {0} in the guest: name one that `ip link` lists")]
    NoInterface(String),
    /// The kernel refused a change.
    #[error("set_network: {what}: {source}")]
    Kernel {
        /// The change.
        what: String,
        /// Cause.
        source: std::io::Error,
    },
    /// Writing resolv.conf failed.
    #[error("set_network: writing {path}: {source}")]
    Resolv {
        /// The file.
        path: String,
        /// Cause.
        source: std::io::Error,
    },
}

fn bad(s: impl Into<String>) -> NetconfError {
    NetconfError::Bad(s.into())
}

/// Parses `A.B.C.D/N`.
fn cidr(s: &str) -> Result<(Ipv4Addr, u8), NetconfError> {
    let err = || {
        bad(format!(
            "{s:?} is not an IPv4 address with prefix length (10.0.0.2/24)"
        ))
    };
    let (a, n) = s.split_once('/').ok_or_else(err)?;
    let n: u8 = n.parse().map_err(|_| err())?;
    if n > 32 {
        return Err(err());
    }
    Ok((a.parse().map_err(|_| err())?, n))
}

fn mac(s: &str) -> Result<[u8; 6], NetconfError> {
    let err = || {
        bad(format!(
            "MAC {s:?}: write six hex bytes like 02:00:00:00:00:01"
        ))
    };
    let mut m = [0u8; 6];
    let mut parts = s.split(':');
    for b in &mut m {
        let p = parts.next().filter(|p| p.len() == 2).ok_or_else(err)?;
        *b = u8::from_str_radix(p, 16).map_err(|_| err())?;
    }
    if parts.next().is_some() || m[0] & 1 != 0 {
        return Err(err());
    }
    Ok(m)
}

/// A request being built: header, fixed part, attributes.
struct Msg(Vec<u8>);

impl Msg {
    fn new(kind: u16, flags: u16, fixed: &[u8]) -> Self {
        let mut b = vec![0u8; 16];
        b[4..6].copy_from_slice(&kind.to_ne_bytes());
        b[6..8].copy_from_slice(&flags.to_ne_bytes());
        b[8..12].copy_from_slice(&1u32.to_ne_bytes());
        b.extend_from_slice(fixed);
        Self(b)
    }

    fn attr(mut self, kind: u16, data: &[u8]) -> Self {
        let len = 4 + data.len();
        self.0.extend_from_slice(&(len as u16).to_ne_bytes());
        self.0.extend_from_slice(&kind.to_ne_bytes());
        self.0.extend_from_slice(data);
        self.0.resize(self.0.len().next_multiple_of(4), 0);
        self
    }

    fn finish(mut self) -> Vec<u8> {
        let len = self.0.len() as u32;
        self.0[0..4].copy_from_slice(&len.to_ne_bytes());
        self.0
    }
}

fn ifinfomsg(index: u32, flags: u32, change: u32) -> Vec<u8> {
    let mut b = vec![0u8; 16];
    b[4..8].copy_from_slice(&index.to_ne_bytes());
    b[8..12].copy_from_slice(&flags.to_ne_bytes());
    b[12..16].copy_from_slice(&change.to_ne_bytes());
    b
}

fn ifaddrmsg(prefix: u8, index: u32) -> Vec<u8> {
    let mut b = vec![AF_INET, prefix, 0, 0];
    b.extend_from_slice(&index.to_ne_bytes());
    b
}

/// One rtnetlink socket.
struct Netlink(OwnedFd);

impl Netlink {
    fn open() -> Result<Self, NetconfError> {
        socket(
            AddressFamily::Netlink,
            SockType::Raw,
            SockFlag::SOCK_CLOEXEC,
            SockProtocol::NetlinkRoute,
        )
        .map(Self)
        .map_err(|e| NetconfError::Kernel {
            what: "opening a netlink socket".into(),
            source: e.into(),
        })
    }

    /// Sends `msg` and collects every reply message (type, payload) until the ack or the end
    /// of a dump; a negative ack is the error.
    fn call(&self, what: &str, msg: Vec<u8>) -> Result<Vec<(u16, Vec<u8>)>, NetconfError> {
        let kernel = |e: nix::Error| NetconfError::Kernel {
            what: what.into(),
            source: e.into(),
        };
        sendto(
            self.0.as_raw_fd(),
            &msg,
            &NetlinkAddr::new(0, 0),
            MsgFlags::empty(),
        )
        .map_err(kernel)?;
        let mut out = Vec::new();
        let mut buf = vec![0u8; 32 * 1024];
        loop {
            let n = recv(self.0.as_raw_fd(), &mut buf, MsgFlags::empty()).map_err(kernel)?;
            let mut at = 0;
            while at + 16 <= n {
                let len =
                    u32::from_ne_bytes(buf[at..at + 4].try_into().unwrap_or_default()) as usize;
                let kind = u16::from_ne_bytes([buf[at + 4], buf[at + 5]]);
                if len < 16 || at + len > n {
                    return Err(bad(format!("{what}: a malformed netlink reply")));
                }
                let body = &buf[at + 16..at + len];
                match kind {
                    NLMSG_DONE => return Ok(out),
                    NLMSG_ERROR => {
                        let code = body
                            .get(..4)
                            .map_or(0, |c| i32::from_ne_bytes(c.try_into().unwrap_or_default()));
                        if code != 0 {
                            return Err(kernel(nix::Error::from_raw(-code)));
                        }
                        return Ok(out);
                    }
                    _ => out.push((kind, body.to_vec())),
                }
                at += len.next_multiple_of(4);
            }
        }
    }
}

/// The IPv4 addresses (address, prefix) on interface `index`.
fn addresses(nl: &Netlink, index: u32) -> Result<Vec<(Ipv4Addr, u8)>, NetconfError> {
    let msg = Msg::new(RTM_GETADDR, F_REQUEST | F_DUMP, &ifaddrmsg(0, 0)).finish();
    let mut found = Vec::new();
    for (kind, body) in nl.call("listing addresses", msg)? {
        if kind != RTM_NEWADDR || body.len() < 8 || body[0] != AF_INET {
            continue;
        }
        if u32::from_ne_bytes(body[4..8].try_into().unwrap_or_default()) != index {
            continue;
        }
        let mut at = 8;
        while at + 4 <= body.len() {
            let len = u16::from_ne_bytes([body[at], body[at + 1]]) as usize;
            let kind = u16::from_ne_bytes([body[at + 2], body[at + 3]]);
            if len < 4 || at + len > body.len() {
                break;
            }
            if kind == IFA_LOCAL && len == 8 {
                let a: [u8; 4] = body[at + 4..at + 8].try_into().unwrap_or_default();
                found.push((Ipv4Addr::from(a), body[1]));
            }
            at += len.next_multiple_of(4);
        }
    }
    Ok(found)
}

fn configure(nl: &Netlink, i: &InterfaceConfig) -> Result<(), NetconfError> {
    let index = nix::net::if_::if_nametoindex(i.name.as_str())
        .map_err(|_| NetconfError::NoInterface(i.name.clone()))?;
    let wanted = i
        .addresses
        .iter()
        .map(|a| cidr(a))
        .collect::<Result<Vec<_>, _>>()?;
    let new_mac = i.mac.as_deref().map(mac).transpose()?;
    let mut link = Msg::new(RTM_NEWLINK, F_REQUEST | F_ACK, &ifinfomsg(index, 0, 0));
    if let Some(m) = new_mac {
        link = link.attr(IFLA_ADDRESS, &m);
    }
    if let Some(mtu) = i.mtu {
        link = link.attr(IFLA_MTU, &mtu.to_ne_bytes());
    }
    if new_mac.is_some() || i.mtu.is_some() {
        nl.call(&format!("setting MAC/MTU of {}", i.name), link.finish())?;
    }
    // Only what is not wanted goes: removing a wanted address, even briefly, would take the
    // routes through it along.
    for (addr, prefix) in addresses(nl, index)?
        .into_iter()
        .filter(|a| !wanted.contains(a))
    {
        let del = Msg::new(RTM_DELADDR, F_REQUEST | F_ACK, &ifaddrmsg(prefix, index))
            .attr(IFA_LOCAL, &addr.octets())
            .finish();
        nl.call(&format!("removing {addr}/{prefix} from {}", i.name), del)?;
    }
    for &(addr, prefix) in &wanted {
        let add = Msg::new(
            RTM_NEWADDR,
            F_REQUEST | F_ACK | F_CREATE | F_REPLACE,
            &ifaddrmsg(prefix, index),
        )
        .attr(IFA_LOCAL, &addr.octets())
        .attr(IFA_ADDRESS, &addr.octets())
        .finish();
        nl.call(&format!("adding {addr}/{prefix} to {}", i.name), add)?;
    }
    let up = Msg::new(
        RTM_NEWLINK,
        F_REQUEST | F_ACK,
        &ifinfomsg(index, IFF_UP, IFF_UP),
    )
    .finish();
    nl.call(&format!("bringing {} up", i.name), up)?;
    Ok(())
}

fn route(nl: &Netlink, r: &RouteConfig) -> Result<(), NetconfError> {
    let (dst, len) = if r.destination == "default" {
        (Ipv4Addr::UNSPECIFIED, 0)
    } else {
        cidr(&r.destination)?
    };
    let gw: Ipv4Addr = r
        .gateway
        .parse()
        .map_err(|_| bad(format!("gateway {:?} is not an IPv4 address", r.gateway)))?;
    // rtmsg: family, dst_len, src_len, tos, table main, protocol boot, scope universe, unicast.
    let mut rt = vec![AF_INET, len, 0, 0, libc::RT_TABLE_MAIN, 3, 0, 1];
    rt.extend_from_slice(&0u32.to_ne_bytes());
    let mut msg = Msg::new(RTM_NEWROUTE, F_REQUEST | F_ACK | F_CREATE | F_REPLACE, &rt);
    if len > 0 {
        msg = msg.attr(RTA_DST, &dst.octets());
    }
    let msg = msg.attr(RTA_GATEWAY, &gw.octets()).finish();
    nl.call(&format!("route {} via {gw}", r.destination), msg)?;
    Ok(())
}

/// Applies a `set_network` request in the caller's network namespace; name servers go to
/// `resolv_conf` (written only when `dns` is not empty). Everything is parsed before the first
/// change.
pub fn apply(
    interfaces: &[InterfaceConfig],
    routes: &[RouteConfig],
    dns: &[String],
    resolv_conf: &Path,
) -> Result<(), NetconfError> {
    for i in interfaces {
        i.addresses.iter().try_for_each(|a| cidr(a).map(drop))?;
        i.mac.as_deref().map(mac).transpose()?;
    }
    let servers = dns
        .iter()
        .map(|d| {
            d.parse::<std::net::IpAddr>()
                .map_err(|_| bad(format!("name server {d:?} is not an IP address")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let nl = Netlink::open()?;
    for i in interfaces {
        configure(&nl, i)?;
    }
    for r in routes {
        route(&nl, r)?;
    }
    if !servers.is_empty() {
        let text: String = servers
            .iter()
            .map(|s| format!("nameserver {s}\n"))
            .collect();
        std::fs::write(resolv_conf, text).map_err(|source| NetconfError::Resolv {
            path: resolv_conf.display().to_string(),
            source,
        })?;
    }
    Ok(())
}
