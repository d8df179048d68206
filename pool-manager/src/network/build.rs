//! The network of a networked template's build VM, which runs jailed: the VMM opens its TAP by
//! name as it boots, unprivileged, so the TAP must already be in the VMM's network namespace and
//! owned by the jail's uid/gid. The pool makes namespace `runv-<jail id>` (`runv-build-<hex>`),
//! creates the TAP inside it owned by the jail uid, and the jailed VMM joins it
//! (`runv-vmm --jail-netns /run/netns/runv-build-<hex>`) instead of unsharing a new one.
//! Dropping a [`BuildNet`] deletes the TAP and the namespace; a killed pool's are removed by
//! [`super::orphans`] once no live VMM has that jail id; until its VMM runs, the pool's
//! [`Claim`] on the jail id keeps other pools' sweeps off it.

use std::path::PathBuf;

use super::{cmd, Claim, NetError, NETNS_PREFIX};

/// A build VM's network namespace and the TAP in it; both removed on drop.
pub struct BuildNet {
    netns: String,
    tap: String,
    /// Keeps other pools' orphan sweeps off the namespace until the VMM that joins it runs.
    _claim: Claim,
}

impl BuildNet {
    /// Makes namespace `runv-<jail_id>` holding TAP `tap` (down, no address) owned by
    /// `uid`/`gid`. On failure nothing is left.
    pub fn create(jail_id: &str, tap: &str, uid: u32, gid: u32) -> Result<Self, NetError> {
        let claim = Claim::take(jail_id)?;
        let netns = format!("{NETNS_PREFIX}{jail_id}");
        cmd::ip(&["netns", "add", &netns])?;
        // From here on, drop removes the namespace.
        let this = Self {
            netns,
            tap: tap.to_string(),
            _claim: claim,
        };
        let (uid, gid) = (uid.to_string(), gid.to_string());
        cmd::ip(&[
            "-n",
            &this.netns,
            "tuntap",
            "add",
            "dev",
            tap,
            "mode",
            "tap",
            "user",
            &uid,
            "group",
            &gid,
        ])?;
        Ok(this)
    }

    /// The bind-mounted namespace file the jailed VMM joins.
    pub fn netns_path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.netns)
    }

    /// The TAP's name (inside the namespace).
    pub fn tap(&self) -> &str {
        &self.tap
    }
}

impl Drop for BuildNet {
    fn drop(&mut self) {
        // Deleted explicitly: the namespace (and the TAP with it) would otherwise live on while
        // anything still holds it.
        let _ = cmd::ip(&["-n", &self.netns, "link", "del", &self.tap]);
        if let Err(e) = cmd::ip(&["netns", "del", &self.netns]) {
            tracing::warn!(
                "removing the build VM's network namespace {}: {e}; remove it with `ip netns del {}`",
                self.netns,
                self.netns
            );
        }
    }
}
