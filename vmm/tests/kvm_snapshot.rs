//! Snapshot a running test guest and restore many clones from it, on real KVM.

mod common;

use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use vmm::{MemoryMode, RestoreOptions};

const HOLD_PORT: u32 = 5000;

/// A host-side vsock peer: accepts the guest's connections on `path` and echoes what it reads;
/// returns everything it received when `stop` is set or the peer closes.
fn echo_peer(path: &Path) -> std::thread::JoinHandle<Vec<u8>> {
    let l = UnixListener::bind(path).unwrap();
    l.set_nonblocking(true).unwrap();
    std::thread::spawn(move || {
        let deadline = Instant::now() + TIMEOUT;
        let mut got = Vec::new();
        let mut held = Vec::new();
        while Instant::now() < deadline {
            match l.accept() {
                Ok((s, _)) => {
                    s.set_read_timeout(Some(Duration::from_millis(5))).unwrap();
                    held.push(s);
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => panic!("accept: {e}"),
            }
            let mut closed = false;
            for s in &mut held {
                let mut buf = [0u8; 256];
                match s.read(&mut buf) {
                    Ok(0) => closed = true,
                    Ok(n) => {
                        got.extend_from_slice(&buf[..n]);
                        s.write_all(&buf[..n]).unwrap();
                    }
                    Err(_) => {}
                }
            }
            if closed || got.ends_with(b"#") {
                break;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        got
    })
}

struct Template {
    /// Guest address of the counter.
    addr: u64,
    /// Held by the test so the template's vsock connection stays open while it is snapshotted.
    _peer: Option<std::thread::JoinHandle<Vec<u8>>>,
}

/// Boots the counter guest with `extra` options, snapshots it into `snap` after it has run a
/// while, and stops it.
fn make_template(
    dir: &Path,
    snap: &Path,
    vcpus: u8,
    extra: &str,
    initrd: Option<&Path>,
) -> Template {
    let mut cmdline = String::from("rt.counter");
    if vcpus > 1 {
        cmdline.insert_str(0, "rt.smp ");
    }
    if !extra.is_empty() {
        cmdline = format!("{cmdline} {extra}");
    }
    let mut cfg = guest_config(&cmdline, dir);
    cfg.mem_mib = 64;
    cfg.vcpus = vcpus;
    cfg.initrd = initrd.map(Path::to_path_buf);
    let mut peer = None;
    if extra.contains("rt.vsock_hold") {
        let uds = dir.join("template.vsock");
        peer = Some(echo_peer(Path::new(&format!(
            "{}_{HOLD_PORT}",
            uds.display()
        ))));
        cfg.vsock = Some(vmm::config::VsockConfig { cid: 3, uds });
    }
    let sock = dir.join("template.sock");
    cfg.control = Some(sock.clone());
    let started = snapshot_counter_guest(cfg, snap, Duration::from_millis(50));
    let addr = u64::from_str_radix(field(&started, "addr").expect(&started), 16).unwrap();
    Template { addr, _peer: peer }
}

fn snapshot_counter(snap: &Path, addr: u64) -> u64 {
    let f = std::fs::File::open(snap.join("memory.bin")).unwrap();
    let mut b = [0u8; 8];
    f.read_exact_at(&mut b, addr).unwrap();
    u64::from_le_bytes(b)
}

/// What one clone reported, and its uffd counters.
struct CloneRun {
    reports: Vec<String>,
    status: serde_json::Value,
}

/// Restores one clone, waits for `want` reports (the first is `resumed`), reads its status,
/// stops it.
fn clone_run(snap: &Path, dir: &Path, mode: MemoryMode, id: &str, want: usize) -> CloneRun {
    let mut opts = RestoreOptions::new(snap, mode);
    opts.clone_id = id.into();
    opts.serial = vmm::config::SerialOutput::None;
    opts.debug_log = Some(dir.join(format!("{id}.log")).display().to_string());
    let sock = dir.join(format!("{id}.sock"));
    opts.control = Some(sock.clone());
    // A uffd clone publishes its working set only once its whole recording window has passed
    // while it ran: record briefly, and run at least that long (below).
    let uffd = matches!(mode, MemoryMode::Uffd);
    if uffd {
        opts.record_ms = 2 * vmm::uffd::MIN_RECORD_MS;
    }
    let restored = Instant::now();
    let (_, state): (_, vmm::MachineSnapshot) = snapshot::SnapshotDir::open(snap, None).unwrap();
    if state.config.vsock.is_some() {
        opts.vsock_uds = Some(dir.join(format!("{id}.vsock")));
    }
    let vm = vmm::Vmm::restore(&opts).unwrap_or_else(|e| panic!("restoring {id}: {e}"));
    let reports = vm.reports().unwrap();
    let exit = vm.exit_handle();
    let t = std::thread::spawn(move || vm.run(None));
    let mut got = Vec::new();
    let mut woke = None;
    while got.len() < want {
        let r = reports
            .recv_timeout(TIMEOUT)
            .unwrap_or_else(|_| panic!("clone {id} reported only {woke:?} {got:?}"));
        // The cheap first report after a resume; the full one follows it (see `next_resumed`).
        if woke.is_none() && r.starts_with("PASS woke") {
            assert_eq!(field(&r, "clone"), Some(id), "{r}");
            woke = Some(r);
            continue;
        }
        assert!(
            woke.is_some() || r.starts_with("FAIL"),
            "no PASS woke before {r}"
        );
        let fail = r.starts_with("FAIL");
        got.push(r);
        if fail {
            break;
        }
    }
    if uffd {
        let window = Duration::from_millis(opts.record_ms + 100);
        std::thread::sleep(window.saturating_sub(restored.elapsed()));
    }
    let status = serde_json::to_value(control(&sock).status().unwrap()).unwrap();
    exit.exit(vmm::ExitReason::Shutdown);
    t.join().unwrap().unwrap();
    CloneRun {
        reports: got,
        status,
    }
}

fn clone_once(snap: &Path, dir: &Path, mode: MemoryMode, id: &str) -> String {
    clone_run(snap, dir, mode, id, 1).reports.remove(0)
}

fn file_bytes(snap: &Path) -> (Vec<u8>, Vec<u8>) {
    (
        std::fs::read(snap.join("state.bin")).unwrap(),
        std::fs::read(snap.join("memory.bin")).unwrap(),
    )
}

/// The acceptance test: a guest with a counter, a pattern and a held vsock connection is
/// snapshotted mid-run; 50 clones (copy, cow and uffd) resume from the snapshot's counter, write
/// their own id, get a TRANSPORT_RESET and answer on a new vsock connection; none sees another's
/// writes, and the snapshot files are unchanged.
#[test]
fn kvm_snapshot_fifty_clones_resume_isolated() {
    if !kvm_available("kvm_snapshot_fifty_clones_resume_isolated") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let snap = dir.path().join("snap");
    let tpl = make_template(
        dir.path(),
        &snap,
        1,
        &format!("rt.vsock_hold={HOLD_PORT}"),
        None,
    );
    let at_snapshot = snapshot_counter(&snap, tpl.addr);
    assert!(at_snapshot > 0, "the guest ran before the snapshot");
    let before = file_bytes(&snap);
    let start = Instant::now();
    let mut handles = Vec::new();
    for batch in 0..5 {
        for i in 0..10 {
            let (snap, d) = (snap.clone(), dir.path().to_path_buf());
            let mode = match i % 3 {
                0 => MemoryMode::Copy,
                1 => MemoryMode::Cow,
                _ => MemoryMode::Uffd,
            };
            let id = format!("clone-{}", batch * 10 + i);
            let peer = echo_peer(&d.join(format!("{id}.vsock_{HOLD_PORT}")));
            handles.push(std::thread::spawn(move || {
                let run = clone_run(&snap, &d, mode, &id, 2);
                (id, run, peer)
            }));
        }
        for h in handles.drain(..) {
            let (id, run, peer) = h.join().unwrap();
            let r = &run.reports[0];
            assert!(r.starts_with("PASS resumed"), "{id}: {:?}", run.reports);
            assert_eq!(field(r, "clone"), Some(id.as_str()), "{r}");
            assert_eq!(field(r, "gen"), Some("1"), "{r}");
            assert_eq!(field(r, "pattern"), Some("ok"), "{r}");
            assert_eq!(
                field(r, "prev"),
                Some(""),
                "{id} saw another clone's write: {r}"
            );
            let counter: u64 = field(r, "counter").unwrap().parse().unwrap();
            assert!(
                counter >= at_snapshot && counter < at_snapshot + 1000,
                "{id} resumed at {counter}, snapshot had {at_snapshot}"
            );
            let v = run.reports.get(1).map(String::as_str).unwrap_or("none");
            assert!(
                v.starts_with("PASS vsock_after_restore reset=1"),
                "{id}: {v}"
            );
            let echoed = peer.join().unwrap();
            assert_eq!(
                String::from_utf8_lossy(&echoed),
                format!("clone={id}"),
                "{id}: the host saw the wrong vsock payload"
            );
        }
    }
    eprintln!("50 clones in {:?}", start.elapsed());
    assert!(
        before == file_bytes(&snap),
        "restores changed the snapshot files"
    );
}

/// Each memory mode restores the same memory; `uffd` reports its faults, and the second clone,
/// prefetching the working set the first one recorded, takes markedly fewer. Run with the memory
/// file on tmpfs (MINOR faults, zero copy) and on the target's file system (MISSING faults); on a
/// PVM-like host, whose KVM never waits on userfaultfd, both run in Populate mode.
#[test]
fn kvm_snapshot_uffd_records_then_prefetches_the_working_set() {
    if !kvm_available("kvm_snapshot_uffd_records_then_prefetches_the_working_set") {
        return;
    }
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let initrd = dir.path().join("initrd.bin");
    let data: Vec<u8> = (0..(2u32 << 20))
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    std::fs::write(&initrd, &data).unwrap();
    let shm = tempfile::tempdir_in("/dev/shm").unwrap();
    let kvm_api = 12;
    let pvm = snapshot::HostFingerprint::current(kvm_api).pvm_like;
    for (base, mut expect_mode) in [(shm.path(), "minor"), (dir.path(), "missing")] {
        if pvm {
            expect_mode = "populate";
        }
        let snap = base.join("snap");
        make_template(dir.path(), &snap, 1, "rt.touch=300", Some(&initrd));
        let copy = clone_run(&snap, dir.path(), MemoryMode::Copy, "copy", 2).reports;
        let cow = clone_run(&snap, dir.path(), MemoryMode::Cow, "cow", 2).reports;
        let first = clone_run(&snap, dir.path(), MemoryMode::Uffd, "uffd-1", 2);
        assert!(
            snap.join("workingset.bin").exists(),
            "the first uffd clone recorded its working set"
        );
        let second = clone_run(&snap, dir.path(), MemoryMode::Uffd, "uffd-2", 2);
        let expected_sum: u32 = data[..300 * 4096]
            .iter()
            .step_by(4096)
            .map(|&b| u32::from(b))
            .sum();
        for r in [&copy, &cow, &first.reports, &second.reports] {
            assert!(r[0].starts_with("PASS resumed"), "{r:?}");
            let t = r.get(1).map(String::as_str).unwrap_or("none");
            assert_eq!(field(t, "pages"), Some("300"), "{r:?}");
            assert_eq!(
                field(t, "sum"),
                Some(format!("{expected_sum:x}").as_str()),
                "the clone read other bytes than the template's: {t}"
            );
        }
        let (u1, u2) = (&first.status["uffd"], &second.status["uffd"]);
        assert_eq!(u1["mode"], expect_mode, "{u1}");
        let (f1, f2) = (
            u1["faults"].as_u64().unwrap(),
            u2["faults"].as_u64().unwrap(),
        );
        eprintln!("{expect_mode}: first clone {u1}, second clone {u2}");
        assert!(
            f1 >= 300,
            "the first clone faulted on every touched page: {u1}"
        );
        assert!(u2["prefetched_pages"].as_u64().unwrap() >= 300, "{u2}");
        assert!(f2 * 4 < f1, "prefetch did not cut the faults: {f1} -> {f2}");
    }
}

#[test]
fn kvm_snapshot_two_vcpus() {
    if !kvm_available("kvm_snapshot_two_vcpus") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let snap = dir.path().join("snap");
    make_template(dir.path(), &snap, 2, "", None);
    for mode in [MemoryMode::Copy, MemoryMode::Cow, MemoryMode::Uffd] {
        let r = clone_once(&snap, dir.path(), mode, "smp");
        assert!(
            r.starts_with("PASS resumed") && r.contains("clone=smp"),
            "{r}"
        );
    }
}

#[test]
fn kvm_snapshot_damaged_or_mismatched_is_refused() {
    if !kvm_available("kvm_snapshot_damaged_or_mismatched_is_refused") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let snap = dir.path().join("snap");
    make_template(dir.path(), &snap, 1, "", None);
    let (state, _) = file_bytes(&snap);
    let mut opts = RestoreOptions::new(&snap, MemoryMode::Cow);
    opts.serial = vmm::config::SerialOutput::None;
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
    // A shell of another size is refused before anything is mapped.
    let small = vmm::Shell::create(32, 1).unwrap();
    let e = vmm::Vmm::restore_into(small, &opts, vmm::ControlPlane::default())
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("shell has 32 MiB"), "{e}");
    // A vsock socket for a snapshot without vsock.
    let mut with_vsock = opts.clone();
    with_vsock.vsock_uds = Some(dir.path().join("v.sock"));
    let e = vmm::Vmm::restore(&with_vsock).err().unwrap().to_string();
    assert!(e.contains("no vsock device"), "{e}");
    // A damaged working set is ignored with a warning: uffd still restores.
    std::fs::write(snap.join("workingset.bin"), b"RUNVWSET garbage").unwrap();
    let r = clone_once(&snap, dir.path(), MemoryMode::Uffd, "ws");
    assert!(r.starts_with("PASS resumed"), "{r}");
    let mem = std::fs::OpenOptions::new()
        .write(true)
        .open(snap.join("memory.bin"))
        .unwrap();
    mem.set_len(4096).unwrap();
    for mode in [MemoryMode::Copy, MemoryMode::Cow, MemoryMode::Uffd] {
        let mut o = opts.clone();
        o.mem_mode = mode;
        let e = vmm::Vmm::restore(&o).err().unwrap().to_string();
        assert!(e.contains("memory.bin"), "{mode:?}: {e}");
    }
}

/// A block device is part of the snapshot; a restore may swap its backing file for one of the
/// same size, and refuses any other.
#[test]
fn kvm_snapshot_block_device_backing_file_replaced() {
    if !kvm_available("kvm_snapshot_block_device_backing_file_replaced") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.img");
    std::fs::write(&disk, [1u8; 8192]).unwrap();
    let mut cfg = guest_config("rt.counter", dir.path());
    cfg.mem_mib = 64;
    cfg.block.push(vmm::config::BlockConfig {
        path: disk,
        read_only: true,
        id: None,
    });
    let sock = dir.path().join("blk.sock");
    cfg.control = Some(sock.clone());
    let snap = dir.path().join("snap");
    snapshot_counter_guest(cfg, &snap, Duration::ZERO);

    let other = dir.path().join("other.img");
    std::fs::write(&other, [2u8; 8192]).unwrap();
    let mut opts = RestoreOptions::new(&snap, MemoryMode::Cow);
    opts.serial = vmm::config::SerialOutput::None;
    opts.debug_log = Some(dir.path().join("c.log").display().to_string());
    opts.block = vec![vmm::BlockOverride {
        index: 0,
        path: other.clone(),
    }];
    let vm = vmm::Vmm::restore(&opts).unwrap();
    let reports = vm.reports().unwrap();
    let exit = vm.exit_handle();
    let t = std::thread::spawn(move || vm.run(None));
    let r = next_resumed(&reports);
    assert!(r.starts_with("PASS resumed"), "{r}");
    exit.exit(vmm::ExitReason::Shutdown);
    t.join().unwrap().unwrap();

    std::fs::write(&other, [2u8; 4096]).unwrap();
    let e = vmm::Vmm::restore(&opts).err().unwrap().to_string();
    assert!(e.contains("same size"), "{e}");
    opts.block[0].index = 3;
    let e = vmm::Vmm::restore(&opts).err().unwrap().to_string();
    assert!(e.contains("has 1 block devices"), "{e}");
}

/// A snapshot of a copy-on-write clone holds the clone's own writes, not the template's memory.
#[test]
fn kvm_snapshot_of_a_cow_clone_keeps_its_writes() {
    if !kvm_available("kvm_snapshot_of_a_cow_clone_keeps_its_writes") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let snap = dir.path().join("snap");
    make_template(dir.path(), &snap, 1, "", None);
    let sock = dir.path().join("clone.sock");
    let mut opts = RestoreOptions::new(&snap, MemoryMode::Cow);
    opts.clone_id = "first".into();
    opts.serial = vmm::config::SerialOutput::None;
    opts.debug_log = Some(dir.path().join("first.log").display().to_string());
    opts.control = Some(sock.clone());
    let vm = vmm::Vmm::restore(&opts).unwrap();
    let reports = vm.reports().unwrap();
    let t = std::thread::spawn(move || vm.run(None));
    let r = reports.recv_timeout(TIMEOUT).unwrap();
    assert!(r.contains("clone=first"), "{r}");
    // Give the guest time to copy its id into its private page, then snapshot the clone.
    std::thread::sleep(Duration::from_millis(50));
    let snap2 = dir.path().join("snap2");
    std::fs::create_dir_all(&snap2).unwrap();
    let mut c = control(&sock);
    c.snapshot(&snap2).unwrap();
    c.shutdown().unwrap();
    t.join().unwrap().unwrap();
    let r = clone_once(&snap2, dir.path(), MemoryMode::Cow, "second");
    assert_eq!(field(&r, "gen"), Some("2"), "{r}");
    assert_eq!(
        field(&r, "prev"),
        Some("first"),
        "the first clone's write was lost: {r}"
    );
}

/// Regression: re-snapshotting into the directory a running `cow` clone maps truncated its
/// `memory.bin` in place, which dropped even the clone's private pages. Now the clone keeps its
/// memory: a snapshot of it taken after the template directory was overwritten still resumes
/// from its own state, with its own write.
#[test]
fn kvm_snapshot_retaken_under_a_running_clone_leaves_it_intact() {
    if !kvm_available("kvm_snapshot_retaken_under_a_running_clone_leaves_it_intact") {
        return;
    }
    let dir = tempfile::tempdir_in("/dev/shm").unwrap();
    let snap = dir.path().join("snap");
    make_template(dir.path(), &snap, 1, "", None);
    let sock = dir.path().join("live.sock");
    let mut opts = RestoreOptions::new(&snap, MemoryMode::Cow);
    opts.clone_id = "live".into();
    opts.serial = vmm::config::SerialOutput::None;
    opts.debug_log = Some(dir.path().join("live.log").display().to_string());
    opts.control = Some(sock.clone());
    let vm = vmm::Vmm::restore(&opts).unwrap();
    let reports = vm.reports().unwrap();
    let t = std::thread::spawn(move || vm.run(None));
    let r = reports.recv_timeout(TIMEOUT).unwrap();
    assert!(r.contains("clone=live"), "{r}");
    std::thread::sleep(Duration::from_millis(50));

    // A new template is snapshotted into the same directory while the clone runs.
    let (old_state, _) = file_bytes(&snap);
    make_template(dir.path(), &snap, 1, "", None);
    assert!(file_bytes(&snap).0 != old_state, "the snapshot was retaken");

    let snap2 = dir.path().join("snap2");
    std::fs::create_dir_all(&snap2).unwrap();
    let mut c = control(&sock);
    c.snapshot(&snap2).unwrap();
    c.shutdown().unwrap();
    t.join().unwrap().unwrap();
    let r = clone_once(&snap2, dir.path(), MemoryMode::Cow, "after");
    assert!(r.starts_with("PASS resumed"), "{r}");
    assert_eq!(field(&r, "gen"), Some("2"), "{r}");
    assert_eq!(
        field(&r, "prev"),
        Some("live"),
        "the running clone lost its private write: {r}"
    );
    // The retaken template restores too.
    let r = clone_once(&snap, dir.path(), MemoryMode::Cow, "new");
    assert_eq!(field(&r, "gen"), Some("1"), "{r}");
}
