//! The `set_network` clone hook (`agent::netconf::apply`) in a network namespace this test
//! creates, on a veth interface: addresses replaced (the old ones removed), MAC, MTU, link up,
//! routes, resolv.conf; bad requests refused before anything changes; and a host-process agent
//! refusing the request.

mod common;

use std::os::fd::AsRawFd;
use std::process::Command;

use agent::netconf::apply;
use protocol::{ErrorCode, InterfaceConfig, Request, Response, RouteConfig};

fn ip(args: &[&str]) -> String {
    let out = Command::new("ip").args(args).output().expect("running ip");
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A namespace of our own, deleted on drop.
struct Ns(String);

impl Drop for Ns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

fn iface(addresses: &[&str], mac: Option<&str>, mtu: Option<u32>) -> InterfaceConfig {
    InterfaceConfig {
        name: "rv0".into(),
        mac: mac.map(Into::into),
        addresses: addresses.iter().map(|a| a.to_string()).collect(),
        mtu,
    }
}

#[test]
fn set_network_replaces_addresses_and_sets_mac_mtu_routes_and_dns() {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let have_ip = Command::new("ip").arg("-V").output().is_ok();
    if !root || !have_ip {
        println!("SKIPPED: set_network: needs root and iproute2");
        return;
    }
    let ns = Ns(format!("rvnc{}", std::process::id()));
    ip(&["netns", "add", &ns.0]);
    // A veth pair (its peer up, so rv0 gets a carrier once it is up).
    ip(&[
        "-n", &ns.0, "link", "add", "rv0", "type", "veth", "peer", "name", "rv1",
    ]);
    ip(&["-n", &ns.0, "link", "set", "rv1", "up"]);
    // What a clone resumes with: the template's address.
    ip(&["-n", &ns.0, "addr", "add", "10.50.0.2/24", "dev", "rv0"]);
    let dir = tempfile::tempdir().unwrap();
    let resolv = dir.path().join("resolv.conf");
    let name = ns.0.clone();
    let r = resolv.clone();
    let results = std::thread::spawn(move || {
        let f = std::fs::File::open(format!("/run/netns/{name}")).unwrap();
        // SAFETY: setns on an fd we own; only this thread moves, and it ends here.
        let rc = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns");
        let bad = [
            apply(&[iface(&["10.60.0.2"], None, None)], &[], &[], &r),
            apply(&[iface(&["10.60.0.2/33"], None, None)], &[], &[], &r),
            apply(&[iface(&[], Some("01:00:00:00:00:01"), None)], &[], &[], &r),
            apply(&[iface(&[], None, None)], &[], &["not-an-ip".into()], &r),
            apply(
                &[InterfaceConfig {
                    name: "nosuch0".into(),
                    mac: None,
                    addresses: vec![],
                    mtu: None,
                }],
                &[],
                &[],
                &r,
            ),
        ]
        .map(|res| res.unwrap_err().to_string());
        let good = apply(
            &[iface(
                &["10.60.0.2/24", "10.61.0.2/16"],
                Some("02:00:00:00:60:02"),
                Some(1400),
            )],
            &[
                RouteConfig {
                    destination: "default".into(),
                    gateway: "10.60.0.1".into(),
                },
                RouteConfig {
                    destination: "192.168.7.0/24".into(),
                    gateway: "10.61.0.1".into(),
                },
            ],
            &["10.60.0.53".into()],
            &r,
        );
        // Applying twice is fine (routes replaced, addresses the same).
        let again = apply(&[iface(&["10.60.0.2/24"], None, None)], &[], &[], &r);
        (
            bad,
            good.map_err(|e| e.to_string()),
            again.map_err(|e| e.to_string()),
        )
    })
    .join()
    .unwrap();
    let (bad, good, again) = results;
    for (e, want) in bad.iter().zip([
        "prefix length",
        "prefix length",
        "MAC",
        "name server",
        "no interface nosuch0",
    ]) {
        assert!(e.contains(want), "{e}");
    }
    good.unwrap();
    again.unwrap();
    let link = ip(&["-n", &ns.0, "link", "show", "rv0"]);
    assert!(
        link.contains("02:00:00:00:60:02") && link.contains("mtu 1400"),
        "{link}"
    );
    assert!(link.contains(",UP") || link.contains("<UP"), "{link}");
    let addrs = ip(&["-n", &ns.0, "-4", "addr", "show", "rv0"]);
    assert!(addrs.contains("10.60.0.2/24"), "{addrs}");
    assert!(
        !addrs.contains("10.50.0.2"),
        "the template's address stayed: {addrs}"
    );
    assert!(
        !addrs.contains("10.61.0.2"),
        "the second apply left an address: {addrs}"
    );
    let routes = ip(&["-n", &ns.0, "-4", "route"]);
    assert!(routes.contains("default via 10.60.0.1 dev rv0"), "{routes}");
    assert_eq!(
        std::fs::read_to_string(&resolv).unwrap(),
        "nameserver 10.60.0.53\n"
    );
}

#[test]
fn a_host_process_agent_refuses_to_configure_its_hosts_network() {
    let agent = common::Agent::start();
    let mut c = agent.client();
    let r = c
        .call(&Request::SetNetwork {
            interfaces: vec![iface(&["10.60.0.2/24"], None, None)],
            routes: vec![],
            dns: vec![],
        })
        .unwrap();
    match r {
        Response::Error(e) => {
            assert_eq!(e.code, ErrorCode::InvalidState, "{e:?}");
            assert!(e.message.contains("configure the network"), "{e:?}");
        }
        other => panic!("set_network accepted by a host process: {other:?}"),
    }
}
