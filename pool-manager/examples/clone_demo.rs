//! Quick start demo: boot a template VM, snapshot it, and clone it from a pool of shells.
//!
//! `cargo run --release -p pool-manager --example clone_demo -- RUNV_VMM GUEST_ELF`

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use pool_manager::vmm_api::{ControlClient, MemoryMode, RestoreOptions, SerialOutput};
use pool_manager::{ShellPool, ShellSpec};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let (Some(vmm), Some(guest)) = (args.get(1), args.get(2)) else {
        return Err("usage: clone_demo RUNV_VMM GUEST_ELF".into());
    };
    let dir = tempfile::tempdir()?;
    let shm = tempfile::tempdir_in("/dev/shm")?;
    let snap = shm.path().join("template");
    std::fs::create_dir_all(&snap)?;
    let sock = dir.path().join("template.sock");
    let mut template = Command::new(vmm)
        .args([
            "--kernel",
            guest,
            "--mem-mib",
            "128",
            "--serial",
            "none",
            "--debug-log",
            "-",
        ])
        .args(["--cmdline", "rt.counter rt.idle"])
        .arg("--control")
        .arg(&sock)
        .stdout(Stdio::piped())
        .spawn()?;
    let mut out = BufReader::new(template.stdout.take().ok_or("no stdout")?);
    let mut line = String::new();
    while !line.contains("counter_started") {
        line.clear();
        if out.read_line(&mut line)? == 0 {
            return Err("the template VM exited".into());
        }
    }
    let mut ctl = ControlClient::connect(&sock, Duration::from_secs(5))?;
    println!("template: snapshot -> {:?}", ctl.snapshot(&snap)?);
    println!("template: shutdown -> {:?}", ctl.shutdown()?);
    template.wait()?;

    let pool = ShellPool::new(
        ShellSpec {
            vmm: PathBuf::from(vmm),
            mem_mib: 128,
            vcpus: 1,
            run_dir: dir.path().to_path_buf(),
            jail: None,
        },
        4,
        2,
    );
    let mut clones = Vec::new();
    use MemoryMode::{Copy, Cow, Uffd};
    for (i, mode) in [Cow, Uffd, Uffd, Cow, Copy].into_iter().enumerate() {
        let mut shell = pool.take(Duration::from_secs(10))?;
        let t0 = Instant::now();
        let mut opts = RestoreOptions::new(&snap, mode);
        opts.clone_id = format!("clone-{i}");
        opts.serial = SerialOutput::None;
        opts.debug_log = Some("-".into());
        shell.restore(&opts)?;
        let report = shell.next_stdout_line()?;
        println!(
            "clone-{i} ({mode:?}): running again after {:.2} ms: {}",
            t0.elapsed().as_secs_f64() * 1e3,
            report.trim()
        );
        clones.push(shell);
    }
    for c in clones {
        c.shutdown()?;
    }
    println!(
        "all clones shut down; template files unchanged in {}",
        snap.display()
    );
    Ok(())
}
