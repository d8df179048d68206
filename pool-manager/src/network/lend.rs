//! TAPs for jailed VMMs. A jailed VMM runs in a network namespace of its own, unprivileged: it
//! can attach (`TUNSETIFF`) only a persistent TAP that it owns and that is in its namespace.
//! So the pool makes the TAP owned by the jail's uid/gid (`TUNSETOWNER`/`TUNSETGROUP`), lends
//! it to the VMM's namespace for the restore that opens it, and takes it back afterwards: the
//! VMM's open TAP file follows the device, and the VMM's namespace is left with only `lo`.

use super::{cmd, NetError, SandboxNet, TAP_PREFIX};

impl SandboxNet {
    /// Like [`SandboxNet::create_tap`], with the TAP owned by `uid`/`gid` (a jailed VMM's).
    pub fn create_owned_tap(
        vm_name: &str,
        leases: std::sync::Arc<std::sync::Mutex<super::Leases>>,
        uid: u32,
        gid: u32,
    ) -> Result<Self, NetError> {
        let claim = super::Claim::take(vm_name)?;
        let tap = format!("{TAP_PREFIX}{}", super::suffix(vm_name));
        let (uid, gid) = (uid.to_string(), gid.to_string());
        cmd::ip(&[
            "tuntap", "add", "dev", &tap, "mode", "tap", "user", &uid, "group", &gid,
        ])?;
        Ok(Self {
            tap,
            reserved: None,
            attached: None,
            leases,
            _claim: Some(claim),
        })
    }

    /// Moves the TAP (in this process's namespace) into the network namespace of process
    /// `pid`, the jailed VMM about to open it.
    pub fn lend(&self, pid: u32) -> Result<(), NetError> {
        cmd::ip(&["link", "set", "dev", &self.tap, "netns", &pid.to_string()])
    }

    /// Moves the TAP back from the namespace of process `pid` to this process's. Nothing to do
    /// when that namespace is gone (the TAP went with it).
    pub fn take_back(&self, pid: u32) -> Result<(), NetError> {
        let ns = format!("/proc/{pid}/ns/net");
        if std::fs::metadata(&ns).is_err() {
            return Ok(());
        }
        let me = std::process::id().to_string();
        cmd::run(
            "nsenter",
            &[
                &format!("--net={ns}"),
                "ip",
                "link",
                "set",
                "dev",
                &self.tap,
                "netns",
                &me,
            ],
            None,
        )
        .map(drop)
    }
}
