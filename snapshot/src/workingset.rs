//! The working-set file: the guest pages a clone touched first after a restore, in fault order.
//!
//! Layout (little endian): `magic "RUNVWSET" | version u32 | page_size u32 | snapshot id [16] |
//! count u32 | crc32 u32 | count × u64 page offsets` (RAM offsets, as in the memory file; the CRC
//! covers everything before it and the offsets). The first clone restored with userfaultfd that
//! records for its whole window publishes it; later clones prefetch those pages in bulk before
//! their vCPUs run (record-and-prefetch, as in REAP). A working set belongs to one snapshot id: a
//! file of another id is stale (left by an earlier snapshot in the same directory) and is
//! ignored and replaced by the next complete recording. The file is an optimisation: a missing
//! or stale one means "record", a damaged one is refused with an error and ignored by the VMM.
//! Files are read and published through [`SnapshotDir`](crate::SnapshotDir).

use std::path::PathBuf;

use crate::SnapshotId;

/// File name inside a snapshot directory.
pub const WORKINGSET_FILE: &str = "workingset.bin";
const MAGIC: &[u8; 8] = b"RUNVWSET";
const VERSION: u32 = 2;
const PREFIX_LEN: usize = 8 + 4 + 4 + 16 + 4 + 4;
/// Most pages a working set may hold (bounds the file read before it is checked).
pub const MAX_PAGES: u64 = 1 << 20;
/// Largest working-set file accepted.
pub(crate) const MAX_FILE: u64 = PREFIX_LEN as u64 + MAX_PAGES * 8;
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

/// What a working-set file holds, once checked.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Decoded {
    /// The set of the expected snapshot.
    Set(Vec<u64>),
    /// A valid set of another snapshot (stale).
    Stale(SnapshotId),
}

/// Encodes `pages` as the working set of snapshot `id`.
pub(crate) fn encode(id: SnapshotId, pages: &[u64]) -> Vec<u8> {
    let mut out = Vec::with_capacity(PREFIX_LEN + pages.len() * 8);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&(PAGE_SIZE as u32).to_le_bytes());
    out.extend_from_slice(&id.0);
    out.extend_from_slice(&(pages.len() as u32).to_le_bytes());
    let mut crc = crc32fast::Hasher::new();
    crc.update(&out);
    let mut body = Vec::with_capacity(pages.len() * 8);
    for p in pages {
        body.extend_from_slice(&p.to_le_bytes());
    }
    crc.update(&body);
    out.extend_from_slice(&crc.finalize().to_le_bytes());
    out.extend_from_slice(&body);
    out
}

/// Checks the bytes of a working-set file (read from `path`) against snapshot `id` and its
/// `mem_size`-byte RAM: every offset must be page aligned and inside RAM.
pub(crate) fn decode(
    bytes: &[u8],
    path: &std::path::Path,
    id: SnapshotId,
    mem_size: u64,
) -> Result<Decoded, WorkingSetError> {
    let invalid = |why: String| WorkingSetError::Invalid {
        path: path.to_path_buf(),
        why,
    };
    if bytes.len() < PREFIX_LEN || &bytes[..8] != MAGIC {
        return Err(invalid("not a runv working-set file".into()));
    }
    let u32_at =
        |o: usize| u32::from_le_bytes([bytes[o], bytes[o + 1], bytes[o + 2], bytes[o + 3]]);
    let (version, page) = (u32_at(8), u32_at(12));
    if version != VERSION {
        return Err(invalid(format!("version {version}, expected {VERSION}")));
    }
    if u64::from(page) != PAGE_SIZE {
        return Err(invalid(format!("page size {page}, expected {PAGE_SIZE}")));
    }
    let mut file_id = [0u8; 16];
    file_id.copy_from_slice(&bytes[16..32]);
    let (count, stored) = (u32_at(32), u32_at(36));
    let body = &bytes[PREFIX_LEN..];
    if body.len() as u64 != u64::from(count) * 8 {
        return Err(invalid(format!(
            "{} bytes of offsets for {count} pages (truncated?)",
            body.len()
        )));
    }
    let mut crc = crc32fast::Hasher::new();
    crc.update(&bytes[..36]);
    crc.update(body);
    if crc.finalize() != stored {
        return Err(invalid("checksum mismatch (corrupted)".into()));
    }
    let file_id = SnapshotId(file_id);
    if file_id != id {
        return Ok(Decoded::Stale(file_id));
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
    Ok(Decoded::Set(pages))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn round_trip_stale_and_damage_are_told_apart() {
        let (id, other) = (SnapshotId([1; 16]), SnapshotId([2; 16]));
        let p = Path::new("workingset.bin");
        let good = encode(id, &[0x3000, 0x1000]);
        assert_eq!(
            decode(&good, p, id, 1 << 20).unwrap(),
            Decoded::Set(vec![0x3000, 0x1000])
        );
        assert_eq!(
            decode(&good, p, other, 1 << 20).unwrap(),
            Decoded::Stale(id)
        );
        // Beyond a smaller RAM.
        assert!(decode(&good, p, id, 0x2000).is_err());
        let mut flipped = good.clone();
        *flipped.last_mut().unwrap() ^= 1;
        let e = decode(&flipped, p, id, 1 << 20).unwrap_err().to_string();
        assert!(e.contains("checksum"), "{e}");
        // A flipped id byte is damage, not staleness.
        let mut flipped = good.clone();
        flipped[20] ^= 1;
        let e = decode(&flipped, p, id, 1 << 20).unwrap_err().to_string();
        assert!(e.contains("checksum"), "{e}");
        let e = decode(&good[..good.len() - 3], p, id, 1 << 20)
            .unwrap_err()
            .to_string();
        assert!(e.contains("truncated"), "{e}");
        let e = decode(b"garbage", p, id, 1 << 20).unwrap_err().to_string();
        assert!(e.contains("delete it"), "{e}");
        let mut v1 = good.clone();
        v1[8..12].copy_from_slice(&1u32.to_le_bytes());
        assert!(decode(&v1, p, id, 1 << 20).is_err());
    }
}
