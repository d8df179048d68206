//! A snapshot directory: [`SnapshotWriter`] publishes one, [`SnapshotDir`] opens one.
//!
//! A snapshot is published so that a directory always holds one complete snapshot or is refused:
//! guest memory is written to a new temp file (with the snapshot id in its trailer) and fsynced,
//! the state file likewise, then the memory file is renamed to `memory.bin`, the state file to
//! `state.bin`, and the directory is fsynced. No file a live mapping may use is ever modified:
//! clones that map the previous `memory.bin` keep its inode. A crash between the two renames
//! leaves a `memory.bin` whose id differs from `state.bin`'s, which [`SnapshotDir::open`] refuses.

use std::fmt;
use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::fsutil::{self, Dir, OpenError};
use crate::memory::{self, MemoryStats, Trailer, MEMORY_FILE, TRAILER_LEN};
use crate::state::{self, io, SnapshotError, StateFile, STATE_FILE};
use crate::workingset::{self, Decoded, WorkingSetError, WORKINGSET_FILE};
use crate::HostFingerprint;

/// The random 128-bit id of one snapshot, shared by its state, memory and working-set files.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct SnapshotId(pub [u8; 16]);

impl SnapshotId {
    /// A new random id (from the kernel's random source).
    pub fn random() -> std::io::Result<Self> {
        fsutil::random_bytes().map(Self)
    }
}

impl fmt::Display for SnapshotId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&fsutil::hex(&self.0))
    }
}

impl fmt::Debug for SnapshotId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SnapshotId({self})")
    }
}

fn open_err(path: PathBuf) -> impl FnOnce(OpenError) -> SnapshotError {
    move |e| match e {
        OpenError::Io(source) => SnapshotError::Io {
            op: "open",
            path,
            source,
        },
        OpenError::NotRegular(kind) => SnapshotError::NotRegular { path, kind },
    }
}

#[derive(Debug)]
struct Inner {
    dir: Dir,
    header: StateFile,
    memory: Arc<File>,
    memory_path: PathBuf,
}

/// An opened, checked snapshot directory: its header, its memory file (held open) and its
/// working set. Cheap to clone (shared).
#[derive(Debug, Clone)]
pub struct SnapshotDir {
    inner: Arc<Inner>,
}

impl SnapshotDir {
    /// Opens the snapshot in `dir`: reads and checks `state.bin` (format, size, checksum, host
    /// when `host` is given) and decodes its state, opens `memory.bin` and checks that its
    /// trailer carries the same snapshot id and that it is exactly RAM + trailer long. Neither
    /// file may be a symlink or anything but a regular file.
    pub fn open<S: DeserializeOwned>(
        dir: &Path,
        host: Option<&HostFingerprint>,
    ) -> Result<(Self, S), SnapshotError> {
        let d = Dir::open(dir, false).map_err(io("open the snapshot directory", dir))?;
        let state_path = d.join(STATE_FILE);
        let mut sf = d
            .open_regular(STATE_FILE)
            .map_err(open_err(state_path.clone()))?;
        let (header, state) = state::decode::<S>(&mut sf, &state_path, host)?;
        let memory_path = d.join(MEMORY_FILE);
        let mf = d
            .open_regular(MEMORY_FILE)
            .map_err(open_err(memory_path.clone()))?;
        let len = mf.metadata().map_err(io("stat", &memory_path))?.len();
        let bad = |why: String| SnapshotError::Memory {
            path: memory_path.clone(),
            why,
        };
        let trailer = Trailer::read(&mf, len).map_err(bad)?;
        if trailer.id != header.id {
            return Err(SnapshotError::IdMismatch {
                path: memory_path,
                memory: trailer.id,
                state: header.id,
            });
        }
        let expected = header.mem_size.checked_add(TRAILER_LEN);
        if trailer.ram_size != header.mem_size || expected != Some(len) {
            return Err(bad(format!(
                "{len} bytes with a trailer for {} bytes of RAM; state.bin says {} bytes of RAM",
                trailer.ram_size, header.mem_size
            )));
        }
        let snap = Self {
            inner: Arc::new(Inner {
                dir: d,
                header,
                memory: Arc::new(mf),
                memory_path,
            }),
        };
        Ok((snap, state))
    }

    /// The directory's path as opened.
    pub fn path(&self) -> &Path {
        self.inner.dir.path()
    }

    /// The snapshot's id.
    pub fn id(&self) -> SnapshotId {
        self.inner.header.id
    }

    /// The state file's header (producer, host, id, RAM size).
    pub fn header(&self) -> &StateFile {
        &self.inner.header
    }

    /// Guest RAM size in bytes: `memory()` holds RAM in `[0, mem_size)`.
    pub fn mem_size(&self) -> u64 {
        self.inner.header.mem_size
    }

    /// The memory file, held open: later renames in the directory do not change what it reads.
    pub fn memory(&self) -> &Arc<File> {
        &self.inner.memory
    }

    /// The memory file's path (for messages).
    pub fn memory_path(&self) -> &Path {
        &self.inner.memory_path
    }

    /// Whether `path` is this snapshot's directory (same device and inode), e.g. to refuse a
    /// snapshot of a clone into the directory that backs it.
    pub fn is_same_dir(&self, path: &Path) -> std::io::Result<bool> {
        self.inner.dir.is_same(path)
    }

    /// The working set recorded for this snapshot: `Ok(None)` when there is none or only a stale
    /// one of another snapshot; an error when the file is damaged or not a regular file.
    pub fn working_set(&self) -> Result<Option<Vec<u64>>, WorkingSetError> {
        let path = self.inner.dir.join(WORKINGSET_FILE);
        let ioe = |op, source| WorkingSetError::Io {
            op,
            path: path.clone(),
            source,
        };
        let mut f = match self.inner.dir.open_regular(WORKINGSET_FILE) {
            Ok(f) => f,
            Err(OpenError::Io(e)) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(OpenError::Io(e)) => return Err(ioe("opening", e)),
            Err(OpenError::NotRegular(kind)) => {
                return Err(WorkingSetError::Invalid {
                    path: path.clone(),
                    why: format!("a {kind}, not a regular file"),
                })
            }
        };
        let len = f.metadata().map_err(|e| ioe("reading", e))?.len();
        if len > workingset::MAX_FILE {
            return Err(WorkingSetError::Invalid {
                path,
                why: format!("{len} bytes, more than a working set can hold"),
            });
        }
        let mut bytes = Vec::with_capacity(len as usize);
        f.read_to_end(&mut bytes).map_err(|e| ioe("reading", e))?;
        match workingset::decode(&bytes, &path, self.id(), self.mem_size())? {
            Decoded::Set(pages) => Ok(Some(pages)),
            Decoded::Stale(other) => {
                tracing::debug!(
                    path = %path.display(),
                    "working set of another snapshot ({other}, this is {}); ignored",
                    self.id()
                );
                Ok(None)
            }
        }
    }

    /// Publishes `pages` as this snapshot's working set. The first recording for this id wins
    /// (returns false when one exists); a stale or damaged file is replaced atomically. The file
    /// is written aside and linked or renamed into place, so readers never see it torn.
    pub fn publish_working_set(&self, pages: &[u64]) -> Result<bool, WorkingSetError> {
        let dir = &self.inner.dir;
        let path = dir.join(WORKINGSET_FILE);
        if pages.len() as u64 > workingset::MAX_PAGES {
            return Err(WorkingSetError::Invalid {
                path,
                why: format!(
                    "{} pages, more than the {} a working set holds",
                    pages.len(),
                    workingset::MAX_PAGES
                ),
            });
        }
        let ioe = |op, source| WorkingSetError::Io {
            op,
            path: path.clone(),
            source,
        };
        let (mut f, tmp) = dir
            .create_temp(WORKINGSET_FILE)
            .map_err(|e| ioe("creating a temp file for", e))?;
        let result = (|| {
            f.write_all(&workingset::encode(self.id(), pages))
                .map_err(|e| ioe("writing", e))?;
            f.sync_data().map_err(|e| ioe("syncing", e))?;
            match dir.link(&tmp, WORKINGSET_FILE) {
                Ok(()) => return Ok(true),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(ioe("linking", e)),
            }
            match self.working_set() {
                Ok(Some(_)) => Ok(false),
                Ok(None) | Err(_) => {
                    dir.rename(&tmp, WORKINGSET_FILE)
                        .map_err(|e| ioe("replacing", e))?;
                    Ok(true)
                }
            }
        })();
        let _ = dir.unlink(&tmp);
        result
    }
}

/// Temp files of a writer that was killed are removed by the next writer once they are this old
/// (a live writer keeps its temp files for the few seconds a snapshot takes).
pub const STALE_TEMP_AGE: std::time::Duration = std::time::Duration::from_secs(10 * 60);

/// Whether `name` is a temp file of a [`SnapshotWriter`] or a working-set publication:
/// `.{file}.{16 hex digits}.tmp`.
fn is_temp_name(name: &str) -> bool {
    [MEMORY_FILE, STATE_FILE, WORKINGSET_FILE]
        .iter()
        .any(|base| {
            name.strip_prefix('.')
                .and_then(|n| n.strip_prefix(base))
                .and_then(|n| n.strip_prefix('.'))
                .and_then(|n| n.strip_suffix(".tmp"))
                .is_some_and(|r| r.len() == 16 && r.bytes().all(|b| b.is_ascii_hexdigit()))
        })
}

/// Removes temp files older than [`STALE_TEMP_AGE`] from `dir` (left by a killed writer);
/// best effort.
fn remove_stale_temps(dir: &Dir) {
    let Ok(entries) = std::fs::read_dir(dir.path()) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(name) = name.to_str().filter(|n| is_temp_name(n)) else {
            continue;
        };
        // DirEntry::metadata does not follow symlinks.
        let stale = entry.metadata().is_ok_and(|m| {
            m.is_file()
                && m.modified()
                    .ok()
                    .and_then(|t| t.elapsed().ok())
                    .is_some_and(|age| age > STALE_TEMP_AGE)
        });
        if stale {
            match dir.unlink(name) {
                Ok(()) => tracing::debug!(name, "removed a stale snapshot temp file"),
                Err(e) => tracing::debug!(name, "removing a stale snapshot temp file: {e}"),
            }
        }
    }
}

/// Writes one snapshot into a directory; nothing in the directory changes until
/// [`commit`](SnapshotWriter::commit). Dropping an uncommitted writer removes its temp files.
#[derive(Debug)]
pub struct SnapshotWriter {
    dir: Dir,
    id: SnapshotId,
    /// Temp name and RAM size of the written memory file.
    memory: Option<(String, u64)>,
    /// Temp files to remove on drop.
    temps: Vec<String>,
}

impl SnapshotWriter {
    /// Starts a snapshot into `dir`, which must exist and be a real directory (not a symlink).
    /// Temp files that a killed writer left there more than [`STALE_TEMP_AGE`] ago are removed.
    pub fn create(dir: &Path) -> Result<Self, SnapshotError> {
        let not_dir = |why| SnapshotError::NotADirectory {
            path: dir.to_path_buf(),
            why,
        };
        let meta = std::fs::symlink_metadata(dir).map_err(io("stat", dir))?;
        if meta.file_type().is_symlink() {
            return Err(not_dir("a symbolic link"));
        }
        if !meta.is_dir() {
            return Err(not_dir("not a directory"));
        }
        let d = Dir::open(dir, true).map_err(io("open the snapshot directory", dir))?;
        let id = SnapshotId::random().map_err(io("generate a snapshot id for", dir))?;
        remove_stale_temps(&d);
        Ok(Self {
            dir: d,
            id,
            memory: None,
            temps: Vec::new(),
        })
    }

    /// The id the snapshot will have.
    pub fn id(&self) -> SnapshotId {
        self.id
    }

    /// Whether `path` is the directory being written (same device and inode).
    pub fn is_same_dir(&self, path: &Path) -> std::io::Result<bool> {
        self.dir.is_same(path)
    }

    /// Writes the first `size` bytes of `src` (guest RAM, e.g. its memfd) as the memory file,
    /// sparse: only the file's data extents are read and zero pages become holes.
    pub fn write_memory(&mut self, src: &File, size: u64) -> Result<MemoryStats, SnapshotError> {
        let extents =
            memory::data_extents(src, size).map_err(io("scan", Path::new("guest memory")))?;
        self.write_memory_with(size, &extents, |off, buf| src.read_exact_at(buf, off))
    }

    /// Like [`write_memory`](Self::write_memory), reading guest RAM through `read(offset, buf)`
    /// over `extents` (for RAM that is not a plain file, such as a copy-on-write clone's private
    /// mapping). Writing memory again replaces what an earlier call wrote.
    pub fn write_memory_with(
        &mut self,
        size: u64,
        extents: &[(u64, u64)],
        read: impl Fn(u64, &mut [u8]) -> std::io::Result<()>,
    ) -> Result<MemoryStats, SnapshotError> {
        if let Some((old, _)) = self.memory.take() {
            self.remove_temp(&old);
        }
        let (out, tmp) = self
            .dir
            .create_temp(MEMORY_FILE)
            .map_err(io("create a temp file in", self.dir.path()))?;
        self.temps.push(tmp.clone());
        let path = self.dir.join(&tmp);
        let total = size
            .checked_add(TRAILER_LEN)
            .ok_or_else(|| SnapshotError::Memory {
                path: path.clone(),
                why: format!("RAM size {size} is too large"),
            })?;
        out.set_len(total).map_err(io("size", &path))?;
        let stats = memory::write_sparse_to(&out, &path, size, extents, read)?;
        let trailer = Trailer {
            id: self.id,
            ram_size: size,
        };
        out.write_all_at(&trailer.encode(), size)
            .map_err(io("write the trailer of", &path))?;
        out.sync_all().map_err(io("fsync", &path))?;
        self.memory = Some((tmp, size));
        Ok(stats)
    }

    /// Publishes the snapshot: writes the state file (header from `producer_version`, `host`,
    /// this id and the RAM size; then `state`) aside and fsyncs it, renames the memory file to
    /// `memory.bin` and the state file to `state.bin`, fsyncs the directory and removes a stale
    /// `workingset.bin`. On error nothing published is changed and the temp files are removed
    /// (except after a failed rename, which leaves a snapshot that opens as interrupted).
    pub fn commit<S: Serialize>(
        mut self,
        producer_version: &str,
        host: HostFingerprint,
        state: &S,
    ) -> Result<SnapshotId, SnapshotError> {
        let Some((mem_tmp, mem_size)) = self.memory.clone() else {
            return Err(SnapshotError::NoMemory(self.dir.path().to_path_buf()));
        };
        let header = StateFile {
            producer_version: producer_version.into(),
            host,
            id: self.id,
            mem_size,
        };
        let state_path = self.dir.join(STATE_FILE);
        let bytes = state::encode(&state_path, &header, state)?;
        let (mut f, state_tmp) = self
            .dir
            .create_temp(STATE_FILE)
            .map_err(io("create a temp file in", self.dir.path()))?;
        self.temps.push(state_tmp.clone());
        let tmp_path = self.dir.join(&state_tmp);
        f.write_all(&bytes).map_err(io("write", &tmp_path))?;
        f.sync_all().map_err(io("fsync", &tmp_path))?;
        let mem_path = self.dir.join(MEMORY_FILE);
        self.dir
            .rename(&mem_tmp, MEMORY_FILE)
            .map_err(io("rename into place", &mem_path))?;
        self.temps.retain(|t| *t != mem_tmp);
        self.dir
            .rename(&state_tmp, STATE_FILE)
            .map_err(io("rename into place", &state_path))?;
        self.temps.retain(|t| *t != state_tmp);
        self.dir
            .sync()
            .map_err(io("fsync the directory", self.dir.path()))?;
        match self.dir.unlink(WORKINGSET_FILE) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            // Harmless: a working set of another id is ignored and replaced.
            Err(e) => tracing::debug!("removing the previous working set: {e}"),
        }
        Ok(self.id)
    }

    fn remove_temp(&mut self, name: &str) {
        let _ = self.dir.unlink(name);
        self.temps.retain(|t| t != name);
    }
}

impl Drop for SnapshotWriter {
    fn drop(&mut self) {
        for t in std::mem::take(&mut self.temps) {
            let _ = self.dir.unlink(&t);
        }
    }
}

#[cfg(test)]
mod tests {
    //! Every test works on real files: tempdirs on disk and on tmpfs (`/dev/shm`), a real tmpfs
    //! mount for ENOSPC, real symlinks, FIFOs and `MAP_PRIVATE` mappings.
    use super::*;
    use std::os::fd::{AsRawFd, FromRawFd};
    use std::os::unix::fs::MetadataExt;
    use std::time::Duration;

    const SIZE: u64 = 4 << 20;
    const PAGE: u64 = 4096;

    fn memfd(size: u64) -> File {
        // SAFETY: valid NUL-terminated name; the fd is checked and then owned.
        let fd = unsafe { libc::memfd_create(c"test".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: fresh fd owned by nobody else.
        let f = unsafe { File::from_raw_fd(fd) };
        f.set_len(size).unwrap();
        f
    }

    /// Guest RAM of `size` bytes with `pages` pages of `fill` from 1 MiB on, one tail byte.
    fn ram(size: u64, fill: u8, pages: u64) -> File {
        let ram = memfd(size);
        ram.write_all_at(&vec![fill; (pages * PAGE) as usize], 1 << 20)
            .unwrap();
        ram.write_all_at(&[fill ^ 0xff; 100], size - 100).unwrap();
        ram
    }

    fn take(dir: &Path, ram: &File, size: u64, state: &str) -> Result<SnapshotId, SnapshotError> {
        let mut w = SnapshotWriter::create(dir)?;
        w.write_memory(ram, size)?;
        w.commit("test", HostFingerprint::current(12), &state.to_string())
    }

    fn open(dir: &Path) -> Result<(SnapshotDir, String), SnapshotError> {
        SnapshotDir::open(dir, Some(&HostFingerprint::current(12)))
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    fn all_bytes(f: &File, size: u64) -> Vec<u8> {
        let mut b = vec![0u8; size as usize];
        f.read_exact_at(&mut b, 0).unwrap();
        b
    }

    /// Runs `f` on another thread; fails the test if it does not return within 5 s (a FIFO
    /// that blocks an open would otherwise hang the test).
    fn promptly<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(f());
        });
        rx.recv_timeout(Duration::from_secs(5))
            .expect("blocked on a FIFO instead of refusing it")
    }

    #[test]
    fn round_trip_is_sparse_tied_by_id_and_leaves_no_temp_files() {
        for base in ["/dev/shm", env!("CARGO_MANIFEST_DIR")] {
            let dir = tempfile::tempdir_in(base).unwrap();
            let src = ram(SIZE, 0xab, 3);
            // A page written explicitly with zeros is data in the memfd but stays a hole.
            src.write_all_at(&[0; PAGE as usize], 2 << 20).unwrap();
            let mut w = SnapshotWriter::create(dir.path()).unwrap();
            let id = w.id();
            let stats = w.write_memory(&src, SIZE).unwrap();
            assert_eq!(stats.size, SIZE);
            assert_eq!(stats.data_bytes, 4 * PAGE);
            assert_eq!(names(dir.path()).len(), 1, "only a temp file before commit");
            let committed = w
                .commit("test", HostFingerprint::current(12), &"vm0".to_string())
                .unwrap();
            assert_eq!(committed, id);
            assert_eq!(names(dir.path()), [MEMORY_FILE, STATE_FILE]);

            let (snap, state) = open(dir.path()).unwrap();
            assert_eq!(state, "vm0");
            assert_eq!(snap.id(), id);
            assert_eq!(snap.mem_size(), SIZE);
            assert_eq!(snap.header().producer_version, "test");
            assert_eq!(snap.path(), dir.path());
            assert_eq!(snap.memory_path(), dir.path().join(MEMORY_FILE));
            let meta = snap.memory().metadata().unwrap();
            assert_eq!(meta.len(), SIZE + TRAILER_LEN);
            assert!(
                meta.blocks() * 512 <= 128 * 1024,
                "{base}: file is sparse ({} blocks)",
                meta.blocks()
            );
            assert!(snap.is_same_dir(dir.path()).unwrap());
            assert!(!snap.is_same_dir(Path::new(base)).unwrap());

            // `copy` restore: exactly guest RAM, never the trailer.
            let copy = memfd(SIZE);
            let c = memory::copy_from(snap.memory(), snap.memory_path(), &copy, SIZE).unwrap();
            assert_eq!(c.data_bytes, 4 * PAGE);
            assert_eq!(copy.metadata().unwrap().len(), SIZE);
            assert!(
                all_bytes(&src, SIZE) == all_bytes(&copy, SIZE),
                "restored memory differs"
            );
        }
    }

    #[test]
    fn write_memory_with_reads_through_a_callback_and_commit_needs_memory() {
        let dir = tempfile::tempdir().unwrap();
        let src = ram(SIZE, 0x5a, 2);
        let mut w = SnapshotWriter::create(dir.path()).unwrap();
        // Writing twice replaces the first temp file.
        w.write_memory(&memfd(SIZE), SIZE).unwrap();
        let stats = w
            .write_memory_with(SIZE, &[(0, SIZE)], |off, buf| src.read_exact_at(buf, off))
            .unwrap();
        assert_eq!(stats.data_bytes, 3 * PAGE);
        assert_eq!(names(dir.path()).len(), 1, "{:?}", names(dir.path()));
        w.commit("test", HostFingerprint::current(12), &"x".to_string())
            .unwrap();
        let (snap, _) = open(dir.path()).unwrap();
        let mut got = vec![0u8; SIZE as usize];
        snap.memory().read_exact_at(&mut got, 0).unwrap();
        assert!(got == all_bytes(&src, SIZE));

        let w = SnapshotWriter::create(dir.path()).unwrap();
        let e = w
            .commit("test", HostFingerprint::current(12), &"x".to_string())
            .unwrap_err();
        assert!(matches!(e, SnapshotError::NoMemory(_)), "{e}");
        // The published snapshot is untouched.
        assert_eq!(open(dir.path()).unwrap().0.id(), snap.id());

        // A writer dropped after writing memory (an aborted snapshot) leaves nothing behind.
        let mut w = SnapshotWriter::create(dir.path()).unwrap();
        w.write_memory(&ram(SIZE, 0x77, 8), SIZE).unwrap();
        assert_eq!(names(dir.path()).len(), 3, "{:?}", names(dir.path()));
        drop(w);
        assert_eq!(names(dir.path()), [MEMORY_FILE, STATE_FILE]);
        let (again, state) = open(dir.path()).unwrap();
        assert_eq!((again.id(), state.as_str()), (snap.id(), "x"));
    }

    /// Regression: re-snapshotting truncated `memory.bin` in place, and clones that map it
    /// `MAP_PRIVATE` lost even their private pages (SIGBUS or zeros).
    #[test]
    fn resnapshot_leaves_live_private_mappings_intact() {
        let dir = tempfile::tempdir_in("/dev/shm").unwrap();
        take(dir.path(), &ram(SIZE, 0xaa, 4), SIZE, "a").unwrap();
        let (a, _) = open(dir.path()).unwrap();
        // SAFETY: a fresh private mapping of SIZE bytes of a file at least that long; it is only
        // accessed through `map` below and unmapped at the end of the test.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                SIZE as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE,
                a.memory().as_raw_fd(),
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        // SAFETY: `p` maps SIZE readable, writable bytes until munmap below.
        let map = unsafe { std::slice::from_raw_parts_mut(p as *mut u8, SIZE as usize) };
        let first = 1 << 20;
        map[first] = 0x11; // a private page
        let _ = map[first + PAGE as usize]; // a shared page-cache page, read once

        take(dir.path(), &ram(SIZE, 0xbb, 4), SIZE, "b").unwrap();
        assert_eq!(map[first], 0x11, "the clone's private write survived");
        assert_eq!(map[first + 1], 0xaa);
        assert_eq!(
            map[first + PAGE as usize],
            0xaa,
            "shared page still the old snapshot's"
        );
        assert_eq!(map[first + 3 * PAGE as usize], 0xaa);
        assert_eq!(map[SIZE as usize - 1], 0xaa ^ 0xff);
        // SAFETY: unmaps exactly the mapping created above; `map` is not used afterwards.
        assert_eq!(unsafe { libc::munmap(p, SIZE as usize) }, 0);

        let (b, state) = open(dir.path()).unwrap();
        assert_eq!(state, "b");
        assert_ne!(b.id(), a.id());
        let mut byte = [0u8; 1];
        b.memory().read_exact_at(&mut byte, first as u64).unwrap();
        assert_eq!(byte[0], 0xbb);
        // The old handle still reads the old snapshot.
        a.memory().read_exact_at(&mut byte, first as u64).unwrap();
        assert_eq!(byte[0], 0xaa);
    }

    /// Unmounts a tmpfs mounted for a test.
    struct Mount(PathBuf);

    impl Drop for Mount {
        fn drop(&mut self) {
            let c = std::ffi::CString::new(self.0.as_os_str().as_encoded_bytes()).unwrap();
            // SAFETY: unmounts the tmpfs this test mounted at a NUL-terminated path.
            unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
        }
    }

    /// Regression: a snapshot that hit ENOSPC left a partial `memory.bin` beside the old
    /// `state.bin`, which restored as a good snapshot.
    #[test]
    fn enospc_fails_cleanly_and_keeps_the_previous_snapshot() {
        let base = tempfile::tempdir().unwrap();
        let status = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=1m", "runv-test"])
            .arg(base.path())
            .status()
            .unwrap();
        assert!(status.success(), "mounting a 1 MiB tmpfs (needs root)");
        let _m = Mount(base.path().to_path_buf());
        let dir = base.path();
        let small = ram(SIZE, 0x42, 16);
        let a = take(dir, &small, SIZE, "small").unwrap();
        let e = take(dir, &ram(SIZE, 0x43, 512), SIZE, "big").unwrap_err();
        assert!(
            e.to_string().contains("No space left") && e.to_string().contains("untouched"),
            "{e}"
        );
        assert_eq!(names(dir), [MEMORY_FILE, STATE_FILE], "no temp file left");
        let (snap, state) = open(dir).unwrap();
        assert_eq!((snap.id(), state.as_str()), (a, "small"));
        let mut got = vec![0u8; SIZE as usize];
        snap.memory().read_exact_at(&mut got, 0).unwrap();
        assert!(got == all_bytes(&small, SIZE), "previous snapshot changed");
    }

    /// Regression: a `memory.bin` of a newer snapshot beside an older `state.bin` (kill -9
    /// between the two renames, or an older runv's in-place rewrite) restored as one snapshot.
    #[test]
    fn memory_of_another_snapshot_is_refused_with_both_ids() {
        let (one, two) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let a = take(one.path(), &ram(SIZE, 1, 1), SIZE, "a").unwrap();
        let b = take(two.path(), &ram(SIZE, 2, 1), SIZE, "b").unwrap();
        std::fs::copy(two.path().join(MEMORY_FILE), one.path().join(MEMORY_FILE)).unwrap();
        let e = open(one.path()).unwrap_err();
        assert!(
            matches!(e, SnapshotError::IdMismatch { memory, state, .. } if memory == b && state == a),
            "{e}"
        );
        let msg = e.to_string();
        assert!(
            msg.contains("belongs to another snapshot")
                && msg.contains(&a.to_string())
                && msg.contains(&b.to_string())
                && msg.contains("take it again"),
            "{msg}"
        );
        // A temp file left by a killed writer does not matter to the published snapshot.
        std::fs::write(two.path().join(".memory.bin.dead.tmp"), b"partial").unwrap();
        assert_eq!(open(two.path()).unwrap().0.id(), b);
    }

    #[test]
    fn truncated_padded_or_trailerless_memory_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        take(dir.path(), &ram(SIZE, 3, 1), SIZE, "a").unwrap();
        let path = dir.path().join(MEMORY_FILE);
        let good = std::fs::read(&path).unwrap();
        let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        for len in [SIZE, 4096, 100, 0, SIZE + 2 * TRAILER_LEN] {
            f.set_len(len).unwrap();
            let e = open(dir.path()).unwrap_err();
            assert!(
                matches!(e, SnapshotError::Memory { .. }) && e.to_string().contains(MEMORY_FILE),
                "{len}: {e}"
            );
        }
        let mut flipped = good.clone();
        flipped[SIZE as usize + 20] ^= 1;
        std::fs::write(&path, &flipped).unwrap();
        let e = open(dir.path()).unwrap_err().to_string();
        assert!(e.contains("checksum"), "{e}");
        std::fs::write(&path, &good).unwrap();
        open(dir.path()).unwrap();
    }

    /// Regression: a planted symlink turned a victim file into a guest-memory image.
    #[test]
    fn symlinks_are_never_followed() {
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim");
        std::fs::write(&victim, b"precious").unwrap();
        let snap = dir.path().join("snap");
        std::fs::create_dir(&snap).unwrap();
        // Planted before the first snapshot: the published names and the old temp name.
        for name in [MEMORY_FILE, STATE_FILE, ".state.bin.tmp"] {
            std::os::unix::fs::symlink(&victim, snap.join(name)).unwrap();
        }
        let id = take(&snap, &ram(SIZE, 4, 1), SIZE, "a").unwrap();
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
        for name in [MEMORY_FILE, STATE_FILE] {
            assert!(std::fs::symlink_metadata(snap.join(name))
                .unwrap()
                .is_file());
        }
        assert_eq!(open(&snap).unwrap().0.id(), id);

        // Restoring refuses a symlink in place of either file.
        let good = dir.path().join("good");
        std::fs::create_dir(&good).unwrap();
        for name in [MEMORY_FILE, STATE_FILE] {
            std::fs::copy(snap.join(name), good.join(name)).unwrap();
        }
        for name in [MEMORY_FILE, STATE_FILE] {
            std::fs::remove_file(snap.join(name)).unwrap();
            std::os::unix::fs::symlink(good.join(name), snap.join(name)).unwrap();
            let e = open(&snap).unwrap_err();
            assert!(
                matches!(
                    &e,
                    SnapshotError::NotRegular {
                        kind: "symbolic link",
                        ..
                    }
                ) && e.to_string().contains(name),
                "{name}: {e}"
            );
            std::fs::remove_file(snap.join(name)).unwrap();
            std::fs::copy(good.join(name), snap.join(name)).unwrap();
        }
        open(&snap).unwrap();

        // A temp name that collides with anything, even a dangling symlink, is refused.
        let d = Dir::open(&snap, true).unwrap();
        std::os::unix::fs::symlink(&victim, snap.join(".taken")).unwrap();
        std::os::unix::fs::symlink(dir.path().join("nowhere"), snap.join(".dangling")).unwrap();
        for name in [".taken", ".dangling"] {
            let e = d.create_exclusive(name).unwrap_err();
            assert_eq!(e.kind(), std::io::ErrorKind::AlreadyExists, "{name}");
        }
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
        assert!(!dir.path().join("nowhere").exists());

        // The snapshot directory itself may not be a symlink, nor a file.
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&snap, &link).unwrap();
        let e = SnapshotWriter::create(&link).unwrap_err();
        assert!(matches!(e, SnapshotError::NotADirectory { .. }), "{e}");
        let e = SnapshotWriter::create(&victim).unwrap_err();
        assert!(matches!(e, SnapshotError::NotADirectory { .. }), "{e}");
    }

    /// Regression: a FIFO named `memory.bin` or `state.bin` hung a snapshot or a restore.
    #[test]
    fn fifos_are_refused_promptly() {
        let dir = tempfile::tempdir().unwrap();
        let snap = dir.path().to_path_buf();
        take(&snap, &ram(SIZE, 5, 1), SIZE, "a").unwrap();
        let mkfifo = |p: &Path| {
            let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).unwrap();
            // SAFETY: creates a FIFO at a NUL-terminated path.
            assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        };
        for name in [MEMORY_FILE, STATE_FILE] {
            let saved = std::fs::read(snap.join(name)).unwrap();
            std::fs::remove_file(snap.join(name)).unwrap();
            mkfifo(&snap.join(name));
            let s = snap.clone();
            let e = promptly(move || open(&s).map(|(d, _)| d.id())).unwrap_err();
            assert!(
                matches!(&e, SnapshotError::NotRegular { kind: "FIFO", .. })
                    && e.to_string().contains(name),
                "{name}: {e}"
            );
            // Taking a snapshot over a FIFO replaces it without ever opening it.
            let s = snap.clone();
            promptly(move || take(&s, &ram(SIZE, 6, 1), SIZE, "b")).unwrap();
            let (d, state) = open(&snap).unwrap();
            assert_eq!(state, "b");
            // A FIFO working set is an error, not a hang.
            mkfifo(&snap.join(WORKINGSET_FILE));
            let e = promptly(move || d.working_set().map(|_| ())).unwrap_err();
            assert!(e.to_string().contains("FIFO"), "{e}");
            std::fs::remove_file(snap.join(WORKINGSET_FILE)).unwrap();
            let _ = saved;
        }
    }

    #[test]
    fn temp_files_of_a_killed_writer_are_removed_once_stale() {
        let dir = tempfile::tempdir().unwrap();
        let old = std::time::SystemTime::now() - STALE_TEMP_AGE - Duration::from_secs(60);
        let stale = [
            ".memory.bin.0123456789abcdef.tmp",
            ".state.bin.fedcba9876543210.tmp",
        ];
        let kept = [
            ".memory.bin.dead.tmp",
            "memory.bin.0123456789abcdef.tmp",
            ".other.bin.0123456789abcdef.tmp",
        ];
        for name in stale.iter().chain(&kept) {
            let f = File::create(dir.path().join(name)).unwrap();
            f.set_modified(old).unwrap();
        }
        // A live writer's temp file is recent and stays.
        let live = ".state.bin.00000000deadbeef.tmp";
        File::create(dir.path().join(live)).unwrap();
        take(dir.path(), &ram(SIZE, 9, 1), SIZE, "a").unwrap();
        let left = names(dir.path());
        for name in stale {
            assert!(!left.iter().any(|n| n == name), "{name} left: {left:?}");
        }
        for name in kept.iter().chain([&live]) {
            assert!(left.iter().any(|n| n == name), "{name} removed: {left:?}");
        }
        assert!(is_temp_name(".workingset.bin.0123456789abcdef.tmp"));
    }

    #[test]
    fn working_sets_belong_to_one_snapshot() {
        let dir = tempfile::tempdir().unwrap();
        take(dir.path(), &ram(SIZE, 7, 1), SIZE, "a").unwrap();
        let (a, _) = open(dir.path()).unwrap();
        assert_eq!(a.working_set().unwrap(), None);
        assert!(a.publish_working_set(&[0x3000, 0x1000]).unwrap());
        assert!(
            !a.publish_working_set(&[0x5000]).unwrap(),
            "first writer wins"
        );
        assert_eq!(a.working_set().unwrap(), Some(vec![0x3000, 0x1000]));
        let ws = dir.path().join(WORKINGSET_FILE);
        let a_set = std::fs::read(&ws).unwrap();

        // A re-snapshot removes the old set...
        take(dir.path(), &ram(SIZE, 8, 1), SIZE, "b").unwrap();
        assert!(!ws.exists());
        let (b, _) = open(dir.path()).unwrap();
        // ...and one left behind (a crash before its removal) is stale: ignored.
        std::fs::write(&ws, &a_set).unwrap();
        assert_eq!(b.working_set().unwrap(), None, "stale set ignored");
        // The next publication replaces it; later ones lose to it.
        assert!(b.publish_working_set(&[0x7000]).unwrap());
        assert_eq!(b.working_set().unwrap(), Some(vec![0x7000]));
        assert!(!b.publish_working_set(&[0x8000]).unwrap());
        // The old handle now sees a stale set, not B's pages.
        assert_eq!(a.working_set().unwrap(), None);

        // A damaged set is an error, and a complete recording replaces it.
        std::fs::write(&ws, b"RUNVWSET garbage").unwrap();
        assert!(b.working_set().is_err());
        assert!(b.publish_working_set(&[0x9000]).unwrap());
        assert_eq!(b.working_set().unwrap(), Some(vec![0x9000]));
        // Offsets outside RAM are refused at read.
        std::fs::write(&ws, workingset::encode(b.id(), &[SIZE])).unwrap();
        assert!(b.working_set().is_err());
        assert_eq!(
            names(dir.path()),
            [MEMORY_FILE, STATE_FILE, WORKINGSET_FILE]
        );
    }
}
