//! The working-set file: the guest pages a clone touched first after a restore, in fault order.
//!
//! Layout (little endian): `magic "RUNVWSET" | version u32 | page_size u32 | count u32 |
//! crc32 u32 | count × u64 page offsets` (RAM offsets, as in the memory file). The first clone
//! restored with userfaultfd records it; later clones prefetch those pages in bulk before their
//! vCPUs run (record-and-prefetch, as in REAP). The file is an optimisation: a missing one means
//! "record", a damaged one is refused with an error and ignored by the VMM.

use std::io::Write;
use std::path::{Path, PathBuf};

/// File name inside a snapshot directory.
pub const WORKINGSET_FILE: &str = "workingset.bin";
const MAGIC: &[u8; 8] = b"RUNVWSET";
const VERSION: u32 = 1;
const PREFIX_LEN: usize = 8 + 4 + 4 + 4 + 4;
/// Page granularity of recorded offsets.
pub const PAGE_SIZE: u64 = 4096;

/// Why a working-set file was refused.
#[derive(Debug, thiserror::Error)]
pub enum WorkingSetError {
    /// Reading or writing failed.
    #[error("{op} {path}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The file.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// The content is not a valid working set for this snapshot.
    #[error("{path}: {why}; delete it and a clone will record a new one")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
}

/// Reads the working set of the snapshot in `dir`; `Ok(None)` when none was recorded.
/// Every offset is checked to be page aligned and inside `mem_size`.
pub fn read(dir: &Path, mem_size: u64) -> Result<Option<Vec<u64>>, WorkingSetError> {
    let path = dir.join(WORKINGSET_FILE);
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(WorkingSetError::Io {
                op: "reading",
                path,
                source,
            })
        }
    };
    let invalid = |why: String| WorkingSetError::Invalid {
        path: path.clone(),
        why,
    };
    if bytes.len() < PREFIX_LEN || &bytes[..8] != MAGIC {
        return Err(invalid("not a runv working-set file".into()));
    }
    let u32_at =
        |o: usize| u32::from_le_bytes([bytes[o], bytes[o + 1], bytes[o + 2], bytes[o + 3]]);
    let (version, page, count, crc) = (u32_at(8), u32_at(12), u32_at(16), u32_at(20));
    if version != VERSION {
        return Err(invalid(format!("version {version}, expected {VERSION}")));
    }
    if u64::from(page) != PAGE_SIZE {
        return Err(invalid(format!("page size {page}, expected {PAGE_SIZE}")));
    }
    let body = &bytes[PREFIX_LEN..];
    if body.len() as u64 != u64::from(count) * 8 {
        return Err(invalid(format!(
            "{} bytes of offsets for {count} pages (truncated?)",
            body.len()
        )));
    }
    if crc32fast::hash(body) != crc {
        return Err(invalid("checksum mismatch (corrupted)".into()));
    }
    let mut pages = Vec::with_capacity(count as usize);
    for chunk in body.chunks_exact(8) {
        let mut b = [0u8; 8];
        b.copy_from_slice(chunk);
        let off = u64::from_le_bytes(b);
        if off % PAGE_SIZE != 0 || off >= mem_size {
            return Err(invalid(format!(
                "page offset {off:#x} is unaligned or beyond the {mem_size:#x}-byte RAM"
            )));
        }
        pages.push(off);
    }
    Ok(Some(pages))
}

/// Writes `pages` as the working set of `dir`, unless one exists already (the first recording
/// wins; concurrent clones never tear the file: it is written aside and linked into place).
/// Returns whether this call created it.
pub fn write_if_absent(dir: &Path, pages: &[u64]) -> Result<bool, WorkingSetError> {
    let path = dir.join(WORKINGSET_FILE);
    let io = |op, source| WorkingSetError::Io {
        op,
        path: path.clone(),
        source,
    };
    let mut body = Vec::with_capacity(pages.len() * 8);
    for p in pages {
        body.extend_from_slice(&p.to_le_bytes());
    }
    let mut out = Vec::with_capacity(PREFIX_LEN + body.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&(PAGE_SIZE as u32).to_le_bytes());
    out.extend_from_slice(&(pages.len() as u32).to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(&body).to_le_bytes());
    out.extend_from_slice(&body);
    let tmp = dir.join(format!(
        ".{WORKINGSET_FILE}.{}.{:?}",
        std::process::id(),
        std::thread::current().id()
    ));
    let result = (|| {
        let mut f = std::fs::File::create(&tmp).map_err(|e| io("creating", e))?;
        f.write_all(&out).map_err(|e| io("writing", e))?;
        f.sync_data().map_err(|e| io("syncing", e))?;
        match std::fs::hard_link(&tmp, &path) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(false),
            Err(e) => Err(io("linking", e)),
        }
    })();
    let _ = std::fs::remove_file(&tmp);
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_first_writer_wins_and_damage_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        assert!(read(dir.path(), 1 << 20).unwrap().is_none());
        assert!(write_if_absent(dir.path(), &[0x3000, 0x1000]).unwrap());
        assert!(!write_if_absent(dir.path(), &[0x5000]).unwrap());
        assert_eq!(
            read(dir.path(), 1 << 20).unwrap().unwrap(),
            vec![0x3000, 0x1000]
        );
        // Beyond a smaller RAM.
        assert!(read(dir.path(), 0x2000).is_err());
        let path = dir.path().join(WORKINGSET_FILE);
        let good = std::fs::read(&path).unwrap();
        let mut flipped = good.clone();
        *flipped.last_mut().unwrap() ^= 1;
        std::fs::write(&path, &flipped).unwrap();
        let e = read(dir.path(), 1 << 20).unwrap_err().to_string();
        assert!(e.contains("checksum"), "{e}");
        std::fs::write(&path, &good[..good.len() - 3]).unwrap();
        let e = read(dir.path(), 1 << 20).unwrap_err().to_string();
        assert!(e.contains("truncated"), "{e}");
        std::fs::write(&path, b"garbage").unwrap();
        assert!(read(dir.path(), 1 << 20).is_err());
    }
}
