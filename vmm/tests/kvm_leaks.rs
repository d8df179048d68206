//! An in-process VM run leaves no fd and no thread behind (its own process: counts are global).

mod common;

use common::*;

fn count(dir: &str) -> usize {
    std::fs::read_dir(dir).unwrap().count()
}

#[test]
fn kvm_no_leaked_fds_or_threads() {
    if !kvm_available("kvm_no_leaked_fds_or_threads") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // Warm up once: lazily created process-wide state (stdout locks, signal handlers).
    let mut cfg = guest_config("rt.exit=reset", dir.path());
    cfg.vcpus = 2;
    run_vm(cfg.clone());
    let (fds, tasks) = (count("/proc/self/fd"), count("/proc/self/task"));
    for _ in 0..5 {
        let mut cfg = cfg.clone();
        cfg.control = Some(dir.path().join("c.sock"));
        let (reports, reason) = run_vm(cfg);
        assert_eq!(reason, vmm::ExitReason::GuestReset, "{reports:?}");
    }
    assert_eq!(count("/proc/self/fd"), fds, "fds leaked");
    assert_eq!(count("/proc/self/task"), tasks, "threads leaked");
    assert!(!dir.path().join("c.sock").exists());
}
