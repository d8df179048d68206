//! The child's file-system steps: the root, the spec's mounts (targets resolved inside the
//! root), the pivot, masked and read-only paths.

use std::os::fd::RawFd;

use super::super::plan::{HostMount, MountOp, Rootfs};
use super::super::resolve::{close, ensure_in_root, open_in_root, FdPath};
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
