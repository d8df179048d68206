//! virtio-net end to end: `runv-vmm` processes in network namespaces the tests create, each with
//! its own TAP, and the test guest's `rt.net` (ARP + ICMP echo). Host → guest ping; a template
//! snapshotted while being pinged and two clones on their own TAPs and addresses, each answering
//! only for its own address; bad TAPs and MACs refused with clear errors.

mod common;

use std::path::Path;
use std::process::{Child, Stdio};
use std::time::Duration;

use common::*;
use test_guests::netns::{unavailable, Netns};

/// Skips (loudly) without KVM, root, `/dev/net/tun`, `ip` or `ping`.
fn net_available(test: &str) -> bool {
    if !kvm_available(test) {
        return false;
    }
    match unavailable() {
        Some(why) => {
            println!("SKIPPED: {test}: {why}");
            false
        }
        None => true,
    }
}

/// A `runv-vmm` process, killed and reaped on drop (a failing test leaves none behind).
struct Vm(Child);

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `runv-vmm` in `ns` with `args` (32 MiB, no serial, debug log in `dir`).
fn vmm_in(ns: &Netns, dir: &Path, args: &[&str]) -> Vm {
    Vm(ns
        .command(env!("CARGO_BIN_EXE_runv-vmm"))
        .args(["--serial", "none", "--debug-log"])
        .arg(dir.join("debug.log"))
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap())
}

fn boot_args<'a>(cmdline: &'a str, net: &'a str, ctl: &'a str) -> Vec<&'a str> {
    let kernel = test_guests::guest_path().to_str().unwrap().to_owned();
    vec![
        Box::leak(kernel.into_boxed_str()),
        "--mem-mib",
        "32",
        "--cmdline",
        cmdline,
        "--net",
        net,
        "--control",
        ctl,
    ]
}

/// Waits for a report starting with `prefix` in `dir`'s debug log; returns it.
fn report_starting(dir: &Path, prefix: &str) -> String {
    let deadline = std::time::Instant::now() + TIMEOUT;
    loop {
        let log = std::fs::read_to_string(dir.join("debug.log")).unwrap_or_default();
        if let Some(l) = log.lines().find_map(|l| l.strip_prefix("REPORT ")) {
            if l.starts_with("FAIL") {
                panic!("guest failed: {l}");
            }
        }
        if let Some(r) = log
            .lines()
            .filter_map(|l| l.strip_prefix("REPORT "))
            .find(|l| l.starts_with(prefix))
        {
            return r.to_owned();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no {prefix} report in {log}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Runs `runv-vmm` in `ns` with `args`, expects it to fail; returns its stderr.
fn refused(ns: &Netns, dir: &Path, args: &[&str]) -> String {
    let mut c = vmm_in(ns, dir, args);
    let status = wait_exit(&mut c.0);
    assert!(!status.success(), "{args:?} was accepted");
    let mut err = String::new();
    std::io::Read::read_to_string(&mut c.0.stderr.take().unwrap(), &mut err).unwrap();
    err
}

fn stop(ctl: &Path, vm: &mut Vm) {
    control(ctl).shutdown().unwrap();
    assert!(wait_exit(&mut vm.0).success());
}

#[test]
fn kvm_net_host_pings_guest_and_bad_taps_and_macs_are_refused() {
    if !net_available("kvm_net_host_pings_guest_and_bad_taps_and_macs_are_refused") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let ns = Netns::new().unwrap();
    ns.add_tap("rvtap0", "10.77.0.1/24").unwrap();
    let ctl = dir.path().join("c.sock");
    let mut args = vec!["--kernel"];
    args.extend(boot_args(
        "rt.net=10.77.0.2",
        "tap=rvtap0,mac=02:00:00:00:77:02",
        ctl.to_str().unwrap(),
    ));
    let mut vm = vmm_in(&ns, dir.path(), &args);
    let ready = report_starting(dir.path(), "PASS net_ready");
    assert_eq!(field(&ready, "ip"), Some("10.77.0.2"), "{ready}");
    assert_eq!(field(&ready, "mac"), Some("02:00:00:00:77:02"), "{ready}");
    let rtts = ns.ping("10.77.0.2", 5, 0.05, 2);
    assert_eq!(rtts.len(), 5, "every echo answered: {rtts:?}");
    // An address nobody has: the guest answers neither its ARP nor pings.
    assert!(ns.ping("10.77.0.3", 2, 0.2, 1).is_empty());
    let neigh = ns
        .command("ip")
        .args(["neigh", "show", "10.77.0.2"])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&neigh.stdout).contains("02:00:00:00:77:02"),
        "the host learned the guest's MAC over ARP"
    );

    // The TAP is busy while this VMM holds it.
    let dir2 = tempfile::tempdir().unwrap();
    let kernel = test_guests::guest_path();
    let k = kernel.to_str().unwrap();
    let e = refused(&ns, dir2.path(), &["--kernel", k, "--net", "tap=rvtap0"]);
    assert!(e.contains("rvtap0") && e.contains("in use"), "{e}");
    stop(&ctl, &mut vm);

    // A TAP that does not exist is not created on the fly.
    let e = refused(&ns, dir2.path(), &["--kernel", k, "--net", "tap=rvnosuch"]);
    assert!(
        e.contains("rvnosuch") && e.contains("does not exist"),
        "{e}"
    );
    // An interface that is not a TAP.
    let e = refused(&ns, dir2.path(), &["--kernel", k, "--net", "tap=lo"]);
    assert!(e.contains("not a TAP"), "{e}");
    for (mac, why) in [
        ("02:00:00:00:00", "fewer than six"),
        ("02:00:00:00:00:zz", "two hex digits"),
        ("03:00:00:00:00:01", "multicast"),
    ] {
        let net = format!("tap=rvtap0,mac={mac}");
        let e = refused(&ns, dir2.path(), &["--kernel", k, "--net", &net]);
        assert!(e.contains("MAC address") && e.contains(why), "{mac}: {e}");
    }
    let e = refused(&ns, dir2.path(), &["--kernel", k, "--net", "tap=a/b"]);
    assert!(e.contains("TAP name"), "{e}");
    // After all that the TAP is free again: a new VM answers on it.
    let dir3 = tempfile::tempdir().unwrap();
    let ctl3 = dir3.path().join("c.sock");
    let mut args = vec!["--kernel"];
    args.extend(boot_args(
        "rt.net=10.77.0.2",
        "tap=rvtap0",
        ctl3.to_str().unwrap(),
    ));
    let mut vm = vmm_in(&ns, dir3.path(), &args);
    report_starting(dir3.path(), "PASS net_ready");
    assert_eq!(ns.ping("10.77.0.2", 2, 0.05, 2).len(), 2);
    stop(&ctl3, &mut vm);
}

#[test]
fn kvm_net_clones_answer_on_their_own_taps_for_their_own_addresses() {
    if !net_available("kvm_net_clones_answer_on_their_own_taps_for_their_own_addresses") {
        return;
    }
    let tdir = tempfile::tempdir().unwrap();
    let snap = tdir.path().join("snap");
    std::fs::create_dir(&snap).unwrap();
    let tns = Netns::new().unwrap();
    tns.add_tap("rvtpl", "10.78.0.1/16").unwrap();
    let tctl = tdir.path().join("c.sock");
    let mut args = vec!["--kernel"];
    args.extend(boot_args(
        "rt.net=10.78.0.2",
        "tap=rvtpl",
        tctl.to_str().unwrap(),
    ));
    let mut template = vmm_in(&tns, tdir.path(), &args);
    report_starting(tdir.path(), "PASS net_ready");
    // Snapshot with traffic in flight: a ping every 5 ms while the template is snapshotted.
    let pinger = {
        let name = tns.name.clone();
        std::thread::spawn(move || {
            std::process::Command::new("ip")
                .args([
                    "netns", "exec", &name, "ping", "-n", "-c", "200", "-i", "0.005",
                ])
                .args(["-W", "1", "10.78.0.2"])
                .output()
                .unwrap()
        })
    };
    std::thread::sleep(Duration::from_millis(300));
    let mut c = control(&tctl);
    c.snapshot(&snap).unwrap();
    c.resume().unwrap();
    let out = pinger.join().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("from 10.78.0.2"),
        "template answered around the snapshot: {text}"
    );

    // A clone restored without its own network gets the template's TAP: busy (and absent
    // from other namespaces).
    let bad = tempfile::tempdir().unwrap();
    let s = snap.to_str().unwrap();
    let e = refused(&tns, bad.path(), &["--restore", s]);
    assert!(e.contains("rvtpl") && e.contains("in use"), "{e}");

    // Two clones, each in its own namespace with its own TAP, MAC and address.
    let mut clones = Vec::new();
    for (i, tap) in [(1u8, "rvc1"), (2, "rvc2")] {
        let ns = Netns::new().unwrap();
        ns.add_tap(tap, "10.79.0.1/16").unwrap();
        let dir = tempfile::tempdir().unwrap();
        let ctl = dir.path().join("c.sock");
        let net = format!("tap={tap},mac=02:00:00:00:79:0{i},ipv4=10.79.{i}.2");
        let child = vmm_in(
            &ns,
            dir.path(),
            &[
                "--restore",
                s,
                "--mem-mode",
                "cow",
                "--clone-id",
                tap,
                "--net",
                &net,
                "--control",
                ctl.to_str().unwrap(),
            ],
        );
        let r = report_starting(dir.path(), "PASS net_resumed");
        assert_eq!(
            field(&r, "ip"),
            Some(format!("10.79.{i}.2").as_str()),
            "{r}"
        );
        assert_eq!(
            field(&r, "mac"),
            Some(format!("02:00:00:00:79:0{i}").as_str()),
            "{r}"
        );
        clones.push((ns, dir, ctl, child));
    }
    for (i, (ns, ..)) in clones.iter().enumerate() {
        let (own, other) = if i == 0 {
            ("10.79.1.2", "10.79.2.2")
        } else {
            ("10.79.2.2", "10.79.1.2")
        };
        assert_eq!(
            ns.ping(own, 3, 0.05, 2).len(),
            3,
            "clone {i} answers for {own}"
        );
        assert!(
            ns.ping(other, 2, 0.2, 1).is_empty(),
            "clone {i} answered for {other}"
        );
    }
    // A third clone through the typed control API: an idle shell in its own namespace,
    // restored with `RestoreOptions::net`.
    let ns3 = Netns::new().unwrap();
    ns3.add_tap("rvc3", "10.79.0.1/16").unwrap();
    let dir3 = tempfile::tempdir().unwrap();
    let ctl3 = dir3.path().join("c.sock");
    let mut shell = vmm_in(
        &ns3,
        dir3.path(),
        &[
            "--shell",
            "--mem-mib",
            "32",
            "--control",
            ctl3.to_str().unwrap(),
        ],
    );
    let mut opts = vmm_api::RestoreOptions::new(&snap, vmm_api::MemoryMode::Cow);
    opts.clone_id = "rvc3".into();
    opts.debug_log = Some(dir3.path().join("debug.log").display().to_string());
    opts.net = Some("tap=rvc3,ipv4=10.79.3.2".parse().unwrap());
    control(&ctl3).restore(&opts).unwrap();
    let r = report_starting(dir3.path(), "PASS net_resumed");
    assert_eq!(field(&r, "ip"), Some("10.79.3.2"), "{r}");
    assert_eq!(ns3.ping("10.79.3.2", 2, 0.05, 2).len(), 2);
    assert!(ns3.ping("10.79.1.2", 1, 0.2, 1).is_empty());
    stop(&ctl3, &mut shell);

    // The template still answers on its own TAP, for its own address.
    assert_eq!(tns.ping("10.78.0.2", 2, 0.05, 2).len(), 2);
    for (_, _, ctl, mut child) in clones {
        stop(&ctl, &mut child);
    }
    stop(&tctl, &mut template);
}

#[test]
fn kvm_net_settings_for_a_snapshot_without_a_network_device_are_refused() {
    if !net_available("kvm_net_settings_for_a_snapshot_without_a_network_device_are_refused") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let snap = dir.path().join("snap");
    let mut cfg = guest_config("rt.counter", dir.path());
    cfg.mem_mib = 32;
    cfg.control = Some(dir.path().join("t.sock"));
    snapshot_counter_guest(cfg, &snap, Duration::from_millis(50));
    let mut opts = vmm_api::RestoreOptions::new(&snap, vmm_api::MemoryMode::Cow);
    opts.net = Some("tap=rvx0".parse().unwrap());
    let e = vmm::Vmm::restore(&opts).err().unwrap().to_string();
    assert!(e.contains("no network device"), "{e}");
    opts.net = Some(vmm_api::NetConfig {
        tap: "bad/name".into(),
        mac: None,
        ipv4: None,
    });
    let e = vmm::Vmm::restore(&opts).err().unwrap().to_string();
    assert!(e.contains("TAP name"), "{e}");
}
