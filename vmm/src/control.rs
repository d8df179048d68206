//! The control socket: JSON lines over a Unix stream socket (contract in docs/ARCHITECTURE.md).

use std::io::ErrorKind;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::{json, Value};

/// Longest request line accepted; a longer one gets an error and the connection is closed.
pub const MAX_REQUEST: usize = 64 * 1024;

/// Error binding the control socket.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// Another process listens on the path.
    #[error(
        "control socket {0} is in use by a running process: choose another path or stop that VMM"
    )]
    InUse(String),
    /// Bind failed.
    #[error("binding control socket {path}: {source}")]
    Bind {
        /// Path.
        path: String,
        /// Cause.
        source: std::io::Error,
    },
}

/// Binds a Unix listener at `path`, replacing a stale socket file that nobody listens on.
pub fn bind_unix(path: &Path) -> Result<UnixListener, ControlError> {
    let name = path.display().to_string();
    if path.exists() {
        match UnixStream::connect(path) {
            Ok(_) => return Err(ControlError::InUse(name)),
            Err(e) if e.kind() == ErrorKind::ConnectionRefused => {
                let _ = std::fs::remove_file(path);
            }
            Err(source) => {
                return Err(ControlError::Bind { path: name, source });
            }
        }
    }
    let l = UnixListener::bind(path).map_err(|source| ControlError::Bind { path: name, source })?;
    l.set_nonblocking(true)
        .map_err(|source| ControlError::Bind {
            path: path.display().to_string(),
            source,
        })?;
    Ok(l)
}

/// A parsed control request.
#[derive(Debug, Deserialize)]
#[serde(tag = "cmd", rename_all = "lowercase")]
pub enum Request {
    /// VM state.
    Status,
    /// Park every vCPU.
    Pause,
    /// Unpark the vCPUs.
    Resume,
    /// End the VM cleanly.
    Shutdown,
    /// Pause (if running) and write a snapshot into an existing directory.
    Snapshot {
        /// Snapshot directory.
        dir: PathBuf,
    },
    /// Restore a snapshot into this (idle) shell.
    Restore(crate::RestoreOptions),
}

/// Parses one request line; the error is the reply to send.
pub fn parse(line: &[u8]) -> Result<Request, Value> {
    serde_json::from_slice(line).map_err(|e| {
        json!({"ok": false, "error": format!("bad request: {e}; expected {{\"cmd\": \"status\"|\"pause\"|\"resume\"|\"shutdown\"|\"snapshot\"|\"restore\", ...}}")})
    })
}

/// A control connection with its partial input.
pub struct Connection {
    /// The socket (non-blocking).
    pub stream: UnixStream,
    /// Bytes read but not yet a full line.
    pub buf: Vec<u8>,
}

impl Connection {
    /// Wraps an accepted stream, made non-blocking.
    pub fn new(stream: UnixStream) -> std::io::Result<Self> {
        stream.set_nonblocking(true)?;
        Ok(Self {
            stream,
            buf: Vec::new(),
        })
    }

    /// Reads whatever is available into `buf`; returns false once the peer closed or failed.
    pub fn read_available(&mut self) -> bool {
        use std::io::Read;
        let mut chunk = [0u8; 4096];
        loop {
            match self.stream.read(&mut chunk) {
                Ok(0) => return false,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == ErrorKind::WouldBlock => return true,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => return false,
            }
        }
    }
}

/// Removes the socket file when dropped.
pub struct SocketFile(pub PathBuf);

impl Drop for SocketFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_requests_and_rejects_garbage() {
        assert!(matches!(
            parse(br#"{"cmd":"status"}"#).unwrap(),
            Request::Status
        ));
        assert!(matches!(
            parse(br#"{"cmd":"pause"}"#).unwrap(),
            Request::Pause
        ));
        match parse(br#"{"cmd":"restore","dir":"/s","mem_mode":"uffd","clone_id":"c1","block":[{"index":0,"path":"/b"}]}"#)
            .unwrap()
        {
            Request::Restore(o) => {
                assert_eq!(o.mem_mode, crate::MemoryMode::Uffd);
                assert_eq!((o.clone_id.as_str(), o.block.len()), ("c1", 1));
            }
            other => panic!("parsed as {other:?}"),
        }
        for bad in [
            &b"nope"[..],
            br#"{"cmd":"fly"}"#,
            br#"{"cmd":"restore"}"#,
            br#"{"cmd":"restore","dir":"/s","mem_mode":"teleport"}"#,
            br#"{"nocmd":1}"#,
            b"\xff",
        ] {
            let e = parse(bad).unwrap_err();
            assert_eq!(e["ok"], false);
        }
    }

    #[test]
    fn stale_socket_replaced_live_socket_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.sock");
        let l = bind_unix(&p).unwrap();
        assert!(matches!(bind_unix(&p), Err(ControlError::InUse(_))));
        drop(l);
        bind_unix(&p).unwrap();
    }
}
