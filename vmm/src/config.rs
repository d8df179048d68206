//! VM configuration: a JSON file and/or command-line flags, validated before anything is built.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Smallest guest RAM accepted.
pub const MIN_MEM_MIB: u64 = 16;
/// Largest guest RAM accepted.
pub const MAX_MEM_MIB: u64 = 64 << 10;
/// Most vCPUs per VM.
pub const MAX_VCPUS: u8 = 8;

pub use vmm_api::SerialOutput;

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
    /// Device id returned by GET_ID (at most 20 bytes; default: the file name).
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
    /// Kernel missing or not a regular file.
    #[error("kernel {path} is not a readable file: {detail}")]
    Kernel {
        /// Path.
        path: String,
        /// Cause.
        detail: String,
    },
    /// Memory out of range.
    #[error("memory of {0} MiB is out of range: use {MIN_MEM_MIB}..={MAX_MEM_MIB} MiB")]
    Memory(u64),
    /// vCPU count out of range.
    #[error("{0} vCPUs requested: use 1..={MAX_VCPUS}")]
    Vcpus(u64),
    /// Bad block device spec.
    #[error("block device {0:?} not understood: use path=PATH[,ro][,id=ID]")]
    Block(String),
    /// Bad vsock spec.
    #[error("vsock {0:?} not understood: use cid=N,uds=PATH")]
    Vsock(String),
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
        }
    }

    /// Reads a JSON config file.
    pub fn from_file(path: &std::path::Path) -> Result<Self, ConfigError> {
        let err = |detail: String| ConfigError::File {
            path: path.display().to_string(),
            detail,
        };
        let text = std::fs::read(path).map_err(|e| err(e.to_string()))?;
        serde_json::from_slice(&text).map_err(|e| err(e.to_string()))
    }

    /// Checks everything that can be checked without building the VM.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.validate_machine()?;
        if self.kernel.as_os_str().is_empty() {
            return Err(ConfigError::NoKernel);
        }
        let kernel_err = |detail: String| ConfigError::Kernel {
            path: self.kernel.display().to_string(),
            detail,
        };
        let meta = std::fs::metadata(&self.kernel).map_err(|e| kernel_err(e.to_string()))?;
        if !meta.is_file() {
            return Err(kernel_err("not a regular file".into()));
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
        let slots = (crate::layout::VIRTIO_IRQ_MAX - crate::layout::VIRTIO_IRQ_BASE + 1) as usize;
        let devices = self.block.len() + usize::from(self.vsock.is_some());
        if devices > slots {
            return Err(ConfigError::TooManyDevices(devices, slots));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
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
}
