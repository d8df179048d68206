//! Pool manager benchmarks, through the embeddable `pool_manager::Pool` with a 64 MiB counter
//! test-guest template on tmpfs and the release `runv-vmm`:
//! `pool_acquire_shell_ms` (acquire served by a ready shell → the guest's first report after
//! resume, read from the clone's debug log; every single acquire starts from a full pool, so the
//! refill of the previous one does not share the two cores with it), `pool_refill_per_second` (an empty pool refilled to
//! 20 shells by two workers), `sandbox_host_mib` (median PSS of 100 idle leased sandboxes' VMM
//! processes, which includes the guest's private pages and its share of the template's page
//! cache; measured on idle warm clones when the warm tier is available, else on idle leased
//! clones, an upper bound). With the warm tier (`pool_manager::warm::SUPPORTED`, the VMM's
//! `activate`): `pool_lib_acquire_warm_ms` and `pool_lib_acquire_warm_p99_ms` (`Pool::acquire`
//! called → the guest's first report after resume, the test guest's `PASS woke`) and
//! `pool_lib_burst_p99_ms` (50 concurrent acquires against 50 warm clones): the library's share
//! of the gated `pool_acquire_warm_ms` & co, which go through the daemon's HTTP API
//! (`benches/benches/pool_api.rs`).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use benches::{criterion, vmm_bin, wait_report, Recorder};
use pool_manager::{AcquireRequest, Pool, PoolConfig, PoolTargets, ReadyCheck, TemplateSpec, Tier};

/// How often a waiter reads a clone's debug log: one waiter, or each of a burst's 50 (which
/// would otherwise take the cores from the clones; ≤ 1 ms added to a burst's latencies).
const SINGLE_POLL: Duration = Duration::from_micros(50);
const BURST_POLL: Duration = Duration::from_millis(1);

fn wait(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_micros(50));
    }
}

fn shells(pool: &Pool) -> usize {
    pool.pools()[0].shells
}

fn set(pool: &Pool, n: usize) {
    set_tiers(pool, 0, n);
}

fn set_tiers(pool: &Pool, warm: usize, shells: usize) {
    pool.set_pool(
        "counter",
        PoolTargets {
            warm,
            shells,
            max_sandboxes: 0,
            ..Default::default()
        },
    )
    .unwrap();
}

fn warm_count(pool: &Pool) -> usize {
    pool.pools()[0].warm
}

/// Acquires one sandbox and waits for its first report; returns the latency and its id.
fn acquire_timed(pool: &Pool, tier: Tier, every: Duration) -> (Duration, String) {
    let start = Instant::now();
    let s = pool
        .acquire(AcquireRequest {
            template: "counter".into(),
            ..Default::default()
        })
        .unwrap();
    wait_report(&s.debug_log, every);
    let d = start.elapsed();
    assert_eq!(s.tier, tier);
    (d, s.id)
}

/// The warm-tier metrics (see the module docs).
fn warm_benches(c: &mut criterion::Criterion, pool: &Pool) {
    set_tiers(pool, 4, 0);
    let mut p50 = Recorder::median("pool_lib_acquire_warm_ms", "ms");
    let mut p99 = Recorder::p99("pool_lib_acquire_warm_p99_ms", "ms");
    c.bench_function("pool_lib_acquire_warm", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                // A full pool: the refill of the previous acquire (VMM start + restore) does
                // not share the two cores with the acquire being measured.
                wait("a full warm pool", Duration::from_secs(10), || {
                    warm_count(pool) == 4
                });
                let (d, id) = acquire_timed(pool, Tier::Warm, SINGLE_POLL);
                p50.push_duration(d);
                p99.push_duration(d);
                total += d;
                pool.release(&id).unwrap();
            }
            total
        })
    });
    p50.write();
    p99.write();

    let mut burst = Recorder::p99("pool_lib_burst_p99_ms", "ms");
    for _ in 0..3 {
        set_tiers(pool, 50, 0);
        wait("50 warm clones", Duration::from_secs(60), || {
            warm_count(pool) == 50
        });
        let barrier = std::sync::Barrier::new(50);
        let got: Vec<(Duration, String)> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..50)
                .map(|_| {
                    s.spawn(|| {
                        barrier.wait();
                        acquire_timed(pool, Tier::Warm, BURST_POLL)
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        set_tiers(pool, 0, 0);
        for (d, id) in got {
            burst.push_duration(d);
            pool.release(&id).unwrap();
        }
    }
    burst.write();
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
        vmm: vmm_bin(),
        state_dir: dir.join("state"),
        run_dir: dir.join("run"),
        tmpfs_dir: shm.clone(),
        refill_workers: 2,
        // The daemon's default: jail and seccomp on.
        jail: Some(pool_manager::ShellJail::pool_default()),
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
            slots: 0,
            net: false,
            mem_mode: Default::default(),
            warmup_ms: 0,
        },
    )
    .unwrap();

    if pool_manager::warm::SUPPORTED {
        warm_benches(&mut c, &pool);
    }

    set(&pool, 4);
    let mut shell = Recorder::median("pool_acquire_shell_ms", "ms");
    c.bench_function("pool_acquire_shell", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                wait("a full shell pool", Duration::from_secs(10), || {
                    shells(&pool) == 4
                });
                let start = Instant::now();
                let s = pool
                    .acquire(AcquireRequest {
                        template: "counter".into(),
                        ..Default::default()
                    })
                    .unwrap();
                wait_report(&s.debug_log, SINGLE_POLL);
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

    let mut host = Recorder::median("sandbox_host_mib", "MiB");
    if pool_manager::warm::SUPPORTED {
        set_tiers(&pool, 100, 0);
        wait("100 warm clones", Duration::from_secs(60), || {
            warm_count(&pool) == 100
        });
        std::thread::sleep(Duration::from_millis(200));
        for (_, pid) in pool.pooled_pids("counter").unwrap() {
            host.push(pss_mib(pid));
        }
        set_tiers(&pool, 0, 0);
    } else {
        set(&pool, 8);
        let leased: Vec<_> = (0..100)
            .map(|_| {
                let s = pool
                    .acquire(AcquireRequest {
                        template: "counter".into(),
                        ..Default::default()
                    })
                    .unwrap();
                wait_report(&s.debug_log, SINGLE_POLL);
                s
            })
            .collect();
        std::thread::sleep(Duration::from_millis(200));
        for s in &leased {
            host.push(pss_mib(s.pid));
        }
        for s in &leased {
            pool.release(&s.id).unwrap();
        }
    }
    host.write();

    c.final_summary();
    pool.shutdown(false);
    drop(pool);
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_dir_all(&shm);
}
