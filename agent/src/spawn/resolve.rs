//! Resolving and creating paths inside the container's root without ever leaving it.
//!
//! The rule: a path in the image is looked up with `openat2(RESOLVE_IN_ROOT |
//! RESOLVE_NO_MAGICLINKS)` from a file descriptor of the root, so symbolic links resolve as if
//! the root were `/` (`etc -> /etc` and `etc -> ../../../etc` both land in the root's `etc`).
//! Missing mount points are created with `mkdirat`/`openat(O_CREAT | O_EXCL | O_NOFOLLOW)`
//! relative to the already-resolved parent, and mounts go onto `/proc/self/fd/N` of the
//! resolved target (as runc does), so no host path string is ever used for an image path.
//! Kernels without openat2 (before 5.6) get a component walk with `O_NOFOLLOW` that refuses
//! any symbolic link.
//!
//! These functions run in the cloned child: raw system calls and stack buffers only, no
//! allocation; errors are errno values.

use std::os::fd::RawFd;

use super::mounts::RootPath;

/// `struct open_how` of openat2(2) (libc's is `non_exhaustive`).
#[repr(C)]
struct OpenHow {
    flags: u64,
    mode: u64,
    resolve: u64,
}

fn errno() -> i32 {
    std::io::Error::last_os_error()
        .raw_os_error()
        .unwrap_or(libc::EIO)
}

/// Closes `fd`, ignoring errors (it is ours and open).
pub(super) fn close(fd: RawFd) {
    // SAFETY: close(2) on an fd this process opened and owns; no Rust object owns it.
    unsafe { libc::close(fd) };
}

fn open_path_at(dir: RawFd, name: &std::ffi::CStr, extra: libc::c_int) -> Result<RawFd, i32> {
    // SAFETY: `name` is a valid C string; the result is checked.
    let fd = unsafe { libc::openat(dir, name.as_ptr(), libc::O_PATH | libc::O_CLOEXEC | extra) };
    if fd < 0 {
        Err(errno())
    } else {
        Ok(fd)
    }
}

/// Opens (O_PATH) the first `depth` components of `path` inside `root`.
pub(super) fn open_in_root(root: RawFd, path: &RootPath, depth: usize) -> Result<RawFd, i32> {
    let Some(prefix) = depth.checked_sub(1).and_then(|i| path.prefixes.get(i)) else {
        return open_path_at(root, c".", libc::O_DIRECTORY);
    };
    let how = OpenHow {
        flags: (libc::O_PATH | libc::O_CLOEXEC) as u64,
        mode: 0,
        resolve: libc::RESOLVE_IN_ROOT | libc::RESOLVE_NO_MAGICLINKS,
    };
    let mut tries = 0;
    loop {
        // SAFETY: openat2 with a valid C string and a local `open_how` of the size passed.
        let fd = unsafe {
            libc::syscall(
                libc::SYS_openat2,
                root,
                prefix.as_ptr(),
                &how as *const OpenHow,
                std::mem::size_of::<OpenHow>(),
            )
        };
        if fd >= 0 {
            return Ok(fd as RawFd);
        }
        match errno() {
            libc::ENOSYS => {
                return walk_no_symlinks(root, &path.names[..depth.min(path.names.len())])
            }
            // A `..` resolved while any mount or rename happened anywhere on the system: the
            // kernel cannot prove the walk stayed inside and asks for a retry.
            libc::EAGAIN if tries < OPENAT2_RETRIES => tries += 1,
            e => return Err(e),
        }
    }
}

/// How often a lookup is retried when openat2 reports a concurrent mount or rename (EAGAIN).
pub(super) const OPENAT2_RETRIES: u32 = 1000;

/// The fallback without openat2: component by component with `O_NOFOLLOW`; a symbolic link
/// anywhere is refused with ELOOP (safe, if stricter than openat2).
pub(super) fn walk_no_symlinks(root: RawFd, names: &[std::ffi::CString]) -> Result<RawFd, i32> {
    let mut cur = open_path_at(root, c".", libc::O_DIRECTORY)?;
    for name in names {
        let next = open_path_at(cur, name, libc::O_NOFOLLOW);
        close(cur);
        cur = next?;
        // SAFETY: fstat into a zeroed local stat buffer; the result is checked.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        if unsafe { libc::fstat(cur, &mut st) } < 0 {
            let e = errno();
            close(cur);
            return Err(e);
        }
        if st.st_mode & libc::S_IFMT == libc::S_IFLNK {
            close(cur);
            return Err(libc::ELOOP);
        }
    }
    Ok(cur)
}

/// Resolves `path` inside `root`, creating missing components (directories; with `file`, the
/// last one as an empty file); returns an O_PATH fd of the target.
pub(super) fn ensure_in_root(root: RawFd, path: &RootPath, file: bool) -> Result<RawFd, i32> {
    let n = path.names.len();
    let mut parent = open_in_root(root, path, 0)?;
    for i in 0..n {
        match open_in_root(root, path, i + 1) {
            Ok(fd) => {
                close(parent);
                parent = fd;
                continue;
            }
            Err(libc::ENOENT) => {}
            Err(e) => {
                close(parent);
                return Err(e);
            }
        }
        let name = &path.names[i];
        let rc = if file && i + 1 == n {
            // SAFETY: openat relative to a directory fd we hold, with a one-component name
            // (no slash, no ..): O_EXCL | O_NOFOLLOW never follow or reuse a symbolic link.
            let fd = unsafe {
                libc::openat(
                    parent,
                    name.as_ptr(),
                    libc::O_CREAT
                        | libc::O_EXCL
                        | libc::O_NOFOLLOW
                        | libc::O_WRONLY
                        | libc::O_CLOEXEC,
                    0o644,
                )
            };
            if fd >= 0 {
                close(fd);
            }
            fd
        } else {
            // SAFETY: mkdirat relative to a directory fd we hold, with a one-component name;
            // mkdir never follows a symbolic link in its last component.
            unsafe { libc::mkdirat(parent, name.as_ptr(), 0o755) }
        };
        if rc < 0 && errno() != libc::EEXIST {
            let e = errno();
            close(parent);
            return Err(e);
        }
        // Re-resolve: what now exists (ours, or a dangling link that still resolves nowhere).
        let next = open_in_root(root, path, i + 1);
        close(parent);
        parent = next?;
    }
    Ok(parent)
}

/// `/proc/self/fd/N` in a stack buffer, NUL-terminated.
pub(super) struct FdPath {
    buf: [u8; 32],
}

impl FdPath {
    /// The magic link path of `fd`.
    pub(super) fn new(fd: RawFd) -> Self {
        const PREFIX: &[u8] = b"/proc/self/fd/";
        let mut buf = [0u8; 32];
        buf[..PREFIX.len()].copy_from_slice(PREFIX);
        let mut digits = [0u8; 10];
        let mut v = fd.unsigned_abs();
        let mut len = 0;
        loop {
            digits[len] = b'0' + (v % 10) as u8;
            len += 1;
            v /= 10;
            if v == 0 {
                break;
            }
        }
        for i in 0..len {
            buf[PREFIX.len() + i] = digits[len - 1 - i];
        }
        Self { buf }
    }

    /// The path as a C string pointer (valid while `self` lives).
    pub(super) fn as_ptr(&self) -> *const libc::c_char {
        self.buf.as_ptr().cast()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::symlink;
    use std::path::Path;

    fn fd_target(fd: RawFd) -> std::path::PathBuf {
        let p = FdPath::new(fd);
        // SAFETY: the buffer is NUL-terminated.
        let s = unsafe { std::ffi::CStr::from_ptr(p.as_ptr()) };
        std::fs::read_link(s.to_str().unwrap()).unwrap()
    }

    #[test]
    fn fd_paths_are_formatted_without_allocation() {
        let p = FdPath::new(1234567);
        // SAFETY: the buffer is NUL-terminated.
        let s = unsafe { std::ffi::CStr::from_ptr(p.as_ptr()) };
        assert_eq!(s.to_str().unwrap(), "/proc/self/fd/1234567");
        let p = FdPath::new(0);
        // SAFETY: as above.
        let s = unsafe { std::ffi::CStr::from_ptr(p.as_ptr()) };
        assert_eq!(s.to_str().unwrap(), "/proc/self/fd/0");
    }

    /// A root with `hostetc -> /etc`, `up -> ../../../../../../etc`, `lnk -> sub`, a
    /// self-referencing `loop -> /loop` and a dangling link.
    fn tricky_root() -> (tempfile::TempDir, std::path::PathBuf, std::fs::File) {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("root");
        std::fs::create_dir_all(root.join("sub")).unwrap();
        std::fs::create_dir_all(root.join("etc")).unwrap();
        symlink("/etc", root.join("hostetc")).unwrap();
        symlink("../../../../../../etc", root.join("up")).unwrap();
        symlink("sub", root.join("lnk")).unwrap();
        symlink("/loop", root.join("loop")).unwrap();
        symlink("/nowhere/at/all", root.join("dangling")).unwrap();
        let f = std::fs::File::open(&root).unwrap();
        (d, root, f)
    }

    #[test]
    fn symlinks_resolve_as_if_the_root_were_slash() {
        let (_d, root, f) = tricky_root();
        let marker = format!("runv-resolve-test-{}", std::process::id());
        for (dest, file) in [
            (format!("/hostetc/{marker}/x"), false),
            (format!("/up/{marker}/y"), true),
            ("/lnk/deeper/z".into(), false),
        ] {
            let p = RootPath::new(Path::new(&dest)).unwrap();
            let fd = ensure_in_root(f.as_raw_fd(), &p, file).unwrap();
            let target = fd_target(fd);
            close(fd);
            assert!(target.starts_with(&root), "{dest} resolved to {target:?}");
        }
        assert!(root.join("etc").join(&marker).join("x").is_dir());
        assert!(root.join("etc").join(&marker).join("y").is_file());
        assert!(
            root.join("sub/deeper/z").is_dir(),
            "created through the link"
        );
        assert!(
            !Path::new("/etc").join(&marker).exists(),
            "nothing on the host"
        );
        let p = RootPath::new(Path::new("/loop/x")).unwrap();
        assert_eq!(ensure_in_root(f.as_raw_fd(), &p, false), Err(libc::ELOOP));
    }

    #[test]
    fn dangling_links_are_not_followed_out_of_the_root() {
        let (_d, root, f) = tricky_root();
        let p = RootPath::new(Path::new("/dangling/x")).unwrap();
        // /nowhere is created inside the root (the link resolves there), never on the host.
        match ensure_in_root(f.as_raw_fd(), &p, false) {
            Ok(fd) => {
                assert!(fd_target(fd).starts_with(&root));
                close(fd);
            }
            Err(e) => assert_eq!(e, libc::ENOENT),
        }
        assert!(!Path::new("/nowhere").exists());
    }

    #[test]
    fn the_fallback_walk_refuses_every_symlink() {
        let (_d, root, f) = tricky_root();
        let p = RootPath::new(Path::new("/hostetc/passwd")).unwrap();
        assert_eq!(walk_no_symlinks(f.as_raw_fd(), &p.names), Err(libc::ELOOP));
        let p = RootPath::new(Path::new("/sub")).unwrap();
        let fd = walk_no_symlinks(f.as_raw_fd(), &p.names).unwrap();
        assert_eq!(fd_target(fd), root.join("sub"));
        close(fd);
    }
}
