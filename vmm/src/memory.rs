//! Guest RAM: one memfd, mapped `MAP_SHARED` into the VMM and registered with KVM.
//!
//! RAM below the 32-bit MMIO gap is region 0; whatever does not fit continues at 4 GiB as region 1.
//! Both regions are windows of the same memfd, so a snapshot can write (and a clone can map) guest
//! memory as one file.

use std::fs::File;
use std::os::fd::FromRawFd;
use std::sync::Arc;

use vm_memory::{FileOffset, GuestAddress, GuestMemoryRegion};

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

/// Guest RAM and the memfd behind it.
pub struct GuestRam {
    /// The mapped regions.
    pub mem: GuestMemory,
    /// The memfd holding every byte of guest RAM (region `i` at the file offset of its start).
    pub memfd: Arc<File>,
    /// Total RAM in bytes.
    pub size: u64,
    /// The mapping is `MAP_PRIVATE` over a template file: guest writes are not in `memfd`.
    pub private: bool,
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

impl GuestRam {
    /// Creates `size` bytes of zeroed guest RAM backed by a fresh memfd.
    pub fn new(size: u64) -> Result<Self, MemoryError> {
        let err = |source| MemoryError::Memfd {
            size_mib: size >> 20,
            source,
        };
        // SAFETY: the name is a valid NUL-terminated string; the returned fd is checked.
        let fd = unsafe { libc::memfd_create(c"runv-guest-ram".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(err(std::io::Error::last_os_error()));
        }
        // SAFETY: fd is a freshly created memfd that nothing else owns.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(size).map_err(err)?;
        let memfd = Arc::new(file);
        let mut offset = 0;
        let ranges: Vec<_> = ram_ranges(size)
            .into_iter()
            .map(|(start, len)| {
                let fo = FileOffset::from_arc(memfd.clone(), offset);
                offset += len;
                (GuestAddress(start), len as usize, Some(fo))
            })
            .collect();
        let mem = GuestMemory::from_ranges_with_files(ranges)
            .map_err(|e| MemoryError::Map(e.to_string()))?;
        Ok(Self {
            mem,
            memfd,
            size,
            private: false,
        })
    }

    /// Maps the memory file at `path` copy-on-write (`MAP_PRIVATE`) as `size` bytes of guest RAM:
    /// every clone mapping the same file shares its page cache; guest writes stay private.
    pub fn map_private(path: &std::path::Path, size: u64) -> Result<Self, MemoryError> {
        let file = File::open(path).map_err(|source| MemoryError::Memfd {
            size_mib: size >> 20,
            source,
        })?;
        let len = file.metadata().map(|m| m.len()).unwrap_or(0);
        if len != size {
            return Err(MemoryError::Map(format!(
                "{} is {len} bytes, the snapshot's guest RAM is {size}",
                path.display()
            )));
        }
        let memfd = Arc::new(file);
        let mut offset = 0;
        let mut regions = Vec::new();
        for (start, len) in ram_ranges(size) {
            let region = vm_memory::MmapRegion::build(
                Some(FileOffset::from_arc(memfd.clone(), offset)),
                len as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_NORESERVE,
            )
            .map_err(|e| MemoryError::Map(e.to_string()))?;
            offset += len;
            regions.push(
                vm_memory::GuestRegionMmap::new(region, GuestAddress(start))
                    .ok_or_else(|| MemoryError::Map("region overflows".into()))?,
            );
        }
        let mem =
            GuestMemory::from_regions(regions).map_err(|e| MemoryError::Map(e.to_string()))?;
        Ok(Self {
            mem,
            memfd,
            size,
            private: true,
        })
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
        let mut b = [0u8; 4];
        std::os::unix::fs::FileExt::read_exact_at(&*ram.memfd, &mut b, 0x1000).unwrap();
        assert_eq!(u32::from_le_bytes(b), 0xdead_beef);
        assert_eq!(ram.regions().len(), 1);
    }
}
