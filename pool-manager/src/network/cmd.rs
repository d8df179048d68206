//! The host tools behind sandbox networking: `ip` (iproute2) and `nft` (nftables).

use std::io::Write;
use std::process::{Command, Stdio};

use super::{lease::Block, NFT_TABLE};

/// Error setting up or tearing down a sandbox network.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// A host command failed.
    #[error("{what}: {detail}")]
    Command {
        /// The command.
        what: String,
        /// Its error output or why it could not run.
        detail: String,
    },
    /// The network configuration is invalid.
    #[error("{0}")]
    Config(String),
    /// No address block is free.
    #[error("{0}")]
    Exhausted(String),
    /// The operation does not apply now.
    #[error("{0}")]
    State(String),
}

/// Whether `tool` is on `$PATH` (or in /usr/sbin, /sbin).
pub(super) fn found(tool: &str) -> bool {
    let path = std::env::var("PATH").unwrap_or_default();
    let found = path
        .split(':')
        .chain(["/usr/sbin", "/sbin"])
        .any(|d| std::path::Path::new(d).join(tool).is_file());
    found
}

pub(super) fn run(program: &str, args: &[&str], stdin: Option<&str>) -> Result<String, NetError> {
    let what = format!("{program} {}", args.join(" "));
    let mut child = Command::new(program)
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| NetError::Command {
            what: what.clone(),
            detail: format!("{e} (is {program} installed? apt-get install iproute2 nftables)"),
        })?;
    if let (Some(text), Some(mut input)) = (stdin, child.stdin.take()) {
        // A failed write shows as the command's own error below.
        let _ = input.write_all(text.as_bytes());
    }
    let out = child.wait_with_output().map_err(|e| NetError::Command {
        what: what.clone(),
        detail: e.to_string(),
    })?;
    if !out.status.success() {
        let detail = match stdin {
            Some(text) => format!(
                "{} (input: {})",
                String::from_utf8_lossy(&out.stderr).trim(),
                text.trim().replace('\n', "; ")
            ),
            None => String::from_utf8_lossy(&out.stderr).trim().to_string(),
        };
        return Err(NetError::Command { what, detail });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `ip ARGS`.
pub(super) fn ip(args: &[&str]) -> Result<(), NetError> {
    run("ip", args, None).map(drop)
}

/// `ip [-n NS] -batch -` with one command a line: one process for many changes.
pub(super) fn ip_batch(netns: Option<&str>, script: &str) -> Result<(), NetError> {
    let mut args = Vec::new();
    if let Some(ns) = netns {
        args.extend(["-n", ns]);
    }
    args.extend(["-batch", "-"]);
    run("ip", &args, Some(script)).map(drop)
}

/// Turns IPv4 forwarding on in namespace `netns` (the host's when `None`).
pub(super) fn sysctl_forward(netns: Option<&str>) -> Result<(), NetError> {
    let path = "/proc/sys/net/ipv4/ip_forward";
    match netns {
        None => {
            if std::fs::read_to_string(path).is_ok_and(|v| v.trim() == "1") {
                return Ok(());
            }
            std::fs::write(path, "1").map_err(|e| NetError::Command {
                what: format!("writing 1 to {path}"),
                detail: e.to_string(),
            })
        }
        // /proc/sys/net shows the namespace of the process that opens it.
        Some(ns) => run(
            "ip",
            &["netns", "exec", ns, "sh", "-c", &format!("echo 1 > {path}")],
            None,
        )
        .map(drop),
    }
}

/// The table and its chains (idempotent), as an `nft -f` script.
fn table_script() -> String {
    format!(
        "add table ip {NFT_TABLE}\n\
         add chain ip {NFT_TABLE} postrouting {{ type nat hook postrouting priority srcnat; }}\n\
         add chain ip {NFT_TABLE} forward {{ type filter hook forward priority filter; }}\n"
    )
}

/// Adds a sandbox's egress rules (NAT of its block out of any interface but its own veth;
/// forwarding from its veth, and back for established flows), each commented with the VM's
/// name; returns (chain, handle) of each.
pub(super) fn nft_add_rules(
    veth: &str,
    block: &Block,
    vm_name: &str,
) -> Result<Vec<(String, u64)>, NetError> {
    run("nft", &["-f", "-"], Some(&table_script()))?;
    let rules = [
        (
            "postrouting",
            format!(
                "ip saddr {}/29 oifname != \"{veth}\" masquerade comment \"{vm_name}\"",
                block.base()
            ),
        ),
        (
            "forward",
            format!("iifname \"{veth}\" accept comment \"{vm_name}\""),
        ),
        (
            "forward",
            format!("oifname \"{veth}\" ct state established,related accept comment \"{vm_name}\""),
        ),
    ];
    let mut handles = Vec::new();
    for (chain, rule) in rules {
        let added = run(
            "nft",
            &["--echo", "--handle", "-f", "-"],
            Some(&format!("add rule ip {NFT_TABLE} {chain} {rule}\n")),
        );
        let handle = added.and_then(|out| {
            out.rsplit("# handle ")
                .next()
                .and_then(|h| h.split_whitespace().next()?.parse::<u64>().ok())
                .ok_or_else(|| NetError::Command {
                    what: format!("nft add rule ip {NFT_TABLE} {chain}"),
                    detail: format!("no handle in its echo {out:?}"),
                })
        });
        match handle {
            Ok(h) => handles.push((chain.to_string(), h)),
            Err(e) => {
                for (c, h) in &handles {
                    let _ = nft_delete(c, *h);
                }
                return Err(e);
            }
        }
    }
    Ok(handles)
}

/// Deletes rule `handle` of `chain` in the pool's table.
pub(super) fn nft_delete(chain: &str, handle: u64) -> Result<(), NetError> {
    run(
        "nft",
        &[
            "delete",
            "rule",
            "ip",
            NFT_TABLE,
            chain,
            "handle",
            &handle.to_string(),
        ],
        None,
    )
    .map(drop)
}

/// Rules in the pool's table whose comment is `vm_name` (every VM's when `None`): for tests and
/// leak checks.
pub fn nft_rules(vm_name: Option<&str>) -> Result<usize, NetError> {
    let out = match run("nft", &["list", "table", "ip", NFT_TABLE], None) {
        Ok(o) => o,
        // No table: no rules.
        Err(NetError::Command { detail, .. }) if detail.contains("No such file") => return Ok(0),
        Err(e) => return Err(e),
    };
    Ok(out
        .lines()
        .filter(|l| l.contains("comment \""))
        .filter(|l| vm_name.is_none_or(|n| l.contains(&format!("comment \"{n}\""))))
        .count())
}
