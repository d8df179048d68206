//! runv's performance gate.
//!
//! Benchmarks (in `benches/`) record their raw measurements as [`RawMetric`] files under
//! `target/perf-ci/raw/`; [`collect`] turns them into `target/perf-ci/summary.json`
//! (`{"metrics": {name: {"value", "unit", ...spread}}}`) and a markdown table, and
//! [`check_gates`] evaluates the gates of `perf-ci/gates.json` against that summary.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Which statistic of the samples a metric reports as its `value`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Stat {
    /// Median of the samples.
    Median,
    /// 99th percentile (nearest rank) of the samples.
    P99,
}

/// One metric as a benchmark recorded it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RawMetric {
    /// Unit: `ms`, `us`, `MiB`, `ratio`, `count`, `per_s`.
    pub unit: String,
    /// Statistic reported as the value.
    pub stat: Stat,
    /// Every measurement, one per iteration (at least one).
    pub samples: Vec<f64>,
}

/// Error reading or writing perf-ci files.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// File system error.
    #[error("{op} {path}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A file did not parse.
    #[error("{path} is not valid perf-ci JSON: {source} (re-run the benchmark that writes it)")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: serde_json::Error,
    },
    /// A metric had no usable samples.
    #[error("metric {0} has no finite samples (its benchmark failed to measure anything)")]
    Empty(String),
}

fn io<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> Error + 'a {
    move |source| Error::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

/// The directory raw metrics are written to, below a cargo target directory.
pub fn raw_dir(target_dir: &Path) -> PathBuf {
    target_dir.join("perf-ci").join("raw")
}

impl RawMetric {
    /// Writes this metric as `<target>/perf-ci/raw/<name>.json`.
    pub fn write(&self, target_dir: &Path, name: &str) -> Result<PathBuf, Error> {
        let dir = raw_dir(target_dir);
        fs::create_dir_all(&dir).map_err(io("create", &dir))?;
        let path = dir.join(format!("{name}.json"));
        let json = serde_json::to_vec_pretty(self).expect("RawMetric always serializes");
        fs::write(&path, json).map_err(io("write", &path))?;
        Ok(path)
    }
}

/// Summary statistics of one metric.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    /// The gated value (median or p99, per the metric's [`Stat`]).
    pub value: f64,
    /// Unit of every number here.
    pub unit: String,
    /// Number of samples.
    pub n: usize,
    /// Smallest sample.
    pub min: f64,
    /// First quartile.
    pub p25: f64,
    /// Median.
    pub median: f64,
    /// Third quartile.
    pub p75: f64,
    /// 99th percentile.
    pub p99: f64,
    /// Largest sample.
    pub max: f64,
}

/// Nearest-rank percentile of sorted samples (`q` in 0..=1).
fn percentile(sorted: &[f64], q: f64) -> f64 {
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Summarizes one raw metric.
pub fn summarize(name: &str, raw: &RawMetric) -> Result<Summary, Error> {
    let mut s: Vec<f64> = raw
        .samples
        .iter()
        .copied()
        .filter(|v| v.is_finite())
        .collect();
    if s.is_empty() {
        return Err(Error::Empty(name.to_string()));
    }
    s.sort_by(f64::total_cmp);
    let median = if s.len() % 2 == 1 {
        s[s.len() / 2]
    } else {
        (s[s.len() / 2 - 1] + s[s.len() / 2]) / 2.0
    };
    let p99 = percentile(&s, 0.99);
    Ok(Summary {
        value: match raw.stat {
            Stat::Median => median,
            Stat::P99 => p99,
        },
        unit: raw.unit.clone(),
        n: s.len(),
        min: s[0],
        p25: percentile(&s, 0.25),
        median,
        p75: percentile(&s, 0.75),
        p99,
        max: s[s.len() - 1],
    })
}

/// A metric computed from two others measured in the same run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Derived {
    /// Name of the new metric.
    pub name: String,
    /// Numerator metric.
    pub numerator: String,
    /// Denominator metric.
    pub denominator: String,
}

/// A threshold on one metric.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Gate {
    /// Metric name.
    pub metric: String,
    /// The value must be at most this.
    #[serde(default)]
    pub max: Option<f64>,
    /// The value must be at least this.
    #[serde(default)]
    pub min: Option<f64>,
}

/// `perf-ci/gates.json`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct GateFile {
    /// Ratio metrics derived from two measured ones.
    #[serde(default)]
    pub derived: Vec<Derived>,
    /// Gates.
    #[serde(default)]
    pub gates: Vec<Gate>,
}

/// The summary file.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct SummaryFile {
    /// Every metric, by name.
    pub metrics: BTreeMap<String, Summary>,
}

/// Reads every raw metric of `target_dir` and derives the ratio metrics of `gates`.
pub fn collect(target_dir: &Path, gates: &GateFile) -> Result<SummaryFile, Error> {
    let dir = raw_dir(target_dir);
    let mut metrics = BTreeMap::new();
    let entries = match fs::read_dir(&dir) {
        Ok(e) => e.collect::<Result<Vec<_>, _>>().map_err(io("list", &dir))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(io("list", &dir)(e)),
    };
    for entry in entries {
        let path = entry.path();
        let Some(name) = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_suffix(".json"))
        else {
            continue;
        };
        let text = fs::read(&path).map_err(io("read", &path))?;
        let raw: RawMetric = serde_json::from_slice(&text).map_err(|source| Error::Parse {
            path: path.clone(),
            source,
        })?;
        metrics.insert(name.to_string(), summarize(name, &raw)?);
    }
    for d in &gates.derived {
        if let (Some(n), Some(q)) = (metrics.get(&d.numerator), metrics.get(&d.denominator)) {
            if q.value > 0.0 {
                let v = n.value / q.value;
                metrics.insert(
                    d.name.clone(),
                    Summary {
                        value: v,
                        unit: "ratio".into(),
                        n: n.n.min(q.n),
                        min: v,
                        p25: v,
                        median: v,
                        p75: v,
                        p99: v,
                        max: v,
                    },
                );
            }
        }
    }
    Ok(SummaryFile { metrics })
}

/// Outcome of one gate.
#[derive(Debug, Clone, PartialEq)]
pub struct GateResult {
    /// Human-readable gate, e.g. `vmm_boot_to_guest_ms <= 20`.
    pub gate: String,
    /// The measured value, if the metric exists.
    pub value: Option<f64>,
    /// Whether the gate holds.
    pub ok: bool,
}

/// Evaluates every gate; a gate whose metric is missing fails.
pub fn check_gates(summary: &SummaryFile, gates: &GateFile) -> Vec<GateResult> {
    let mut out = Vec::new();
    for g in &gates.gates {
        let value = summary.metrics.get(&g.metric).map(|m| m.value);
        if let Some(max) = g.max {
            out.push(GateResult {
                gate: format!("{} <= {max}", g.metric),
                value,
                ok: value.is_some_and(|v| v <= max),
            });
        }
        if let Some(min) = g.min {
            out.push(GateResult {
                gate: format!("{} >= {min}", g.metric),
                value,
                ok: value.is_some_and(|v| v >= min),
            });
        }
    }
    out
}

/// Renders the summary and gate outcomes as a markdown table.
pub fn markdown(summary: &SummaryFile, results: &[GateResult]) -> String {
    let mut s = String::from(
        "| metric | value | unit | n | min | p25 | median | p75 | p99 | max |\n|---|---:|---|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for (name, m) in &summary.metrics {
        s += &format!(
            "| {name} | {:.3} | {} | {} | {:.3} | {:.3} | {:.3} | {:.3} | {:.3} | {:.3} |\n",
            m.value, m.unit, m.n, m.min, m.p25, m.median, m.p75, m.p99, m.max
        );
    }
    if !results.is_empty() {
        s += "\n| gate | value | result |\n|---|---:|---|\n";
        for r in results {
            let v = r.value.map_or("missing".to_string(), |v| format!("{v:.3}"));
            s += &format!(
                "| {} | {v} | {} |\n",
                r.gate,
                if r.ok { "pass" } else { "FAIL" }
            );
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(stat: Stat, samples: &[f64]) -> RawMetric {
        RawMetric {
            unit: "ms".into(),
            stat,
            samples: samples.to_vec(),
        }
    }

    #[test]
    fn summarize_median_and_p99() {
        let samples: Vec<f64> = (1..=100).map(f64::from).collect();
        let m = summarize("x", &raw(Stat::Median, &samples)).unwrap();
        assert_eq!(m.median, 50.5);
        assert_eq!(m.p99, 99.0);
        assert_eq!((m.min, m.max, m.n), (1.0, 100.0, 100));
        let p = summarize("x", &raw(Stat::P99, &samples)).unwrap();
        assert_eq!(p.value, 99.0);
        assert!(matches!(
            summarize("x", &raw(Stat::Median, &[f64::NAN])),
            Err(Error::Empty(_))
        ));
    }

    #[test]
    fn collect_derives_ratios_and_gates_fail_on_missing_metrics() {
        let dir = tempfile::tempdir().unwrap();
        raw(Stat::Median, &[10.0, 12.0, 11.0])
            .write(dir.path(), "copy_ms")
            .unwrap();
        raw(Stat::Median, &[2.0, 2.0, 2.0])
            .write(dir.path(), "cow_ms")
            .unwrap();
        let gates: GateFile = serde_json::from_str(
            r#"{"derived":[{"name":"copy_vs_cow","numerator":"copy_ms","denominator":"cow_ms"}],
                "gates":[{"metric":"copy_vs_cow","min":5},{"metric":"cow_ms","max":1},
                         {"metric":"absent_ms","max":1}]}"#,
        )
        .unwrap();
        let summary = collect(dir.path(), &gates).unwrap();
        assert_eq!(summary.metrics["copy_vs_cow"].value, 5.5);
        let results = check_gates(&summary, &gates);
        let oks: Vec<bool> = results.iter().map(|r| r.ok).collect();
        assert_eq!(oks, vec![true, false, false]);
        assert_eq!(results[2].value, None);
        let md = markdown(&summary, &results);
        assert!(md.contains("| copy_vs_cow | 5.500 | ratio |"));
        assert!(md.contains("| absent_ms <= 1 | missing | FAIL |"));
    }
}
