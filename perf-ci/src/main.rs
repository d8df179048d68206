//! `perf-ci`: writes `target/perf-ci/summary.json` + `summary.md` from raw bench metrics and
//! fails (exit 1) when a gate of `perf-ci/gates.json` does not hold.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Parser;

#[derive(Parser)]
#[command(about = "Collect runv benchmark metrics and enforce performance gates")]
struct Args {
    /// Cargo target directory holding perf-ci/raw/.
    #[arg(long, default_value = "target")]
    target_dir: PathBuf,
    /// Gate definitions.
    #[arg(long, default_value = "perf-ci/gates.json")]
    gates: PathBuf,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let text = std::fs::read(&args.gates)
        .with_context(|| format!("reading gates file {}", args.gates.display()))?;
    let gates: perf_ci::GateFile = serde_json::from_slice(&text)
        .with_context(|| format!("parsing gates file {}", args.gates.display()))?;
    let summary = perf_ci::collect(&args.target_dir, &gates)?;
    let results = perf_ci::check_gates(&summary, &gates);
    let out = args.target_dir.join("perf-ci");
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let json = serde_json::to_vec_pretty(&summary)?;
    std::fs::write(out.join("summary.json"), json).context("writing summary.json")?;
    let md = perf_ci::markdown(&summary, &results);
    std::fs::write(out.join("summary.md"), &md).context("writing summary.md")?;
    print!("{md}");
    let failed: Vec<_> = results.iter().filter(|r| !r.ok).collect();
    if !failed.is_empty() {
        for r in &failed {
            eprintln!("perf-ci: gate failed: {} (value: {:?})", r.gate, r.value);
        }
        std::process::exit(1);
    }
    println!("perf-ci: {} gates passed", results.len());
    Ok(())
}
