//! The state file: `magic | format | header_len | state_len | crc32 | header | state`.
//!
//! All integers little endian. The CRC-32 covers header and state bytes. The header
//! ([`StateFile`]: producer, host, snapshot id, guest RAM size) is bincode; the state is whatever
//! serde type the VMM saves. Files are written and read through
//! [`SnapshotWriter`](crate::SnapshotWriter) and [`SnapshotDir`](crate::SnapshotDir).

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use bincode::Options;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::{HostFingerprint, SnapshotId};

/// File name of the state file inside a snapshot directory.
pub const STATE_FILE: &str = "state.bin";
/// Magic bytes at the start of every state file.
pub const MAGIC: &[u8; 8] = b"RUNVSNAP";
/// Version of this layout (state file, memory trailer, working-set tie); bumped on every
/// incompatible change.
pub const FORMAT_VERSION: u32 = 4;
pub(crate) const PREFIX_LEN: usize = 8 + 4 + 4 + 8 + 4;
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
    /// Random id of this snapshot; `memory.bin`'s trailer and `workingset.bin` carry the same.
    pub id: SnapshotId,
    /// Guest RAM size in bytes (`memory.bin` holds this many bytes, then its trailer page).
    pub mem_size: u64,
}

/// Why a snapshot was refused.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// File system error.
    #[error("{op} {path}: {source}{hint}", hint = crate::memory::space_hint(.source))]
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
    /// A name in the snapshot directory is not a regular file.
    #[error("{path} is a {kind}, not a regular file: refusing to use it (remove it and take the snapshot again)")]
    NotRegular {
        /// The name.
        path: PathBuf,
        /// What it is instead.
        kind: &'static str,
    },
    /// The snapshot directory is missing, a symlink or not a directory.
    #[error("snapshot directory {path}: {why}: create it as a real directory first")]
    NotADirectory {
        /// The path.
        path: PathBuf,
        /// What is wrong.
        why: &'static str,
    },
    /// `memory.bin` and `state.bin` come from different snapshots.
    #[error("{path} belongs to another snapshot (id {memory}, state.bin says {state}): the snapshot was interrupted; take it again")]
    IdMismatch {
        /// The memory file.
        path: PathBuf,
        /// Id in the memory file's trailer.
        memory: SnapshotId,
        /// Id in the state file.
        state: SnapshotId,
    },
    /// The memory file's trailer is missing or damaged, or its size is wrong.
    #[error("{path}: {why}: the memory file is truncated, damaged or from another snapshot; take the snapshot again")]
    Memory {
        /// The memory file.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
    /// Writing the memory file failed.
    #[error(transparent)]
    MemoryWrite(#[from] crate::memory::MemoryFileError),
    /// `commit` was called before the guest memory was written.
    #[error(
        "snapshot of {0}: no guest memory was written before commit (call write_memory first)"
    )]
    NoMemory(PathBuf),
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

pub(crate) fn io<'a>(
    op: &'static str,
    path: &'a Path,
) -> impl FnOnce(std::io::Error) -> SnapshotError + 'a {
    move |source| SnapshotError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

/// Encodes `state` with `header` into the bytes of a state file (`path` names it in errors).
/// Snapshots are written with [`crate::SnapshotWriter`]; this is the format alone.
pub fn encode<T: Serialize>(
    path: &Path,
    header: &StateFile,
    state: &T,
) -> Result<Vec<u8>, SnapshotError> {
    let enc = |what, r: bincode::Result<Vec<u8>>| {
        r.map_err(|e| SnapshotError::Decode {
            path: path.to_path_buf(),
            what,
            detail: e.to_string(),
        })
    };
    let opts = bincode::options().with_fixint_encoding();
    let h = enc("header", opts.serialize(header))?;
    let s = enc("state", opts.serialize(state))?;
    for (what, len, max) in [
        ("header", h.len() as u64, MAX_HEADER),
        ("state", s.len() as u64, MAX_STATE),
    ] {
        if len > max {
            return Err(SnapshotError::TooLarge {
                path: path.to_path_buf(),
                what,
                len,
                max,
            });
        }
    }
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
    Ok(out)
}

/// Reads and checks the state file `f` (opened from `path`, named in errors); `host` (when
/// given) must match the snapshot's host. Sizes are checked against `fstat` before anything is
/// read. Snapshots are opened with [`crate::SnapshotDir`]; this is the format alone.
pub fn decode<T: DeserializeOwned>(
    f: &mut File,
    path: &Path,
    host: Option<&HostFingerprint>,
) -> Result<(StateFile, T), SnapshotError> {
    let path = path.to_path_buf();
    let actual = f.metadata().map_err(io("stat", &path))?.len();
    let largest = PREFIX_LEN as u64 + MAX_HEADER + MAX_STATE;
    if actual > largest {
        return Err(SnapshotError::TooLarge {
            path,
            what: "state file",
            len: actual,
            max: largest,
        });
    }
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
    let le32 =
        |o: usize| u32::from_le_bytes([prefix[o], prefix[o + 1], prefix[o + 2], prefix[o + 3]]);
    let version = le32(8);
    if version != FORMAT_VERSION {
        return Err(SnapshotError::Version {
            path,
            found: version,
            supported: FORMAT_VERSION,
        });
    }
    let header_len = u64::from(le32(12));
    let state_len = u64::from(le32(16)) | u64::from(le32(20)) << 32;
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
            id: SnapshotId([7; 16]),
            mem_size: 1 << 20,
        }
    }

    fn sample() -> Vec<u8> {
        let vm = Vm {
            regs: (0..64).collect(),
            name: "vm0".into(),
        };
        encode(Path::new("state.bin"), &header(), &vm).unwrap()
    }

    fn read_with<T: DeserializeOwned>(
        path: &Path,
        host: Option<&HostFingerprint>,
    ) -> Result<(StateFile, T), SnapshotError> {
        let mut f = File::open(path).unwrap();
        decode(&mut f, path, host)
    }

    fn read(path: &Path) -> Result<(StateFile, Vm), SnapshotError> {
        read_with(path, Some(&HostFingerprint::current(12)))
    }

    #[test]
    fn round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(STATE_FILE);
        std::fs::write(&path, sample()).unwrap();
        let (h, vm) = read(&path).unwrap();
        assert_eq!(h, header());
        assert_eq!(vm.regs.len(), 64);
    }

    #[test]
    fn truncated_flipped_versioned_foreign_and_garbage_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let good = sample();
        let path = dir.path().join(STATE_FILE);
        let put = |b: &[u8]| std::fs::write(&path, b).unwrap();

        for cut in [0, 10, PREFIX_LEN, good.len() - 1] {
            put(&good[..cut]);
            assert!(
                matches!(read(&path), Err(SnapshotError::Truncated { .. })),
                "cut {cut}"
            );
        }
        for i in [PREFIX_LEN, PREFIX_LEN + 20, good.len() - 1] {
            let mut b = good.clone();
            b[i] ^= 0x10;
            put(&b);
            assert!(
                matches!(read(&path), Err(SnapshotError::Checksum { .. })),
                "flip {i}"
            );
        }
        let mut b = good.clone();
        b[8..12].copy_from_slice(&(FORMAT_VERSION + 1).to_le_bytes());
        put(&b);
        let e = read(&path).unwrap_err();
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
        assert!(matches!(read(&path), Err(SnapshotError::BadMagic(_))));
        let mut b = good.clone();
        b[16..24].copy_from_slice(&u64::MAX.to_le_bytes());
        put(&b);
        assert!(matches!(
            read(&path),
            Err(SnapshotError::TooLarge { what: "state", .. })
        ));
        // A file larger than any valid state is refused from its size alone.
        let big = File::create(&path).unwrap();
        big.set_len(PREFIX_LEN as u64 + MAX_HEADER + MAX_STATE + 1)
            .unwrap();
        assert!(matches!(
            read(&path),
            Err(SnapshotError::TooLarge {
                what: "state file",
                ..
            })
        ));

        put(&good);
        let mut other = HostFingerprint::current(12);
        other.kvm_api_version = 13;
        let e = read_with::<Vm>(&path, Some(&other)).unwrap_err();
        assert!(e.to_string().contains("kvm_api_version"), "{e}");
        // Checked bytes that decode to the wrong type are a decode error, not a panic.
        let e = read_with::<(String, Vec<String>, u128)>(&path, None).unwrap_err();
        assert!(
            matches!(e, SnapshotError::Decode { what: "state", .. }),
            "{e}"
        );
    }
}
