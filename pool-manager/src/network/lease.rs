//! Address leases: a pool's range split into `/29` blocks, one per networked sandbox.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

use super::NetError;

/// A pool's network settings (`"network": {"subnet": "10.200.0.0/16", "egress": true}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolNetwork {
    /// The range sandboxes get their `/29` blocks from (`A.B.C.D/N`, N at most 29).
    #[serde(with = "cidr")]
    pub subnet: (Ipv4Addr, u8),
    /// Give each sandbox a veth link to the host and NAT its traffic out (host forwarding on).
    #[serde(default)]
    pub egress: bool,
}

impl PoolNetwork {
    /// Checks the range: a network address (host bits zero) with a prefix of at most 29.
    pub fn validate(&self) -> Result<(), NetError> {
        let (addr, prefix) = self.subnet;
        if prefix > 29 {
            return Err(NetError::Config(format!(
                "subnet {addr}/{prefix}: the prefix must be at most 29 (each sandbox takes a /29)"
            )));
        }
        let mask = u32::MAX.checked_shl(32 - prefix as u32).unwrap_or(0);
        if u32::from(addr) & !mask != 0 {
            return Err(NetError::Config(format!(
                "subnet {addr}/{prefix} has host bits set: give the network address"
            )));
        }
        Ok(())
    }

    /// How many sandboxes the range holds.
    pub fn blocks(&self) -> u32 {
        1u32 << (29 - self.subnet.1.min(29))
    }
}

mod cidr {
    use std::net::Ipv4Addr;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &(Ipv4Addr, u8), s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format!("{}/{}", v.0, v.1))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<(Ipv4Addr, u8), D::Error> {
        let s = String::deserialize(d)?;
        parse(&s).map_err(serde::de::Error::custom)
    }

    pub fn parse(s: &str) -> Result<(Ipv4Addr, u8), String> {
        let bad = || format!("subnet {s:?}: write it as A.B.C.D/N, e.g. 10.200.0.0/16");
        let (a, p) = s.split_once('/').ok_or_else(bad)?;
        let addr: Ipv4Addr = a.parse().map_err(|_| bad())?;
        let prefix: u8 = p.parse().map_err(|_| bad())?;
        if prefix > 32 {
            return Err(bad());
        }
        Ok((addr, prefix))
    }
}

/// Parses `A.B.C.D/N`.
pub fn parse_subnet(s: &str) -> Result<(Ipv4Addr, u8), String> {
    cidr::parse(s)
}

/// One sandbox's `/29`: `.0` network, `.1` gateway (the TAP), `.2` the guest (a `/30` link),
/// `.5` the namespace's veth end and `.6` the host's (a second `/30`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Block(u32);

impl Block {
    /// The block an address belongs to.
    pub fn containing(ip: Ipv4Addr) -> Self {
        Self(u32::from(ip) & !7)
    }
    /// Network address.
    pub fn base(&self) -> Ipv4Addr {
        Ipv4Addr::from(self.0)
    }
    /// The TAP's address: the guest's gateway.
    pub fn gateway(&self) -> Ipv4Addr {
        Ipv4Addr::from(self.0 + 1)
    }
    /// The guest's address.
    pub fn guest(&self) -> Ipv4Addr {
        Ipv4Addr::from(self.0 + 2)
    }
    /// The namespace end of the veth link.
    pub fn veth_ns(&self) -> Ipv4Addr {
        Ipv4Addr::from(self.0 + 5)
    }
    /// The host end of the veth link.
    pub fn veth_host(&self) -> Ipv4Addr {
        Ipv4Addr::from(self.0 + 6)
    }
}

/// The blocks leased now, over every pool's range (ranges may overlap: a block is leased once).
#[derive(Debug, Default)]
pub struct Leases {
    taken: BTreeSet<u32>,
}

impl Leases {
    /// Leases the lowest free block of `net`.
    pub fn take(&mut self, net: &PoolNetwork) -> Result<Block, NetError> {
        net.validate()?;
        let base = u32::from(net.subnet.0);
        for i in 0..net.blocks() {
            let b = base + i * 8;
            if self.taken.insert(b) {
                return Ok(Block(b));
            }
        }
        Err(NetError::Exhausted(format!(
            "all {} addresses blocks of {}/{} are leased: release sandboxes or give the pool a larger subnet",
            net.blocks(),
            net.subnet.0,
            net.subnet.1
        )))
    }

    /// Marks `b` leased (an adopted sandbox's).
    pub fn mark(&mut self, b: &Block) {
        self.taken.insert(b.0);
    }

    /// Frees `b`.
    pub fn free(&mut self, b: &Block) {
        self.taken.remove(&b.0);
    }

    /// How many blocks are leased.
    pub fn len(&self) -> usize {
        self.taken.len()
    }

    /// Whether none is leased.
    pub fn is_empty(&self) -> bool {
        self.taken.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> PoolNetwork {
        PoolNetwork {
            subnet: parse_subnet(s).unwrap(),
            egress: false,
        }
    }

    #[test]
    fn blocks_are_unique_freed_and_bounded() {
        let mut l = Leases::default();
        let n = net("10.200.0.0/28");
        let a = l.take(&n).unwrap();
        let b = l.take(&n).unwrap();
        assert_eq!(a.guest(), "10.200.0.2".parse::<Ipv4Addr>().unwrap());
        assert_eq!(b.gateway(), "10.200.0.9".parse::<Ipv4Addr>().unwrap());
        assert!(matches!(l.take(&n), Err(NetError::Exhausted(_))));
        l.free(&a);
        assert_eq!(l.take(&n).unwrap(), a);
        assert_eq!(Block::containing(b.guest()), b);
        assert_eq!(l.len(), 2);
    }

    #[test]
    fn bad_subnets_are_refused() {
        for s in ["10.0.0.0", "10.0.0.0/33", "x/16", "10.0.0.0/x"] {
            assert!(parse_subnet(s).is_err(), "{s}");
        }
        assert!(net("10.200.0.0/30").validate().is_err());
        assert!(net("10.200.0.1/16").validate().is_err());
        assert!(net("10.200.0.0/16").validate().is_ok());
        assert_eq!(net("10.200.0.0/16").blocks(), 8192);
        let j: PoolNetwork =
            serde_json::from_str(r#"{"subnet":"10.9.0.0/24","egress":true}"#).unwrap();
        assert_eq!(j.subnet.1, 24);
        assert!(serde_json::from_str::<PoolNetwork>(r#"{"subnet":"10.9.0.0/24","x":1}"#).is_err());
    }
}
