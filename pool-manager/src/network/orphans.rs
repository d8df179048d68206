//! What a killed pool leaves of its sandbox networks: namespaces `runv-vm-*` (and a jailed
//! template build's `runv-build-*`, claimed by the live VMM of that `--jail-id`), TAPs `rvt*` and
//! veth ends `rvh*` in the host's namespace, and rules in the `ip runv_pool` nftables table
//! commented with a VM's name. Namespaces, links and rules are host-wide, and several pools (a
//! daemon, runv's embedded ones) may share a host, so only what no live VMM anywhere claims is
//! removed (the caller adds the names live pools claim, [`super::claimed`], for objects made
//! before their VMM runs); a VM's name is `vm-<hex>` (the `--control .../vm-<hex>.sock` of its VMM), its
//! network objects carry that name or its first 12 hex digits.

use std::collections::HashSet;
use std::path::Path;

use super::{cmd, NETNS_PREFIX, NFT_TABLE, TAP_PREFIX, VETH_PREFIX};

/// Candidates for removal, listed before the live VMMs are: anything made later belongs to a VMM
/// that exists by then.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Leftovers {
    /// Namespaces `runv-vm-*` and `runv-build-*` (a jailed template build's).
    pub netns: Vec<String>,
    /// TAPs and veth host ends in this namespace (`rvt<hex>`, `rvh<hex>`).
    pub links: Vec<String>,
    /// Rules of the pool's table: (chain, handle, VM name of its comment).
    pub rules: Vec<(String, u64, String)>,
}

/// Lists the pool's network objects on this host.
pub fn find() -> Leftovers {
    let names = |dir: &str| -> Vec<String> {
        std::fs::read_dir(dir)
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default()
    };
    let netns = names("/run/netns")
        .into_iter()
        .filter(|n| {
            n.starts_with(&format!("{NETNS_PREFIX}vm-"))
                || n.starts_with(&format!("{NETNS_PREFIX}build-"))
        })
        .collect();
    let links = names("/sys/class/net")
        .into_iter()
        .filter(|n| link_suffix(n).is_some())
        .collect();
    let rules = cmd::run("nft", &["-a", "list", "table", "ip", NFT_TABLE], None)
        .map(|out| parse_rules(&out))
        .unwrap_or_default();
    Leftovers {
        netns,
        links,
        rules,
    }
}

/// The `<hex>` of a pool link name: `rvt`/`rvh` + 12 hex digits (a template build's TAP is
/// `rvtb` + 11).
fn link_suffix(name: &str) -> Option<&str> {
    let s = name
        .strip_prefix(TAP_PREFIX)
        .or_else(|| name.strip_prefix(VETH_PREFIX))?;
    (s.len() == 12 && s.bytes().all(|b| b.is_ascii_hexdigit())).then_some(s)
}

/// (chain, handle, VM name) of each commented rule of `nft -a list table` output.
fn parse_rules(out: &str) -> Vec<(String, u64, String)> {
    let mut chain = String::new();
    let mut rules = Vec::new();
    for line in out.lines().map(str::trim) {
        if let Some(c) = line.strip_prefix("chain ") {
            chain = c.split_whitespace().next().unwrap_or("").to_string();
            continue;
        }
        let Some((_, after)) = line.split_once("comment \"") else {
            continue;
        };
        let Some((vm, rest)) = after.split_once('"') else {
            continue;
        };
        let handle = rest
            .rsplit("# handle ")
            .next()
            .and_then(|h| h.trim().parse().ok());
        if let Some(h) = handle {
            rules.push((chain.clone(), h, vm.to_string()));
        }
    }
    rules
}

/// Names (`vm-<hex>`, and `build-<hex>` for a jailed template build VM: its `--jail-id`) of
/// every live VMM on the host whose pid is not in `except`; a jailed
/// VMM proper whose keeper (its parent, same command line) is in `except` is being ended too.
pub fn live_vms(except: &HashSet<u32>) -> HashSet<String> {
    let mut out = HashSet::new();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return out;
    };
    for p in procs.flatten() {
        let Some(pid) = p.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        if except.contains(&pid)
            || crate::shell::parent_of(pid).is_some_and(|pp| except.contains(&pp))
        {
            continue;
        }
        let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
        for w in args.windows(2).filter(|w| w[0] == b"--control") {
            let sock = String::from_utf8_lossy(w[1]);
            let name = Path::new(sock.as_ref())
                .file_name()
                .map(|f| f.to_string_lossy().into_owned())
                .unwrap_or_default();
            if let Some(vm) = name.strip_suffix(".sock").filter(|n| n.starts_with("vm-")) {
                out.insert(vm.to_string());
            }
        }
        for w in args.windows(2).filter(|w| w[0] == b"--jail-id") {
            if w[1].starts_with(b"build-") {
                out.insert(String::from_utf8_lossy(w[1]).into_owned());
            }
        }
    }
    out
}

/// TAPs some process holds open (`iff:` in the fdinfo of its `/dev/net/tun` files).
fn open_taps() -> HashSet<String> {
    let mut out = HashSet::new();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return out;
    };
    for p in procs.flatten() {
        let Ok(fds) = std::fs::read_dir(p.path().join("fdinfo")) else {
            continue;
        };
        for fd in fds.flatten() {
            if let Ok(info) = std::fs::read_to_string(fd.path()) {
                if let Some(l) = info.lines().find_map(|l| l.strip_prefix("iff:")) {
                    out.insert(l.trim().to_string());
                }
            }
        }
    }
    out
}

/// Removes the objects of `found` that belong to no VM of `live` (the names of live VMMs, see
/// [`live_vms`]); a link whose VM is neither live nor in `ended` (VMMs being ended now) is kept
/// while some process holds it open. Returns how many were removed.
pub fn remove(found: &Leftovers, live: &HashSet<String>, ended: &HashSet<String>) -> usize {
    let short = |vm: &str| {
        let s = vm.strip_prefix("vm-").unwrap_or(vm);
        s[..s.len().min(12)].to_string()
    };
    let live_short: HashSet<String> = live.iter().map(|v| short(v)).collect();
    let ended_short: HashSet<String> = ended.iter().map(|v| short(v)).collect();
    let mut removed = 0;
    for (chain, handle, vm) in &found.rules {
        if !live.contains(vm) && cmd::nft_delete(chain, *handle).is_ok() {
            tracing::info!(
                "removed nftables rule {chain}/{handle} of {vm}, left by an earlier pool"
            );
            removed += 1;
        }
    }
    for ns in &found.netns {
        let vm = &ns[NETNS_PREFIX.len()..];
        if !live.contains(vm) && cmd::ip(&["netns", "del", ns]).is_ok() {
            tracing::info!("removed network namespace {ns}, left by an earlier pool");
            removed += 1;
        }
    }
    let mut open = None;
    for link in &found.links {
        let Some(s) = link_suffix(link) else { continue };
        if live_short.contains(s) {
            continue;
        }
        if !ended_short.contains(s) && open.get_or_insert_with(open_taps).contains(link) {
            continue;
        }
        // A veth end may have gone with its namespace above.
        if Path::new("/sys/class/net").join(link).exists()
            && cmd::ip(&["link", "del", link]).is_ok()
        {
            tracing::info!("removed link {link}, left by an earlier pool");
            removed += 1;
        }
    }
    removed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_names_and_rules_parse() {
        assert_eq!(link_suffix("rvt0123456789ab"), Some("0123456789ab"));
        assert_eq!(link_suffix("rvh0123456789ab"), Some("0123456789ab"));
        assert_eq!(link_suffix("rvtb0123456789a"), Some("b0123456789a"));
        for n in [
            "rvtpod123",
            "rvt0123",
            "eth0",
            "rvt0123456789abc",
            "rvtxyz456789ab",
        ] {
            assert_eq!(link_suffix(n), None, "{n}");
        }
        let out = "table ip runv_pool { # handle 3\n\tchain postrouting { # handle 1\n\t\ttype nat hook postrouting priority srcnat; policy accept;\n\t\tip saddr 10.200.0.0/29 oifname != \"rvhab\" masquerade comment \"vm-ab\" # handle 7\n\t}\n\tchain forward { # handle 2\n\t\tiifname \"rvhab\" accept comment \"vm-ab\" # handle 8\n\t}\n}\n";
        assert_eq!(
            parse_rules(out),
            vec![
                ("postrouting".into(), 7, "vm-ab".into()),
                ("forward".into(), 8, "vm-ab".into())
            ]
        );
    }
}
