//! The VMM requests behind the warm tier: a restore that leaves the vCPUs parked
//! (`RestoreOptions::paused`), and `activate` (write the identity page afresh — this clone id,
//! fresh entropy, the snapshot's generation + 1 — then resume).

use vmm_api::{ClientError, ControlClient, RestoreOptions};

/// Whether this build's VMM API has `restore {paused}` and `activate` (it does; kept so the
/// benches and tests say which tier they measure).
pub const SUPPORTED: bool = true;

/// Marks `opts` as a warm restore (vCPUs parked, identity written at activation).
pub fn set_paused(opts: &mut RestoreOptions) {
    opts.paused = true;
}

/// Activates a warm clone as `clone_id` (with its network address `ipv4`, written into the
/// identity page); returns its identity generation.
pub fn activate(
    c: &mut ControlClient,
    clone_id: &str,
    ipv4: Option<std::net::Ipv4Addr>,
) -> Result<u64, ClientError> {
    c.activate_net(clone_id, ipv4).map(|r| r.generation)
}
