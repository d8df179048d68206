//! Container start, agent vs runc: `agent_container_start_ms` (create + start request → first
//! stdout byte of `echo`, the static `runv-agent` on this host) and `runc_container_start_ms`
//! (`runc run` of the same busybox bundle → first stdout byte), measured in the same run;
//! `agent_binary_mib` (size of the static agent).

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use benches::{criterion, target_dir, Recorder};
use protocol::client::Client;
use protocol::{Request, Response, RootfsSource, StdioConfig};

/// A busybox bundle: `rootfs/` from Debian's busybox-static and a `config.json` running `args`.
fn bundle(dir: &Path, args: &[&str]) -> oci_spec::runtime::Spec {
    let rootfs = dir.join("rootfs");
    for d in ["bin", "proc", "dev", "sys", "tmp", "etc"] {
        std::fs::create_dir_all(rootfs.join(d)).unwrap();
    }
    std::fs::copy("/bin/busybox", rootfs.join("bin/busybox"))
        .expect("/bin/busybox (apt-get install busybox-static)");
    for a in ["sh", "echo", "true"] {
        let _ = std::os::unix::fs::symlink("busybox", rootfs.join("bin").join(a));
    }
    let mut spec = oci_spec::runtime::Spec::default();
    let mut p = spec.process().clone().unwrap();
    p.set_args(Some(args.iter().map(|s| s.to_string()).collect()));
    p.set_terminal(Some(false));
    spec.set_process(Some(p));
    let mut root = spec.root().clone().unwrap();
    root.set_path(rootfs);
    root.set_readonly(Some(false));
    spec.set_root(Some(root));
    spec.save(dir.join("config.json")).unwrap();
    spec
}

fn agent_start(
    c: &mut Client,
    spec: &oci_spec::runtime::Spec,
    rootfs: &Path,
    id: &str,
) -> Duration {
    let t0 = Instant::now();
    let r = c
        .call(&Request::Create {
            id: id.into(),
            spec: Box::new(spec.clone()),
            rootfs: RootfsSource::Bind {
                path: rootfs.display().to_string(),
            },
            stdio: StdioConfig::default(),
        })
        .unwrap();
    let Response::Created { streams, .. } = r else {
        panic!("{r:?}")
    };
    let r = c.call(&Request::Start { id: id.into() }).unwrap();
    assert!(matches!(r, Response::Started { .. }), "{r:?}");
    c.first_byte(streams.stdout, Duration::from_secs(10))
        .unwrap();
    let d = t0.elapsed();
    c.call(&Request::Wait {
        id: id.into(),
        exec_id: None,
    })
    .unwrap();
    assert_eq!(
        c.call(&Request::Destroy { id: id.into() }).unwrap(),
        Response::Ok
    );
    c.data.clear();
    d
}

fn runc_start(bundle: &Path, root: &Path, id: &str) -> Duration {
    let t0 = Instant::now();
    let mut child = Command::new("runc")
        .arg("--root")
        .arg(root)
        .args(["run", "--bundle"])
        .arg(bundle)
        .arg(id)
        .stdout(Stdio::piped())
        .stdin(Stdio::null())
        .spawn()
        .expect("runc (apt-get install runc)");
    let mut b = [0u8; 1];
    child.stdout.as_mut().unwrap().read_exact(&mut b).unwrap();
    let d = t0.elapsed();
    assert!(child.wait().unwrap().success());
    d
}

fn main() {
    let mut c = criterion();
    let dir = std::env::temp_dir().join(format!("runv-bench-agent-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let spec = bundle(&dir, &["echo", "hello"]);
    let rootfs = dir.join("rootfs");

    let agent_bin: PathBuf =
        target_dir().join("static/x86_64-unknown-linux-gnu/release/runv-agent");
    assert!(
        agent_bin.exists(),
        "{} missing: run scripts/build-agent.sh (perf-ci/run does)",
        agent_bin.display()
    );
    let mut size = Recorder::median("agent_binary_mib", "MiB");
    size.push(std::fs::metadata(&agent_bin).unwrap().len() as f64 / (1 << 20) as f64);
    size.write();

    let sock = dir.join("agent.sock");
    let mut agent = Command::new(&agent_bin)
        .arg("--listen")
        .arg(format!("unix:{}", sock.display()))
        .arg("--state-dir")
        .arg(dir.join("state"))
        .args([
            "--cgroup-group",
            &format!("runv-bench-{}", std::process::id()),
        ])
        .spawn()
        .unwrap();
    while !sock.exists() {
        std::thread::sleep(Duration::from_millis(2));
    }
    let mut client = Client::connect(&sock).unwrap();
    let mut n = 0;
    let mut rec = Recorder::median("agent_container_start_ms", "ms");
    c.bench_function("agent_container_start", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                n += 1;
                let d = agent_start(&mut client, &spec, &rootfs, &format!("b{n}"));
                rec.push_duration(d);
                total += d;
            }
            total
        })
    });
    rec.write();
    // SAFETY: kill(2) on our child.
    unsafe { libc::kill(agent.id() as i32, libc::SIGTERM) };
    let _ = agent.wait();

    let runc_root = dir.join("runc-state");
    let mut rec = Recorder::median("runc_container_start_ms", "ms");
    c.bench_function("runc_container_start", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                n += 1;
                let d = runc_start(
                    &dir,
                    &runc_root,
                    &format!("runv-bench-{}-{n}", std::process::id()),
                );
                rec.push_duration(d);
                total += d;
            }
            total
        })
    });
    rec.write();
    c.final_summary();
    let _ = std::fs::remove_dir_all(&dir);
}
