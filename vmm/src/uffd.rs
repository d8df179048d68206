//! Serving a clone's guest memory through userfaultfd, with working-set record and prefetch.
//!
//! Two fault modes, chosen by where the snapshot's memory file lives:
//! - [`FaultMode::Minor`] (file on tmpfs/shmem): guest RAM is the file mapped `MAP_PRIVATE`; the
//!   first touch of a page raises a MINOR fault, answered by `UFFDIO_CONTINUE`, which maps the
//!   shared page-cache page (zero copy). Writes then copy privately, as in `cow` mode.
//! - [`FaultMode::Missing`] (file on ordinary storage): guest RAM is anonymous; the first touch
//!   raises a MISSING fault, answered by `UFFDIO_COPY` of the page read from the file.
//!
//! Hosts whose KVM runs guest code through an emulator that does not wait on userfaultfd (the
//! PVM-like development hosts: a guest read of an unserved page returns all-ones instead of
//! faulting, measured) get [`FaultMode::Populate`]: the clone maps the file copy-on-write, its
//! working set is read from its own page tables (`/proc/self/pagemap`) instead of a fault log, and
//! prefetch is `MADV_POPULATE_READ` over the set (zero copy, in bulk). Faults then are the pages
//! the guest pulled in beyond the prefetched set.
//!
//! The first clone of a snapshot records the pages it faults on during its recording window
//! (at least [`MIN_RECORD_MS`]) and, once that whole window has passed with the clone alive,
//! publishes them as the snapshot's working set (tied to the snapshot id: a set left by an earlier
//! snapshot in the same directory is stale and replaced). A clone that stops before its window
//! ends publishes nothing, so a quick shutdown never leaves an unrepresentative set for every
//! later clone. Later clones install the whole set in bulk before their vCPUs run, so they do
//! not stop on those faults at all. One handler thread per VM serves the rest; it never touches
//! vCPU state and stops when the VM ends.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use userfaultfd::{Event, FeatureFlags, RegisterMode, Uffd, UffdBuilder};
use vmm_sys_util::eventfd::EventFd;

use crate::memory::GuestRam;
use snapshot::workingset::PAGE_SIZE;
use snapshot::SnapshotDir;

/// `UFFD_FEATURE_MINOR_SHMEM` (linux/userfaultfd.h); the crate predates its flag constant.
const FEATURE_MINOR_SHMEM: u64 = 1 << 10;
/// `TMPFS_MAGIC` from statfs(2).
const TMPFS_MAGIC: i64 = 0x0102_1994;
/// Most pages one recording keeps.
const MAX_RECORDED: usize = 1 << 18;
/// Largest run installed by one prefetch ioctl.
const MAX_RUN: u64 = 1 << 20;
/// Shortest working-set recording window, in milliseconds: shorter windows are raised to this
/// (a set recorded over a few milliseconds would not represent what clones touch).
pub const MIN_RECORD_MS: u64 = 100;

pub use vmm_api::{FaultMode, UffdStats};

/// This process's `/proc/self/pagemap`, opened by [`keep_pagemap`].
static PAGEMAP: OnceLock<File> = OnceLock::new();

/// Opens this process's `/proc/self/pagemap` now and keeps it for reading Populate-mode working
/// sets later: the jail calls this before it hides `/proc` (the open file keeps naming this
/// process's memory).
pub fn keep_pagemap() -> std::io::Result<()> {
    if PAGEMAP.get().is_none() {
        let _ = PAGEMAP.set(File::open("/proc/self/pagemap")?);
    }
    Ok(())
}

/// Error setting up userfaultfd.
#[derive(Debug, thiserror::Error)]
pub enum UffdError {
    /// The kernel refused the userfaultfd or a feature.
    #[error("userfaultfd {what}: {source:?} (needs access to /dev/userfaultfd (Linux >= 6.1; a jail gets its own node), or root, and Linux >= 5.13 for shmem MINOR faults)")]
    Setup {
        /// What failed.
        what: &'static str,
        /// Cause.
        source: userfaultfd::Error,
    },
    /// Spawning the handler thread or creating its eventfd.
    #[error("starting the userfaultfd handler: {0}")]
    Thread(std::io::Error),
    /// The page server thread could not be confined.
    #[error("confining the userfaultfd page server: {0}")]
    Seccomp(crate::seccomp::SeccompError),
    /// The clone's RAM is not the snapshot's size.
    #[error("guest RAM is {ram} bytes, the snapshot in {dir} has {snapshot}: use a VM of the snapshot's size")]
    Size {
        /// Guest RAM size.
        ram: u64,
        /// The snapshot's RAM size.
        snapshot: u64,
        /// The snapshot directory.
        dir: PathBuf,
    },
    /// Prefetching the working set failed.
    #[error("prefetching the working set of {path}: {why}")]
    Prefetch {
        /// The memory file.
        path: PathBuf,
        /// What failed.
        why: String,
    },
}

/// Picks the fault mode for a memory file: MINOR when it lives on tmpfs, MISSING otherwise, and
/// Populate when guest accesses on this host never reach a userfaultfd handler (`lazy` false).
pub fn mode_for(file: &File, lazy: bool) -> FaultMode {
    if !lazy {
        return FaultMode::Populate;
    }
    // SAFETY: statfs is plain old data; fstatfs only writes into it, and the fd is open.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: see above; the result is checked.
    let rc = unsafe { libc::fstatfs(file.as_raw_fd(), &mut st) };
    if rc == 0 && st.f_type as i64 == TMPFS_MAGIC {
        FaultMode::Minor
    } else {
        FaultMode::Missing
    }
}

/// Counters of one page server (read by the control `status` command).
#[derive(Debug, Default)]
struct Counters {
    faults: AtomicU64,
    prefetched_pages: AtomicU64,
    recorded_pages: AtomicU64,
    prefetch_us: AtomicU64,
    serve_ns: AtomicU64,
}

/// Guest RAM region as the handler sees it.
#[derive(Clone, Copy)]
struct Region {
    host: u64,
    len: u64,
    file_offset: u64,
}

/// The handler's view of guest RAM and the file behind it.
struct Pages {
    /// None in Populate mode.
    uffd: Option<Uffd>,
    mode: FaultMode,
    file: Arc<File>,
    path: PathBuf,
    regions: Vec<Region>,
}

// SAFETY: `Uffd` is an fd wrapper whose ioctls are thread-safe; regions are plain addresses of
// guest RAM that outlives the page server (the Vmm drops the server before its memory).
unsafe impl Send for Pages {}
// SAFETY: as above; every method takes &self and the kernel serialises the ioctls.
unsafe impl Sync for Pages {}

/// Serves a clone's memory faults until dropped.
pub struct PageServer {
    pages: Arc<Pages>,
    counters: Arc<Counters>,
    stop: EventFd,
    thread: Option<JoinHandle<()>>,
}

/// Maps [host, host+len) of a file mapping into the page tables in bulk (`MADV_POPULATE_READ`).
fn populate(host: u64, len: u64) -> std::io::Result<()> {
    // SAFETY: [host, host+len) lies inside a guest RAM mapping that outlives this call;
    // MADV_POPULATE_READ only faults pages in, it never changes their contents.
    let rc = unsafe {
        libc::madvise(
            host as *mut libc::c_void,
            len as usize,
            libc::MADV_POPULATE_READ,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

fn errno(e: &userfaultfd::Error) -> Option<i32> {
    match e {
        userfaultfd::Error::CopyFailed(n) | userfaultfd::Error::ZeropageFailed(n) => {
            Some(*n as i32)
        }
        userfaultfd::Error::SystemError(n) => Some(*n as i32),
        _ => None,
    }
}

impl Pages {
    fn host_of(&self, offset: u64) -> Option<u64> {
        self.regions
            .iter()
            .find(|r| offset >= r.file_offset && offset < r.file_offset + r.len)
            .map(|r| r.host + offset - r.file_offset)
    }

    fn offset_of(&self, host: u64) -> Option<u64> {
        self.regions
            .iter()
            .find(|r| host >= r.host && host < r.host + r.len)
            .map(|r| r.file_offset + host - r.host)
    }

    /// Installs `len` bytes at RAM offset `offset` (one region); pages already present are fine.
    fn install(&self, offset: u64, len: u64, buf: &mut Vec<u8>) -> Result<(), String> {
        let host = self
            .host_of(offset)
            .ok_or_else(|| format!("offset {offset:#x} outside guest RAM"))?;
        let Some(uffd) = &self.uffd else {
            return populate(host, len)
                .map_err(|e| format!("MADV_POPULATE_READ at {offset:#x}: {e}"));
        };
        let (what, r) = if self.mode == FaultMode::Missing {
            buf.resize(len as usize, 0);
            self.file
                .read_exact_at(buf, offset)
                .map_err(|e| format!("reading {} at {offset:#x}: {e}", self.path.display()))?;
            // SAFETY: `buf` holds `len` readable bytes; [host, host+len) lies inside a guest
            // RAM region registered with this userfaultfd, which outlives this call.
            let r = unsafe {
                uffd.copy(
                    buf.as_ptr() as *const libc::c_void,
                    host as *mut libc::c_void,
                    len as usize,
                    true,
                )
            };
            ("UFFDIO_COPY", r.map(drop))
        } else {
            let r = uffd.r#continue(host as *mut libc::c_void, len as usize, true);
            ("UFFDIO_CONTINUE", r.map(drop))
        };
        match r {
            Ok(()) => Ok(()),
            Err(userfaultfd::Error::PartiallyCopied(n)) => {
                let n = n as u64 & !(PAGE_SIZE - 1);
                self.install(offset + n, len - n, buf)
            }
            Err(e) if errno(&e) == Some(libc::EEXIST) && len > PAGE_SIZE => {
                // Part of the run is mapped already: go page by page.
                for p in (0..len).step_by(PAGE_SIZE as usize) {
                    self.install(offset + p, PAGE_SIZE, buf)?;
                }
                Ok(())
            }
            Err(e) if errno(&e) == Some(libc::EEXIST) => {
                let _ = uffd.wake(host as *mut libc::c_void, len as usize);
                Ok(())
            }
            Err(e) => Err(format!("{what} at {offset:#x}: {e:?}")),
        }
    }

    /// RAM offsets of the pages present in this process's page tables (touched since mapped).
    fn present_pages(&self) -> std::io::Result<Vec<u64>> {
        let opened;
        let pagemap = match PAGEMAP.get() {
            Some(f) => f,
            None => {
                opened = File::open("/proc/self/pagemap")?;
                &opened
            }
        };
        let mut present = Vec::new();
        let mut buf = Vec::new();
        for r in &self.regions {
            let pages = (r.len / PAGE_SIZE) as usize;
            buf.resize(pages * 8, 0);
            pagemap.read_exact_at(&mut buf, r.host / PAGE_SIZE * 8)?;
            for (i, e) in buf.chunks_exact(8).enumerate() {
                let mut b = [0u8; 8];
                b.copy_from_slice(e);
                if u64::from_le_bytes(b) & (1 << 63) != 0 {
                    present.push(r.file_offset + i as u64 * PAGE_SIZE);
                }
            }
        }
        Ok(present)
    }

    /// Installs every page of `set` in bulk, coalescing neighbours into runs.
    fn prefetch(&self, set: &[u64]) -> Result<u64, String> {
        let mut sorted = set.to_vec();
        sorted.sort_unstable();
        sorted.dedup();
        let mut buf = Vec::new();
        let mut i = 0;
        while i < sorted.len() {
            let start = sorted[i];
            let region_end = self
                .regions
                .iter()
                .find(|r| start >= r.file_offset && start < r.file_offset + r.len)
                .map(|r| r.file_offset + r.len)
                .ok_or_else(|| format!("offset {start:#x} outside guest RAM"))?;
            let mut end = start + PAGE_SIZE;
            i += 1;
            while i < sorted.len() && sorted[i] == end && end < region_end && end - start < MAX_RUN
            {
                end += PAGE_SIZE;
                i += 1;
            }
            self.install(start, end - start, &mut buf)?;
        }
        Ok(sorted.len() as u64)
    }
}

impl PageServer {
    /// Registers guest RAM with a new userfaultfd in `mode`, prefetches the working set of
    /// `snap` when it has one (or records one for `record_for`, at least [`MIN_RECORD_MS`],
    /// otherwise), and starts the handler. Pages are read from `snap`'s memory file.
    ///
    /// `ram` must already map `snap.memory()` (MINOR, Populate) or be untouched anonymous memory
    /// (MISSING).
    pub fn start(
        ram: &GuestRam,
        snap: &SnapshotDir,
        mode: FaultMode,
        record_for: Duration,
    ) -> Result<Self, UffdError> {
        if ram.size != snap.mem_size() {
            return Err(UffdError::Size {
                ram: ram.size,
                snapshot: snap.mem_size(),
                dir: snap.path().to_path_buf(),
            });
        }
        let record_for = record_for.max(Duration::from_millis(MIN_RECORD_MS));
        let path = snap.memory_path().to_path_buf();
        let file = snap.memory().clone();
        let uffd = match mode {
            FaultMode::Populate => None,
            FaultMode::Minor | FaultMode::Missing => {
                let mut builder = UffdBuilder::new();
                // KVM reaches guest RAM from the kernel (get_user_pages): a user-mode-only
                // userfaultfd (the crate's default) fails those faults instead of reporting
                // them. The full kind needs /dev/userfaultfd (a jail's own node) or
                // CAP_SYS_PTRACE; the crate opens the device whenever it exists.
                builder
                    .close_on_exec(true)
                    .non_blocking(true)
                    .user_mode_only(false);
                if mode == FaultMode::Minor {
                    builder.require_features(FeatureFlags::from_bits_retain(FEATURE_MINOR_SHMEM));
                }
                let uffd = builder.create().map_err(|source| UffdError::Setup {
                    what: "create",
                    source,
                })?;
                let register = if mode == FaultMode::Minor {
                    RegisterMode::MINOR
                } else {
                    RegisterMode::MISSING
                };
                for (host, _, len) in ram.regions() {
                    uffd.register_with_mode(host as *mut libc::c_void, len as usize, register)
                        .map_err(|source| UffdError::Setup {
                            what: "register guest RAM",
                            source,
                        })?;
                }
                Some(uffd)
            }
        };
        let mut regions = Vec::new();
        let mut file_offset = 0;
        for (host, _, len) in ram.regions() {
            regions.push(Region {
                host,
                len,
                file_offset,
            });
            file_offset += len;
        }
        let pages = Arc::new(Pages {
            uffd,
            mode,
            file,
            path: path.clone(),
            regions,
        });
        let counters = Arc::new(Counters::default());
        let recording = match snap.working_set() {
            Ok(Some(set)) => {
                let t0 = Instant::now();
                let n = pages
                    .prefetch(&set)
                    .map_err(|why| UffdError::Prefetch { path, why })?;
                counters.prefetched_pages.store(n, Ordering::Relaxed);
                counters
                    .prefetch_us
                    .store(t0.elapsed().as_micros() as u64, Ordering::Relaxed);
                None
            }
            Ok(None) => Some(Recording {
                snap: snap.clone(),
                until: Instant::now() + record_for,
                pages: Vec::new(),
            }),
            Err(e) => {
                tracing::warn!("{e}; this clone neither prefetches nor records");
                None
            }
        };
        let stop =
            EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC).map_err(UffdError::Thread)?;
        let stop_fd = stop.try_clone().map_err(UffdError::Thread)?;
        let (confined_tx, confined_rx) = std::sync::mpsc::sync_channel(1);
        let thread = {
            let (pages, counters) = (pages.clone(), counters.clone());
            std::thread::Builder::new()
                .name("uffd".into())
                .spawn(move || {
                    // Confined before it serves a single page.
                    let confined = crate::seccomp::install(crate::seccomp::ThreadKind::Uffd);
                    let ok = confined.is_ok();
                    let _ = confined_tx.send(confined);
                    if ok {
                        serve(&pages, &counters, &stop_fd, recording);
                    }
                })
                .map_err(UffdError::Thread)?
        };
        // Only a confined process waits: unconfined, there is nothing to report.
        if crate::seccomp::mode() != crate::seccomp::SeccompMode::Off {
            let confined = confined_rx
                .recv()
                .unwrap_or(Err(crate::seccomp::SeccompError::NoReport("uffd")));
            if let Err(e) = confined {
                let _ = thread.join();
                return Err(UffdError::Seccomp(e));
            }
        }
        Ok(Self {
            pages,
            counters,
            stop,
            thread: Some(thread),
        })
    }

    /// Current counters.
    pub fn stats(&self) -> UffdStats {
        let c = &self.counters;
        let mut faults = c.faults.load(Ordering::Relaxed);
        if self.pages.uffd.is_none() {
            // Pages the guest pulled in itself: present now, beyond what was prefetched.
            let present = self.pages.present_pages().map_or(0, |p| p.len() as u64);
            faults = present.saturating_sub(c.prefetched_pages.load(Ordering::Relaxed));
        }
        UffdStats {
            mode: self.pages.mode,
            faults,
            prefetched_pages: c.prefetched_pages.load(Ordering::Relaxed),
            recorded_pages: c.recorded_pages.load(Ordering::Relaxed),
            prefetch_us: c.prefetch_us.load(Ordering::Relaxed),
            mean_fault_us: if faults == 0 {
                0.0
            } else {
                c.serve_ns.load(Ordering::Relaxed) as f64 / faults as f64 / 1e3
            },
        }
    }
}

impl Drop for PageServer {
    fn drop(&mut self) {
        let _ = self.stop.write(1);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A working set being recorded.
struct Recording {
    snap: SnapshotDir,
    /// End of the window; only a recording whose window ended while the clone ran is published.
    until: Instant,
    pages: Vec<u64>,
}

impl Recording {
    /// Publishes the recording (its window has ended).
    fn publish(mut self, pages: &Pages, counters: &Counters) {
        if pages.uffd.is_none() {
            match pages.present_pages() {
                Ok(p) => self.pages = p,
                Err(e) => {
                    tracing::warn!("reading /proc/self/pagemap: {e}; no working set recorded");
                    return;
                }
            }
        }
        // Populate mode reads every present page; a working set holds at most MAX_PAGES.
        self.pages
            .truncate(snapshot::workingset::MAX_PAGES as usize);
        match self.snap.publish_working_set(&self.pages) {
            Ok(true) => tracing::debug!(pages = self.pages.len(), "working set recorded"),
            Ok(false) => {}
            Err(e) => tracing::warn!("not recording the working set: {e}"),
        }
        // Stored last: a reader that sees it can rely on the publication having happened.
        counters
            .recorded_pages
            .store(self.pages.len() as u64, Ordering::Relaxed);
    }
}

/// The handler thread: answers faults until `stop` fires.
fn serve(pages: &Pages, counters: &Counters, stop: &EventFd, mut recording: Option<Recording>) {
    let mut buf = Vec::new();
    loop {
        let timeout = match &recording {
            Some(r) => r
                .until
                .saturating_duration_since(Instant::now())
                .as_millis()
                .min(i32::MAX as u128) as i32,
            None => -1,
        };
        let mut fds = [
            libc::pollfd {
                fd: pages.uffd.as_ref().map_or(-1, |u| u.as_raw_fd()),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: stop.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: `fds` is a valid array of two pollfds for the duration of the call.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, timeout) };
        if n < 0 && std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
            tracing::error!("uffd handler poll: {}", std::io::Error::last_os_error());
            break;
        }
        if recording
            .as_ref()
            .is_some_and(|r| Instant::now() >= r.until)
        {
            if let Some(r) = recording.take() {
                r.publish(pages, counters);
            }
        }
        if fds[1].revents != 0 {
            break;
        }
        let Some(uffd) = &pages.uffd else {
            continue;
        };
        loop {
            match uffd.read_event() {
                Ok(Some(Event::Pagefault { addr, .. })) => {
                    let t0 = Instant::now();
                    let host = addr as u64 & !(PAGE_SIZE - 1);
                    let Some(offset) = pages.offset_of(host) else {
                        tracing::error!("uffd fault at {host:#x} outside guest RAM");
                        continue;
                    };
                    // Counted before the page is installed: installing wakes the faulting
                    // thread, which may read the counters right away.
                    counters.faults.fetch_add(1, Ordering::Relaxed);
                    if let Err(e) = pages.install(offset, PAGE_SIZE, &mut buf) {
                        // The vCPU stays blocked on this page; nothing else can serve it.
                        tracing::error!("serving a guest page fault: {e}");
                    }
                    counters
                        .serve_ns
                        .fetch_add(t0.elapsed().as_nanos() as u64, Ordering::Relaxed);
                    if let Some(r) = &mut recording {
                        if r.pages.len() < MAX_RECORDED {
                            r.pages.push(offset);
                        }
                    }
                }
                Ok(Some(_)) => {}
                Ok(None) => break,
                Err(e) => {
                    tracing::error!("reading a userfaultfd event: {e}");
                    break;
                }
            }
        }
    }
    if let Some(r) = recording {
        tracing::debug!(
            pages = r.pages.len(),
            "the clone stopped before its recording window ended; no working set published"
        );
    }
}

#[cfg(test)]
mod tests {
    //! The lazy path with real userfaultfd: accesses from another thread of this process fault
    //! into the handler exactly as a vCPU's do on a standard KVM host. Snapshots are real
    //! snapshot directories (on tmpfs and on disk) written by `SnapshotWriter`.
    use super::*;
    use std::os::fd::FromRawFd;
    use std::path::Path;
    use vm_memory::{Bytes, GuestAddress};

    const SIZE: u64 = 16 << 20;
    /// Recording window of the tests' clones.
    const WINDOW: Duration = Duration::from_millis(300);

    /// Publishes a snapshot of patterned guest RAM in `dir`; returns the RAM bytes.
    fn template(dir: &Path, seed: u32) -> Vec<u8> {
        let data: Vec<u8> = (0..SIZE as u32)
            .map(|i| (i.wrapping_add(seed).wrapping_mul(2_654_435_761) >> 11) as u8)
            .collect();
        // SAFETY: valid NUL-terminated name; the fd is checked and then owned.
        let fd = unsafe { libc::memfd_create(c"ram".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: a fresh fd owned by nobody else.
        let ram = unsafe { File::from_raw_fd(fd) };
        ram.write_all_at(&data, 0).unwrap();
        let mut w = snapshot::SnapshotWriter::create(dir).unwrap();
        w.write_memory(&ram, SIZE).unwrap();
        w.commit("test", snapshot::HostFingerprint::current(12), &())
            .unwrap();
        data
    }

    fn open(dir: &Path) -> SnapshotDir {
        SnapshotDir::open::<()>(dir, None).unwrap().0
    }

    /// A clone's RAM over the snapshot in `dir`, served by a page server in `mode`.
    fn clone(dir: &Path, mode: FaultMode, window: Duration) -> (GuestRam, PageServer) {
        let snap = open(dir);
        let mut ram = GuestRam::reserve(SIZE).unwrap();
        match mode {
            FaultMode::Missing => ram.map_anonymous().unwrap(),
            _ => ram.map_file_private(snap.memory().clone()).unwrap(),
        }
        let server = PageServer::start(&ram, &snap, mode, window).unwrap();
        (ram, server)
    }

    /// Reads 200 scattered pages from a separate thread; returns what it read.
    fn touch(ram: &GuestRam) -> Vec<u8> {
        let mem = ram.mem.clone();
        std::thread::spawn(move || {
            (0..200u64)
                .map(|i| {
                    let mut b = [0u8; 1];
                    mem.read_slice(&mut b, GuestAddress(i * 37 * PAGE_SIZE % SIZE + 5))
                        .unwrap();
                    b[0]
                })
                .collect()
        })
        .join()
        .unwrap()
    }

    /// Waits until `server`'s recording window has passed and its set is published; returns how
    /// many pages it recorded.
    fn wait_published(server: &PageServer) -> u64 {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let n = server.stats().recorded_pages;
            if n > 0 {
                return n;
            }
            assert!(Instant::now() < deadline, "no working set was published");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn record_then_prefetch(dir: &Path, mode: FaultMode) {
        let data = template(dir, 0);
        let expect: Vec<u8> = (0..200u64)
            .map(|i| data[(i * 37 * PAGE_SIZE % SIZE + 5) as usize])
            .collect();
        let (ram, server) = clone(dir, mode, WINDOW);
        assert_eq!(
            touch(&ram),
            expect,
            "{mode:?}: served pages hold the file's data"
        );
        let first = server.stats();
        assert!(first.faults >= 200, "{first:?}");
        assert_eq!(wait_published(&server), first.faults);
        drop(server);
        assert_eq!(
            open(dir).working_set().unwrap().unwrap().len() as u64,
            first.faults,
            "the recording holds every faulted page"
        );
        // A write stays private: the template file is unchanged.
        ram.mem.write_obj(0xffu8, GuestAddress(5)).unwrap_or(());
        drop(ram);

        let (ram, server) = clone(dir, mode, WINDOW);
        assert_eq!(touch(&ram), expect);
        let second = server.stats();
        assert!(second.prefetched_pages >= 200, "{second:?}");
        assert_eq!(second.faults, 0, "prefetched pages never fault: {second:?}");
        drop(server);
        let mut mem = vec![0u8; SIZE as usize];
        open(dir).memory().read_exact_at(&mut mem, 0).unwrap();
        assert!(mem == data, "the memory file changed");
    }

    /// Checks that a snapshot in a directory under `base` selects `mode`, then runs
    /// [`record_then_prefetch`] there.
    fn in_dir(base: &str, mode: FaultMode) {
        let dir = tempfile::tempdir_in(base).unwrap();
        record_then_prefetch(dir.path(), mode);
        assert_eq!(mode_for(open(dir.path()).memory(), true), mode);
    }

    #[test]
    fn minor_faults_on_tmpfs_record_then_prefetch() {
        in_dir("/dev/shm", FaultMode::Minor);
    }

    #[test]
    fn missing_faults_on_anonymous_memory_record_then_prefetch() {
        in_dir(env!("CARGO_MANIFEST_DIR"), FaultMode::Missing);
    }

    #[test]
    fn populate_mode_records_from_page_tables() {
        let dir = tempfile::tempdir().unwrap();
        let data = template(dir.path(), 0);
        let (ram, server) = clone(dir.path(), FaultMode::Populate, WINDOW);
        touch(&ram);
        assert!(server.stats().faults >= 200, "{:?}", server.stats());
        wait_published(&server);
        drop(server);
        drop(ram);
        let set = open(dir.path()).working_set().unwrap().unwrap();
        assert!(set.len() >= 200, "{} pages recorded", set.len());
        let (ram, server) = clone(dir.path(), FaultMode::Populate, WINDOW);
        touch(&ram);
        let s = server.stats();
        assert_eq!(s.prefetched_pages, set.len() as u64, "{s:?}");
        assert_eq!(s.faults, 0, "{s:?}");
        let mut b = [0u8; 1];
        ram.mem.read_slice(&mut b, GuestAddress(5)).unwrap();
        assert_eq!(b[0], data[5]);
    }

    /// Regression: a clone that stopped early (short run, quick shutdown) published the few
    /// pages it had touched, and every later clone prefetched only those, forever.
    #[test]
    fn a_clone_that_stops_before_its_window_ends_publishes_nothing() {
        let dir = tempfile::tempdir_in("/dev/shm").unwrap();
        template(dir.path(), 0);
        let (ram, server) = clone(dir.path(), FaultMode::Minor, Duration::from_secs(30));
        touch(&ram);
        assert!(server.stats().faults >= 200);
        drop(server);
        assert_eq!(open(dir.path()).working_set().unwrap(), None);
        assert!(!dir
            .path()
            .join(snapshot::workingset::WORKINGSET_FILE)
            .exists());
        drop(ram);
        // The next clone still records (nothing to prefetch), and with a window below the
        // minimum it records for MIN_RECORD_MS, long enough to see its first touches.
        let (ram, server) = clone(dir.path(), FaultMode::Minor, Duration::ZERO);
        assert_eq!(server.stats().prefetched_pages, 0);
        touch(&ram);
        assert!(wait_published(&server) >= 200, "{:?}", server.stats());
    }

    /// A full window publishes, replacing a working set left by an earlier snapshot in the same
    /// directory (stale: another snapshot id), which no clone prefetches.
    #[test]
    fn a_full_window_publishes_and_replaces_a_stale_set() {
        let dir = tempfile::tempdir().unwrap();
        let ws = dir.path().join(snapshot::workingset::WORKINGSET_FILE);
        template(dir.path(), 1);
        assert!(open(dir.path()).publish_working_set(&[0, 4096]).unwrap());
        let stale = std::fs::read(&ws).unwrap();
        let data = template(dir.path(), 2);
        std::fs::write(&ws, &stale).unwrap();

        let (ram, server) = clone(dir.path(), FaultMode::Missing, WINDOW);
        assert_eq!(server.stats().prefetched_pages, 0, "stale set not used");
        let got = touch(&ram);
        assert_eq!(got[0], data[5], "pages come from the new snapshot");
        let recorded = wait_published(&server);
        assert!(recorded >= 200, "{recorded}");
        drop(server);
        let set = open(dir.path()).working_set().unwrap().unwrap();
        assert_eq!(set.len() as u64, recorded);
    }
}
