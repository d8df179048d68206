//! The state file: `magic | format | header_len | state_len | crc32 | header | state`.
//!
//! All integers little endian. The CRC-32 covers header and state bytes. The header
//! ([`StateFile`] minus the state) is bincode; the state is whatever serde type the VMM saves.

use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use bincode::Options;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::HostFingerprint;

/// File name of the state file inside a snapshot directory.
pub const STATE_FILE: &str = "state.bin";
/// Magic bytes at the start of every state file.
pub const MAGIC: &[u8; 8] = b"RUNVSNAP";
/// Version of this layout; bumped on every incompatible change.
pub const FORMAT_VERSION: u32 = 2;
const PREFIX_LEN: usize = 8 + 4 + 4 + 8 + 4;
/// Largest header accepted.
pub const MAX_HEADER: u64 = 64 * 1024;
/// Largest state accepted (guest memory is in its own file).
pub const MAX_STATE: u64 = 256 << 20;

/// The snapshot header.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateFile {
    /// Version of the runv that wrote it.
    pub producer_version: String,
    /// Host it was taken on.
    pub host: HostFingerprint,
}

/// Why a snapshot was refused.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// File system error.
    #[error("{op} {path}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The file.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// Not a runv snapshot.
    #[error("{0}: not a runv snapshot (bad magic)")]
    BadMagic(PathBuf),
    /// Written by an incompatible format version.
    #[error("{path}: snapshot format version {found}, this runv reads version {supported}: take the snapshot again with this runv")]
    Version {
        /// The file.
        path: PathBuf,
        /// Version in the file.
        found: u32,
        /// Version this build reads.
        supported: u32,
    },
    /// The file is shorter or longer than its header says.
    #[error("{path}: truncated or padded state file ({actual} bytes, header says {expected})")]
    Truncated {
        /// The file.
        path: PathBuf,
        /// Size the header announces.
        expected: u64,
        /// Real size.
        actual: u64,
    },
    /// A length field is out of bounds.
    #[error("{path}: {what} length {len} exceeds the limit {max}: the file is corrupt")]
    TooLarge {
        /// The file.
        path: PathBuf,
        /// Which length.
        what: &'static str,
        /// Its value.
        len: u64,
        /// The limit.
        max: u64,
    },
    /// Content does not match its checksum.
    #[error("{path}: checksum mismatch (stored {stored:#010x}, computed {computed:#010x}): the snapshot is corrupt")]
    Checksum {
        /// The file.
        path: PathBuf,
        /// Stored CRC.
        stored: u32,
        /// Computed CRC.
        computed: u32,
    },
    /// Taken on a different kind of host.
    #[error("{path}: taken on a different host ({field}: snapshot {snapshot}, this host {host}); restore it on a matching host")]
    Host {
        /// The file.
        path: PathBuf,
        /// The differing field.
        field: &'static str,
        /// Snapshot's value.
        snapshot: String,
        /// This host's value.
        host: String,
    },
    /// Header or state did not decode.
    #[error("{path}: {what} does not decode: {detail}")]
    Decode {
        /// The file.
        path: PathBuf,
        /// Header or state.
        what: &'static str,
        /// Cause.
        detail: String,
    },
}

fn io<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> SnapshotError + 'a {
    move |source| SnapshotError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

/// Writes `state` with `header` as `dir/state.bin`, atomically (temp file, fsync, rename).
pub fn write_state<T: Serialize>(
    dir: &Path,
    header: &StateFile,
    state: &T,
) -> Result<PathBuf, SnapshotError> {
    let path = dir.join(STATE_FILE);
    let enc = |what, r: bincode::Result<Vec<u8>>| {
        r.map_err(|e| SnapshotError::Decode {
            path: path.clone(),
            what,
            detail: e.to_string(),
        })
    };
    let opts = bincode::options().with_fixint_encoding();
    let h = enc("header", opts.serialize(header))?;
    let s = enc("state", opts.serialize(state))?;
    let mut crc = crc32fast::Hasher::new();
    crc.update(&h);
    crc.update(&s);
    let mut out = Vec::with_capacity(PREFIX_LEN + h.len() + s.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&(h.len() as u32).to_le_bytes());
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(&crc.finalize().to_le_bytes());
    out.extend_from_slice(&h);
    out.extend_from_slice(&s);
    let tmp = dir.join(".state.bin.tmp");
    let mut f = File::create(&tmp).map_err(io("create", &tmp))?;
    f.write_all(&out).map_err(io("write", &tmp))?;
    f.sync_all().map_err(io("fsync", &tmp))?;
    std::fs::rename(&tmp, &path).map_err(io("rename", &path))?;
    Ok(path)
}

/// Reads and checks `dir/state.bin`; `host` (when given) must match the snapshot's host.
pub fn read_state<T: DeserializeOwned>(
    dir: &Path,
    host: Option<&HostFingerprint>,
) -> Result<(StateFile, T), SnapshotError> {
    let path = dir.join(STATE_FILE);
    let mut f = File::open(&path).map_err(io("open", &path))?;
    let actual = f.metadata().map_err(io("stat", &path))?.len();
    let mut prefix = [0u8; PREFIX_LEN];
    if actual < PREFIX_LEN as u64 {
        return Err(SnapshotError::Truncated {
            path,
            expected: PREFIX_LEN as u64,
            actual,
        });
    }
    f.read_exact(&mut prefix).map_err(io("read", &path))?;
    if &prefix[..8] != MAGIC {
        return Err(SnapshotError::BadMagic(path));
    }
    let le32 = |o: usize| u32::from_le_bytes(prefix[o..o + 4].try_into().expect("4 bytes"));
    let version = le32(8);
    if version != FORMAT_VERSION {
        return Err(SnapshotError::Version {
            path,
            found: version,
            supported: FORMAT_VERSION,
        });
    }
    let header_len = u64::from(le32(12));
    let state_len = u64::from_le_bytes(prefix[16..24].try_into().expect("8 bytes"));
    let stored = le32(24);
    for (what, len, max) in [
        ("header", header_len, MAX_HEADER),
        ("state", state_len, MAX_STATE),
    ] {
        if len > max {
            return Err(SnapshotError::TooLarge {
                path,
                what,
                len,
                max,
            });
        }
    }
    let expected = PREFIX_LEN as u64 + header_len + state_len;
    if actual != expected {
        return Err(SnapshotError::Truncated {
            path,
            expected,
            actual,
        });
    }
    let mut body = vec![0u8; (header_len + state_len) as usize];
    f.read_exact(&mut body).map_err(io("read", &path))?;
    let computed = crc32fast::hash(&body);
    if computed != stored {
        return Err(SnapshotError::Checksum {
            path,
            stored,
            computed,
        });
    }
    let (h, s) = body.split_at(header_len as usize);
    let decode_err = |what, e: bincode::Error| SnapshotError::Decode {
        path: path.clone(),
        what,
        detail: e.to_string(),
    };
    let header: StateFile = bincode::options()
        .with_fixint_encoding()
        .with_limit(MAX_HEADER)
        .deserialize(h)
        .map_err(|e| decode_err("header", e))?;
    if let Some((field, snapshot, host)) = host.and_then(|host| header.host.mismatch(host)) {
        return Err(SnapshotError::Host {
            path,
            field,
            snapshot,
            host,
        });
    }
    let state: T = bincode::options()
        .with_fixint_encoding()
        .with_limit(MAX_STATE)
        .deserialize(s)
        .map_err(|e| decode_err("state", e))?;
    Ok((header, state))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Vm {
        regs: Vec<u64>,
        name: String,
    }

    fn header() -> StateFile {
        StateFile {
            producer_version: "test".into(),
            host: HostFingerprint::current(12),
        }
    }

    fn sample(dir: &Path) -> Vec<u8> {
        let vm = Vm {
            regs: (0..64).collect(),
            name: "vm0".into(),
        };
        let p = write_state(dir, &header(), &vm).unwrap();
        std::fs::read(p).unwrap()
    }

    fn read(dir: &Path) -> Result<(StateFile, Vm), SnapshotError> {
        read_state(dir, Some(&HostFingerprint::current(12)))
    }

    #[test]
    fn round_trip() {
        let dir = tempfile::tempdir().unwrap();
        sample(dir.path());
        let (h, vm) = read(dir.path()).unwrap();
        assert_eq!(h, header());
        assert_eq!(vm.regs.len(), 64);
        assert!(!dir.path().join(".state.bin.tmp").exists());
    }

    #[test]
    fn truncated_flipped_versioned_foreign_and_garbage_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let good = sample(dir.path());
        let path = dir.path().join(STATE_FILE);
        let put = |b: &[u8]| std::fs::write(&path, b).unwrap();

        for cut in [0, 10, PREFIX_LEN, good.len() - 1] {
            put(&good[..cut]);
            assert!(
                matches!(read(dir.path()), Err(SnapshotError::Truncated { .. })),
                "cut {cut}"
            );
        }
        for i in [PREFIX_LEN, PREFIX_LEN + 20, good.len() - 1] {
            let mut b = good.clone();
            b[i] ^= 0x10;
            put(&b);
            assert!(
                matches!(read(dir.path()), Err(SnapshotError::Checksum { .. })),
                "flip {i}"
            );
        }
        let mut b = good.clone();
        b[8..12].copy_from_slice(&(FORMAT_VERSION + 1).to_le_bytes());
        put(&b);
        let e = read(dir.path()).unwrap_err();
        assert!(
            matches!(
                e,
                SnapshotError::Version {
                    found,
                    supported: FORMAT_VERSION,
                    ..
                } if found == FORMAT_VERSION + 1
            ),
            "{e}"
        );
        let mut b = good.clone();
        b[0] = b'X';
        put(&b);
        assert!(matches!(read(dir.path()), Err(SnapshotError::BadMagic(_))));
        let mut b = good.clone();
        b[16..24].copy_from_slice(&u64::MAX.to_le_bytes());
        put(&b);
        assert!(matches!(
            read(dir.path()),
            Err(SnapshotError::TooLarge { what: "state", .. })
        ));

        put(&good);
        let mut other = HostFingerprint::current(12);
        other.kvm_api_version = 13;
        let e = read_state::<Vm>(dir.path(), Some(&other)).unwrap_err();
        assert!(e.to_string().contains("kvm_api_version"), "{e}");
        // Checked bytes that decode to the wrong type are a decode error, not a panic.
        let e = read_state::<(String, Vec<String>, u128)>(dir.path(), None).unwrap_err();
        assert!(
            matches!(e, SnapshotError::Decode { what: "state", .. }),
            "{e}"
        );
        std::fs::remove_file(&path).unwrap();
        assert!(matches!(
            read(dir.path()),
            Err(SnapshotError::Io { op: "open", .. })
        ));
    }
}
