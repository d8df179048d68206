//! Directory-relative file operations that never follow a symlink, never block on a FIFO and
//! never truncate an existing file: every file of a snapshot directory goes through [`Dir`].

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// Why a file of a snapshot directory could not be opened.
#[derive(Debug)]
pub(crate) enum OpenError {
    /// The system call failed (`NotFound` when the name does not exist).
    Io(io::Error),
    /// The name exists but is not a regular file (the kind it is instead).
    NotRegular(&'static str),
}

fn cstring(bytes: &[u8]) -> io::Result<CString> {
    CString::new(bytes).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in a path"))
}

fn check(rc: libc::c_int) -> io::Result<libc::c_int> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

fn kind_of(mode: libc::mode_t) -> &'static str {
    match mode & libc::S_IFMT {
        libc::S_IFREG => "regular file",
        libc::S_IFDIR => "directory",
        libc::S_IFIFO => "FIFO",
        libc::S_IFLNK => "symbolic link",
        libc::S_IFSOCK => "socket",
        libc::S_IFCHR => "character device",
        libc::S_IFBLK => "block device",
        _ => "special file",
    }
}

fn fstat(fd: libc::c_int) -> io::Result<libc::stat> {
    // SAFETY: `stat` is plain old data that fstat only writes into.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: `fd` is open for the duration of the call; `st` is a valid out pointer.
    check(unsafe { libc::fstat(fd, &mut st) })?;
    Ok(st)
}

/// An open directory; names are resolved relative to it, so every operation of one snapshot
/// lands in the same directory even if its path is renamed meanwhile.
#[derive(Debug)]
pub(crate) struct Dir {
    fd: OwnedFd,
    path: PathBuf,
}

impl Dir {
    /// Opens the directory `path`; with `nofollow`, a symlink at `path` itself is refused.
    pub(crate) fn open(path: &Path, nofollow: bool) -> io::Result<Self> {
        let c = cstring(path.as_os_str().as_bytes())?;
        let mut flags = libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NONBLOCK | libc::O_CLOEXEC;
        if nofollow {
            flags |= libc::O_NOFOLLOW;
        }
        // SAFETY: `c` is a valid NUL-terminated path; the result is checked.
        let fd = check(unsafe { libc::open(c.as_ptr(), flags) })?;
        Ok(Self {
            // SAFETY: `fd` was just opened and is owned by nobody else.
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
            path: path.to_path_buf(),
        })
    }

    /// The path the directory was opened under.
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// `path/name`, for messages.
    pub(crate) fn join(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    /// Whether `other` names this same directory (same device and inode).
    pub(crate) fn is_same(&self, other: &Path) -> io::Result<bool> {
        let mine = fstat(self.fd.as_raw_fd())?;
        let theirs = std::fs::metadata(other)?;
        use std::os::unix::fs::MetadataExt;
        Ok(mine.st_dev == theirs.dev() && mine.st_ino == theirs.ino())
    }

    /// Opens `name` read-only without following a symlink and without blocking on a FIFO, and
    /// refuses anything that is not a regular file.
    pub(crate) fn open_regular(&self, name: &str) -> Result<File, OpenError> {
        let c = cstring(name.as_bytes()).map_err(OpenError::Io)?;
        let flags = libc::O_RDONLY | libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC;
        // SAFETY: the directory fd is open and `c` is NUL-terminated; the result is checked.
        let fd = match check(unsafe { libc::openat(self.fd.as_raw_fd(), c.as_ptr(), flags) }) {
            Ok(fd) => fd,
            Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
                return Err(OpenError::NotRegular("symbolic link"))
            }
            Err(e) => return Err(OpenError::Io(e)),
        };
        // SAFETY: `fd` was just opened and is owned by nobody else.
        let file = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
        let st = fstat(fd).map_err(OpenError::Io)?;
        if st.st_mode & libc::S_IFMT != libc::S_IFREG {
            return Err(OpenError::NotRegular(kind_of(st.st_mode)));
        }
        // A regular file never blocks; clear O_NONBLOCK anyway so reads behave as usual.
        // SAFETY: F_GETFL/F_SETFL on an fd we own; the results are checked.
        let fl = check(unsafe { libc::fcntl(fd, libc::F_GETFL) }).map_err(OpenError::Io)?;
        // SAFETY: as above.
        check(unsafe { libc::fcntl(fd, libc::F_SETFL, fl & !libc::O_NONBLOCK) })
            .map_err(OpenError::Io)?;
        Ok(file)
    }

    /// Creates `name` read-write, failing if anything (even a dangling symlink) has that name.
    pub(crate) fn create_exclusive(&self, name: &str) -> io::Result<File> {
        let c = cstring(name.as_bytes())?;
        let flags =
            libc::O_RDWR | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW | libc::O_CLOEXEC;
        // SAFETY: the directory fd is open and `c` is NUL-terminated; the result is checked.
        let fd = check(unsafe {
            libc::openat(
                self.fd.as_raw_fd(),
                c.as_ptr(),
                flags,
                0o600 as libc::c_uint,
            )
        })?;
        // SAFETY: `fd` was just created and is owned by nobody else.
        Ok(File::from(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    /// Creates a new temporary file `.{base}.{random}.tmp`; returns it and its name.
    pub(crate) fn create_temp(&self, base: &str) -> io::Result<(File, String)> {
        let mut last = None;
        for _ in 0..8 {
            let name = format!(".{base}.{}.tmp", hex(&random_bytes::<8>()?));
            match self.create_exclusive(&name) {
                Ok(f) => return Ok((f, name)),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => last = Some(e),
                Err(e) => return Err(e),
            }
        }
        Err(last.unwrap_or_else(|| io::Error::from(io::ErrorKind::AlreadyExists)))
    }

    /// Renames `from` to `to` (both in this directory), replacing `to` atomically. A symlink
    /// named `to` is replaced itself, never followed.
    pub(crate) fn rename(&self, from: &str, to: &str) -> io::Result<()> {
        let (f, t) = (cstring(from.as_bytes())?, cstring(to.as_bytes())?);
        let fd = self.fd.as_raw_fd();
        // SAFETY: both names are NUL-terminated and the directory fd is open.
        check(unsafe { libc::renameat(fd, f.as_ptr(), fd, t.as_ptr()) }).map(drop)
    }

    /// Links `from` as `to` (both in this directory); fails with `AlreadyExists` if `to` exists.
    pub(crate) fn link(&self, from: &str, to: &str) -> io::Result<()> {
        let (f, t) = (cstring(from.as_bytes())?, cstring(to.as_bytes())?);
        let fd = self.fd.as_raw_fd();
        // SAFETY: both names are NUL-terminated and the directory fd is open; flags 0 does not
        // follow a symlink at `from`.
        check(unsafe { libc::linkat(fd, f.as_ptr(), fd, t.as_ptr(), 0) }).map(drop)
    }

    /// Removes `name` (not a directory).
    pub(crate) fn unlink(&self, name: &str) -> io::Result<()> {
        let c = cstring(name.as_bytes())?;
        // SAFETY: the name is NUL-terminated and the directory fd is open.
        check(unsafe { libc::unlinkat(self.fd.as_raw_fd(), c.as_ptr(), 0) }).map(drop)
    }

    /// Makes the directory's entries durable.
    pub(crate) fn sync(&self) -> io::Result<()> {
        // SAFETY: fsync on an fd we own.
        check(unsafe { libc::fsync(self.fd.as_raw_fd()) }).map(drop)
    }
}

/// `N` bytes from the kernel's random source.
pub(crate) fn random_bytes<const N: usize>() -> io::Result<[u8; N]> {
    let mut buf = [0u8; N];
    let mut got = 0;
    while got < N {
        // SAFETY: writes at most `N - got` bytes into the rest of `buf`.
        let n =
            unsafe { libc::getrandom(buf[got..].as_mut_ptr() as *mut libc::c_void, N - got, 0) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        } else {
            got += n as usize;
        }
    }
    Ok(buf)
}

/// Lower-case hex of `bytes`.
pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
