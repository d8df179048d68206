//! Duties of PID 1 in a guest: the basic file systems, the clone hooks (entropy, clock).

use std::ffi::CString;

/// Why a clone hook failed.
#[derive(Debug, thiserror::Error)]
pub enum Pid1Error {
    /// The entropy is empty or too large.
    #[error("{0} bytes of entropy: send 1..=512")]
    EntropySize(usize),
    /// `/dev/urandom` cannot be opened.
    #[error("opening /dev/urandom to add entropy: {0}; is devtmpfs mounted on /dev?")]
    OpenUrandom(#[source] std::io::Error),
    /// The kernel refused the entropy.
    #[error("RNDADDENTROPY: {0}; crediting entropy needs CAP_SYS_ADMIN")]
    AddEntropy(#[source] nix::Error),
    /// The kernel refused the clock.
    #[error("clock_settime(CLOCK_REALTIME): {0}; setting the clock needs CAP_SYS_TIME")]
    SetClock(#[source] nix::Error),
}

/// Mounts what a guest's init must provide; already-mounted targets are skipped.
pub fn mount_basics() -> Vec<String> {
    let mut errors = Vec::new();
    for (src, target, fstype, flags, data) in [
        (
            "proc",
            "/proc",
            "proc",
            libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
            "",
        ),
        (
            "sysfs",
            "/sys",
            "sysfs",
            libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
            "",
        ),
        ("devtmpfs", "/dev", "devtmpfs", libc::MS_NOSUID, "mode=0755"),
        (
            "devpts",
            "/dev/pts",
            "devpts",
            libc::MS_NOSUID | libc::MS_NOEXEC,
            "newinstance,ptmxmode=0666,mode=0620",
        ),
        (
            "shm",
            "/dev/shm",
            "tmpfs",
            libc::MS_NOSUID | libc::MS_NODEV,
            "mode=1777",
        ),
        (
            "cgroup2",
            "/sys/fs/cgroup",
            "cgroup2",
            libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
            "",
        ),
        (
            "tmpfs",
            "/tmp",
            "tmpfs",
            libc::MS_NOSUID | libc::MS_NODEV,
            "mode=1777",
        ),
        (
            "tmpfs",
            "/run",
            "tmpfs",
            libc::MS_NOSUID | libc::MS_NODEV,
            "mode=0755",
        ),
    ] {
        let _ = std::fs::create_dir_all(target);
        let c = |s: &str| CString::new(s).unwrap_or_default();
        let (src, tgt, fst, dat) = (c(src), c(target), c(fstype), c(data));
        // SAFETY: valid NUL-terminated strings; the result is checked.
        let rc = unsafe {
            libc::mount(
                src.as_ptr(),
                tgt.as_ptr(),
                fst.as_ptr(),
                flags,
                dat.as_ptr().cast(),
            )
        };
        if rc != 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EBUSY) {
                errors.push(format!("mounting {fstype} on {target}: {e}"));
            }
        }
    }
    errors
}

/// Mixes `entropy` (at most 512 bytes) into the kernel RNG and credits it (`RNDADDENTROPY`).
pub fn add_entropy(entropy: &[u8]) -> Result<(), Pid1Error> {
    if entropy.is_empty() || entropy.len() > 512 {
        return Err(Pid1Error::EntropySize(entropy.len()));
    }
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/urandom")
        .map_err(Pid1Error::OpenUrandom)?;
    // struct rand_pool_info { int entropy_count; int buf_size; __u32 buf[]; }
    let mut info = vec![0u8; 8 + entropy.len().div_ceil(4) * 4];
    info[..4].copy_from_slice(&((entropy.len() * 8) as i32).to_ne_bytes());
    info[4..8].copy_from_slice(&(entropy.len() as i32).to_ne_bytes());
    info[8..8 + entropy.len()].copy_from_slice(entropy);
    const RNDADDENTROPY: libc::c_ulong = 0x4008_5203;
    // SAFETY: `info` is a valid rand_pool_info of the stated size for the ioctl to read.
    let rc = unsafe {
        libc::ioctl(
            std::os::fd::AsRawFd::as_raw_fd(&f),
            RNDADDENTROPY,
            info.as_ptr(),
        )
    };
    if rc != 0 {
        return Err(Pid1Error::AddEntropy(nix::Error::last()));
    }
    Ok(())
}

/// Sets the wall clock.
pub fn set_clock(unix_nanos: i64) -> Result<(), Pid1Error> {
    let ts = nix::sys::time::TimeSpec::new(
        unix_nanos.div_euclid(1_000_000_000),
        unix_nanos.rem_euclid(1_000_000_000),
    );
    nix::time::clock_settime(nix::time::ClockId::CLOCK_REALTIME, ts).map_err(Pid1Error::SetClock)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entropy_size_is_checked_before_any_system_call() {
        assert!(matches!(add_entropy(&[]), Err(Pid1Error::EntropySize(0))));
        let e = add_entropy(&[0; 513]).unwrap_err();
        assert!(e.to_string().contains("513 bytes"), "{e}");
    }
}
