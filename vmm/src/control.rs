//! Unix sockets the VMM listens on (control, vsock host side): binding them safely and removing
//! them at exit. The control protocol itself is the `vmm-api` crate; serving it is [`crate::serve`].

use std::io::ErrorKind;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

/// Error binding a Unix socket.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// Another process listens on the path.
    #[error("socket {0} is in use by a running process: choose another path or stop that process")]
    InUse(String),
    /// Something that is not a socket is at the path; it is never removed.
    #[error("{path} exists and is not a socket ({kind}): remove it or choose another path")]
    NotASocket {
        /// Path.
        path: String,
        /// What is there.
        kind: &'static str,
    },
    /// Bind failed.
    #[error("binding socket {path}: {source}")]
    Bind {
        /// Path.
        path: String,
        /// Cause.
        source: std::io::Error,
    },
}

/// Binds a non-blocking Unix listener at `path`. A stale socket file (a socket nobody listens
/// on) is replaced; anything else at the path (a live socket, a regular file, a link, a FIFO,
/// a directory) is an error and is left untouched.
pub fn bind_unix(path: &Path) -> Result<UnixListener, ControlError> {
    let name = path.display().to_string();
    let bind_err = |source| ControlError::Bind {
        path: name.clone(),
        source,
    };
    match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == ErrorKind::NotFound => {}
        Err(source) => return Err(bind_err(source)),
        Ok(meta) if !meta.file_type().is_socket() => {
            return Err(ControlError::NotASocket {
                path: name,
                kind: crate::config::file_kind(meta.file_type()),
            })
        }
        Ok(_) => match UnixStream::connect(path) {
            Ok(_) => return Err(ControlError::InUse(name)),
            Err(e) if e.kind() == ErrorKind::ConnectionRefused => {
                std::fs::remove_file(path).map_err(bind_err)?;
            }
            Err(source) => return Err(bind_err(source)),
        },
    }
    let l = UnixListener::bind(path).map_err(bind_err)?;
    l.set_nonblocking(true).map_err(bind_err)?;
    Ok(l)
}

/// Removes the socket file when dropped.
#[derive(Debug)]
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
    fn stale_socket_replaced_live_socket_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.sock");
        let l = bind_unix(&p).unwrap();
        assert!(matches!(bind_unix(&p), Err(ControlError::InUse(_))));
        drop(l);
        bind_unix(&p).unwrap();
    }

    #[test]
    fn non_sockets_are_never_removed() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("precious");
        std::fs::write(&file, b"data").unwrap();
        let e = bind_unix(&file).unwrap_err().to_string();
        assert!(
            e.contains("not a socket") && e.contains("regular file"),
            "{e}"
        );
        assert_eq!(std::fs::read(&file).unwrap(), b"data");

        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&file, &link).unwrap();
        assert!(matches!(
            bind_unix(&link),
            Err(ControlError::NotASocket {
                kind: "a symbolic link",
                ..
            })
        ));
        assert_eq!(std::fs::read(&file).unwrap(), b"data");

        let fifo = dir.path().join("fifo");
        nix_mkfifo(&fifo);
        assert!(matches!(
            bind_unix(&fifo),
            Err(ControlError::NotASocket { kind: "a FIFO", .. })
        ));
        assert!(matches!(
            bind_unix(dir.path()),
            Err(ControlError::NotASocket {
                kind: "a directory",
                ..
            })
        ));
    }

    fn nix_mkfifo(p: &Path) {
        let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: a valid NUL-terminated path; mkfifo only creates a file.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    }
}
