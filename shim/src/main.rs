//! `runv`: the runc-compatible OCI runtime (what containerd's runc shim, Docker and Podman call).

mod cli;

use std::io::Write;
use std::path::PathBuf;

use clap::Parser;

/// Global flags, as runc's (accepted even when they do nothing).
#[derive(Debug, Parser)]
#[command(
    name = "runv",
    version,
    about = "runv: a runc-compatible OCI runtime that runs containers in sandboxes"
)]
pub struct Cli {
    /// State directory.
    #[arg(long, global = true, default_value = "/run/runv")]
    pub root: PathBuf,
    /// Log file (errors are written there as well as to stderr).
    #[arg(long, global = true)]
    pub log: Option<PathBuf>,
    /// Log format: text or json.
    #[arg(long, global = true, default_value = "text")]
    pub log_format: String,
    /// Debug logging (accepted).
    #[arg(long, global = true)]
    pub debug: bool,
    /// systemd cgroup driver (accepted; cgroups are the sandbox's).
    #[arg(long, global = true)]
    pub systemd_cgroup: bool,
    /// Sandbox backend: vm (a microVM from runv-pool) or host (no VM isolation).
    #[arg(long, global = true, env = "RUNV_SANDBOX", default_value = "vm")]
    pub sandbox: String,
    /// Template the vm sandbox clones (else /etc/runv/config.toml's `template`).
    #[arg(long, global = true, env = "RUNV_TEMPLATE")]
    pub template: Option<String>,
    /// The command.
    #[command(subcommand)]
    pub cmd: cli::Cmd,
}

fn main() {
    let cli = Cli::parse();
    if let Some(t) = &cli.template {
        // The vm backend (here and in the monitor, which inherits it) reads it from there.
        std::env::set_var("RUNV_TEMPLATE", t);
    }
    let code = match cli::dispatch(&cli) {
        Ok(code) => code,
        Err(e) => {
            let msg = format!("{e:#}");
            eprintln!("runv: {msg}");
            log_error(&cli, &msg);
            1
        }
    };
    std::process::exit(code);
}

/// Appends an error to `--log` as runc writes it (logrus text or JSON).
fn log_error(cli: &Cli, msg: &str) {
    let Some(path) = &cli.log else { return };
    let time = shim::state::now_rfc3339();
    let line = if cli.log_format == "json" {
        serde_json::json!({"level": "error", "msg": msg, "time": time}).to_string()
    } else {
        format!("time={time:?} level=error msg={msg:?}")
    };
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
    {
        let _ = writeln!(f, "{line}");
    }
}
