//! `containerd-shim-runv-v2` under a real containerd (Debian's 1.6), side by side with
//! `io.containerd.runc.v2`: every test starts its own containerd with a private root, state,
//! socket and config in a temporary directory, imports a busybox OCI image built from
//! busybox-static (`scripts/busybox-oci.sh`), drives it with `ctr`, and stops it afterwards.
//! The runv shim runs the host sandbox backend (`RUNV_SANDBOX=host` in containerd's environment),
//! except in the vm backend's test (`RUNV_SANDBOX=vm`, a test-guest template in an embedded pool).

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const IMAGE: &str = "docker.io/runv/busybox:latest";
const RUNV: &str = "io.containerd.runv.v2";
const RUNC: &str = "io.containerd.runc.v2";
const NS: &str = "runv-e2e";

/// A private containerd, stopped (and its directories removed) on drop.
struct Containerd {
    dir: tempfile::TempDir,
    daemon: Child,
    /// One containerd test at a time: each counts the shims, agents, mounts and cgroups of the
    /// whole host, so a concurrent test's would look like a leak.
    _serial: std::sync::MutexGuard<'static, ()>,
}

static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn need(bin: &str) {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(bin).is_file()))
        .unwrap_or(false);
    assert!(
        found,
        "{bin} is not installed: these tests need Debian's containerd (`apt-get install -y containerd`, \
         or `bash scripts/setup.sh`)"
    );
}

fn shim_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_containerd-shim-runv-v2"))
}

impl Containerd {
    fn start() -> Self {
        Self::start_with(&[
            ("RUNV_SANDBOX", "host".into()),
            ("RUNV_AGENT", common::agent()),
        ])
    }

    /// A containerd whose shims get `env`.
    fn start_with(env: &[(&str, PathBuf)]) -> Self {
        let serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
        for b in ["containerd", "ctr", "containerd-shim-runc-v2", "runc"] {
            need(b);
        }
        // SAFETY: geteuid has no preconditions.
        assert_eq!(unsafe { libc::geteuid() }, 0, "containerd tests need root");
        let dir = tempfile::Builder::new()
            .prefix("runv-ctd-")
            .tempdir_in("/tmp")
            .unwrap();
        let d = dir.path();
        for s in ["root", "state", "bin"] {
            std::fs::create_dir_all(d.join(s)).unwrap();
        }
        std::os::unix::fs::symlink(shim_bin(), d.join("bin/containerd-shim-runv-v2")).unwrap();
        let config = format!(
            "version = 2\nroot = \"{0}/root\"\nstate = \"{0}/state\"\n\
             disabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n\
             [grpc]\n  address = \"{0}/ctd.sock\"\n[ttrpc]\n  address = \"{0}/ctd.sock.ttrpc\"\n",
            d.display()
        );
        std::fs::write(d.join("config.toml"), config).unwrap();
        let path = format!(
            "{}:{}",
            d.join("bin").display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let log = std::fs::File::create(d.join("containerd.log")).unwrap();
        let daemon = Command::new("containerd")
            .arg("--config")
            .arg(d.join("config.toml"))
            .env("PATH", path)
            .envs(env.iter().map(|(k, v)| (*k, v.as_os_str())))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("starting containerd");
        let c = Containerd {
            dir,
            daemon,
            _serial: serial,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while !c.ctr(&["version"]).status.success() {
            assert!(
                Instant::now() < deadline,
                "containerd did not come up: {}",
                c.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        let tar = c.dir.path().join("busybox.tar");
        let st = Command::new("bash")
            .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/busybox-oci.sh"))
            .arg(&tar)
            .arg(IMAGE)
            .status()
            .unwrap();
        assert!(st.success(), "building the busybox OCI image");
        let out = c.ctr(&["image", "import", tar.to_str().unwrap()]);
        assert!(
            out.status.success(),
            "ctr image import: {}",
            text(&out.stderr)
        );
        c
    }

    fn sock(&self) -> PathBuf {
        self.dir.path().join("ctd.sock")
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("containerd.log")).unwrap_or_default()
    }

    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new("ctr");
        c.arg("--address")
            .arg(self.sock())
            .args(["--namespace", NS])
            .args(args);
        c.stdin(Stdio::null());
        c
    }

    fn ctr(&self, args: &[&str]) -> Output {
        common::run_bounded(&mut self.cmd(args))
    }

    /// `ctr run --rm --runtime RT IMAGE ID ARGS...`: (exit code, stdout).
    fn run(&self, rt: &str, id: &str, extra: &[&str], args: &[&str]) -> (i32, String, String) {
        let mut a = vec!["run", "--rm", "--runtime", rt];
        a.extend_from_slice(extra);
        a.extend_from_slice(&[IMAGE, id]);
        a.extend_from_slice(args);
        let out = self.ctr(&a);
        (
            out.status.code().unwrap_or(-1),
            text(&out.stdout),
            text(&out.stderr),
        )
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        // Whatever a failed test left: tasks, containers, then the daemon.
        let ls = self.ctr(&["task", "ls", "-q"]);
        for id in text(&ls.stdout).lines() {
            let _ = self.ctr(&["task", "delete", "--force", id]);
        }
        let ls = self.ctr(&["container", "ls", "-q"]);
        for id in text(&ls.stdout).lines() {
            let _ = self.ctr(&["container", "delete", id]);
        }
        // SAFETY: SIGTERM to the containerd this test started (our own child).
        unsafe { libc::kill(self.daemon.id() as i32, libc::SIGTERM) };
        let _ = common::wait_bounded(
            std::mem::replace(&mut self.daemon, Command::new("true").spawn().unwrap()),
            Duration::from_secs(10),
        );
        let root = self.dir.path().join("root");
        let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        for m in mounts.lines().filter_map(|l| l.split(' ').nth(4)) {
            if m.starts_with(root.to_str().unwrap()) {
                let _ = nix::mount::umount2(m, nix::mount::MntFlags::MNT_DETACH);
            }
        }
    }
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// What a run leaves on the host that the test can count.
#[derive(Debug, PartialEq, Eq)]
struct Leftovers {
    shims: Vec<String>,
    agents: Vec<String>,
    mounts: Vec<String>,
    loops: usize,
    cgroups: Vec<String>,
    sandboxes: Vec<String>,
}

fn leftovers(c: &Containerd) -> Leftovers {
    let mut shims = Vec::new();
    let mut agents = Vec::new();
    if let Ok(d) = std::fs::read_dir("/proc") {
        for e in d.flatten() {
            let cmd = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
            let cmd = text(&cmd).replace('\0', " ");
            if cmd.contains("containerd-shim-runv-v2") && cmd.contains(NS) {
                shims.push(cmd);
            } else if cmd.contains("runv-agent") && cmd.contains("/run/runv/containerd/runv-e2e") {
                agents.push(cmd);
            }
        }
    }
    let root = c.dir.path().join("state").display().to_string();
    let mounts = std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .filter(|m| m.starts_with(&root))
        .map(str::to_string)
        .collect();
    let loops = std::fs::read_dir("/sys/block")
        .map(|d| {
            d.flatten()
                .filter(|e| e.file_name().to_string_lossy().starts_with("loop"))
                .filter(|e| e.path().join("loop/backing_file").exists())
                .count()
        })
        .unwrap_or(0);
    let mut cgroups = Vec::new();
    if let Ok(d) = std::fs::read_dir("/sys/fs/cgroup") {
        for ctl in d.flatten() {
            // The agents' groups (`runv-<sandbox>`) and containers under ctr's `/<namespace>/`.
            let agent_groups = std::fs::read_dir(ctl.path())
                .into_iter()
                .flatten()
                .flatten()
                .map(|e| e.path())
                .filter(|p| {
                    p.file_name()
                        .is_some_and(|n| n.to_string_lossy().starts_with("runv-runv-e2e"))
                });
            let per_ns = std::fs::read_dir(ctl.path().join(NS))
                .into_iter()
                .flatten()
                .flatten()
                .map(|e| e.path())
                .filter(|p| p.is_dir());
            cgroups.extend(agent_groups.chain(per_ns).map(|p| p.display().to_string()));
        }
    }
    let sandboxes = std::fs::read_dir(format!("/run/runv/containerd/{NS}"))
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    Leftovers {
        shims,
        agents,
        mounts,
        loops,
        cgroups,
        sandboxes,
    }
}

fn wait_until(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The same scenarios under runc and runv must give the same exit codes and output.
#[test]
fn ctr_scenarios_match_runc() {
    let c = Containerd::start();
    for (rt, tag) in [(RUNC, "runc"), (RUNV, "runv")] {
        // echo + exit code, --rm.
        let (code, out, err) = c.run(
            rt,
            &format!("runv-e2e-{tag}-echo-{}", std::process::id()),
            &[],
            &["sh", "-c", "echo hello; exit 3"],
        );
        assert_eq!(
            (code, out.as_str()),
            (3, "hello\n"),
            "{tag}: {err}\n{}",
            c.log()
        );
        // stdin piping (`head -n 1`: ctr 1.6 never closes a piped stdin, under runc too).
        let mut cmd = c.cmd(&[
            "run",
            "--rm",
            "--runtime",
            rt,
            IMAGE,
            &format!("runv-e2e-{tag}-in-{}", std::process::id()),
            "sh",
            "-c",
            "head -n 1; echo done",
        ]);
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().unwrap();
        {
            use std::io::Write;
            let mut stdin = child.stdin.take().unwrap();
            stdin.write_all(b"piped line\n").unwrap();
        }
        let out = child.wait_with_output().unwrap();
        assert_eq!(
            text(&out.stdout),
            "piped line\ndone\n",
            "{tag}: {}",
            text(&out.stderr)
        );
        assert_eq!(out.status.code(), Some(0));
        // -t with a pty: ctr needs a terminal itself, so it runs under script(1). The output
        // passes the container's pty line discipline (`\n` -> `\r\n`) and the exit code comes
        // back, and ttyname(3) finds the terminal inside the container (runc: /dev/pts/0 of the
        // container's devpts; runv: the pty bound onto /dev/console, as runc does for `create`).
        let id = format!("runv-e2e-{tag}-tty-{}", std::process::id());
        let line = format!(
            "ctr --address {} --namespace {NS} run --rm -t --runtime {rt} {IMAGE} {id} sh -c 'echo tty-line; tty >/dev/null && echo named-tty; exit 4'",
            c.sock().display()
        );
        let out = common::run_bounded(
            Command::new("script")
                .args(["-qec", &line, "/dev/null"])
                .stdin(Stdio::null()),
        );
        let o = text(&out.stdout);
        assert!(o.contains("tty-line\r"), "{tag}: tty output {o:?}");
        assert!(o.contains("named-tty\r"), "{tag}: tty output {o:?}");
        assert_eq!(out.status.code(), Some(4), "{tag}: {o}");
        // Detached task + exec + ps + kill + delete.
        let id = format!("runv-e2e-{tag}-det-{}", std::process::id());
        let out = c.ctr(&["run", "-d", "--runtime", rt, IMAGE, &id, "sleep", "300"]);
        assert!(out.status.success(), "{tag}: run -d: {}", text(&out.stderr));
        let out = c.ctr(&[
            "task",
            "exec",
            "--exec-id",
            "e1",
            &id,
            "sh",
            "-c",
            "echo exec-ok; exit 5",
        ]);
        assert_eq!(
            (out.status.code(), text(&out.stdout).as_str()),
            (Some(5), "exec-ok\n"),
            "{tag}: {}",
            text(&out.stderr)
        );
        // A signal-killed process (not the namespace's init, which SIGKILL from inside spares):
        // 128 + 9, as runc reports.
        let out = c.ctr(&[
            "task",
            "exec",
            "--exec-id",
            "e2",
            &id,
            "sh",
            "-c",
            "kill -9 $$",
        ]);
        assert_eq!(out.status.code(), Some(137), "{tag}: {}", text(&out.stderr));
        let out = c.ctr(&["task", "ps", &id]);
        let ps = text(&out.stdout);
        assert!(out.status.success(), "{tag}: ps: {}", text(&out.stderr));
        assert_eq!(
            ps.lines().count(),
            2,
            "{tag}: one process (the sleep) expected: {ps}"
        );
        let out = c.ctr(&["task", "kill", "-s", "SIGKILL", &id]);
        assert!(out.status.success(), "{tag}: kill: {}", text(&out.stderr));
        wait_until("the task to stop", Duration::from_secs(10), || {
            text(&c.ctr(&["task", "ls"]).stdout)
                .lines()
                .any(|l| l.starts_with(&id) && l.contains("STOPPED"))
        });
        let out = c.ctr(&["task", "delete", &id]);
        assert!(
            out.status.success(),
            "{tag}: task delete: {}",
            text(&out.stderr)
        );
        let out = c.ctr(&["container", "delete", &id]);
        assert!(
            out.status.success(),
            "{tag}: container delete: {}",
            text(&out.stderr)
        );
    }
    wait_until("runv shims to exit", Duration::from_secs(10), || {
        leftovers(&c).shims.is_empty()
    });
}

/// 50 sequential `ctr run --rm` with runv leave no shim, agent, mount, loop device, cgroup or
/// sandbox directory behind.
#[test]
fn fifty_runs_leak_nothing() {
    let c = Containerd::start();
    let before = leftovers(&c);
    for i in 0..50 {
        let (code, out, err) = c.run(
            RUNV,
            &format!("runv-e2e-leak-{i}-{}", std::process::id()),
            &[],
            &["echo", "hi"],
        );
        assert_eq!((code, out.as_str()), (0, "hi\n"), "run {i}: {err}");
    }
    wait_until("no leftovers", Duration::from_secs(10), || {
        let l = leftovers(&c);
        l.shims.is_empty() && l.agents.is_empty() && l.sandboxes.is_empty()
    });
    let after = leftovers(&c);
    assert_eq!(
        after,
        Leftovers {
            loops: after.loops.min(before.loops),
            ..before
        },
        "leaked"
    );
    assert!(
        after.loops <= before.loops,
        "loop devices leaked: {} -> {}",
        before.loops,
        after.loops
    );
}

/// A shim killed with SIGKILL mid-task: containerd's cleanup path (`shim delete`) removes its
/// agent, mounts, cgroups and sandbox state.
#[test]
fn killed_shim_is_cleaned_up() {
    let c = Containerd::start();
    let id = &format!("runv-e2e-kill9-{}", std::process::id());
    let out = c.ctr(&["run", "-d", "--runtime", RUNV, IMAGE, id, "sleep", "300"]);
    assert!(out.status.success(), "run -d: {}", text(&out.stderr));
    let l = leftovers(&c);
    assert_eq!(l.shims.len(), 1, "{l:?}");
    assert_eq!(l.agents.len(), 1, "{l:?}");
    let pid = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .find(|e| {
            text(&std::fs::read(e.path().join("cmdline")).unwrap_or_default())
                .contains("containerd-shim-runv-v2")
        })
        .and_then(|e| e.file_name().to_string_lossy().parse::<i32>().ok())
        .unwrap();
    // SAFETY: SIGKILL to the shim this test's containerd started.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    // containerd notices the dead shim and runs `containerd-shim-runv-v2 delete`.
    wait_until(
        "the task to be reported stopped or gone",
        Duration::from_secs(20),
        || {
            let ls = text(&c.ctr(&["task", "ls"]).stdout);
            !ls.lines()
                .any(|l| l.starts_with(id) && l.contains("RUNNING"))
        },
    );
    let _ = c.ctr(&["task", "delete", id]);
    let out = c.ctr(&["container", "delete", id]);
    assert!(
        out.status.success(),
        "container delete: {}",
        text(&out.stderr)
    );
    wait_until("cleanup", Duration::from_secs(15), || {
        let l = leftovers(&c);
        l.shims.is_empty()
            && l.agents.is_empty()
            && l.sandboxes.is_empty()
            && l.cgroups.is_empty()
            && l.mounts.is_empty()
    });
    assert!(
        common::processes_mentioning("sleep 300").is_empty(),
        "the container's process survived"
    );
}

/// The vm backend under containerd: `ctr run` gets a clone of a test-guest `rt.agent` template
/// (an embedded pool over private directories, configured by `RUNV_CONFIG`), the guest reports
/// the clone hooks and the container's root file system image on its disk, then its agent
/// double refuses `create` (it cannot run containers); ctr prints that reason, and the shim, the
/// VMM, its sockets and the mounts are gone afterwards.
#[test]
fn ctr_run_on_the_vm_backend_reaches_the_clone_and_reports_the_refusal() {
    if std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_err()
    {
        println!("SKIPPED: /dev/kvm is not usable");
        return;
    }
    let pool_dir = tempfile::tempdir().unwrap();
    let p = pool_dir.path();
    let shm = PathBuf::from(format!("/dev/shm/runv-ctd-vm-{}", std::process::id()));
    let vmm = common::vmm();
    {
        let pool = pool_manager::Pool::open(pool_manager::PoolConfig {
            vmm: vmm.clone(),
            state_dir: p.join("state"),
            run_dir: p.join("run"),
            tmpfs_dir: shm.clone(),
            refill_workers: 1,
            jail: Some(pool_manager::ShellJail::pool_default()),
        })
        .unwrap();
        let spec = pool_manager::TemplateSpec {
            kernel: test_guests::guest_path(),
            initrd: None,
            cmdline: "rt.agent".into(),
            mem_mib: 64,
            vcpus: 1,
            ready: pool_manager::ReadyCheck::Report,
            slots: 1,
            net: false,
            mem_mode: Default::default(),
            warmup_ms: 0,
        };
        pool.build_template("agent", &spec).unwrap();
    }
    let config = p.join("config.toml");
    std::fs::write(
        &config,
        format!(
            "template = \"agent\"\npool_socket = \"{0}/none.sock\"\nstate_dir = \"{0}/state\"\n\
             run_dir = \"{0}/run\"\ntmpfs_dir = \"{1}\"\nvmm = \"{2}\"\nimage_cache = \"{0}/images\"\n\
             agent_timeout_ms = 10000\n",
            p.display(),
            shm.display(),
            vmm.display()
        ),
    )
    .unwrap();
    let c = Containerd::start_with(&[("RUNV_SANDBOX", "vm".into()), ("RUNV_CONFIG", config)]);

    // ctr run, while the clone's debug log is copied as it grows (the release removes it).
    let child = c
        .cmd(&["run", "--rm", "--runtime", RUNV, IMAGE, "vm1", "echo", "hi"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let run = p.join("run");
    let seen = std::thread::spawn(move || {
        let mut seen = String::new();
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            // A jailed clone's log is `<run>/vm-X/vm-X.log` (an unjailed one's `<run>/vm-X.log`).
            let dirs = std::fs::read_dir(&run).into_iter().flatten().flatten();
            let files = dirs.flat_map(|d| {
                let inner = std::fs::read_dir(d.path()).into_iter().flatten().flatten();
                inner.map(|f| f.path()).chain([d.path()])
            });
            for f in files {
                let n = f
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default();
                if n.starts_with("vm-") && n.ends_with(".log") {
                    let t = std::fs::read_to_string(&f).unwrap_or_default();
                    if t.len() > seen.len() {
                        seen = t;
                    }
                }
            }
            if seen.contains("op=set_hostname") && seen.contains("agent_disk") {
                break;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        seen
    });
    let out = child.wait_with_output().unwrap();
    let seen = seen.join().unwrap();
    let stderr = text(&out.stderr);
    assert!(
        !out.status.success(),
        "ctr run succeeded on a test guest: {stderr}"
    );
    assert!(
        stderr.contains("creating the container") && stderr.contains("cannot run containers"),
        "ctr does not name the reason: {stderr}\n{}",
        c.log()
    );
    for hook in ["op=reseed", "op=set_clock", "op=set_hostname name=vm1"] {
        assert!(seen.contains(hook), "no {hook} in the clone's log:\n{seen}");
    }
    // The busybox image reached slot 0 as an EROFS image (superblock magic e0f5e1e2).
    assert!(
        seen.contains("PASS agent_disk") && seen.contains("magic=e0f5e1e2"),
        "no rootfs image on the clone's disk:\n{seen}"
    );

    wait_until("the shim and VMM to end", Duration::from_secs(10), || {
        let l = leftovers(&c);
        l.shims.is_empty()
            && common::processes_mentioning(&p.join("run").display().to_string()).is_empty()
    });
    let run_files: Vec<_> = std::fs::read_dir(p.join("run"))
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(
        run_files.is_empty(),
        "left in the pool's run dir: {run_files:?}"
    );
    let l = leftovers(&c);
    assert!(l.mounts.is_empty() && l.sandboxes.is_empty(), "{l:?}");
    assert!(text(&c.ctr(&["container", "ls", "-q"]).stdout)
        .trim()
        .is_empty());
    drop(c);
    let _ = std::fs::remove_dir_all(&shm);
}

/// The Task API of task `id`'s shim (runc's or runv's), at the address its shim wrote into the
/// bundle: ctr 1.6 has no `task update`, so Update and Stats are sent as containerd sends them.
fn task_client(c: &Containerd, id: &str) -> containerd_shim::protos::TaskClient {
    let bundle = c
        .dir
        .path()
        .join("state/io.containerd.runtime.v2.task")
        .join(NS)
        .join(id);
    let addr = std::fs::read_to_string(bundle.join("address"))
        .unwrap_or_else(|e| panic!("{}/address: {e}", bundle.display()));
    let client = containerd_shim::protos::ttrpc::Client::connect(addr.trim())
        .unwrap_or_else(|e| panic!("connecting to the shim at {addr}: {e}"));
    containerd_shim::protos::TaskClient::new(client)
}

/// The memory limit the task's cgroup v1 stats report.
fn memory_limit(t: &containerd_shim::protos::TaskClient, id: &str) -> u64 {
    use containerd_shim::protos::protobuf::Message;
    let s = t
        .stats(
            containerd_shim::protos::ttrpc::context::with_timeout(10_000_000_000),
            &containerd_shim::protos::api::StatsRequest {
                id: id.into(),
                ..Default::default()
            },
        )
        .unwrap();
    let m = containerd_shim::protos::cgroups::metrics::Metrics::parse_from_bytes(&s.stats.value)
        .unwrap_or_else(|e| panic!("stats of {id} ({}): {e}", s.stats.type_url));
    m.memory.usage.limit
}

/// Pause/Resume and Update side by side with runc. Both freeze the task and thaw it (runv's host
/// backend through the agent's cgroup freezer; a VM pauses whole: `tests/vm_pod.rs`). Update (OCI `linux.resources` as containerd's typeurl
/// JSON) sets the memory limit of both, as their cgroup stats report back.
#[test]
fn pause_resume_and_update_side_by_side_with_runc() {
    let c = Containerd::start();
    for (rt, tag) in [(RUNC, "runc"), (RUNV, "runv")] {
        let id = format!("runv-e2e-{tag}-pu-{}", std::process::id());
        let out = c.ctr(&["run", "-d", "--runtime", rt, IMAGE, &id, "sleep", "300"]);
        assert!(out.status.success(), "{tag}: run -d: {}", text(&out.stderr));
        let status = || {
            text(&c.ctr(&["task", "ls"]).stdout)
                .lines()
                .find(|l| l.starts_with(&id))
                .and_then(|l| l.split_whitespace().nth(2).map(str::to_string))
                .unwrap_or_default()
        };
        assert_eq!(status(), "RUNNING", "{tag}");

        // Both freeze the task (runv's host backend through its agent's cgroup freezer).
        let pause = c.ctr(&["task", "pause", &id]);
        assert!(
            pause.status.success(),
            "{tag}: pause: {}",
            text(&pause.stderr)
        );
        assert_eq!(status(), "PAUSED", "{tag}");
        let out = c.ctr(&["task", "resume", &id]);
        assert!(out.status.success(), "{tag}: resume: {}", text(&out.stderr));
        assert_eq!(status(), "RUNNING", "{tag}");
        let out = c.ctr(&["task", "exec", "--exec-id", "pu", &id, "echo", "alive"]);
        assert_eq!(text(&out.stdout), "alive\n", "{tag}: {}", text(&out.stderr));

        // Update: 64 MiB, then read back through Stats.
        let t = task_client(&c, &id);
        let mut any = containerd_shim::protos::protobuf::well_known_types::any::Any::new();
        any.type_url = "types.containerd.io/opencontainers/runtime-spec/1/LinuxResources".into();
        any.value = br#"{"memory":{"limit":67108864},"pids":{"limit":32}}"#.to_vec();
        t.update(
            containerd_shim::protos::ttrpc::context::with_timeout(10_000_000_000),
            &containerd_shim::protos::api::UpdateTaskRequest {
                id: id.clone(),
                resources: Some(any).into(),
                ..Default::default()
            },
        )
        .unwrap_or_else(|e| panic!("{tag}: update: {e}"));
        assert_eq!(
            memory_limit(&t, &id),
            67108864,
            "{tag}: memory limit after update"
        );
        drop(t);

        let out = c.ctr(&["task", "kill", "-s", "SIGKILL", &id]);
        assert!(out.status.success(), "{tag}: kill: {}", text(&out.stderr));
        wait_until("the task to stop", Duration::from_secs(10), || {
            status() == "STOPPED"
        });
        assert!(c.ctr(&["task", "delete", &id]).status.success(), "{tag}");
        assert!(
            c.ctr(&["container", "delete", &id]).status.success(),
            "{tag}"
        );
    }
    wait_until("runv shims to exit", Duration::from_secs(10), || {
        leftovers(&c).shims.is_empty()
    });
}
