//! Hostile inputs against real `runv-vmm` processes and VMs: forged snapshots, files that must not
//! be read, vsock host clients that never connect, descriptor exhaustion, a file at the vsock
//! socket path.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::*;
use vmm::config::VsockConfig;
use vmm::devices::virtio::vsock::{CONNECT_DEADLINE, MAX_PENDING_CLIENTS};

fn vmm_cmd() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_runv-vmm"));
    c.args(["--serial", "none"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    c
}

/// Waits for `child` to exit (killing it and failing the test after `limit`).
fn finish(mut child: Child, limit: Duration, what: &str) -> Output {
    let deadline = Instant::now() + limit;
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "{what}: runv-vmm still running after {limit:?} (blocked or serving); stderr: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    child.wait_with_output().unwrap()
}

/// Runs `runv-vmm args` that must fail cleanly (exit status 1, not a crash or a hang); returns
/// its stderr.
fn refused(args: &[&std::ffi::OsStr], what: &str) -> String {
    let child = vmm_cmd().args(args).spawn().unwrap();
    let out = finish(child, Duration::from_secs(15), what);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(
        out.status.code(),
        Some(1),
        "{what}: {:?}: {err}",
        out.status
    );
    err
}

/// /dev/zero, a FIFO nobody writes, a 4 GiB sparse file, with the words their refusal names.
fn hostile_files(dir: &Path) -> Vec<(&'static str, PathBuf)> {
    let fifo = dir.join("fifo");
    assert!(Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap()
        .success());
    let sparse = dir.join("sparse");
    std::fs::File::create(&sparse)
        .unwrap()
        .set_len(4 << 30)
        .unwrap();
    vec![
        ("a character device", "/dev/zero".into()),
        ("a FIFO", fifo),
        ("4294967296 bytes", sparse),
    ]
}

#[test]
fn kvm_hostile_kernel_initrd_and_config_files_are_refused_before_reading() {
    if !kvm_available("kvm_hostile_kernel_initrd_and_config_files_are_refused_before_reading") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let guest = test_guests::guest_path();
    for (rule, path) in hostile_files(dir.path()) {
        for (flag, what) in [
            ("--initrd", "initrd"),
            ("--kernel", "kernel"),
            ("--config", "config file"),
        ] {
            let mut args: Vec<&std::ffi::OsStr> = vec!["--mem-mib".as_ref(), "32".as_ref()];
            if flag != "--kernel" {
                args.extend(["--kernel".as_ref(), guest.as_os_str()]);
            }
            args.extend([flag.as_ref(), path.as_os_str()]);
            let err = refused(&args, &format!("{flag} {}", path.display()));
            assert!(
                err.contains(&format!("{what} {}", path.display())) && err.contains(rule),
                "{flag} {}: {err}",
                path.display()
            );
        }
    }
}

/// Takes a snapshot of the counter guest into `dir/snap`.
fn template(dir: &Path) -> PathBuf {
    let snap = dir.join("snap");
    let mut cfg = guest_config("rt.counter", dir);
    cfg.mem_mib = 32;
    cfg.control = Some(dir.join("ctl.sock"));
    snapshot_counter_guest(cfg, &snap, Duration::from_millis(50));
    snap
}

/// Rewrites `snap`'s state file (header kept, checksum recomputed) after `forge`.
fn forge(snap: &Path, forge: impl FnOnce(&mut vmm::MachineSnapshot)) {
    let path = snap.join("state.bin");
    let mut f = std::fs::File::open(&path).unwrap();
    let (header, mut state) = snapshot::state::decode::<vmm::MachineSnapshot>(&mut f, &path, None)
        .expect("template state");
    forge(&mut state);
    std::fs::write(
        &path,
        snapshot::state::encode(&path, &header, &state).unwrap(),
    )
    .unwrap();
}

#[test]
fn kvm_forged_snapshot_with_valid_checksum_is_refused_not_a_crash() {
    if !kvm_available("kvm_forged_snapshot_with_valid_checksum_is_refused_not_a_crash") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let snap = template(dir.path());
    let restore = |what: &str| refused(&["--restore".as_ref(), snap.as_os_str()], what);
    let original = std::fs::read(snap.join("state.bin")).unwrap();
    forge(&snap, |s| {
        let m = s.vcpus[0].msrs[0];
        s.vcpus[0].msrs = vec![m; 300];
    });
    let err = restore("300 MSRs");
    assert!(err.contains("300") && err.contains("at most 256"), "{err}");
    std::fs::write(snap.join("state.bin"), &original).unwrap();
    forge(&snap, |s| {
        let e = s.vcpus[0].cpuid[0];
        s.vcpus[0].cpuid = vec![e; 1000];
    });
    let err = restore("1000 CPUID entries");
    assert!(
        err.contains("1000") && err.contains("kvm_cpuid_entry2"),
        "{err}"
    );
    std::fs::write(snap.join("state.bin"), &original).unwrap();
    forge(&snap, |s| s.vcpus[0].mp_state.mp_state = 77);
    let err = restore("mp_state 77");
    assert!(err.contains("mp_state 77"), "{err}");
    std::fs::write(snap.join("state.bin"), &original).unwrap();
    forge(&snap, |s| s.vm.irqchips.truncate(1));
    let err = restore("one irqchip");
    assert!(err.contains("irqchip"), "{err}");
}

#[test]
fn kvm_forged_snapshot_generation_does_not_wrap() {
    if !kvm_available("kvm_forged_snapshot_generation_does_not_wrap") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let snap = template(dir.path());
    forge(&snap, |s| s.generation = u64::MAX);
    let err = refused(&["--restore".as_ref(), snap.as_os_str()], "generation MAX");
    assert!(err.contains("generation"), "{err}");
}

#[test]
fn kvm_vsock_uds_on_a_regular_file_fails_and_leaves_it_intact() {
    if !kvm_available("kvm_vsock_uds_on_a_regular_file_fails_and_leaves_it_intact") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("precious.txt");
    std::fs::write(&file, b"do not delete me\n").unwrap();
    let vsock = format!("cid=3,uds={}", file.display());
    let guest = test_guests::guest_path();
    let err = refused(
        &[
            "--kernel".as_ref(),
            guest.as_os_str(),
            "--mem-mib".as_ref(),
            "32".as_ref(),
            "--vsock".as_ref(),
            vsock.as_ref(),
        ],
        "uds on a regular file",
    );
    assert!(
        err.contains(&file.display().to_string()) && err.contains("not a socket"),
        "{err}"
    );
    assert_eq!(std::fs::read(&file).unwrap(), b"do not delete me\n");
}

fn connect_when_up(uds: &Path) -> UnixStream {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        match UnixStream::connect(uds) {
            Ok(s) => return s,
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(5)),
            Err(e) => panic!("{}: {e}", uds.display()),
        }
    }
}

/// Everything the VMM writes to a client until it closes the connection.
fn until_closed(c: &mut UnixStream, limit: Duration) -> String {
    c.set_read_timeout(Some(limit)).unwrap();
    let mut s = String::new();
    c.read_to_string(&mut s)
        .unwrap_or_else(|e| panic!("connection not closed within {limit:?}: {e} (got {s:?})"));
    s
}

#[test]
fn kvm_vsock_silent_host_clients_are_dropped_and_a_good_client_connects() {
    if !kvm_available("kvm_vsock_silent_host_clients_are_dropped_and_a_good_client_connects") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let uds = dir.path().join("v.sock");
    // No rt.exit: after the echo the guest halts and the VMM keeps serving its back-end.
    let mut cfg = guest_config("rt.vsock_listen=5000", dir.path());
    cfg.vsock = Some(VsockConfig {
        cid: 3,
        uds: uds.clone(),
    });
    let vm = vmm::Vmm::build(cfg).unwrap();
    let reports = vm.reports().unwrap();
    let exit = vm.exit_handle();
    let t = std::thread::spawn(move || vm.run(None));
    let t0 = Instant::now();
    let mut silent: Vec<UnixStream> = (0..MAX_PENDING_CLIENTS - 1)
        .map(|_| connect_when_up(&uds))
        .collect();
    // Silent clients do not keep a well-behaved one out.
    let mut good = connect_when_up(&uds);
    good.set_read_timeout(Some(TIMEOUT)).unwrap();
    good.write_all(b"CONNECT 5000\nping").unwrap();
    let mut line = [0u8; 3];
    good.read_exact(&mut line).unwrap();
    assert_eq!(&line, b"OK ");
    let mut rest = Vec::new();
    let mut b = [0u8; 1];
    while rest.len() < 4 || !rest.ends_with(b"ping") {
        good.read_exact(&mut b).unwrap();
        rest.push(b[0]);
    }
    good.shutdown(std::net::Shutdown::Write).unwrap();
    // Beyond the limit, clients are refused at once.
    silent.push(connect_when_up(&uds));
    let mut over: Vec<UnixStream> = (0..5).map(|_| connect_when_up(&uds)).collect();
    for c in &mut over {
        let r = until_closed(c, Duration::from_secs(5));
        assert!(r.starts_with("ERR too many"), "{r}");
    }
    // The silent ones are closed at the deadline, with a reason.
    for c in &mut silent {
        let r = until_closed(c, CONNECT_DEADLINE + Duration::from_secs(5));
        assert!(r.starts_with("ERR no complete CONNECT"), "{r}");
    }
    assert!(
        t0.elapsed() >= CONNECT_DEADLINE - Duration::from_millis(500),
        "silent clients dropped before the deadline ({:?})",
        t0.elapsed()
    );
    let pass = loop {
        let r = reports
            .recv_timeout(TIMEOUT)
            .expect("a report from the guest");
        if r.starts_with("PASS vsock") || r.starts_with("FAIL") {
            break r;
        }
    };
    assert_eq!(pass, "PASS vsock_listen bytes=4");
    exit.exit(vmm::ExitReason::Shutdown);
    t.join().unwrap().unwrap();
}

/// User plus system CPU time of `pid`, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = after.split(' ').collect();
    // Fields 14 and 15 of stat(5); `after` starts at field 3.
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

#[test]
fn kvm_vsock_descriptor_exhaustion_does_not_spin_and_recovers() {
    if !kvm_available("kvm_vsock_descriptor_exhaustion_does_not_spin_and_recovers") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let uds = dir.path().join("v.sock");
    let vsock = format!("cid=3,uds={}", uds.display());
    // The guest halts at once: the VMM's only work is its vsock back-end.
    let mut child = vmm_cmd()
        .arg("--kernel")
        .arg(test_guests::guest_path())
        .args(["--mem-mib", "32", "--vsock", &vsock])
        .spawn()
        .unwrap();
    let pid = child.id();
    drop(connect_when_up(&uds));
    std::thread::sleep(Duration::from_millis(200));
    let open = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count() as u64;
    let limit = libc::rlimit {
        rlim_cur: open + 6,
        rlim_max: 4096,
    };
    // SAFETY: `limit` is a valid rlimit we own; a null old-limit pointer is allowed.
    let r = unsafe {
        libc::prlimit(
            pid as libc::pid_t,
            libc::RLIMIT_NOFILE,
            &limit,
            std::ptr::null_mut(),
        )
    };
    assert_eq!(r, 0, "prlimit: {}", std::io::Error::last_os_error());
    let mut clients: Vec<UnixStream> = (0..40).map(|_| connect_when_up(&uds)).collect();
    std::thread::sleep(Duration::from_millis(300));
    let before = cpu_ticks(pid);
    std::thread::sleep(Duration::from_secs(1));
    let used = cpu_ticks(pid) - before;
    // SAFETY: sysconf has no memory effects.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
    assert!(
        used * 5 < hz,
        "runv-vmm used {used} ticks of CPU in 1 s while out of descriptors (spinning)"
    );
    // Connections beyond the descriptor limit were refused (closed without a word).
    let mut refused = 0;
    for c in &mut clients {
        c.set_nonblocking(true).unwrap();
        let mut b = [0u8; 64];
        if let Ok(0) = c.read(&mut b) {
            refused += 1;
        }
    }
    assert!(refused > 0, "no connection hit the descriptor limit");
    assert!(child.try_wait().unwrap().is_none(), "runv-vmm died");
    // Once the clients are gone the VMM serves again: a bad line gets its answer.
    drop(clients);
    let deadline = Instant::now() + TIMEOUT;
    let answer = loop {
        let mut c = connect_when_up(&uds);
        c.write_all(b"HELLO\n").unwrap();
        let r = until_closed(&mut c, Duration::from_secs(5));
        if !r.is_empty() || Instant::now() > deadline {
            break r;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(answer.starts_with("ERR expected CONNECT"), "{answer:?}");
    child.kill().unwrap();
    child.wait().unwrap();
}
