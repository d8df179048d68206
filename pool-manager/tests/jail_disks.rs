//! Disk-slot templates run jailed: a pooled clone (warm, restored in its jail with its own slot
//! placeholders) gets a disk image the jail cannot see through `attach_disk` (the client opens
//! it and passes the descriptor), and its guest reads it.

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;
use pool_manager::{AcquireRequest, Pool, PoolTargets, TemplateSpec, Tier};

/// The first report line starting with `prefix` in `log`, waited for.
fn report(log: &Path, prefix: &str) -> String {
    let mut line = String::new();
    wait_until(
        &format!("{prefix} in {}", log.display()),
        Duration::from_secs(20),
        || {
            let text = std::fs::read_to_string(log).unwrap_or_default();
            assert!(!text.contains("REPORT FAIL"), "{text}");
            match text.lines().find(|l| l.starts_with(prefix)) {
                Some(l) => {
                    line = l.to_string();
                    true
                }
                None => false,
            }
        },
    );
    line
}

/// Live processes with an argument ending in `suffix`, with their `--jail-id`.
fn processes_with_arg(suffix: &str) -> Vec<(u32, Option<String>)> {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|pid| {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
            let args: Vec<String> = cmdline
                .split(|&b| b == 0)
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect();
            args.iter().any(|a| a.ends_with(suffix)).then(|| {
                let id = args
                    .iter()
                    .position(|a| a == "--jail-id")
                    .and_then(|i| args.get(i + 1).cloned());
                (pid, id)
            })
        })
        .collect()
}

/// The real uid of `pid`.
fn uid_of(pid: u32) -> Option<u32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// FNV-1a 32, as the test guest computes it.
fn fnv1a(data: &[u8]) -> u32 {
    data.iter().fold(0x811c_9dc5u32, |h, b| {
        (h ^ u32::from(*b)).wrapping_mul(0x0100_0193)
    })
}

#[test]
fn jailed_slot_template_clone_attaches_a_disk_the_guest_reads() {
    if !kvm_available("jailed_slot_template_clone_attaches_a_disk_the_guest_reads") {
        return;
    }
    let dirs = Dirs::new();
    let pool = Pool::open(dirs.config()).unwrap();
    let spec = TemplateSpec {
        cmdline: "rt.blk_watch".into(),
        mem_mib: 32,
        slots: 2,
        // Long enough for the guest's driver to be watching slot 0 when it is snapshotted.
        warmup_ms: 200,
        ..counter_spec()
    };
    // The build VM runs jailed too: seen from a thread watching /proc while it boots.
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watcher = {
        let done = done.clone();
        std::thread::spawn(move || {
            let (mut uids, mut ids) = (std::collections::BTreeSet::new(), Vec::new());
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                for (pid, id) in processes_with_arg("/build-disks.sock") {
                    if let Some(uid) = uid_of(pid) {
                        uids.insert(uid);
                    }
                    ids.extend(id.filter(|i| !ids.contains(i)));
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            (uids, ids)
        })
    };
    pool.build_template("disks", &spec).unwrap();
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    let (uids, ids) = watcher.join().unwrap();
    // The keeper (root) and the VMM proper (the jail uid).
    let jail_uid = vmm_api::jail::DEFAULT_JAIL_ID;
    assert!(uids.contains(&jail_uid), "build VMM uids seen: {uids:?}");
    // Published owned by root again; nothing of the build jail is left.
    use std::os::unix::fs::MetadataExt;
    let durable = dirs.state().join("templates/disks");
    for f in ["", "state.bin", "memory.bin", "slot0.placeholder"] {
        let m = std::fs::metadata(durable.join(f)).unwrap();
        assert_eq!((m.uid(), m.gid()), (0, 0), "{f}");
    }
    let left: Vec<_> = std::fs::read_dir(dirs.run())
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("build-"))
        .collect();
    assert!(left.is_empty(), "build jail leftovers: {left:?}");
    assert_eq!(ids.len(), 1, "one build jail: {ids:?}");
    assert!(ids[0].starts_with("build-"), "{ids:?}");
    assert!(
        !vmm_api::jail::Cgroup::of(&ids[0]).exists(),
        "cgroup of {ids:?} left"
    );
    pool.set_pool(
        "disks",
        PoolTargets {
            warm: 1,
            shells: 0,
            max_sandboxes: 4,
            ..Default::default()
        },
    )
    .unwrap();
    wait_until("a warm clone", Duration::from_secs(20), || {
        pool.pools()[0].warm == 1
    });
    let info = pool
        .acquire(AcquireRequest {
            template: "disks".into(),
            id: Some("jailed-disk".into()),
            ..Default::default()
        })
        .unwrap();
    assert_eq!(info.tier, Tier::Warm);

    // Jailed: the pool's pid is the keeper; its only child, the VMM, runs as the jail uid.
    let vmm = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .find(|p| ppid(*p) == Some(info.pid))
        .expect("the jailed VMM, child of its keeper");
    let status = std::fs::read_to_string(format!("/proc/{vmm}/status")).unwrap();
    let uid = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
    let jail = vmm_api::jail::DEFAULT_JAIL_ID.to_string();
    assert_eq!(
        uid.split_whitespace().skip(1).collect::<Vec<_>>(),
        [jail.as_str(); 4],
        "{uid}"
    );
    // Its slots hold its own placeholders, in its jail directory.
    let own = info.control.parent().unwrap().join("slot0.placeholder");
    assert_eq!(std::fs::metadata(&own).unwrap().len(), 512);

    // An image only root can read, in a directory the jail does not hold.
    let images = dirs.tmp.path().join("images");
    std::fs::create_dir(&images).unwrap();
    let img = images.join("disk.img");
    let data: Vec<u8> = (0..1u32 << 20)
        .map(|i| (i as u8).wrapping_mul(29).wrapping_add(3))
        .collect();
    std::fs::write(&img, &data).unwrap();
    std::fs::set_permissions(&img, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();

    let mut c = vmm_api::ControlClient::connect(&info.control, Duration::from_secs(5)).unwrap();
    let reply = c.attach_disk(0, &img, true).unwrap();
    assert_eq!(
        (reply.capacity_sectors, reply.serial.as_str()),
        (2048, "runv-slot0")
    );
    let r = report(&info.debug_log, "REPORT PASS blk_attached");
    assert_eq!(field(&r, "capacity"), Some("2048"), "{r}");
    assert_eq!(field(&r, "serial"), Some("runv-slot0"), "{r}");
    let sum0 = format!("{:x}", fnv1a(&data[..512]));
    assert_eq!(field(&r, "sum0"), Some(sum0.as_str()), "{r}");
    assert_eq!(c.detach_disk(0).unwrap().capacity_sectors, 1);
    let r = report(&info.debug_log, "REPORT PASS blk_detached");
    assert_eq!(field(&r, "capacity"), Some("1"), "{r}");
    drop(c);

    pool.release("jailed-disk").unwrap();
    let run = dirs.run();
    drop(pool);
    assert!(dirs.run_files().is_empty(), "left: {:?}", dirs.run_files());
    assert!(processes_mentioning(run.to_str().unwrap()).is_empty());
}
