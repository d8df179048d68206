//! virtio-blk on a raw file (virtio 1.2, section 5.2): read, write, flush, get-id.

use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::path::Path;

use virtio_queue::Queue;
use vm_memory::{Address, Bytes, GuestAddress};

use super::{device_type, drain_queue, used_if, VirtioDevice};
use crate::memory::GuestMemory;

const SECTOR: u64 = 512;
const QUEUE_SIZE: u16 = 256;
/// Largest data payload of one request.
pub const MAX_REQUEST_BYTES: u64 = 1 << 20;
const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const T_GET_ID: u32 = 8;
const S_OK: u8 = 0;
const S_IOERR: u8 = 1;
const S_UNSUPP: u8 = 2;
const F_RO: u64 = 1 << 5;
const F_FLUSH: u64 = 1 << 9;
const ID_BYTES: usize = crate::config::MAX_BLOCK_ID;

/// Error creating a block device.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    /// The backing file could not be opened.
    #[error("opening block backing file {path}{}: {source}", if *read_only { " read-only" } else { "" })]
    Open {
        /// Backing file.
        path: String,
        /// Opened read-only.
        read_only: bool,
        /// Cause.
        source: std::io::Error,
    },
    /// The device id does not fit virtio-blk's 20-byte id.
    #[error("block device {path}: id {id:?} is {len} bytes, virtio-blk ids are at most {ID_BYTES} bytes: use a shorter id")]
    Id {
        /// Backing file.
        path: String,
        /// The id.
        id: String,
        /// Its length in bytes.
        len: usize,
    },
}

/// Error opening a disk to attach to a slot.
#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    /// The file could not be opened or inspected.
    #[error("opening disk {path}{}: {source} (pass an existing regular file or block device, not a symbolic link)", if *read_only { " read-only" } else { "" })]
    Open {
        /// The file.
        path: String,
        /// Opened read-only.
        read_only: bool,
        /// Cause.
        source: std::io::Error,
    },
    /// A passed descriptor's access mode does not allow what the disk needs.
    #[error("disk {path}: the file descriptor passed for it is {mode}, but {need}: open it {fix}")]
    Mode {
        /// The disk's label.
        path: String,
        /// How it was opened.
        mode: &'static str,
        /// What the attach needs.
        need: &'static str,
        /// How to open it instead.
        fix: &'static str,
    },
    /// Neither a regular file nor a block device.
    #[error("disk {path} is {kind}: pass a regular file or a block device")]
    NotADisk {
        /// The file.
        path: String,
        /// What it is instead.
        kind: &'static str,
    },
}

/// An opened disk image: the file, whether the device refuses writes, its capacity.
pub struct Backing {
    file: File,
    read_only: bool,
    capacity_sectors: u64,
}

impl Backing {
    /// Opens `path` to attach it: `O_NOFOLLOW | O_NONBLOCK` (a symbolic link is refused, a FIFO
    /// does not block the open), then checked with `fstat` to be a regular file or a block device.
    pub fn open(path: &Path, read_only: bool) -> Result<Self, AttachError> {
        let err = |source| AttachError::Open {
            path: path.display().to_string(),
            read_only,
            source,
        };
        let file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC | libc::O_NOCTTY)
            .open(path)
            .map_err(err)?;
        Self::from_file(file, path, read_only)
    }

    /// Takes a disk passed as an open descriptor (`attach_disk` with `fd: true`); `label` names
    /// it in errors. Checked like [`Backing::open`]'s file, and its access mode must allow
    /// reading, and writing unless `read_only` (an `O_PATH` descriptor allows neither).
    pub fn from_fd(fd: OwnedFd, label: &Path, read_only: bool) -> Result<Self, AttachError> {
        let mode = |mode, need, fix| AttachError::Mode {
            path: label.display().to_string(),
            mode,
            need,
            fix,
        };
        let flags =
            nix::fcntl::fcntl(fd.as_raw_fd(), nix::fcntl::FcntlArg::F_GETFL).map_err(|e| {
                AttachError::Open {
                    path: label.display().to_string(),
                    read_only,
                    source: e.into(),
                }
            })?;
        if flags & libc::O_PATH != 0 {
            return Err(mode("O_PATH", "the disk is read", "O_RDONLY or O_RDWR"));
        }
        match (flags & libc::O_ACCMODE, read_only) {
            (libc::O_RDWR, _) | (libc::O_RDONLY, true) => {}
            (libc::O_RDONLY, false) => {
                return Err(mode(
                    "read-only",
                    "the disk is attached writable",
                    "O_RDWR, or attach it with read_only",
                ))
            }
            _ => return Err(mode("write-only", "the disk is read", "O_RDONLY or O_RDWR")),
        }
        Self::from_file(File::from(fd), label, read_only)
    }

    /// Checks `file` is a regular file or a block device and sizes it.
    fn from_file(mut file: File, path: &Path, read_only: bool) -> Result<Self, AttachError> {
        let err = |source| AttachError::Open {
            path: path.display().to_string(),
            read_only,
            source,
        };
        let meta = file.metadata().map_err(err)?;
        let ft = meta.file_type();
        let bytes = if ft.is_file() {
            meta.len()
        } else if ft.is_block_device() {
            file.seek(SeekFrom::End(0)).map_err(err)?
        } else {
            return Err(AttachError::NotADisk {
                path: path.display().to_string(),
                kind: crate::config::file_kind(ft),
            });
        };
        Ok(Self {
            file,
            read_only,
            capacity_sectors: bytes / SECTOR,
        })
    }

    /// Capacity in 512-byte sectors (the size rounded down).
    pub fn capacity_sectors(&self) -> u64 {
        self.capacity_sectors
    }
}

/// A virtio block device.
pub struct Block {
    file: File,
    read_only: bool,
    capacity_sectors: u64,
    id: [u8; ID_BYTES],
    config: [u8; 8],
    /// While a disk is attached: the backing it replaced (the slot's placeholder).
    placeholder: Option<Backing>,
    /// `VIRTIO_BLK_F_RO` offered: fixed at creation (the driver negotiated it), whatever an
    /// attached disk's mode; the device itself refuses writes to a read-only disk.
    offers_ro: bool,
    /// Requests failed because the guest's descriptors were malformed.
    pub malformed: u64,
}

/// A request decoded from one descriptor chain.
struct Request {
    kind: u32,
    sector: u64,
    data: Vec<(GuestAddress, u32)>,
    status: GuestAddress,
}

impl Block {
    /// Opens `path` as a disk (its size rounded down to whole sectors). An explicit `id` longer
    /// than 20 bytes is refused; the default id (the file name) is cut to 20 bytes.
    pub fn new(path: &Path, read_only: bool, id: Option<&str>) -> Result<Self, BlockError> {
        if let Some(id) = id.filter(|id| id.len() > ID_BYTES) {
            return Err(BlockError::Id {
                path: path.display().to_string(),
                id: id.into(),
                len: id.len(),
            });
        }
        let err = |source| BlockError::Open {
            path: path.display().to_string(),
            read_only,
            source,
        };
        let file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(path)
            .map_err(err)?;
        let capacity_sectors = file.metadata().map_err(err)?.len() / SECTOR;
        let mut id_bytes = [0u8; ID_BYTES];
        let default_id = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let id = id.map(str::to_owned).unwrap_or(default_id);
        let n = id.len().min(ID_BYTES);
        id_bytes[..n].copy_from_slice(&id.as_bytes()[..n]);
        Ok(Self {
            file,
            read_only,
            capacity_sectors,
            id: id_bytes,
            config: capacity_sectors.to_le_bytes(),
            placeholder: None,
            offers_ro: read_only,
            malformed: 0,
        })
    }

    /// The device id (virtio-blk serial), without NUL padding.
    pub fn id(&self) -> String {
        let n = self.id.iter().position(|&b| b == 0).unwrap_or(ID_BYTES);
        String::from_utf8_lossy(&self.id[..n]).into_owned()
    }

    /// Capacity the driver sees, in sectors.
    pub fn capacity_sectors(&self) -> u64 {
        self.capacity_sectors
    }

    /// Whether an attached disk replaces the original backing file.
    pub fn is_attached(&self) -> bool {
        self.placeholder.is_some()
    }

    /// Serves the guest from `backing` from now on; the original backing file is kept to
    /// [`Block::detach`] to (a second attach replaces the first, keeping the original). The caller
    /// reports the configuration change to the driver. Requests are served one at a time under
    /// the transport's lock, so none straddles the swap.
    pub fn attach(&mut self, backing: Backing) {
        let old = self.swap(backing);
        if self.placeholder.is_none() {
            self.placeholder = Some(old);
        }
    }

    /// Puts the original backing file back; false (nothing changed) when none was replaced.
    pub fn detach(&mut self) -> bool {
        match self.placeholder.take() {
            Some(original) => {
                self.swap(original);
                true
            }
            None => false,
        }
    }

    fn swap(&mut self, backing: Backing) -> Backing {
        let old = Backing {
            file: std::mem::replace(&mut self.file, backing.file),
            read_only: std::mem::replace(&mut self.read_only, backing.read_only),
            capacity_sectors: std::mem::replace(
                &mut self.capacity_sectors,
                backing.capacity_sectors,
            ),
        };
        self.config = self.capacity_sectors.to_le_bytes();
        old
    }

    /// Splits a chain into header, data and status descriptors, checking directions.
    fn parse<M>(chain: virtio_queue::DescriptorChain<M>, mem: &GuestMemory) -> Option<Request>
    where
        M: std::ops::Deref,
        M::Target: vm_memory::GuestMemoryBackend,
    {
        let descs: Vec<_> = chain.collect();
        // A chain the iterator cut short (a loop ran out of TTL, or `next` pointed outside the
        // queue) still has NEXT set on its last descriptor.
        if descs.last()?.has_next() {
            return None;
        }
        let (first, rest) = descs.split_first()?;
        let (last, data) = rest.split_last()?;
        if first.is_write_only() || first.len() < 16 || !last.is_write_only() || last.len() < 1 {
            return None;
        }
        let kind: u32 = mem.read_obj(first.addr()).ok()?;
        let sector: u64 = mem.read_obj(first.addr().checked_add(8)?).ok()?;
        let device_writes = match kind {
            T_IN | T_GET_ID => Some(true),
            T_OUT => Some(false),
            _ => None,
        };
        if let Some(w) = device_writes {
            if data.iter().any(|d| d.is_write_only() != w) {
                return None;
            }
        }
        Some(Request {
            kind,
            sector,
            data: data.iter().map(|d| (d.addr(), d.len())).collect(),
            status: last.addr(),
        })
    }

    /// Executes a request; returns (status, bytes written into guest memory).
    fn execute(&mut self, req: &Request, mem: &GuestMemory) -> (u8, u32) {
        let total: u64 = req.data.iter().map(|d| u64::from(d.1)).sum();
        match req.kind {
            T_IN | T_OUT => {
                if total > MAX_REQUEST_BYTES || !total.is_multiple_of(SECTOR) {
                    return (S_IOERR, 0);
                }
                let end = req.sector.checked_add(total / SECTOR);
                if end.is_none_or(|e| e > self.capacity_sectors) {
                    return (S_IOERR, 0);
                }
                if req.kind == T_OUT && self.read_only {
                    return (S_IOERR, 0);
                }
                let mut offset = req.sector * SECTOR;
                let mut written = 0u32;
                for &(addr, len) in &req.data {
                    let mut buf = vec![0u8; len as usize];
                    let ok = if req.kind == T_IN {
                        self.file.read_exact_at(&mut buf, offset).is_ok()
                            && mem.write_slice(&buf, addr).is_ok()
                    } else {
                        mem.read_slice(&mut buf, addr).is_ok()
                            && self.file.write_all_at(&buf, offset).is_ok()
                    };
                    if !ok {
                        return (S_IOERR, written);
                    }
                    offset += u64::from(len);
                    if req.kind == T_IN {
                        written += len;
                    }
                }
                (S_OK, written)
            }
            T_FLUSH => match self.file.sync_data() {
                Ok(()) => (S_OK, 0),
                Err(_) => (S_IOERR, 0),
            },
            T_GET_ID => {
                let Some(&(addr, len)) = req.data.first() else {
                    return (S_IOERR, 0);
                };
                let n = (len as usize).min(ID_BYTES);
                match mem.write_slice(&self.id[..n], addr) {
                    Ok(()) => (S_OK, n as u32),
                    Err(_) => (S_IOERR, 0),
                }
            }
            _ => (S_UNSUPP, 0),
        }
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        device_type::BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        let event_idx = 1 << virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
        F_FLUSH | event_idx | if self.offers_ro { F_RO } else { 0 }
    }

    fn config_space(&self) -> &[u8] {
        &self.config
    }

    fn as_block_mut(&mut self) -> Option<&mut Block> {
        Some(self)
    }

    fn as_block(&self) -> Option<&Block> {
        Some(self)
    }

    fn process_queue(
        &mut self,
        index: usize,
        queues: &mut [Queue],
        mem: &GuestMemory,
    ) -> Vec<usize> {
        used_if(queues, index, |q| self.process(q, mem))
            .into_iter()
            .collect()
    }
}

impl Block {
    /// Serves every available request of `queue`; returns whether any buffer was used.
    fn process(&mut self, queue: &mut Queue, mem: &GuestMemory) -> bool {
        let (used, used_ring_broken) = drain_queue(queue, mem, |chain| {
            let head = chain.head_index();
            let len = match Self::parse(chain, mem) {
                Some(req) => {
                    let (status, len) = self.execute(&req, mem);
                    if mem.write_obj(status, req.status).is_err() {
                        self.malformed += 1;
                    }
                    len + 1
                }
                None => {
                    self.malformed += 1;
                    0
                }
            };
            (head, len)
        });
        if used_ring_broken {
            self.malformed += 1;
        }
        used
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::testing::{memory, TestQueue, NEXT, WRITE};
    use vm_memory::GuestAddress as GA;

    struct Rig {
        mem: GuestMemory,
        q: TestQueue,
    }

    impl Rig {
        fn new() -> Self {
            let mem = memory();
            let q = TestQueue::new(&mem, 0x1000);
            Self { mem, q }
        }

        fn desc(&self, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
            self.q.desc(&self.mem, i, addr, len, flags, next);
        }

        fn submit(&mut self, head: u16) {
            self.q.submit(&self.mem, head);
        }

        fn header(&self, addr: u64, kind: u32, sector: u64) {
            self.mem.write_obj(kind, GA(addr)).unwrap();
            self.mem.write_obj(sector, GA(addr + 8)).unwrap();
        }

        /// header @0x4000, data @0x5000 (len), status @0x6000.
        fn request(&mut self, kind: u32, sector: u64, len: u32, data_write: bool) {
            self.header(0x4000, kind, sector);
            self.mem.write_obj(0xffu8, GA(0x6000)).unwrap();
            self.desc(0, 0x4000, 16, NEXT, 1);
            self.desc(1, 0x5000, len, NEXT | if data_write { WRITE } else { 0 }, 2);
            self.desc(2, 0x6000, 1, WRITE, 0);
            self.submit(0);
        }

        fn status(&self) -> u8 {
            self.mem.read_obj(GA(0x6000)).unwrap()
        }

        fn used_idx(&self) -> u16 {
            self.q.used_idx(&self.mem)
        }
    }

    fn disk(sectors: u64) -> (tempfile::NamedTempFile, Vec<u8>) {
        let f = tempfile::NamedTempFile::new().unwrap();
        let data: Vec<u8> = (0..sectors * SECTOR).map(|i| (i % 251) as u8).collect();
        std::fs::write(f.path(), &data).unwrap();
        (f, data)
    }

    #[test]
    fn read_write_flush_get_id_round_trip() {
        let (f, data) = disk(8);
        let mut blk = Block::new(f.path(), false, Some("disk-7")).unwrap();
        let mut rig = Rig::new();
        let mut cap = [0u8; 8];
        blk.read_config(0, &mut cap);
        assert_eq!(u64::from_le_bytes(cap), 8);

        rig.request(T_IN, 2, 1024, true);
        assert!(blk.process(&mut rig.q.queue, &rig.mem));
        assert_eq!(rig.status(), S_OK);
        let mut got = vec![0u8; 1024];
        rig.mem.read_slice(&mut got, GA(0x5000)).unwrap();
        assert_eq!(got, data[1024..2048]);

        rig.mem.write_slice(&[0xab; 512], GA(0x5000)).unwrap();
        rig.request(T_OUT, 7, 512, false);
        blk.process(&mut rig.q.queue, &rig.mem);
        assert_eq!(rig.status(), S_OK);
        assert_eq!(std::fs::read(f.path()).unwrap()[7 * 512..], [0xab; 512]);

        rig.request(T_FLUSH, 0, 0, false);
        // A flush with an empty data descriptor still parses (data list has one 0-length entry).
        blk.process(&mut rig.q.queue, &rig.mem);
        assert_eq!(rig.status(), S_OK);

        rig.request(T_GET_ID, 0, 20, true);
        blk.process(&mut rig.q.queue, &rig.mem);
        assert_eq!(rig.status(), S_OK);
        let mut id = [0u8; 6];
        rig.mem.read_slice(&mut id, GA(0x5000)).unwrap();
        assert_eq!(&id, b"disk-7");

        rig.request(99, 0, 512, true);
        blk.process(&mut rig.q.queue, &rig.mem);
        assert_eq!(rig.status(), S_UNSUPP);
        assert_eq!(rig.used_idx(), 5);
        assert_eq!(blk.malformed, 0);
    }

    #[test]
    fn read_only_and_out_of_range_requests_fail() {
        let (f, data) = disk(4);
        let mut blk = Block::new(f.path(), true, None).unwrap();
        assert_ne!(blk.features() & F_RO, 0);
        let mut rig = Rig::new();
        rig.request(T_OUT, 0, 512, false);
        blk.process(&mut rig.q.queue, &rig.mem);
        assert_eq!(rig.status(), S_IOERR);
        assert_eq!(
            std::fs::read(f.path()).unwrap(),
            data,
            "read-only disk written"
        );
        for (sector, len) in [(4, 512), (3, 1024), (u64::MAX / 2, 512), (0, 100)] {
            rig.request(T_IN, sector, len, true);
            blk.process(&mut rig.q.queue, &rig.mem);
            assert_eq!(rig.status(), S_IOERR, "sector {sector} len {len}");
        }
    }

    #[test]
    fn attach_serves_the_new_file_and_detach_puts_the_placeholder_back() {
        let (placeholder, _) = disk(1);
        let (img, data) = disk(16);
        let mut blk = Block::new(placeholder.path(), false, Some("runv-slot0")).unwrap();
        let features = blk.features();
        let mut rig = Rig::new();
        let backing = Backing::open(img.path(), true).unwrap();
        assert_eq!(backing.capacity_sectors(), 16);
        blk.attach(backing);
        assert!(blk.is_attached());
        assert_eq!(
            (blk.capacity_sectors(), blk.id().as_str()),
            (16, "runv-slot0")
        );
        let mut cap = [0u8; 8];
        blk.read_config(0, &mut cap);
        assert_eq!(
            u64::from_le_bytes(cap),
            16,
            "config space follows the attach"
        );
        assert_eq!(blk.features(), features, "offered features never change");
        rig.request(T_IN, 15, 512, true);
        blk.process(&mut rig.q.queue, &rig.mem);
        assert_eq!(rig.status(), S_OK);
        let mut got = vec![0u8; 512];
        rig.mem.read_slice(&mut got, GA(0x5000)).unwrap();
        assert_eq!(got, data[15 * 512..]);
        // Attached read-only: writes fail, the image is untouched.
        rig.request(T_OUT, 0, 512, false);
        blk.process(&mut rig.q.queue, &rig.mem);
        assert_eq!(rig.status(), S_IOERR);
        assert_eq!(std::fs::read(img.path()).unwrap(), data);
        assert!(blk.detach());
        assert!(!blk.detach(), "a second detach changes nothing");
        assert_eq!(blk.capacity_sectors(), 1);
        rig.request(T_IN, 1, 512, true);
        blk.process(&mut rig.q.queue, &rig.mem);
        assert_eq!(rig.status(), S_IOERR, "past the placeholder's end");
    }

    #[test]
    fn only_regular_files_and_block_devices_are_attached() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: mkfifo(3) on a NUL-terminated path we own.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        for ro in [true, false] {
            let e = Backing::open(&fifo, ro).err().unwrap().to_string();
            assert!(e.contains("a FIFO"), "{e}");
        }
        let e = Backing::open(dir.path(), true).err().unwrap().to_string();
        assert!(e.contains("a directory"), "{e}");
        let (img, _) = disk(2);
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(img.path(), &link).unwrap();
        let e = Backing::open(&link, true).err().unwrap().to_string();
        assert!(e.contains("symbolic link"), "{e}");
        let e = Backing::open(&dir.path().join("absent"), true)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("absent"), "{e}");
    }

    #[test]
    fn malformed_chains_fail_the_request_not_the_device() {
        let (f, _) = disk(4);
        let mut blk = Block::new(f.path(), false, None).unwrap();
        let mut rig = Rig::new();
        // Wrong direction: data of a read is device-readable.
        rig.request(T_IN, 0, 512, false);
        blk.process(&mut rig.q.queue, &rig.mem);
        assert_eq!(blk.malformed, 1);
        // Data address outside guest memory.
        rig.header(0x4000, T_IN, 0);
        rig.desc(0, 0x4000, 16, NEXT, 1);
        rig.desc(1, 0xffff_0000, 512, NEXT | WRITE, 2);
        rig.desc(2, 0x6000, 1, WRITE, 0);
        rig.mem.write_obj(0xffu8, GA(0x6000)).unwrap();
        rig.submit(0);
        blk.process(&mut rig.q.queue, &rig.mem);
        assert_eq!(rig.status(), S_IOERR);
        // A descriptor loop: 0 -> 1 -> 0 ...; the chain iterator's TTL ends it.
        rig.desc(0, 0x4000, 16, NEXT, 1);
        rig.desc(1, 0x5000, 512, NEXT | WRITE, 0);
        rig.submit(0);
        blk.process(&mut rig.q.queue, &rig.mem);
        // A chain longer than the queue (next index out of range).
        rig.desc(0, 0x4000, 16, NEXT, 15);
        rig.desc(15, 0x5000, 512, NEXT | WRITE, 200);
        rig.submit(0);
        blk.process(&mut rig.q.queue, &rig.mem);
        // Header that is device-writable.
        rig.desc(0, 0x4000, 16, NEXT | WRITE, 2);
        rig.submit(0);
        blk.process(&mut rig.q.queue, &rig.mem);
        assert_eq!(blk.malformed, 4);
        // Head index outside the queue.
        rig.submit(300);
        blk.process(&mut rig.q.queue, &rig.mem);
        // The device still serves a good request afterwards.
        rig.request(T_IN, 1, 512, true);
        blk.process(&mut rig.q.queue, &rig.mem);
        assert_eq!(rig.status(), S_OK);
    }

    #[test]
    fn over_long_id_is_refused_not_cut() {
        let (f, _) = disk(1);
        let id = "abcdefghij0123456789";
        let mut blk = Block::new(f.path(), false, Some(id)).unwrap();
        let mut rig = Rig::new();
        rig.request(T_GET_ID, 0, 20, true);
        blk.process(&mut rig.q.queue, &rig.mem);
        let mut got = [0u8; 20];
        rig.mem.read_slice(&mut got, GA(0x5000)).unwrap();
        assert_eq!(&got, id.as_bytes(), "a 20-byte id is kept whole");
        let long = format!("{id}X");
        let e = Block::new(f.path(), false, Some(&long)).err().unwrap();
        assert!(matches!(e, BlockError::Id { len: 21, .. }), "{e}");
        assert!(e.to_string().contains("at most 20 bytes"), "{e}");
    }

    #[test]
    fn missing_backing_file_is_a_clear_error() {
        let e = Block::new(Path::new("/nonexistent/disk.img"), true, None)
            .err()
            .unwrap();
        let msg = e.to_string();
        assert!(
            msg.contains("/nonexistent/disk.img") && msg.contains("read-only"),
            "{msg}"
        );
    }
}
