//! virtio-blk driven by the test guest's polling driver through the real virtio-mmio registers,
//! KVM ioeventfds and the device loop.

mod common;

use common::*;
use vmm::config::BlockConfig;

fn disk(dir: &std::path::Path) -> (std::path::PathBuf, Vec<u8>) {
    let path = dir.join("disk.img");
    let data: Vec<u8> = (0..64 * 1024u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    std::fs::write(&path, &data).unwrap();
    (path, data)
}

#[test]
fn kvm_virtio_blk_read_write_flush_get_id() {
    if !kvm_available("kvm_virtio_blk_read_write_flush_get_id") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (path, data) = disk(dir.path());
    let mut cfg = guest_config("rt.blk rt.exit=reset", dir.path());
    cfg.block.push(BlockConfig {
        path: path.clone(),
        read_only: false,
        id: Some("vol-rw".into()),
    });
    let (reports, reason) = run_vm(cfg);
    assert_eq!(reason, vmm::ExitReason::GuestReset, "{reports:?}");
    let blk = reports
        .iter()
        .find(|r| r.starts_with("PASS blk"))
        .unwrap_or_else(|| panic!("{reports:?}"));
    assert_eq!(
        field(blk, "sum0"),
        Some(format!("{:x}", fnv1a(&data[..512])).as_str())
    );
    assert_eq!(field(blk, "id"), Some("vol-rw"));
    assert_eq!(field(blk, "write"), Some("0"));
    assert_eq!(field(blk, "flush"), Some("0"));
    let after = std::fs::read(&path).unwrap();
    let expected: Vec<u8> = (0..512u32).map(|i| (i as u8) ^ 0x5a).collect();
    assert_eq!(after[512..1024], expected[..]);
    assert_eq!(after[..512], data[..512]);
    assert_eq!(after[1024..], data[1024..]);
}

#[test]
fn kvm_virtio_blk_read_only_refuses_writes() {
    if !kvm_available("kvm_virtio_blk_read_only_refuses_writes") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (path, data) = disk(dir.path());
    let mut cfg = guest_config("rt.blk rt.exit=reset", dir.path());
    cfg.block.push(BlockConfig {
        path: path.clone(),
        read_only: true,
        id: None,
    });
    let (reports, reason) = run_vm(cfg);
    assert_eq!(reason, vmm::ExitReason::GuestReset, "{reports:?}");
    let blk = reports.iter().find(|r| r.starts_with("PASS blk")).unwrap();
    assert_eq!(
        field(blk, "write"),
        Some("1"),
        "VIRTIO_BLK_S_IOERR expected"
    );
    assert_eq!(
        field(blk, "id"),
        Some("disk.img"),
        "default id is the file name"
    );
    assert_eq!(std::fs::read(&path).unwrap(), data);
}

#[test]
fn kvm_virtio_blk_missing_backing_file_is_refused() {
    if !kvm_available("kvm_virtio_blk_missing_backing_file_is_refused") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = guest_config("rt.blk", dir.path());
    cfg.block.push(BlockConfig {
        path: dir.path().join("absent.img"),
        read_only: false,
        id: None,
    });
    let err = vmm::Vmm::build(cfg).err().unwrap().to_string();
    assert!(err.contains("absent.img"), "{err}");
}
