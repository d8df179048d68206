//! The `vm` sandbox backend's readiness: `vm_sandbox_ready_ms` (median) and
//! `vm_sandbox_ready_p99_ms`: from the acquire of a warm clone (embedded `pool_manager::Pool`,
//! 64 MiB test-guest template running the `rt.agent` responder, one disk slot, release
//! `runv-vmm`) through `attach_disk` of a real EROFS image into slot 0 to the agent's `ping`
//! answered from inside the clone over vsock (`CONNECT 1024`). Each acquire starts from a full
//! warm pool with the previous clone's VMM gone, so neither the refill nor the reaping of the
//! previous one shares the two cores with it (the refill the acquire itself triggers does, as in
//! production). On an idle 2-vCPU VM host most of the spread is the host's: waking a thread on
//! an idle vCPU costs up to ~3 ms (docs/ARCHITECTURE.md has the phase split and the A/B).
//!
//! `vm_launch_rootfs_ms` / `vm_launch_rootfs_serial_ms`: what `runv create` and the shim do
//! before the agent's `create`, through `shim::sandbox::vm::launch_with` and `Sandbox::rootfs`
//! on a busybox rootfs (a cached image: tree hash + lookup): warm acquire, `ping`, the clone
//! hooks, the image, `attach_disk`. The first with the image prepared while the clone is leased
//! (as the product does), the second without (the image only once the sandbox is up),
//! alternating in one run.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use benches::{criterion, vmm_bin, Recorder};
use pool_manager::{Pool, PoolConfig, PoolTargets, ReadyCheck, TemplateSpec, Tier};
use shim::sandbox::vm::{launch_with, Source, VmConfig, VmSandbox, ROOTFS_SLOT};
use shim::sandbox::{FirstRootfs, Sandbox};
use shim::state::ContainerDir;

const WARM: usize = 4;

fn wait(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_micros(200));
    }
}

/// Waits until the pool holds `WARM` warm clones again.
fn wait_full(pool: &Pool) {
    wait("a full warm pool", Duration::from_secs(20), || {
        pool.pools()[0].warm == WARM
    });
}

/// Releases `sb` and waits for its VMM to exit: the reaper's shutdown of this clone must not
/// overlap the next measurement.
fn release_and_reap(mut sb: VmSandbox) {
    let vmm = sb.info().pid;
    sb.release().unwrap();
    wait(
        "the released clone's VMM to exit",
        Duration::from_secs(10),
        || !std::path::Path::new(&format!("/proc/{vmm}")).exists(),
    );
}

fn main() {
    let mut c = criterion();
    let pid = std::process::id();
    let dir = std::env::temp_dir().join(format!("runv-bench-vmsb-{pid}"));
    let shm = PathBuf::from(format!("/dev/shm/runv-bench-vmsb-{pid}"));
    let pool = Arc::new(
        Pool::open(PoolConfig {
            vmm: vmm_bin(),
            state_dir: dir.join("state"),
            run_dir: dir.join("run"),
            tmpfs_dir: shm.clone(),
            refill_workers: 2,
            jail: Some(pool_manager::ShellJail::pool_default()),
        })
        .unwrap(),
    );
    pool.build_template(
        "agent",
        &TemplateSpec {
            kernel: test_guests::guest_path(),
            initrd: None,
            cmdline: "rt.agent".into(),
            mem_mib: 64,
            vcpus: 1,
            ready: ReadyCheck::Report,
            slots: 1,
            net: false,
            mem_mode: Default::default(),
            warmup_ms: 0,
        },
    )
    .unwrap();
    pool.set_pool(
        "agent",
        PoolTargets {
            warm: WARM,
            shells: 0,
            max_sandboxes: 0,
            network: None,
        },
    )
    .unwrap();
    let tree = dir.join("rootfs");
    std::fs::create_dir_all(tree.join("etc")).unwrap();
    std::fs::write(tree.join("etc/hostname"), "runv\n").unwrap();
    let image = shim::image::ImageCache::new(dir.join("images"))
        .unwrap()
        .erofs_for(&tree, None)
        .unwrap();
    let mut cfg = VmConfig::new("agent");
    cfg.agent_timeout = Duration::from_secs(5);
    let source = Source::Embedded(pool.clone());

    let mut p50 = Recorder::median("vm_sandbox_ready_ms", "ms");
    let mut p99 = Recorder::p99("vm_sandbox_ready_p99_ms", "ms");
    let one = || {
        wait_full(&pool);
        let start = Instant::now();
        let sb = VmSandbox::acquire(&cfg, &source, "bench").unwrap();
        sb.attach_disk(ROOTFS_SLOT, &image.path, true).unwrap();
        drop(sb.agent_ready().unwrap());
        let d = start.elapsed();
        assert_eq!(sb.info().tier, Tier::Warm);
        release_and_reap(sb);
        d
    };
    c.bench_function("vm_sandbox_ready", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let d = one();
                p50.push_duration(d);
                p99.push_duration(d);
                total += d;
            }
            total
        })
    });
    benches::top_up(300, &mut p50, &mut p99, one);
    p50.write();
    p99.write();

    let busybox = dir.join("busybox-rootfs");
    for d in ["bin", "proc", "dev", "sys", "tmp", "etc"] {
        std::fs::create_dir_all(busybox.join(d)).unwrap();
    }
    std::fs::copy("/bin/busybox", busybox.join("bin/busybox"))
        .expect("/bin/busybox (apt-get install busybox-static)");
    std::fs::write(busybox.join("etc/passwd"), "root:x:0:0:root:/:/bin/sh\n").unwrap();
    let container = ContainerDir {
        path: dir.join("container"),
        id: "bench".into(),
    };
    std::fs::create_dir_all(&container.path).unwrap();
    let mut cfg = cfg.clone();
    cfg.image_cache = dir.join("images");
    let launch_rootfs = |prepare: bool| {
        wait_full(&pool);
        let first = FirstRootfs {
            container: "bench",
            dir: &busybox,
        };
        let start = Instant::now();
        let mut sb = launch_with(
            &cfg,
            Source::Embedded(pool.clone()),
            &container,
            None,
            prepare.then_some(first),
        )
        .unwrap();
        sb.rootfs("bench", &busybox).unwrap();
        let d = start.elapsed();
        release_and_reap(sb);
        d
    };
    launch_rootfs(false); // builds the image into the cache
    let mut overlapped = Recorder::median("vm_launch_rootfs_ms", "ms");
    let mut serial = Recorder::median("vm_launch_rootfs_serial_ms", "ms");
    for _ in 0..150 {
        overlapped.push_duration(launch_rootfs(true));
        serial.push_duration(launch_rootfs(false));
    }
    overlapped.write();
    serial.write();
    c.final_summary();
    drop(source);
    if let Ok(pool) = Arc::try_unwrap(pool) {
        pool.shutdown(false);
    }
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_dir_all(&shm);
}
