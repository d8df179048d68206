//! Snapshot and restore benchmarks: `snapshot_create_ms` (256 MiB guest, mostly zero);
//! `restore_{copy,cow,uffd}_ms` and `restore_uffd_p99_ms` (restore command to a pre-created
//! shell → the guest's first report after resume); `restore_fresh_process_ms` (spawning
//! `runv-vmm --restore` → the first report, no shell made ahead; the first report after a resume
//! is the test guest's cheap `PASS woke`); `clones_per_second` (sustained, sequential,
//! shells refilled in the background); `clone_private_mib` (median private memory of 100 idle
//! clones of a 256 MiB template, from smaps_rollup).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use benches::{criterion, vmm_bin, Recorder};
use pool_manager::vmm_api::{
    ControlClient, MemoryMode, RestoreOptions, SerialOutput, DEFAULT_RECORD_MS,
};
use pool_manager::{ShellPool, ShellProcess, ShellSpec};

struct Template {
    child: Child,
    control: ControlClient,
}

impl Template {
    /// Boots the counter guest (256 MiB, `rt.counter` plus `cmdline`) with `initrd`, and waits
    /// until it counts.
    fn boot(dir: &Path, name: &str, cmdline: &str, initrd: Option<&Path>) -> Self {
        let sock = dir.join(format!("{name}.sock"));
        let mut cmd = Command::new(vmm_bin());
        cmd.arg("--kernel").arg(test_guests::guest_path());
        if let Some(i) = initrd {
            cmd.arg("--initrd").arg(i);
        }
        let mut child = cmd
            .args(["--mem-mib", "256", "--serial", "none", "--debug-log", "-"])
            .args(["--cmdline", &format!("rt.counter {cmdline}")])
            .arg("--control")
            .arg(&sock)
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawning runv-vmm");
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        while !line.contains("counter_started") {
            line.clear();
            assert!(out.read_line(&mut line).unwrap() > 0, "template died");
        }
        let control = ControlClient::connect(&sock, Duration::from_secs(10)).unwrap();
        Self { child, control }
    }

    fn snapshot(&mut self, dir: &Path) {
        if let Err(e) = self.control.snapshot(dir) {
            panic!("snapshot into {}: {e}", dir.display());
        }
    }
}

impl Drop for Template {
    fn drop(&mut self) {
        let _ = self.control.shutdown();
        let _ = self.child.wait();
    }
}

/// Boots the clone template: 256 MiB, a 64 MiB initrd standing in for a booted kernel's page
/// cache, a guest that reads 256 of those pages after each resume (its working set) and then
/// idles. Snapshots it into `snap` (on tmpfs, as a pool keeps templates) and stops it.
fn clone_template(dir: &Path, snap: &Path) {
    let initrd = dir.join("initrd.bin");
    let data: Vec<u8> = (0..(64u32 << 20))
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    std::fs::write(&initrd, &data).unwrap();
    std::fs::create_dir_all(snap).unwrap();
    let mut t = Template::boot(dir, "clone-template", "rt.touch=256 rt.idle", Some(&initrd));
    t.snapshot(snap);
    drop(t);
    let _ = std::fs::remove_file(initrd);
}

/// Restores `snap` into a ready shell; returns the time from the restore command to the guest's
/// first report after resume, and the clone (still running, idle).
fn restore_into(
    pool: &ShellPool,
    snap: &Path,
    mode: MemoryMode,
    id: usize,
) -> (Duration, ShellProcess) {
    let mut shell = pool.take(Duration::from_secs(10)).expect("a ready shell");
    let mut opts = RestoreOptions::new(snap, mode);
    opts.clone_id = format!("c{id}");
    opts.serial = SerialOutput::None;
    opts.debug_log = Some("-".into());
    let start = Instant::now();
    shell.restore(&opts).unwrap();
    let line = shell.next_stdout_line().unwrap();
    let elapsed = start.elapsed();
    assert!(line.starts_with("REPORT PASS woke"), "{mode:?}: {line:?}");
    (elapsed, shell)
}

/// Private memory (Private_Clean + Private_Dirty of smaps_rollup) of a process, in MiB.
fn private_mib(pid: u32) -> f64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap();
    s.lines()
        .filter(|l| l.starts_with("Private_Clean:") || l.starts_with("Private_Dirty:"))
        .map(|l| l.split_whitespace().nth(1).unwrap().parse::<f64>().unwrap())
        .sum::<f64>()
        / 1024.0
}

/// `jail_setup_ms`: what jailing adds to creating a shell (spawn → first `status` answered),
/// the median of paired differences jailed − unjailed, measured back to back.
fn jail_setup(c: &mut criterion::Criterion, plain: &ShellSpec, jailed: &ShellSpec) {
    let mut rec = Recorder::median("jail_setup_ms", "ms");
    let mut n = 0;
    c.bench_function("jail_setup", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                n += 1;
                let time = |spec: &ShellSpec, tag: &str| {
                    let start = Instant::now();
                    let shell = ShellProcess::spawn(spec, &format!("js-{tag}-{n}")).unwrap();
                    let d = start.elapsed();
                    shell.shutdown().unwrap();
                    d
                };
                let plain_d = time(plain, "p");
                let jailed_d = time(jailed, "j");
                rec.push(jailed_d.as_secs_f64() * 1e3 - plain_d.as_secs_f64() * 1e3);
                total += jailed_d;
            }
            total
        })
    });
    rec.write();
}

fn main() {
    let mut c = criterion();
    let dir = std::env::temp_dir().join(format!("runv-bench-snap-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut template = Template::boot(&dir, "template", "", None);
    let mut create = Recorder::median("snapshot_create_ms", "ms");
    let mut n = 0;
    c.bench_function("snapshot_create", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let snap = dir.join(format!("snap-{}", n % 2));
                n += 1;
                std::fs::create_dir_all(&snap).unwrap();
                let start = Instant::now();
                template.snapshot(&snap);
                let d = start.elapsed();
                template.control.resume().unwrap();
                create.push_duration(d);
                total += d;
            }
            total
        })
    });
    create.write();
    drop(template);

    let shm = PathBuf::from("/dev/shm").join(format!("runv-bench-{}", std::process::id()));
    let snap = shm.join("template");
    clone_template(&dir, &snap);
    let spec = ShellSpec {
        vmm: vmm_bin(),
        mem_mib: 256,
        vcpus: 1,
        run_dir: dir.clone(),
        jail: None,
    };
    // Clones run as the pool runs them: jailed (the template bound read-only), seccomp on; a
    // uffd clone gets its userfaultfd from the jail's /dev/userfaultfd node.
    pool_manager::template::grant_read(&snap, vmm_api::jail::DEFAULT_JAIL_ID).unwrap();
    let mut jail = pool_manager::ShellJail::pool_default();
    jail.read_only.push(snap.clone());
    let jailed_spec = ShellSpec {
        jail: Some(jail),
        ..spec.clone()
    };
    // The recording uffd clone, as the pool's first clone: the template bound read-write into a
    // sticky directory, so it can publish the working set.
    let mut recording_jail = pool_manager::ShellJail::pool_default();
    recording_jail.read_write.push(snap.clone());
    let recording_spec = ShellSpec {
        jail: Some(recording_jail),
        ..spec.clone()
    };
    jail_setup(&mut c, &spec, &jailed_spec);
    let jailed = ShellPool::new(jailed_spec, 4, 2);
    let mut id = 0;
    for (name, mode, pool) in [
        ("copy", MemoryMode::Copy, &jailed),
        ("cow", MemoryMode::Cow, &jailed),
        ("uffd", MemoryMode::Uffd, &jailed),
    ] {
        let mut rec = Recorder::median(&format!("restore_{name}_ms"), "ms");
        let mut p99 = Recorder::p99("restore_uffd_p99_ms", "ms");
        // The first uffd clone records the working set the others prefetch; it is published
        // only once its recording window has passed while it ran.
        if mode == MemoryMode::Uffd {
            let _ = std::fs::remove_file(snap.join("workingset.bin"));
            let gid = vmm_api::jail::DEFAULT_JAIL_ID;
            pool_manager::template::grant_record(&snap, gid).unwrap();
            let recording = ShellPool::new(recording_spec.clone(), 1, 1);
            let (_, recorder) = restore_into(&recording, &snap, mode, id);
            std::thread::sleep(Duration::from_millis(DEFAULT_RECORD_MS + 200));
            recorder.shutdown().unwrap();
            drop(recording);
            // Read-only again for the timed clones (the set becomes root:gid 0640).
            pool_manager::template::grant_read(&snap, gid).unwrap();
            assert!(
                snap.join("workingset.bin").exists(),
                "the recording clone published no working set"
            );
        }
        c.bench_function(&format!("restore_{name}"), |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    id += 1;
                    let (d, clone) = restore_into(pool, &snap, mode, id);
                    rec.push_duration(d);
                    p99.push_duration(d);
                    total += d;
                    clone.shutdown().unwrap();
                }
                total
            })
        });
        rec.write();
        if mode == MemoryMode::Uffd {
            p99.write();
        }
    }

    // A restore with no pre-created shell: spawn `runv-vmm --restore` (cow) → the guest's first
    // report after resume, process start and VM creation included.
    let mut fresh = Recorder::median("restore_fresh_process_ms", "ms");
    c.bench_function("restore_fresh_process", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                id += 1;
                let start = Instant::now();
                let mut child = Command::new(vmm_bin())
                    .arg("--restore")
                    .arg(&snap)
                    .args(["--clone-id", &format!("f{id}")])
                    .args(["--serial", "none", "--debug-log", "-"])
                    .stdout(Stdio::piped())
                    .spawn()
                    .expect("spawning runv-vmm --restore");
                let mut out = BufReader::new(child.stdout.take().unwrap());
                let mut line = String::new();
                out.read_line(&mut line).unwrap();
                let d = start.elapsed();
                assert!(line.starts_with("REPORT PASS woke"), "{line:?}");
                fresh.push_duration(d);
                total += d;
                // SAFETY: kill(2) on our own child; teardown is not timed.
                unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
                assert!(child.wait().unwrap().success());
            }
            total
        })
    });
    fresh.write();

    // Sustained: shells are made in the background while clones are restored one at a time;
    // finished clones are torn down off the request path, as the pool manager does.
    let (reap_tx, reap_rx) = std::sync::mpsc::channel::<ShellProcess>();
    let reaper = std::thread::spawn(move || {
        for clone in reap_rx {
            clone.shutdown().unwrap();
        }
    });
    let mut rate = Recorder::median("clones_per_second", "per_s");
    for _ in 0..3 {
        let start = Instant::now();
        let count = 30;
        for _ in 0..count {
            id += 1;
            reap_tx
                .send(restore_into(&jailed, &snap, MemoryMode::Cow, id).1)
                .unwrap();
        }
        rate.push(f64::from(count) / start.elapsed().as_secs_f64());
    }
    drop(reap_tx);
    reaper.join().unwrap();
    rate.write();
    drop(jailed);

    // Density (unjailed: private_mib reads the VMM's own pid, which a jail puts behind its
    // keeper): 100 idle cow clones of the 256 MiB template, all alive at once.
    let pool = ShellPool::new(spec, 8, 2);
    let clones: Vec<ShellProcess> = (0..100)
        .map(|i| restore_into(&pool, &snap, MemoryMode::Cow, 10_000 + i).1)
        .collect();
    drop(pool);
    std::thread::sleep(Duration::from_millis(200));
    let mut private = Recorder::median("clone_private_mib", "MiB");
    for clone in &clones {
        private.push(private_mib(clone.pid()));
    }
    private.write();
    for clone in clones {
        clone.shutdown().unwrap();
    }

    c.final_summary();
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_dir_all(&shm);
}
