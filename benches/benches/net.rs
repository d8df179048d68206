//! Network benchmarks over virtio-net on a TAP, in network namespaces made here (loopback-only):
//! `net_ping_rtt_us` — host → guest ICMP echo round trip (`ping`'s own per-reply time, p50) to
//! the test guest's `rt.net`; `clone_net_ready_ms` — `runv-vmm --restore` of a template with
//! `--net` (the clone's own TAP and address) → the first echo answered by the clone (a `ping`
//! sending every 2 ms, started with the restore), p50. Until `runv-pool` gives sandboxes a
//! network, "acquire" here is the VMM's restore with per-clone network settings.
//! Skipped (no metrics written) without root, `/dev/net/tun`, `ip` or `ping`.

use std::path::Path;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use benches::{criterion, release_bin, Recorder};
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
        .command(release_bin("runv-vmm"))
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

fn control(sock: &Path) -> vmm_api::ControlClient {
    vmm_api::ControlClient::connect(sock, Duration::from_secs(20)).expect("control socket")
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
    let tns = Netns::new().expect("creating a network namespace");
    tns.add_tap("rvbtpl", "10.98.0.1/16").unwrap();
    let snap = dir.join("snap");
    std::fs::create_dir_all(&snap).unwrap();
    let ctl = dir.join("tpl.sock");
    let kernel = test_guests::guest_path();
    let tlog = dir.join("tpl.log");
    let mut args = vec!["--kernel", kernel.to_str().unwrap(), "--mem-mib", "32"];
    args.extend(["--cmdline", "rt.net=10.98.0.2", "--net", "tap=rvbtpl"]);
    args.extend(["--control", ctl.to_str().unwrap()]);
    let template = vmm(&tns, &tlog, &args);
    wait_report(&tlog, "PASS net_ready");
    let mut t = control(&ctl);
    t.snapshot(&snap).expect("snapshotting the template");
    t.shutdown().unwrap();
    drop(template);

    let ns = Netns::new().expect("creating a network namespace");
    ns.add_tap("rvbcl", "10.98.0.1/16").unwrap();
    let mut rec = Recorder::median("clone_net_ready_ms", "ms");
    let mut n = 0u32;
    c.bench_function("clone_net_ready", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                n += 1;
                let ip = format!("10.98.{}.{}", 1 + n / 250 % 250, 2 + n % 250);
                let net = format!("tap=rvbcl,ipv4={ip}");
                let log = dir.join("clone.log");
                let _ = std::fs::remove_file(&log);
                let start = Instant::now();
                let mut pinger: Child = ns
                    .command("ping")
                    .args(["-n", "-c", "1", "-w", "10", "-i", "0.002", &ip])
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .unwrap();
                let clone = vmm(
                    &ns,
                    &log,
                    &["--restore", snap.to_str().unwrap(), "--net", &net],
                );
                let ok = pinger.wait().unwrap().success();
                let d = start.elapsed();
                assert!(ok, "clone {ip} never answered");
                rec.push_duration(d);
                total += d;
                drop(clone);
            }
            total
        })
    });
    rec.write();
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
