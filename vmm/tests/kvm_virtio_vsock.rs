//! virtio-vsock driven by the test guest's driver through real virtio-mmio, both directions.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use vmm::config::VsockConfig;

fn connect(uds: &Path, port: u32) -> UnixStream {
    let deadline = Instant::now() + TIMEOUT;
    let mut s = loop {
        match UnixStream::connect(uds) {
            Ok(s) => break s,
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(5)),
            Err(e) => panic!("{}: {e}", uds.display()),
        }
    };
    s.set_read_timeout(Some(TIMEOUT)).unwrap();
    writeln!(s, "CONNECT {port}").unwrap();
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    while b[0] != b'\n' {
        s.read_exact(&mut b).unwrap();
        line.push(b[0]);
    }
    assert!(
        line.starts_with(b"OK "),
        "{}",
        String::from_utf8_lossy(&line)
    );
    s
}

#[test]
fn kvm_vsock_host_initiated_echo() {
    if !kvm_available("kvm_vsock_host_initiated_echo") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let uds = dir.path().join("v.sock");
    let mut cfg = guest_config("rt.vsock_listen=5000 rt.exit=reset", dir.path());
    cfg.vsock = Some(VsockConfig {
        cid: 3,
        uds: uds.clone(),
    });
    let vm = vmm::Vmm::build(cfg).unwrap();
    let reports = vm.reports().unwrap();
    let t = std::thread::spawn(move || vm.run(None));
    let mut s = connect(&uds, 5000);
    let mut total = 0;
    for n in [1usize, 64, 3000, 20_000] {
        let data: Vec<u8> = (0..n).map(|i| (i * 31 + n) as u8).collect();
        s.write_all(&data).unwrap();
        let mut back = vec![0u8; n];
        s.read_exact(&mut back).unwrap();
        assert_eq!(back, data, "{n} bytes");
        total += n;
    }
    s.shutdown(std::net::Shutdown::Write).unwrap();
    assert_eq!(t.join().unwrap().unwrap(), vmm::ExitReason::GuestReset);
    let reports: Vec<String> = reports.try_iter().collect();
    assert!(
        reports.contains(&format!("PASS vsock_listen bytes={total}")),
        "{reports:?}"
    );
    assert!(!uds.exists(), "vsock socket file left behind");
}

#[test]
fn kvm_vsock_guest_initiated_echo() {
    if !kvm_available("kvm_vsock_guest_initiated_echo") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let uds = dir.path().join("v.sock");
    let listener = UnixListener::bind(format!("{}_6000", uds.display())).unwrap();
    let echo = std::thread::spawn(move || {
        let (mut c, _) = listener.accept().unwrap();
        let mut n = 0;
        let mut buf = [0u8; 4096];
        loop {
            match c.read(&mut buf).unwrap() {
                0 => return n,
                k => {
                    c.write_all(&buf[..k]).unwrap();
                    n += k;
                }
            }
        }
    });
    let mut cfg = guest_config("rt.vsock_connect=6000 rt.exit=reset", dir.path());
    cfg.vsock = Some(VsockConfig { cid: 3, uds });
    let (reports, reason) = run_vm(cfg);
    assert_eq!(reason, vmm::ExitReason::GuestReset, "{reports:?}");
    assert!(
        reports.iter().any(|r| r == "PASS vsock_connect bytes=4096"),
        "{reports:?}"
    );
    assert_eq!(echo.join().unwrap(), 4096);
}

#[test]
fn kvm_vsock_bad_config_is_refused() {
    if !kvm_available("kvm_vsock_bad_config_is_refused") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let uds = dir.path().join("v.sock");
    let _live = UnixListener::bind(&uds).unwrap();
    let mut cfg = guest_config("", dir.path());
    cfg.vsock = Some(VsockConfig { cid: 3, uds });
    let err = vmm::Vmm::build(cfg).err().unwrap().to_string();
    assert!(err.contains("in use"), "{err}");
    let mut cfg = guest_config("", dir.path());
    cfg.vsock = Some(VsockConfig {
        cid: 1,
        uds: dir.path().join("w.sock"),
    });
    let err = vmm::Vmm::build(cfg).err().unwrap().to_string();
    assert!(err.contains("CID 1"), "{err}");
}
