//! The embeddable `Pool` with real KVM and test-guest templates: build, tiers, acquire,
//! release, refill, VMM deaths, TTL, broken templates and cleanup.

mod common;

use std::time::Duration;

use common::*;
use pool_manager::{
    AcquireRequest, BuildStep, Pool, PoolError, PoolTargets, SandboxState, TemplateStatus, Tier,
};

fn acquire(pool: &Pool, template: &str, id: &str) -> pool_manager::SandboxInfo {
    pool.acquire(AcquireRequest {
        template: template.into(),
        id: Some(id.into()),
        ..Default::default()
    })
    .unwrap()
}

#[test]
fn pool_build_acquire_release_refill_and_cleanup() {
    if !kvm_available("pool_build_acquire_release_refill_and_cleanup") {
        return;
    }
    let dirs = Dirs::new();
    let pool = Pool::open(dirs.config()).unwrap();
    let info = pool.build_template("counter", &counter_spec()).unwrap();
    assert_eq!(info.status, TemplateStatus::Ready);
    assert!(dirs
        .state()
        .join("templates/counter/template.json")
        .exists());
    assert!(dirs.shm.join("counter/memory.bin").exists());

    // Empty pool: served cold, never refused.
    let a = acquire(&pool, "counter", "cold-one");
    assert_eq!(a.tier, Tier::Cold);
    assert_eq!(a.generation, 1);
    let r = resumed_report(&a.debug_log);
    assert_eq!(field(&r, "clone"), Some("cold-one"), "{r}");
    assert_eq!(field(&r, "gen"), Some("1"), "{r}");

    pool.set_pool(
        "counter",
        PoolTargets {
            warm: 0,
            shells: 3,
            max_sandboxes: 20,
            ..Default::default()
        },
    )
    .unwrap();
    wait_until("3 shells", Duration::from_secs(20), || {
        pool.pools()[0].shells == 3
    });
    let mut ids = Vec::new();
    for i in 0..3 {
        let s = acquire(&pool, "counter", &format!("s{i}"));
        assert_eq!(s.tier, Tier::Shell);
        let r = resumed_report(&s.debug_log);
        assert_eq!(field(&r, "clone"), Some(format!("s{i}").as_str()), "{r}");
        ids.push(s.id);
    }
    // Duplicate ids are refused.
    let e = pool
        .acquire(AcquireRequest {
            template: "counter".into(),
            id: Some("s0".into()),
            ..Default::default()
        })
        .unwrap_err();
    assert!(matches!(e, PoolError::Conflict(_)), "{e}");
    wait_until("refill", Duration::from_secs(20), || {
        pool.pools()[0].shells == 3
    });
    assert_eq!(pool.sandboxes().len(), 4);
    for id in ids.iter().chain(["cold-one".to_string()].iter()) {
        pool.release(id).unwrap();
    }
    assert!(pool.sandboxes().is_empty());
    assert!(matches!(pool.release("s0"), Err(PoolError::NotFound(_))));
    let c = pool.counters();
    assert_eq!(
        c.acquires[Tier::Shell as usize].load(std::sync::atomic::Ordering::Relaxed),
        3
    );
    assert_eq!(
        c.acquires[Tier::Cold as usize].load(std::sync::atomic::Ordering::Relaxed),
        1
    );

    let vmm = dirs.config().vmm;
    let run = dirs.run();
    drop(pool);
    assert!(dirs.run_files().is_empty(), "left: {:?}", dirs.run_files());
    assert!(
        processes_mentioning(run.to_str().unwrap()).is_empty(),
        "VMMs left running ({})",
        vmm.display()
    );
}

fn kill9(pid: u32) {
    // SAFETY: kill(2) on a VMM this test's pool started.
    assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGKILL) }, 0);
}

/// Pids of the VMMs of a pool, from their command lines (`--control <run>/vm-*.sock`).
fn vmm_pids(dirs: &Dirs) -> Vec<u32> {
    processes_mentioning(dirs.run().to_str().unwrap())
}

#[test]
fn pool_notices_killed_vmms_and_expired_ttls() {
    if !kvm_available("pool_notices_killed_vmms_and_expired_ttls") {
        return;
    }
    let dirs = Dirs::new();
    let pool = Pool::open(dirs.config()).unwrap();
    pool.build_template("counter", &counter_spec()).unwrap();
    pool.set_pool(
        "counter",
        PoolTargets {
            warm: 0,
            shells: 2,
            max_sandboxes: 0,
            ..Default::default()
        },
    )
    .unwrap();
    wait_until("2 shells", Duration::from_secs(20), || {
        pool.pools()[0].shells == 2
    });
    let leased = acquire(&pool, "counter", "victim");
    wait_until("refill", Duration::from_secs(20), || {
        pool.pools()[0].shells == 2
    });

    // A pooled shell killed: noticed and replaced.
    let pooled: Vec<u32> = vmm_pids(&dirs)
        .into_iter()
        .filter(|p| *p != leased.pid)
        .collect();
    assert_eq!(pooled.len(), 2, "{pooled:?}");
    kill9(pooled[0]);
    wait_until("the death noticed", Duration::from_secs(1), || {
        pool.counters()
            .vm_deaths
            .load(std::sync::atomic::Ordering::Relaxed)
            == 1
    });
    wait_until("a replacement", Duration::from_secs(20), || {
        pool.pools()[0].shells == 2 && !vmm_pids(&dirs).contains(&pooled[0])
    });

    // A leased VMM killed: marked dead within a second, its socket removed.
    kill9(leased.pid);
    wait_until("dead", Duration::from_secs(1), || {
        pool.sandbox("victim").unwrap().state == SandboxState::Dead
    });
    wait_until("files removed", Duration::from_secs(1), || {
        !leased.control.exists() && !leased.debug_log.exists()
    });
    pool.release("victim").unwrap();

    // TTL: released by the monitor.
    let t = pool
        .acquire(AcquireRequest {
            template: "counter".into(),
            id: Some("short".into()),
            ttl: Some(Duration::from_secs(1)),
            ..Default::default()
        })
        .unwrap();
    assert!(t.expires_at.is_some());
    wait_until("TTL expiry", Duration::from_secs(3), || {
        pool.sandbox("short").is_err()
    });
    wait_until("expired VMM gone", Duration::from_secs(3), || {
        !vmm_pids(&dirs).contains(&t.pid)
    });
    assert_eq!(
        pool.counters()
            .expired
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    drop(pool);
    assert!(vmm_pids(&dirs).is_empty());
    assert!(dirs.run_files().is_empty(), "left: {:?}", dirs.run_files());
}

#[test]
fn pool_marks_a_corrupted_template_broken_and_keeps_serving_others() {
    if !kvm_available("pool_marks_a_corrupted_template_broken_and_keeps_serving_others") {
        return;
    }
    let dirs = Dirs::new();
    let pool = Pool::open(dirs.config()).unwrap();
    pool.build_template("good", &counter_spec()).unwrap();
    pool.build_template("bad", &counter_spec()).unwrap();
    // Truncate the tmpfs copy clones map.
    let mem = dirs.shm.join("bad/memory.bin");
    let f = std::fs::OpenOptions::new().write(true).open(&mem).unwrap();
    f.set_len(4096).unwrap();
    drop(f);
    let e = pool
        .acquire(AcquireRequest {
            template: "bad".into(),
            ..Default::default()
        })
        .unwrap_err();
    assert!(matches!(e, PoolError::Broken { .. }), "{e}");
    let TemplateStatus::Broken(reason) = pool.template("bad").unwrap().status else {
        panic!("not broken");
    };
    assert!(reason.contains("memory.bin"), "{reason}");
    // The others keep serving.
    let g = acquire(&pool, "good", "g1");
    assert!(resumed_report(&g.debug_log).contains("clone=g1"));

    // A pool opened later sees the durable copy again: the tmpfs copy is remade only when
    // missing, so the truncated one stays broken at open until removed.
    drop(pool);
    let pool = Pool::open(dirs.config()).unwrap();
    assert!(matches!(
        pool.template("bad").unwrap().status,
        TemplateStatus::Broken(_)
    ));
    std::fs::remove_dir_all(dirs.shm.join("bad")).unwrap();
    drop(pool);
    let pool = Pool::open(dirs.config()).unwrap();
    assert_eq!(pool.template("bad").unwrap().status, TemplateStatus::Ready);
    let b = acquire(&pool, "bad", "b1");
    assert!(resumed_report(&b.debug_log).contains("clone=b1"));
    pool.remove_template("bad", true).unwrap();
    assert!(!dirs.shm.join("bad").exists());
    assert!(!dirs.state().join("templates/bad").exists());
    drop(pool);
    assert!(vmm_pids(&dirs).is_empty());
}

#[test]
fn pool_refuses_bad_input_with_what_to_fix() {
    let dirs = Dirs::new();
    let pool = Pool::open(dirs.config()).unwrap();
    let bad_name = pool
        .build_template("Bad/Name", &counter_spec())
        .unwrap_err();
    assert!(
        bad_name.to_string().contains("invalid template"),
        "{bad_name}"
    );
    let mut spec = counter_spec();
    spec.vcpus = 0;
    assert!(pool
        .build_template("x", &spec)
        .unwrap_err()
        .to_string()
        .contains("vcpus"));
    spec = counter_spec();
    spec.kernel = "/nonexistent/kernel".into();
    assert!(pool
        .build_template("x", &spec)
        .unwrap_err()
        .to_string()
        .contains("/nonexistent/kernel"));
    let e = pool
        .acquire(AcquireRequest {
            template: "absent".into(),
            ..Default::default()
        })
        .unwrap_err();
    assert!(matches!(e, PoolError::NotFound(_)), "{e}");
    let e = pool
        .acquire(AcquireRequest {
            template: "absent".into(),
            id: Some("../x".into()),
            ..Default::default()
        })
        .unwrap_err();
    assert!(e.to_string().contains("invalid sandbox id"), "{e}");
    let e = pool
        .set_pool(
            "absent",
            PoolTargets {
                warm: 0,
                shells: 5,
                max_sandboxes: 2,
                ..Default::default()
            },
        )
        .unwrap_err();
    assert!(e.to_string().contains("max_sandboxes"), "{e}");
}

/// `ready: agent` needs a Linux guest kernel (none boots on our PVM hosts): set `RUNV_KERNEL`
/// (and `RUNV_INITRD`, an initrd whose init is runv-agent) to run it.
#[test]
fn pool_builds_an_agent_template_with_a_linux_kernel() {
    let Some(kernel) = std::env::var_os("RUNV_KERNEL") else {
        eprintln!("SKIPPED: pool_builds_an_agent_template_with_a_linux_kernel: RUNV_KERNEL is not set (no Linux guest boots on this host)");
        return;
    };
    let dirs = Dirs::new();
    let pool = Pool::open(dirs.config()).unwrap();
    let spec = pool_manager::TemplateSpec {
        kernel: kernel.into(),
        initrd: std::env::var_os("RUNV_INITRD").map(Into::into),
        cmdline: "console=ttyS0 quiet".into(),
        mem_mib: 256,
        vcpus: 1,
        ready: pool_manager::ReadyCheck::Agent,
        slots: 0,
        net: false,
        mem_mode: Default::default(),
        warmup_ms: 0,
    };
    let info = pool.build_template("linux", &spec).unwrap();
    assert_eq!(info.status, TemplateStatus::Ready);
    let s = acquire(&pool, "linux", "l1");
    assert_eq!(s.generation, 1);
    pool.release("l1").unwrap();
}

/// The nice value of every thread of `pid`.
fn thread_nices(pid: u32) -> Vec<i32> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("stat")).ok())
        .map(|stat| {
            // Field 19 (nice), counted after the parenthesised command name.
            let after = stat.rsplit(')').next().unwrap();
            after.split_whitespace().nth(16).unwrap().parse().unwrap()
        })
        .collect()
}

#[test]
fn pool_activates_warm_clones_with_fresh_identities() {
    if !pool_manager::warm::SUPPORTED {
        eprintln!("SKIPPED: pool_activates_warm_clones_with_fresh_identities: the VMM has no activate request in this build");
        return;
    }
    if !kvm_available("pool_activates_warm_clones_with_fresh_identities") {
        return;
    }
    let dirs = Dirs::new();
    let pool = Pool::open(dirs.config()).unwrap();
    pool.build_template("counter", &counter_spec()).unwrap();
    pool.set_pool(
        "counter",
        PoolTargets {
            warm: 3,
            shells: 0,
            max_sandboxes: 0,
            ..Default::default()
        },
    )
    .unwrap();
    wait_until("3 warm", Duration::from_secs(20), || {
        pool.pools()[0].warm == 3
    });
    // A warm clone has not run: no report before its activation.
    for f in dirs.run_files() {
        if f.extension().is_some_and(|x| x == "log") {
            let text = std::fs::read_to_string(&f).unwrap();
            assert!(!text.contains("REPORT"), "{}: {text}", f.display());
        }
    }
    // Made by the refill at a lower priority (every thread); a lease runs at normal priority.
    for (_, pid) in pool.pooled_pids("counter").unwrap() {
        assert_eq!(
            thread_nices(pid),
            vec![pool_manager::priority::REFILL_NICE; thread_nices(pid).len()]
        );
    }
    let mut ents = std::collections::HashSet::new();
    for i in 0..3 {
        let s = acquire(&pool, "counter", &format!("w{i}"));
        assert_eq!((s.tier, s.generation), (Tier::Warm, 1));
        let nices = thread_nices(s.pid);
        assert!(
            !nices.is_empty() && nices.iter().all(|n| *n == 0),
            "{nices:?}"
        );
        let r = resumed_report(&s.debug_log);
        assert_eq!(field(&r, "clone"), Some(format!("w{i}").as_str()), "{r}");
        assert_eq!(field(&r, "gen"), Some("1"), "{r}");
        let e = field(&r, "ent").unwrap_or_else(|| panic!("no ent= in {r}"));
        assert!(ents.insert(e.to_string()), "entropy reused: {r}");
    }
    wait_until("warm refill", Duration::from_secs(20), || {
        pool.pools()[0].warm == 3
    });
    for i in 0..3 {
        pool.release(&format!("w{i}")).unwrap();
    }
    drop(pool);
    assert!(vmm_pids(&dirs).is_empty());
    assert!(dirs.run_files().is_empty(), "left: {:?}", dirs.run_files());
}

#[test]
fn pool_backs_off_when_vms_fail_to_start_and_says_why() {
    if !kvm_available("pool_backs_off_when_vms_fail_to_start_and_says_why") {
        return;
    }
    let dirs = Dirs::new();
    let pool = Pool::open(dirs.config()).unwrap();
    pool.build_template("counter", &counter_spec()).unwrap();
    drop(pool);
    // The same state with a VMM that cannot start shells.
    let mut cfg = dirs.config();
    cfg.vmm = "/bin/false".into();
    let pool = Pool::open(cfg).unwrap();
    pool.set_pool(
        "counter",
        PoolTargets {
            warm: 1,
            shells: 1,
            max_sandboxes: 0,
            ..Default::default()
        },
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    let failures = pool
        .counters()
        .refill_failures
        .load(std::sync::atomic::Ordering::Relaxed);
    // Backoff 200 ms, 400 ms, 800 ms...: a handful of attempts, not one per 100 ms tick.
    assert!((1..=6).contains(&failures), "{failures} refill failures");
    assert!(pool.pools()[0].refill_failures >= 1);
    // An acquire still tries (cold) and says what failed.
    let e = pool
        .acquire(AcquireRequest {
            template: "counter".into(),
            ..Default::default()
        })
        .unwrap_err();
    assert!(matches!(e, PoolError::Vm(_)), "{e}");
    assert_eq!(
        pool.template("counter").unwrap().status,
        TemplateStatus::Ready
    );
    drop(pool);
    assert!(dirs.run_files().is_empty(), "left: {:?}", dirs.run_files());
}

#[test]
fn pool_max_sandboxes_holds_under_concurrent_acquires() {
    if !kvm_available("pool_max_sandboxes_holds_under_concurrent_acquires") {
        return;
    }
    let dirs = Dirs::new();
    let pool = Pool::open(dirs.config()).unwrap();
    pool.build_template("counter", &counter_spec()).unwrap();
    pool.set_pool(
        "counter",
        PoolTargets {
            warm: 1,
            shells: 1,
            max_sandboxes: 3,
            ..Default::default()
        },
    )
    .unwrap();
    let results: Vec<_> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..6)
            .map(|i| {
                let pool = &pool;
                s.spawn(move || {
                    pool.acquire(AcquireRequest {
                        template: "counter".into(),
                        id: Some(format!("m{i}")),
                        ..Default::default()
                    })
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let ok = results.iter().filter(|r| r.is_ok()).count();
    assert_eq!(ok, 3, "{results:?}");
    for r in &results {
        if let Err(e) = r {
            assert!(e.to_string().contains("max_sandboxes"), "{e}");
        }
    }
    drop(pool);
    assert!(vmm_pids(&dirs).is_empty());
}

#[test]
fn pool_reports_a_template_build_step_by_step() {
    if !kvm_available("pool_reports_a_template_build_step_by_step") {
        return;
    }
    let dirs = Dirs::new();
    let pool = Pool::open(dirs.config()).unwrap();
    let seen = std::thread::scope(|s| {
        let build = s.spawn(|| pool.build_template("counter", &counter_spec()));
        let mut seen: Vec<BuildStep> = Vec::new();
        while !build.is_finished() {
            if let Some(p) = pool.build_progress("counter") {
                assert_eq!(p.status, "building");
                assert_eq!((p.step_no, p.steps), (p.step.number(), BuildStep::COUNT));
                if seen.last() != Some(&p.step) {
                    seen.push(p.step);
                }
            }
            std::thread::sleep(Duration::from_micros(100));
        }
        build.join().unwrap().unwrap();
        seen
    });
    assert!(!seen.is_empty(), "no build step seen");
    assert!(
        seen.windows(2).all(|w| w[0].number() < w[1].number()),
        "steps out of order: {seen:?}"
    );
    assert!(pool.build_progress("counter").is_none());
    assert_eq!(
        pool.template("counter").unwrap().status,
        TemplateStatus::Ready
    );
}

#[test]
fn pool_builds_a_uffd_template_whose_first_clone_records_the_working_set() {
    if !kvm_available("pool_builds_a_uffd_template_whose_first_clone_records_the_working_set") {
        return;
    }
    let dirs = Dirs::new();
    let pool = Pool::open(dirs.config()).unwrap();
    let mut spec = counter_spec();
    spec.mem_mode = pool_manager::vmm_api::MemoryMode::Uffd;
    spec.warmup_ms = 50;
    let t0 = std::time::Instant::now();
    let info = pool.build_template("lazy", &spec).unwrap();
    assert_eq!(info.status, TemplateStatus::Ready);
    assert!(t0.elapsed() >= Duration::from_millis(50), "the warm-up ran");
    // The first clone recorded the working set beside the tmpfs copy clones restore from.
    assert!(
        dirs.shm.join("lazy").join("workingset.bin").is_file(),
        "no working set in {}",
        dirs.shm.display()
    );
    let s = acquire(&pool, "lazy", "u1");
    assert_eq!((s.tier, s.generation), (Tier::Cold, 1));
    // A uffd clone runs jailed like any other.
    assert_jailed(s.pid);
    let r = resumed_report(&s.debug_log);
    assert_eq!(field(&r, "pattern"), Some("ok"), "{r}");
    pool.release("u1").unwrap();
    // Bad warm-ups are refused before anything boots.
    spec.warmup_ms = 600_001;
    match pool.build_template("slow", &spec) {
        Err(PoolError::Template(e)) => assert!(e.to_string().contains("warmup_ms"), "{e}"),
        other => panic!("{other:?}"),
    }
    drop(pool);
    assert!(dirs.run_files().is_empty(), "left: {:?}", dirs.run_files());
}

#[test]
fn pool_clean_orphans_spares_the_vms_the_pool_is_spawning() {
    if !kvm_available("pool_clean_orphans_spares_the_vms_the_pool_is_spawning") {
        return;
    }
    let dirs = Dirs::new();
    let pool = std::sync::Arc::new(Pool::open(dirs.config()).unwrap());
    // One disk slot: each restore copies the slot's placeholder into the VM's own directory,
    // which fails if a sweep took that directory away.
    let spec = pool_manager::TemplateSpec {
        slots: 1,
        ..counter_spec()
    };
    pool.build_template("counter", &spec).unwrap();
    let targets = |shells| PoolTargets {
        warm: 0,
        shells,
        max_sandboxes: 0,
        ..Default::default()
    };
    // A sweep (as a restarted daemon's, or a second pool's start) running the whole time the
    // pool spawns shells.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sweeper = {
        let (pool, stop) = (pool.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut sweeps = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                assert_eq!(pool.clean_orphans(), 0, "a live VMM of this pool was ended");
                sweeps += 1;
            }
            sweeps
        })
    };
    for round in 0..8 {
        pool.set_pool("counter", targets(3)).unwrap();
        wait_until("3 shells", Duration::from_secs(20), || {
            pool.pools()[0].shells == 3
        });
        // Every pooled shell still has its directory, and its restore works.
        let ids: Vec<String> = (0..3).map(|i| format!("r{round}-{i}")).collect();
        for id in &ids {
            let s = acquire(&pool, "counter", id);
            assert_eq!(s.tier, Tier::Shell, "{s:?}");
        }
        pool.set_pool("counter", targets(0)).unwrap();
        for id in &ids {
            pool.release(id).unwrap();
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let sweeps = sweeper.join().unwrap();
    eprintln!("{sweeps} sweeps while 24 shells were spawned");
    assert!(sweeps > 0);
    drop(pool);
    wait_until("every VMM gone", Duration::from_secs(10), || {
        vmm_pids(&dirs).is_empty()
    });
}
