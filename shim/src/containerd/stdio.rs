//! A process's stdio as containerd hands it over: fifo paths (or `file://` log paths, or empty
//! for none), opened so that neither side's timing can block or break the other.

use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};

/// The paths containerd gave for one process.
#[derive(Debug, Clone, Default)]
pub struct Paths {
    /// stdin fifo, or empty.
    pub stdin: String,
    /// stdout fifo, `file://` path, or empty.
    pub stdout: String,
    /// stderr fifo, `file://` path, or empty.
    pub stderr: String,
    /// A terminal (stdout carries both streams).
    pub terminal: bool,
}

/// Opens an output: a fifo read-write (never blocks at open, never `EPIPE` if containerd's reader
/// goes away), a `file://` path for appending, or `/dev/null` for none.
pub fn open_output(path: &str) -> std::io::Result<File> {
    if path.is_empty() {
        return OpenOptions::new().write(true).open("/dev/null");
    }
    if let Some(file) = path.strip_prefix("file://") {
        return OpenOptions::new().create(true).append(true).open(file);
    }
    if path.contains("://") {
        return Err(std::io::Error::other(format!(
            "stdio URI {path}: only fifos and file:// are supported (binary:// logging is not)"
        )));
    }
    OpenOptions::new().read(true).write(true).open(path)
}

/// Lets `CloseIO` and the process's end unblock a stdin fifo that nobody ever opened for writing.
#[derive(Debug, Clone, Default)]
pub struct StdinCloser {
    path: Option<PathBuf>,
    opened: Arc<AtomicBool>,
}

impl StdinCloser {
    /// Unblocks the reader's `open` (a writer appears and goes away, the reader sees EOF); a
    /// reader already reading sees EOF when containerd closes its end.
    pub fn close(&self) {
        if let Some(p) = &self.path {
            if !self.opened.load(Ordering::SeqCst) {
                let _ = OpenOptions::new()
                    .write(true)
                    .custom_flags(libc::O_NONBLOCK)
                    .open(p);
            }
        }
    }
}

/// Starts the stdin thread for `path` (empty: none): it opens the fifo (blocking until
/// containerd's writer does) and hands chunks over; an empty chunk is EOF.
pub fn stdin_source(path: &str) -> std::io::Result<(Option<mpsc::Receiver<Vec<u8>>>, StdinCloser)> {
    if path.is_empty() {
        return Ok((None, StdinCloser::default()));
    }
    let path = PathBuf::from(path);
    let closer = StdinCloser {
        path: Some(path.clone()),
        opened: Arc::new(AtomicBool::new(false)),
    };
    let opened = closer.opened.clone();
    let (tx, rx) = mpsc::channel();
    std::thread::Builder::new()
        .name("stdin".into())
        .spawn(move || read_fifo(&path, &opened, &tx))?;
    Ok((Some(rx), closer))
}

fn read_fifo(path: &Path, opened: &AtomicBool, tx: &mpsc::Sender<Vec<u8>>) {
    let mut f = match File::open(path) {
        Ok(f) => f,
        Err(_) => {
            let _ = tx.send(Vec::new());
            return;
        }
    };
    opened.store(true, Ordering::SeqCst);
    let mut buf = vec![0u8; 32 * 1024];
    loop {
        match f.read(&mut buf) {
            Ok(0) | Err(_) => {
                let _ = tx.send(Vec::new());
                return;
            }
            Ok(n) => {
                if tx.send(buf[..n].to_vec()).is_err() {
                    return;
                }
            }
        }
    }
}
