//! The memory file: guest RAM as one sparse file, holes where guest pages are zero, followed by
//! one trailer page.
//!
//! Layout: bytes `[0, ram_size)` are guest RAM (RAM offset = file offset); the page at
//! `ram_size` is the trailer: `magic "RUNVMEMT" | format u32 | reserved u32 | snapshot id [16] |
//! ram_size u64 | crc32 u32` (little endian; the CRC covers the bytes before it), the rest of
//! the page zero. The trailer ties the file to its `state.bin`. Restores map or read only
//! `[0, ram_size)`.
//!
//! Writing scans only the data extents of the source (a memfd reports untouched ranges as holes
//! through `SEEK_DATA`/`SEEK_HOLE`), skips zero pages inside them, and coalesces non-zero pages
//! into large writes. Reading back copies only the file's data extents.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::SnapshotId;

/// File name of the memory file inside a snapshot directory.
pub const MEMORY_FILE: &str = "memory.bin";
/// Length of the trailer page after guest RAM.
pub const TRAILER_LEN: u64 = 4096;
const TRAILER_MAGIC: &[u8; 8] = b"RUNVMEMT";
const TRAILER_BYTES: usize = 8 + 4 + 4 + 16 + 8 + 4;
const PAGE: usize = 4096;
const CHUNK: usize = 1 << 20;

/// Error writing or reading a memory file.
#[derive(Debug, thiserror::Error)]
#[error("{op} {path}: {source}{hint}")]
pub struct MemoryFileError {
    op: &'static str,
    path: PathBuf,
    source: std::io::Error,
    hint: &'static str,
}

/// What to do about a failed snapshot write (a write aside never changes the published
/// snapshot).
pub(crate) fn space_hint(e: &std::io::Error) -> &'static str {
    match e.raw_os_error() {
        Some(libc::ENOSPC) | Some(libc::EDQUOT) => {
            " (free space on that file system and take the snapshot again; the previous snapshot there is untouched)"
        }
        _ => "",
    }
}

fn err<'a>(
    op: &'static str,
    path: &'a Path,
) -> impl FnOnce(std::io::Error) -> MemoryFileError + 'a {
    move |source| MemoryFileError {
        op,
        path: path.to_path_buf(),
        source,
        hint: "",
    }
}

/// A failed write into a snapshot's memory temp file.
fn write_err(path: &Path) -> impl FnOnce(std::io::Error) -> MemoryFileError + '_ {
    move |source| MemoryFileError {
        op: "write",
        path: path.to_path_buf(),
        hint: space_hint(&source),
        source,
    }
}

/// What a write or copy moved.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MemoryStats {
    /// Logical size of the memory.
    pub size: u64,
    /// Bytes actually stored or copied (non-zero pages).
    pub data_bytes: u64,
}

/// The `[start, end)` data extents of `file` below `size`, per `SEEK_DATA`/`SEEK_HOLE`.
pub fn data_extents(file: &File, size: u64) -> std::io::Result<Vec<(u64, u64)>> {
    let fd = file.as_raw_fd();
    let mut extents = Vec::new();
    let mut pos: u64 = 0;
    while pos < size {
        // SAFETY: lseek on an fd we own; it only moves that file's offset.
        let data = unsafe { libc::lseek(fd, pos as libc::off_t, libc::SEEK_DATA) };
        if data < 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENXIO) {
                break; // no data after pos
            }
            return Err(e);
        }
        let data = data as u64;
        if data >= size {
            break;
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data as libc::off_t, libc::SEEK_HOLE) };
        if hole < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let end = (hole as u64).min(size);
        extents.push((data, end));
        pos = end;
    }
    Ok(extents)
}

fn is_zero(page: &[u8]) -> bool {
    let (head, words, tail) = {
        // SAFETY: reinterpreting initialised bytes as u64 words is sound for any bit pattern.
        unsafe { page.align_to::<u64>() }
    };
    head.iter().all(|&b| b == 0) && words.iter().all(|&w| w == 0) && tail.iter().all(|&b| b == 0)
}

/// Writes the first `size` bytes of guest RAM, read through `read(offset, buf)` over `extents`,
/// into `out` (a new, empty file named `out_path` in errors), sparse: zero pages stay holes.
pub(crate) fn write_sparse_to(
    out: &File,
    out_path: &Path,
    size: u64,
    extents: &[(u64, u64)],
    read: impl Fn(u64, &mut [u8]) -> std::io::Result<()>,
) -> Result<MemoryStats, MemoryFileError> {
    let src_name = Path::new("guest memory");
    let mut stats = MemoryStats {
        size,
        data_bytes: 0,
    };
    let mut buf = vec![0u8; CHUNK];
    for &(start, end) in extents {
        let (start, end) = (start.min(size), end.min(size));
        let mut off = start;
        while off < end {
            let n = ((end - off) as usize).min(CHUNK);
            read(off, &mut buf[..n]).map_err(err("read", src_name))?;
            // Coalesce runs of non-zero pages into one write.
            let mut run: Option<usize> = None;
            for p in (0..n).step_by(PAGE) {
                let page_end = (p + PAGE).min(n);
                let zero = is_zero(&buf[p..page_end]);
                match (zero, run) {
                    (false, None) => run = Some(p),
                    (true, Some(r)) => {
                        out.write_all_at(&buf[r..p], off + r as u64)
                            .map_err(write_err(out_path))?;
                        stats.data_bytes += (p - r) as u64;
                        run = None;
                    }
                    _ => {}
                }
            }
            if let Some(r) = run {
                out.write_all_at(&buf[r..n], off + r as u64)
                    .map_err(write_err(out_path))?;
                stats.data_bytes += (n - r) as u64;
            }
            off += n as u64;
        }
    }
    Ok(stats)
}

/// The trailer page's content: which snapshot the memory file belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Trailer {
    pub(crate) id: SnapshotId,
    pub(crate) ram_size: u64,
}

impl Trailer {
    pub(crate) fn encode(&self) -> [u8; TRAILER_BYTES] {
        let mut b = [0u8; TRAILER_BYTES];
        b[..8].copy_from_slice(TRAILER_MAGIC);
        b[8..12].copy_from_slice(&crate::FORMAT_VERSION.to_le_bytes());
        b[16..32].copy_from_slice(&self.id.0);
        b[32..40].copy_from_slice(&self.ram_size.to_le_bytes());
        let crc = crc32fast::hash(&b[..40]);
        b[40..44].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// Reads the trailer at the end of `file` (`len` bytes long).
    pub(crate) fn read(file: &File, len: u64) -> Result<Self, String> {
        if len < TRAILER_LEN {
            return Err(format!(
                "{len} bytes, shorter than its {TRAILER_LEN}-byte trailer"
            ));
        }
        let mut b = [0u8; TRAILER_BYTES];
        file.read_exact_at(&mut b, len - TRAILER_LEN)
            .map_err(|e| format!("reading the trailer: {e}"))?;
        if &b[..8] != TRAILER_MAGIC {
            return Err(format!(
                "no snapshot trailer in its last {TRAILER_LEN} bytes ({len} bytes long)"
            ));
        }
        let le32 = |o: usize| u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
        let stored = le32(40);
        let computed = crc32fast::hash(&b[..40]);
        if stored != computed {
            return Err(format!(
                "trailer checksum mismatch (stored {stored:#010x}, computed {computed:#010x})"
            ));
        }
        let version = le32(8);
        if version != crate::FORMAT_VERSION {
            return Err(format!(
                "trailer format version {version}, this runv reads {}",
                crate::FORMAT_VERSION
            ));
        }
        let mut id = [0u8; 16];
        id.copy_from_slice(&b[16..32]);
        let ram_size = u64::from(le32(32)) | u64::from(le32(36)) << 32;
        Ok(Self {
            id: SnapshotId(id),
            ram_size,
        })
    }
}

/// Copies the data extents of `[0, size)` of the memory file `src` (opened from `path`, named in
/// errors) into `dst` (fresh, zeroed guest RAM): the `copy` restore mode. The trailer after
/// `size` is never copied.
pub fn copy_from(
    src: &File,
    path: &Path,
    dst: &File,
    size: u64,
) -> Result<MemoryStats, MemoryFileError> {
    let mut stats = MemoryStats {
        size,
        data_bytes: 0,
    };
    let mut buf = vec![0u8; CHUNK];
    for (start, end) in data_extents(src, size).map_err(err("scan", path))? {
        let mut off = start;
        while off < end {
            let n = ((end - off) as usize).min(CHUNK);
            src.read_exact_at(&mut buf[..n], off)
                .map_err(err("read", path))?;
            dst.write_all_at(&buf[..n], off)
                .map_err(err("write", Path::new("guest memory")))?;
            stats.data_bytes += n as u64;
            off += n as u64;
        }
    }
    Ok(stats)
}
