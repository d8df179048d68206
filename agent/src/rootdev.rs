//! Read-only image roots: the block device behind a `RootfsSource::Block` (found by its virtio
//! serial in sysfs) or a `RootfsSource::Image` (an image file attached to a loop device).
//!
//! The agent only finds or attaches the device here; the container's child mounts it read-only
//! in its own mount namespace (under an overlay), so the mounts die with the container. A loop
//! device is attached with `LO_FLAGS_AUTOCLEAR`: once [`LoopDevice`] is dropped (destroy, or
//! any failure path of create) and the namespace's mount is gone, the kernel detaches it.

use std::fs::File;
use std::io::Read;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// At most this many block devices are looked at in sysfs.
const MAX_BLOCK_DEVICES: usize = 4096;

/// Why an image root could not be prepared.
#[derive(Debug, thiserror::Error)]
pub enum RootDevError {
    /// The file-system type is not one the agent mounts images with.
    #[error("image file system type {0:?} is not supported: use \"erofs\" or \"ext4\"")]
    Fstype(String),
    /// No block device has this serial.
    #[error("no block device has virtio serial {serial:?} (looked in {dir}): attach the image disk with that serial")]
    NoSerial {
        /// Serial.
        serial: String,
        /// The sysfs directory searched.
        dir: String,
    },
    /// More than one block device has this serial.
    #[error("virtio serial {serial:?} is ambiguous: block devices {devices:?} all have it; give every disk a unique serial")]
    Ambiguous {
        /// Serial.
        serial: String,
        /// Devices with it.
        devices: Vec<String>,
    },
    /// The serial is empty or has characters sysfs never shows.
    #[error("virtio serial {0:?} is empty, longer than 20 bytes or not printable ASCII: fix the request")]
    BadSerial(String),
    /// The image is not a regular file.
    #[error("image {path} is not a regular file ({kind}): give the path of the image file itself")]
    NotRegular {
        /// Path.
        path: String,
        /// What it is instead.
        kind: &'static str,
    },
    /// The image does not carry the file system it claims.
    #[error("image {path} is not an {fstype} file system (no {fstype} superblock magic): build it with mkfs.{fstype} or fix the fstype")]
    BadMagic {
        /// Path.
        path: String,
        /// Claimed file system.
        fstype: String,
    },
    /// A system call failed.
    #[error("{what} {path}: {source}")]
    Io {
        /// What failed.
        what: &'static str,
        /// On what.
        path: String,
        /// Cause.
        source: std::io::Error,
    },
    /// No free loop device could be attached.
    #[error("no free loop device could be attached for {path}: {source}; load the loop module or free loop devices (losetup -D)")]
    NoLoop {
        /// Image path.
        path: String,
        /// Last cause.
        source: std::io::Error,
    },
}

/// The file systems an image root may have.
pub fn check_fstype(fstype: &str) -> Result<&'static str, RootDevError> {
    match fstype {
        "erofs" => Ok("erofs"),
        "ext4" => Ok("ext4"),
        other => Err(RootDevError::Fstype(other.to_string())),
    }
}

/// Whether the first bytes of `r` carry `fstype`'s superblock magic (both at offset 1024).
pub fn has_magic(r: &mut impl Read, fstype: &str) -> bool {
    let mut buf = [0u8; 1024 + 0x3a];
    if r.read_exact(&mut buf).is_err() {
        return false;
    }
    match fstype {
        // EROFS_SUPER_MAGIC_V1, little endian, at EROFS_SUPER_OFFSET.
        "erofs" => buf[1024..1028] == 0xE0F5_E1E2u32.to_le_bytes(),
        // EXT4_SUPER_MAGIC at s_magic (offset 0x38 in the superblock).
        "ext4" => buf[1024 + 0x38..1024 + 0x3a] == 0xEF53u16.to_le_bytes(),
        _ => false,
    }
}

fn valid_serial(serial: &str) -> Result<(), RootDevError> {
    // virtio-blk serials are at most 20 bytes (VIRTIO_BLK_ID_BYTES).
    if serial.is_empty() || serial.len() > 20 || !serial.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(RootDevError::BadSerial(serial.to_string()));
    }
    Ok(())
}

/// The `/dev` node of the one block device under `sys_block` (normally `/sys/block`) whose
/// `serial` file (virtio-blk) reads `serial`. Absence and ambiguity are errors. `sys_block` is
/// a parameter so tests can pass a directory tree shaped like sysfs.
pub fn find_by_serial(sys_block: &Path, serial: &str) -> Result<PathBuf, RootDevError> {
    valid_serial(serial)?;
    let io = |what, source| RootDevError::Io {
        what,
        path: sys_block.display().to_string(),
        source,
    };
    let mut found = Vec::new();
    let entries = std::fs::read_dir(sys_block).map_err(|e| io("reading", e))?;
    for (n, entry) in entries.enumerate() {
        if n >= MAX_BLOCK_DEVICES {
            break;
        }
        let entry = entry.map_err(|e| io("reading", e))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        // Bounded read: a serial file holds at most 20 bytes and a newline.
        let mut s = String::new();
        let Ok(f) = File::open(entry.path().join("serial")) else {
            continue;
        };
        if f.take(64).read_to_string(&mut s).is_err() {
            continue;
        }
        if s.trim_end_matches(['\n', '\0', ' ']) == serial {
            found.push(name.to_string());
        }
    }
    match found.len() {
        0 => Err(RootDevError::NoSerial {
            serial: serial.to_string(),
            dir: sys_block.display().to_string(),
        }),
        1 => Ok(Path::new("/dev").join(&found[0])),
        _ => {
            found.sort();
            Err(RootDevError::Ambiguous {
                serial: serial.to_string(),
                devices: found,
            })
        }
    }
}

/// The devices of an image root, as the container's child mounts them.
#[derive(Debug, Clone)]
pub struct ImageRoot {
    /// The read-only image's block device (`/dev/vdX` or `/dev/loopN`).
    pub device: PathBuf,
    /// Its file system (`erofs` or `ext4`).
    pub fstype: &'static str,
    /// The scratch ext4 device for the overlay upper; `None` = a tmpfs.
    pub scratch_device: Option<PathBuf>,
}

/// Checks that block device `dev` carries `fstype`.
pub fn check_device(dev: &Path, fstype: &str) -> Result<(), RootDevError> {
    let mut f = File::options()
        .read(true)
        .custom_flags(libc::O_CLOEXEC | libc::O_NOFOLLOW)
        .open(dev)
        .map_err(|source| RootDevError::Io {
            what: "opening block device",
            path: dev.display().to_string(),
            source,
        })?;
    if !has_magic(&mut f, fstype) {
        return Err(RootDevError::BadMagic {
            path: dev.display().to_string(),
            fstype: fstype.to_string(),
        });
    }
    Ok(())
}

const LOOP_SET_FD: libc::c_ulong = 0x4C00;
const LOOP_CLR_FD: libc::c_ulong = 0x4C01;
const LOOP_SET_STATUS64: libc::c_ulong = 0x4C04;
const LOOP_CONFIGURE: libc::c_ulong = 0x4C0A;
const LOOP_CTL_GET_FREE: libc::c_ulong = 0x4C82;
const LO_FLAGS_READ_ONLY: u32 = 1;
const LO_FLAGS_AUTOCLEAR: u32 = 4;

/// `struct loop_info64` (linux/loop.h).
#[repr(C)]
#[derive(Clone, Copy)]
struct LoopInfo64 {
    lo_device: u64,
    lo_inode: u64,
    lo_rdevice: u64,
    lo_offset: u64,
    lo_sizelimit: u64,
    lo_number: u32,
    lo_encrypt_type: u32,
    lo_encrypt_key_size: u32,
    lo_flags: u32,
    lo_file_name: [u8; 64],
    lo_crypt_name: [u8; 64],
    lo_encrypt_key: [u8; 32],
    lo_init: [u64; 2],
}

/// `struct loop_config` (linux/loop.h, Linux 5.8+).
#[repr(C)]
struct LoopConfig {
    fd: u32,
    block_size: u32,
    info: LoopInfo64,
    reserved: [u64; 8],
}

// The kernel's sizes (linux/loop.h): a layout mistake must not reach an ioctl.
const _: () = assert!(std::mem::size_of::<LoopInfo64>() == 232);
const _: () = assert!(std::mem::size_of::<LoopConfig>() == 304);

/// A loop device attached read-only (autoclear) to an image file. Dropping it closes the
/// agent's handle; the kernel detaches the device once no mount uses it either.
#[derive(Debug)]
pub struct LoopDevice {
    /// Held open: with autoclear, the last close (this one, or the unmount after it) detaches.
    _dev: File,
    path: PathBuf,
}

impl LoopDevice {
    /// `/dev/loopN`.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Attaches image file `image` (a regular file, not a symbolic link, carrying `fstype`)
    /// read-only to a free loop device.
    pub fn attach(image: &Path, fstype: &str) -> Result<Self, RootDevError> {
        let shown = image.display().to_string();
        let io = |what, source| RootDevError::Io {
            what,
            path: shown.clone(),
            source,
        };
        // O_NONBLOCK: opening a FIFO must not wait for a writer; O_NOFOLLOW: no symlinks.
        let mut file = File::options()
            .read(true)
            .custom_flags(libc::O_CLOEXEC | libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_NOCTTY)
            .open(image)
            .map_err(|e| {
                if e.raw_os_error() == Some(libc::ELOOP) {
                    RootDevError::NotRegular {
                        path: shown.clone(),
                        kind: "a symbolic link",
                    }
                } else {
                    io("opening image", e)
                }
            })?;
        let ft = file
            .metadata()
            .map_err(|e| io("checking image", e))?
            .file_type();
        if !ft.is_file() {
            let kind = if ft.is_dir() {
                "a directory"
            } else if ft.is_fifo() {
                "a FIFO"
            } else if ft.is_socket() {
                "a socket"
            } else if ft.is_block_device() {
                "a block device"
            } else {
                "a character device"
            };
            return Err(RootDevError::NotRegular { path: shown, kind });
        }
        if !has_magic(&mut file, fstype) {
            return Err(RootDevError::BadMagic {
                path: shown,
                fstype: fstype.to_string(),
            });
        }
        let ctl = File::options()
            .read(true)
            .write(true)
            .custom_flags(libc::O_CLOEXEC)
            .open("/dev/loop-control")
            .map_err(|e| io("opening /dev/loop-control for", e))?;
        let mut info = LoopInfo64 {
            lo_device: 0,
            lo_inode: 0,
            lo_rdevice: 0,
            lo_offset: 0,
            lo_sizelimit: 0,
            lo_number: 0,
            lo_encrypt_type: 0,
            lo_encrypt_key_size: 0,
            lo_flags: LO_FLAGS_READ_ONLY | LO_FLAGS_AUTOCLEAR,
            lo_file_name: [0; 64],
            lo_crypt_name: [0; 64],
            lo_encrypt_key: [0; 32],
            lo_init: [0; 2],
        };
        let name = image.as_os_str().as_encoded_bytes();
        let n = name.len().min(63);
        info.lo_file_name[..n].copy_from_slice(&name[..n]);
        let mut last = std::io::Error::from_raw_os_error(libc::EBUSY);
        // Another process may take the free device between GET_FREE and CONFIGURE: retry.
        for _ in 0..16 {
            // SAFETY: ioctl on our loop-control fd with an integer argument.
            let num = unsafe { libc::ioctl(ctl.as_raw_fd(), LOOP_CTL_GET_FREE as _) };
            if num < 0 {
                last = std::io::Error::last_os_error();
                break;
            }
            let path = PathBuf::from(format!("/dev/loop{num}"));
            let dev = match File::options()
                .read(true)
                .custom_flags(libc::O_CLOEXEC)
                .open(&path)
            {
                Ok(d) => d,
                Err(e) => {
                    last = e;
                    continue;
                }
            };
            match configure(&dev, &file, &info) {
                Ok(()) => return Ok(Self { _dev: dev, path }),
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => last = e,
                Err(e) => {
                    last = e;
                    break;
                }
            }
        }
        Err(RootDevError::NoLoop {
            path: shown,
            source: last,
        })
    }
}

/// LOOP_CONFIGURE, or LOOP_SET_FD + LOOP_SET_STATUS64 on kernels before 5.8.
fn configure(dev: &File, backing: &File, info: &LoopInfo64) -> std::io::Result<()> {
    let cfg = LoopConfig {
        fd: backing.as_raw_fd() as u32,
        block_size: 0,
        info: *info,
        reserved: [0; 8],
    };
    // SAFETY: LOOP_CONFIGURE reads a struct loop_config that lives for the call.
    let rc = unsafe { libc::ioctl(dev.as_raw_fd(), LOOP_CONFIGURE as _, &cfg) };
    if rc == 0 {
        return Ok(());
    }
    let e = std::io::Error::last_os_error();
    if e.raw_os_error() != Some(libc::EINVAL) && e.raw_os_error() != Some(libc::ENOTTY) {
        return Err(e);
    }
    // SAFETY: LOOP_SET_FD with the backing file's fd as the integer argument.
    if unsafe { libc::ioctl(dev.as_raw_fd(), LOOP_SET_FD as _, backing.as_raw_fd()) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: LOOP_SET_STATUS64 reads a struct loop_info64 that lives for the call.
    if unsafe { libc::ioctl(dev.as_raw_fd(), LOOP_SET_STATUS64 as _, info) } < 0 {
        let e = std::io::Error::last_os_error();
        // SAFETY: LOOP_CLR_FD takes no argument; undoes the SET_FD above.
        unsafe { libc::ioctl(dev.as_raw_fd(), LOOP_CLR_FD as _, 0) };
        return Err(e);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake_sysfs(devs: &[(&str, Option<&str>)]) -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        for (name, serial) in devs {
            std::fs::create_dir(d.path().join(name)).unwrap();
            if let Some(s) = serial {
                std::fs::write(d.path().join(name).join("serial"), format!("{s}\n")).unwrap();
            }
        }
        d
    }

    /// The serial lookup against a directory shaped like /sys/block (the full Block path needs
    /// a Linux guest with virtio-blk disks).
    #[test]
    fn serial_lookup_finds_one_refuses_none_and_many() {
        let d = fake_sysfs(&[
            ("vda", Some("rootfs0")),
            ("vdb", Some("scratch0")),
            ("loop0", None),
            ("vdc", Some("dup")),
            ("vdd", Some("dup")),
        ]);
        assert_eq!(
            find_by_serial(d.path(), "rootfs0").unwrap(),
            Path::new("/dev/vda")
        );
        assert_eq!(
            find_by_serial(d.path(), "scratch0").unwrap(),
            Path::new("/dev/vdb")
        );
        let e = find_by_serial(d.path(), "nope").unwrap_err().to_string();
        assert!(
            e.contains("no block device has virtio serial \"nope\""),
            "{e}"
        );
        let e = find_by_serial(d.path(), "dup").unwrap_err().to_string();
        assert!(
            e.contains("ambiguous") && e.contains("vdc") && e.contains("vdd"),
            "{e}"
        );
        for bad in ["", "a/../b c", "012345678901234567890"] {
            assert!(matches!(
                find_by_serial(d.path(), bad),
                Err(RootDevError::BadSerial(_))
            ));
        }
        assert!(matches!(
            find_by_serial(&d.path().join("missing"), "rootfs0"),
            Err(RootDevError::Io { .. })
        ));
    }

    #[test]
    fn fstypes_and_magic() {
        assert_eq!(check_fstype("erofs").unwrap(), "erofs");
        assert!(check_fstype("xfs")
            .unwrap_err()
            .to_string()
            .contains("\"xfs\""));
        let mut img = vec![0u8; 2048];
        img[1024..1028].copy_from_slice(&0xE0F5_E1E2u32.to_le_bytes());
        assert!(has_magic(&mut &img[..], "erofs"));
        assert!(!has_magic(&mut &img[..], "ext4"));
        assert!(!has_magic(&mut &img[..10], "erofs"));
    }
}
