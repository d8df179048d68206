//! A host TAP interface opened through `/dev/net/tun` (`IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`):
//! every frame read or written starts with a 12-byte `virtio_net_hdr_v1`. Only an existing TAP
//! is attached (a missing one is an error, never created on the fly), and one VMM at a time.

use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

/// Length of the `virtio_net_hdr_v1` in front of every frame on the TAP.
pub const VNET_HDR_LEN: usize = 12;

/// A TAP that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    /// No interface of that name in the VMM's network namespace.
    #[error("TAP {0} does not exist in this network namespace: create it first (ip tuntap add dev {0} mode tap; ip link set {0} up) or run the VMM in the namespace that has it")]
    Missing(String),
    /// Another process holds it.
    #[error("TAP {0} is in use by another process (a VM's TAP serves one VMM at a time): give each VM, template and clone its own TAP")]
    Busy(String),
    /// The interface exists but is not a single-queue TAP.
    #[error("{0} is not a TAP device we can attach (a TUN, a multi-queue TAP or another kind of interface): create it with ip tuntap add dev {0} mode tap")]
    NotTap(String),
    /// Opening `/dev/net/tun` or an ioctl on it failed.
    #[error("TAP {name}: {what}: {source}")]
    Io {
        /// The TAP.
        name: String,
        /// The step.
        what: &'static str,
        /// Cause.
        source: std::io::Error,
    },
}

/// An attached TAP (non-blocking).
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
}

/// `struct ifreq` as TUNSETIFF reads it: a name and the flags.
#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

impl Tap {
    /// Attaches the existing TAP `name` with virtio-net headers and no offloads (set them with
    /// [`Tap::set_offload`] once the driver negotiated its features).
    pub fn open(name: &str) -> Result<Self, TapError> {
        let io = |what| {
            move |source| TapError::Io {
                name: name.into(),
                what,
                source,
            }
        };
        let cname = CString::new(name).map_err(|_| TapError::NotTap(name.into()))?;
        if name.len() >= libc::IFNAMSIZ {
            return Err(TapError::NotTap(name.into()));
        }
        // SAFETY: `cname` is a valid NUL-terminated string that outlives the call.
        if unsafe { libc::if_nametoindex(cname.as_ptr()) } == 0 {
            return Err(TapError::Missing(name.into()));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(io(
                "opening /dev/net/tun (is the tun module loaded, and are we root?)",
            ))?;
        let mut req = IfReq {
            name: [0; libc::IFNAMSIZ],
            flags: (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short,
            _pad: [0; 22],
        };
        req.name[..name.len()].copy_from_slice(name.as_bytes());
        // SAFETY: TUNSETIFF reads a `struct ifreq` (40 bytes, which `IfReq` is) from a pointer we
        // own for the duration of the call.
        if unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut req) } < 0 {
            let e = std::io::Error::last_os_error();
            return Err(match e.raw_os_error() {
                Some(libc::EBUSY) => TapError::Busy(name.into()),
                Some(libc::EINVAL) => TapError::NotTap(name.into()),
                _ => io("TUNSETIFF")(e),
            });
        }
        let tap = Self {
            file,
            name: name.into(),
        };
        let len = VNET_HDR_LEN as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads one int from a pointer to a local.
        if unsafe { libc::ioctl(tap.fd(), libc::TUNSETVNETHDRSZ, &len) } < 0 {
            return Err(io("TUNSETVNETHDRSZ")(std::io::Error::last_os_error()));
        }
        tap.set_offload(0)?;
        Ok(tap)
    }

    /// Tells the kernel which offloads (`TUN_F_*`) the reader — the guest driver — accepts in
    /// frames it receives.
    pub fn set_offload(&self, flags: libc::c_uint) -> Result<(), TapError> {
        // SAFETY: TUNSETOFFLOAD takes its argument by value; no memory is passed.
        if unsafe { libc::ioctl(self.fd(), libc::TUNSETOFFLOAD, libc::c_ulong::from(flags)) } < 0 {
            return Err(TapError::Io {
                name: self.name.clone(),
                what: "TUNSETOFFLOAD",
                source: std::io::Error::last_os_error(),
            });
        }
        Ok(())
    }

    /// The interface name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The descriptor, for epoll.
    pub fn fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    /// Reads one frame (header included); `WouldBlock` when none is queued.
    pub fn read_frame(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.file.read(buf)
    }

    /// Writes one frame (header included).
    pub fn write_frame(&mut self, frame: &[u8]) -> std::io::Result<usize> {
        self.file.write(frame)
    }
}
