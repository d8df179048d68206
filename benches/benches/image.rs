//! EROFS images of the busybox rootfs (`shim::image`): `erofs_build_ms` (a cold build:
//! tree hash + `mkfs.erofs` + atomic rename into an empty cache) and `erofs_cache_hit_ms`
//! (the same call once the image is cached: tree hash + lookup, no build).

use std::path::Path;
use std::time::{Duration, Instant};

use benches::{criterion, target_dir, Recorder};
use shim::image::ImageCache;

/// The busybox rootfs of the agent bench.
fn rootfs(dir: &Path) {
    for d in ["bin", "proc", "dev", "sys", "tmp", "etc"] {
        std::fs::create_dir_all(dir.join(d)).unwrap();
    }
    std::fs::copy("/bin/busybox", dir.join("bin/busybox"))
        .expect("/bin/busybox (apt-get install busybox-static)");
    for a in ["sh", "echo", "true", "cat", "ls"] {
        let _ = std::os::unix::fs::symlink("busybox", dir.join("bin").join(a));
    }
    std::fs::write(dir.join("etc/passwd"), "root:x:0:0:root:/:/bin/sh\n").unwrap();
}

fn summary(r: &Recorder, name: &str) {
    let mut s = r.samples().to_vec();
    s.sort_by(f64::total_cmp);
    eprintln!(
        "{name}: n={} min={:.2} median={:.2} max={:.2} ms",
        s.len(),
        s[0],
        s[s.len() / 2],
        s[s.len() - 1]
    );
}

fn main() {
    let mut c = criterion();
    let dir = target_dir().join(format!("bench-image-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let root = dir.join("rootfs");
    rootfs(&root);

    let mut n = 0;
    let mut cold = Recorder::median("erofs_build_ms", "ms");
    c.bench_function("erofs_build", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                n += 1;
                let cache = ImageCache::new(dir.join(format!("cold-{n}"))).unwrap();
                let t0 = Instant::now();
                let img = cache.erofs_for(&root, None).unwrap();
                let d = t0.elapsed();
                assert!(img.built);
                std::fs::remove_dir_all(cache.dir()).unwrap();
                cold.push_duration(d);
                total += d;
            }
            total
        })
    });
    cold.write();
    summary(&cold, "erofs_build_ms");

    let cache = ImageCache::new(dir.join("hot")).unwrap();
    assert!(cache.erofs_for(&root, None).unwrap().built);
    let mut hit = Recorder::median("erofs_cache_hit_ms", "ms");
    c.bench_function("erofs_cache_hit", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let t0 = Instant::now();
                let img = cache.erofs_for(&root, None).unwrap();
                let d = t0.elapsed();
                assert!(!img.built);
                hit.push_duration(d);
                total += d;
            }
            total
        })
    });
    hit.write();
    summary(&hit, "erofs_cache_hit_ms");
    c.final_summary();
    let _ = std::fs::remove_dir_all(&dir);
}
