//! Shared helpers for runv's criterion benchmarks (see `benches/benches/`).
//!
//! Every bench times each iteration itself (criterion `iter_custom`), keeps the per-iteration
//! samples in a [`Recorder`] and writes them for `perf-ci` as raw metrics, so the gated medians and
//! percentiles come from real per-iteration numbers.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use perf_ci::{RawMetric, Stat};

/// Whether `perf-ci/run --quick` asked for a short run.
pub fn quick() -> bool {
    std::env::var("RUNV_PERF_QUICK").is_ok_and(|v| v == "1")
}

/// Criterion settings for end-to-end benches: few samples, each one a real operation.
pub fn criterion() -> criterion::Criterion {
    let c = criterion::Criterion::default().without_plots();
    if quick() {
        c.sample_size(10)
            .warm_up_time(Duration::from_millis(200))
            .measurement_time(Duration::from_secs(1))
    } else {
        c.sample_size(30)
            .warm_up_time(Duration::from_millis(500))
            .measurement_time(Duration::from_secs(3))
    }
}

/// The workspace's cargo target directory.
pub fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(d) => PathBuf::from(d),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target"),
    }
}

/// The statically linked `runv-vmm` that `scripts/build-vmm.sh` builds (perf-ci/run does): the
/// VMM as shipped.
pub fn vmm_bin() -> PathBuf {
    let path = target_dir().join("static-vmm/x86_64-unknown-linux-gnu/release/runv-vmm");
    assert!(
        path.exists(),
        "{} not found: build it with `bash scripts/build-vmm.sh` (perf-ci/run does)",
        path.display()
    );
    path
}

/// A binary of the workspace built by `perf-ci/run` (`cargo build --release`).
pub fn release_bin(name: &str) -> PathBuf {
    let path = target_dir().join("release").join(name);
    assert!(
        path.exists(),
        "{} not found: build it with `cargo build --release --bins` (perf-ci/run does)",
        path.display()
    );
    path
}

/// Per-iteration samples of one metric.
pub struct Recorder {
    name: String,
    unit: &'static str,
    stat: Stat,
    samples: Vec<f64>,
}

impl Recorder {
    /// A metric reported as the median of its samples.
    pub fn median(name: &str, unit: &'static str) -> Self {
        Self {
            name: name.into(),
            unit,
            stat: Stat::Median,
            samples: Vec::new(),
        }
    }

    /// A metric reported as the 99th percentile of its samples.
    pub fn p99(name: &str, unit: &'static str) -> Self {
        Self {
            stat: Stat::P99,
            ..Self::median(name, unit)
        }
    }

    /// Adds one sample, in the metric's unit.
    pub fn push(&mut self, v: f64) {
        self.samples.push(v);
    }

    /// Adds one duration sample, converted to the metric's unit (`ms` or `us`).
    pub fn push_duration(&mut self, d: Duration) {
        let v = match self.unit {
            "us" => d.as_secs_f64() * 1e6,
            _ => d.as_secs_f64() * 1e3,
        };
        self.push(v);
    }

    /// The samples so far.
    pub fn samples(&self) -> &[f64] {
        &self.samples
    }

    /// Writes the metric for perf-ci; panics (failing the bench) if nothing was measured.
    pub fn write(&self) {
        assert!(!self.samples.is_empty(), "{}: no samples", self.name);
        let raw = RawMetric {
            unit: self.unit.into(),
            stat: self.stat,
            samples: self.samples.clone(),
        };
        let path = raw
            .write(&target_dir(), &self.name)
            .unwrap_or_else(|e| panic!("writing metric {}: {e}", self.name));
        eprintln!("perf-ci: wrote {}", path.display());
    }
}

/// Resident set size of a process in MiB (`VmRSS` of /proc/PID/status).
pub fn rss_mib(pid: u32) -> std::io::Result<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map(|kb| kb / 1024.0)
        .ok_or_else(|| std::io::Error::other(format!("no VmRSS in /proc/{pid}/status")))
}

/// Waits (10 s at most) for a clone's first report after resume, the test guest's `PASS woke`,
/// in its debug log, reading it every `every`. Polling, not inotify: on our hosts a watch on the
/// log stalled the clone's report by ~10 ms about half the time (measured: median warm acquire
/// 8–15 ms with a watch, 2.1 ms without). Many concurrent waiters should poll less often.
pub fn wait_report(log: &Path, every: Duration) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !std::fs::read_to_string(log).is_ok_and(|t| t.contains("REPORT PASS woke")) {
        assert!(
            Instant::now() < deadline,
            "no woke report in {}",
            log.display()
        );
        std::thread::sleep(every);
    }
}

/// Tops `p50` and `p99` up to `min` samples of `one()` (one iteration, timed): a p99 needs
/// samples, however few criterion takes (`--quick`).
pub fn top_up(
    min: usize,
    p50: &mut Recorder,
    p99: &mut Recorder,
    mut one: impl FnMut() -> Duration,
) {
    while p99.samples().len() < min {
        let d = one();
        p50.push_duration(d);
        p99.push_duration(d);
    }
}
