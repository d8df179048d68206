//! The child's file-system steps: the root, the spec's mounts (targets resolved inside the
//! root), device nodes, the pivot, the root's propagation, sysctls, masked and read-only paths.

use std::ffi::CStr;
use std::os::fd::RawFd;

use super::super::fields::{DeviceNode, Sysctl};
use super::super::mounts::RootPath;
use super::super::plan::{HostMount, MountOp, Rootfs};
use super::super::resolve::{
    close, ensure_in_root, open_in_root, walk_no_symlinks, FdPath, OPENAT2_RETRIES,
};
use super::super::Step;
use super::{check, errno, fail, mount, ptr, ChildFds};

/// Keeps the container's mounts from propagating to the agent's namespace.
pub(super) fn make_mounts_private(fds: &ChildFds) {
    let rc = mount(
        std::ptr::null(),
        c"/".as_ptr(),
        std::ptr::null(),
        libc::MS_REC | libc::MS_PRIVATE,
        std::ptr::null(),
    );
    check(fds, Step::MakePrivate, rc);
}

/// Mounts the root (bind, or tmpfs + overlay) at its host path and returns an O_PATH fd of it.
pub(super) fn mount_root(r: &Rootfs, fds: &ChildFds) -> RawFd {
    for m in &r.setup {
        host_mount(m, fds);
    }
    // SAFETY: open with a C string from the plan (checked in the agent: not a symbolic link;
    // O_NOFOLLOW refuses one that appeared since).
    let fd = unsafe {
        libc::open(
            r.path.as_ptr(),
            libc::O_PATH | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC,
        )
    };
    check(fds, Step::MountRoot, fd);
    fd
}

fn host_mount(m: &HostMount, fds: &ChildFds) {
    for d in &m.mkdirs {
        // SAFETY: mkdir with a C string from the plan: agent-made directories in the tmpfs the
        // previous mount created.
        if unsafe { libc::mkdir(d.as_ptr(), 0o755) } < 0 && errno() != libc::EEXIST {
            fail(fds, Step::MountRoot, errno());
        }
    }
    let rc = mount(
        ptr(&m.source),
        m.target.as_ptr(),
        ptr(&m.fstype),
        m.flags,
        ptr(&m.data),
    );
    check(fds, Step::MountRoot, rc);
}

/// Resolves (creating if missing) the target inside `root` and mounts onto its fd, then applies
/// the bind remount and propagation to the new mount, re-resolved.
pub(super) fn spec_mount(root: RawFd, m: &MountOp, fds: &ChildFds) {
    let target = match ensure_in_root(root, &m.target, m.file) {
        Ok(fd) => fd,
        Err(e) => fail(fds, Step::MountPoint, e),
    };
    let at = FdPath::new(target);
    let rc = mount(
        ptr(&m.source),
        at.as_ptr(),
        ptr(&m.fstype),
        m.flags,
        ptr(&m.data),
    );
    close(target);
    check(fds, Step::Mount, rc);
    if m.remount.is_none() && m.propagation == 0 {
        return;
    }
    // The fd above names the covered mount point; the new mount is what a fresh lookup finds.
    let mounted = match open_in_root(root, &m.target, m.target.names.len()) {
        Ok(fd) => fd,
        Err(e) => fail(fds, Step::Remount, e),
    };
    let at = FdPath::new(mounted);
    if let Some(flags) = m.remount {
        let rc = mount(
            std::ptr::null(),
            at.as_ptr(),
            std::ptr::null(),
            libc::MS_REMOUNT | libc::MS_BIND | flags,
            std::ptr::null(),
        );
        check(fds, Step::Remount, rc);
    }
    if m.propagation != 0 {
        let rc = mount(
            std::ptr::null(),
            at.as_ptr(),
            std::ptr::null(),
            m.propagation,
            std::ptr::null(),
        );
        check(fds, Step::Remount, rc);
    }
    close(mounted);
}

/// Makes the root `/`: pivot_root, or on the initramfs (which cannot be pivoted away from)
/// MS_MOVE over `/` and chroot, as runc's no-pivot does.
pub(super) fn pivot(root: RawFd, fds: &ChildFds) {
    // SAFETY: fchdir on the root fd we opened.
    check(fds, Step::Pivot, unsafe { libc::fchdir(root) });
    // SAFETY: pivot_root with literal paths.
    if unsafe { libc::syscall(libc::SYS_pivot_root, c".".as_ptr(), c".".as_ptr()) } == 0 {
        // SAFETY: detaching the old root, stacked on `.`, by a literal path.
        check(fds, Step::Pivot, unsafe {
            libc::umount2(c".".as_ptr(), libc::MNT_DETACH)
        });
    } else if errno() == libc::EINVAL {
        let rc = mount(
            c".".as_ptr(),
            c"/".as_ptr(),
            std::ptr::null(),
            libc::MS_MOVE,
            std::ptr::null(),
        );
        check(fds, Step::Pivot, rc);
        // SAFETY: chroot with a literal path.
        check(fds, Step::Pivot, unsafe { libc::chroot(c".".as_ptr()) });
    } else {
        fail(fds, Step::Pivot, errno());
    }
    // SAFETY: chdir with a literal path.
    check(fds, Step::Pivot, unsafe { libc::chdir(c"/".as_ptr()) });
}

/// A masked path, as runc: `/dev/null` bound over a file, an empty read-only tmpfs over a
/// directory; a missing path is skipped (a missing /dev/null is an error: masking would be lost).
/// Runs after the pivot: links resolve in the container.
pub(super) fn mask_path(path: &std::ffi::CStr, fds: &ChildFds) {
    let rc = mount(
        c"/dev/null".as_ptr(),
        path.as_ptr(),
        std::ptr::null(),
        libc::MS_BIND,
        std::ptr::null(),
    );
    if rc == 0 {
        return;
    }
    match errno() {
        libc::ENOENT if !exists(path) => {}
        libc::ENOENT => fail(fds, Step::Mask, libc::ENOENT), // no /dev/null in the container
        libc::ENOTDIR => {
            let rc = mount(
                c"tmpfs".as_ptr(),
                path.as_ptr(),
                c"tmpfs".as_ptr(),
                libc::MS_RDONLY,
                std::ptr::null(),
            );
            check(fds, Step::Mask, rc);
        }
        e => fail(fds, Step::Mask, e),
    }
}

/// Whether `path` exists (following links).
fn exists(path: &std::ffi::CStr) -> bool {
    // SAFETY: an all-zero stat is a valid buffer for fstatat to fill.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: fstatat with a C string from the plan and a local buffer.
    unsafe { libc::fstatat(libc::AT_FDCWD, path.as_ptr(), &mut st, 0) == 0 }
}

/// `struct mount_attr` of mount_setattr(2).
#[repr(C)]
struct MountAttr {
    attr_set: u64,
    attr_clr: u64,
    propagation: u64,
    userns_fd: u64,
}

/// A read-only path, as runc: bound onto itself, then made read-only recursively
/// (mount_setattr, kernel ≥ 5.12; a plain remount before that); a missing path is skipped.
pub(super) fn readonly_path(path: &std::ffi::CStr, fds: &ChildFds) {
    let rc = mount(
        path.as_ptr(),
        path.as_ptr(),
        std::ptr::null(),
        libc::MS_BIND | libc::MS_REC,
        std::ptr::null(),
    );
    if rc < 0 {
        match errno() {
            libc::ENOENT => return,
            e => fail(fds, Step::Readonly, e),
        }
    }
    const MOUNT_ATTR_RDONLY: u64 = 1;
    let attr = MountAttr {
        attr_set: MOUNT_ATTR_RDONLY,
        attr_clr: 0,
        propagation: 0,
        userns_fd: 0,
    };
    // SAFETY: mount_setattr with a C string from the plan and a local attr of the size passed.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            libc::AT_FDCWD,
            path.as_ptr(),
            // Following links, as the bind above did.
            libc::AT_RECURSIVE,
            &attr as *const MountAttr,
            std::mem::size_of::<MountAttr>(),
        )
    };
    if rc == 0 {
        return;
    }
    if errno() != libc::ENOSYS {
        fail(fds, Step::Readonly, errno());
    }
    let rc = mount(
        std::ptr::null(),
        path.as_ptr(),
        std::ptr::null(),
        libc::MS_REMOUNT | libc::MS_BIND | libc::MS_RDONLY,
        std::ptr::null(),
    );
    check(fds, Step::Readonly, rc);
}

pub(super) fn remount_root_readonly(fds: &ChildFds) {
    let rc = mount(
        std::ptr::null(),
        c"/".as_ptr(),
        std::ptr::null(),
        libc::MS_REMOUNT | libc::MS_BIND | libc::MS_RDONLY,
        std::ptr::null(),
    );
    check(fds, Step::Remount, rc);
}

/// Creates a `linux.devices` node inside the root (parent directories resolved and created in
/// the root), as runc: an existing node is kept; a new one gets its mode (past the umask),
/// owner and group through an fd of the node itself, never by path.
pub(super) fn make_device(root: RawFd, d: &DeviceNode, fds: &ChildFds) {
    let dir = match ensure_in_root(root, &d.dir, false) {
        Ok(fd) => fd,
        Err(e) => fail(fds, Step::Mknod, e),
    };
    // SAFETY: mknodat relative to a directory fd we hold, with a one-component name from the
    // plan; mknod never follows a symbolic link in its last component.
    let rc = unsafe { libc::mknodat(dir, d.name.as_ptr(), d.kind | d.perm, d.dev) };
    if rc < 0 {
        let e = errno();
        close(dir);
        if e == libc::EEXIST {
            return;
        }
        fail(fds, Step::Mknod, e);
    }
    // SAFETY: openat relative to a directory fd we hold, one-component name, O_NOFOLLOW.
    let node = unsafe {
        libc::openat(
            dir,
            d.name.as_ptr(),
            libc::O_PATH | libc::O_NOFOLLOW | libc::O_CLOEXEC,
        )
    };
    close(dir);
    check(fds, Step::Mknod, node);
    // SAFETY: fchownat on an O_PATH fd we hold, with an empty path and AT_EMPTY_PATH.
    let rc = unsafe { libc::fchownat(node, c"".as_ptr(), d.uid, d.gid, libc::AT_EMPTY_PATH) };
    if rc < 0 {
        let e = errno();
        close(node);
        fail(fds, Step::Mknod, e);
    }
    let at = FdPath::new(node);
    // SAFETY: chmod of the node through its /proc/self/fd link (a stack buffer), which names
    // the inode we just created.
    let rc = unsafe { libc::chmod(at.as_ptr(), d.perm) };
    close(node);
    check(fds, Step::Mknod, rc);
}

/// Sets `linux.rootfsPropagation` on the container's `/` (after the pivot, as runc).
pub(super) fn root_propagation(flags: libc::c_ulong, fds: &ChildFds) {
    if flags == 0 {
        return;
    }
    let rc = mount(
        std::ptr::null(),
        c"/".as_ptr(),
        std::ptr::null(),
        flags,
        std::ptr::null(),
    );
    check(fds, Step::RootPropagation, rc);
}

/// procfs's `f_type`.
const PROC_SUPER_MAGIC: libc::c_long = 0x9fa0;

/// Writes the `linux.sysctl` values through the container's `/proc` (after the pivot): the
/// proc mount is checked to be procfs and each file is opened beneath it without following
/// any symbolic link or crossing a mount (openat2 `RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS |
/// RESOLVE_NO_XDEV`; before 5.6, a component walk refusing links).
pub(super) fn write_sysctls(sysctls: &[Sysctl], fds: &ChildFds) {
    if sysctls.is_empty() {
        return;
    }
    // SAFETY: open with a literal path.
    let proc = unsafe {
        libc::open(
            c"/proc".as_ptr(),
            libc::O_PATH | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC,
        )
    };
    check(fds, Step::Sysctl, proc);
    // SAFETY: an all-zero statfs is a valid buffer for fstatfs to fill.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: fstatfs on an fd we hold into a local buffer.
    check(fds, Step::Sysctl, unsafe { libc::fstatfs(proc, &mut st) });
    if st.f_type as libc::c_long != PROC_SUPER_MAGIC {
        fail(fds, Step::Sysctl, libc::ENOENT);
    }
    for s in sysctls {
        let fd = match open_beneath_wronly(proc, &s.path) {
            Ok(fd) => fd,
            Err(e) => fail(fds, Step::Sysctl, e),
        };
        let bytes = s.value.as_bytes();
        // SAFETY: writing a plan-owned buffer of its length to an fd we hold.
        let n = unsafe { libc::write(fd, bytes.as_ptr().cast(), bytes.len()) };
        let e = errno();
        close(fd);
        if n < 0 {
            fail(fds, Step::Sysctl, e);
        }
        if n as usize != bytes.len() {
            fail(fds, Step::Sysctl, libc::EIO);
        }
    }
    close(proc);
}

/// Opens `path` beneath `dir` for writing, following no symbolic link and crossing no mount.
fn open_beneath_wronly(dir: RawFd, path: &RootPath) -> Result<RawFd, i32> {
    let Some(rel) = path.prefixes.last() else {
        return Err(libc::EINVAL);
    };
    let how = OpenHow {
        flags: (libc::O_WRONLY | libc::O_CLOEXEC) as u64,
        mode: 0,
        resolve: libc::RESOLVE_BENEATH
            | libc::RESOLVE_NO_SYMLINKS
            | libc::RESOLVE_NO_MAGICLINKS
            | libc::RESOLVE_NO_XDEV,
    };
    let mut tries = 0;
    loop {
        // SAFETY: openat2 with a plan-owned C string and a local `open_how` of the size passed.
        let fd = unsafe {
            libc::syscall(
                libc::SYS_openat2,
                dir,
                rel.as_ptr(),
                &how as *const OpenHow,
                std::mem::size_of::<OpenHow>(),
            )
        };
        if fd >= 0 {
            return Ok(fd as RawFd);
        }
        match errno() {
            libc::ENOSYS => break,
            // A concurrent mount or rename somewhere (see open_in_root): retry.
            libc::EAGAIN if tries < OPENAT2_RETRIES => tries += 1,
            e => return Err(e),
        }
    }
    let opath = walk_no_symlinks(dir, &path.names)?;
    let at = FdPath::new(opath);
    // SAFETY: reopening the file we resolved through its /proc/self/fd link (a stack buffer).
    let fd = unsafe { libc::open(at.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC) };
    let e = errno();
    close(opath);
    if fd < 0 {
        Err(e)
    } else {
        Ok(fd)
    }
}

/// `struct open_how` of openat2(2) (libc's is `non_exhaustive`).
#[repr(C)]
struct OpenHow {
    flags: u64,
    mode: u64,
    resolve: u64,
}

/// Binds the terminal (the pty slave the agent opened) onto the container's `/dev/console`,
/// as runc does: programs that look for their terminal by device number inside the container
/// (`ttyname(3)`, `tty`) find it there.
pub(super) fn bind_console(root: RawFd, console: &RootPath, tty: &CStr, fds: &ChildFds) {
    let node = match ensure_in_root(root, console, true) {
        Ok(fd) => fd,
        Err(e) => fail(fds, Step::DevConsole, e),
    };
    // The source by path (this namespace's copy of the agent's devpts mount); the target
    // through the fd of the node resolved inside the root.
    let dst = FdPath::new(node);
    let rc = mount(
        tty.as_ptr(),
        dst.as_ptr(),
        std::ptr::null(),
        libc::MS_BIND,
        std::ptr::null(),
    );
    close(node);
    check(fds, Step::DevConsole, rc);
}
