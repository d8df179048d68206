//! `runv-pool`: the pool daemon (`serve`) and its command-line client.
//!
//! Every command but `serve` talks HTTP over the daemon's Unix socket (`docs/pool-api.md`);
//! `--json` prints the API's objects, otherwise human tables. Errors are one line and a
//! non-zero exit status.

mod client;

use std::path::{Path, PathBuf};

use anyhow::{anyhow, Result};
use clap::{Parser, Subcommand};
use serde_json::{json, Value};

#[derive(Parser)]
#[command(
    name = "runv-pool",
    about = "runv's pool of pre-restored microVM sandboxes"
)]
struct Cli {
    /// The daemon's socket.
    #[arg(long, global = true, default_value = "/run/runv/pool.sock")]
    socket: PathBuf,
    /// Print the API's JSON objects.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the daemon.
    Serve {
        /// Durable state (templates, pools.json, sandboxes.json).
        #[arg(long, default_value = "/var/lib/runv")]
        state_dir: PathBuf,
        /// Sockets and logs (pool.sock, VM sockets).
        #[arg(long, default_value = "/run/runv")]
        run_dir: PathBuf,
        /// tmpfs directory the templates are copied to.
        #[arg(long, default_value = "/dev/shm/runv")]
        tmpfs_dir: PathBuf,
        /// runv-vmm binary (default: next to this executable, then $PATH).
        #[arg(long)]
        vmm: Option<PathBuf>,
        /// Threads creating pooled VMs.
        #[arg(long, default_value_t = 2)]
        refill_workers: usize,
        /// Run the VMMs unconfined, as root (default: each in its own jail: namespaces, a
        /// root holding only its files, uid/gid --jail-uid, no capabilities, a cgroup).
        #[arg(long)]
        no_jail: bool,
        /// uid and gid of the jailed VMMs (one pool id).
        #[arg(long, default_value_t = vmm_api::jail::DEFAULT_JAIL_ID)]
        jail_uid: u32,
    },
    /// Templates.
    #[command(subcommand)]
    Template(TemplateCmd),
    /// Pools.
    #[command(subcommand)]
    Pool(PoolCmd),
    /// Sandboxes.
    #[command(subcommand)]
    Sandbox(SandboxCmd),
    /// The daemon's metrics.
    Stats,
}

#[derive(Subcommand)]
enum TemplateCmd {
    /// Boot a guest and snapshot it as a template.
    Build {
        name: String,
        #[arg(long)]
        kernel: PathBuf,
        #[arg(long)]
        initrd: Option<PathBuf>,
        #[arg(long, default_value = "")]
        cmdline: String,
        #[arg(long, default_value_t = 128)]
        mem_mib: u64,
        #[arg(long, default_value_t = 1)]
        vcpus: u8,
        #[arg(long, default_value = "report")]
        ready: String,
        /// Give it a network device (its sandboxes can then have networks).
        #[arg(long)]
        net: bool,
        /// Disk slots (virtio-blk `runv-slot0`...): one per container root `runv` hands in
        /// (a pod's containers each take one); 0..=8.
        #[arg(long, default_value_t = pool_manager::template::DEFAULT_BUILD_SLOTS)]
        slots: u8,
        /// How clones map its memory: cow (shared page cache) or uffd (working set prefetched).
        #[arg(long, default_value = "cow")]
        mem_mode: String,
        /// Let the guest run this long after it is ready, before the snapshot.
        #[arg(long, default_value_t = 0)]
        warmup_ms: u64,
    },
    /// List templates.
    Ls,
    /// Show one template.
    Inspect { name: String },
    /// Remove a template.
    Rm {
        name: String,
        /// Also release its live sandboxes.
        #[arg(long)]
        force: bool,
    },
}

#[derive(Subcommand)]
enum PoolCmd {
    /// Set a template's pool targets.
    Set {
        template: String,
        #[arg(long, default_value_t = 0)]
        warm: usize,
        #[arg(long, default_value_t = 0)]
        shells: usize,
        #[arg(long, default_value_t = 0)]
        max: usize,
        /// Give sandboxes networks from this range (A.B.C.D/N, a /29 each).
        #[arg(long)]
        subnet: Option<String>,
        /// With --subnet: a veth to the host and NAT for each sandbox.
        #[arg(long, requires = "subnet")]
        egress: bool,
    },
    /// List pools.
    Ls,
}

#[derive(Subcommand)]
enum SandboxCmd {
    /// Lease a sandbox.
    Acquire {
        template: String,
        #[arg(long)]
        id: Option<String>,
        /// Seconds until it is released automatically.
        #[arg(long)]
        ttl: Option<u64>,
        /// With a network (the pool must have one); the pool's setting when neither is given.
        #[arg(long, conflicts_with = "no_net")]
        net: bool,
        /// Without a network.
        #[arg(long)]
        no_net: bool,
    },
    /// List sandboxes.
    Ls,
    /// Release a sandbox.
    Release { id: String },
}

fn main() {
    let cli = Cli::parse();
    if let Err(e) = run(cli) {
        eprintln!("runv-pool: {e:#}");
        std::process::exit(1);
    }
}

fn default_vmm() -> PathBuf {
    if let Some(p) = std::env::current_exe()
        .ok()
        .and_then(|e| Some(e.parent()?.join("runv-vmm")))
        .filter(|p| p.exists())
    {
        return p;
    }
    std::env::var_os("PATH")
        .and_then(|path| {
            std::env::split_paths(&path)
                .map(|d| d.join("runv-vmm"))
                .find(|p| p.exists())
        })
        .unwrap_or_else(|| PathBuf::from("runv-vmm"))
}

fn run(cli: Cli) -> Result<()> {
    let sock = cli.socket.clone();
    let call = |method: &str, path: &str, body: Option<Value>| call(&sock, method, path, body);
    let out = match cli.cmd {
        Cmd::Serve {
            state_dir,
            run_dir,
            tmpfs_dir,
            vmm,
            refill_workers,
            no_jail,
            jail_uid,
        } => {
            tracing_subscriber::fmt()
                .with_env_filter(
                    tracing_subscriber::EnvFilter::try_from_default_env()
                        .unwrap_or_else(|_| "info".into()),
                )
                .with_writer(std::io::stderr)
                .init();
            let cfg = pool_manager::PoolConfig {
                vmm: vmm.unwrap_or_else(default_vmm),
                state_dir,
                run_dir,
                tmpfs_dir,
                refill_workers,
                jail: (!no_jail).then(|| pool_manager::ShellJail {
                    uid: jail_uid,
                    gid: jail_uid,
                    read_only: Vec::new(),
                    read_write: Vec::new(),
                }),
            };
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()?;
            return rt.block_on(pool_manager::server::serve(cfg));
        }
        Cmd::Template(TemplateCmd::Build {
            name,
            kernel,
            initrd,
            cmdline,
            mem_mib,
            vcpus,
            ready,
            net,
            slots,
            mem_mode,
            warmup_ms,
        }) => {
            let abs = |p: PathBuf| std::path::absolute(&p).unwrap_or(p);
            let body = json!({"name": name, "kernel": abs(kernel), "initrd": initrd.map(abs),
                "cmdline": cmdline, "mem_mib": mem_mib, "vcpus": vcpus, "ready": ready,
                "net": net, "slots": slots, "mem_mode": mem_mode, "warmup_ms": warmup_ms});
            // Step lines on stderr while the daemon builds (not with --json: scripts read
            // stdout, and polling is for people).
            let done = std::sync::atomic::AtomicBool::new(false);
            std::thread::scope(|s| {
                if !cli.json {
                    s.spawn(|| watch_build(&cli.socket, &name, &done));
                }
                let r = call("POST", "/v1/templates", Some(body));
                done.store(true, std::sync::atomic::Ordering::Relaxed);
                r
            })?
        }
        Cmd::Template(TemplateCmd::Ls) => call("GET", "/v1/templates", None)?,
        Cmd::Template(TemplateCmd::Inspect { name }) => {
            call("GET", &format!("/v1/templates/{}", seg(&name)), None)?
        }
        Cmd::Template(TemplateCmd::Rm { name, force }) => call(
            "DELETE",
            &format!("/v1/templates/{}?force={force}", seg(&name)),
            None,
        )?,
        Cmd::Pool(PoolCmd::Set {
            template,
            warm,
            shells,
            max,
            subnet,
            egress,
        }) => {
            let mut body = json!({"warm": warm, "shells": shells, "max_sandboxes": max});
            if let Some(subnet) = subnet {
                body["network"] = json!({"subnet": subnet, "egress": egress});
            }
            call("PUT", &format!("/v1/pools/{}", seg(&template)), Some(body))?
        }
        Cmd::Pool(PoolCmd::Ls) => call("GET", "/v1/pools", None)?,
        Cmd::Sandbox(SandboxCmd::Acquire {
            template,
            id,
            ttl,
            net,
            no_net,
        }) => {
            let network = match (net, no_net) {
                (true, _) => Some(true),
                (_, true) => Some(false),
                _ => None,
            };
            call(
                "POST",
                "/v1/sandboxes",
                Some(json!({"template": template, "id": id, "ttl_s": ttl, "network": network})),
            )?
        }
        Cmd::Sandbox(SandboxCmd::Ls) => call("GET", "/v1/sandboxes", None)?,
        Cmd::Sandbox(SandboxCmd::Release { id }) => {
            call("DELETE", &format!("/v1/sandboxes/{}", seg(&id)), None)?
        }
        Cmd::Stats => {
            let r = client::request(&cli.socket, "GET", "/metrics", None)?;
            if r.status != 200 {
                return Err(anyhow!("GET /metrics answered HTTP {}", r.status));
            }
            let text = String::from_utf8_lossy(&r.body);
            if cli.json {
                // The samples (histogram buckets left out) as {"series": value}.
                let map: serde_json::Map<String, Value> = samples(&text)
                    .map(|(k, v)| (k.to_string(), json!(v)))
                    .collect();
                println!("{}", serde_json::to_string_pretty(&map)?);
            } else {
                let rows: Vec<(&str, f64)> = samples(&text).collect();
                let w = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
                println!("{:<w$}  VALUE", "METRIC");
                for (k, v) in rows {
                    println!("{k:<w$}  {v}");
                }
            }
            return Ok(());
        }
    };
    print(&out, cli.json);
    Ok(())
}

/// Prints a line on stderr each time template `name`'s build reaches a new step, until `done`.
fn watch_build(sock: &Path, name: &str, done: &std::sync::atomic::AtomicBool) {
    let path = format!("/v1/templates/{}", seg(name));
    let mut last = 0;
    while !done.load(std::sync::atomic::Ordering::Relaxed) {
        if let Ok(r) = client::request(sock, "GET", &path, None) {
            let v: Value = serde_json::from_slice(&r.body).unwrap_or(Value::Null);
            let n = v["step_no"].as_u64().unwrap_or(0);
            if r.status == 200 && v["status"] == "building" && n > last {
                eprintln!(
                    "template {name}: [{n}/{}] {} ({:.1} s)",
                    v["steps"],
                    v["label"].as_str().unwrap_or(""),
                    v["elapsed_s"].as_f64().unwrap_or(0.0)
                );
                last = n;
            }
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// The samples of a Prometheus text exposition, histogram buckets left out.
fn samples(text: &str) -> impl Iterator<Item = (&str, f64)> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.contains("_bucket{"))
        .filter_map(|l| {
            let (k, v) = l.rsplit_once(' ')?;
            Some((k, v.parse().ok()?))
        })
}

/// Percent-encodes a path segment (names are validated by the daemon; this only keeps the
/// request line well-formed).
fn seg(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'.' | b'_' | b'-' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn call(sock: &Path, method: &str, path: &str, body: Option<Value>) -> Result<Value> {
    let r = client::request(sock, method, path, body.as_ref())?;
    let v: Value = if r.body.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&r.body)
            .map_err(|e| anyhow!("the daemon sent a non-JSON reply ({}): {e}", r.status))?
    };
    if r.status >= 400 {
        let msg = v["error"].as_str().unwrap_or("(no message)");
        return Err(anyhow!("{msg} (HTTP {})", r.status));
    }
    Ok(v)
}

/// Prints `v` as JSON or as a table (one row per object, its scalar fields as columns).
fn print(v: &Value, json: bool) {
    if json {
        println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
        return;
    }
    let rows: Vec<&Value> = match v {
        Value::Array(a) => a.iter().collect(),
        Value::Null => return,
        o => vec![o],
    };
    let Some(first) = rows.first().and_then(|r| r.as_object()) else {
        return;
    };
    let cols: Vec<&String> = first
        .iter()
        .filter(|(_, v)| !v.is_object() && !v.is_array())
        .map(|(k, _)| k)
        .collect();
    let cell = |r: &Value, c: &str| match &r[c] {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        Value::Number(n) if n.is_f64() => format!("{:.2}", n.as_f64().unwrap_or(0.0)),
        x => x.to_string(),
    };
    let widths: Vec<usize> = cols
        .iter()
        .map(|c| {
            rows.iter()
                .map(|r| cell(r, c).len())
                .chain([c.len()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let line = |vals: Vec<String>| {
        let s: Vec<String> = vals
            .iter()
            .zip(&widths)
            .map(|(v, w)| format!("{v:<w$}"))
            .collect();
        println!("{}", s.join("  ").trim_end());
    };
    line(cols.iter().map(|c| c.to_uppercase()).collect());
    for r in &rows {
        line(cols.iter().map(|c| cell(r, c)).collect());
    }
}
