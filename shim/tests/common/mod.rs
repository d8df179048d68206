//! Fixtures of the runv tests: a busybox rootfs from Debian's busybox-static, the static agent
//! (built by scripts/build-agent.sh), bundles, a private `--root`, and runv invocations with the
//! host sandbox. Every container a test leaves is force-deleted on drop.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Busybox applets linked into the rootfs.
const APPLETS: &[&str] = &["sh", "echo", "cat", "sleep", "true", "false", "ps", "tty"];

/// The static agent: `$RUNV_AGENT`, or built with scripts/build-agent.sh (once per binary).
pub fn agent() -> PathBuf {
    static AGENT: OnceLock<PathBuf> = OnceLock::new();
    AGENT
        .get_or_init(|| {
            if let Some(p) = std::env::var_os("RUNV_AGENT") {
                return PathBuf::from(p);
            }
            let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/build-agent.sh");
            let out = Command::new("bash").arg(script).output().unwrap();
            assert!(
                out.status.success(),
                "build-agent.sh: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
        })
        .clone()
}

/// The busybox rootfs (None, after a loud SKIPPED line, without root or busybox-static).
pub fn rootfs(test: &str) -> Option<PathBuf> {
    static ROOT: OnceLock<Option<PathBuf>> = OnceLock::new();
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        println!("SKIPPED: {test}: needs root (namespaces, mounts, cgroups)");
        return None;
    }
    let r = ROOT.get_or_init(|| {
        let busybox = Path::new("/bin/busybox");
        if !busybox.exists() {
            return None;
        }
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("runv-rootfs-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        for d in ["bin", "proc", "dev", "sys", "tmp", "etc"] {
            std::fs::create_dir_all(dir.join(d)).unwrap();
        }
        std::fs::copy(busybox, dir.join("bin/busybox")).unwrap();
        for a in APPLETS {
            std::os::unix::fs::symlink("busybox", dir.join("bin").join(a)).unwrap();
        }
        Some(dir)
    });
    if r.is_none() {
        println!("SKIPPED: {test}: /bin/busybox missing (apt-get install busybox-static)");
    }
    r.clone()
}

/// A private runv root and bundle directory.
pub struct Env {
    /// `--root`.
    pub root: tempfile::TempDir,
    /// Scratch directory (bundles, output files, sockets).
    pub dir: tempfile::TempDir,
    /// The rootfs.
    pub rootfs: PathBuf,
    /// Id prefix unique to this test process and env.
    pub prefix: String,
}

static SEQ: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

impl Env {
    /// None when the test must skip.
    pub fn new(test: &str) -> Option<Self> {
        let rootfs = rootfs(test)?;
        agent();
        let n = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Some(Self {
            root: tempfile::tempdir().unwrap(),
            dir: tempfile::tempdir().unwrap(),
            rootfs,
            prefix: format!("t{}-{n}", std::process::id()),
        })
    }

    /// A unique container id.
    pub fn id(&self, name: &str) -> String {
        format!("{}-{name}", self.prefix)
    }

    /// A bundle running `args`; returns its directory.
    pub fn bundle(&self, name: &str, args: &[&str], terminal: bool) -> PathBuf {
        let b = self.dir.path().join(format!("bundle-{name}"));
        std::fs::create_dir_all(&b).unwrap();
        let config = serde_json::json!({
            "ociVersion": "1.2.0",
            "process": {
                "terminal": terminal,
                "user": {"uid": 0, "gid": 0},
                "args": args,
                "env": ["PATH=/bin", "TERM=xterm"],
                "cwd": "/"
            },
            "root": {"path": self.rootfs, "readonly": false},
            "hostname": "runv-test",
            "annotations": {"org.example.test": "yes"},
            "mounts": [
                {"destination": "/proc", "type": "proc", "source": "proc"},
                {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
                 "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]}
            ],
            "linux": {"namespaces": [{"type": "pid"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"}]}
        });
        std::fs::write(b.join("config.json"), config.to_string()).unwrap();
        b
    }

    /// `runv --root R --sandbox host ARGS` (stdin from /dev/null).
    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_runv"));
        c.arg("--root")
            .arg(self.root.path())
            .args(["--sandbox", "host"])
            .args(args)
            .env("RUNV_AGENT", agent())
            .stdin(Stdio::null());
        c
    }

    /// Runs a command that leaves no process holding its stdio.
    pub fn runv(&self, args: &[&str]) -> Output {
        let mut c = self.cmd(args);
        run_bounded(&mut c)
    }

    /// Runs a command whose stdout/stderr go to files (create, run -d: the monitor keeps them);
    /// returns (status, stdout file, stderr file).
    pub fn runv_to_files(
        &self,
        args: &[&str],
        tag: &str,
    ) -> (std::process::ExitStatus, PathBuf, PathBuf) {
        let out = self.dir.path().join(format!("{tag}.out"));
        let err = self.dir.path().join(format!("{tag}.err"));
        let mut c = self.cmd(args);
        c.stdout(std::fs::File::create(&out).unwrap())
            .stderr(std::fs::File::create(&err).unwrap());
        let status = wait_bounded(c.spawn().unwrap(), Duration::from_secs(20));
        (status, out, err)
    }

    /// `runv state ID` as JSON.
    pub fn state(&self, id: &str) -> serde_json::Value {
        let o = self.runv(&["state", id]);
        assert!(
            o.status.success(),
            "state {id}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        serde_json::from_slice(&o.stdout).unwrap()
    }

    /// Waits (10 s at most) until the container exists and its status is `want`.
    pub fn wait_status(&self, id: &str, want: &str) -> serde_json::Value {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let o = self.runv(&["state", id]);
            let s: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap_or_default();
            if s["status"] == want {
                return s;
            }
            assert!(Instant::now() < deadline, "{id} never became {want}: {s}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Container directories left under the root.
    pub fn left(&self) -> Vec<String> {
        std::fs::read_dir(self.root.path())
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default()
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        for id in self.left() {
            let _ = self.runv(&["delete", "--force", &id]);
        }
    }
}

/// Waits for a child, killing it after `limit`.
pub fn wait_bounded(child: std::process::Child, limit: Duration) -> std::process::ExitStatus {
    wait_bounded_as(child, limit, "runv")
}

/// [`wait_bounded`] naming the command in the failure.
pub fn wait_bounded_as(
    mut child: std::process::Child,
    limit: Duration,
    what: &str,
) -> std::process::ExitStatus {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            panic!("{what} did not finish within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// `Command::output` with a 20 s bound (the command is killed after it).
pub fn run_bounded(c: &mut Command) -> Output {
    use std::io::Read;
    let mut child = c
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut so = child.stdout.take().unwrap();
    let mut se = child.stderr.take().unwrap();
    let t1 = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = so.read_to_end(&mut v);
        v
    });
    let t2 = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = se.read_to_end(&mut v);
        v
    });
    let status = wait_bounded_as(child, Duration::from_secs(20), &format!("{c:?}"));
    Output {
        status,
        stdout: t1.join().unwrap(),
        stderr: t2.join().unwrap(),
    }
}

/// Host processes whose command line mentions `needle`.
pub fn processes_mentioning(needle: &str) -> Vec<String> {
    let mut found = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        if !e
            .file_name()
            .to_string_lossy()
            .bytes()
            .all(|b| b.is_ascii_digit())
        {
            continue;
        }
        if let Ok(c) = std::fs::read(e.path().join("cmdline")) {
            let c = String::from_utf8_lossy(&c).replace('\0', " ");
            if c.contains(needle) {
                found.push(format!("{}: {c}", e.file_name().to_string_lossy()));
            }
        }
    }
    found
}

/// Reads a file until it contains `want` (10 s at most); returns its text.
pub fn wait_file_contains(path: &Path, want: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let t = std::fs::read_to_string(path).unwrap_or_default();
        if t.contains(want) {
            return t;
        }
        assert!(
            Instant::now() < deadline,
            "{} never contained {want:?}: {t:?}",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Whether `pid` is gone (or a zombie nobody reaped yet: this host's init may be slow to).
pub fn gone(pid: i64) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => s
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.trim_start().chars().next())
            .is_some_and(|c| c == 'Z' || c == 'X'),
        Err(_) => true,
    }
}

/// `runv-vmm`: `$RUNV_VMM`, else built into the workspace target dir on first use (shim must
/// not depend on the vmm crate).
pub fn vmm() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(p) = std::env::var_os("RUNV_VMM") {
            return PathBuf::from(p);
        }
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let st = Command::new(cargo)
            .args(["build", "-q", "-p", "vmm", "--bin", "runv-vmm"])
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .status()
            .unwrap();
        assert!(st.success(), "cargo build -p vmm --bin runv-vmm failed");
        let target = std::env::var_os("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"));
        target.join("debug/runv-vmm")
    })
    .clone()
}
