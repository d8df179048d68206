//! The memory file: guest RAM as one sparse file, holes where guest pages are zero.
//!
//! Writing scans only the data extents of the source (a memfd reports untouched ranges as holes
//! through `SEEK_DATA`/`SEEK_HOLE`), skips zero pages inside them, and coalesces non-zero pages
//! into large writes. Reading back copies only the file's data extents.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// File name of the memory file inside a snapshot directory.
pub const MEMORY_FILE: &str = "memory.bin";
const PAGE: usize = 4096;
const CHUNK: usize = 1 << 20;

/// Error writing or reading a memory file.
#[derive(Debug, thiserror::Error)]
#[error("{op} {path}: {source}")]
pub struct MemoryFileError {
    op: &'static str,
    path: PathBuf,
    source: std::io::Error,
}

fn err<'a>(
    op: &'static str,
    path: &'a Path,
) -> impl FnOnce(std::io::Error) -> MemoryFileError + 'a {
    move |source| MemoryFileError {
        op,
        path: path.to_path_buf(),
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

/// Writes the first `size` bytes of `src` (guest RAM, e.g. its memfd) to `dir/memory.bin`,
/// sparse: zero pages become holes. Only the file's data extents are read.
pub fn write_sparse(src: &File, size: u64, dir: &Path) -> Result<MemoryStats, MemoryFileError> {
    let extents = data_extents(src, size).map_err(err("scan", Path::new("guest memory")))?;
    write_sparse_with(size, &extents, dir, |off, buf| src.read_exact_at(buf, off))
}

/// Like [`write_sparse`], reading guest RAM through `read(offset, buf)` over `extents` (for RAM
/// that is not a plain file, such as a copy-on-write clone's private mapping).
pub fn write_sparse_with(
    size: u64,
    extents: &[(u64, u64)],
    dir: &Path,
    read: impl Fn(u64, &mut [u8]) -> std::io::Result<()>,
) -> Result<MemoryStats, MemoryFileError> {
    let path = dir.join(MEMORY_FILE);
    let src_name = Path::new("guest memory");
    let out = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .map_err(err("create", &path))?;
    out.set_len(size).map_err(err("size", &path))?;
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
                            .map_err(err("write", &path))?;
                        stats.data_bytes += (p - r) as u64;
                        run = None;
                    }
                    _ => {}
                }
            }
            if let Some(r) = run {
                out.write_all_at(&buf[r..n], off + r as u64)
                    .map_err(err("write", &path))?;
                stats.data_bytes += (n - r) as u64;
            }
            off += n as u64;
        }
    }
    out.sync_all().map_err(err("fsync", &path))?;
    Ok(stats)
}

/// Copies the data extents of `dir/memory.bin` into `dst` (fresh, zeroed guest RAM): the `copy`
/// restore mode.
pub fn copy_into(dir: &Path, dst: &File) -> Result<MemoryStats, MemoryFileError> {
    let path = dir.join(MEMORY_FILE);
    let src = File::open(&path).map_err(err("open", &path))?;
    copy_from(&src, &path, dst)
}

/// Copies the data extents of the memory file `src` (opened from `path`, named in errors) into
/// `dst`.
pub fn copy_from(src: &File, path: &Path, dst: &File) -> Result<MemoryStats, MemoryFileError> {
    let size = src.metadata().map_err(err("stat", path))?.len();
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::FromRawFd;
    use std::os::unix::fs::MetadataExt;

    fn memfd(size: u64) -> File {
        // SAFETY: valid NUL-terminated name; the fd is checked and then owned.
        let fd = unsafe { libc::memfd_create(c"test".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: fresh fd owned by nobody else.
        let f = unsafe { File::from_raw_fd(fd) };
        f.set_len(size).unwrap();
        f
    }

    #[test]
    fn sparse_write_and_copy_round_trip() {
        let size = 64u64 << 20;
        let ram = memfd(size);
        // A few non-zero pages, one zero page written explicitly (data, but zero), a tail page.
        ram.write_all_at(&[0xab; 3 * PAGE], 0x10_0000).unwrap();
        ram.write_all_at(&[0; PAGE], 0x20_0000).unwrap();
        ram.write_all_at(&[7; 100], size - 100).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let stats = write_sparse(&ram, size, dir.path()).unwrap();
        assert_eq!(stats.size, size);
        assert_eq!(stats.data_bytes, 4 * PAGE as u64);
        let meta = std::fs::metadata(dir.path().join(MEMORY_FILE)).unwrap();
        assert_eq!(meta.len(), size);
        assert!(
            meta.blocks() * 512 <= 64 * 1024,
            "file is sparse ({} blocks)",
            meta.blocks()
        );

        let copy = memfd(size);
        let c = copy_into(dir.path(), &copy).unwrap();
        assert_eq!(c.data_bytes, 4 * PAGE as u64);
        let mut a = vec![0u8; size as usize];
        let mut b = vec![0u8; size as usize];
        ram.read_exact_at(&mut a, 0).unwrap();
        copy.read_exact_at(&mut b, 0).unwrap();
        assert!(a == b, "restored memory differs");
    }

    #[test]
    fn missing_memory_file_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let e = copy_into(dir.path(), &memfd(4096)).unwrap_err().to_string();
        assert!(e.contains("open") && e.contains(MEMORY_FILE), "{e}");
    }
}
