//! `runv-vmm --jail` as the pool runs it: a jailed shell restores a clone that runs, sees only
//! its jail (a snapshot or restore path outside it fails through the control API), runs as the
//! unprivileged uid with no capabilities and no_new_privs, in its own namespaces and cgroup,
//! with no seccomp violation; `kill -9` of either of its processes leaves nothing behind.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;
use pool_manager::{ShellJail, ShellProcess, ShellSpec};
use vmm_api::jail::{Cgroup, DEFAULT_JAIL_ID};
use vmm_api::{MemoryMode, RestoreOptions, SerialOutput, VmState};

/// Boots the counter guest (64 MiB) in-process and snapshots it into `dir/snap`, readable by
/// the jail's gid (as the pool makes its template copies).
fn template(dir: &Path) -> PathBuf {
    let mut cfg = guest_config("rt.counter rt.idle", dir);
    cfg.mem_mib = 64;
    cfg.control = Some(dir.join("template.sock"));
    let snap = dir.join("snap");
    snapshot_counter_guest(cfg, &snap, Duration::ZERO);
    pool_manager::template::grant_read(&snap, DEFAULT_JAIL_ID).unwrap();
    snap
}

fn jailed_spec(run: &Path, snap: &Path) -> ShellSpec {
    let mut jail = ShellJail::pool_default();
    jail.read_only.push(snap.to_path_buf());
    ShellSpec {
        vmm: PathBuf::from(env!("CARGO_BIN_EXE_runv-vmm")),
        mem_mib: 64,
        vcpus: 1,
        run_dir: run.to_path_buf(),
        jail: Some(jail),
    }
}

fn clone_opts(snap: &Path, id: &str) -> RestoreOptions {
    let mut o = RestoreOptions::new(snap, MemoryMode::Cow);
    o.clone_id = id.into();
    o.serial = SerialOutput::None;
    o.debug_log = Some("-".into());
    o
}

/// The jailed VMM proper: the keeper's only child.
fn jailed_pid(keeper: u32) -> u32 {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let kids: Vec<u32> = std::fs::read_dir("/proc")
            .unwrap()
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
            .filter(|p| {
                std::fs::read_to_string(format!("/proc/{p}/stat"))
                    .ok()
                    .and_then(|s| {
                        s.rsplit_once(')')?
                            .1
                            .split_whitespace()
                            .nth(1)?
                            .parse()
                            .ok()
                    })
                    == Some(keeper)
            })
            .collect();
        if kids.len() == 1 {
            return kids[0];
        }
        assert!(
            Instant::now() < deadline,
            "keeper {keeper} children: {kids:?}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn status_field(pid: u32, key: &str) -> String {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .unwrap_or_else(|| panic!("{key} missing in /proc/{pid}/status"))
        .trim()
        .to_string()
}

fn ns(pid: &str, kind: &str) -> PathBuf {
    std::fs::read_link(format!("/proc/{pid}/ns/{kind}")).unwrap()
}

/// What a jailed shell `name` in `run` leaves on the host.
fn leftovers(run: &Path, name: &str) -> Vec<String> {
    let mut left = Vec::new();
    for p in [run.join(name), run.join(format!("{name}.root"))] {
        if p.exists() {
            left.push(p.display().to_string());
        }
    }
    for d in Cgroup::of(name).dirs {
        if d.exists() {
            left.push(d.display().to_string());
        }
    }
    left
}

fn seccomp_reports(pid: u32) -> Vec<String> {
    let out = std::process::Command::new("dmesg").output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains("type=1326") && l.contains(&format!(" pid={pid} ")))
        .map(str::to_owned)
        .collect()
}

#[test]
fn kvm_jail_shell_restores_a_confined_clone() {
    if !kvm_available("kvm_jail_shell_restores_a_confined_clone") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let snap = template(dir.path());
    let run = dir.path().join("run");
    std::fs::create_dir(&run).unwrap();
    let name = format!("jail-{}", std::process::id());
    let mut shell = ShellProcess::spawn(&jailed_spec(&run, &snap), &name).unwrap();
    assert_eq!(shell.status().unwrap().state, VmState::Shell);

    // A snapshot that exists on the host but was not bound into the jail cannot be restored.
    let outside = dir.path().join("outside");
    std::fs::create_dir(&outside).unwrap();
    for f in ["state.bin", "memory.bin"] {
        std::fs::copy(snap.join(f), outside.join(f)).unwrap();
    }
    pool_manager::template::grant_read(&outside, DEFAULT_JAIL_ID).unwrap();
    let e = shell
        .restore(&clone_opts(&outside, "nope"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("No such file"), "{e}");
    // A failed restore ends a shell (as unjailed): it cleans up after itself.
    assert!(!shell.shutdown().unwrap().success());
    assert_eq!(leftovers(&run, &name), Vec::<String>::new());

    // The bound template restores, and the clone runs.
    let mut shell = ShellProcess::spawn(&jailed_spec(&run, &snap), &name).unwrap();
    let vmm = jailed_pid(shell.pid());
    let reply = shell.restore(&clone_opts(&snap, "jailed")).unwrap();
    assert_eq!(reply.state, VmState::Running, "{reply:?}");
    let line = next_resumed_line(&mut shell);
    assert!(
        line.starts_with("PASS resumed") && line.contains("clone=jailed"),
        "{line}"
    );

    // Snapshots go only where the jail can write: not to a host directory outside it...
    let host_dir = dir.path().join("snap-out");
    std::fs::create_dir(&host_dir).unwrap();
    shell.client().pause().unwrap();
    let e = shell.client().snapshot(&host_dir).unwrap_err().to_string();
    assert!(e.contains("No such file"), "{e}");
    assert_eq!(std::fs::read_dir(&host_dir).unwrap().count(), 0);
    // ...but into its own directory (bound read-write at the same path).
    let inside = shell.files_dir().join("snap");
    std::fs::create_dir(&inside).unwrap();
    std::os::unix::fs::chown(&inside, Some(DEFAULT_JAIL_ID), Some(DEFAULT_JAIL_ID)).unwrap();
    shell.client().snapshot(&inside).unwrap();
    assert!(inside.join("state.bin").exists() && inside.join("memory.bin").exists());
    shell.client().resume().unwrap();

    // Unprivileged, no capabilities, no_new_privs.
    assert_eq!(
        status_field(vmm, "Uid"),
        format!("{0}\t{0}\t{0}\t{0}", DEFAULT_JAIL_ID)
    );
    assert_eq!(
        status_field(vmm, "Gid"),
        format!("{0}\t{0}\t{0}\t{0}", DEFAULT_JAIL_ID)
    );
    for cap in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
        assert_eq!(status_field(vmm, cap), "0000000000000000", "{cap}");
    }
    assert_eq!(status_field(vmm, "NoNewPrivs"), "1");
    assert_eq!(status_field(vmm, "Seccomp"), "2", "seccomp filter mode");
    // pid 1 of its own pid namespace; its own mount, ipc, uts and network namespaces.
    let nspid = status_field(vmm, "NSpid");
    assert!(nspid.ends_with("\t1"), "{nspid}");
    for kind in ["mnt", "pid", "ipc", "uts", "net"] {
        assert_ne!(
            ns(&vmm.to_string(), kind),
            ns("self", kind),
            "{kind} namespace"
        );
    }
    // In its cgroup, with the limits.
    let cg = Cgroup::of(&name);
    assert!(cg.procs().contains(&vmm), "{:?}", cg.procs());
    if !cg.v2 {
        let limit = std::fs::read_to_string(cg.dirs[0].join("memory.limit_in_bytes")).unwrap();
        assert_eq!(limit.trim(), ((64u64 + 128) << 20).to_string());
        let pids = std::fs::read_to_string(cg.dirs[1].join("pids.max")).unwrap();
        assert_eq!(pids.trim(), "64");
    }
    // Its root holds only what was bound and its device nodes.
    let root = std::fs::read_dir(format!("/proc/{vmm}/root/"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect::<std::collections::BTreeSet<_>>();
    let top = |p: &Path| {
        p.components()
            .nth(1)
            .unwrap()
            .as_os_str()
            .to_string_lossy()
            .into_owned()
    };
    let expected: std::collections::BTreeSet<String> =
        ["dev".to_string(), top(&snap), top(&run)].into();
    assert_eq!(root, expected);
    let devs = std::fs::read_dir(format!("/proc/{vmm}/root/dev"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect::<std::collections::BTreeSet<_>>();
    assert!(devs.contains("kvm") && devs.contains("net"), "{devs:?}");

    assert!(shell.shutdown().unwrap().success());
    assert!(
        seccomp_reports(vmm).is_empty(),
        "{:?}",
        seccomp_reports(vmm)
    );
    assert_eq!(leftovers(&run, &name), Vec::<String>::new());
}

/// `kill -9` of the jailed VMM (its keeper cleans up) and of the keeper itself (the VMM dies
/// with it; the spawner's handle cleans up): nothing is left either way.
#[test]
fn kvm_jail_kill_9_leaves_nothing_behind() {
    if !kvm_available("kvm_jail_kill_9_leaves_nothing_behind") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let snap = template(dir.path());
    let run = dir.path().join("run");
    std::fs::create_dir(&run).unwrap();
    for victim in ["vmm", "keeper"] {
        let name = format!("k9-{victim}-{}", std::process::id());
        let mut shell = ShellProcess::spawn(&jailed_spec(&run, &snap), &name).unwrap();
        shell.restore(&clone_opts(&snap, "k9")).unwrap();
        next_resumed_line(&mut shell);
        let vmm = jailed_pid(shell.pid());
        let target = if victim == "vmm" { vmm } else { shell.pid() };
        // SAFETY: kill(2) on a process this test started.
        unsafe { libc::kill(target as i32, libc::SIGKILL) };
        let deadline = Instant::now() + Duration::from_secs(5);
        while shell.try_wait().is_none() {
            assert!(
                Instant::now() < deadline,
                "{victim}: the keeper did not end"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        drop(shell);
        assert!(
            !Path::new(&format!("/proc/{vmm}")).exists()
                || std::fs::read_to_string(format!("/proc/{vmm}/stat"))
                    .is_ok_and(|s| s.contains(") Z")),
            "{victim}: the VMM {vmm} still runs"
        );
        assert_eq!(leftovers(&run, &name), Vec::<String>::new(), "{victim}");
    }
    assert_eq!(std::fs::read_dir(&run).unwrap().count(), 0);
}
