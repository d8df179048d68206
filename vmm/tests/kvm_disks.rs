//! Disk slots: `attach_disk` / `detach_disk` swap a running VM's (or a copy-on-write clone's)
//! slot backing file, and the test guest's `rt.blk_watch` task sees the capacity change, the new
//! serial and the new data through its own virtio-blk driver.

mod common;

use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;
use crossbeam_channel::Receiver;
use pool_manager::{ShellProcess, ShellSpec};
use vmm::config::{BlockConfig, VmConfig};
use vmm_api::{slot_id, ClientError, ControlClient, ErrorKind, MemoryMode, RestoreOptions};

/// Adds `n` disk slots (one-sector placeholder files in `dir`) to `cfg`.
fn add_slots(cfg: &mut VmConfig, dir: &Path, n: usize) {
    for i in 0..n {
        let path = dir.join(format!("slot{i}.placeholder"));
        std::fs::write(&path, [0u8; 512]).unwrap();
        cfg.block.push(BlockConfig {
            path,
            read_only: false,
            id: Some(slot_id(i)),
        });
    }
}

/// A 1 MiB image whose first sector is `seed`-dependent; returns its path and first sector.
fn image(dir: &Path, name: &str, seed: u8) -> (PathBuf, Vec<u8>) {
    let path = dir.join(name);
    let data: Vec<u8> = (0..1u32 << 20)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect();
    std::fs::write(&path, &data).unwrap();
    (path, data[..512].to_vec())
}

/// The next report starting with `PASS <name>`; panics on a `FAIL` or after [`TIMEOUT`].
fn next_pass(reports: &Receiver<String>, name: &str) -> String {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let r = match reports.recv_timeout(left) {
            Ok(r) => r,
            Err(e) => panic!("no PASS {name} report: {e:?}"),
        };
        assert!(!r.starts_with("FAIL"), "{r}");
        if r.starts_with(&format!("PASS {name} ")) {
            return r;
        }
    }
}

/// `attach_disk` of a descriptor that is not there.
const NO_FD: &[u8] = b"{\"cmd\":\"attach_disk\",\"slot\":0,\"path\":\"/no/fd.img\",\"fd\":true}\n";

/// `path` opened `O_PATH` (a descriptor that names the file but reads nothing).
fn open_path(path: &Path) -> std::fs::File {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH)
        .open(path)
        .unwrap()
}

/// The error kind and message of a refused call.
fn refused<T: std::fmt::Debug>(r: Result<T, ClientError>) -> (ErrorKind, String) {
    match r {
        Err(ClientError::Refused { error, .. }) => (error.kind, error.error),
        other => panic!("expected a refusal, got {other:?}"),
    }
}

/// Attaches a fresh image to slot 0, checks what the guest reports, detaches, checks again.
fn attach_and_detach(c: &mut ControlClient, reports: &Receiver<String>, dir: &Path, seed: u8) {
    let (img, first) = image(dir, &format!("image{seed}.img"), seed);
    let reply = c.attach_disk(0, &img, false).unwrap();
    assert_eq!(
        (reply.slot, reply.capacity_sectors, reply.serial.as_str()),
        (0, 2048, "runv-slot0")
    );
    let r = next_pass(reports, "blk_attached");
    assert_eq!(field(&r, "capacity"), Some("2048"), "{r}");
    assert_eq!(field(&r, "serial"), Some("runv-slot0"), "{r}");
    let sum0 = format!("{:x}", fnv1a(&first));
    assert_eq!(field(&r, "sum0"), Some(sum0.as_str()), "{r}");
    assert_eq!(field(&r, "config_irq"), Some("1"), "{r}");

    let snap = dir.join("refused-snap");
    std::fs::create_dir_all(&snap).unwrap();
    let (kind, msg) = refused(c.snapshot(&snap));
    assert_eq!(kind, ErrorKind::InvalidState, "{msg}");
    assert!(msg.contains("detach disks before snapshotting"), "{msg}");

    let reply = c.detach_disk(0).unwrap();
    assert_eq!(reply.capacity_sectors, 1, "the placeholder is back");
    let r = next_pass(reports, "blk_detached");
    assert_eq!(field(&r, "capacity"), Some("1"), "{r}");
    assert_eq!(field(&r, "config_irq"), Some("1"), "{r}");
    // Detaching a slot that holds its placeholder changes nothing.
    assert_eq!(c.detach_disk(0).unwrap().capacity_sectors, 1);
}

#[test]
fn kvm_disks_attach_detach_and_refusals_on_a_booted_vm() {
    if !kvm_available("kvm_disks_attach_detach_and_refusals_on_a_booted_vm") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut cfg = guest_config("rt.blk_watch", d);
    add_slots(&mut cfg, d, 2);
    let data = d.join("data.img");
    std::fs::write(&data, [7u8; 4096]).unwrap();
    cfg.block.push(BlockConfig {
        path: data.clone(),
        read_only: false,
        id: Some("data".into()),
    });
    let sock = d.join("control.sock");
    cfg.control = Some(sock.clone());
    let vm = vmm::Vmm::build(cfg).unwrap();
    let reports = vm.reports().unwrap();
    let t = std::thread::spawn(move || vm.run(None));
    let r = next_pass(&reports, "blk_watching");
    assert_eq!(field(&r, "capacity"), Some("1"), "{r}");

    let mut c = control(&sock);
    c.set_timeout(Duration::from_secs(5)).unwrap();
    let (img, _) = image(d, "refused.img", 1);
    let (kind, msg) = refused(c.attach_disk(3, &img, false));
    assert_eq!(kind, ErrorKind::BadRequest);
    assert!(msg.contains("slot 3 is out of range"), "{msg}");
    let (kind, msg) = refused(c.attach_disk(2, &img, false));
    assert_eq!(kind, ErrorKind::BadRequest);
    assert!(msg.contains("not a disk slot"), "{msg}");
    // The client opens the image and passes its descriptor: a file it cannot open is its
    // own error, the VMM is not asked.
    match c.attach_disk(0, &d.join("absent.img"), false) {
        Err(e @ ClientError::Open { .. }) => assert!(e.to_string().contains("absent.img"), "{e}"),
        other => panic!("expected an open error, got {other:?}"),
    }
    // Asked to open a path itself, the VMM refuses the same file.
    let (kind, msg) = refused(c.attach_disk_path(0, &d.join("absent.img"), false));
    assert_eq!(kind, ErrorKind::Failed);
    assert!(msg.contains("absent.img"), "{msg}");
    // `fd: true` with no descriptor on the line: a clear refusal, nothing attached.
    let v = c.call_raw(NO_FD).unwrap();
    assert_eq!(v["kind"], "bad_request", "{v}");
    assert!(
        v["error"]
            .as_str()
            .unwrap()
            .contains("no file descriptor came with the request"),
        "{v}"
    );
    // A descriptor that does not allow what the attach needs.
    let ro_file = std::fs::File::open(&img).unwrap();
    let (kind, msg) = refused(c.attach_disk_fd(0, ro_file.as_fd(), &img, false));
    assert_eq!(kind, ErrorKind::Failed);
    assert!(msg.contains("read-only") && msg.contains("O_RDWR"), "{msg}");
    let path_fd = open_path(&img);
    let (_, msg) = refused(c.attach_disk_fd(0, path_fd.as_fd(), &img, true));
    assert!(msg.contains("O_PATH"), "{msg}");
    // A socket is no disk either.
    let (sa, _sb) = std::os::unix::net::UnixStream::pair().unwrap();
    let (_, msg) = refused(c.attach_disk_fd(0, sa.as_fd(), Path::new("a-socket"), true));
    assert!(
        msg.contains("a-socket") && msg.contains("regular file"),
        "{msg}"
    );
    // Descriptors sent with requests that take none are closed, not kept or used later (the
    // VMM runs in this process: its copies show in /proc/self/fd). Only descriptors of this
    // image count: the other tests of this binary open and close their own at the same time.
    let image_path = std::fs::canonicalize(&img).unwrap();
    let open_fds = || {
        std::fs::read_dir("/proc/self/fd")
            .unwrap()
            .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
            .filter(|target| *target == image_path)
            .count()
    };
    let before = open_fds();
    assert!(before >= 1, "the test's own read-only descriptor is seen");
    for _ in 0..20 {
        let s: vmm_api::StatusReply = c
            .call_with_fd(&vmm_api::Request::Status {}, Some(ro_file.as_fd()))
            .unwrap();
        assert_eq!(s.state, vmm_api::VmState::Running);
    }
    assert_eq!(open_fds(), before, "stray descriptors are closed");
    let v = c.call_raw(NO_FD).unwrap();
    assert_eq!(v["kind"], "bad_request", "{v}");
    // A FIFO without a writer: refused at once, not waited on.
    let fifo = d.join("fifo");
    let ok = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap();
    assert!(ok.success());
    for ro in [false, true] {
        for by_path in [false, true] {
            let t0 = Instant::now();
            let (kind, msg) = refused(if by_path {
                c.attach_disk_path(1, &fifo, ro)
            } else {
                c.attach_disk(1, &fifo, ro)
            });
            assert_eq!(kind, ErrorKind::Failed);
            assert!(msg.contains("a FIFO"), "{msg}");
            assert!(t0.elapsed() < Duration::from_secs(2));
        }
    }
    let (_, msg) = refused(c.attach_disk(0, d, true));
    assert!(msg.contains("a directory"), "{msg}");
    let (_, msg) = refused(c.attach_disk_path(0, d, true));
    assert!(msg.contains("a directory"), "{msg}");
    let link = d.join("link.img");
    std::os::unix::fs::symlink(&img, &link).unwrap();
    match c.attach_disk(0, &link, false) {
        Err(e @ ClientError::Open { .. }) => assert!(e.to_string().contains("link.img"), "{e}"),
        other => panic!("expected an open error, got {other:?}"),
    }
    let (_, msg) = refused(c.attach_disk_path(0, &link, false));
    assert!(msg.contains("link.img"), "{msg}");
    c.pause().unwrap();
    let (kind, msg) = refused(c.attach_disk(0, &img, false));
    assert_eq!(kind, ErrorKind::InvalidState);
    assert!(msg.contains("paused"), "{msg}");
    let (kind, _) = refused(c.detach_disk(0));
    assert_eq!(kind, ErrorKind::InvalidState);
    c.resume().unwrap();

    // None of that reached the guest: its first change seen is this attach.
    attach_and_detach(&mut c, &reports, d, 9);
    assert_eq!(
        std::fs::read(&data).unwrap(),
        [7u8; 4096],
        "non-slot disk untouched"
    );
    c.shutdown().unwrap();
    assert_eq!(t.join().unwrap().unwrap(), vmm::ExitReason::Shutdown);
}

#[test]
fn kvm_disks_an_idle_shell_refuses_attach_and_detach() {
    if !kvm_available("kvm_disks_an_idle_shell_refuses_attach_and_detach") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let spec = ShellSpec {
        vmm: PathBuf::from(env!("CARGO_BIN_EXE_runv-vmm")),
        mem_mib: 32,
        vcpus: 1,
        run_dir: dir.path().to_path_buf(),
        jail: None,
    };
    let mut shell = ShellProcess::spawn(&spec, "idle").unwrap();
    let (img, _) = image(dir.path(), "a.img", 0);
    let (kind, msg) = refused(shell.client().attach_disk(0, &img, false));
    assert_eq!(kind, ErrorKind::InvalidState);
    assert!(msg.contains("no VM yet"), "{msg}");
    let (kind, _) = refused(shell.client().detach_disk(0));
    assert_eq!(kind, ErrorKind::InvalidState);
    assert!(shell.shutdown().unwrap().success());
}

/// The point of slots: a copy-on-write clone of a template that was watching its slot sees a
/// disk attached after the restore.
#[test]
fn kvm_disks_a_cow_clone_sees_the_attached_disk() {
    if !kvm_available("kvm_disks_a_cow_clone_sees_the_attached_disk") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut cfg = guest_config("rt.blk_watch", d);
    add_slots(&mut cfg, d, 2);
    let sock = d.join("template.sock");
    cfg.control = Some(sock.clone());
    let vm = vmm::Vmm::build(cfg).unwrap();
    let reports = vm.reports().unwrap();
    let t = std::thread::spawn(move || vm.run(None));
    next_pass(&reports, "blk_watching");
    let snap = d.join("snap");
    std::fs::create_dir_all(&snap).unwrap();
    let mut c = control(&sock);
    c.snapshot(&snap).unwrap();
    c.shutdown().unwrap();
    assert_eq!(t.join().unwrap().unwrap(), vmm::ExitReason::Shutdown);

    let clone_sock = d.join("clone.sock");
    let mut opts = RestoreOptions::new(&snap, MemoryMode::Cow);
    opts.clone_id = "disk-clone".into();
    opts.serial = vmm::config::SerialOutput::None;
    opts.debug_log = Some(d.join("clone.log").display().to_string());
    opts.control = Some(clone_sock.clone());
    // Restored as a warm pool clone: parked until `activate`, and no disk before that.
    opts.paused = true;
    let vm = vmm::Vmm::restore(&opts).unwrap();
    let reports = vm.reports().unwrap();
    let t = std::thread::spawn(move || vm.run(None));
    let mut c = control(&clone_sock);
    c.set_timeout(Duration::from_secs(5)).unwrap();
    let (img, _) = image(d, "early.img", 3);
    let (kind, msg) = refused(c.attach_disk(0, &img, false));
    assert_eq!(kind, ErrorKind::InvalidState, "{msg}");
    assert_eq!(c.activate("disk-clone").unwrap().generation, 1);
    attach_and_detach(&mut c, &reports, d, 42);
    c.shutdown().unwrap();
    assert_eq!(t.join().unwrap().unwrap(), vmm::ExitReason::Shutdown);
}
