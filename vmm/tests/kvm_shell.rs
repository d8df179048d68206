//! VM shells as processes: `runv-vmm --shell` waits with a KVM VM ready, becomes a clone on a
//! control `restore`, and cleans up on every path; the pool keeps shells ready.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;
use pool_manager::{ShellPool, ShellProcess, ShellSpec};
use vmm_api::{MemoryMode, RestoreOptions, SerialOutput, VmState};

/// Restore options for a clone named `id` that reports on stdout.
fn clone_opts(snap: &Path, mode: MemoryMode, id: &str) -> RestoreOptions {
    let mut o = RestoreOptions::new(snap, mode);
    o.clone_id = id.into();
    o.serial = SerialOutput::None;
    o.debug_log = Some("-".into());
    o
}

fn spec(dir: &Path, mem_mib: u64) -> ShellSpec {
    ShellSpec {
        vmm: PathBuf::from(env!("CARGO_BIN_EXE_runv-vmm")),
        mem_mib,
        vcpus: 1,
        run_dir: dir.to_path_buf(),
        jail: None,
    }
}

/// Boots the counter guest (64 MiB) in-process and snapshots it into `dir/snap`.
fn template(dir: &Path) -> PathBuf {
    let mut cfg = guest_config("rt.counter rt.idle", dir);
    cfg.mem_mib = 64;
    cfg.control = Some(dir.join("template.sock"));
    let snap = dir.join("snap");
    snapshot_counter_guest(cfg, &snap, Duration::ZERO);
    snap
}

#[test]
fn kvm_shell_becomes_a_clone_on_restore() {
    if !kvm_available("kvm_shell_becomes_a_clone_on_restore") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let snap = template(dir.path());
    let mut shell = ShellProcess::spawn(&spec(dir.path(), 64), "a").unwrap();
    let status = shell.status().unwrap();
    assert_eq!(status.state, VmState::Shell, "{status:?}");
    assert_eq!(status.mem_mib, 64, "{status:?}");
    let e = shell.client().pause().unwrap_err().to_string();
    assert!(e.contains("no VM yet"), "{e}");
    let reply = shell
        .restore(&clone_opts(&snap, MemoryMode::Cow, "shell-clone"))
        .unwrap();
    assert_eq!(reply.state, VmState::Running, "{reply:?}");
    assert!(reply.restore_ms > 0.0, "{reply:?}");
    let line = next_resumed_line(&mut shell);
    assert!(
        line.starts_with("PASS resumed") && line.contains("clone=shell-clone"),
        "{line}"
    );
    // The same connection now drives the clone.
    let status = shell.status().unwrap();
    assert_eq!(
        (status.state, status.generation),
        (VmState::Running, Some(1)),
        "{status:?}"
    );
    let e = shell
        .restore(&RestoreOptions::new(&snap, MemoryMode::Cow))
        .unwrap_err()
        .to_string();
    assert!(e.contains("already runs a VM"), "{e}");
    let sock = dir.path().join("a.sock");
    assert!(sock.exists());
    assert!(shell.shutdown().unwrap().success());
    assert!(!sock.exists(), "the control socket file is removed");
}

#[test]
fn kvm_shell_refuses_a_mismatched_snapshot_and_exits() {
    if !kvm_available("kvm_shell_refuses_a_mismatched_snapshot_and_exits") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let snap = template(dir.path());
    let mut shell = ShellProcess::spawn(&spec(dir.path(), 32), "small").unwrap();
    let mut opts = RestoreOptions::new(&snap, MemoryMode::Cow);
    opts.serial = SerialOutput::None;
    let e = shell.restore(&opts).unwrap_err().to_string();
    assert!(e.contains("shell has 32 MiB"), "{e}");
    assert!(
        !shell.shutdown().unwrap().success(),
        "a failed restore ends the shell with an error"
    );
    assert!(!dir.path().join("small.sock").exists());

    // A missing snapshot is a clear error too.
    let mut shell = ShellProcess::spawn(&spec(dir.path(), 64), "missing").unwrap();
    let e = shell
        .restore(&RestoreOptions::new(
            dir.path().join("nope"),
            MemoryMode::Uffd,
        ))
        .unwrap_err()
        .to_string();
    assert!(e.contains("nope"), "{e}");
}

#[test]
fn kvm_shell_idle_sigterm_and_pool_cleanup() {
    if !kvm_available("kvm_shell_idle_sigterm_and_pool_cleanup") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let shell = ShellProcess::spawn(&spec(dir.path(), 64), "idle").unwrap();
    let pid = shell.pid() as i32;
    // SAFETY: kill(2) on a child of this test.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    assert!(shell.shutdown().unwrap().success());
    assert!(!dir.path().join("idle.sock").exists());

    let snap = template(dir.path());
    let pool = ShellPool::new(spec(dir.path(), 64), 3, 2);
    let mut clones = Vec::new();
    for i in 0..5 {
        let mut s = pool.take(TIMEOUT).unwrap();
        s.restore(&clone_opts(&snap, MemoryMode::Cow, &format!("p{i}")))
            .unwrap();
        let line = s.next_stdout_line().unwrap();
        assert!(line.contains(&format!("clone=p{i}")), "{line}");
        clones.push(s);
    }
    assert_eq!(pool.failures(), 0);
    drop(pool);
    drop(clones);
    std::thread::sleep(Duration::from_millis(50));
    let left: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.path().extension().is_some_and(|x| x == "sock"))
        .collect();
    assert!(left.is_empty(), "sockets left behind: {left:?}");
}
