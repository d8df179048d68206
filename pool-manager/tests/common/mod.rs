//! Shared helpers of the pool-manager tests: the `runv-vmm` binary, per-test directories, and
//! the test guest's counter template.
//!
//! pool-manager must not depend on the `vmm` crate (not even for tests), so `runv-vmm` is found
//! as a built binary: `$RUNV_VMM` if set, else `target/debug/runv-vmm`, built on first use with
//! `cargo build -p vmm --bin runv-vmm` (cargo lets a test run it: the test's own build is done).
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use pool_manager::{PoolConfig, ReadyCheck, TemplateSpec};

/// The workspace's target directory.
pub fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(d) => PathBuf::from(d),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target"),
    }
}

/// The `runv-vmm` binary (see the module docs).
pub fn vmm_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(p) = std::env::var_os("RUNV_VMM") {
            return PathBuf::from(p);
        }
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let status = std::process::Command::new(cargo)
            .args(["build", "-q", "-p", "vmm", "--bin", "runv-vmm"])
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .status()
            .expect("running cargo build -p vmm --bin runv-vmm");
        assert!(status.success(), "cargo build -p vmm --bin runv-vmm failed");
        let p = target_dir().join("debug/runv-vmm");
        assert!(p.exists(), "{} missing after the build", p.display());
        p
    })
    .clone()
}

/// Whether KVM is usable; prints a loud skip line when not.
pub fn kvm_available(test: &str) -> bool {
    let ok = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    if !ok {
        eprintln!("SKIPPED: {test}: /dev/kvm is not usable");
    }
    ok
}

/// A test's own state, run and tmpfs directories, removed on drop.
pub struct Dirs {
    /// Temp dir holding state/ and run/.
    pub tmp: tempfile::TempDir,
    /// tmpfs dir (`/dev/shm/runv-test-<pid>-<n>`).
    pub shm: PathBuf,
}

impl Dirs {
    /// Fresh directories.
    pub fn new() -> Self {
        static N: AtomicU32 = AtomicU32::new(0);
        let shm = PathBuf::from(format!(
            "/dev/shm/runv-test-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&shm);
        Self {
            tmp: tempfile::tempdir().unwrap(),
            shm,
        }
    }

    /// State dir.
    pub fn state(&self) -> PathBuf {
        self.tmp.path().join("state")
    }

    /// Run dir.
    pub fn run(&self) -> PathBuf {
        self.tmp.path().join("run")
    }

    /// A pool configuration over these directories.
    pub fn config(&self) -> PoolConfig {
        PoolConfig {
            vmm: vmm_bin(),
            state_dir: self.state(),
            run_dir: self.run(),
            tmpfs_dir: self.shm.clone(),
            refill_workers: 2,
            // The daemon's default: every VMM jailed.
            jail: Some(pool_manager::ShellJail::pool_default()),
        }
    }

    /// Files left in the run dir.
    pub fn run_files(&self) -> Vec<PathBuf> {
        std::fs::read_dir(self.run())
            .map(|d| d.flatten().map(|e| e.path()).collect())
            .unwrap_or_default()
    }
}

impl Drop for Dirs {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.shm);
    }
}

/// The counter test guest, 64 MiB, as a template spec.
pub fn counter_spec() -> TemplateSpec {
    TemplateSpec {
        kernel: test_guests::guest_path(),
        initrd: None,
        cmdline: "rt.counter rt.idle".into(),
        mem_mib: 64,
        vcpus: 1,
        ready: ReadyCheck::Report,
        slots: 0,
        net: false,
        mem_mode: Default::default(),
        warmup_ms: 0,
    }
}

/// Whether KVM and sandbox networking (root, `ip`, `nft`, forwarding) are here; prints a
/// loud `SKIPPED:` line for `test` when networking is not.
pub fn net_available(test: &str) -> bool {
    if !kvm_available(test) {
        return false;
    }
    match pool_manager::network::unavailable(true) {
        Some(why) => {
            eprintln!("SKIPPED: {test}: {why}");
            false
        }
        None => true,
    }
}

/// The counter guest with a network device, 16 MiB; the template's own address (clones must
/// answer for their lease instead).
pub fn net_counter_spec() -> TemplateSpec {
    TemplateSpec {
        cmdline: "rt.net=10.99.0.2".into(),
        mem_mib: 16,
        net: true,
        ..counter_spec()
    }
}

/// Waits (bounded by `timeout`) for `f` to hold.
pub fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Waits for the `PASS resumed` report in a clone's debug log and returns it.
pub fn resumed_report(log: &Path) -> String {
    let mut line = String::new();
    wait_until(
        &format!("a resumed report in {}", log.display()),
        Duration::from_secs(10),
        || {
            let text = std::fs::read_to_string(log).unwrap_or_default();
            match text.lines().find(|l| l.starts_with("REPORT PASS resumed")) {
                Some(l) => {
                    line = l.to_string();
                    true
                }
                None => false,
            }
        },
    );
    line
}

/// The value of `key=` in a report line.
pub fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.split_whitespace()
        .find_map(|t| t.strip_prefix(key).and_then(|v| v.strip_prefix('=')))
}

/// Live processes whose command line mentions `needle`.
pub fn processes_mentioning(needle: &str) -> Vec<u32> {
    let all: Vec<u32> = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|c| String::from_utf8_lossy(&c).contains(needle))
                .unwrap_or(false)
        })
        .collect();
    // A jailed VMM is two processes with one command line: the jail's keeper (the pool's
    // child, whose pid the pool reports) and its child, the VMM proper. Count the keeper.
    all.iter()
        .copied()
        .filter(|p| !ppid(*p).is_some_and(|pp| all.contains(&pp)))
        .collect()
}

/// The parent pid of `pid` (from `/proc/<pid>/stat`).
pub fn ppid(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(')')?
        .1
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// A raw HTTP/1.1 exchange over a Unix socket: (status, body).
pub fn http(sock: &Path, method: &str, path: &str, body: &[u8]) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s = std::os::unix::net::UnixStream::connect(sock).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .unwrap();
    // A server may refuse before reading a large body; a failed write is fine then.
    let _ = s.write_all(body);
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw);
    let text = String::from_utf8_lossy(&raw).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no HTTP reply: {text:?}"));
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// Whether a process exists and is not a zombie.
pub fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .map(|(_, r)| r.trim_start().chars().next())
        })
        .flatten()
        .is_some_and(|c| c != 'Z' && c != 'X')
}

/// Live (non-zombie) processes whose command line mentions `needle`.
pub fn live_processes_mentioning(needle: &str) -> Vec<u32> {
    processes_mentioning(needle)
        .into_iter()
        .filter(|p| alive(*p))
        .collect()
}

/// What the VMM of jail keeper `keeper` (its only child, the VMM proper) runs as: its real,
/// effective, saved and fs uids, its effective capabilities (from `/proc/<pid>/status`), and
/// whether it shares this process's network namespace.
#[derive(Debug, PartialEq, Eq)]
pub struct JailedVmm {
    /// Uid line of its status.
    pub uids: Vec<u32>,
    /// CapEff, hex.
    pub cap_eff: String,
    /// Whether its network namespace is this process's.
    pub host_netns: bool,
}

/// [`JailedVmm`] of jail keeper `keeper`; panics when it has no child.
pub fn jailed_vmm(keeper: u32) -> JailedVmm {
    let pid = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .find(|p| ppid(*p) == Some(keeper))
        .unwrap_or_else(|| panic!("jail keeper {keeper} has no VMM child"));
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |key: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .unwrap_or_else(|| panic!("no {key} in /proc/{pid}/status"))
            .trim()
            .to_string()
    };
    let ns = |p: &str| std::fs::read_link(format!("/proc/{p}/ns/net")).unwrap();
    JailedVmm {
        uids: field("Uid:")
            .split_whitespace()
            .map(|u| u.parse().unwrap())
            .collect(),
        cap_eff: field("CapEff:"),
        host_netns: ns(&pid.to_string()) == ns("self"),
    }
}

/// Asserts that jail keeper `keeper` runs its VMM as the pool's jail uid, without
/// capabilities, in a network namespace of its own.
pub fn assert_jailed(keeper: u32) {
    let vmm = jailed_vmm(keeper);
    let id = pool_manager::vmm_api::jail::DEFAULT_JAIL_ID;
    assert_eq!(
        vmm,
        JailedVmm {
            uids: vec![id; 4],
            cap_eff: "0000000000000000".into(),
            host_netns: false,
        }
    );
}
