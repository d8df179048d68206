//! VMM benchmarks: `vmm_boot_to_guest` (process start → the test guest's first report),
//! `vsock_roundtrip` (64-byte echo through virtio-vsock) and the VMM's resident memory.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Child, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use benches::{criterion, rss_mib, vmm_bin, Recorder};

/// A `runv-vmm` running the test guest with the debug log on stdout.
struct Guest {
    child: Child,
    reports: BufReader<ChildStdout>,
}

impl Guest {
    fn spawn(cmdline: &str, extra: &[&str]) -> Self {
        let mut child = Command::new(vmm_bin())
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

fn connect_vsock(uds: &Path, port: u32) -> UnixStream {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut s = loop {
        match UnixStream::connect(uds) {
            Ok(s) => break s,
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(5)),
            Err(e) => panic!("connecting to {}: {e}", uds.display()),
        }
    };
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    writeln!(s, "CONNECT {port}").unwrap();
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    while b[0] != b'\n' {
        s.read_exact(&mut b).expect("reading CONNECT reply");
        line.push(b[0]);
    }
    assert!(line.starts_with(b"OK "), "CONNECT refused: {line:?}");
    s
}

fn vsock_roundtrip(c: &mut criterion::Criterion) {
    let dir = std::env::temp_dir().join(format!("runv-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let uds = dir.join("vsock.sock");
    let vsock = format!("cid=3,uds={}", uds.display());
    let mut g = Guest::spawn(
        "rt.vsock_listen=5000 rt.exit=reset",
        &["--vsock", vsock.as_str()],
    );
    g.wait_report("READY");
    let mut s = connect_vsock(&uds, 5000);
    let mut rec = Recorder::median("vsock_roundtrip_us", "us");
    let msg = [0x5au8; 64];
    let mut back = [0u8; 64];
    c.bench_function("vsock_roundtrip", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let start = Instant::now();
                s.write_all(&msg).unwrap();
                s.read_exact(&mut back).unwrap();
                let d = start.elapsed();
                assert_eq!(back, msg);
                rec.push_duration(d);
                total += d;
            }
            total
        })
    });
    rec.write();
    s.shutdown(std::net::Shutdown::Both).unwrap();
    g.wait_report("PASS vsock_listen");
    g.wait_clean_exit();
    let _ = std::fs::remove_dir_all(&dir);
}

fn main() {
    let mut c = criterion();
    boot_to_guest(&mut c);
    vsock_roundtrip(&mut c);
    vmm_rss(&mut c);
    c.final_summary();
}
