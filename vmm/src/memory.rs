//! Guest RAM: an anonymous reservation registered with KVM, over which the VM's memory (a fresh
//! memfd, or a snapshot's memory file) is mapped.
//!
//! RAM below the 32-bit MMIO gap is region 0; whatever does not fit continues at 4 GiB as region 1.
//! Both regions are windows of the same file, so a snapshot can write (and a clone can map) guest
//! memory as one file.

use std::fs::File;
use std::os::fd::FromRawFd;
use std::sync::Arc;

use vm_memory::{GuestAddress, GuestMemoryRegion};

use crate::layout::{MMIO_GAP_END, MMIO_GAP_START};

/// Guest memory as used by the whole VMM and its devices.
pub type GuestMemory = vm_memory::GuestMemoryMmap<()>;

/// Error creating guest memory.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// memfd_create or ftruncate failed.
    #[error("creating the {size_mib} MiB guest memory memfd failed: {source} (check free memory and RLIMIT_MEMLOCK)")]
    Memfd {
        /// Requested size.
        size_mib: u64,
        /// Cause.
        source: std::io::Error,
    },
    /// Mapping the memfd failed.
    #[error("mapping guest memory failed: {0}")]
    Map(String),
}

/// What backs guest RAM.
#[derive(Debug, Clone)]
pub enum Backing {
    /// Anonymous memory: an empty shell, or a clone served by userfaultfd `MISSING` faults.
    Anonymous,
    /// A memfd mapped `MAP_SHARED`: the file holds every byte the guest wrote.
    Memfd(Arc<File>),
    /// A template file mapped `MAP_PRIVATE`: clones share its page cache, writes are private.
    PrivateFile(Arc<File>),
}

/// Guest RAM: one contiguous host reservation, split into regions around the MMIO gap.
pub struct GuestRam {
    /// The mapped regions.
    pub mem: GuestMemory,
    /// What the regions map.
    pub backing: Backing,
    /// Total RAM in bytes.
    pub size: u64,
}

/// The `(guest address, length)` of each RAM region for `size` bytes of RAM.
pub fn ram_ranges(size: u64) -> Vec<(u64, u64)> {
    let low = size.min(MMIO_GAP_START);
    let mut ranges = vec![(0, low)];
    if size > low {
        ranges.push((MMIO_GAP_END, size - low));
    }
    ranges
}

fn map_err(e: impl std::fmt::Display) -> MemoryError {
    MemoryError::Map(e.to_string())
}

impl GuestRam {
    /// Creates `size` bytes of zeroed guest RAM backed by a fresh memfd.
    pub fn new(size: u64) -> Result<Self, MemoryError> {
        let mut ram = Self::reserve(size)?;
        ram.map_memfd()?;
        Ok(ram)
    }

    /// Reserves `size` bytes of anonymous guest RAM (no memory is committed until touched).
    ///
    /// A VM shell registers these addresses with KVM ahead of time; a restore later maps the
    /// clone's memory over them with `MAP_FIXED`, which keeps the memslots valid.
    pub fn reserve(size: u64) -> Result<Self, MemoryError> {
        let mut regions = Vec::new();
        for (start, len) in ram_ranges(size) {
            let region = vm_memory::MmapRegion::build(
                None,
                len as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            )
            .map_err(map_err)?;
            regions.push(
                vm_memory::GuestRegionMmap::new(region, GuestAddress(start))
                    .ok_or_else(|| MemoryError::Map("region overflows".into()))?,
            );
        }
        let mem = GuestMemory::from_regions(regions).map_err(map_err)?;
        Ok(Self {
            mem,
            backing: Backing::Anonymous,
            size,
        })
    }

    /// Replaces the contents with a fresh zeroed memfd mapped `MAP_SHARED`.
    pub fn map_memfd(&mut self) -> Result<Arc<File>, MemoryError> {
        let err = |source| MemoryError::Memfd {
            size_mib: self.size >> 20,
            source,
        };
        // SAFETY: the name is a valid NUL-terminated string; the returned fd is checked.
        let fd = unsafe { libc::memfd_create(c"runv-guest-ram".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(err(std::io::Error::last_os_error()));
        }
        // SAFETY: fd is a freshly created memfd that nothing else owns.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(self.size).map_err(err)?;
        let file = Arc::new(file);
        self.map_over(&file, libc::MAP_SHARED)?;
        self.backing = Backing::Memfd(file.clone());
        Ok(file)
    }

    /// Replaces the contents with the memory file `file` mapped copy-on-write (`MAP_PRIVATE`):
    /// every clone mapping the same file shares its page cache. The file must be at least as
    /// large as guest RAM (a shorter one would fault the guest with SIGBUS past its end); bytes
    /// past RAM (a snapshot's trailer page) are not mapped.
    pub fn map_file_private(&mut self, file: Arc<File>) -> Result<(), MemoryError> {
        // snapshot: a v3 memory file is RAM followed by a trailer page; only [0, size) is mapped.
        let len = file.metadata().map(|m| m.len()).unwrap_or(0);
        if len < self.size {
            return Err(MemoryError::Map(format!(
                "the memory file is {len} bytes, shorter than guest RAM ({})",
                self.size
            )));
        }
        self.map_over(&file, libc::MAP_PRIVATE | libc::MAP_NORESERVE)?;
        self.backing = Backing::PrivateFile(file);
        Ok(())
    }

    /// Replaces the contents with fresh, untouched anonymous memory (for userfaultfd `MISSING`
    /// serving: whatever KVM or anything else populated in the reservation is dropped).
    pub fn map_anonymous(&mut self) -> Result<(), MemoryError> {
        self.map_over_fd(
            -1,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
        )?;
        self.backing = Backing::Anonymous;
        Ok(())
    }

    /// Maps `file` (RAM offset = file offset) over every region with `MAP_FIXED`.
    fn map_over(&self, file: &File, flags: libc::c_int) -> Result<(), MemoryError> {
        use std::os::fd::AsRawFd;
        self.map_over_fd(file.as_raw_fd(), flags)
    }

    fn map_over_fd(&self, fd: libc::c_int, flags: libc::c_int) -> Result<(), MemoryError> {
        let anonymous = flags & libc::MAP_ANONYMOUS != 0;
        let mut offset = 0u64;
        for (host, _, len) in self.regions() {
            // SAFETY: [host, host+len) is a mapping owned by `self.mem` (created in `reserve`);
            // MAP_FIXED replaces it in place with a mapping of the same size and protection, so
            // every pointer into guest RAM stays valid. The result is checked.
            let p = unsafe {
                libc::mmap(
                    host as *mut libc::c_void,
                    len as usize,
                    libc::PROT_READ | libc::PROT_WRITE,
                    flags | libc::MAP_FIXED,
                    fd,
                    if anonymous { 0 } else { offset as libc::off_t },
                )
            };
            if p == libc::MAP_FAILED || p as u64 != host {
                return Err(MemoryError::Map(format!(
                    "mapping the memory file over guest RAM: {}",
                    std::io::Error::last_os_error()
                )));
            }
            offset += len;
        }
        Ok(())
    }

    /// True when guest writes are not visible through a shared memfd (read RAM via the mapping).
    pub fn is_private(&self) -> bool {
        !matches!(self.backing, Backing::Memfd(_))
    }

    /// Reads guest RAM at a RAM offset (regions laid end to end, as in the memory file).
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        use vm_memory::Bytes;
        let mut file_off = 0;
        for (start, len) in ram_ranges(self.size) {
            if offset >= file_off && offset + buf.len() as u64 <= file_off + len {
                return self
                    .mem
                    .read_slice(buf, GuestAddress(start + offset - file_off))
                    .map_err(|e| std::io::Error::other(e.to_string()));
            }
            file_off += len;
        }
        Err(std::io::Error::other(format!(
            "RAM range {offset:#x}+{:#x} crosses a region boundary",
            buf.len()
        )))
    }

    /// Host address, guest address and size of each region, in order.
    pub fn regions(&self) -> Vec<(u64, u64, u64)> {
        use vm_memory::GuestMemoryBackend;
        self.mem
            .iter()
            .map(|r| (r.as_ptr() as u64, r.start_addr().0, r.len()))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    #[test]
    fn splits_around_the_mmio_gap_and_shares_one_memfd() {
        assert_eq!(ram_ranges(128 << 20), vec![(0, 128 << 20)]);
        assert_eq!(
            ram_ranges(4 << 30),
            vec![
                (0, MMIO_GAP_START),
                (MMIO_GAP_END, (4 << 30) - MMIO_GAP_START)
            ]
        );
        let ram = GuestRam::new(16 << 20).unwrap();
        ram.mem
            .write_obj(0xdead_beefu32, GuestAddress(0x1000))
            .unwrap();
        let Backing::Memfd(memfd) = &ram.backing else {
            panic!("GuestRam::new is memfd-backed")
        };
        let mut b = [0u8; 4];
        std::os::unix::fs::FileExt::read_exact_at(&**memfd, &mut b, 0x1000).unwrap();
        assert_eq!(u32::from_le_bytes(b), 0xdead_beef);
        assert_eq!(ram.regions().len(), 1);
    }
}
