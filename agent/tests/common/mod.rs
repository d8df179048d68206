//! Fixtures of the agent tests: a busybox OCI rootfs from Debian's busybox-static, a running
//! `runv-agent`, and spec builders.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use protocol::client::Client;
use protocol::{ExitStatus, Request, Response, RootfsSource, StdioConfig};

/// Busybox applets linked into the rootfs.
const APPLETS: &[&str] = &[
    "sh", "echo", "cat", "sleep", "hostname", "env", "ls", "mount", "head", "tr", "tty", "id",
    "touch", "true", "false", "ps", "grep", "wc", "dd", "yes", "stat", "mkdir", "rm",
];

/// A busybox root file system, built once per test binary. Returns None (after a loud SKIPPED
/// line) when busybox-static is not installed or we are not root.
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
            .join(format!("busybox-rootfs-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        for d in ["bin", "proc", "dev", "sys", "tmp", "etc", "data", "host"] {
            std::fs::create_dir_all(dir.join(d)).unwrap();
        }
        std::fs::copy(busybox, dir.join("bin/busybox")).unwrap();
        for a in APPLETS {
            std::os::unix::fs::symlink("busybox", dir.join("bin").join(a)).unwrap();
        }
        std::fs::write(
            dir.join("etc/passwd"),
            "root:x:0:0:root:/:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/sh\n",
        )
        .unwrap();
        std::fs::write(dir.join("etc/group"), "root:x:0:\nnogroup:x:65534:\n").unwrap();
        Some(dir)
    });
    if r.is_none() {
        println!("SKIPPED: {test}: /bin/busybox missing (apt-get install busybox-static)");
    }
    r.clone()
}

/// A running agent on a Unix socket; killed and cleaned up on drop.
pub struct Agent {
    pub child: Child,
    pub socket: PathBuf,
    pub dir: tempfile::TempDir,
    pub group: String,
}

impl Agent {
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    /// An agent with extra command-line arguments.
    pub fn start_with(extra: &[&str]) -> Self {
        Self::start_from(Command::new(env!("CARGO_BIN_EXE_runv-agent")), extra)
    }

    /// An agent started the way a shell's background job or `nohup` starts one: SIGHUP,
    /// SIGINT and SIGQUIT ignored (`trap ''`), dispositions that execve keeps.
    #[allow(dead_code)] // not every test binary uses it
    pub fn start_ignoring_signals() -> Self {
        let mut sh = Command::new("sh");
        sh.args(["-c", "trap '' HUP INT QUIT; exec \"$0\" \"$@\""])
            .arg(env!("CARGO_BIN_EXE_runv-agent"));
        Self::start_from(sh, &[])
    }

    fn start_from(mut cmd: Command, extra: &[&str]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("agent.sock");
        let group = format!("runv-test-{}-{}", std::process::id(), rand_suffix());
        let child = cmd
            .arg("--listen")
            .arg(format!("unix:{}", socket.display()))
            .arg("--state-dir")
            .arg(dir.path().join("state"))
            .args(["--cgroup-group", &group])
            .args(extra)
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        // The socket file appears at bind(2), before listen(2): wait until a connect succeeds.
        while std::os::unix::net::UnixStream::connect(&socket).is_err() {
            assert!(Instant::now() < deadline, "agent did not listen");
            std::thread::sleep(Duration::from_millis(2));
        }
        Self {
            child,
            socket,
            dir,
            group,
        }
    }

    pub fn client(&self) -> Client {
        Client::connect(&self.socket).unwrap()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

/// The agent's parent cgroup directories that exist.
pub fn group_dirs(group: &str) -> Vec<PathBuf> {
    ["", "memory", "pids", "cpu", "freezer"]
        .iter()
        .map(|c| Path::new("/sys/fs/cgroup").join(c).join(group))
        .filter(|p| p.exists())
        .collect()
}

impl Drop for Agent {
    fn drop(&mut self) {
        // SAFETY: kill(2) on our child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
    }
}

fn rand_suffix() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(1);
    h.finish() % 1_000_000
}

/// The busybox rootfs, a started agent and a client of it; None when the test must skip.
pub fn setup(test: &str) -> Option<(PathBuf, Agent, Client)> {
    let root = rootfs(test)?;
    let agent = Agent::start();
    let client = agent.client();
    Some((root, agent, client))
}

/// A spec running `args` in a rootfs (path in the RootfsSource), writable root.
pub fn spec(args: &[&str]) -> oci_spec::runtime::Spec {
    let mut s = oci_spec::runtime::Spec::default();
    let mut p = s.process().clone().unwrap();
    p.set_args(Some(args.iter().map(|a| a.to_string()).collect()));
    p.set_terminal(Some(false));
    s.set_process(Some(p));
    let mut root = s.root().clone().unwrap();
    root.set_readonly(Some(false));
    s.set_root(Some(root));
    s
}

/// Creates and starts container `id`; returns (stdout stream, stderr stream, stdin stream).
pub fn launch(
    c: &mut Client,
    id: &str,
    spec: oci_spec::runtime::Spec,
    root: &Path,
    stdio: StdioConfig,
) -> protocol::Streams {
    let rootfs = RootfsSource::Bind {
        path: root.display().to_string(),
    };
    launch_from(c, id, spec, rootfs, stdio)
}

/// Creates and starts container `id` with root file system `rootfs`.
pub fn launch_from(
    c: &mut Client,
    id: &str,
    spec: oci_spec::runtime::Spec,
    rootfs: RootfsSource,
    stdio: StdioConfig,
) -> protocol::Streams {
    let r = c
        .call(&Request::Create {
            id: id.into(),
            spec: Box::new(spec),
            rootfs,
            stdio,
        })
        .unwrap();
    let Response::Created { streams, .. } = r else {
        panic!("create {id}: {r:?}")
    };
    let r = c.call(&Request::Start { id: id.into() }).unwrap();
    assert!(matches!(r, Response::Started { .. }), "start {id}: {r:?}");
    streams
}

/// Waits for the container's exit.
pub fn wait(c: &mut Client, id: &str) -> ExitStatus {
    match c
        .call(&Request::Wait {
            id: id.into(),
            exec_id: None,
        })
        .unwrap()
    {
        Response::Exited { status, .. } => status,
        r => panic!("wait {id}: {r:?}"),
    }
}

/// Runs `args` to completion: (stdout, stderr, exit), then destroys the container.
pub fn run(
    c: &mut Client,
    id: &str,
    spec: oci_spec::runtime::Spec,
    root: &Path,
) -> (String, String, ExitStatus) {
    let rootfs = RootfsSource::Bind {
        path: root.display().to_string(),
    };
    run_from(c, id, spec, rootfs)
}

/// [`run`] with root file system `rootfs`.
pub fn run_from(
    c: &mut Client,
    id: &str,
    spec: oci_spec::runtime::Spec,
    rootfs: RootfsSource,
) -> (String, String, ExitStatus) {
    let s = launch_from(c, id, spec, rootfs, StdioConfig::default());
    let status = wait(c, id);
    let out = c.read_to_close(s.stdout, Duration::from_secs(10)).unwrap();
    let err = c
        .read_to_close(s.stderr.unwrap(), Duration::from_secs(10))
        .unwrap();
    let r = c.call(&Request::Destroy { id: id.into() }).unwrap();
    assert_eq!(r, Response::Ok, "destroy {id}");
    (
        String::from_utf8_lossy(&out).into(),
        String::from_utf8_lossy(&err).into(),
        status,
    )
}
