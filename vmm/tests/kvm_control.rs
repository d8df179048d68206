//! The control plane under hostile clients and odd input, through real `runv-vmm` processes:
//! clients that never read, floods, over-long lines, concurrent restores, paths with quotes and
//! newlines, unknown fields, bad flags, and guests that crash.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;
use pool_manager::{ShellProcess, ShellSpec};
use vmm_api::{
    encode_request, ClientError, ErrorKind, MemoryMode, Request, RestoreOptions, SerialOutput,
    VmState, MAX_LINE,
};

fn shell_spec(dir: &Path, mem_mib: u64) -> ShellSpec {
    ShellSpec {
        vmm: PathBuf::from(env!("CARGO_BIN_EXE_runv-vmm")),
        mem_mib,
        vcpus: 1,
        run_dir: dir.to_path_buf(),
        jail: None,
    }
}

/// Boots the counter guest (64 MiB) in-process and snapshots it into `snap`.
fn template(dir: &Path, snap: &Path) {
    let mut cfg = guest_config("rt.counter rt.idle", dir);
    cfg.mem_mib = 64;
    cfg.control = Some(dir.join("template.sock"));
    snapshot_counter_guest(cfg, snap, Duration::ZERO);
}

fn clone_opts(snap: &Path, id: &str) -> RestoreOptions {
    let mut o = RestoreOptions::new(snap, MemoryMode::Cow);
    o.clone_id = id.into();
    o.serial = SerialOutput::None;
    o.debug_log = Some("-".into());
    o
}

/// Resident set of a process in KiB.
fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap()
}

/// Writes `total` bytes of pipelined status requests to `path` without ever reading a reply;
/// returns how many bytes the VMM took before it dropped the connection.
fn flood_without_reading(path: &Path, total: usize) -> usize {
    let mut s = UnixStream::connect(path).unwrap();
    s.set_write_timeout(Some(Duration::from_secs(5))).unwrap();
    let line = encode_request(&Request::Status {}).unwrap();
    let chunk: Vec<u8> = line
        .iter()
        .copied()
        .cycle()
        .take(line.len() * 4096)
        .collect();
    let mut sent = 0;
    while sent < total {
        match s.write(&chunk) {
            Ok(n) => sent += n,
            Err(_) => break,
        }
    }
    sent
}

#[test]
fn kvm_control_a_client_that_never_reads_cannot_freeze_the_vmm() {
    if !kvm_available("kvm_control_a_client_that_never_reads_cannot_freeze_the_vmm") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (mut vmm, sock) = spawn_halted_with_control(dir.path());
    let flood_sock = sock.clone();
    let flooder = std::thread::spawn(move || flood_without_reading(&flood_sock, 64 << 20));
    // While the flood runs, another client is served promptly.
    let mut c = control(&sock);
    c.set_timeout(Duration::from_secs(2)).unwrap();
    for _ in 0..20 {
        assert_eq!(c.status().unwrap().state, VmState::Running);
        std::thread::sleep(Duration::from_millis(10));
    }
    let sent = flooder.join().unwrap();
    assert!(
        sent < 64 << 20,
        "the VMM kept reading from a client that never reads its replies ({sent} bytes)"
    );
    assert_eq!(c.status().unwrap().state, VmState::Running);
    // SIGTERM still ends it promptly.
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(vmm.id() as i32, libc::SIGTERM) };
    assert!(wait_exit(&mut vmm).success());
}

#[test]
fn kvm_control_a_flooded_shell_keeps_its_memory_bounded() {
    if !kvm_available("kvm_control_a_flooded_shell_keeps_its_memory_bounded") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut shell = ShellProcess::spawn(&shell_spec(dir.path(), 64), "flood").unwrap();
    let before = rss_kib(shell.pid());
    let sent = flood_without_reading(shell.socket(), 256 << 20);
    let after = rss_kib(shell.pid());
    assert!(
        after < before + 16 * 1024,
        "RSS grew from {before} KiB to {after} KiB after {sent} bytes of unread requests"
    );
    assert_eq!(shell.status().unwrap().state, VmState::Shell);
    assert!(shell.shutdown().unwrap().success());
}

#[test]
fn kvm_control_an_over_long_line_is_refused_and_not_executed() {
    if !kvm_available("kvm_control_an_over_long_line_is_refused_and_not_executed") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (mut vmm, sock) = spawn_halted_with_control(dir.path());
    // A valid pause request padded past the limit, newline-terminated.
    let mut line = encode_request(&Request::Pause {}).unwrap();
    line.pop();
    line.resize(MAX_LINE + 10, b' ');
    line.push(b'\n');
    let mut raw = control(&sock);
    let reply = raw.call_raw(&line).unwrap();
    assert_eq!(
        (reply["ok"].as_bool(), reply["kind"].as_str()),
        (Some(false), Some("too_long")),
        "{reply}"
    );
    assert!(
        raw.status().is_err(),
        "the connection is closed after an over-long line"
    );
    let mut c = control(&sock);
    assert_eq!(
        c.status().unwrap().state,
        VmState::Running,
        "the pause was executed"
    );
    // Unterminated, too: no newline within the limit.
    let mut s = UnixStream::connect(&sock).unwrap();
    s.write_all(&vec![b'x'; MAX_LINE + 100]).unwrap();
    let mut reply = String::new();
    s.read_to_string(&mut reply).unwrap();
    assert!(reply.contains("too_long"), "{reply}");
    c.shutdown().unwrap();
    assert!(wait_exit(&mut vmm).success());
}

#[test]
fn kvm_control_paths_with_quotes_and_newlines_round_trip() {
    if !kvm_available("kvm_control_paths_with_quotes_and_newlines_round_trip") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let snap = dir.path().join("snap \"quoted\"\nand a newline");
    std::fs::create_dir_all(&snap).unwrap();
    template(dir.path(), &snap);
    assert!(snap.join("state.bin").exists());
    let mut shell = ShellProcess::spawn(&shell_spec(dir.path(), 64), "odd").unwrap();
    shell.restore(&clone_opts(&snap, "odd-path")).unwrap();
    let line = shell.next_stdout_line().unwrap();
    assert!(line.contains("clone=odd-path"), "{line}");
    assert!(shell.shutdown().unwrap().success());
}

#[test]
fn kvm_control_unknown_fields_and_a_second_restore_get_errors() {
    if !kvm_available("kvm_control_unknown_fields_and_a_second_restore_get_errors") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let snap = dir.path().join("snap");
    std::fs::create_dir_all(&snap).unwrap();
    template(dir.path(), &snap);
    let mut shell = ShellProcess::spawn(&shell_spec(dir.path(), 64), "two").unwrap();
    // A restore with a misspelt field is refused; the shell survives it.
    let mut v = serde_json::to_value(Request::Restore(RestoreOptions::new(
        &snap,
        MemoryMode::Copy,
    )))
    .unwrap();
    let obj = v.as_object_mut().unwrap();
    let mode = obj.remove("mem_mode").unwrap();
    obj.insert("memmode".into(), mode);
    let mut line = serde_json::to_vec(&v).unwrap();
    line.push(b'\n');
    let reply = shell.client().call_raw(&line).unwrap();
    assert_eq!(reply["kind"], "bad_request", "{reply}");
    assert!(
        reply["error"].as_str().unwrap().contains("memmode"),
        "{reply}"
    );
    // Out-of-range options are refused before the shell is consumed.
    let mut long_id = clone_opts(&snap, &"x".repeat(64));
    let e = shell.restore(&long_id).unwrap_err().to_string();
    assert!(e.contains("63 bytes"), "{e}");
    long_id.clone_id = "ok".into();
    long_id.record_ms = 1;
    let e = shell.restore(&long_id).unwrap_err().to_string();
    assert!(e.contains("record_ms"), "{e}");
    assert_eq!(shell.status().unwrap().state, VmState::Shell);

    // Two clients race to restore: one gets the clone, the other a clear error.
    let mut other = control(shell.socket());
    let racer = {
        let snap = snap.clone();
        std::thread::spawn(move || other.restore(&clone_opts(&snap, "b")))
    };
    let mine = shell.restore(&clone_opts(&snap, "a"));
    let theirs = racer.join().unwrap();
    let errors: Vec<String> = [
        mine.err().map(|e| e.to_string()),
        theirs.err().map(|e| e.to_string()),
    ]
    .into_iter()
    .flatten()
    .collect();
    assert_eq!(errors.len(), 1, "exactly one restore wins: {errors:?}");
    assert!(errors[0].contains("already runs a VM"), "{errors:?}");
    assert_eq!(shell.status().unwrap().generation, Some(1));
    assert!(shell.shutdown().unwrap().success());
}

#[test]
fn kvm_control_refuses_a_snapshot_into_the_directory_backing_the_clone() {
    if !kvm_available("kvm_control_refuses_a_snapshot_into_the_directory_backing_the_clone") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let snap = dir.path().join("snap");
    std::fs::create_dir_all(&snap).unwrap();
    template(dir.path(), &snap);
    let before = std::fs::read(snap.join("memory.bin")).unwrap();
    let mut shell = ShellProcess::spawn(&shell_spec(dir.path(), 64), "self").unwrap();
    shell.restore(&clone_opts(&snap, "self")).unwrap();
    shell.next_stdout_line().unwrap();
    match shell.client().snapshot(&snap) {
        Err(ClientError::Refused { error, .. }) => {
            assert_eq!(error.kind, ErrorKind::Failed);
            assert!(error.error.contains("restored from"), "{error}");
        }
        other => panic!("a snapshot into the backing directory was not refused: {other:?}"),
    }
    assert!(
        std::fs::read(snap.join("memory.bin")).unwrap() == before,
        "template changed"
    );
    // The clone still runs and snapshots elsewhere.
    let elsewhere = dir.path().join("elsewhere");
    std::fs::create_dir_all(&elsewhere).unwrap();
    shell.client().snapshot(&elsewhere).unwrap();
    assert!(shell.shutdown().unwrap().success());
}

#[test]
fn kvm_control_bad_flags_are_refused_with_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("c.sock");
    let sock = sock.to_str().unwrap();
    let run = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_runv-vmm"))
            .args(args)
            .env("RUST_BACKTRACE", "0")
            .output()
            .unwrap();
        assert!(!out.status.success(), "{args:?} was accepted");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let guest = test_guests::guest_path();
    let guest = guest.to_str().unwrap();
    let e = run(&["--kernel", guest, "--mem-mode", "cow"]);
    assert!(e.contains("--restore"), "{e}");
    let e = run(&["--kernel", guest, "--clone-id", "x"]);
    assert!(e.contains("--restore"), "{e}");
    let e = run(&["--shell", "--vcpus", "300", "--control", sock]);
    assert!(e.contains("300 vCPUs requested: use 1..=8"), "{e}");
    let e = run(&["--shell"]);
    assert!(e.contains("--control"), "{e}");
    let e = run(&["--shell", "--control-fd", "1"]);
    assert!(e.contains("above 2"), "{e}");
    let e = run(&["--shell", "--control-fd", "99"]);
    assert!(e.contains("not an open file descriptor"), "{e}");
    let e = run(&[
        "--restore",
        dir.path().to_str().unwrap(),
        "--clone-id",
        &"y".repeat(64),
    ]);
    assert!(e.contains("63 bytes"), "{e}");
    // Nothing that is not a socket is ever replaced by a control socket.
    let file = dir.path().join("precious");
    std::fs::write(&file, b"keep me").unwrap();
    let e = run(&["--kernel", guest, "--control", file.to_str().unwrap()]);
    assert!(e.contains("not a socket"), "{e}");
    assert_eq!(std::fs::read(&file).unwrap(), b"keep me");
}

#[test]
fn kvm_a_crashed_guest_is_not_a_clean_exit() {
    if !kvm_available("kvm_a_crashed_guest_is_not_a_clean_exit") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut c = spawn(&["--cmdline", "rt.exit=crash"], dir.path());
    let status = wait_exit(&mut c);
    let mut err = String::new();
    c.stderr.take().unwrap().read_to_string(&mut err).unwrap();
    assert!(!status.success(), "a triple fault exited cleanly: {err}");
    assert!(err.contains("guest crashed"), "{err}");
}

#[test]
fn kvm_control_warm_clones_get_their_identity_at_activate() {
    if !kvm_available("kvm_control_warm_clones_get_their_identity_at_activate") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let snap = dir.path().join("snap");
    std::fs::create_dir_all(&snap).unwrap();
    template(dir.path(), &snap);
    let mut entropy = Vec::new();
    for i in 0..2 {
        let mut shell =
            ShellProcess::spawn(&shell_spec(dir.path(), 64), &format!("warm{i}")).unwrap();
        let mut opts = clone_opts(&snap, "placeholder");
        opts.paused = true;
        assert_eq!(shell.restore(&opts).unwrap().state, VmState::Paused);
        assert_eq!(shell.status().unwrap().state, VmState::Paused);
        let id = format!("acquired-{i}");
        let reply = shell.client().activate(&id).unwrap();
        assert_eq!((reply.state, reply.generation), (VmState::Running, 1));
        let line = next_resumed_line(&mut shell);
        assert!(line.starts_with("PASS resumed"), "{line}");
        assert_eq!(field(line.trim(), "clone"), Some(id.as_str()), "{line}");
        assert_eq!(field(line.trim(), "gen"), Some("1"), "{line}");
        entropy.push(field(line.trim(), "ent").unwrap().to_string());
        // Once running, it cannot be activated again.
        match shell.client().activate("again") {
            Err(ClientError::Refused { error, .. }) => {
                assert_eq!(error.kind, ErrorKind::InvalidState)
            }
            other => panic!("a second activate was accepted: {other:?}"),
        }
        assert!(shell.shutdown().unwrap().success());
    }
    assert_ne!(entropy[0], entropy[1], "two clones got the same entropy");
    // A clone restored running cannot be activated either.
    let mut shell = ShellProcess::spawn(&shell_spec(dir.path(), 64), "running").unwrap();
    shell.restore(&clone_opts(&snap, "running")).unwrap();
    let e = shell.client().activate("late").unwrap_err().to_string();
    assert!(e.contains("paused=true"), "{e}");
    assert!(shell.shutdown().unwrap().success());
}

#[test]
fn kvm_control_a_fifo_in_a_snapshot_is_refused_promptly() {
    if !kvm_available("kvm_control_a_fifo_in_a_snapshot_is_refused_promptly") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let snap = dir.path().join("snap");
    std::fs::create_dir_all(&snap).unwrap();
    template(dir.path(), &snap);
    for name in ["memory.bin", "state.bin"] {
        let bad = dir.path().join(format!("bad-{name}"));
        std::fs::create_dir_all(&bad).unwrap();
        for f in ["memory.bin", "state.bin"] {
            std::fs::copy(snap.join(f), bad.join(f)).unwrap();
        }
        std::fs::remove_file(bad.join(name)).unwrap();
        let c = std::ffi::CString::new(bad.join(name).as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: a valid NUL-terminated path; mkfifo only creates a file.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let mut shell = ShellProcess::spawn(&shell_spec(dir.path(), 64), "fifo").unwrap();
        shell.client().set_timeout(Duration::from_secs(5)).unwrap();
        let e = shell
            .restore(&clone_opts(&bad, "fifo"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("regular file") || e.contains("not a regular"),
            "{name}: {e}"
        );
        assert!(!shell.shutdown().unwrap().success());
    }
}
