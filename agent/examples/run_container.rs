//! Quick start demo: start the static agent, run `echo` in a busybox container through it.
//!
//! `cargo run -p agent --example run_container -- RUNV_AGENT`

use std::process::Command;
use std::time::{Duration, Instant};

use protocol::client::Client;
use protocol::{Request, Response, RootfsSource, StdioConfig};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let bin = std::env::args()
        .nth(1)
        .ok_or("usage: run_container RUNV_AGENT")?;
    let dir = tempfile::tempdir()?;
    let rootfs = dir.path().join("rootfs");
    for d in ["bin", "proc", "dev", "sys", "tmp"] {
        std::fs::create_dir_all(rootfs.join(d))?;
    }
    std::fs::copy("/bin/busybox", rootfs.join("bin/busybox"))
        .map_err(|e| format!("/bin/busybox: {e} (apt-get install busybox-static)"))?;
    for a in ["sh", "echo", "hostname", "cat"] {
        std::os::unix::fs::symlink("busybox", rootfs.join("bin").join(a))?;
    }
    let sock = dir.path().join("agent.sock");
    let mut agent = Command::new(&bin)
        .arg("--listen")
        .arg(format!("unix:{}", sock.display()))
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .args([
            "--cgroup-group",
            &format!("runv-demo-{}", std::process::id()),
        ])
        .spawn()?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while !sock.exists() {
        if Instant::now() > deadline {
            return Err("the agent did not start".into());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let mut c = Client::connect(&sock)?;
    println!("agent: {:?}", c.call(&Request::Ping)?);
    let mut spec = oci_spec::runtime::Spec::default();
    let mut p = spec.process().clone().ok_or("default spec has a process")?;
    p.set_args(Some(vec![
        "sh".into(),
        "-c".into(),
        "echo hello from $(hostname); exit 3".into(),
    ]));
    p.set_terminal(Some(false));
    spec.set_process(Some(p));
    spec.set_hostname(Some("runv-demo".into()));
    let t0 = Instant::now();
    let Response::Created { streams, .. } = c.call(&Request::Create {
        id: "demo".into(),
        spec: Box::new(spec),
        rootfs: RootfsSource::Overlay {
            lower: rootfs.display().to_string(),
        },
        stdio: StdioConfig::default(),
    })?
    else {
        return Err("create failed".into());
    };
    c.call(&Request::Start { id: "demo".into() })?;
    c.first_byte(streams.stdout, Duration::from_secs(10))?;
    println!(
        "container: first output after {:.2} ms",
        t0.elapsed().as_secs_f64() * 1e3
    );
    let exit = c.call(&Request::Wait {
        id: "demo".into(),
        exec_id: None,
    })?;
    let out = c.read_to_close(streams.stdout, Duration::from_secs(10))?;
    print!("container stdout: {}", String::from_utf8_lossy(&out));
    println!("container exit: {exit:?}");
    c.call(&Request::Destroy { id: "demo".into() })?;
    // SAFETY: kill(2) on our own child; SIGTERM ends the agent cleanly.
    unsafe { libc::kill(agent.id() as i32, libc::SIGTERM) };
    agent.wait()?;
    Ok(())
}
