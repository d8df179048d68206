//! `ctr run --rm` of a busybox image printing one line under a private containerd (Debian's 1.6),
//! runv's shim (`io.containerd.runv.v2`, **host sandbox backend**: no VM on this host) vs
//! `io.containerd.runc.v2`, alternating every iteration in the same run: `ctr_run_runv_ms` and
//! `ctr_run_runc_ms` (whole `ctr` invocation: shim start, create, start, output, exit, delete,
//! shim shutdown). Needs `containerd` (`bash scripts/setup.sh`) and root.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use benches::{criterion, release_bin, target_dir, Recorder};

const IMAGE: &str = "docker.io/runv/busybox:latest";
const NS: &str = "runv-bench";

struct Daemon {
    dir: PathBuf,
    child: Child,
}

impl Daemon {
    fn start(dir: &Path, shim: &Path, agent: &Path) -> Self {
        for s in ["root", "state", "bin"] {
            std::fs::create_dir_all(dir.join(s)).unwrap();
        }
        let _ = std::os::unix::fs::symlink(shim, dir.join("bin/containerd-shim-runv-v2"));
        std::fs::write(
            dir.join("config.toml"),
            format!(
                "version = 2\nroot = \"{0}/root\"\nstate = \"{0}/state\"\n\
                 disabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n\
                 [grpc]\n  address = \"{0}/ctd.sock\"\n[ttrpc]\n  address = \"{0}/ctd.sock.ttrpc\"\n",
                dir.display()
            ),
        )
        .unwrap();
        let path = format!(
            "{}:{}",
            dir.join("bin").display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let child = Command::new("containerd")
            .arg("--config")
            .arg(dir.join("config.toml"))
            .env("PATH", path)
            .env("RUNV_SANDBOX", "host")
            .env("RUNV_AGENT", agent)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("containerd is not installed: apt-get install -y containerd (bash scripts/setup.sh)");
        let d = Daemon {
            dir: dir.into(),
            child,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while !d.ctr(&["version"]).status().unwrap().success() {
            assert!(Instant::now() < deadline, "containerd did not come up");
            std::thread::sleep(Duration::from_millis(100));
        }
        d
    }

    fn ctr(&self, args: &[&str]) -> Command {
        let mut c = Command::new("ctr");
        c.arg("--address")
            .arg(self.dir.join("ctd.sock"))
            .args(["--namespace", NS])
            .args(args)
            .stdin(Stdio::null())
            .stderr(Stdio::null());
        c
    }

    /// One timed `ctr run --rm` printing one line.
    fn run(&self, runtime: &str, id: &str) -> Duration {
        let t0 = Instant::now();
        let out = self
            .ctr(&[
                "run",
                "--rm",
                "--runtime",
                runtime,
                IMAGE,
                id,
                "echo",
                "hello",
            ])
            .output()
            .unwrap();
        let d = t0.elapsed();
        assert!(
            out.status.success() && out.stdout == b"hello\n",
            "ctr run --runtime {runtime} failed: {:?}",
            out
        );
        d
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // SAFETY: SIGTERM to the containerd this bench started.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
        let root = self.dir.join("root").display().to_string();
        let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        for m in mounts.lines().filter_map(|l| l.split(' ').nth(4)) {
            if m.starts_with(&root) {
                let _ = Command::new("umount").args(["-l", m]).status();
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn main() {
    let mut c = criterion();
    let shim = release_bin("containerd-shim-runv-v2");
    let agent = target_dir().join("static/x86_64-unknown-linux-gnu/release/runv-agent");
    assert!(
        agent.exists(),
        "{} missing: run scripts/build-agent.sh (perf-ci/run does)",
        agent.display()
    );
    let dir = PathBuf::from(format!("/tmp/runv-bench-ctr-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let d = Daemon::start(&dir, &shim, &agent);
    let tar = dir.join("busybox.tar");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/busybox-oci.sh");
    assert!(Command::new("bash")
        .arg(script)
        .arg(&tar)
        .arg(IMAGE)
        .status()
        .unwrap()
        .success());
    assert!(d
        .ctr(&["image", "import", tar.to_str().unwrap()])
        .stdout(Stdio::null())
        .status()
        .unwrap()
        .success());
    let mut runv = Recorder::median("ctr_run_runv_ms", "ms");
    let mut runc = Recorder::median("ctr_run_runc_ms", "ms");
    let mut n = 0u32;
    c.bench_function("ctr_run_runv", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                n += 1;
                let v = d.run("io.containerd.runv.v2", &format!("v{n}"));
                runv.push_duration(v);
                total += v;
                runc.push_duration(d.run("io.containerd.runc.v2", &format!("c{n}")));
            }
            total
        })
    });
    runv.write();
    runc.write();
    c.final_summary();
}
