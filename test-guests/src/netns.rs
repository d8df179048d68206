//! Network namespaces with TAP devices for tests and benches that drive the test guest's
//! `rt.net` task: everything lives in a namespace the caller creates (loopback-only traffic) and
//! is deleted, TAPs included, when the [`Netns`] drops. Uses `ip` (iproute2) and `ping`.

use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

static NEXT: AtomicU32 = AtomicU32::new(0);

/// Why network tests cannot run here (`None`: they can): root, `/dev/net/tun`, `ip`, `ping`.
pub fn unavailable() -> Option<String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("not root".into());
    }
    if !std::path::Path::new("/dev/net/tun").exists() {
        return Some("/dev/net/tun missing".into());
    }
    for tool in ["ip", "ping"] {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !found {
            return Some(format!(
                "{tool} missing (apt-get install iproute2 iputils-ping)"
            ));
        }
    }
    None
}

/// A network namespace of our own, deleted (with its TAPs) on drop.
pub struct Netns {
    /// Its name (`ip netns` name).
    pub name: String,
}

fn run(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("ip {args:?}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "ip {args:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(())
}

impl Netns {
    /// Creates a namespace (loopback up) named `rvt<pid>-<n>`.
    pub fn new() -> Result<Self, String> {
        let name = format!(
            "rvt{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        run(&["netns", "add", &name])?;
        let ns = Self { name };
        run(&["-n", &ns.name, "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// Creates TAP `tap` in the namespace, up, with the host-side address `cidr` (e.g.
    /// `10.77.0.1/24`).
    pub fn add_tap(&self, tap: &str, cidr: &str) -> Result<(), String> {
        run(&["-n", &self.name, "tuntap", "add", "dev", tap, "mode", "tap"])?;
        run(&["-n", &self.name, "addr", "add", cidr, "dev", tap])?;
        run(&["-n", &self.name, "link", "set", tap, "up"])
    }

    /// A command that runs `program` inside the namespace.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name]).arg(program);
        c
    }

    /// Pings `addr` from the namespace `count` times, `interval` seconds apart, waiting at
    /// most `wait` seconds per reply; returns the round-trip times (ms) of the replies.
    pub fn ping(&self, addr: &str, count: u32, interval: f64, wait: u32) -> Vec<f64> {
        let out = self
            .command("ping")
            .args(["-n", "-c", &count.to_string(), "-W", &wait.to_string()])
            .args(["-i", &interval.to_string(), addr])
            .stderr(Stdio::null())
            .output();
        let Ok(out) = out else { return Vec::new() };
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| l.contains(&format!("from {addr}:")))
            .filter_map(|l| l.split("time=").nth(1)?.split(' ').next()?.parse().ok())
            .collect()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Err(e) = run(&["netns", "del", &self.name]) {
            eprintln!("removing network namespace {}: {e}", self.name);
        }
    }
}
