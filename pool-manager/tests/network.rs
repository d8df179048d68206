//! Sandbox networking through the pool, with real KVM clones of the test guest's `rt.net`, real
//! network namespaces, TAPs, veths and nftables rules: each sandbox answers ping from its own
//! namespace for its own address, and a release leaves nothing behind.

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;
use pool_manager::network::{self, PoolNetwork};
use pool_manager::{AcquireRequest, Pool, PoolError, PoolTargets, SandboxInfo, Tier};

/// Pings `addr` from namespace `ns` (up to 3 tries, 2 s each): whether a reply came.
fn ping_from(ns: &str, addr: &str) -> bool {
    Command::new("ip")
        .args([
            "netns", "exec", ns, "ping", "-n", "-c", "1", "-W", "2", addr,
        ])
        .output()
        .is_ok_and(|o| {
            o.status.success()
                && String::from_utf8_lossy(&o.stdout).contains(&format!("from {addr}:"))
        })
        || (1..3).any(|_| {
            Command::new("ip")
                .args([
                    "netns", "exec", ns, "ping", "-n", "-c", "1", "-W", "2", addr,
                ])
                .status()
                .is_ok_and(|s| s.success())
        })
}

/// Names in `ip netns list` / `/sys/class/net` that the pool made: what must be gone.
fn leftovers() -> Vec<String> {
    let mut left: Vec<String> = std::fs::read_dir("/run/netns")
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with("runv-vm-"))
                .collect()
        })
        .unwrap_or_default();
    if let Ok(d) = std::fs::read_dir("/sys/class/net") {
        left.extend(
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| {
                    n.starts_with(network::TAP_PREFIX) || n.starts_with(network::VETH_PREFIX)
                }),
        );
    }
    left
}

fn acquire(pool: &Pool, id: &str, network: Option<bool>) -> Result<SandboxInfo, PoolError> {
    pool.acquire(AcquireRequest {
        template: "net".into(),
        id: Some(id.into()),
        network,
        ..Default::default()
    })
}

#[test]
fn fifty_networked_sandboxes_answer_for_their_own_address_and_leave_nothing() {
    if !net_available("fifty_networked_sandboxes_answer_for_their_own_address_and_leave_nothing") {
        return;
    }
    let before = leftovers();
    let dirs = Dirs::new();
    let pool = Pool::open(dirs.config()).unwrap();
    pool.build_template("net", &net_counter_spec()).unwrap();
    let net = PoolNetwork {
        subnet: network::parse_subnet("10.201.0.0/16").unwrap(),
        egress: true,
    };
    pool.set_pool(
        "net",
        PoolTargets {
            warm: 2,
            shells: 1,
            network: Some(net),
            ..Default::default()
        },
    )
    .unwrap();
    let mut tiers = [0usize; 3];
    let mut addrs = std::collections::HashSet::new();
    for i in 0..50 {
        let sb = acquire(&pool, &format!("n{i}"), None).unwrap();
        tiers[sb.tier as usize] += 1;
        let n = sb
            .network
            .clone()
            .expect("a networked pool gives a network");
        assert_eq!(n.prefix, 30);
        assert!(n.egress && n.veth.is_some());
        assert_eq!(n.nft_handles.len(), 3, "{n:?}");
        assert_eq!(network::nft_rules(Some(&vm_of(&sb))).unwrap(), 3);
        assert!(
            addrs.insert(n.ipv4),
            "address {} leased twice at once",
            n.ipv4
        );
        assert!(
            ping_from(&n.netns, &n.ipv4.to_string()),
            "sandbox {} ({:?} tier) does not answer ping for {} from {}",
            sb.id,
            sb.tier,
            n.ipv4,
            n.netns
        );
        // Only for its own address: the template's is not answered. The VMM answering runs
        // jailed, in a network namespace of its own (not the sandbox's, where its TAP is).
        if i == 0 {
            assert_jailed(sb.pid);
            // Its TAP is owned by the jail's ids (so the unprivileged VMM could attach it).
            let link = Command::new("ip")
                .args(["-n", &n.netns, "-details", "link", "show", &n.tap])
                .output()
                .unwrap();
            let link = String::from_utf8_lossy(&link.stdout);
            let id = pool_manager::vmm_api::jail::DEFAULT_JAIL_ID;
            assert!(
                link.contains(&format!("persist on user {id} group {id}")),
                "{link}"
            );
            assert!(!ping_from_once(&n.netns, "10.99.0.2"));
        }
        pool.release(&sb.id).unwrap();
        addrs.remove(&n.ipv4);
    }
    eprintln!("tiers (warm, shell, cold): {tiers:?}");
    assert!(tiers[Tier::Warm as usize] > 0, "no warm acquire: {tiers:?}");
    pool.set_pool("net", PoolTargets::default()).unwrap();
    wait_until("every network freed", Duration::from_secs(30), || {
        pool.network_leases() == 0 && leftovers().len() <= before.len()
    });
    assert_eq!(network::nft_rules(None).unwrap(), 0, "nftables rules left");
    drop(pool);
    let left: Vec<_> = leftovers()
        .into_iter()
        .filter(|n| !before.contains(n))
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}

#[test]
fn a_sandbox_without_network_has_none_and_asking_for_one_without_a_pool_network_fails() {
    if !net_available(
        "a_sandbox_without_network_has_none_and_asking_for_one_without_a_pool_network_fails",
    ) {
        return;
    }
    let dirs = Dirs::new();
    let pool = Pool::open(dirs.config()).unwrap();
    pool.build_template("net", &net_counter_spec()).unwrap();
    // No network in the pool: asking for one is refused, saying what to do.
    let err = acquire(&pool, "want", Some(true)).unwrap_err();
    assert!(err.to_string().contains("has no network"), "{err}");
    // A template without a network device cannot get a pool network.
    pool.build_template("plain", &counter_spec()).unwrap();
    let err = pool
        .set_pool(
            "plain",
            PoolTargets {
                network: Some(PoolNetwork {
                    subnet: network::parse_subnet("10.202.0.0/24").unwrap(),
                    egress: false,
                }),
                ..Default::default()
            },
        )
        .unwrap_err();
    assert!(err.to_string().contains("net: true"), "{err}");
    pool.set_pool(
        "net",
        PoolTargets {
            warm: 1,
            network: Some(PoolNetwork {
                subnet: network::parse_subnet("10.202.0.0/24").unwrap(),
                egress: false,
            }),
            ..Default::default()
        },
    )
    .unwrap();
    wait_until("a warm clone", Duration::from_secs(20), || {
        pool.pools()[0].warm == 1
    });
    // The pooled warm clone had its network; acquired without one, it is taken down and its
    // TAP is back in the host's namespace (for a caller joining it to a CRI pod).
    let sb = acquire(&pool, "none", Some(false)).unwrap();
    assert_eq!(sb.tier, Tier::Warm);
    assert!(sb.network.is_none());
    assert!(!leftovers()
        .iter()
        .any(|n| n.starts_with("runv-") && n.contains(&vm_of(&sb)[3..])));
    let tap = sb.tap.clone().expect("the VM's TAP");
    assert!(std::path::Path::new("/sys/class/net").join(&tap).exists());
    // One with a network but no egress: no veth, no rules, still answers.
    let sb2 = acquire(&pool, "some", None).unwrap();
    let n = sb2.network.clone().unwrap();
    assert!(n.veth.is_none() && n.nft_handles.is_empty());
    assert!(ping_from(&n.netns, &n.ipv4.to_string()));
    pool.release("none").unwrap();
    pool.release("some").unwrap();
    pool.set_pool("net", PoolTargets::default()).unwrap();
    wait_until("every network freed", Duration::from_secs(30), || {
        pool.network_leases() == 0 && !std::path::Path::new("/sys/class/net").join(&tap).exists()
    });
}

/// One ping, 1 s: whether it was answered.
fn ping_from_once(ns: &str, addr: &str) -> bool {
    Command::new("ip")
        .args([
            "netns", "exec", ns, "ping", "-n", "-c", "1", "-W", "1", addr,
        ])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// The VM name (`vm-<hex>`) behind a sandbox, from its control socket.
fn vm_of(sb: &SandboxInfo) -> String {
    sb.control
        .file_stem()
        .unwrap()
        .to_string_lossy()
        .into_owned()
}
