//! A CRI pod on the `vm` backend: one VM holding all its containers. On real KVM with a
//! test-guest `rt.agent` template of 2 disk slots (the guest's agent double watches slot 0 and
//! reports every disk it sees there): each container's root gets a slot of its own, deleting a
//! container frees its slot for the next one, the third container of a 2-slot template fails
//! naming the template to rebuild, and the sandbox pauses and resumes through the library call
//! the shim's Pause/Resume and `runv pause` share.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use pool_manager::vmm_api::{ControlClient, VmState};
use pool_manager::{Pool, PoolConfig, ReadyCheck, TemplateSpec};
use protocol::{Request, Response, RootfsSource};
use shim::sandbox::{manage, vm, FirstRootfs, Kind, Sandbox};
use shim::state::ContainerDir;

/// The `PASS agent_disk` reports in a clone's log so far; fails on a `REPORT FAIL`.
fn disk_reports(log: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    if let Some(f) = text.lines().find(|l| l.starts_with("REPORT FAIL")) {
        panic!("the guest failed: {f}\n{text}");
    }
    text.lines()
        .filter(|l| l.starts_with("REPORT PASS agent_disk"))
        .map(str::to_string)
        .collect()
}

/// Waits for the `n`th `PASS agent_disk` report and returns it.
fn wait_disk_report(log: &Path, n: usize) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let r = disk_reports(log);
        if r.len() >= n {
            return r[n - 1].clone();
        }
        assert!(
            Instant::now() < deadline,
            "no disk report #{n} in {}: {r:?}",
            log.display()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
}

fn serial(root: &RootfsSource) -> &str {
    match root {
        RootfsSource::Block { serial, .. } => serial,
        other => panic!("not a block root: {other:?}"),
    }
}

/// A small tree of its own per container (distinct EROFS images).
fn tree(base: &Path, name: &str) -> PathBuf {
    let t = base.join(name);
    std::fs::create_dir_all(t.join("etc")).unwrap();
    std::fs::write(t.join("etc/hostname"), format!("{name}\n")).unwrap();
    t
}

fn ping(sb: &vm::VmSandbox, limit: Duration) -> bool {
    let Ok(mut c) = sb.agent_ready() else {
        return false;
    };
    matches!(
        c.call_timeout(&Request::Ping, limit),
        Ok(Response::Pong { .. })
    )
}

#[test]
fn pod_containers_get_own_disk_slots_freed_on_delete_and_the_pod_pauses() {
    if std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_err()
    {
        println!("SKIPPED: /dev/kvm is not usable");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path();
    let shm = PathBuf::from(format!("/dev/shm/runv-shim-pod-{}", std::process::id()));
    let vmm = common::vmm();
    {
        let pool = Pool::open(PoolConfig {
            vmm: vmm.clone(),
            state_dir: p.join("state"),
            run_dir: p.join("run"),
            tmpfs_dir: shm.clone(),
            refill_workers: 1,
            jail: Some(pool_manager::ShellJail::pool_default()),
        })
        .unwrap();
        let spec = TemplateSpec {
            kernel: test_guests::guest_path(),
            initrd: None,
            cmdline: "rt.agent".into(),
            mem_mib: 64,
            vcpus: 1,
            ready: ReadyCheck::Report,
            slots: 2,
            net: false,
            mem_mode: Default::default(),
            warmup_ms: 0,
        };
        pool.build_template("pod2", &spec).unwrap();
    }
    // The configuration the shim reads (this binary's only test sets it).
    let config = p.join("config.toml");
    std::fs::write(
        &config,
        format!(
            "template = \"pod2\"\npool_socket = \"{0}/none.sock\"\nstate_dir = \"{0}/state\"\n\
             run_dir = \"{0}/run\"\ntmpfs_dir = \"{1}\"\nvmm = \"{2}\"\nimage_cache = \"{0}/images\"\n\
             agent_timeout_ms = 10000\n",
            p.display(),
            shm.display(),
            vmm.display()
        ),
    )
    .unwrap();
    std::env::set_var("RUNV_CONFIG", &config);
    std::env::remove_var("RUNV_TEMPLATE");

    // The pod's sandbox, as the shim's first Create launches it.
    let dir = ContainerDir::new(&p.join("sandboxes"), "pod1");
    std::fs::create_dir_all(&dir.path).unwrap();
    // The first container's image is built while the clone is leased: it is in the cache
    // before `rootfs` asks for it.
    let pause_tree = tree(p, "pause");
    let first = FirstRootfs {
        container: "pause",
        dir: &pause_tree,
    };
    let mut sb = vm::launch(&dir, None, Some(first)).unwrap();
    let log = sb.info().debug_log.clone();
    let control = sb.info().control.clone();
    let images = || {
        std::fs::read_dir(p.join("images"))
            .map(|d| {
                d.flatten()
                    .filter(|e| e.path().extension().is_some_and(|x| x == "erofs"))
                    .count()
            })
            .unwrap_or(0)
    };
    assert_eq!(
        images(),
        1,
        "launch did not prepare the first container's image"
    );
    // A first root file system whose image cannot be built: the launch still succeeds, and
    // `rootfs` reports the build's error for it.
    let broken = ContainerDir::new(&p.join("sandboxes"), "broken");
    std::fs::create_dir_all(&broken.path).unwrap();
    let missing = p.join("no-such-rootfs");
    let first = FirstRootfs {
        container: "gone",
        dir: &missing,
    };
    let mut other = vm::launch(&broken, None, Some(first)).unwrap();
    let e = other.rootfs("gone", &missing).unwrap_err().to_string();
    assert!(e.contains("checking the rootfs"), "{e}");
    other.shutdown();

    // The pause container, then the app container: a slot each; the guest saw the pause
    // container's image arrive in slot 0 and nothing else there afterwards.
    let pause = sb.rootfs("pause", &pause_tree).unwrap();
    assert_eq!(serial(&pause), "runv-slot0");
    let r = wait_disk_report(&log, 1);
    assert_eq!(field(&r, "serial"), Some("runv-slot0"), "{r}");
    assert_eq!(field(&r, "magic"), Some("e0f5e1e2"), "{r}");
    let app = sb.rootfs("app", &tree(p, "app")).unwrap();
    assert_eq!(serial(&app), "runv-slot1");
    assert_eq!(sb.rootfs_slot("app"), Some(1));
    // A request answered after the attach: the guest's loop ran past its slot-0 check.
    assert!(
        ping(&sb, Duration::from_secs(5)),
        "the agent stopped answering"
    );
    assert_eq!(
        disk_reports(&log).len(),
        1,
        "slot 0 (the pause container's root) changed when the app container's root was attached"
    );

    // A third container of a 2-slot template: refused, naming the pod, the count and the
    // template; nothing is taken.
    let e = sb.rootfs("side", &tree(p, "side")).unwrap_err().to_string();
    assert!(
        e.contains(
            "pod pod1 uses all 2 disk slots of template pod2; raise `slots` in the template"
        ),
        "{e}"
    );
    assert_eq!(sb.rootfs_slot("side"), None);

    // Deleting the pause container detaches slot 0 (the guest sees the one-sector
    // placeholder), and the next container gets it.
    sb.release_rootfs("pause").unwrap();
    let r = wait_disk_report(&log, 2);
    assert_eq!(field(&r, "serial"), Some("runv-slot0"), "{r}");
    assert_eq!(field(&r, "capacity"), Some("1"), "{r}");
    assert_eq!(sb.rootfs_slot("pause"), None);
    sb.release_rootfs("pause").unwrap(); // nothing left to free: fine
    let side = sb.rootfs("side", &tree(p, "side")).unwrap();
    assert_eq!(serial(&side), "runv-slot0");
    let r = wait_disk_report(&log, 3);
    assert_eq!(field(&r, "magic"), Some("e0f5e1e2"), "{r}");
    assert_eq!(
        sb.rootfs_slot("app"),
        Some(1),
        "the app container lost its slot"
    );

    // Pause and resume through the recorded sandbox, as the shim's Pause/Resume do: the VMM
    // reports it paused and the agent does not answer until it is resumed.
    let state = || {
        let mut c = ControlClient::connect(&control, Duration::from_secs(5)).unwrap();
        c.status().unwrap().state
    };
    let mut before = sb.agent_ready().unwrap();
    manage::pause_vm(&dir, true).unwrap();
    assert_eq!(state(), VmState::Paused);
    assert!(
        !matches!(
            before.call_timeout(&Request::Ping, Duration::from_millis(300)),
            Ok(Response::Pong { .. })
        ),
        "a paused VM's agent answered"
    );
    drop(before);
    manage::pause_vm(&dir, false).unwrap();
    assert_eq!(state(), VmState::Running);
    assert!(ping(&sb, Duration::from_secs(5)), "no answer after resume");
    // A VM pauses whole; the host backend freezes one container through its agent.
    assert_eq!(manage::freezer(Kind::Vm), manage::Freezer::Vm);

    // The release leaves no VMM, socket or log.
    let info = sb.info().clone();
    sb.shutdown();
    drop(sb);
    assert!(
        common::gone(i64::from(info.pid)),
        "VMM {} still runs",
        info.pid
    );
    for f in [&info.vsock_uds, &info.control, &info.debug_log] {
        assert!(!f.exists(), "{} left behind", f.display());
    }
    let _ = dir.remove();
    let _ = std::fs::remove_dir_all(&shm);
}
