//! `pause`, `resume`, `update` and `events`: managing a running container.

use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use protocol::{Request, Resources, Response};
use shim::sandbox::{manage, Kind};
use shim::state::Status;

use super::{client, expect_ok, load};
use crate::Cli;

/// `runv pause` / `runv resume`: the vm backend parks or unparks the clone's vCPUs through the
/// VMM's control API; the host backend freezes or thaws the container's processes through the
/// agent (its cgroup freezer, as runc).
pub fn pause(cli: &Cli, id: &str, pause: bool) -> Result<()> {
    let (dir, r) = load(cli, id)?;
    let verb = manage::verb(pause);
    let kind = Kind::parse(&r.sandbox).with_context(|| format!("container {id}"))?;
    if r.status() != Status::Running {
        bail!(
            "container {id} is {}: only a running container can be {verb}d",
            r.status().name()
        );
    }
    if r.paused == pause {
        bail!(
            "container {id} is {}",
            if pause {
                "already paused"
            } else {
                "not paused"
            }
        );
    }
    match manage::freezer(kind) {
        manage::Freezer::Vm => {
            manage::pause_vm(&dir, pause).with_context(|| format!("container {id}: {verb}"))?
        }
        manage::Freezer::Agent => {
            let mut c = client(&dir, &r)?;
            let answer = c
                .call(&manage::agent_request(id, pause))
                .with_context(|| format!("container {id}: {verb}"))?;
            expect_ok(answer, &format!("container {id}: {verb}"))?;
        }
    }
    dir.update(|r| r.paused = pause)?;
    Ok(())
}

/// Reads runc's `--resources` file (OCI `linux.resources` JSON; `-` = stdin).
fn read_resources(path: &Path) -> Result<Resources> {
    let text = if path == Path::new("-") {
        std::io::read_to_string(std::io::stdin()).context("reading the resources from stdin")?
    } else {
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?
    };
    let r: oci_spec::runtime::LinuxResources = serde_json::from_str(&text)
        .with_context(|| format!("{}: not an OCI linux.resources object", path.display()))?;
    Ok(manage::resources(&r))
}

/// `runv update --resources F ID`: memory, pids and cpu limits through the agent.
pub fn update(cli: &Cli, resources: &Path, id: &str) -> Result<()> {
    let res = read_resources(resources)?;
    if res == Resources::default() {
        bail!(
            "{}: no memory.limit, pids.limit or cpu.quota to apply (runv updates only those)",
            resources.display()
        );
    }
    let (dir, r) = load(cli, id)?;
    if !matches!(r.status(), Status::Created | Status::Running) {
        bail!("container {id} is {}: nothing to update", r.status().name());
    }
    let mut c = client(&dir, &r)?;
    let answer = c.call(&Request::Update {
        id: id.into(),
        resources: res,
    })?;
    expect_ok(answer, &format!("container {id}: update"))?;
    Ok(())
}

/// Parses runc's `--interval` (`5s`, `500ms`, `1m`, or plain seconds).
pub fn parse_interval(s: &str) -> Result<Duration> {
    let (num, unit) = s
        .find(|c: char| !c.is_ascii_digit())
        .map_or((s, "s"), |i| s.split_at(i));
    let n: u64 = num
        .parse()
        .with_context(|| format!("--interval {s:?}: use e.g. 5s or 500ms"))?;
    let d = match unit {
        "ms" => Duration::from_millis(n),
        "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(n * 60),
        _ => bail!("--interval {s:?}: use e.g. 5s or 500ms"),
    };
    if d.is_zero() {
        bail!("--interval must be positive");
    }
    Ok(d)
}

/// One runc-style stats event line from the agent's stats.
fn stats_event(id: &str, s: &protocol::ContainerStats) -> serde_json::Value {
    serde_json::json!({
        "type": "stats",
        "id": id,
        "data": {
            "cpu": {"usage": {"total": s.cpu_usage_usec.saturating_mul(1000)}},
            "memory": {"usage": {"usage": s.memory_current, "limit": s.memory_max.unwrap_or(0)}},
            "pids": {"current": s.pids_current},
        }
    })
}

/// `runv events [--stats] [--interval D] ID`: runc's JSON lines; with `--stats` one stats event,
/// else one every interval (plus an `oom` event when the OOM count grows) until the container
/// stops.
pub fn events(cli: &Cli, id: &str, once: bool, interval: Duration) -> Result<()> {
    let (dir, r) = load(cli, id)?;
    if !matches!(r.status(), Status::Created | Status::Running) {
        bail!("container {id} is {}: it has no events", r.status().name());
    }
    let mut c = client(&dir, &r)?;
    let mut ooms = None;
    loop {
        let s = match c.call(&Request::Stats { id: id.into() }) {
            Ok(Response::Stats(s)) => s,
            Ok(Response::Error(e)) if !once => {
                // The container ended between two polls.
                let _ = e;
                return Ok(());
            }
            Ok(other) => bail!(
                "container {id}: stats: unexpected answer {:?}",
                expect_ok(other, "stats")?
            ),
            Err(_) if !once => return Ok(()),
            Err(e) => return Err(e).context(format!("container {id}: stats")),
        };
        if ooms.is_some_and(|n| s.oom_kills > n) {
            println!("{}", serde_json::json!({"type": "oom", "id": id}));
        }
        ooms = Some(s.oom_kills);
        println!("{}", stats_event(id, &s));
        if once {
            return Ok(());
        }
        std::thread::sleep(interval);
        if !matches!(dir.load()?.status(), Status::Created | Status::Running) {
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn intervals() {
        assert_eq!(parse_interval("5s").unwrap(), Duration::from_secs(5));
        assert_eq!(parse_interval("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_interval("2").unwrap(), Duration::from_secs(2));
        assert_eq!(parse_interval("1m").unwrap(), Duration::from_secs(60));
        for bad in ["", "x", "5h", "0s"] {
            assert!(parse_interval(bad).is_err(), "{bad}");
        }
    }
}
