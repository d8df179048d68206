//! Container start through the OCI CLIs, runv (host sandbox) vs runc, same busybox bundle, same
//! run: `runv_host_start_ms` (`runv create` + `runv start` → first stdout byte of `echo`, which
//! includes starting the monitor and the container's own `runv-agent`) and `runc_start_ms`
//! (`runc create` + `runc start` → first stdout byte), alternating every iteration.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use benches::{criterion, release_bin, target_dir, Recorder};

/// A busybox bundle running `echo hello`, with a /dev tmpfs as runc's default spec has.
fn bundle(dir: &Path) {
    let rootfs = dir.join("rootfs");
    for d in ["bin", "proc", "dev", "sys", "tmp", "etc"] {
        std::fs::create_dir_all(rootfs.join(d)).unwrap();
    }
    std::fs::copy("/bin/busybox", rootfs.join("bin/busybox"))
        .expect("/bin/busybox (apt-get install busybox-static)");
    for a in ["sh", "echo"] {
        let _ = std::os::unix::fs::symlink("busybox", rootfs.join("bin").join(a));
    }
    let config = serde_json::json!({
        "ociVersion": "1.0.2",
        "process": {"terminal": false, "user": {"uid": 0, "gid": 0}, "args": ["echo", "hello"],
                    "env": ["PATH=/bin"], "cwd": "/"},
        "root": {"path": "rootfs", "readonly": false},
        "hostname": "bench",
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
             "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]}
        ],
        "linux": {"namespaces": [{"type": "pid"}, {"type": "ipc"}, {"type": "uts"},
                                 {"type": "mount"}]}
    });
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
}

/// `create` + `start` of `id` with `bin` → first byte on the inherited stdout; then waits for the
/// exit and deletes the container (not timed).
fn start(bin: &Path, global: &[&str], bundle: &Path, id: &str) -> Duration {
    let t0 = Instant::now();
    let mut create = Command::new(bin)
        .args(global)
        .args(["create", "--bundle"])
        .arg(bundle)
        .arg(id)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // The container (runc) or its monitor (runv) keeps the pipe's write end.
    let mut r = create.stdout.take().unwrap();
    let st = create.wait().unwrap();
    assert!(st.success(), "{} create failed", bin.display());
    let st = Command::new(bin)
        .args(global)
        .args(["start", id])
        .status()
        .unwrap();
    assert!(st.success(), "{} start failed", bin.display());
    let mut b = [0u8; 1];
    r.read_exact(&mut b).unwrap();
    let d = t0.elapsed();
    // EOF once the container (runc) or its monitor (runv) is gone.
    let mut rest = Vec::new();
    let _ = r.read_to_end(&mut rest);
    let st = Command::new(bin)
        .args(global)
        .args(["delete", "--force", id])
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert!(st.success(), "{} delete failed", bin.display());
    d
}

/// One CLI under test.
struct Runtime<'a> {
    bin: &'a Path,
    global: &'a [&'a str],
    rec: Recorder,
}

/// Alternates runv and runc every iteration, so that load from other processes on the host
/// falls on both alike; criterion reports the runv time.
fn measure<'a>(
    c: &mut criterion::Criterion,
    runv: &mut Runtime<'a>,
    runc: &mut Runtime<'a>,
    bundle: &Path,
) {
    let mut n = 0u32;
    c.bench_function("runv_host_start", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                for (i, rt) in [&mut *runv, &mut *runc].into_iter().enumerate() {
                    n += 1;
                    let id = format!("bench-{}-{n}", std::process::id());
                    let d = start(rt.bin, rt.global, bundle, &id);
                    rt.rec.push_duration(d);
                    if i == 0 {
                        total += d;
                    }
                }
            }
            total
        })
    });
}

fn main() {
    let mut c = criterion();
    let dir = std::env::temp_dir().join(format!("runv-bench-cli-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    bundle(&dir);
    let runv = release_bin("runv");
    let agent: PathBuf = target_dir().join("static/x86_64-unknown-linux-gnu/release/runv-agent");
    assert!(
        agent.exists(),
        "{} missing: run scripts/build-agent.sh (perf-ci/run does)",
        agent.display()
    );
    std::env::set_var("RUNV_AGENT", &agent);
    let runv_root = dir.join("runv-state");
    let runc_root = dir.join("runc-state");
    let runv_global = ["--root", runv_root.to_str().unwrap(), "--sandbox", "host"];
    let runc_global = ["--root", runc_root.to_str().unwrap()];
    let mut runv = Runtime {
        bin: &runv,
        global: &runv_global,
        rec: Recorder::median("runv_host_start_ms", "ms"),
    };
    let mut runc = Runtime {
        bin: Path::new("runc"),
        global: &runc_global,
        rec: Recorder::median("runc_start_ms", "ms"),
    };
    measure(&mut c, &mut runv, &mut runc, &dir);
    runv.rec.write();
    runc.rec.write();
    c.final_summary();
    let _ = std::fs::remove_dir_all(&dir);
}
