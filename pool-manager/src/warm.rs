//! The VMM requests behind the warm tier: a restore that leaves the vCPUs parked, and
//! `activate` (write the identity page afresh, then resume).

use vmm_api::{ClientError, ControlClient, RestoreOptions};

/// Whether this build's VMM API has `restore {paused}` and `activate`.
pub const SUPPORTED: bool = false;

/// Marks `opts` as a warm restore (vCPUs parked, identity written at activation).
pub fn set_paused(_opts: &mut RestoreOptions) {}

/// Activates a warm clone as `clone_id`; returns its identity generation.
pub fn activate(_c: &mut ControlClient, _clone_id: &str) -> Result<u64, ClientError> {
    Err(ClientError::Encode(
        "this runv-vmm has no activate request: warm clones are not available".into(),
    ))
}
