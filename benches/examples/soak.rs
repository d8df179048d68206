//! The soak (`perf-ci/soak`, not part of every CI run): N clone → run → destroy cycles through
//! an embedded `pool_manager::Pool` (jailed VMMs with seccomp, the daemon's defaults; a 64 MiB
//! counter test-guest template; 4 warm clones and 2 shells kept ready), each acquire waiting for
//! the clone's first report after resume. Before and after (the pool full again, settled), it
//! counts what a leak would grow: this process's fds and threads, host processes and threads,
//! `/dev/shm` entries, Unix sockets, runv cgroups, mounts and attached loop devices. Writes
//! `target/perf-ci/soak.json` and exits non-zero if any count grew.
//!
//! `cargo run --release -p benches --example soak -- [CYCLES]` (default 10000).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use benches::{target_dir, vmm_bin, wait_report};
use pool_manager::{AcquireRequest, Pool, PoolConfig, PoolTargets, ReadyCheck, TemplateSpec};

fn count_dir(path: &str) -> usize {
    std::fs::read_dir(path).map(|d| d.count()).unwrap_or(0)
}

/// Host processes and their threads.
fn processes_and_threads() -> (usize, usize) {
    let mut procs = 0;
    let mut threads = 0;
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        if e.file_name()
            .to_str()
            .is_some_and(|n| n.parse::<u32>().is_ok())
        {
            procs += 1;
            threads += count_dir(&format!("{}/task", e.path().display()));
        }
    }
    (procs, threads)
}

/// cgroups named by runv (`runv*`, `runv/<id>`) in every hierarchy.
fn runv_cgroups() -> usize {
    let mut n = 0;
    for h in std::fs::read_dir("/sys/fs/cgroup")
        .into_iter()
        .flatten()
        .flatten()
    {
        for c in std::fs::read_dir(h.path()).into_iter().flatten().flatten() {
            if c.file_name().to_string_lossy().starts_with("runv") {
                let subdirs = std::fs::read_dir(c.path())
                    .into_iter()
                    .flatten()
                    .flatten()
                    .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                    .count();
                n += 1 + subdirs;
            }
        }
    }
    n
}

/// Loop devices with a backing file.
fn loop_devices() -> usize {
    std::fs::read_dir("/sys/block")
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("loop"))
        .filter(|e| e.path().join("loop/backing_file").exists())
        .count()
}

fn lines(path: &str) -> usize {
    std::fs::read_to_string(path)
        .map(|t| t.lines().count())
        .unwrap_or(0)
}

fn counts() -> BTreeMap<&'static str, usize> {
    let (procs, threads) = processes_and_threads();
    BTreeMap::from([
        ("own_fds", count_dir("/proc/self/fd")),
        ("own_threads", count_dir("/proc/self/task")),
        ("host_processes", procs),
        ("host_threads", threads),
        ("dev_shm_entries", count_dir("/dev/shm")),
        ("unix_sockets", lines("/proc/net/unix")),
        ("runv_cgroups", runv_cgroups()),
        ("mounts", lines("/proc/self/mountinfo")),
        ("loop_devices", loop_devices()),
    ])
}

fn wait_full(pool: &Pool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let p = &pool.pools()[0];
        if p.warm == 4 && p.shells == 2 {
            return;
        }
        assert!(Instant::now() < deadline, "the pool did not refill: {p:?}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn main() {
    let cycles: usize = std::env::args()
        .nth(1)
        .map(|a| a.parse().expect("CYCLES: a number"))
        .unwrap_or(10_000);
    let pid = std::process::id();
    let dir = std::env::temp_dir().join(format!("runv-soak-{pid}"));
    let shm = PathBuf::from(format!("/dev/shm/runv-soak-{pid}"));
    let pool = Pool::open(PoolConfig {
        vmm: vmm_bin(),
        state_dir: dir.join("state"),
        run_dir: dir.join("run"),
        tmpfs_dir: shm.clone(),
        refill_workers: 2,
        jail: Some(pool_manager::ShellJail::pool_default()),
    })
    .expect("opening the pool");
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
    .expect("building the template");
    let targets = PoolTargets {
        warm: 4,
        shells: 2,
        ..Default::default()
    };
    pool.set_pool("counter", targets).unwrap();
    wait_full(&pool);
    std::thread::sleep(Duration::from_millis(500));
    let before = counts();

    let start = Instant::now();
    let mut acquire_ms = Vec::with_capacity(cycles);
    let mut tiers: BTreeMap<String, usize> = BTreeMap::new();
    for i in 0..cycles {
        let t = Instant::now();
        let s = pool
            .acquire(AcquireRequest {
                template: "counter".into(),
                ..Default::default()
            })
            .unwrap_or_else(|e| panic!("cycle {i}: acquire: {e}"));
        wait_report(&s.debug_log, Duration::from_micros(100));
        acquire_ms.push(t.elapsed().as_secs_f64() * 1e3);
        *tiers
            .entry(format!("{:?}", s.tier).to_lowercase())
            .or_default() += 1;
        pool.release(&s.id)
            .unwrap_or_else(|e| panic!("cycle {i}: release: {e}"));
        if (i + 1) % 1000 == 0 {
            eprintln!(
                "soak: {} cycles, {:.1} s",
                i + 1,
                start.elapsed().as_secs_f64()
            );
        }
    }
    let seconds = start.elapsed().as_secs_f64();
    wait_full(&pool);
    // Released VMMs are torn down in the background, one after another: give the reaper up to
    // two minutes to catch up before anything counts as a leak.
    let settle = Instant::now();
    let mut after = counts();
    while after.iter().any(|(k, a)| *a > before[k]) && settle.elapsed() < Duration::from_secs(120) {
        std::thread::sleep(Duration::from_millis(200));
        after = counts();
    }
    let settle_s = settle.elapsed().as_secs_f64();
    pool.shutdown(false);
    drop(pool);
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_dir_all(&shm);

    acquire_ms.sort_by(f64::total_cmp);
    let pct =
        |q: f64| acquire_ms[((acquire_ms.len() as f64 * q) as usize).min(acquire_ms.len() - 1)];
    let grew: BTreeMap<&str, (usize, usize)> = before
        .iter()
        .filter(|(k, b)| after[*k] > **b)
        .map(|(k, b)| (*k, (*b, after[k])))
        .collect();
    let report = serde_json::json!({
        "cycles": cycles,
        "seconds": seconds,
        "cycles_per_second": cycles as f64 / seconds,
        "acquire_to_first_report_ms": {"p50": pct(0.5), "p99": pct(0.99), "max": pct(1.0)},
        "tiers": tiers,
        "settle_seconds": settle_s,
        "before": before,
        "after": after,
        "grew": grew,
    });
    let out = target_dir().join("perf-ci");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(
        out.join("soak.json"),
        serde_json::to_vec_pretty(&report).unwrap(),
    )
    .unwrap();
    println!("{}", serde_json::to_string_pretty(&report).unwrap());
    if !grew.is_empty() {
        eprintln!("soak: counts grew after {cycles} cycles: {grew:?}");
        std::process::exit(1);
    }
}
