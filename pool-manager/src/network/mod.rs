//! Sandbox networking: each networked sandbox gets its own network namespace holding its VM's
//! TAP, a `/29` block of a configured range (gateway on the TAP, the guest's address, a veth
//! link to the host) and, with egress, NAT rules in the host's `ip runv_pool` nftables table.
//!
//! The VMM opens its TAP by name at restore: an unjailed VMM in the host's namespace, a jailed
//! one in its own, where the TAP (owned by the jail's uid) is lent for the restore (`lend.rs`).
//! The TAP is then moved into the sandbox's namespace — the VMM's open TAP file follows it.
//! Warm clones get all of this when they are pooled; at acquire only `activate` carries the
//! guest's address (identity page), so a networked warm acquire costs no extra process.
//! Dropping a [`SandboxNet`] frees everything: the namespace (with its TAP and veth), the TAP if
//! it never left the host, the nftables rules and the address lease.

mod build;
mod claim;
mod cmd;
mod lease;
mod lend;
pub mod orphans;
pub mod pod;

pub use build::BuildNet;
pub use claim::{claimed, Claim, CLAIM_DIR};
pub use cmd::{nft_rules, NetError};
pub use lease::{parse_subnet, Block, Leases, PoolNetwork};

use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

/// The nftables table (family `ip`) holding every sandbox's egress rules.
pub const NFT_TABLE: &str = "runv_pool";
/// Prefix of the network namespaces the pool makes (`runv-<vm name>`).
pub const NETNS_PREFIX: &str = "runv-";
/// Prefix of the TAPs the pool makes (`rvt<12 hex>`).
pub const TAP_PREFIX: &str = "rvt";
/// Prefix of the host ends of the pool's veth pairs (`rvh<12 hex>`).
pub const VETH_PREFIX: &str = "rvh";

/// What a sandbox's network looks like (in the sandbox object).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SandboxNetInfo {
    /// The network namespace (`ip netns` name; `/run/netns/<name>`).
    pub netns: String,
    /// The VM's TAP, inside that namespace.
    pub tap: String,
    /// The guest's address.
    pub ipv4: Ipv4Addr,
    /// The TAP's address in the namespace: the guest's gateway.
    pub gateway: Ipv4Addr,
    /// Prefix length of the guest's link (30).
    pub prefix: u8,
    /// Whether egress (veth to the host, NAT) is set up.
    pub egress: bool,
    /// The host end of the veth pair (egress only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub veth: Option<String>,
    /// Handles of the sandbox's rules in the `ip runv_pool` nftables table (egress only).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nft_handles: Vec<(String, u64)>,
}

/// A pooled VM's TAP and, once attached, the sandbox network around it; torn down on drop.
pub struct SandboxNet {
    tap: String,
    reserved: Option<(Block, PoolNetwork)>,
    attached: Option<(SandboxNetInfo, Block)>,
    leases: Arc<Mutex<Leases>>,
    /// Keeps other pools' orphan sweeps off the TAP until the VMM that opens it runs; released
    /// after everything is torn down (fields drop after `Drop::drop`).
    _claim: Option<Claim>,
}

impl SandboxNet {
    /// Creates TAP `rvt<hex>` in the host's namespace (down, no address), for a VM named
    /// `vm-<hex>` to open at its restore.
    pub fn create_tap(vm_name: &str, leases: Arc<Mutex<Leases>>) -> Result<Self, NetError> {
        let claim = Claim::take(vm_name)?;
        let tap = format!("{TAP_PREFIX}{}", suffix(vm_name));
        cmd::ip(&["tuntap", "add", "dev", &tap, "mode", "tap"])?;
        Ok(Self {
            tap,
            reserved: None,
            attached: None,
            leases,
            _claim: Some(claim),
        })
    }

    /// The TAP's name.
    pub fn tap(&self) -> &str {
        &self.tap
    }

    /// What is set up, once [`SandboxNet::attach`]ed.
    pub fn info(&self) -> Option<&SandboxNetInfo> {
        self.attached.as_ref().map(|(i, _)| i)
    }

    /// Leases a block of `net` for this sandbox and returns the guest's address in it (to be
    /// given to the VM at its restore or activation); [`SandboxNet::attach`] sets it up.
    pub fn reserve(&mut self, net: &PoolNetwork) -> Result<Ipv4Addr, NetError> {
        if let Some((b, _)) = &self.reserved {
            return Ok(b.guest());
        }
        if self.attached.is_some() {
            return Err(NetError::State(
                "the sandbox network is already set up".into(),
            ));
        }
        let block = self
            .leases
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take(net)?;
        self.reserved = Some((block, *net));
        Ok(block.guest())
    }

    /// Makes namespace `runv-<vm name>` for the reserved block, moves the TAP (already opened
    /// by the VMM) into it with the gateway address, and with egress a veth to the host, routes
    /// and NAT rules. On failure everything made so far is undone and the lease freed (the TAP
    /// stays).
    pub fn attach(&mut self, vm_name: &str) -> Result<&SandboxNetInfo, NetError> {
        let (block, net) = self.reserved.take().ok_or_else(|| {
            NetError::State("no address reserved: call reserve before attach".into())
        })?;
        let mut info = SandboxNetInfo {
            netns: format!("{NETNS_PREFIX}{vm_name}"),
            tap: self.tap.clone(),
            ipv4: block.guest(),
            gateway: block.gateway(),
            prefix: 30,
            egress: net.egress,
            veth: None,
            nft_handles: Vec::new(),
        };
        let made = setup(&mut info, &block, vm_name);
        // Recorded even on failure: teardown removes what was made.
        self.attached = Some((info, block));
        if let Err(e) = made {
            self.detach();
            return Err(e);
        }
        Ok(self.info().expect("just attached"))
    }

    /// Removes the namespace (its TAP and veth go with it), the rules and the lease; the TAP
    /// is gone afterwards, so the VM has no link.
    pub fn detach(&mut self) {
        if let Some((block, _)) = self.reserved.take() {
            self.leases
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .free(&block);
        }
        if let Some((info, block)) = self.attached.take() {
            teardown(&info);
            self.leases
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .free(&block);
        }
    }

    /// Like [`SandboxNet::detach`], but the TAP first moves back to this process's namespace
    /// (down, no address), so the VM keeps a link a caller can join to a network of its own (a
    /// warm clone acquired without the pool's network, for a CRI pod).
    pub fn detach_keep_tap(&mut self) -> Result<(), NetError> {
        if let Some((info, _)) = &self.attached {
            let me = std::process::id().to_string();
            cmd::ip(&[
                "-n",
                &info.netns,
                "link",
                "set",
                "dev",
                &self.tap,
                "netns",
                &me,
            ])?;
        }
        self.detach();
        Ok(())
    }

    /// Takes over the network of a sandbox a previous pool left running (from its recorded
    /// info): its lease is marked taken, and dropping the result tears it down.
    pub fn adopt(info: SandboxNetInfo, leases: Arc<Mutex<Leases>>) -> Self {
        let block = Block::containing(info.ipv4);
        leases
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .mark(&block);
        // Its VMM is live, which protects it from sweeps already; a claim only keeps that
        // true should the VMM be restarted.
        let claim = info
            .netns
            .strip_prefix(NETNS_PREFIX)
            .and_then(|vm| Claim::take(vm).ok());
        Self {
            tap: info.tap.clone(),
            reserved: None,
            attached: Some((info, block)),
            leases,
            _claim: claim,
        }
    }
}

impl Drop for SandboxNet {
    fn drop(&mut self) {
        self.detach();
        // A TAP still in the host's namespace (never attached, or a failed attach that left it
        // there); one that moved went with its namespace.
        if std::path::Path::new("/sys/class/net")
            .join(&self.tap)
            .exists()
        {
            if let Err(e) = cmd::ip(&["link", "del", &self.tap]) {
                tracing::warn!("removing TAP {}: {e}", self.tap);
            }
        }
    }
}

/// The `<hex>` of `vm-<hex>` (the whole name when it has another form), at most 12 bytes.
fn suffix(vm_name: &str) -> &str {
    let s = vm_name.strip_prefix("vm-").unwrap_or(vm_name);
    &s[..s.len().min(12)]
}

fn setup(info: &mut SandboxNetInfo, block: &Block, vm_name: &str) -> Result<(), NetError> {
    let ns = info.netns.clone();
    cmd::ip(&["netns", "add", &ns])?;
    cmd::ip(&["link", "set", "dev", &info.tap, "netns", &ns])?;
    let gw = format!("{}/30", block.gateway());
    let mut script = format!(
        "link set lo up\naddr add {gw} dev {tap}\nlink set {tap} up\n",
        tap = info.tap
    );
    if info.egress {
        let veth = format!("{VETH_PREFIX}{}", suffix(vm_name));
        // Both ends made here, the namespace end moved in as eth0.
        cmd::ip(&[
            "link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", &ns,
        ])?;
        info.veth = Some(veth.clone());
        script += &format!(
            "addr add {}/30 dev eth0\nlink set eth0 up\nroute add default via {}\n",
            block.veth_ns(),
            block.veth_host()
        );
        cmd::ip_batch(Some(&ns), &script)?;
        cmd::ip_batch(
            None,
            &format!(
                "addr add {}/30 dev {veth}\nlink set {veth} up\nroute add {}/30 via {} dev {veth}\n",
                block.veth_host(),
                block.base(),
                block.veth_ns()
            ),
        )?;
        // The namespace routes the guest's traffic to the host, which NATs it out.
        cmd::sysctl_forward(Some(&ns))?;
        cmd::sysctl_forward(None)?;
        info.nft_handles = cmd::nft_add_rules(&veth, block, vm_name)?;
    } else {
        cmd::ip_batch(Some(&ns), &script)?;
    }
    Ok(())
}

fn teardown(info: &SandboxNetInfo) {
    for (chain, handle) in &info.nft_handles {
        if let Err(e) = cmd::nft_delete(chain, *handle) {
            tracing::warn!("removing nftables rule {chain}/{handle}: {e}");
        }
    }
    // The namespace's devices go with it: the TAP, and eth0 with its host peer (and the host
    // route through it).
    if std::path::Path::new("/run/netns")
        .join(&info.netns)
        .exists()
    {
        if let Err(e) = cmd::ip(&["netns", "del", &info.netns]) {
            tracing::warn!("removing network namespace {}: {e}", info.netns);
        }
    }
    if let Some(veth) = &info.veth {
        if std::path::Path::new("/sys/class/net").join(veth).exists() {
            let _ = cmd::ip(&["link", "del", veth]);
        }
    }
}

/// Whether this host can give sandboxes networks (`None`: it can): root, `/dev/net/tun`, `ip`,
/// and `nft` for egress.
pub fn unavailable(egress: bool) -> Option<String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("sandbox networking needs root".into());
    }
    if !std::path::Path::new("/dev/net/tun").exists() {
        return Some("/dev/net/tun is missing: load the tun module".into());
    }
    let mut tools = vec!["ip"];
    if egress {
        tools.push("nft");
    }
    for t in tools {
        if !cmd::found(t) {
            return Some(format!("{t} is missing: apt-get install iproute2 nftables"));
        }
    }
    None
}
