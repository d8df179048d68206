//! seccomp: each kind of runv-vmm thread (the VMM thread, in a booted VM and in a shell; a vCPU;
//! the userfaultfd page server) is killed with SIGSYS when it makes a syscall outside its
//! allow-list, before any guest code runs; `--seccomp log` lets the same call through.
//!
//! The forbidden call is made on purpose by debug builds when `RUNV_VMM_TEST_SECCOMP_VIOLATION`
//! names the thread kind: an `execve`, which is what an escaped guest would try first.

mod common;

use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

const ENV: &str = vmm::seccomp::TEST_VIOLATION_ENV;

fn stderr_of(child: &mut std::process::Child) -> String {
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    err
}

/// Boots the test guest with `thread` told to violate its filter under `mode`.
fn boot(thread: &str, mode: &str, dir: &Path) -> (std::process::ExitStatus, String) {
    let mut c = Command::new(env!("CARGO_BIN_EXE_runv-vmm"))
        .arg("--kernel")
        .arg(test_guests::guest_path())
        .args([
            "--serial",
            "none",
            "--mem-mib",
            "32",
            "--cmdline",
            "rt.exit=reset",
        ])
        .arg("--debug-log")
        .arg(dir.join("debug.log"))
        .args(["--seccomp", mode])
        .env(ENV, thread)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let status = wait_exit(&mut c);
    (status, stderr_of(&mut c))
}

fn reports(dir: &Path) -> String {
    std::fs::read_to_string(dir.join("debug.log")).unwrap_or_default()
}

fn assert_killed(status: std::process::ExitStatus, err: &str) {
    assert_eq!(
        status.signal(),
        Some(libc::SIGSYS),
        "{status:?}; stderr: {err}"
    );
    assert!(err.contains("attempting a forbidden execve"), "{err}");
    assert!(!err.contains("the forbidden execve returned"), "{err}");
}

#[test]
fn kvm_seccomp_kills_the_vmm_thread() {
    if !kvm_available("kvm_seccomp_kills_the_vmm_thread") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (status, err) = boot("vmm", "kill", dir.path());
    assert_killed(status, &err);
}

#[test]
fn kvm_seccomp_kills_a_vcpu_thread_before_guest_code_runs() {
    if !kvm_available("kvm_seccomp_kills_a_vcpu_thread_before_guest_code_runs") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (status, err) = boot("vcpu", "kill", dir.path());
    assert_killed(status, &err);
    assert!(
        !reports(dir.path()).contains("READY"),
        "the guest ran before the vCPU was confined"
    );
}

#[test]
fn kvm_seccomp_log_mode_lets_the_call_through() {
    if !kvm_available("kvm_seccomp_log_mode_lets_the_call_through") {
        return;
    }
    for thread in ["vmm", "vcpu"] {
        let dir = tempfile::tempdir().unwrap();
        let (status, err) = boot(thread, "log", dir.path());
        assert!(status.success(), "{thread}: {status:?}; stderr: {err}");
        assert!(
            err.contains("the forbidden execve returned"),
            "{thread}: {err}"
        );
        assert!(reports(dir.path()).contains("REPORT READY"), "{thread}");
    }
}

#[test]
fn kvm_seccomp_kills_a_shell_before_it_reads_a_request() {
    if !kvm_available("kvm_seccomp_kills_a_shell_before_it_reads_a_request") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("shell.sock");
    let mut c = Command::new(env!("CARGO_BIN_EXE_runv-vmm"))
        .args(["--shell", "--mem-mib", "32", "--control"])
        .arg(&sock)
        .env(ENV, "vmm")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let status = wait_exit(&mut c);
    assert_killed(status, &stderr_of(&mut c));
}

#[test]
fn kvm_seccomp_kills_the_uffd_page_server() {
    if !kvm_available("kvm_seccomp_kills_the_uffd_page_server") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = guest_config("rt.counter rt.idle", dir.path());
    cfg.control = Some(dir.path().join("template.sock"));
    let snap = dir.path().join("snap");
    snapshot_counter_guest(cfg, &snap, Duration::ZERO);
    let restore = |mode: &str, thread: &str| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_runv-vmm"))
            .arg("--restore")
            .arg(&snap)
            .args(["--mem-mode", "uffd", "--serial", "none", "--debug-log", "-"])
            .args(["--seccomp", mode])
            .env(ENV, thread)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut out = std::io::BufReader::new(c.stdout.take().unwrap());
        let mut line = String::new();
        std::io::BufRead::read_line(&mut out, &mut line).unwrap();
        (c, line)
    };
    let (mut c, line) = restore("kill", "uffd");
    let status = wait_exit(&mut c);
    assert_killed(status, &stderr_of(&mut c));
    assert!(line.is_empty(), "the clone ran: {line}");
    // Log mode: the page server survives its violation and the clone runs.
    let (mut c, line) = restore("log", "uffd");
    assert!(line.starts_with("REPORT PASS woke"), "{line}");
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
    assert!(wait_exit(&mut c).success());
    assert!(stderr_of(&mut c).contains("the forbidden execve returned"));
}
