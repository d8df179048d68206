//! Disk slots of a jailed VMM: a jailed shell restores a clone of a template watching its slot
//! (its placeholders the VM's own copies inside its jail directory), and a disk image the jail
//! cannot see is attached as a file descriptor the client opened on the host: the guest reads
//! it through its virtio-blk driver. The same image by path is refused: the jail hides it.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;
use pool_manager::{ShellJail, ShellProcess, ShellSpec};
use vmm::config::BlockConfig;
use vmm_api::jail::DEFAULT_JAIL_ID;
use vmm_api::{slot_id, BlockOverride, ClientError, MemoryMode, RestoreOptions, SerialOutput};

/// The jailed VMM proper: the only child of the jail's keeper `keeper`.
fn jailed_pid(keeper: u32) -> u32 {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let kids: Vec<u32> = std::fs::read_dir("/proc")
            .unwrap()
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
            .filter(|p| {
                let stat = std::fs::read_to_string(format!("/proc/{p}/stat")).unwrap_or_default();
                let ppid = stat
                    .rsplit_once(')')
                    .and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse().ok());
                ppid == Some(keeper)
            })
            .collect();
        if kids.len() == 1 {
            return kids[0];
        }
        assert!(Instant::now() < deadline, "keeper {keeper}: {kids:?}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The next `REPORT PASS <name>` line the clone writes on stdout; panics on a `FAIL`.
fn next_pass(shell: &mut ShellProcess, name: &str) -> String {
    loop {
        let line = shell.next_stdout_line().expect("a report from the clone");
        let r = line.trim_end().strip_prefix("REPORT ").unwrap_or(&line);
        assert!(!r.starts_with("FAIL"), "{r}");
        if r.starts_with(&format!("PASS {name} ")) {
            return r.to_string();
        }
    }
}

#[test]
fn kvm_jail_disks_a_jailed_clone_reads_a_disk_passed_as_a_descriptor() {
    if !kvm_available("kvm_jail_disks_a_jailed_clone_reads_a_disk_passed_as_a_descriptor") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();

    // The template: watching slot 0 (one-sector placeholders), snapshotted in-process.
    let tdir = d.join("template");
    std::fs::create_dir(&tdir).unwrap();
    let mut cfg = guest_config("rt.blk_watch", &tdir);
    cfg.mem_mib = 32;
    for i in 0..2 {
        let path = tdir.join(format!("slot{i}.placeholder"));
        std::fs::write(&path, [0u8; 512]).unwrap();
        cfg.block.push(BlockConfig {
            path,
            read_only: false,
            id: Some(slot_id(i)),
        });
    }
    cfg.control = Some(tdir.join("template.sock"));
    let vm = vmm::Vmm::build(cfg).unwrap();
    let reports = vm.reports().unwrap();
    let t = std::thread::spawn(move || vm.run(None));
    loop {
        let r = reports.recv_timeout(TIMEOUT).unwrap();
        assert!(!r.starts_with("FAIL"), "{r}");
        if r.starts_with("PASS blk_watching") {
            break;
        }
    }
    let snap = d.join("snap");
    std::fs::create_dir(&snap).unwrap();
    let mut c = control(&tdir.join("template.sock"));
    c.snapshot(&snap).unwrap();
    c.shutdown().unwrap();
    assert_eq!(t.join().unwrap().unwrap(), vmm::ExitReason::Shutdown);
    pool_manager::template::grant_read(&snap, DEFAULT_JAIL_ID).unwrap();

    // A jailed shell that may read only the snapshot.
    let run = d.join("run");
    std::fs::create_dir(&run).unwrap();
    let mut jail = ShellJail::pool_default();
    jail.read_only.push(snap.clone());
    let spec = ShellSpec {
        vmm: PathBuf::from(env!("CARGO_BIN_EXE_runv-vmm")),
        mem_mib: 32,
        vcpus: 1,
        run_dir: run.clone(),
        jail: Some(jail),
    };
    let name = format!("jdisk-{}", std::process::id());
    let mut shell = ShellProcess::spawn(&spec, &name).unwrap();
    let vmm_pid = jailed_pid(shell.pid());

    // Its placeholders: its own copies, in its jail directory, owned by the jail uid (as the
    // pool makes them).
    let mut opts = RestoreOptions::new(&snap, MemoryMode::Cow);
    opts.clone_id = "jailed-disk".into();
    opts.serial = SerialOutput::None;
    opts.debug_log = Some("-".into());
    for index in 0..2 {
        let path = shell.files_dir().join(format!("slot{index}.placeholder"));
        std::fs::write(&path, [0u8; 512]).unwrap();
        std::os::unix::fs::chown(&path, Some(DEFAULT_JAIL_ID), Some(DEFAULT_JAIL_ID)).unwrap();
        opts.block.push(BlockOverride { index, path });
    }
    shell.restore(&opts).unwrap();

    // An image on the host, outside the jail, readable by root only.
    let images = d.join("images");
    std::fs::create_dir(&images).unwrap();
    let img = images.join("rootfs.img");
    let data: Vec<u8> = (0..1u32 << 20)
        .map(|i| (i as u8).wrapping_mul(13).wrapping_add(5))
        .collect();
    std::fs::write(&img, &data).unwrap();
    std::fs::set_permissions(&img, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();

    // By path the jailed VMM cannot even see it.
    match shell.client().attach_disk_path(0, &img, true) {
        Err(ClientError::Refused { error, .. }) => {
            assert!(error.error.contains("No such file"), "{}", error.error)
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    // As a descriptor opened here, it works.
    let reply = shell.client().attach_disk(0, &img, false).unwrap();
    assert_eq!(
        (reply.capacity_sectors, reply.serial.as_str()),
        (2048, "runv-slot0")
    );
    let r = next_pass(&mut shell, "blk_attached");
    assert_eq!(field(&r, "capacity"), Some("2048"), "{r}");
    assert_eq!(field(&r, "serial"), Some("runv-slot0"), "{r}");
    let sum0 = format!("{:x}", fnv1a(&data[..512]));
    assert_eq!(field(&r, "sum0"), Some(sum0.as_str()), "{r}");
    assert_eq!(shell.client().detach_disk(0).unwrap().capacity_sectors, 1);
    let r = next_pass(&mut shell, "blk_detached");
    assert_eq!(field(&r, "capacity"), Some("1"), "{r}");

    // It was the jailed VMM that did it: unprivileged, in its own mount namespace.
    let status = std::fs::read_to_string(format!("/proc/{vmm_pid}/status")).unwrap();
    let uid = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
    assert_eq!(
        uid.split_whitespace().skip(1).collect::<Vec<_>>(),
        vec![DEFAULT_JAIL_ID.to_string(); 4],
        "{uid}"
    );
    assert_ne!(
        std::fs::read_link(format!("/proc/{vmm_pid}/ns/mnt")).unwrap(),
        std::fs::read_link("/proc/self/ns/mnt").unwrap()
    );
    assert!(shell.shutdown().unwrap().success());
    assert!(!run.join(&name).exists(), "the jail directory is removed");
    assert!(!Path::new(&run.join(format!("{name}.root"))).exists());
}
