//! The `runv-vmm` binary: clean exits (guest reset, control `shutdown`, SIGTERM), the control
//! socket protocol, and refusal of a socket path in use.

mod common;

use common::*;
use vmm_api::{Request, VmState};

#[test]
fn kvm_exit_on_guest_reset() {
    if !kvm_available("kvm_exit_on_guest_reset") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut c = spawn(&["--cmdline", "rt.exit=reset"], dir.path());
    assert!(wait_exit(&mut c).success());
    wait_for_report(dir.path(), "READY");
}

#[test]
fn kvm_control_socket_status_pause_resume_shutdown() {
    if !kvm_available("kvm_control_socket_status_pause_resume_shutdown") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (mut c, sock) = spawn_halted_with_control(dir.path());
    let mut ctl = control(&sock);
    let st = ctl.status().unwrap();
    assert_eq!(st.state, VmState::Running);
    assert_eq!(st.version, vmm_api::PROTOCOL_VERSION);
    assert_eq!(st.mem_mib, 32);
    // An unknown command (a valid request with its name replaced) and garbage.
    let unknown = String::from_utf8(vmm_api::encode_request(&Request::Status {}).unwrap())
        .unwrap()
        .replace("status", "explode");
    let bad = ctl.call_raw(unknown.as_bytes()).unwrap();
    assert_eq!(bad["ok"], false);
    assert!(bad["error"].as_str().unwrap().contains("bad request"));
    assert_eq!(bad["kind"], "bad_request");
    let bad = ctl.call_raw(b"not json\n").unwrap();
    assert_eq!(bad["ok"], false);
    assert_eq!(ctl.pause().unwrap().state, VmState::Paused);
    assert_eq!(ctl.status().unwrap().state, VmState::Paused);
    assert_eq!(ctl.resume().unwrap().state, VmState::Running);
    // A second path user is refused while this VMM lives.
    let dir2 = tempfile::tempdir().unwrap();
    let mut c2 = spawn(&["--control", sock.to_str().unwrap()], dir2.path());
    let status = wait_exit(&mut c2);
    assert!(!status.success());
    let mut err = String::new();
    std::io::Read::read_to_string(&mut c2.stderr.take().unwrap(), &mut err).unwrap();
    assert!(err.contains("in use"), "{err}");
    assert_eq!(ctl.shutdown().unwrap().state, VmState::Stopping);
    assert!(wait_exit(&mut c).success());
    assert!(!sock.exists(), "control socket file left behind");
}

#[test]
fn kvm_sigterm_exits_cleanly() {
    if !kvm_available("kvm_sigterm_exits_cleanly") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("c.sock");
    let mut c = spawn(
        &[
            "--cmdline",
            "rt.exit=halt",
            "--control",
            sock.to_str().unwrap(),
            "--vcpus",
            "2",
        ],
        dir.path(),
    );
    wait_for_report(dir.path(), "READY");
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
    assert!(wait_exit(&mut c).success());
    assert!(!sock.exists());
}
