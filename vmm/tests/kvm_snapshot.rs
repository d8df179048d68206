//! Snapshot a running test guest and restore many clones from it, on real KVM.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use vmm::{MemoryMode, RestoreOptions};

/// Boots the counter guest, snapshots it into `snap` after it has run a while; returns the
/// counter's guest address.
fn make_template(dir: &Path, snap: &Path, vcpus: u8) -> u64 {
    let mut cfg = guest_config(
        if vcpus > 1 {
            "rt.smp rt.counter"
        } else {
            "rt.counter"
        },
        dir,
    );
    cfg.mem_mib = 64;
    cfg.vcpus = vcpus;
    let sock = dir.join("template.sock");
    cfg.control = Some(sock.clone());
    let vm = vmm::Vmm::build(cfg).unwrap();
    let reports = vm.reports().unwrap();
    let t = std::thread::spawn(move || vm.run(None));
    let started = reports
        .iter()
        .find(|r| r.starts_with("PASS counter_started") || r.starts_with("FAIL"))
        .unwrap();
    let addr = u64::from_str_radix(field(&started, "addr").expect(&started), 16).unwrap();
    std::thread::sleep(Duration::from_millis(50));
    let mut s = UnixStream::connect(&sock).unwrap();
    let mut r = BufReader::new(s.try_clone().unwrap());
    std::fs::create_dir_all(snap).unwrap();
    for req in [
        format!(r#"{{"cmd":"snapshot","dir":"{}"}}"#, snap.display()),
        r#"{"cmd":"shutdown"}"#.to_string(),
    ] {
        writeln!(s, "{req}").unwrap();
        let mut line = String::new();
        r.read_line(&mut line).unwrap();
        assert!(line.contains(r#""ok":true"#), "{req}: {line}");
    }
    assert_eq!(t.join().unwrap().unwrap(), vmm::ExitReason::Shutdown);
    addr
}

fn snapshot_counter(snap: &Path, addr: u64) -> u64 {
    let f = std::fs::File::open(snap.join("memory.bin")).unwrap();
    let mut b = [0u8; 8];
    f.read_exact_at(&mut b, addr).unwrap();
    u64::from_le_bytes(b)
}

/// Restores one clone, waits for its `resumed` report, stops it; returns the report.
fn clone_once(snap: &Path, dir: &Path, mode: MemoryMode, id: &str) -> String {
    let vm = vmm::Vmm::restore(&RestoreOptions {
        dir: snap.to_path_buf(),
        mem_mode: mode,
        clone_id: id.into(),
        serial: vmm::config::SerialOutput::None,
        debug_log: Some(dir.join(format!("{id}.log")).display().to_string()),
        control: None,
    })
    .unwrap();
    let reports = vm.reports().unwrap();
    let exit = vm.exit_handle();
    let t = std::thread::spawn(move || vm.run(None));
    let report = reports
        .recv_timeout(TIMEOUT)
        .unwrap_or_else(|_| panic!("clone {id} never reported"));
    exit.exit(vmm::ExitReason::Shutdown);
    t.join().unwrap().unwrap();
    report
}

fn file_bytes(snap: &Path) -> (Vec<u8>, Vec<u8>) {
    (
        std::fs::read(snap.join("state.bin")).unwrap(),
        std::fs::read(snap.join("memory.bin")).unwrap(),
    )
}

#[test]
fn kvm_snapshot_fifty_clones_resume_isolated() {
    if !kvm_available("kvm_snapshot_fifty_clones_resume_isolated") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let snap = dir.path().join("snap");
    let addr = make_template(dir.path(), &snap, 1);
    let at_snapshot = snapshot_counter(&snap, addr);
    assert!(at_snapshot > 0, "the guest ran before the snapshot");
    let before = file_bytes(&snap);
    let start = Instant::now();
    let mut handles = Vec::new();
    for batch in 0..5 {
        for i in 0..10 {
            let (snap, d) = (snap.clone(), dir.path().to_path_buf());
            let mode = if i % 5 == 0 {
                MemoryMode::Copy
            } else {
                MemoryMode::Cow
            };
            let id = format!("clone-{}", batch * 10 + i);
            handles.push(std::thread::spawn(move || {
                (id.clone(), clone_once(&snap, &d, mode, &id))
            }));
        }
        for h in handles.drain(..) {
            let (id, r) = h.join().unwrap();
            assert!(r.starts_with("PASS resumed"), "{id}: {r}");
            assert_eq!(field(&r, "clone"), Some(id.as_str()), "{r}");
            assert_eq!(field(&r, "gen"), Some("1"), "{r}");
            assert_eq!(
                field(&r, "prev"),
                Some(""),
                "{id} saw another clone's write: {r}"
            );
            let counter: u64 = field(&r, "counter").unwrap().parse().unwrap();
            assert!(
                counter >= at_snapshot && counter < at_snapshot + 1000,
                "{id} resumed at {counter}, snapshot had {at_snapshot}"
            );
        }
    }
    eprintln!("50 clones in {:?}", start.elapsed());
    assert!(
        before == file_bytes(&snap),
        "restores changed the snapshot files"
    );
}

#[test]
fn kvm_snapshot_two_vcpus() {
    if !kvm_available("kvm_snapshot_two_vcpus") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let snap = dir.path().join("snap");
    make_template(dir.path(), &snap, 2);
    for mode in [MemoryMode::Copy, MemoryMode::Cow] {
        let r = clone_once(&snap, dir.path(), mode, "smp");
        assert!(
            r.starts_with("PASS resumed") && r.contains("clone=smp"),
            "{r}"
        );
    }
}

#[test]
fn kvm_snapshot_damaged_or_unsupported_is_refused() {
    if !kvm_available("kvm_snapshot_damaged_or_unsupported_is_refused") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let snap = dir.path().join("snap");
    make_template(dir.path(), &snap, 1);
    let (state, _) = file_bytes(&snap);
    let opts = RestoreOptions {
        dir: snap.clone(),
        mem_mode: MemoryMode::Cow,
        clone_id: "x".into(),
        serial: vmm::config::SerialOutput::None,
        debug_log: None,
        control: None,
    };
    let refuse = |bytes: &[u8], expect: &str| {
        std::fs::write(snap.join("state.bin"), bytes).unwrap();
        let e = vmm::Vmm::restore(&opts).err().expect(expect).to_string();
        assert!(e.contains(expect), "{e}");
    };
    refuse(&state[..state.len() / 2], "truncated");
    let mut flipped = state.clone();
    flipped[state.len() - 10] ^= 1;
    refuse(&flipped, "checksum");
    let mut versioned = state.clone();
    versioned[8] = 9;
    refuse(&versioned, "format version 9");
    std::fs::write(snap.join("state.bin"), &state).unwrap();
    let mem = std::fs::OpenOptions::new()
        .write(true)
        .open(snap.join("memory.bin"))
        .unwrap();
    mem.set_len(4096).unwrap();
    let e = vmm::Vmm::restore(&opts).err().unwrap().to_string();
    assert!(e.contains("memory.bin"), "{e}");

    // A VM with virtio devices cannot be snapshotted yet: a clear error, and it keeps running.
    let disk = dir.path().join("disk.img");
    std::fs::write(&disk, [0u8; 4096]).unwrap();
    let mut cfg = guest_config("rt.counter", dir.path());
    cfg.block.push(vmm::config::BlockConfig {
        path: disk,
        read_only: true,
        id: None,
    });
    let sock = dir.path().join("blk.sock");
    cfg.control = Some(sock.clone());
    let vm = vmm::Vmm::build(cfg).unwrap();
    let t = std::thread::spawn(move || vm.run(None));
    let mut s = UnixStream::connect(&sock).unwrap();
    let mut r = BufReader::new(s.try_clone().unwrap());
    writeln!(
        s,
        r#"{{"cmd":"snapshot","dir":"{}"}}"#,
        dir.path().display()
    )
    .unwrap();
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    assert!(line.contains("not implemented yet"), "{line}");
    writeln!(s, r#"{{"cmd":"shutdown"}}"#).unwrap();
    assert!(t.join().unwrap().is_ok());
}

/// A snapshot of a copy-on-write clone holds the clone's own writes, not the template's memory.
#[test]
fn kvm_snapshot_of_a_cow_clone_keeps_its_writes() {
    if !kvm_available("kvm_snapshot_of_a_cow_clone_keeps_its_writes") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let snap = dir.path().join("snap");
    make_template(dir.path(), &snap, 1);
    let sock = dir.path().join("clone.sock");
    let vm = vmm::Vmm::restore(&RestoreOptions {
        dir: snap.clone(),
        mem_mode: MemoryMode::Cow,
        clone_id: "first".into(),
        serial: vmm::config::SerialOutput::None,
        debug_log: Some(dir.path().join("first.log").display().to_string()),
        control: Some(sock.clone()),
    })
    .unwrap();
    let reports = vm.reports().unwrap();
    let t = std::thread::spawn(move || vm.run(None));
    let r = reports.recv_timeout(TIMEOUT).unwrap();
    assert!(r.contains("clone=first"), "{r}");
    // Give the guest time to copy its id into its private page, then snapshot the clone.
    std::thread::sleep(Duration::from_millis(50));
    let snap2 = dir.path().join("snap2");
    std::fs::create_dir_all(&snap2).unwrap();
    let mut s = UnixStream::connect(&sock).unwrap();
    let mut rd = BufReader::new(s.try_clone().unwrap());
    for req in [
        format!(r#"{{"cmd":"snapshot","dir":"{}"}}"#, snap2.display()),
        r#"{"cmd":"shutdown"}"#.to_string(),
    ] {
        writeln!(s, "{req}").unwrap();
        let mut line = String::new();
        rd.read_line(&mut line).unwrap();
        assert!(line.contains(r#""ok":true"#), "{line}");
    }
    t.join().unwrap().unwrap();
    let r = clone_once(&snap2, dir.path(), MemoryMode::Cow, "second");
    assert_eq!(field(&r, "gen"), Some("2"), "{r}");
    assert_eq!(
        field(&r, "prev"),
        Some("first"),
        "the first clone's write was lost: {r}"
    );
}
