//! Network benchmarks over virtio-net on a TAP, in network namespaces made here (loopback-only):
//! `net_ping_rtt_us` — host → guest ICMP echo round trip (`ping`'s own per-reply time, p50) to
//! the test guest's `rt.net`; `clone_net_ready_ms` — `pool_manager::Pool::acquire` of a
//! sandbox with a network (a warm clone of a template built with `net`, from a pool with a
//! `network` range; its namespace and TAP made when it was pooled, its address given at
//! activation) → the first echo answered by the clone to a `ping` in the sandbox's namespace
//! (started when the acquire returns, sending every 2 ms; its start is included), p50; every
//! acquire starts from a full, quiescent pool. Skipped (no metrics written) without root,
//! `/dev/net/tun`, `ip` or `ping`.

use std::path::Path;
use std::process::{Child, Stdio};

use pool_manager::network::{parse_subnet, PoolNetwork};
use pool_manager::{AcquireRequest, Pool, PoolConfig, PoolTargets, ReadyCheck, TemplateSpec, Tier};
use std::time::{Duration, Instant};

use benches::{criterion, vmm_bin, Recorder};
use test_guests::netns::{unavailable, Netns};

/// A `runv-vmm` process, killed and reaped on drop.
struct Vm(Child);

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn vmm(ns: &Netns, log: &Path, args: &[&str]) -> Vm {
    Vm(ns
        .command(vmm_bin())
        .args(["--serial", "none", "--debug-log"])
        .arg(log)
        .args(args)
        .stdout(Stdio::null())
        .spawn()
        .expect("spawning runv-vmm"))
}

/// Waits (at most 20 s) until `log` holds a report starting with `prefix`.
fn wait_report(log: &Path, prefix: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if let Some(f) = text.lines().find(|l| l.starts_with("REPORT FAIL")) {
            panic!("guest failed: {f}");
        }
        if text
            .lines()
            .any(|l| l.starts_with(&format!("REPORT {prefix}")))
        {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "no {prefix} report in {}",
            log.display()
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn ping_rtt(c: &mut criterion::Criterion, dir: &Path) {
    let ns = Netns::new().expect("creating a network namespace");
    ns.add_tap("rvbench0", "10.99.0.1/24").unwrap();
    let log = dir.join("rtt.log");
    let kernel = test_guests::guest_path();
    let mut args = vec!["--kernel", kernel.to_str().unwrap(), "--mem-mib", "32"];
    args.extend(["--cmdline", "rt.net=10.99.0.2", "--net", "tap=rvbench0"]);
    let _vm = vmm(&ns, &log, &args);
    wait_report(&log, "PASS net_ready");
    assert!(
        !ns.ping("10.99.0.2", 3, 0.01, 2).is_empty(),
        "guest does not answer"
    );
    let mut rec = Recorder::median("net_ping_rtt_us", "us");
    c.bench_function("net_ping_rtt", |b| {
        b.iter_custom(|iters| {
            let n = u32::try_from(iters).unwrap_or(u32::MAX).max(1);
            let rtts = ns.ping("10.99.0.2", n, 0.005, 2);
            assert_eq!(rtts.len() as u32, n, "echoes lost");
            let mut total = Duration::ZERO;
            for ms in rtts {
                let d = Duration::from_secs_f64(ms / 1000.0);
                rec.push_duration(d);
                total += d;
            }
            total
        })
    });
    rec.write();
}

fn clone_net_ready(c: &mut criterion::Criterion, dir: &Path) {
    let shm = std::path::PathBuf::from(format!("/dev/shm/runv-bench-net-{}", std::process::id()));
    let pool = Pool::open(PoolConfig {
        vmm: vmm_bin(),
        state_dir: dir.join("state"),
        run_dir: dir.join("run"),
        tmpfs_dir: shm.clone(),
        refill_workers: 2,
        jail: Some(pool_manager::ShellJail::pool_default()),
    })
    .expect("opening the pool");
    let spec = TemplateSpec {
        kernel: test_guests::guest_path(),
        initrd: None,
        cmdline: "rt.net=10.98.0.2".into(),
        mem_mib: 32,
        vcpus: 1,
        ready: ReadyCheck::Report,
        slots: 0,
        net: true,
        mem_mode: Default::default(),
        warmup_ms: 0,
    };
    pool.build_template("net", &spec)
        .expect("building the net template");
    pool.set_pool(
        "net",
        PoolTargets {
            warm: 1,
            network: Some(PoolNetwork {
                subnet: parse_subnet("10.98.0.0/16").unwrap(),
                egress: false,
            }),
            ..Default::default()
        },
    )
    .unwrap();
    let mut rec = Recorder::median("clone_net_ready_ms", "ms");
    c.bench_function("clone_net_ready", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                // Every acquire starts from a quiescent full pool (its refill is not timed).
                let deadline = Instant::now() + Duration::from_secs(20);
                while pool.pools()[0].warm < 1 {
                    assert!(Instant::now() < deadline, "no warm clone in 20 s");
                    std::thread::sleep(Duration::from_millis(1));
                }
                let start = Instant::now();
                let sb = pool
                    .acquire(AcquireRequest {
                        template: "net".into(),
                        ..Default::default()
                    })
                    .expect("acquiring a networked sandbox");
                let n = sb.network.clone().expect("the sandbox has a network");
                let ip = n.ipv4.to_string();
                let ok = std::process::Command::new("ip")
                    .args([
                        "netns", "exec", &n.netns, "ping", "-n", "-c", "1", "-w", "10",
                    ])
                    .args(["-i", "0.002", &ip])
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status()
                    .unwrap()
                    .success();
                let d = start.elapsed();
                assert!(ok, "sandbox {} ({ip}) never answered", sb.id);
                assert_eq!(sb.tier, Tier::Warm);
                rec.push_duration(d);
                total += d;
                pool.release(&sb.id).unwrap();
            }
            total
        })
    });
    rec.write();
    pool.shutdown(false);
    let _ = std::fs::remove_dir_all(&shm);
}

fn main() {
    if let Some(why) = unavailable() {
        println!("SKIPPED: net benches: {why}");
        return;
    }
    let dir = std::env::temp_dir().join(format!("runv-bench-net-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut c = criterion();
    ping_rtt(&mut c, &dir);
    clone_net_ready(&mut c, &dir);
    c.final_summary();
    let _ = std::fs::remove_dir_all(&dir);
}
