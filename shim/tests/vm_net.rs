//! The vm backend's network on real KVM: a spec naming a pod network namespace (made here as CNI
//! would: a veth `eth0` with an address and a default route) gets a clone whose TAP is joined to
//! the pod's interface with tc mirred, and the guest (the test guest's `rt.agent`) receives the
//! pod's address, gateway, MAC and DNS through `set_network`; release removes the redirects and
//! the TAP. Also: a warm clone pooled with the pool's network serves a pod (its TAP kept), a spec
//! without a namespace gets the pool's address, and a template without a network device is
//! refused clearly.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use pool_manager::network::{self, PoolNetwork};
use pool_manager::{Pool, PoolConfig, PoolTargets, ReadyCheck, TemplateSpec, Tier};
use shim::sandbox::vm::{Hooks, NetPlan, Source, VmConfig, VmError, VmSandbox};
use test_guests::netns::Netns;

fn usable(test: &str) -> bool {
    if std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_err()
    {
        println!("SKIPPED: {test}: /dev/kvm is not usable");
        return false;
    }
    if let Some(why) = network::unavailable(false) {
        println!("SKIPPED: {test}: {why}");
        return false;
    }
    true
}

fn wait_report(log: &Path, what: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if let Some(l) = text
            .lines()
            .find(|l| l.starts_with(&format!("REPORT PASS {what}")))
        {
            return l.to_string();
        }
        assert!(Instant::now() < deadline, "no PASS {what} in:\n{text}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn ip_in(ns: &Netns, args: &[&str]) -> String {
    let out = ns.command("ip").args(args).output().unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn tc_in(ns: &Netns, args: &[&str]) -> String {
    let out = ns.command("tc").args(args).output().unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A pod namespace as CNI leaves it: `eth0` (a veth whose peer is in `host`) with
/// `10.212.0.5/24`, default route via `10.212.0.1`. Returns eth0's MAC.
fn pod_network(pod: &Netns, host: &Netns) -> String {
    let peer = format!("rvp{}", std::process::id() % 1_000_000);
    let ok = Command::new("ip")
        .args(["-n", &pod.name, "link", "add", "eth0", "type", "veth"])
        .args(["peer", "name", &peer, "netns", &host.name])
        .status()
        .unwrap()
        .success();
    assert!(ok, "making the pod's veth");
    for args in [
        vec!["addr", "add", "10.212.0.5/24", "dev", "eth0"],
        vec!["link", "set", "eth0", "up"],
        vec!["route", "add", "default", "via", "10.212.0.1"],
    ] {
        assert!(pod.command("ip").args(&args).status().unwrap().success());
    }
    let link: serde_json::Value =
        serde_json::from_str(&ip_in(pod, &["-j", "link", "show", "eth0"])).unwrap();
    link[0]["address"].as_str().unwrap().to_string()
}

struct Fixture {
    pool: Option<Arc<Pool>>,
    tmp: tempfile::TempDir,
    shm: PathBuf,
}

impl Fixture {
    fn new() -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let shm = PathBuf::from(format!("/dev/shm/runv-shim-net-{}", std::process::id()));
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

    fn template(&self, name: &str, net: bool) {
        let spec = TemplateSpec {
            kernel: test_guests::guest_path(),
            initrd: None,
            cmdline: "rt.agent".into(),
            mem_mib: 64,
            vcpus: 1,
            ready: ReadyCheck::Report,
            slots: 1,
            net,
            mem_mode: Default::default(),
            warmup_ms: 0,
        };
        self.pool().build_template(name, &spec).unwrap();
    }

    fn config(&self, template: &str) -> VmConfig {
        let mut c = VmConfig::new(template);
        c.image_cache = self.tmp.path().join("images");
        c.agent_timeout = Duration::from_secs(10);
        c
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        self.pool.take();
        let _ = std::fs::remove_dir_all(&self.shm);
    }
}

fn pod_spec(netns: Option<&Path>, resolv: &Path) -> oci_spec::runtime::Spec {
    let mut ns = vec![serde_json::json!({"type": "pid"})];
    if let Some(p) = netns {
        ns.push(serde_json::json!({"type": "network", "path": p}));
    }
    serde_json::from_value(serde_json::json!({
        "ociVersion": "1.0.2",
        "mounts": [{"destination": "/etc/resolv.conf", "source": resolv, "type": "bind",
                    "options": ["rbind", "ro"]}],
        "linux": {"namespaces": ns}
    }))
    .unwrap()
}

/// The clone's TAP is in the pod namespace with redirects both ways, the guest got the pod's
/// values; after release neither redirect nor TAP is left.
fn check_pod_sandbox(sb: VmSandbox, pod: &Netns, mac: &str) {
    let tap = sb.pod().expect("joined to the pod").tap.clone();
    assert_eq!(sb.info().tap.as_deref(), Some(tap.as_str()));
    let eth0 = tc_in(pod, &["filter", "show", "dev", "eth0", "parent", "ffff:"]);
    assert!(
        eth0.contains("mirred") && eth0.contains(&tap),
        "no redirect eth0 -> {tap}: {eth0}"
    );
    let back = tc_in(pod, &["filter", "show", "dev", &tap, "parent", "ffff:"]);
    assert!(
        back.contains("mirred") && back.contains("eth0"),
        "no redirect {tap} -> eth0: {back}"
    );
    let r = wait_report(&sb.info().debug_log, "agent_hook op=set_network");
    assert_eq!(
        r,
        format!(
            "REPORT PASS agent_hook op=set_network ipv4=10.212.0.5/24 gw=10.212.0.1 mac={mac} dns=10.96.0.10"
        )
    );
    let mut sb = sb;
    sb.release().unwrap();
    assert!(
        !tc_in(pod, &["qdisc", "show", "dev", "eth0"]).contains("ingress"),
        "the ingress redirect on eth0 is left"
    );
    assert!(
        !ip_in(pod, &["-o", "link"]).contains(&tap),
        "the TAP is left in the pod"
    );
    assert!(!Path::new("/sys/class/net").join(&tap).exists());
}

#[test]
fn a_spec_naming_a_pod_netns_joins_the_clone_to_it_and_the_guest_gets_its_address() {
    let test = "a_spec_naming_a_pod_netns_joins_the_clone_to_it_and_the_guest_gets_its_address";
    if !usable(test) {
        return;
    }
    let fx = Fixture::new();
    fx.template("net", true);
    fx.template("plain", false);
    let source = Source::Embedded(fx.pool().clone());
    let resolv = fx.tmp.path().join("resolv.conf");
    std::fs::write(&resolv, "search svc.cluster.local\nnameserver 10.96.0.10\n").unwrap();
    let host = Netns::new().unwrap();
    let pod = Netns::new().unwrap();
    let mac = pod_network(&pod, &host);
    let pod_path = PathBuf::from("/run/netns").join(&pod.name);
    let spec = pod_spec(Some(&pod_path), &resolv);
    let plan = NetPlan::from_spec(&spec);
    let hooks = Hooks::fresh(Some("pod".into())).unwrap();

    // A cold clone (nothing pooled).
    let (sb, _c) = VmSandbox::start_with(&fx.config("net"), &source, "c1", &hooks, &plan).unwrap();
    assert_eq!(sb.info().network, None, "a pod sandbox has no pool network");
    check_pod_sandbox(sb, &pod, &mac);

    // A warm clone pooled with the pool's network: its TAP comes back out of the pool's
    // namespace for the pod.
    fx.pool()
        .set_pool(
            "net",
            PoolTargets {
                warm: 1,
                network: Some(PoolNetwork {
                    subnet: network::parse_subnet("10.214.0.0/24").unwrap(),
                    egress: false,
                }),
                ..Default::default()
            },
        )
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !fx
        .pool()
        .pools()
        .iter()
        .any(|p| p.template == "net" && p.warm > 0)
    {
        assert!(Instant::now() < deadline, "no warm clone");
        std::thread::sleep(Duration::from_millis(20));
    }
    let (sb, _c) = VmSandbox::start_with(&fx.config("net"), &source, "c2", &hooks, &plan).unwrap();
    assert_eq!(sb.info().tier, Tier::Warm);
    check_pod_sandbox(sb, &pod, &mac);

    // No namespace in the spec: the pool's network, its address through set_network.
    let plain = NetPlan::from_spec(&pod_spec(None, &resolv));
    let (mut sb, _c) =
        VmSandbox::start_with(&fx.config("net"), &source, "c3", &hooks, &plain).unwrap();
    let n = sb.info().network.clone().expect("the pool's network");
    assert!(sb.pod().is_none());
    let r = wait_report(&sb.info().debug_log, "agent_hook op=set_network");
    assert_eq!(
        r,
        format!(
            "REPORT PASS agent_hook op=set_network ipv4={}/30 gw={} mac=- dns=10.96.0.10",
            n.ipv4, n.gateway
        )
    );
    sb.release().unwrap();

    // A template without a network device: refused, naming the template and the namespace;
    // nothing stays leased.
    let Err(e) = VmSandbox::start_with(&fx.config("plain"), &source, "c4", &hooks, &plan) else {
        panic!("a template without a net device joined a pod");
    };
    assert!(matches!(e, VmError::NoNetDevice { .. }), "{e}");
    let msg = e.to_string();
    assert!(
        msg.contains("plain") && msg.contains(&pod.name) && msg.contains("--net"),
        "{msg}"
    );
    assert!(fx.pool().sandboxes().is_empty());
    assert!(!tc_in(&pod, &["qdisc", "show", "dev", "eth0"]).contains("ingress"));
}
