//! exec and ps.

use std::path::Path;

use anyhow::{bail, Context, Result};
use protocol::{Request, Response, StdioConfig};
use shim::monitor::{host_io, load_spec};
use shim::relay::relay;
use shim::state::Status;

use super::{client, expect_ok, load, write_pid_file};
use crate::Cli;

/// Options of `exec`.
pub struct ExecOpts<'a> {
    /// process.json.
    pub process: Option<&'a Path>,
    /// Return once started.
    pub detach: bool,
    /// Pid file.
    pub pid_file: Option<&'a Path>,
    /// Console socket.
    pub console_socket: Option<&'a Path>,
    /// Terminal.
    pub tty: bool,
    /// Working directory.
    pub cwd: Option<&'a str>,
    /// Extra environment.
    pub env: &'a [String],
    /// Container id.
    pub id: &'a str,
    /// Command.
    pub args: &'a [String],
}

fn process(
    dir: &shim::state::ContainerDir,
    o: &ExecOpts<'_>,
) -> Result<oci_spec::runtime::Process> {
    if let Some(p) = o.process {
        let text =
            std::fs::read(p).with_context(|| format!("reading --process {}", p.display()))?;
        return serde_json::from_slice(&text)
            .with_context(|| format!("--process {}: not an OCI process", p.display()));
    }
    if o.args.is_empty() {
        bail!("exec needs a command: `runv exec ID CMD [ARGS...]` or --process FILE");
    }
    let spec = load_spec(dir)?;
    let mut p = spec.process().clone().unwrap_or_default();
    p.set_args(Some(o.args.to_vec()));
    p.set_terminal(Some(o.tty));
    if let Some(cwd) = o.cwd {
        p.set_cwd(cwd.into());
    }
    let mut env = p.env().clone().unwrap_or_default();
    env.extend(o.env.iter().cloned());
    p.set_env(Some(env));
    Ok(p)
}

/// `runv exec`: returns the process's exit status (0 with --detach).
pub fn exec(cli: &Cli, o: &ExecOpts<'_>) -> Result<i32> {
    let (dir, r) = load(cli, o.id)?;
    let status = r.status();
    if status != Status::Running {
        bail!(
            "container {} is {}: exec needs a running container",
            o.id,
            status.name()
        );
    }
    let proc = process(&dir, o)?;
    let terminal = proc.terminal().unwrap_or(false);
    let io = host_io(terminal, o.console_socket)?;
    let mut c = client(&dir, &r)?;
    let exec_id = format!(
        "exec-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos()
    );
    let resp = c
        .call(&Request::Exec {
            id: o.id.into(),
            exec_id: exec_id.clone(),
            process: Box::new(proc),
            stdio: StdioConfig {
                terminal,
                stdin: !o.detach,
            },
        })
        .context("starting the process")?;
    let (pid, streams) = match expect_ok(resp, &format!("exec in container {}", o.id))? {
        Response::ExecStarted { pid, streams, .. } => (pid, streams),
        other => bail!("exec in container {}: unexpected answer {other:?}", o.id),
    };
    if let Some(p) = o.pid_file {
        write_pid_file(p, pid)?;
    }
    if o.detach {
        return Ok(0);
    }
    let wait_id = c.send(&Request::Wait {
        id: o.id.into(),
        exec_id: Some(exec_id),
    })?;
    let status = relay(&mut c, streams, wait_id, io)?;
    Ok(status.code)
}

/// `runv ps`: the container's processes (host pids with the host sandbox).
pub fn ps(cli: &Cli, id: &str, format: &str) -> Result<()> {
    let (dir, r) = load(cli, id)?;
    if !matches!(r.status(), Status::Created | Status::Running) {
        bail!("container {id} is {}: no processes", r.status().name());
    }
    let mut c = client(&dir, &r)?;
    let pids = match expect_ok(c.call(&Request::Ps { id: id.into() })?, "ps")? {
        Response::Processes { pids, .. } => pids,
        other => bail!("ps of container {id}: unexpected answer {other:?}"),
    };
    match format {
        "json" => println!("{}", serde_json::to_string(&pids)?),
        "table" => {
            println!("PID\tCMD");
            for p in pids {
                let cmd = std::fs::read(format!("/proc/{p}/cmdline"))
                    .map(|b| {
                        String::from_utf8_lossy(&b)
                            .split('\0')
                            .filter(|s| !s.is_empty())
                            .collect::<Vec<_>>()
                            .join(" ")
                    })
                    .unwrap_or_default();
                println!("{p}\t{cmd}");
            }
        }
        other => bail!("unknown --format {other:?}: use table or json"),
    }
    Ok(())
}
