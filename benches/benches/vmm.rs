//! VMM benchmarks: `vmm_boot_to_guest` (process start → the test guest's first report) and the
//! VMM's resident memory with a 128 MiB guest booted.

use std::io::{BufRead, BufReader};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use benches::{criterion, release_bin, rss_mib, Recorder};

/// A `runv-vmm` running the test guest with the debug log on stdout.
struct Guest {
    child: Child,
    reports: BufReader<ChildStdout>,
}

impl Guest {
    fn spawn(cmdline: &str, extra: &[&str]) -> Self {
        let mut child = Command::new(release_bin("runv-vmm"))
            .arg("--kernel")
            .arg(test_guests::guest_path())
            .args(["--mem-mib", "128", "--serial", "none", "--debug-log", "-"])
            .args(["--cmdline", cmdline])
            .args(extra)
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawning runv-vmm");
        let reports = BufReader::new(child.stdout.take().expect("piped stdout"));
        Self { child, reports }
    }

    /// Reads debug reports until one starts with `prefix`; panics on a FAIL report or EOF.
    fn wait_report(&mut self, prefix: &str) -> String {
        let mut line = String::new();
        loop {
            line.clear();
            let n = self.reports.read_line(&mut line).expect("reading reports");
            assert!(n > 0, "runv-vmm exited before reporting {prefix:?}");
            if let Some(r) = line.trim_end().strip_prefix("REPORT ") {
                assert!(!r.starts_with("FAIL"), "guest failed: {r}");
                if r.starts_with(prefix) {
                    return r.to_string();
                }
            }
        }
    }

    /// Waits for the VMM to exit by itself and checks it exited cleanly.
    fn wait_clean_exit(mut self) {
        let status = self.child.wait().expect("waiting for runv-vmm");
        assert!(status.success(), "runv-vmm exited with {status}");
    }

    fn terminate(mut self) {
        // SAFETY: plain kill(2) on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let status = self.child.wait().expect("waiting for runv-vmm");
        assert!(
            status.success(),
            "runv-vmm exited with {status} after SIGTERM"
        );
    }
}

fn boot_to_guest(c: &mut criterion::Criterion) {
    let mut rec = Recorder::median("vmm_boot_to_guest_ms", "ms");
    c.bench_function("vmm_boot_to_guest", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let start = Instant::now();
                let mut g = Guest::spawn("rt.exit=reset", &[]);
                g.wait_report("READY");
                let d = start.elapsed();
                rec.push_duration(d);
                total += d;
                g.wait_clean_exit();
            }
            total
        })
    });
    rec.write();
}

fn vmm_rss(_: &mut criterion::Criterion) {
    let mut rec = Recorder::median("vmm_rss_mib", "MiB");
    for _ in 0..5 {
        let mut g = Guest::spawn("rt.exit=halt", &[]);
        g.wait_report("READY");
        // Let the VMM settle (device thread, first serial/debug writes) before reading RSS.
        std::thread::sleep(Duration::from_millis(50));
        rec.push(rss_mib(g.child.id()).expect("reading VMM RSS"));
        g.terminate();
    }
    eprintln!("vmm_rss_mib samples: {:?}", rec.samples());
    rec.write();
}

fn main() {
    let mut c = criterion();
    boot_to_guest(&mut c);
    vmm_rss(&mut c);
    c.final_summary();
}
