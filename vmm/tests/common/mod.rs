//! Helpers shared by the KVM integration tests.
#![allow(dead_code)]

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use vmm::config::{SerialOutput, VmConfig};

/// Generous: every guest instruction is emulated (~1 µs) on our development hosts.
pub const TIMEOUT: Duration = Duration::from_secs(20);

/// Returns false (after a loud SKIPPED line) when /dev/kvm is missing.
pub fn kvm_available(test: &str) -> bool {
    if Path::new("/dev/kvm").exists() {
        return true;
    }
    println!("SKIPPED: {test}: /dev/kvm missing");
    false
}

/// A config booting the test guest with `cmdline` and the debug port enabled.
pub fn guest_config(cmdline: &str, dir: &Path) -> VmConfig {
    let mut cfg = VmConfig::new(test_guests::guest_path());
    cfg.cmdline = cmdline.into();
    cfg.serial = SerialOutput::None;
    cfg.debug_log = Some(dir.join("debug.log").display().to_string());
    cfg
}

/// FNV-1a 32, as the test guest computes it.
pub fn fnv1a(data: &[u8]) -> u32 {
    data.iter().fold(0x811c_9dc5u32, |h, b| {
        (h ^ u32::from(*b)).wrapping_mul(0x0100_0193)
    })
}

/// Builds and runs `cfg` on a thread; returns the reports and the exit reason.
pub fn run_vm(cfg: VmConfig) -> (Vec<String>, vmm::ExitReason) {
    let vm = vmm::Vmm::build(cfg).expect("building the VM");
    let reports = vm.reports().expect("debug port enabled");
    let exit = vm.exit_handle();
    let t = std::thread::spawn(move || vm.run(None));
    let deadline = std::time::Instant::now() + TIMEOUT;
    while !t.is_finished() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    if !t.is_finished() {
        exit.exit(vmm::ExitReason::Error("test timeout".into()));
    }
    let reason = t.join().unwrap().expect("running the VM");
    (reports.try_iter().collect(), reason)
}

/// The counter guest's full report after a resume: checks that the cheap `PASS woke` report
/// (same generation and clone) came first, and returns the `PASS resumed` report after it.
pub fn resumed_after_woke(mut next: impl FnMut() -> String) -> String {
    let woke = next();
    assert!(
        woke.starts_with("PASS woke"),
        "expected PASS woke first: {woke}"
    );
    let resumed = next();
    assert!(
        resumed.starts_with("PASS resumed"),
        "after {woke}: {resumed}"
    );
    for key in ["gen", "clone"] {
        assert_eq!(
            field(&woke, key),
            field(&resumed, key),
            "{woke} / {resumed}"
        );
    }
    resumed
}

/// [`resumed_after_woke`] over a VM's report channel.
pub fn next_resumed(reports: &crossbeam_channel::Receiver<String>) -> String {
    resumed_after_woke(|| {
        reports
            .recv_timeout(TIMEOUT)
            .expect("a report from the clone")
    })
}

/// [`resumed_after_woke`] over a shell's stdout (`--debug-log -`); returns the report text.
pub fn next_resumed_line(shell: &mut pool_manager::ShellProcess) -> String {
    resumed_after_woke(|| {
        let line = shell
            .next_stdout_line()
            .expect("a report line from the clone");
        line.trim_end()
            .strip_prefix("REPORT ")
            .unwrap_or(&line)
            .to_string()
    })
}

/// The `k=v` value of `key` in a report.
pub fn field<'a>(report: &'a str, key: &str) -> Option<&'a str> {
    report
        .split(' ')
        .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
}

/// Connects a typed control client to `path` (retrying until the socket exists).
pub fn control(path: &Path) -> vmm_api::ControlClient {
    vmm_api::ControlClient::connect(path, TIMEOUT)
        .unwrap_or_else(|e| panic!("control socket {}: {e}", path.display()))
}

/// Builds `cfg` (which must have a control socket and run `rt.counter`), waits for its
/// `counter_started` report, lets it run `settle`, snapshots it into `snap` and shuts it down.
/// Returns that report.
pub fn snapshot_counter_guest(cfg: VmConfig, snap: &Path, settle: Duration) -> String {
    let sock = cfg.control.clone().expect("a control socket");
    let vm = vmm::Vmm::build(cfg).unwrap();
    let reports = vm.reports().unwrap();
    let t = std::thread::spawn(move || vm.run(None));
    let started = reports
        .iter()
        .find(|r| r.starts_with("PASS counter_started") || r.starts_with("FAIL"))
        .unwrap();
    assert!(started.starts_with("PASS"), "{started}");
    std::thread::sleep(settle);
    std::fs::create_dir_all(snap).unwrap();
    let mut c = control(&sock);
    c.snapshot(snap)
        .unwrap_or_else(|e| panic!("snapshot {}: {e}", snap.display()));
    c.shutdown().unwrap();
    assert_eq!(t.join().unwrap().unwrap(), vmm::ExitReason::Shutdown);
    started
}

/// Spawns `runv-vmm` booting the test guest (32 MiB, debug log in `dir`) with extra `args`.
pub fn spawn(args: &[&str], dir: &Path) -> Child {
    Command::new(env!("CARGO_BIN_EXE_runv-vmm"))
        .arg("--kernel")
        .arg(test_guests::guest_path())
        .args(["--serial", "none", "--mem-mib", "32"])
        .arg("--debug-log")
        .arg(dir.join("debug.log"))
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Waits (bounded) for `child` to exit.
pub fn wait_exit(child: &mut Child) -> std::process::ExitStatus {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s;
        }
        assert!(Instant::now() < deadline, "runv-vmm did not exit");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Waits (bounded) until the debug log in `dir` holds `REPORT <report>`.
pub fn wait_for_report(dir: &Path, report: &str) {
    let deadline = Instant::now() + TIMEOUT;
    while !std::fs::read_to_string(dir.join("debug.log"))
        .unwrap_or_default()
        .lines()
        .any(|l| l == format!("REPORT {report}"))
    {
        assert!(Instant::now() < deadline, "no {report} report");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Spawns `runv-vmm` with a guest that halts after `READY` and a control socket in `dir`; returns
/// once the guest is ready.
pub fn spawn_halted_with_control(dir: &Path) -> (Child, std::path::PathBuf) {
    let sock = dir.join("control.sock");
    let child = spawn(
        &[
            "--cmdline",
            "rt.exit=halt",
            "--control",
            sock.to_str().expect("a UTF-8 temp path"),
        ],
        dir,
    );
    wait_for_report(dir, "READY");
    (child, sock)
}
