//! VM configuration: a JSON file and/or command-line flags, validated before anything is built.

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// What a file type is, in words for error messages ("a regular file", "a FIFO", ...).
pub fn file_kind(ft: std::fs::FileType) -> &'static str {
    if ft.is_file() {
        "a regular file"
    } else if ft.is_dir() {
        "a directory"
    } else if ft.is_symlink() {
        "a symbolic link"
    } else if ft.is_fifo() {
        "a FIFO"
    } else if ft.is_char_device() {
        "a character device"
    } else if ft.is_block_device() {
        "a block device"
    } else if ft.is_socket() {
        "a socket"
    } else {
        "something else"
    }
}

/// Smallest guest RAM accepted.
pub const MIN_MEM_MIB: u64 = 16;
/// Largest guest RAM accepted.
pub const MAX_MEM_MIB: u64 = 64 << 10;
/// Most vCPUs per VM.
pub const MAX_VCPUS: u8 = 8;
/// Largest JSON config file accepted.
pub const MAX_CONFIG_BYTES: u64 = 1 << 20;
/// Longest virtio-blk device id (the GET_ID buffer is 20 bytes; a shorter id is NUL-padded).
pub const MAX_BLOCK_ID: usize = 20;

/// A file the VMM was asked to read (kernel, initrd, config file) that it refuses to read.
#[derive(Debug, thiserror::Error)]
pub enum InputFileError {
    /// The file could not be opened or inspected.
    #[error("{what} {path} is not a readable file: {source}")]
    Open {
        /// Kernel, initrd or config file.
        what: &'static str,
        /// The file.
        path: String,
        /// Cause.
        source: std::io::Error,
    },
    /// A FIFO, device, directory or socket: reading it could block or never end.
    #[error("{what} {path} is {kind}, not a regular file: pass a regular file")]
    NotRegular {
        /// Kernel, initrd or config file.
        what: &'static str,
        /// The file.
        path: String,
        /// What it is instead.
        kind: &'static str,
    },
    /// Larger than the rule for this kind of file allows (checked before reading it).
    #[error("{what} {path} is {size} bytes, more than the {max} bytes allowed: {rule}")]
    TooLarge {
        /// Kernel, initrd or config file.
        what: &'static str,
        /// The file.
        path: String,
        /// Its size.
        size: u64,
        /// The limit.
        max: u64,
        /// Why there is a limit and what to do.
        rule: String,
    },
    /// Reading it failed (or it changed size while being read).
    #[error("reading {what} {path}: {source}")]
    Read {
        /// Kernel, initrd or config file.
        what: &'static str,
        /// The file.
        path: String,
        /// Cause.
        source: std::io::Error,
    },
}

/// Opens `path` for reading only if it is a regular file of at most `max` bytes; returns the
/// file and its size. The open is non-blocking, so a FIFO is refused instead of waiting for a
/// writer; the checks use `fstat` on the opened file, so nothing can be swapped in between.
pub fn open_regular(
    what: &'static str,
    path: &Path,
    max: u64,
    rule: &str,
) -> Result<(File, u64), InputFileError> {
    let name = || path.display().to_string();
    let open_err = |source| InputFileError::Open {
        what,
        path: name(),
        source,
    };
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC | libc::O_NOCTTY)
        .open(path)
        .map_err(open_err)?;
    let meta = f.metadata().map_err(open_err)?;
    let ft = meta.file_type();
    if !ft.is_file() {
        let kind = file_kind(ft);
        return Err(InputFileError::NotRegular {
            what,
            path: name(),
            kind,
        });
    }
    let size = meta.len();
    if size > max {
        return Err(InputFileError::TooLarge {
            what,
            path: name(),
            size,
            max,
            rule: rule.into(),
        });
    }
    Ok((f, size))
}

/// Reads a whole regular file of at most `max` bytes (see [`open_regular`]); never reads more
/// than `max` bytes, even from a file that grows meanwhile.
pub fn read_regular(
    what: &'static str,
    path: &Path,
    max: u64,
    rule: &str,
) -> Result<Vec<u8>, InputFileError> {
    let (f, size) = open_regular(what, path, max, rule)?;
    let mut data = Vec::with_capacity(usize::try_from(size).unwrap_or(0));
    f.take(max.saturating_add(1))
        .read_to_end(&mut data)
        .map_err(|source| InputFileError::Read {
            what,
            path: path.display().to_string(),
            source,
        })?;
    if data.len() as u64 > max {
        return Err(InputFileError::TooLarge {
            what,
            path: path.display().to_string(),
            size: data.len() as u64,
            max,
            rule: rule.into(),
        });
    }
    Ok(data)
}

pub use vmm_api::{NetConfig, SerialOutput};

/// How an ELF kernel is entered.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum BootProtocol {
    /// PVH when the ELF has a PVH entry note, else the Linux 64-bit entry.
    #[default]
    Auto,
    /// Linux 64-bit boot protocol (`boot_params` in RSI, long mode).
    Linux64,
    /// PVH (`hvm_start_info` in RBX, 32-bit protected mode); the ELF needs a PVH note.
    Pvh,
}

/// A virtio-blk device backed by a raw file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BlockConfig {
    /// Backing file.
    pub path: PathBuf,
    /// Refuse guest writes.
    #[serde(default)]
    pub read_only: bool,
    /// Device id returned by GET_ID (at most [`MAX_BLOCK_ID`] bytes, refused if longer; default:
    /// the file name's first 20 bytes).
    #[serde(default)]
    pub id: Option<String>,
}

impl std::str::FromStr for BlockConfig {
    type Err = ConfigError;
    /// Parses `path=P[,ro][,id=ID]`.
    fn from_str(s: &str) -> Result<Self, ConfigError> {
        let mut cfg = BlockConfig {
            path: PathBuf::new(),
            read_only: false,
            id: None,
        };
        for part in s.split(',') {
            match part.split_once('=') {
                Some(("path", p)) if !p.is_empty() => cfg.path = p.into(),
                Some(("id", id)) => cfg.id = Some(id.into()),
                None if part == "ro" => cfg.read_only = true,
                _ => return Err(ConfigError::Block(s.into())),
            }
        }
        if cfg.path.as_os_str().is_empty() {
            return Err(ConfigError::Block(s.into()));
        }
        Ok(cfg)
    }
}

/// A virtio-vsock device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VsockConfig {
    /// Guest CID (3 or higher).
    pub cid: u64,
    /// Host-side Unix socket; guest-initiated connections go to `<uds>_<port>`.
    pub uds: PathBuf,
}

impl std::str::FromStr for VsockConfig {
    type Err = ConfigError;
    /// Parses `cid=N,uds=PATH`.
    fn from_str(s: &str) -> Result<Self, ConfigError> {
        let (mut cid, mut uds) = (None, None);
        for part in s.split(',') {
            match part.split_once('=') {
                Some(("cid", c)) => cid = c.parse().ok(),
                Some(("uds", p)) if !p.is_empty() => uds = Some(PathBuf::from(p)),
                _ => return Err(ConfigError::Vsock(s.into())),
            }
        }
        match (cid, uds) {
            (Some(cid), Some(uds)) => Ok(Self { cid, uds }),
            _ => Err(ConfigError::Vsock(s.into())),
        }
    }
}

/// A VM's configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    /// Kernel: ELF vmlinux (64-bit entry) or bzImage.
    pub kernel: PathBuf,
    /// Optional initrd.
    #[serde(default)]
    pub initrd: Option<PathBuf>,
    /// How to enter an ELF kernel (bzImages always use the 64-bit entry).
    #[serde(default)]
    pub boot_protocol: BootProtocol,
    /// Kernel command line (the VMM appends its device announcements).
    #[serde(default)]
    pub cmdline: String,
    /// Guest RAM in MiB.
    #[serde(default = "default_mem")]
    pub mem_mib: u64,
    /// Number of vCPUs, 1..=8.
    #[serde(default = "default_vcpus")]
    pub vcpus: u8,
    /// Serial console destination.
    #[serde(default)]
    pub serial: SerialOutput,
    /// Control socket path.
    #[serde(default)]
    pub control: Option<PathBuf>,
    /// Enables the debug report port; reports go to this file (`-` = stdout).
    #[serde(default)]
    pub debug_log: Option<String>,
    /// virtio-blk devices, in MMIO slot order.
    #[serde(default)]
    pub block: Vec<BlockConfig>,
    /// The virtio-vsock device (after the block devices).
    #[serde(default)]
    pub vsock: Option<VsockConfig>,
    /// The virtio-net device on a TAP (after vsock).
    #[serde(default)]
    pub net: Option<NetConfig>,
}

fn default_mem() -> u64 {
    128
}
fn default_vcpus() -> u8 {
    1
}

/// An invalid configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// Unparseable config file.
    #[error("config file {path}: {detail}")]
    File {
        /// File.
        path: String,
        /// Cause.
        detail: String,
    },
    /// No kernel given.
    #[error("no kernel given: pass --kernel PATH or \"kernel\" in the config file")]
    NoKernel,
    /// Kernel, initrd or config file refused.
    #[error(transparent)]
    Input(#[from] InputFileError),
    /// Memory out of range.
    #[error("memory of {0} MiB is out of range: use {MIN_MEM_MIB}..={MAX_MEM_MIB} MiB")]
    Memory(u64),
    /// vCPU count out of range.
    #[error("{0} vCPUs requested: use 1..={MAX_VCPUS}")]
    Vcpus(u64),
    /// Bad block device spec.
    #[error("block device {0:?} not understood: use path=PATH[,ro][,id=ID]")]
    Block(String),
    /// A block device id longer than virtio-blk carries.
    #[error("block device id {id:?} is {len} bytes: virtio-blk ids are at most {MAX_BLOCK_ID} bytes, use a shorter id")]
    BlockId {
        /// The id.
        id: String,
        /// Its length in bytes.
        len: usize,
    },
    /// Bad vsock spec.
    #[error("vsock {0:?} not understood: use cid=N,uds=PATH")]
    Vsock(String),
    /// Bad network device.
    #[error(transparent)]
    Net(#[from] vmm_api::BadNet),
    /// More devices than MMIO slots with an interrupt.
    #[error("{0} virtio devices requested: at most {1} fit")]
    TooManyDevices(usize, usize),
    /// Bad serial spec.
    #[error("{0}")]
    Serial(#[from] vmm_api::BadSerialOutput),
}

impl VmConfig {
    /// A configuration with defaults for everything but the kernel.
    pub fn new(kernel: impl Into<PathBuf>) -> Self {
        Self {
            kernel: kernel.into(),
            initrd: None,
            boot_protocol: BootProtocol::default(),
            cmdline: String::new(),
            mem_mib: default_mem(),
            vcpus: default_vcpus(),
            serial: SerialOutput::default(),
            control: None,
            debug_log: None,
            block: Vec::new(),
            vsock: None,
            net: None,
        }
    }

    /// Reads a JSON config file.
    pub fn from_file(path: &std::path::Path) -> Result<Self, ConfigError> {
        let err = |detail: String| ConfigError::File {
            path: path.display().to_string(),
            detail,
        };
        let text = read_regular(
            "config file",
            path,
            MAX_CONFIG_BYTES,
            "a VM config is small JSON; pass the right file",
        )?;
        serde_json::from_slice(&text).map_err(|e| err(e.to_string()))
    }

    /// Checks everything that can be checked without building the VM.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.validate_machine()?;
        if self.kernel.as_os_str().is_empty() {
            return Err(ConfigError::NoKernel);
        }
        let mem = self.mem_mib << 20;
        open_regular("kernel", &self.kernel, mem, &kernel_rule(mem))?;
        if let Some(initrd) = &self.initrd {
            let room = crate::boot::initrd_room(mem);
            open_regular("initrd", initrd, room, &initrd_rule(room))?;
        }
        Ok(())
    }

    /// Checks sizes and devices (everything but the kernel, which a restore does not need).
    pub fn validate_machine(&self) -> Result<(), ConfigError> {
        if !(MIN_MEM_MIB..=MAX_MEM_MIB).contains(&self.mem_mib) {
            return Err(ConfigError::Memory(self.mem_mib));
        }
        if !(1..=MAX_VCPUS).contains(&self.vcpus) {
            return Err(ConfigError::Vcpus(self.vcpus.into()));
        }
        for id in self.block.iter().filter_map(|b| b.id.as_deref()) {
            check_block_id(id)?;
        }
        if let Some(n) = &self.net {
            n.validate()?;
        }
        let slots = (crate::layout::VIRTIO_IRQ_MAX - crate::layout::VIRTIO_IRQ_BASE + 1) as usize;
        let devices = self.device_count();
        if devices > slots {
            return Err(ConfigError::TooManyDevices(devices, slots));
        }
        Ok(())
    }
}

impl VmConfig {
    /// Number of virtio devices (block devices, then vsock, then net: their MMIO slot order).
    pub fn device_count(&self) -> usize {
        self.block.len() + usize::from(self.vsock.is_some()) + usize::from(self.net.is_some())
    }
}

/// The rule a kernel of a VM with `mem` bytes of RAM must follow.
pub(crate) fn kernel_rule(mem: u64) -> String {
    format!("it does not fit in the guest's {} MiB of RAM; pass the right kernel or give the VM more memory", mem >> 20)
}

/// The rule an initrd with `room` bytes of space must follow.
pub(crate) fn initrd_rule(room: u64) -> String {
    format!("it does not fit in the {} MiB of low guest RAM above the kernel's load address; pass a smaller initrd or give the VM more memory", room >> 20)
}

/// Refuses a virtio-blk id longer than [`MAX_BLOCK_ID`] bytes (it would be cut silently).
pub fn check_block_id(id: &str) -> Result<(), ConfigError> {
    if id.len() > MAX_BLOCK_ID {
        return Err(ConfigError::BlockId {
            id: id.into(),
            len: id.len(),
        });
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    #[test]
    fn parses_and_validates() {
        let dir = tempfile::tempdir().unwrap();
        let k = dir.path().join("k");
        std::fs::write(&k, b"x").unwrap();
        let cfg: VmConfig = serde_json::from_str(&format!(
            r#"{{"kernel":"{}","mem_mib":64,"vcpus":2,"serial":"file:/tmp/s"}}"#,
            k.display()
        ))
        .unwrap();
        assert_eq!(cfg.serial, SerialOutput::File("/tmp/s".into()));
        cfg.validate().unwrap();
        let bad = |f: fn(&mut VmConfig)| {
            let mut c = cfg.clone();
            f(&mut c);
            c.validate().unwrap_err().to_string()
        };
        assert!(bad(|c| c.vcpus = 9).contains("9 vCPUs"));
        assert!(bad(|c| c.vcpus = 0).contains("0 vCPUs"));
        assert!(bad(|c| c.mem_mib = 8).contains("8 MiB"));
        assert!(bad(|c| c.kernel = "/nonexistent".into()).contains("/nonexistent"));
        assert!(bad(|c| c.kernel = "/".into()).contains("not a regular file"));
        assert!(serde_json::from_str::<VmConfig>(r#"{"kernel":"k","serial":"tty"}"#).is_err());
        let b: BlockConfig = "path=/d.img,ro,id=x".parse().unwrap();
        assert_eq!(
            (b.path.to_str(), b.read_only, b.id.as_deref()),
            (Some("/d.img"), true, Some("x"))
        );
        let v: VsockConfig = "cid=3,uds=/tmp/v.sock".parse().unwrap();
        assert_eq!((v.cid, v.uds.to_str()), (3, Some("/tmp/v.sock")));
        for bad in ["", "cid=3", "uds=/x", "cid=x,uds=/x", "cid=3,uds=/x,z=1"] {
            assert!(bad.parse::<VsockConfig>().is_err(), "{bad}");
        }
        for bad in ["", "ro", "path=", "path=/x,rw", "file=/x"] {
            assert!(bad.parse::<BlockConfig>().is_err(), "{bad}");
        }
        assert!(serde_json::from_str::<VmConfig>(r#"{"kernel":"k","bogus":1}"#).is_err());
    }

    /// Files a VMM must refuse to read: a character device that never ends, a FIFO nobody
    /// writes (opening or reading it blocks), and a 4 GiB sparse file (cheap to create, huge
    /// to read).
    pub(crate) fn hostile_inputs(dir: &Path) -> Vec<(&'static str, PathBuf)> {
        let fifo = dir.join("fifo");
        let c = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: `c` is a valid NUL-terminated path that outlives the call.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let sparse = dir.join("sparse");
        File::create(&sparse).unwrap().set_len(4 << 30).unwrap();
        vec![
            ("a character device", "/dev/zero".into()),
            ("a FIFO", fifo),
            ("4294967296 bytes", sparse),
        ]
    }

    /// Runs `f` on a thread; fails the test (instead of hanging it) if it takes over 10 s.
    pub(crate) fn within_timeout<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(f());
        });
        rx.recv_timeout(std::time::Duration::from_secs(10))
            .expect("blocked: the file was read instead of refused")
    }

    #[test]
    fn hostile_config_kernel_and_initrd_files_are_refused_before_reading() {
        let dir = tempfile::tempdir().unwrap();
        let k = dir.path().join("k");
        std::fs::write(&k, b"x").unwrap();
        for (rule, path) in hostile_inputs(dir.path()) {
            let p = path.clone();
            let e = within_timeout(move || VmConfig::from_file(&p).unwrap_err().to_string());
            assert!(
                e.contains("config file")
                    && e.contains(&*path.to_string_lossy())
                    && e.contains(rule),
                "{e}"
            );
            for initrd in [false, true] {
                let mut cfg = VmConfig::new(&k);
                if initrd {
                    cfg.initrd = Some(path.clone());
                } else {
                    cfg.kernel = path.clone();
                }
                let e = within_timeout(move || cfg.validate().unwrap_err().to_string());
                let what = if initrd { "initrd " } else { "kernel " };
                assert!(
                    e.contains(what) && e.contains(&*path.to_string_lossy()) && e.contains(rule),
                    "{e}"
                );
            }
        }
        // Just over the config limit is refused; a good config file still loads.
        let big = dir.path().join("big.json");
        std::fs::write(&big, vec![b' '; MAX_CONFIG_BYTES as usize + 1]).unwrap();
        let e = VmConfig::from_file(&big).unwrap_err().to_string();
        assert!(e.contains(&MAX_CONFIG_BYTES.to_string()), "{e}");
        let good = dir.path().join("good.json");
        std::fs::write(
            &good,
            format!(
                r#"{{"kernel":"{}","initrd":"{}"}}"#,
                k.display(),
                k.display()
            ),
        )
        .unwrap();
        VmConfig::from_file(&good).unwrap().validate().unwrap();
    }

    #[test]
    fn unknown_fields_and_long_block_ids_are_refused() {
        for json in [
            r#"{"kernel":"k","bogus":1}"#,
            r#"{"kernel":"k","block":[{"path":"/d","readonly":true}]}"#,
            r#"{"kernel":"k","vsock":{"cid":3,"uds":"/v","port":1}}"#,
        ] {
            let e = serde_json::from_str::<VmConfig>(json)
                .unwrap_err()
                .to_string();
            assert!(e.contains("unknown field"), "{json}: {e}");
        }
        let mut cfg = VmConfig::new("k");
        let id = "a".repeat(MAX_BLOCK_ID);
        cfg.block.push(format!("path=/d,id={id}").parse().unwrap());
        cfg.validate_machine().unwrap();
        cfg.block[0].id = Some(format!("{id}b"));
        let e = cfg.validate_machine().unwrap_err();
        assert!(matches!(e, ConfigError::BlockId { len: 21, .. }), "{e}");
        assert!(e.to_string().contains("at most 20 bytes"), "{e}");
    }
}
