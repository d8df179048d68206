//! A networked template's build VM runs jailed: its VMM proper runs as the pool's jail uid,
//! without capabilities, in a network namespace made for the build (`runv-build-<hex>`) that
//! holds its TAP, owned by the jail uid; after the build the namespace, the TAP, the jail
//! directory and the cgroup are gone, and the template's clones still get working networks.

mod common;

use std::os::unix::fs::MetadataExt;
use std::process::Command;
use std::time::Duration;

use common::*;
use pool_manager::network::{self, PoolNetwork};
use pool_manager::{AcquireRequest, Pool, PoolTargets, TemplateSpec};

/// What the watcher saw of the jailed build VMM proper.
#[derive(Debug, Default)]
struct Seen {
    /// (Uid line, CapEff) of each sighting of a non-root build VMM.
    vmm: Vec<(String, String)>,
    /// Its `--jail-id`.
    jail_id: Option<String>,
    /// Whether its network namespace was `/run/netns/runv-<jail id>` (inode compared).
    in_build_netns: bool,
    /// `ip -d link show` inside that namespace.
    links: String,
}

impl Seen {
    /// The build TAP's name (`rvtb<hex>`), from `links`.
    fn tap(&self) -> String {
        let (_, rest) = self.links.split_once(": rvtb").expect("a build TAP");
        let end = rest.find([':', '@']).unwrap_or(rest.len());
        format!("rvtb{}", &rest[..end])
    }
}

fn args_of(pid: u32) -> Vec<String> {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .unwrap_or_default()
        .split(|&b| b == 0)
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect()
}

/// One look at the build VMM (command line ending in `/build-<template>.sock`).
fn look(template: &str, seen: &mut Seen) {
    let sock = format!("/build-{template}.sock");
    for pid in std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
    {
        let args = args_of(pid);
        if !args.iter().any(|a| a.ends_with(&sock)) {
            continue;
        }
        let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
            continue;
        };
        let field = |k: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(k))
                .unwrap_or("")
                .split_whitespace()
                .collect::<Vec<_>>()
                .join(" ")
        };
        let uid = field("Uid:");
        if uid.starts_with("0 ") {
            // The keeper (root), or the child before it drops its privileges.
            continue;
        }
        seen.vmm.push((uid, field("CapEff:")));
        let id = args
            .iter()
            .position(|a| a == "--jail-id")
            .and_then(|i| args.get(i + 1).cloned());
        if let (Some(id), None) = (&id, &seen.jail_id) {
            let ns = format!("runv-{id}");
            let bound = std::fs::metadata(format!("/run/netns/{ns}")).map(|m| m.ino());
            let own = std::fs::read_link(format!("/proc/{pid}/ns/net"));
            if let (Ok(ino), Ok(own)) = (bound, own) {
                seen.in_build_netns = own.to_string_lossy() == format!("net:[{ino}]");
                let out = Command::new("ip")
                    .args(["-n", &ns, "-details", "link", "show"])
                    .output()
                    .unwrap();
                seen.links = String::from_utf8_lossy(&out.stdout).into_owned();
                seen.jail_id = Some(id.clone());
            }
        }
    }
}

#[test]
fn a_networked_template_build_runs_jailed_in_its_own_netns_and_leaves_nothing() {
    let test = "a_networked_template_build_runs_jailed_in_its_own_netns_and_leaves_nothing";
    if !net_available(test) {
        return;
    }
    let dirs = Dirs::new();
    let pool = Pool::open(dirs.config()).unwrap();
    let spec = TemplateSpec {
        // Time for the watcher to look at the running build VM.
        warmup_ms: 300,
        ..net_counter_spec()
    };
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watcher = {
        let done = done.clone();
        std::thread::spawn(move || {
            let mut seen = Seen::default();
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                look("jnet", &mut seen);
                std::thread::sleep(Duration::from_millis(5));
            }
            seen
        })
    };
    pool.build_template("jnet", &spec).unwrap();
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    let seen = watcher.join().unwrap();
    eprintln!(
        "build VMM sightings: {}, jail {:?}",
        seen.vmm.len(),
        seen.jail_id
    );

    let id = pool_manager::vmm_api::jail::DEFAULT_JAIL_ID;
    assert!(!seen.vmm.is_empty(), "no unprivileged build VMM seen");
    let want = (
        format!("{id} {id} {id} {id}"),
        "0000000000000000".to_string(),
    );
    assert!(seen.vmm.iter().all(|v| *v == want), "{:?}", seen.vmm);
    let jail_id = seen.jail_id.clone().expect("the build VMM's jail id");
    assert!(jail_id.starts_with("build-"), "{jail_id}");
    assert!(
        seen.in_build_netns,
        "the build VMM is not in runv-{jail_id}"
    );
    // Its TAP, the only link there besides lo, is owned by the jail uid/gid.
    assert!(seen.links.contains(": rvtb"), "{}", seen.links);
    assert!(
        seen.links
            .contains(&format!("persist on user {id} group {id}")),
        "{}",
        seen.links
    );

    // Nothing of the build is left: namespace, TAP (here or anywhere), jail files, cgroup.
    let tap = seen.tap();
    let ns = format!("/run/netns/runv-{jail_id}");
    assert!(!std::path::Path::new(&ns).exists(), "{ns} left");
    assert!(
        !std::path::Path::new("/sys/class/net").join(&tap).exists(),
        "build TAP {tap} left in the host's namespace"
    );
    let left: Vec<_> = std::fs::read_dir(dirs.run())
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("build-"))
        .collect();
    assert!(left.is_empty(), "build jail leftovers: {left:?}");
    assert!(
        !pool_manager::vmm_api::jail::Cgroup::of(&jail_id).exists(),
        "cgroup of {jail_id} left"
    );
    let durable = dirs.state().join("templates/jnet");
    for f in ["", "state.bin", "memory.bin"] {
        let m = std::fs::metadata(durable.join(f)).unwrap();
        assert_eq!((m.uid(), m.gid()), (0, 0), "{f}");
    }

    // The snapshot's network device still works: a clone answers for its own address.
    pool.set_pool(
        "jnet",
        PoolTargets {
            warm: 1,
            network: Some(PoolNetwork {
                subnet: network::parse_subnet("10.203.0.0/16").unwrap(),
                egress: false,
            }),
            ..Default::default()
        },
    )
    .unwrap();
    let sb = pool
        .acquire(AcquireRequest {
            template: "jnet".into(),
            id: Some("jnet-1".into()),
            ..Default::default()
        })
        .unwrap();
    let n = sb
        .network
        .clone()
        .expect("a networked pool gives a network");
    let answered = (0..3).any(|_| {
        Command::new("ip")
            .args(["netns", "exec", &n.netns])
            .args(["ping", "-n", "-c", "1", "-W", "2", &n.ipv4.to_string()])
            .status()
            .is_ok_and(|s| s.success())
    });
    assert!(answered, "the clone does not answer ping for {}", n.ipv4);
    pool.release(&sb.id).unwrap();
    let run = dirs.run();
    drop(pool);
    assert!(dirs.run_files().is_empty(), "left: {:?}", dirs.run_files());
    assert!(processes_mentioning(run.to_str().unwrap()).is_empty());
}

#[test]
fn a_networked_build_whose_vmm_is_killed_fails_and_leaves_no_netns() {
    let test = "a_networked_build_whose_vmm_is_killed_fails_and_leaves_no_netns";
    if !net_available(test) {
        return;
    }
    let dirs = Dirs::new();
    let pool = Pool::open(dirs.config()).unwrap();
    let spec = TemplateSpec {
        warmup_ms: 2000,
        ..net_counter_spec()
    };
    // Kills the jailed build VMM proper as soon as it is seen in its build namespace.
    let watcher = std::thread::spawn(|| {
        let mut seen = Seen::default();
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while seen.jail_id.is_none() && std::time::Instant::now() < deadline {
            look("jkill", &mut seen);
            std::thread::sleep(Duration::from_millis(5));
        }
        let id = seen.jail_id.clone().expect("the jailed build VMM");
        for pid in std::fs::read_dir("/proc")
            .unwrap()
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        {
            let args = args_of(pid);
            let uid = std::fs::read_to_string(format!("/proc/{pid}/status"))
                .unwrap_or_default()
                .lines()
                .find_map(|l| l.strip_prefix("Uid:").map(str::to_string))
                .unwrap_or_default();
            if args.iter().any(|a| a == &id) && !uid.trim().starts_with('0') {
                // SAFETY: SIGKILL to the test's own build VMM (its jail id is unique).
                unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            }
        }
        (id, seen.in_build_netns, seen.tap())
    });
    let err = pool.build_template("jkill", &spec).unwrap_err();
    let (jail_id, in_netns, tap) = watcher.join().unwrap();
    assert!(in_netns, "the build VMM was not in runv-{jail_id}");
    eprintln!("build failed as expected: {err}");
    let ns = format!("/run/netns/runv-{jail_id}");
    assert!(!std::path::Path::new(&ns).exists(), "{ns} left");
    assert!(
        !std::path::Path::new("/sys/class/net").join(&tap).exists(),
        "build TAP {tap} left in the host's namespace"
    );
    assert!(
        !pool_manager::vmm_api::jail::Cgroup::of(&jail_id).exists(),
        "cgroup of {jail_id} left"
    );
    assert!(!dirs.state().join("templates/jkill").exists());
    drop(pool);
    assert!(dirs.run_files().is_empty(), "left: {:?}", dirs.run_files());
}

#[test]
fn clean_orphans_removes_a_build_netns_no_live_vmm_claims_and_keeps_a_claimed_one() {
    let test = "clean_orphans_removes_a_build_netns_no_live_vmm_claims_and_keeps_a_claimed_one";
    if let Some(why) = network::unavailable(true) {
        eprintln!("SKIPPED: {test}: {why}");
        return;
    }
    let hex = format!("{:012x}", std::process::id() as u64 * 7919);
    let (orphan, claimed) = (
        format!("build-a{}", &hex[1..]),
        format!("build-c{}", &hex[1..]),
    );
    for id in [&orphan, &claimed] {
        let ok = Command::new("ip")
            .args(["netns", "add", &format!("runv-{id}")])
            .status()
            .unwrap()
            .success();
        assert!(ok, "ip netns add runv-{id}");
    }
    // A live process whose command line carries `--jail-id <claimed>`, as a build VMM's does.
    let mut holder = Command::new("sh")
        .args(["-c", "sleep 30", "sh", "--jail-id", &claimed])
        .spawn()
        .unwrap();
    // A build namespace and a clone's TAP whose VMMs do not run yet: the pool making them
    // holds a claim on their VM names.
    let making = format!("build-m{}", &hex[1..]);
    let build_net =
        network::BuildNet::create(&making, &format!("rvtm{}", &hex[1..]), 0, 0).unwrap();
    let clone_tap =
        network::SandboxNet::create_tap(&format!("vm-d{}", &hex[1..]), Default::default()).unwrap();
    let tap_path = std::path::Path::new("/sys/class/net").join(clone_tap.tap());
    let dirs = Dirs::new();
    let pool = Pool::open(dirs.config()).unwrap();
    pool.clean_orphans();
    let exists = |id: &str| std::path::Path::new(&format!("/run/netns/runv-{id}")).exists();
    let (orphan_left, claimed_kept) = (exists(&orphan), exists(&claimed));
    let (making_kept, tap_kept) = (exists(&making), tap_path.exists());
    drop(build_net);
    drop(clone_tap);
    let (making_gone, tap_gone) = (!exists(&making), !tap_path.exists());
    let _ = holder.kill();
    let _ = holder.wait();
    let _ = Command::new("ip")
        .args(["netns", "del", &format!("runv-{claimed}")])
        .output();
    let _ = Command::new("ip")
        .args(["netns", "del", &format!("runv-{orphan}")])
        .output();
    drop(pool);
    assert!(!orphan_left, "runv-{orphan} was not removed");
    assert!(claimed_kept, "runv-{claimed} was removed while claimed");
    assert!(
        making_kept,
        "runv-{making} was removed while its pool made it"
    );
    assert!(
        tap_kept,
        "{} was removed while its pool made it",
        tap_path.display()
    );
    assert!(making_gone && tap_gone, "dropped, they are gone");
    assert!(
        !std::path::Path::new(network::CLAIM_DIR)
            .join(&making)
            .exists(),
        "the claim file goes with the claim"
    );
}
