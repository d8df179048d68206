//! Test rig: split virtqueues laid out by hand in guest memory, driven like a guest driver would.

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress as GA};

use crate::memory::GuestMemory;

/// Descriptor flag: the chain continues.
pub const NEXT: u16 = 1;
/// Descriptor flag: device-writable.
pub const WRITE: u16 = 2;
/// Queue size of every test queue.
pub const SIZE: u16 = 16;

/// 1 MiB of guest memory for tests.
pub fn memory() -> GuestMemory {
    GuestMemory::from_ranges(&[(GA(0), 0x10_0000)]).unwrap()
}

/// A queue whose descriptor table is at `base`, driver area at `base + 0x1000`, device area at
/// `base + 0x2000`.
pub struct TestQueue {
    /// The device-side queue.
    pub queue: Queue,
    base: u64,
    avail_idx: u16,
}

impl TestQueue {
    /// A ready queue at `base`.
    pub fn new(mem: &GuestMemory, base: u64) -> Self {
        let mut queue = Queue::new(SIZE).unwrap();
        queue.set_size(SIZE);
        queue.set_desc_table_address(Some(base as u32), Some(0));
        queue.set_avail_ring_address(Some(base as u32 + 0x1000), Some(0));
        queue.set_used_ring_address(Some(base as u32 + 0x2000), Some(0));
        queue.set_ready(true);
        assert!(queue.is_valid(mem));
        Self {
            queue,
            base,
            avail_idx: 0,
        }
    }

    /// Writes descriptor `i`.
    pub fn desc(&self, mem: &GuestMemory, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let d = self.base + u64::from(i) * 16;
        mem.write_obj(addr, GA(d)).unwrap();
        mem.write_obj(len, GA(d + 8)).unwrap();
        mem.write_obj(flags, GA(d + 12)).unwrap();
        mem.write_obj(next, GA(d + 14)).unwrap();
    }

    /// Makes the chain starting at `head` available.
    pub fn submit(&mut self, mem: &GuestMemory, head: u16) {
        let slot = self.base + 0x1000 + 4 + u64::from(self.avail_idx % SIZE) * 2;
        mem.write_obj(head, GA(slot)).unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        mem.write_obj(self.avail_idx, GA(self.base + 0x1000 + 2))
            .unwrap();
    }

    /// The device's used index.
    pub fn used_idx(&self, mem: &GuestMemory) -> u16 {
        mem.read_obj(GA(self.base + 0x2000 + 2)).unwrap()
    }

    /// Used element `n` as (descriptor id, length).
    pub fn used(&self, mem: &GuestMemory, n: u16) -> (u32, u32) {
        let e = self.base + 0x2000 + 4 + u64::from(n % SIZE) * 8;
        (
            mem.read_obj(GA(e)).unwrap(),
            mem.read_obj(GA(e + 4)).unwrap(),
        )
    }
}
