//! The pool daemon through its HTTP API (`runv-pool serve`, release build, on a Unix socket),
//! with a 64 MiB counter test-guest template on tmpfs and the release `runv-vmm`:
//! `pool_acquire_warm_ms` and `pool_acquire_warm_p99_ms` (`POST /v1/sandboxes` sent → the
//! clone's first report after resume, the test guest's `PASS woke`, in its debug log; each
//! acquire starts from a full pool of 4 warm clones, so the refill of the previous one does not
//! share the two cores with it) and `pool_burst_p99_ms` (50 concurrent acquires against a pool
//! of 50 warm clones, three rounds). The daemon runs with its defaults: every VMM jailed, seccomp
//! on. `RUNV_BENCH_NO_JAIL=1` starts it with `--no-jail` instead, to see what the jail costs.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use benches::{criterion, release_bin, vmm_bin, wait_report, Recorder};
use serde_json::{json, Value};

/// One HTTP/1.1 request over the daemon's socket; returns the status and the JSON body.
fn http(sock: &Path, method: &str, path: &str, body: &Value) -> (u16, Value) {
    let body = if body.is_null() {
        Vec::new()
    } else {
        serde_json::to_vec(body).unwrap()
    };
    let mut s = UnixStream::connect(sock).expect("connecting to the pool daemon");
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: runv\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    let mut req = head.into_bytes();
    req.extend_from_slice(&body);
    s.write_all(&req).unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    let text = String::from_utf8_lossy(&raw);
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no HTTP reply: {text:?}"));
    let json = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| serde_json::from_str(b).unwrap_or(Value::Null))
        .unwrap_or(Value::Null);
    (status, json)
}

/// Waits (10 s at most) until process `pid` has exited and been reaped.
fn wait_gone(pid: u32) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        !s.rsplit(')')
            .next()
            .unwrap_or("")
            .trim_start()
            .starts_with('Z')
    }) {
        assert!(Instant::now() < deadline, "VMM {pid} outlived its release");
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// A `runv-pool serve` of this bench; SIGTERMed (and waited for) on drop.
struct Daemon {
    child: Child,
    sock: PathBuf,
}

impl Daemon {
    fn start(dir: &Path, shm: &Path) -> Self {
        let run = dir.join("run");
        let child = Command::new(release_bin("runv-pool"))
            .arg("serve")
            .arg("--state-dir")
            .arg(dir.join("state"))
            .arg("--run-dir")
            .arg(&run)
            .arg("--tmpfs-dir")
            .arg(shm)
            .arg("--vmm")
            .arg(vmm_bin())
            .args(
                std::env::var("RUNV_BENCH_NO_JAIL")
                    .is_ok_and(|v| v == "1")
                    .then_some("--no-jail"),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("starting runv-pool serve");
        let sock = run.join("pool.sock");
        let deadline = Instant::now() + Duration::from_secs(20);
        while UnixStream::connect(&sock).is_err() {
            assert!(Instant::now() < deadline, "the pool daemon did not listen");
            std::thread::sleep(Duration::from_millis(10));
        }
        Self { child, sock }
    }

    fn set_pool(&self, warm: usize) {
        let (status, body) = http(
            &self.sock,
            "PUT",
            "/v1/pools/counter",
            &json!({"warm": warm, "shells": 0, "max_sandboxes": 0}),
        );
        assert_eq!(status, 200, "{body}");
    }

    fn warm(&self) -> u64 {
        let (_, pools) = http(&self.sock, "GET", "/v1/pools", &Value::Null);
        pools[0]["warm"].as_u64().expect("a warm count")
    }

    fn wait_warm(&self, n: u64, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while self.warm() != n {
            assert!(
                Instant::now() < deadline,
                "the pool did not reach {n} warm clones"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// `POST /v1/sandboxes`, then the clone's first report; returns the latency, its id and
    /// its VMM's pid.
    fn acquire_timed(&self, every: Duration) -> (Duration, String, u32) {
        let start = Instant::now();
        let (status, sb) = http(
            &self.sock,
            "POST",
            "/v1/sandboxes",
            &json!({"template": "counter"}),
        );
        assert_eq!(status, 201, "{sb}");
        wait_report(
            Path::new(sb["debug_log"].as_str().expect("debug_log")),
            every,
        );
        let d = start.elapsed();
        assert_eq!(sb["tier"], "warm", "{sb}");
        let pid = sb["pid"].as_u64().expect("pid") as u32;
        (d, sb["id"].as_str().unwrap().to_string(), pid)
    }

    fn release(&self, id: &str) {
        let (status, body) = http(
            &self.sock,
            "DELETE",
            &format!("/v1/sandboxes/{id}"),
            &Value::Null,
        );
        assert_eq!(status, 204, "{body}");
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // SAFETY: kill(2) on the daemon this bench started; it shuts its pooled VMs down.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
    }
}

fn main() {
    if !pool_manager::warm::SUPPORTED {
        println!("SKIPPED: pool_api: this VMM build has no warm tier");
        return;
    }
    let mut c = criterion();
    let pid = std::process::id();
    let dir = std::env::temp_dir().join(format!("runv-bench-pool-api-{pid}"));
    let shm = PathBuf::from(format!("/dev/shm/runv-bench-pool-api-{pid}"));
    let daemon = Daemon::start(&dir, &shm);
    let (status, body) = http(
        &daemon.sock,
        "POST",
        "/v1/templates",
        &json!({
            "name": "counter",
            "kernel": test_guests::guest_path(),
            "cmdline": "rt.counter rt.idle",
            "mem_mib": 64,
            "vcpus": 1,
            "ready": "report",
            // What is measured is the pool; a template without disk slots keeps it comparable
            // with the library's figures (pool.rs).
            "slots": 0,
        }),
    );
    assert_eq!(status, 201, "building the template: {body}");

    daemon.set_pool(4);
    let mut p50 = Recorder::median("pool_acquire_warm_ms", "ms");
    let mut p99 = Recorder::p99("pool_acquire_warm_p99_ms", "ms");
    let one = || {
        daemon.wait_warm(4, Duration::from_secs(10));
        let (d, id, pid) = daemon.acquire_timed(Duration::from_micros(50));
        daemon.release(&id);
        // The released VMM is shut down in the background: let it go, as the refill of the
        // pool, before the next acquire is timed.
        wait_gone(pid);
        d
    };
    c.bench_function("pool_acquire_warm", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let d = one();
                p50.push_duration(d);
                p99.push_duration(d);
                total += d;
            }
            total
        })
    });
    benches::top_up(300, &mut p50, &mut p99, one);
    p50.write();
    p99.write();

    let mut burst = Recorder::p99("pool_burst_p99_ms", "ms");
    for _ in 0..3 {
        daemon.set_pool(50);
        daemon.wait_warm(50, Duration::from_secs(60));
        let barrier = std::sync::Barrier::new(50);
        let got: Vec<(Duration, String, u32)> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..50)
                .map(|_| {
                    s.spawn(|| {
                        barrier.wait();
                        // ≤ 1 ms added; 50 fast pollers would take the cores from the clones.
                        daemon.acquire_timed(Duration::from_millis(1))
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        daemon.set_pool(0);
        for (d, id, _) in got {
            burst.push_duration(d);
            daemon.release(&id);
        }
    }
    burst.write();

    c.final_summary();
    drop(daemon);
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_dir_all(&shm);
}
