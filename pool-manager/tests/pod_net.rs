//! A CRI pod's network as CNI makes it, joined to a VM's TAP with tc mirred
//! (`pool_manager::network::pod`): Debian's real `bridge` + `host-local` plugins build the pod's
//! veth and bridge (the "host" side is a namespace this test makes, so traffic stays local), a
//! test-guest VM on the TAP answers ping for the pod's address from the bridge side, and stops
//! answering when the VM is gone (the pod namespace's own stack never sees the frames).

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use pool_manager::network::{self, pod};
use pool_manager::vmm_api::MacAddr;
use test_guests::netns::Netns;

const CNI_PATH: &str = "/usr/lib/cni";

/// Runs CNI plugin `bridge` (`ADD` or `DEL`) inside `host` for the pod namespace `pod`.
fn cni(host: &Netns, command: &str, pod: &Path, data: &Path) -> String {
    let conf = serde_json::json!({
        "cniVersion": "0.4.0",
        "name": "runvpodtest",
        "type": "bridge",
        "bridge": "rvcnibr0",
        "isGateway": true,
        "isDefaultGateway": true,
        "ipMasq": false,
        "ipam": {"type": "host-local", "subnet": "10.211.0.0/24", "dataDir": data},
    });
    let mut child = host
        .command(Path::new(CNI_PATH).join("bridge"))
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", "runvpodtest")
        .env("CNI_NETNS", pod)
        .env("CNI_IFNAME", "eth0")
        .env("CNI_PATH", CNI_PATH)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("running the CNI bridge plugin");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(conf.to_string().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "CNI {command}: {} {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

struct Vm(std::process::Child);

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn wait_report(log: &Path, prefix: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if text
            .lines()
            .any(|l| l.starts_with(&format!("REPORT {prefix}")))
        {
            return;
        }
        assert!(!text.contains("REPORT FAIL"), "guest failed: {text}");
        assert!(Instant::now() < deadline, "no {prefix} in {text}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn a_cni_pod_network_reaches_the_vm_through_tc_mirred() {
    let test = "a_cni_pod_network_reaches_the_vm_through_tc_mirred";
    if !kvm_available(test) {
        return;
    }
    if let Some(why) = network::unavailable(false) {
        eprintln!("SKIPPED: {test}: {why}");
        return;
    }
    if !Path::new(CNI_PATH).join("bridge").exists() {
        eprintln!("SKIPPED: {test}: no CNI plugins (apt-get install containernetworking-plugins)");
        return;
    }
    let host = Netns::new().unwrap();
    let podns = Netns::new().unwrap();
    let pod_path = PathBuf::from("/run/netns").join(&podns.name);
    let data = tempfile::tempdir().unwrap();
    let result = cni(&host, "ADD", &pod_path, data.path());
    assert!(result.contains("10.211.0."), "CNI result: {result}");

    let link = pod::inspect(&pod_path, None).unwrap();
    assert_eq!(link.ifname, "eth0");
    let (ip, prefix) = link.ipv4[0];
    assert_eq!(prefix, 24);
    assert_eq!(link.gateway, Some("10.211.0.1".parse().unwrap()));

    // The VM on its TAP in this namespace, as the pool's VMs are; the guest's own MAC.
    let tap = format!("rvtpod{}", std::process::id() % 100_000);
    let guest_mac: MacAddr = "02:72:76:00:00:42".parse().unwrap();
    assert!(Command::new("ip")
        .args(["tuntap", "add", "dev", &tap, "mode", "tap"])
        .status()
        .unwrap()
        .success());
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("vm.log");
    let vm = Vm(Command::new(vmm_bin())
        .arg("--kernel")
        .arg(test_guests::guest_path())
        .args(["--mem-mib", "16", "--serial", "none", "--debug-log"])
        .arg(&log)
        .args(["--cmdline", &format!("rt.net={ip}")])
        .args(["--net", &format!("tap={tap},mac={guest_mac}")])
        .stdout(Stdio::null())
        .spawn()
        .unwrap());
    wait_report(&log, "PASS net_ready");

    let joined = pod::connect(&pod_path, Some("eth0"), &tap, Some(guest_mac));
    let tap_left_here = Path::new("/sys/class/net").join(&tap).exists();
    if tap_left_here {
        let _ = Command::new("ip").args(["link", "del", &tap]).status();
    }
    let joined = joined.unwrap();
    assert!(
        !tap_left_here,
        "the TAP did not move into the pod namespace"
    );
    assert_eq!(joined.mac, guest_mac);
    assert_eq!(joined.tap, tap);

    // From the bridge side (where CNI's host end is) to the pod's address: the guest answers.
    let rtts = host.ping(&ip.to_string(), 3, 0.2, 2);
    assert!(
        !rtts.is_empty(),
        "no echo from the VM for the pod address {ip}"
    );
    let stats = podns
        .command("tc")
        .args(["-s", "filter", "show", "dev", &tap, "parent", "ffff:"])
        .output()
        .unwrap();
    let stats = String::from_utf8_lossy(&stats.stdout);
    assert!(
        stats.contains("mirred") && !stats.contains("Sent 0 bytes"),
        "no frames redirected from the TAP: {stats}"
    );

    // Without the VM nothing answers: the replies came from the guest, not the pod's stack.
    drop(vm);
    assert!(
        host.ping(&ip.to_string(), 2, 0.2, 1).is_empty(),
        "the pod namespace answered without the VM"
    );

    pod::disconnect(&joined).unwrap();
    let links = podns.command("ip").args(["-o", "link"]).output().unwrap();
    assert!(!String::from_utf8_lossy(&links.stdout).contains(&tap));
    cni(&host, "DEL", &pod_path, data.path());
}
