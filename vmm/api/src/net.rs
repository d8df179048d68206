//! Network device settings shared by the VM config and the restore options.

use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

/// Longest TAP interface name (`IFNAMSIZ` - 1).
pub const MAX_TAP_NAME: usize = 15;

/// An Ethernet MAC address, written `aa:bb:cc:dd:ee:ff` (JSON: the same string).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct MacAddr(pub [u8; 6]);

/// A MAC address that does not parse or cannot be a device's own address.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("MAC address {text:?} {why}: write six hex bytes like 02:00:00:00:00:01 (unicast: the first byte even)")]
pub struct BadMac {
    /// What was given.
    pub text: String,
    /// What is wrong with it.
    pub why: &'static str,
}

impl std::str::FromStr for MacAddr {
    type Err = BadMac;
    fn from_str(s: &str) -> Result<Self, BadMac> {
        let bad = |why| BadMac {
            text: s.into(),
            why,
        };
        let mut mac = [0u8; 6];
        let mut parts = s.split(':');
        for b in &mut mac {
            let p = parts
                .next()
                .ok_or_else(|| bad("has fewer than six bytes"))?;
            if p.len() != 2 {
                return Err(bad("has a byte that is not two hex digits"));
            }
            *b = u8::from_str_radix(p, 16)
                .map_err(|_| bad("has a byte that is not two hex digits"))?;
        }
        if parts.next().is_some() {
            return Err(bad("has more than six bytes"));
        }
        if mac[0] & 1 != 0 {
            return Err(bad("is a multicast address"));
        }
        if mac == [0; 6] {
            return Err(bad("is all zeros"));
        }
        Ok(Self(mac))
    }
}

impl std::fmt::Display for MacAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

impl Serialize for MacAddr {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for MacAddr {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// A virtio-net device on a host TAP interface (`--net tap=NAME[,mac=M][,ipv4=A]`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetConfig {
    /// An existing TAP interface (in the VMM's network namespace), used by this VM alone.
    pub tap: String,
    /// The guest's MAC address (virtio-net config space); default: a locally administered
    /// address derived from the TAP name.
    #[serde(default)]
    pub mac: Option<MacAddr>,
    /// The guest's IPv4 address as announced in the identity page (0.0.0.0 there when unset);
    /// guests that configure themselves from it (the test guest) read it after every restore.
    #[serde(default)]
    pub ipv4: Option<Ipv4Addr>,
}

/// A `--net` value that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BadNet {
    /// Not `tap=NAME[,mac=M][,ipv4=A]`.
    #[error("network device {0:?}: expected tap=NAME[,mac=aa:bb:cc:dd:ee:ff][,ipv4=A.B.C.D]")]
    Syntax(String),
    /// A TAP name Linux cannot have.
    #[error("TAP name {0:?}: use 1..={MAX_TAP_NAME} bytes without '/', ':', spaces or NUL")]
    TapName(String),
    /// A malformed MAC.
    #[error(transparent)]
    Mac(#[from] BadMac),
}

impl NetConfig {
    /// Checks the TAP name (the MAC is checked when parsed).
    pub fn validate(&self) -> Result<(), BadNet> {
        let t = &self.tap;
        if t.is_empty()
            || t.len() > MAX_TAP_NAME
            || t == "."
            || t == ".."
            || t.bytes()
                .any(|b| b == b'/' || b == b':' || b == 0 || b.is_ascii_whitespace())
        {
            return Err(BadNet::TapName(t.clone()));
        }
        Ok(())
    }

    /// The MAC the guest gets: the configured one, or `02:72:76:xx:xx:xx` from a hash of the
    /// TAP name (locally administered, stable for a name).
    pub fn mac_or_default(&self) -> MacAddr {
        self.mac.unwrap_or_else(|| {
            let h = self.tap.bytes().fold(0x811c_9dc5u32, |h, b| {
                (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
            });
            let [_, a, b, c] = h.to_be_bytes();
            MacAddr([0x02, 0x72, 0x76, a, b, c])
        })
    }
}

impl std::str::FromStr for NetConfig {
    type Err = BadNet;
    /// Parses `tap=NAME[,mac=M][,ipv4=A]`.
    fn from_str(s: &str) -> Result<Self, BadNet> {
        let mut cfg = NetConfig {
            tap: String::new(),
            mac: None,
            ipv4: None,
        };
        let mut tap = false;
        for part in s.split(',') {
            match part.split_once('=') {
                Some(("tap", t)) if !tap => {
                    cfg.tap = t.into();
                    tap = true;
                }
                Some(("mac", m)) if cfg.mac.is_none() => cfg.mac = Some(m.parse()?),
                Some(("ipv4", a)) if cfg.ipv4.is_none() => {
                    cfg.ipv4 = Some(a.parse().map_err(|_| BadNet::Syntax(s.into()))?)
                }
                _ => return Err(BadNet::Syntax(s.into())),
            }
        }
        if !tap {
            return Err(BadNet::Syntax(s.into()));
        }
        cfg.validate()?;
        Ok(cfg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macs_parse_print_and_refuse_nonsense() {
        let m: MacAddr = "02:00:0a:FF:00:01".parse().unwrap();
        assert_eq!(m.0, [2, 0, 0xa, 0xff, 0, 1]);
        assert_eq!(m.to_string(), "02:00:0a:ff:00:01");
        assert_eq!(serde_json::to_string(&m).unwrap(), "\"02:00:0a:ff:00:01\"");
        for (bad, why) in [
            ("", "two hex"),
            ("02:00:00:00:00", "fewer"),
            ("02:00:00:00:00:01:02", "more"),
            ("02:00:00:00:00:1", "two hex"),
            ("02:00:00:00:00:zz", "two hex"),
            ("02-00-00-00-00-01", "two hex"),
            ("01:00:5e:00:00:01", "multicast"),
            ("00:00:00:00:00:00", "zeros"),
        ] {
            let e = bad.parse::<MacAddr>().unwrap_err().to_string();
            assert!(
                e.contains(why) && e.contains("02:00:00:00:00:01"),
                "{bad}: {e}"
            );
        }
        assert!(serde_json::from_str::<MacAddr>("\"ff:ff:ff:ff:ff:ff\"").is_err());
    }

    #[test]
    fn net_flags_parse_and_validate() {
        let n: NetConfig = "tap=tap0,mac=02:00:00:00:00:07,ipv4=10.0.0.2"
            .parse()
            .unwrap();
        assert_eq!(n.tap, "tap0");
        assert_eq!(n.mac_or_default().0, [2, 0, 0, 0, 0, 7]);
        assert_eq!(n.ipv4, Some(Ipv4Addr::new(10, 0, 0, 2)));
        let d: NetConfig = "tap=tap0".parse().unwrap();
        let mac = d.mac_or_default();
        assert_eq!(mac.0[0], 2, "locally administered unicast");
        assert_eq!(mac, d.mac_or_default(), "stable");
        for bad in [
            "",
            "tap=",
            "mac=02:00:00:00:00:01",
            "tap=a,tap=b",
            "tap=a,x=1",
            "tap=a/b",
            "tap=sixteen-bytes-xx",
            "tap=a b",
            "tap=a,ipv4=1.2.3",
            "tap=a,mac=ff:ff:ff:ff:ff:ff",
        ] {
            assert!(bad.parse::<NetConfig>().is_err(), "{bad}");
        }
        let e = "tap=a,mac=02:00"
            .parse::<NetConfig>()
            .unwrap_err()
            .to_string();
        assert!(e.contains("MAC address"), "{e}");
        assert!(serde_json::from_str::<NetConfig>(r#"{"tap":"t","bogus":1}"#).is_err());
    }
}
