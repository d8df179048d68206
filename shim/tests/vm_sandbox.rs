//! The `vm` sandbox backend on real KVM with test-guest templates: a clone from the pool, an
//! EROFS image in disk slot 0 that the guest sees, the agent protocol over vsock answered by the
//! test guest's `rt.agent` responder, the clone hooks it reports, and a release that leaves
//! nothing behind. The whole chain with a Linux guest and the static agent runs only with
//! `RUNV_KERNEL` (no Linux guest boots on our development hosts).

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pool_manager::{Pool, PoolConfig, ReadyCheck, TemplateSpec};
use protocol::{ErrorCode, Request, Response, RootfsSource};
use shim::sandbox::vm::{Hooks, Source, VmConfig, VmError, VmSandbox};

fn kvm(test: &str) -> bool {
    let ok = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    if !ok {
        println!("SKIPPED: {test}: /dev/kvm is not usable");
    }
    ok
}

/// A pool over private directories (removed on drop, after the pool).
struct Fixture {
    pool: Option<Arc<Pool>>,
    tmp: tempfile::TempDir,
    shm: PathBuf,
}

impl Fixture {
    fn new(tag: &str) -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let shm = PathBuf::from(format!("/dev/shm/runv-shim-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&shm);
        let pool = Pool::open(PoolConfig {
            vmm: common::vmm(),
            state_dir: tmp.path().join("state"),
            run_dir: tmp.path().join("run"),
            tmpfs_dir: shm.clone(),
            refill_workers: 1,
            jail: Some(pool_manager::ShellJail::pool_default()),
        })
        .unwrap();
        Self {
            pool: Some(Arc::new(pool)),
            tmp,
            shm,
        }
    }

    fn pool(&self) -> &Arc<Pool> {
        self.pool.as_ref().unwrap()
    }

    fn template(&self, name: &str, cmdline: &str, slots: u8) {
        let spec = TemplateSpec {
            kernel: test_guests::guest_path(),
            initrd: None,
            cmdline: cmdline.into(),
            mem_mib: 64,
            vcpus: 1,
            ready: ReadyCheck::Report,
            slots,
            net: false,
            mem_mode: Default::default(),
            warmup_ms: 0,
        };
        self.pool().build_template(name, &spec).unwrap();
    }

    fn config(&self, template: &str, agent_timeout: Duration) -> VmConfig {
        let mut c = VmConfig::new(template);
        c.image_cache = self.tmp.path().join("images");
        c.agent_timeout = agent_timeout;
        c
    }

    fn run_files(&self) -> Vec<PathBuf> {
        std::fs::read_dir(self.tmp.path().join("run"))
            .map(|d| d.flatten().map(|e| e.path()).collect())
            .unwrap_or_default()
    }

    /// Drops the pool (its reaper finishes every shutdown first).
    fn close(&mut self) {
        let pool = self.pool.take().unwrap();
        let pool = Arc::try_unwrap(pool).unwrap_or_else(|_| panic!("the pool is still shared"));
        drop(pool);
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        self.pool.take();
        let _ = std::fs::remove_dir_all(&self.shm);
    }
}

/// Waits for a `REPORT PASS <what>` line in a clone's debug log; fails on `REPORT FAIL`.
fn wait_report(log: &Path, what: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if let Some(f) = text.lines().find(|l| l.starts_with("REPORT FAIL")) {
            panic!("the guest failed: {f}\n{text}");
        }
        if let Some(l) = text
            .lines()
            .find(|l| l.starts_with(&format!("REPORT PASS {what}")))
        {
            return l.to_string();
        }
        assert!(
            Instant::now() < deadline,
            "no PASS {what} in {}:\n{text}",
            log.display()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
}

fn alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .unwrap_or_default()
            .contains(") Z ")
}

#[test]
fn vm_sandbox_clone_gets_disk_agent_and_hooks_and_release_leaves_nothing() {
    if !kvm("vm_sandbox_clone_gets_disk_agent_and_hooks_and_release_leaves_nothing") {
        return;
    }
    let mut fx = Fixture::new("agent");
    fx.template("agent", "rt.agent", 2);
    let cfg = fx.config("agent", Duration::from_secs(10));
    let source = Source::Embedded(fx.pool().clone());
    source.check_template("agent").unwrap();

    // Two clones of one template, each with its own hooks.
    let hooks: Vec<Hooks> = ["box-a", "box-b"]
        .iter()
        .map(|h| Hooks::fresh(Some(h.to_string())).unwrap())
        .collect();
    let mut sandboxes = Vec::new();
    for (i, h) in hooks.iter().enumerate() {
        let (sb, mut client) = VmSandbox::start(&cfg, &source, &format!("c{i}"), h).unwrap();
        let log = sb.info().debug_log.clone();
        let r = wait_report(&log, "agent_hook op=reseed");
        assert_eq!(field(&r, "bytes"), Some("32"), "{r}");
        let r = wait_report(&log, "agent_hook op=set_clock");
        assert_eq!(
            field(&r, "unix_nanos"),
            Some(h.unix_nanos.to_string().as_str()),
            "{r}"
        );
        let r = wait_report(&log, "agent_hook op=set_hostname");
        assert_eq!(field(&r, "name"), h.hostname.as_deref(), "{r}");

        // The responder's frames decode with the Rust protocol crate.
        match client
            .call_timeout(&Request::Ping, Duration::from_secs(5))
            .unwrap()
        {
            Response::Pong {
                version,
                ready,
                agent_version,
                ..
            } => {
                assert_eq!(version, protocol::PROTOCOL_VERSION);
                assert!(ready);
                assert_eq!(agent_version, "runv-test-guest");
            }
            other => panic!("ping answered {other:?}"),
        }
        match client
            .call_timeout(&Request::List, Duration::from_secs(5))
            .unwrap()
        {
            Response::Error(e) => {
                assert_eq!(e.code, ErrorCode::BadRequest);
                assert!(e.message.contains("ping"), "{}", e.message);
            }
            other => panic!("list answered {other:?}"),
        }
        sandboxes.push(sb);
    }
    assert_ne!(sandboxes[0].info().pid, sandboxes[1].info().pid);

    // A real EROFS image of a small tree in slot 0: the guest sees its capacity, the slot's
    // serial and its superblock magic.
    let tree = fx.tmp.path().join("tree");
    std::fs::create_dir_all(tree.join("etc")).unwrap();
    std::fs::write(tree.join("etc/hostname"), "runv\n").unwrap();
    let image = shim::image::ImageCache::new(fx.tmp.path().join("images"))
        .unwrap()
        .erofs_for(&tree, None)
        .unwrap();
    let sb = &mut sandboxes[0];
    let root = sb.attach_rootfs(&image.path).unwrap();
    assert_eq!(
        root,
        RootfsSource::Block {
            serial: "runv-slot0".into(),
            fstype: "erofs".into(),
            writable: protocol::Writable::Tmpfs,
        }
    );
    let r = wait_report(&sb.info().debug_log, "agent_disk");
    let bytes = std::fs::read(&image.path).unwrap();
    assert_eq!(
        field(&r, "capacity"),
        Some((bytes.len() as u64 / 512).to_string().as_str()),
        "{r}"
    );
    assert_eq!(field(&r, "serial"), Some("runv-slot0"), "{r}");
    // The EROFS superblock magic at byte 1024, as the guest read it from the device.
    let magic = u32::from_le_bytes(bytes[1024..1028].try_into().unwrap());
    assert_eq!(magic, 0xe0f5_e1e2, "not an EROFS image");
    assert_eq!(field(&r, "magic"), Some("e0f5e1e2"), "{r}");
    // The agent still answers after the disk swap, on a new connection too.
    let mut c = sb.agent_ready().unwrap();
    assert!(matches!(
        c.call_timeout(&Request::Ping, Duration::from_secs(5))
            .unwrap(),
        Response::Pong { .. }
    ));
    drop(c);

    // Release: no VMM process, socket or log left once the pool has reaped them.
    let infos: Vec<_> = sandboxes.iter().map(|s| s.info().clone()).collect();
    for mut sb in sandboxes {
        sb.release().unwrap();
        sb.release().unwrap(); // idempotent
    }
    assert!(fx.pool().sandboxes().is_empty());
    drop(source);
    fx.close();
    for i in &infos {
        assert!(!alive(i.pid), "VMM {} still runs", i.pid);
        for f in [&i.vsock_uds, &i.control, &i.debug_log] {
            assert!(!f.exists(), "{} left behind", f.display());
        }
    }
    assert!(
        fx.run_files().is_empty(),
        "left in the run dir: {:?}",
        fx.run_files()
    );
}

#[test]
fn vm_sandbox_refuses_a_template_without_agent_naming_it() {
    if !kvm("vm_sandbox_refuses_a_template_without_agent_naming_it") {
        return;
    }
    let mut fx = Fixture::new("noagent");
    fx.template("silent", "rt.counter rt.idle", 1);
    let cfg = fx.config("silent", Duration::from_millis(800));
    let source = Source::Embedded(fx.pool().clone());
    let Err(err) = VmSandbox::start(&cfg, &source, "c", &Hooks::fresh(None).unwrap()) else {
        panic!("a template without agent was accepted");
    };
    assert!(matches!(err, VmError::NoAgent { .. }), "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains("template silent") && msg.contains("1024"),
        "{msg}"
    );
    // The failed start released its clone.
    assert!(fx.pool().sandboxes().is_empty());
    // An unknown template is named too.
    let e = source.check_template("nope").unwrap_err().to_string();
    assert!(e.contains("template nope does not exist"), "{e}");
    drop(source);
    fx.close();
    assert!(
        fx.run_files().is_empty(),
        "left in the run dir: {:?}",
        fx.run_files()
    );
}

/// The whole chain with a Linux guest whose init is the static `runv-agent`: `runv --sandbox
/// vm run` of a busybox bundle through an embedded pool (template built from `RUNV_KERNEL`,
/// optional `RUNV_INITRD`).
#[test]
fn vm_sandbox_runs_a_container_with_a_linux_kernel() {
    let Some(kernel) = std::env::var_os("RUNV_KERNEL") else {
        println!("SKIPPED: vm_sandbox_runs_a_container_with_a_linux_kernel: RUNV_KERNEL is not set (no Linux guest boots on this host); set RUNV_KERNEL (and RUNV_INITRD with runv-agent as init) to run it");
        eprintln!(
            "SKIPPED: vm_sandbox_runs_a_container_with_a_linux_kernel: RUNV_KERNEL is not set"
        );
        return;
    };
    if !kvm("vm_sandbox_runs_a_container_with_a_linux_kernel") {
        return;
    }
    let Some(env) = common::Env::new("vm_sandbox_runs_a_container_with_a_linux_kernel") else {
        return;
    };
    let mut fx = Fixture::new("linux");
    let spec = TemplateSpec {
        kernel: kernel.into(),
        initrd: std::env::var_os("RUNV_INITRD").map(Into::into),
        cmdline: "console=ttyS0 quiet".into(),
        mem_mib: 256,
        vcpus: 1,
        ready: ReadyCheck::Agent,
        slots: 1,
        net: false,
        mem_mode: Default::default(),
        warmup_ms: 0,
    };
    fx.pool().build_template("linux", &spec).unwrap();
    fx.close(); // the runv monitor opens its own pool over the same directories
    let conf = fx.tmp.path().join("config.toml");
    std::fs::write(
        &conf,
        format!(
            "template = \"linux\"\nstate_dir = \"{}\"\nrun_dir = \"{}\"\ntmpfs_dir = \"{}\"\nvmm = \"{}\"\nimage_cache = \"{}\"\npool_socket = \"{}\"\nagent_timeout_ms = 10000\n",
            fx.tmp.path().join("state").display(),
            fx.tmp.path().join("run").display(),
            fx.shm.display(),
            common::vmm().display(),
            fx.tmp.path().join("images").display(),
            fx.tmp.path().join("no-daemon.sock").display(),
        ),
    )
    .unwrap();
    let bundle = env.bundle("vm", &["echo", "hello from a clone"], false);
    let id = env.id("vm");
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_runv"));
    cmd.arg("--root")
        .arg(env.root.path())
        .args([
            "--sandbox",
            "vm",
            "run",
            "--bundle",
            bundle.to_str().unwrap(),
            &id,
        ])
        .env("RUNV_CONFIG", &conf)
        .env_remove("RUNV_TEMPLATE")
        .stdin(std::process::Stdio::null());
    let out = common::run_bounded(&mut cmd);
    assert!(
        out.status.success(),
        "runv run: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "hello from a clone"
    );
    assert!(
        fx.run_files().is_empty(),
        "left in the run dir: {:?}",
        fx.run_files()
    );
}

/// `runv --sandbox vm create` through the CLI and the monitor's embedded pool, on test-guest
/// templates: a template without agent fails at `create` naming it; with the `rt.agent`
/// responder the clone is acquired, hooked and gets the bundle's rootfs as an EROFS image, and
/// the responder's refusal of `create` (it runs no containers) comes back as the error. Either
/// way nothing is left: no container directory, no VMM, no socket or log.
#[test]
fn runv_create_with_the_vm_sandbox_reaches_the_clone_and_cleans_up() {
    if !kvm("runv_create_with_the_vm_sandbox_reaches_the_clone_and_cleans_up") {
        return;
    }
    let mut fx = Fixture::new("cli");
    fx.template("agent", "rt.agent", 1);
    fx.template("silent", "rt.counter rt.idle", 1);
    fx.close(); // each runv monitor opens its own pool over these directories
    let conf = fx.tmp.path().join("config.toml");
    std::fs::write(
        &conf,
        format!(
            "# test\nstate_dir = \"{}\"\nrun_dir = \"{}\"\ntmpfs_dir = \"{}\"\nvmm = \"{}\"\nimage_cache = \"{}\"\npool_socket = \"{}\"\nagent_timeout_ms = 1500\n",
            fx.tmp.path().join("state").display(),
            fx.tmp.path().join("run").display(),
            fx.shm.display(),
            common::vmm().display(),
            fx.tmp.path().join("images").display(),
            fx.tmp.path().join("no-daemon.sock").display(),
        ),
    )
    .unwrap();
    let bundle = fx.tmp.path().join("bundle");
    std::fs::create_dir_all(bundle.join("rootfs/etc")).unwrap();
    std::fs::write(bundle.join("rootfs/etc/hostname"), "runv\n").unwrap();
    std::fs::write(
        bundle.join("config.json"),
        serde_json::json!({
            "ociVersion": "1.2.0",
            "process": {"args": ["/bin/true"], "cwd": "/", "user": {"uid": 0, "gid": 0}},
            "root": {"path": "rootfs"},
            "hostname": "vm-box",
        })
        .to_string(),
    )
    .unwrap();
    let root = fx.tmp.path().join("root");
    let create = |template: &str, id: &str| {
        let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_runv"));
        c.arg("--root")
            .arg(&root)
            .args([
                "--sandbox",
                "vm",
                "--template",
                template,
                "create",
                "--bundle",
            ])
            .arg(&bundle)
            .arg(id)
            .env("RUNV_CONFIG", &conf)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null());
        common::run_bounded(&mut c)
    };
    let left = || {
        std::fs::read_dir(&root)
            .map(|d| d.flatten().map(|e| e.path()).collect::<Vec<_>>())
            .unwrap_or_default()
    };

    let o = create("silent", "c1");
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("template silent") && err.contains("did not answer ping"),
        "{err}"
    );
    assert!(left().is_empty(), "{:?}", left());

    let o = create("agent", "c2");
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("creating the container") && err.contains("answers ping"),
        "{err}"
    );
    assert!(left().is_empty(), "{:?}", left());
    // The rootfs image was built (and attached: the guest's reports are gone with its log).
    let images: Vec<_> = std::fs::read_dir(fx.tmp.path().join("images"))
        .unwrap()
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "erofs"))
        .collect();
    assert_eq!(images.len(), 1);

    let o = create("nope", "c3");
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(err.contains("template nope does not exist"), "{err}");
    assert!(
        fx.run_files().is_empty(),
        "left in the run dir: {:?}",
        fx.run_files()
    );
}

/// The same library calls with the `runv-pool` daemon as the source: `Source::open` picks it
/// when its socket answers; acquire, agent, hooks, disk and release go through its HTTP API;
/// pause/resume through the clone's control socket.
#[test]
fn vm_sandbox_uses_the_runv_pool_daemon_when_it_answers() {
    if !kvm("vm_sandbox_uses_the_runv_pool_daemon_when_it_answers") {
        return;
    }
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let st = std::process::Command::new(cargo)
        .args(["build", "-q", "-p", "pool-manager", "--bin", "runv-pool"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .status()
        .unwrap();
    assert!(
        st.success(),
        "cargo build -p pool-manager --bin runv-pool failed"
    );
    let bin = common::vmm().with_file_name("runv-pool");
    let mut fx = Fixture::new("daemon");
    fx.template("agent", "rt.agent", 1);
    fx.close();
    let run = fx.tmp.path().join("run");
    let mut daemon = std::process::Command::new(&bin)
        .arg("serve")
        .arg("--state-dir")
        .arg(fx.tmp.path().join("state"))
        .arg("--run-dir")
        .arg(&run)
        .arg("--tmpfs-dir")
        .arg(&fx.shm)
        .arg("--vmm")
        .arg(common::vmm())
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut cfg = fx.config("agent", Duration::from_secs(10));
    cfg.pool_socket = run.join("pool.sock");
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::os::unix::net::UnixStream::connect(&cfg.pool_socket).is_err() {
        assert!(Instant::now() < deadline, "the daemon never listened");
        std::thread::sleep(Duration::from_millis(20));
    }
    let source = Source::open(&cfg).unwrap();
    assert!(matches!(source, Source::Daemon(_)), "{source:?}");
    source.check_template("agent").unwrap();
    let e = source.check_template("nope").unwrap_err().to_string();
    assert!(e.contains("template nope does not exist"), "{e}");

    let hooks = Hooks::fresh(Some("from-daemon".into())).unwrap();
    let (mut sb, mut client) = VmSandbox::start(&cfg, &source, "d1", &hooks).unwrap();
    let r = wait_report(&sb.info().debug_log, "agent_hook op=set_hostname");
    assert_eq!(field(&r, "name"), Some("from-daemon"), "{r}");
    assert!(matches!(
        client
            .call_timeout(&Request::Ping, Duration::from_secs(5))
            .unwrap(),
        Response::Pong { ready: true, .. }
    ));
    let tree = fx.tmp.path().join("tree");
    std::fs::create_dir_all(&tree).unwrap();
    std::fs::write(tree.join("f"), "x").unwrap();
    let image = shim::image::ImageCache::new(fx.tmp.path().join("images"))
        .unwrap()
        .erofs_for(&tree, None)
        .unwrap();
    sb.attach_rootfs(&image.path).unwrap();
    let r = wait_report(&sb.info().debug_log, "agent_disk");
    assert_eq!(field(&r, "serial"), Some("runv-slot0"), "{r}");
    // pause parks the clone's vCPUs: its agent cannot answer until resume.
    sb.pause().unwrap();
    assert!(matches!(
        client.call_timeout(&Request::Ping, Duration::from_millis(300)),
        Err(protocol::client::ClientError::Timeout)
    ));
    sb.resume().unwrap();
    let mut c = sb.agent_ready().unwrap();
    assert!(matches!(
        c.call_timeout(&Request::Ping, Duration::from_secs(5))
            .unwrap(),
        Response::Pong { .. }
    ));
    drop((c, client));
    let info = sb.info().clone();
    assert_eq!(
        info.labels.get("runv.container").map(String::as_str),
        Some("d1")
    );
    sb.release().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while alive(info.pid) || info.control.exists() {
        assert!(
            Instant::now() < deadline,
            "the daemon did not end sandbox {}",
            info.id
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // SAFETY: kill(2) on the daemon this test started.
    unsafe { libc::kill(daemon.id() as i32, libc::SIGTERM) };
    let _ = daemon.wait();
}
