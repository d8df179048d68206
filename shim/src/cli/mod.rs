//! The commands: argument definitions and dispatch. One module per group of commands.

mod fork;
mod info;
mod lifecycle;
mod manage;
mod process;

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use shim::sandbox::connect;
use shim::state::{ContainerDir, Record};

use crate::Cli;

/// What `create` and `run` share (runc's flags; the ones runv does not need are accepted).
#[derive(Debug, Args)]
pub struct CreateArgs {
    /// Bundle directory.
    #[arg(long, short = 'b', default_value = ".")]
    bundle: PathBuf,
    /// Write the monitor's pid here.
    #[arg(long)]
    pid_file: Option<PathBuf>,
    /// Unix socket that receives the pty master (process.terminal).
    #[arg(long)]
    console_socket: Option<PathBuf>,
    /// Accepted (the sandbox always pivots).
    #[arg(long)]
    no_pivot: bool,
    /// Accepted.
    #[arg(long)]
    no_new_keyring: bool,
    /// Extra file descriptors to pass (only 0 is supported).
    #[arg(long, default_value_t = 0)]
    preserve_fds: u32,
    /// Container id.
    id: String,
}

impl CreateArgs {
    fn opts(&self, foreground: bool) -> lifecycle::CreateOpts<'_> {
        lifecycle::CreateOpts {
            bundle: &self.bundle,
            pid_file: self.pid_file.as_deref(),
            console_socket: self.console_socket.as_deref(),
            preserve_fds: self.preserve_fds,
            id: &self.id,
            foreground,
        }
    }
}

/// A runv command.
#[derive(Debug, Subcommand)]
pub enum Cmd {
    /// Create a container (its process waits for `start`).
    Create {
        #[command(flatten)]
        args: CreateArgs,
    },
    /// Start a created container.
    Start {
        /// Container id.
        id: String,
    },
    /// Create and start a container; without --detach wait for it and exit with its status.
    Run {
        /// Return once started.
        #[arg(long, short = 'd')]
        detach: bool,
        #[command(flatten)]
        args: CreateArgs,
    },
    /// Print the OCI state of a container.
    State {
        /// Container id.
        id: String,
    },
    /// Send a signal (default SIGTERM).
    Kill {
        /// Every process of the container.
        #[arg(long, short = 'a')]
        all: bool,
        /// Container id.
        id: String,
        /// Signal name or number.
        #[arg(default_value = "SIGTERM")]
        signal: String,
    },
    /// Remove a container (a running one only with --force).
    Delete {
        /// Kill it first if it runs.
        #[arg(long, short = 'f')]
        force: bool,
        /// Container id.
        id: String,
    },
    /// Run a process in a running container.
    Exec {
        /// process.json describing the process.
        #[arg(long, short = 'p')]
        process: Option<PathBuf>,
        /// Return once started.
        #[arg(long, short = 'd')]
        detach: bool,
        /// Write the process's pid here.
        #[arg(long)]
        pid_file: Option<PathBuf>,
        /// Unix socket that receives the pty master.
        #[arg(long)]
        console_socket: Option<PathBuf>,
        /// Allocate a terminal.
        #[arg(long, short = 't')]
        tty: bool,
        /// Working directory.
        #[arg(long)]
        cwd: Option<String>,
        /// Extra environment (KEY=VALUE).
        #[arg(long, short = 'e')]
        env: Vec<String>,
        /// Container id.
        id: String,
        /// Command and arguments.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// List a container's processes.
    Ps {
        /// table or json.
        #[arg(long, short = 'f', default_value = "table")]
        format: String,
        /// Container id.
        id: String,
    },
    /// List containers.
    List {
        /// table or json.
        #[arg(long, short = 'f', default_value = "table")]
        format: String,
        /// Ids only.
        #[arg(long, short = 'q')]
        quiet: bool,
    },
    /// Freeze a container (vm sandbox: its vCPUs are parked).
    Pause {
        /// Container id.
        id: String,
    },
    /// Thaw a paused container.
    Resume {
        /// Container id.
        id: String,
    },
    /// Change a container's memory, pids and cpu limits.
    Update {
        /// OCI linux.resources JSON file (`-` = stdin).
        #[arg(long, short = 'r')]
        resources: PathBuf,
        /// Container id.
        id: String,
    },
    /// Print a container's events and resource usage as JSON lines.
    Events {
        /// Print one stats event and exit.
        #[arg(long)]
        stats: bool,
        /// Time between stats events.
        #[arg(long, default_value = "5s")]
        interval: String,
        /// Container id.
        id: String,
    },
    /// Print what this runtime supports (JSON, as runc's).
    Features,
    /// Write a default config.json.
    Spec {
        /// Bundle directory.
        #[arg(long, short = 'b', default_value = ".")]
        bundle: PathBuf,
        /// Accepted.
        #[arg(long)]
        rootless: bool,
    },
    /// Internal: the per-container monitor process.
    #[command(name = "__monitor", hide = true)]
    Monitor {
        /// Readiness pipe descriptor.
        #[arg(long)]
        ready_fd: i32,
        /// Console socket.
        #[arg(long)]
        console_socket: Option<PathBuf>,
        /// Container id.
        id: String,
    },
}

/// Runs the command; returns the exit code.
pub fn dispatch(cli: &Cli) -> Result<i32> {
    match &cli.cmd {
        Cmd::Create { args } => lifecycle::create(cli, &args.opts(false)).map(|_| 0),
        Cmd::Start { id } => lifecycle::start(cli, id).map(|()| 0),
        Cmd::Run { detach, args } => lifecycle::run(cli, &args.opts(!*detach), *detach),
        Cmd::State { id } => {
            let (_, r) = load(cli, id)?;
            println!("{}", serde_json::to_string_pretty(&r.oci_state())?);
            Ok(0)
        }
        Cmd::Kill { all, id, signal } => lifecycle::kill(cli, id, signal, *all).map(|()| 0),
        Cmd::Delete { force, id } => lifecycle::delete(cli, id, *force).map(|()| 0),
        Cmd::Exec {
            process,
            detach,
            pid_file,
            console_socket,
            tty,
            cwd,
            env,
            id,
            args,
        } => process::exec(
            cli,
            &process::ExecOpts {
                process: process.as_deref(),
                detach: *detach,
                pid_file: pid_file.as_deref(),
                console_socket: console_socket.as_deref(),
                tty: *tty,
                cwd: cwd.as_deref(),
                env,
                id,
                args,
            },
        ),
        Cmd::Ps { format, id } => process::ps(cli, id, format).map(|()| 0),
        Cmd::List { format, quiet } => info::list(cli, format, *quiet).map(|()| 0),
        Cmd::Pause { id } => manage::pause(cli, id, true).map(|()| 0),
        Cmd::Resume { id } => manage::pause(cli, id, false).map(|()| 0),
        Cmd::Update { resources, id } => manage::update(cli, resources, id).map(|()| 0),
        Cmd::Events {
            stats,
            interval,
            id,
        } => {
            let interval = manage::parse_interval(interval)?;
            manage::events(cli, id, *stats, interval).map(|()| 0)
        }
        Cmd::Features => info::features(cli).map(|()| 0),
        Cmd::Spec { bundle, .. } => info::spec(bundle).map(|()| 0),
        Cmd::Monitor {
            ready_fd,
            console_socket,
            id,
        } => lifecycle::monitor(cli, *ready_fd, console_socket.clone(), id),
    }
}

/// The directory and record of an existing container.
pub fn load(cli: &Cli, id: &str) -> Result<(ContainerDir, Record)> {
    shim::id::validate(id)?;
    let dir = ContainerDir::new(&cli.root, id);
    let r = dir.load()?;
    Ok((dir, r))
}

/// A client of the container's agent.
pub fn client(dir: &ContainerDir, r: &Record) -> Result<protocol::client::Client> {
    connect(dir, r).with_context(|| format!("container {}", dir.id))
}

/// Fails unless the agent answered `Ok`-like; returns the response.
pub fn expect_ok(r: protocol::Response, what: &str) -> Result<protocol::Response> {
    match r {
        protocol::Response::Error(e) => bail!("{what}: {}", e.message),
        other => Ok(other),
    }
}

/// Writes `pid` to `path` atomically, as runc does.
pub fn write_pid_file(path: &std::path::Path, pid: i32) -> Result<()> {
    let tmp = path.with_extension("runv-tmp");
    std::fs::write(&tmp, pid.to_string())
        .with_context(|| format!("writing the pid file {}", tmp.display()))?;
    std::fs::rename(&tmp, path)
        .with_context(|| format!("writing the pid file {}", path.display()))?;
    Ok(())
}
