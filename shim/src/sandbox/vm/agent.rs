//! Reaching a clone's agent: the `CONNECT <port>` handshake on the VMM's vsock socket
//! (Firecracker's hybrid vsock), a first `ping`, and the clone hooks.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use protocol::client::Client;
use protocol::{Request, Response};

use super::VmError;

/// Opens a connection to guest port `port` through the vsock socket `uds`: writes
/// `CONNECT <port>\n`, expects `OK <host port>\n` (read byte by byte, so no protocol byte is
/// consumed), then speaks the agent protocol.
pub fn connect(uds: &Path, port: u32, timeout: Duration) -> Result<Client, String> {
    let mut s =
        UnixStream::connect(uds).map_err(|e| format!("connecting {}: {e}", uds.display()))?;
    s.set_read_timeout(Some(timeout.max(Duration::from_millis(1))))
        .map_err(|e| e.to_string())?;
    s.write_all(format!("CONNECT {port}\n").as_bytes())
        .map_err(|e| format!("vsock handshake: {e}"))?;
    let mut line = Vec::with_capacity(16);
    let mut b = [0u8; 1];
    while line.last() != Some(&b'\n') {
        match s.read(&mut b) {
            Ok(1) if line.len() < 64 => line.push(b[0]),
            Ok(0) => return Err(
                "the VMM closed the vsock connection (nothing listens on the port in the guest)"
                    .into(),
            ),
            Ok(_) => return Err("vsock handshake: reply line too long".into()),
            Err(e) => return Err(format!("vsock handshake: {e}")),
        }
    }
    if !line.starts_with(b"OK ") {
        return Err(format!(
            "vsock handshake: {:?}",
            String::from_utf8_lossy(&line).trim()
        ));
    }
    Client::from_stream(s).map_err(|e| e.to_string())
}

/// Connects and pings until the agent answers `ready`, retrying for `timeout` at most.
pub fn connect_ready(uds: &Path, port: u32, timeout: Duration) -> Result<Client, String> {
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let err = match connect(uds, port, left).and_then(|mut c| {
            // A ping lost with a connection the guest dropped is retried on a new one.
            let wait = left.clamp(Duration::from_millis(1), Duration::from_secs(1));
            match c.call_timeout(&Request::Ping, wait) {
                Ok(Response::Pong { ready: true, .. }) => Ok(c),
                Ok(other) => Err(format!("ping answered {other:?}")),
                Err(e) => Err(format!("ping: {e}")),
            }
        }) {
            Ok(c) => return Ok(c),
            Err(e) => e,
        };
        if Instant::now() >= deadline {
            return Err(err);
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// What the clone hooks send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hooks {
    /// Fresh entropy for the guest RNG.
    pub entropy: Vec<u8>,
    /// Wall clock, nanoseconds since the epoch.
    pub unix_nanos: i64,
    /// Hostname, when the spec sets one (or the caller picks one).
    pub hostname: Option<String>,
    /// The guest's network (`set_network`), when the sandbox has one.
    pub network: Option<super::net::NetHook>,
}

impl Hooks {
    /// 32 bytes from the kernel's RNG, the current time, `hostname`.
    pub fn fresh(hostname: Option<String>) -> Result<Self, VmError> {
        let mut entropy = vec![0u8; 32];
        std::fs::File::open("/dev/urandom")
            .and_then(|mut f| f.read_exact(&mut entropy))
            .map_err(|e| VmError::Hook("reseed", format!("reading /dev/urandom: {e}")))?;
        let unix_nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
            .unwrap_or(0);
        Ok(Self {
            entropy,
            unix_nanos,
            hostname,
            network: None,
        })
    }

    /// Runs them (reseed, set_clock, set_hostname, set_network); each must answer `ok`, within
    /// 5 s. They are independent, so all are sent before the first answer is read: one round
    /// trip to the guest instead of one per hook. The first failure in that order is reported.
    pub fn run(&self, c: &mut Client) -> Result<(), VmError> {
        let mut reqs = vec![
            (
                "reseed",
                Request::Reseed {
                    entropy: self.entropy.clone(),
                },
            ),
            (
                "set_clock",
                Request::SetClock {
                    unix_nanos: self.unix_nanos,
                },
            ),
        ];
        if let Some(h) = &self.hostname {
            reqs.push((
                "set_hostname",
                Request::SetHostname {
                    hostname: h.clone(),
                },
            ));
        }
        if let Some(n) = &self.network {
            reqs.push(("set_network", n.request()));
        }
        let mut sent = Vec::with_capacity(reqs.len());
        for (op, req) in &reqs {
            let id = c.send(req).map_err(|e| VmError::Hook(op, e.to_string()))?;
            sent.push((*op, id));
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        for (op, id) in sent {
            match c.response(id, deadline.saturating_duration_since(Instant::now())) {
                Ok(Response::Ok) => {}
                Ok(Response::Error(e)) => return Err(VmError::Hook(op, e.message)),
                Ok(other) => return Err(VmError::Hook(op, format!("unexpected answer {other:?}"))),
                Err(e) => return Err(VmError::Hook(op, e.to_string())),
            }
        }
        Ok(())
    }
}
