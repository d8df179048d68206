//! The container's root file system from containerd's `rootfs` mounts: mounted onto
//! `<bundle>/rootfs` at Create and unmounted at Delete, as the runtime v2 contract requires.

use std::path::{Path, PathBuf};

use containerd_shim::protos::types::mount::Mount;

/// Why the root file system could not be set up or removed.
#[derive(Debug, thiserror::Error)]
pub enum RootfsError {
    /// A mount failed.
    #[error("mounting {kind} {source_} onto {target}: {err} (check the snapshotter's mounts)")]
    Mount {
        /// Mount type.
        kind: String,
        /// Mount source.
        source_: String,
        /// Where.
        target: PathBuf,
        /// Cause.
        err: String,
    },
    /// Unmounting failed.
    #[error("unmounting {0}: {1} (something still uses the container's root file system)")]
    Unmount(PathBuf, nix::Error),
}

/// `<bundle>/rootfs`.
pub fn target(bundle: &Path) -> PathBuf {
    bundle.join("rootfs")
}

/// Mounts `mounts` (in order) onto `<bundle>/rootfs`; on a failure, what was mounted is undone.
/// Returns whether anything was mounted (no mounts: the bundle brought its own rootfs).
pub fn mount(bundle: &Path, mounts: &[Mount]) -> Result<bool, RootfsError> {
    let dst = target(bundle);
    for (i, m) in mounts.iter().enumerate() {
        let _ = std::fs::create_dir_all(&dst);
        let kind = (!m.type_.is_empty()).then_some(m.type_.as_str());
        let source = (!m.source.is_empty()).then_some(m.source.as_str());
        if let Err(e) = containerd_shim::mount::mount_rootfs(kind, source, &m.options, &dst) {
            for _ in 0..i {
                let _ = unmount(bundle);
            }
            return Err(RootfsError::Mount {
                kind: m.type_.clone(),
                source_: m.source.clone(),
                target: dst,
                err: e.to_string(),
            });
        }
    }
    Ok(!mounts.is_empty())
}

/// Unmounts everything at `<bundle>/rootfs` (idempotent: nothing mounted is not an error).
pub fn unmount(bundle: &Path) -> Result<(), RootfsError> {
    let dst = target(bundle);
    loop {
        match nix::mount::umount2(&dst, nix::mount::MntFlags::empty()) {
            Ok(()) => {}
            Err(nix::Error::EINVAL) | Err(nix::Error::ENOENT) => return Ok(()),
            Err(nix::Error::EBUSY) => {
                // Busy: detach it, the kernel frees it when the last user goes.
                nix::mount::umount2(&dst, nix::mount::MntFlags::MNT_DETACH)
                    .map_err(|e| RootfsError::Unmount(dst.clone(), e))?;
            }
            Err(e) => return Err(RootfsError::Unmount(dst, e)),
        }
    }
}
