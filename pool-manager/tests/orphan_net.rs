//! A daemon killed with -9 leaves its networked warm clones' namespaces, TAPs, veths and
//! nftables rules behind; the next daemon on the same directories ends those VMMs and removes
//! their networks (`Pool::clean_orphans`), keeps the network of the sandbox it re-adopts, and
//! frees that one on release. Real KVM, namespaces, TAPs, veths and nftables rules.

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;
use pool_manager::network::{self, PoolNetwork};
use pool_manager::{Pool, PoolTargets};

const BIN: &str = env!("CARGO_BIN_EXE_runv-pool");

struct Daemon(Option<Child>);

impl Daemon {
    fn start(dirs: &Dirs) -> Self {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dirs.tmp.path().join("daemon.log"))
            .unwrap();
        let child = Command::new(BIN)
            .arg("serve")
            .arg("--state-dir")
            .arg(dirs.state())
            .arg("--run-dir")
            .arg(dirs.run())
            .arg("--tmpfs-dir")
            .arg(&dirs.shm)
            .arg("--vmm")
            .arg(vmm_bin())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let sock = dirs.run().join("pool.sock");
        wait_until("the daemon's socket", Duration::from_secs(20), || {
            std::os::unix::net::UnixStream::connect(&sock).is_ok()
        });
        Self(Some(child))
    }

    /// kill -9, then reaped.
    fn kill(&mut self) {
        let mut c = self.0.take().unwrap();
        c.kill().unwrap();
        c.wait().unwrap();
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            // SAFETY: kill(2) on the daemon this test started and has not reaped.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let _ = c.wait();
        }
    }
}

/// Kills every VMM left under `dirs` (after a failed test) so nothing outlives it.
struct Reaper<'a>(&'a Dirs);

impl Drop for Reaper<'_> {
    fn drop(&mut self) {
        for p in processes_mentioning(self.0.run().to_str().unwrap()) {
            // SAFETY: kill(2) on a VMM of this test's run dir.
            unsafe { libc::kill(p as i32, libc::SIGKILL) };
        }
    }
}

/// VM names (`vm-<hex>`) with a control socket in the run dir (`<run>/<vm>/<vm>.sock` when
/// jailed, as the daemon does by default; `<run>/<vm>.sock` otherwise).
fn vms(dirs: &Dirs) -> Vec<String> {
    dirs.run_files()
        .iter()
        .filter_map(|p| {
            let n = p.file_name()?.to_str()?;
            let jailed = p.join(format!("{n}.sock")).exists();
            n.strip_suffix(".sock")
                .or(jailed.then_some(n))
                .filter(|v| v.starts_with("vm-"))
                .map(str::to_owned)
        })
        .collect()
}

/// What of VM `vm`'s network exists on the host.
fn network_of(vm: &str) -> Vec<String> {
    let hex = vm.strip_prefix("vm-").unwrap();
    let hex = &hex[..hex.len().min(12)];
    let mut left = Vec::new();
    let ns = format!("{}{vm}", network::NETNS_PREFIX);
    if Path::new("/run/netns").join(&ns).exists() {
        left.push(ns);
    }
    for link in [
        format!("{}{hex}", network::TAP_PREFIX),
        format!("{}{hex}", network::VETH_PREFIX),
    ] {
        if Path::new("/sys/class/net").join(&link).exists() {
            left.push(link);
        }
    }
    let rules = network::nft_rules(Some(vm)).unwrap();
    if rules > 0 {
        left.push(format!("{rules} nft rules"));
    }
    left
}

#[test]
fn a_restarted_daemon_removes_the_networks_a_killed_one_left() {
    let test = "a_restarted_daemon_removes_the_networks_a_killed_one_left";
    if !net_available(test) {
        return;
    }
    let dirs = Dirs::new();
    let _reaper = Reaper(&dirs);
    {
        // The template and its pool's targets, saved for the daemon (pools.json).
        let pool = Pool::open(dirs.config()).unwrap();
        pool.build_template("net", &net_counter_spec()).unwrap();
        pool.set_pool(
            "net",
            PoolTargets {
                warm: 2,
                network: Some(PoolNetwork {
                    subnet: network::parse_subnet("10.205.0.0/24").unwrap(),
                    egress: true,
                }),
                ..Default::default()
            },
        )
        .unwrap();
        drop(pool);
    }
    let mut d = Daemon::start(&dirs);
    let sock = dirs.run().join("pool.sock");
    let (code, body) = http(
        &sock,
        "POST",
        "/v1/sandboxes",
        br#"{"template":"net","id":"kept","network":true}"#,
    );
    assert_eq!(code, 201, "{body}");
    let kept: serde_json::Value = serde_json::from_str(&body).unwrap();
    let kept_vm = Path::new(kept["control"].as_str().unwrap())
        .file_stem()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    // Two networked warm clones pooled besides the leased sandbox.
    wait_until("2 networked warm clones", Duration::from_secs(30), || {
        let v = vms(&dirs);
        // Namespace, veth host end, 3 rules (the TAP is inside the namespace).
        v.len() == 3 && v.iter().all(|vm| network_of(vm).len() == 3)
    });
    let pooled: Vec<String> = vms(&dirs).into_iter().filter(|v| *v != kept_vm).collect();
    assert_eq!(pooled.len(), 2);
    wait_until("recorded", Duration::from_secs(2), || {
        std::fs::read_to_string(dirs.state().join("sandboxes.json"))
            .is_ok_and(|t| t.contains("kept"))
    });

    // kill -9: everything stays behind.
    d.kill();
    for vm in &pooled {
        assert_eq!(network_of(vm).len(), 3, "{vm}: {:?}", network_of(vm));
    }

    let d2 = Daemon::start(&dirs);
    wait_until(
        "the orphans' networks removed",
        Duration::from_secs(10),
        || pooled.iter().all(|vm| network_of(vm).is_empty()),
    );
    // The re-adopted sandbox keeps its network.
    assert_eq!(network_of(&kept_vm).len(), 3, "{:?}", network_of(&kept_vm));
    let (code, body) = http(&sock, "DELETE", "/v1/sandboxes/kept", b"");
    assert_eq!(code, 204, "{body}");
    wait_until(
        "the released sandbox's network removed",
        Duration::from_secs(10),
        || network_of(&kept_vm).is_empty(),
    );
    drop(d2);
    wait_until("every VMM ended", Duration::from_secs(10), || {
        live_processes_mentioning(dirs.run().to_str().unwrap()).is_empty()
    });
    for vm in pooled.iter().chain([&kept_vm]) {
        assert!(network_of(vm).is_empty(), "{vm}: {:?}", network_of(vm));
    }
}
