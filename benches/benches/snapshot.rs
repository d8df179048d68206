//! Snapshot and restore benchmarks: `snapshot_create_ms` (256 MiB guest, mostly zero),
//! `restore_copy_ms` / `restore_cow_ms` (process start of `runv-vmm --restore` → the guest's
//! first report after resume), `clones_per_second` (sequential restores, each to its report).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use benches::{criterion, release_bin, Recorder};

struct Template {
    child: Child,
    control: UnixStream,
    replies: BufReader<UnixStream>,
}

impl Template {
    fn boot(dir: &Path) -> Self {
        let sock = dir.join("template.sock");
        let mut child = Command::new(release_bin("runv-vmm"))
            .arg("--kernel")
            .arg(test_guests::guest_path())
            .args(["--mem-mib", "256", "--serial", "none", "--debug-log", "-"])
            .args(["--cmdline", "rt.counter"])
            .arg("--control")
            .arg(&sock)
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawning runv-vmm");
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        while !line.contains("counter_started") {
            line.clear();
            assert!(out.read_line(&mut line).unwrap() > 0, "template died");
        }
        let control = UnixStream::connect(&sock).unwrap();
        let replies = BufReader::new(control.try_clone().unwrap());
        Self {
            child,
            control,
            replies,
        }
    }

    fn request(&mut self, req: &str) -> String {
        writeln!(self.control, "{req}").unwrap();
        let mut line = String::new();
        self.replies.read_line(&mut line).unwrap();
        assert!(line.contains(r#""ok":true"#), "{req}: {line}");
        line
    }
}

impl Drop for Template {
    fn drop(&mut self) {
        let _ = writeln!(self.control, r#"{{"cmd":"shutdown"}}"#);
        let _ = self.child.wait();
    }
}

fn restore_once(snap: &Path, mode: &str) -> Duration {
    let start = Instant::now();
    let mut child = Command::new(release_bin("runv-vmm"))
        .arg("--restore")
        .arg(snap)
        .args([
            "--mem-mode",
            mode,
            "--clone-id",
            "bench",
            "--serial",
            "none",
        ])
        .args(["--debug-log", "-"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    let elapsed = start.elapsed();
    assert!(line.starts_with("REPORT PASS resumed"), "{mode}: {line:?}");
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    assert!(child.wait().unwrap().success());
    elapsed
}

fn main() {
    let mut c = criterion();
    let dir = std::env::temp_dir().join(format!("runv-bench-snap-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut template = Template::boot(&dir);
    let mut create = Recorder::median("snapshot_create_ms", "ms");
    let mut n = 0;
    let mut snap = PathBuf::new();
    c.bench_function("snapshot_create", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                snap = dir.join(format!("snap-{}", n % 2));
                n += 1;
                std::fs::create_dir_all(&snap).unwrap();
                let start = Instant::now();
                template.request(&format!(
                    r#"{{"cmd":"snapshot","dir":"{}"}}"#,
                    snap.display()
                ));
                let d = start.elapsed();
                template.request(r#"{"cmd":"resume"}"#);
                create.push_duration(d);
                total += d;
            }
            total
        })
    });
    create.write();
    drop(template);

    for mode in ["copy", "cow"] {
        let mut rec = Recorder::median(&format!("restore_{mode}_ms"), "ms");
        c.bench_function(&format!("restore_{mode}"), |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let d = restore_once(&snap, mode);
                    rec.push_duration(d);
                    total += d;
                }
                total
            })
        });
        rec.write();
    }

    let mut rate = Recorder::median("clones_per_second", "per_s");
    for _ in 0..3 {
        let start = Instant::now();
        for _ in 0..20 {
            restore_once(&snap, "cow");
        }
        rate.push(20.0 / start.elapsed().as_secs_f64());
    }
    rate.write();
    c.final_summary();
    let _ = std::fs::remove_dir_all(&dir);
}
