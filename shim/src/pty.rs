//! Console sockets: a host pty pair whose master goes to the caller over a Unix socket with
//! `SCM_RIGHTS` (as runc does), whose slave (raw: the container's own pty does the line
//! discipline) the monitor relays to the agent's terminal stream.

use std::fs::File;
use std::io::IoSlice;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
use nix::sys::termios;

/// Error setting up a console.
#[derive(Debug, thiserror::Error)]
pub enum ConsoleError {
    /// openpty or termios failed.
    #[error("allocating a pty: {0}")]
    Pty(nix::Error),
    /// The console socket is unreachable.
    #[error("console socket {0}: {1} (the caller must listen there before create)")]
    Connect(PathBuf, std::io::Error),
    /// Sending the master failed.
    #[error("sending the pty master over {0}: {1}")]
    Send(PathBuf, nix::Error),
}

/// Opens a pty pair, sends the master to `socket`, returns the raw-mode slave.
pub fn send_console(socket: &Path) -> Result<File, ConsoleError> {
    let pty = nix::pty::openpty(None, None).map_err(ConsoleError::Pty)?;
    let mut t = termios::tcgetattr(&pty.slave).map_err(ConsoleError::Pty)?;
    termios::cfmakeraw(&mut t);
    termios::tcsetattr(&pty.slave, termios::SetArg::TCSANOW, &t).map_err(ConsoleError::Pty)?;
    let s = UnixStream::connect(socket).map_err(|e| ConsoleError::Connect(socket.into(), e))?;
    let name = nix::unistd::ttyname(&pty.slave)
        .map(|p| p.display().to_string())
        .unwrap_or_else(|_| "/dev/ptmx".into());
    let fds = [pty.master.as_raw_fd()];
    sendmsg::<()>(
        s.as_raw_fd(),
        &[IoSlice::new(name.as_bytes())],
        &[ControlMessage::ScmRights(&fds)],
        MsgFlags::empty(),
        None,
    )
    .map_err(|e| ConsoleError::Send(socket.into(), e))?;
    drop::<OwnedFd>(pty.master);
    Ok(File::from(pty.slave))
}
