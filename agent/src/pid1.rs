//! Duties of PID 1 in a guest: the basic file systems, the clone hooks (entropy, clock).

use std::ffi::CString;

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
pub fn add_entropy(entropy: &[u8]) -> Result<(), String> {
    if entropy.is_empty() || entropy.len() > 512 {
        return Err(format!("{} bytes of entropy: send 1..=512", entropy.len()));
    }
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/urandom")
        .map_err(|e| format!("opening /dev/urandom: {e}"))?;
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
        return Err(format!(
            "RNDADDENTROPY: {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}

/// Sets the wall clock.
pub fn set_clock(unix_nanos: i64) -> Result<(), String> {
    let ts = libc::timespec {
        tv_sec: unix_nanos.div_euclid(1_000_000_000),
        tv_nsec: unix_nanos.rem_euclid(1_000_000_000),
    };
    // SAFETY: a valid timespec; the result is checked.
    if unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &ts) } != 0 {
        return Err(format!(
            "clock_settime: {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}
