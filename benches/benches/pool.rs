//! Pool manager benchmarks, through the embeddable `pool_manager::Pool` with a 64 MiB counter
//! test-guest template on tmpfs and the release `runv-vmm`:
//! `pool_acquire_shell_ms` (acquire served by a ready shell → the guest's first report after
//! resume, read from the clone's debug log), `pool_refill_per_second` (an empty pool refilled to
//! 20 shells by two workers), `sandbox_host_mib` (median PSS of 100 idle leased sandboxes' VMM
//! processes, which includes the guest's private pages and its share of the template's page
//! cache). The warm-tier metrics (`pool_acquire_warm_ms`, `pool_acquire_warm_p99_ms`,
//! `pool_burst_p99_ms`) need the VMM's `activate` request and are not measured yet.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use benches::{criterion, release_bin, Recorder};
use pool_manager::{AcquireRequest, Pool, PoolConfig, PoolTargets, ReadyCheck, TemplateSpec, Tier};

fn wait(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_micros(50));
    }
}

/// Waits for the clone's first report after resume in its debug log.
fn wait_report(log: &Path) {
    wait("a resumed report", Duration::from_secs(10), || {
        std::fs::read_to_string(log).is_ok_and(|t| t.contains("REPORT PASS resumed"))
    });
}

fn shells(pool: &Pool) -> usize {
    pool.pools()[0].shells
}

fn set(pool: &Pool, n: usize) {
    pool.set_pool(
        "counter",
        PoolTargets {
            warm: 0,
            shells: n,
            max_sandboxes: 0,
        },
    )
    .unwrap();
}

/// PSS of a process in MiB (smaps_rollup).
fn pss_mib(pid: u32) -> f64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix("Pss:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        .expect("Pss in smaps_rollup")
        / 1024.0
}

fn main() {
    let mut c = criterion();
    let pid = std::process::id();
    let dir = std::env::temp_dir().join(format!("runv-bench-pool-{pid}"));
    let shm = PathBuf::from(format!("/dev/shm/runv-bench-pool-{pid}"));
    let pool = Pool::open(PoolConfig {
        vmm: release_bin("runv-vmm"),
        state_dir: dir.join("state"),
        run_dir: dir.join("run"),
        tmpfs_dir: shm.clone(),
        refill_workers: 2,
    })
    .unwrap();
    pool.build_template(
        "counter",
        &TemplateSpec {
            kernel: test_guests::guest_path(),
            initrd: None,
            cmdline: "rt.counter rt.idle".into(),
            mem_mib: 64,
            vcpus: 1,
            ready: ReadyCheck::Report,
        },
    )
    .unwrap();

    set(&pool, 4);
    let mut shell = Recorder::median("pool_acquire_shell_ms", "ms");
    c.bench_function("pool_acquire_shell", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                wait("a ready shell", Duration::from_secs(10), || {
                    shells(&pool) >= 1
                });
                let start = Instant::now();
                let s = pool
                    .acquire(AcquireRequest {
                        template: "counter".into(),
                        ..Default::default()
                    })
                    .unwrap();
                wait_report(&s.debug_log);
                let d = start.elapsed();
                assert_eq!(s.tier, Tier::Shell);
                shell.push_duration(d);
                total += d;
                pool.release(&s.id).unwrap();
            }
            total
        })
    });
    shell.write();

    let mut refill = Recorder::median("pool_refill_per_second", "per_s");
    for _ in 0..3 {
        set(&pool, 0);
        wait("an empty pool", Duration::from_secs(10), || {
            shells(&pool) == 0
        });
        let start = Instant::now();
        set(&pool, 20);
        wait("20 shells", Duration::from_secs(30), || shells(&pool) == 20);
        refill.push(20.0 / start.elapsed().as_secs_f64());
    }
    refill.write();

    set(&pool, 8);
    let leased: Vec<_> = (0..100)
        .map(|_| {
            let s = pool
                .acquire(AcquireRequest {
                    template: "counter".into(),
                    ..Default::default()
                })
                .unwrap();
            wait_report(&s.debug_log);
            s
        })
        .collect();
    std::thread::sleep(Duration::from_millis(200));
    let mut host = Recorder::median("sandbox_host_mib", "MiB");
    for s in &leased {
        host.push(pss_mib(s.pid));
    }
    host.write();
    for s in &leased {
        pool.release(&s.id).unwrap();
    }

    c.final_summary();
    pool.shutdown(false);
    drop(pool);
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_dir_all(&shm);
}
