//! What `state.bin` of a runv snapshot holds, and reading it back.

use crate::config::VmConfig;
use crate::devices::virtio::mmio::TransportState;
use crate::error::VmmError;
use crate::persist;

/// What `state.bin` of a runv snapshot holds.
#[derive(serde::Serialize, serde::Deserialize)]
pub struct MachineSnapshot {
    /// The VM's configuration (devices, sizes); per-clone fields are overridden on restore.
    pub config: VmConfig,
    /// Identity generation at snapshot time.
    pub generation: u64,
    /// VM-wide KVM state.
    pub vm: persist::VmState,
    /// Per-vCPU KVM state.
    pub vcpus: Vec<persist::VcpuState>,
    /// virtio-mmio transports in MMIO slot order (block devices, then vsock).
    pub devices: Vec<TransportState>,
    /// Size of each block device's backing file (a replacement must match).
    pub block_bytes: Vec<u64>,
}

/// Opens the snapshot in `dir`: the state checked (and taken on a host like `host`), the memory
/// file opened once and tied to the state by the snapshot id.
pub fn read_snapshot(
    dir: &std::path::Path,
    host: &snapshot::HostFingerprint,
) -> Result<(snapshot::SnapshotDir, MachineSnapshot), VmmError> {
    Ok(snapshot::SnapshotDir::open(dir, Some(host))?)
}
