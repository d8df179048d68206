//! Fuzzing entry (`fuzz/fuzz_targets/virtio_*.rs`): a device's queue processing driven with guest
//! memory and a queue layout taken from fuzz input. Not an API.

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};

use super::VirtioDevice;
use crate::memory::GuestMemory;

/// Guest memory of a fuzzed queue: 64 KiB at guest address 0.
pub const MEM_SIZE: usize = 0x1_0000;

/// Fills guest memory with `data`, then sets up queue `index` of `dev` at addresses (and a size)
/// read from the first bytes of `data`, and processes it (and the back-end) a few times.
/// Invalid layouts are skipped, as the transport refuses them; everything else the guest
/// controls reaches the device.
pub fn drive(dev: &mut dyn VirtioDevice, data: &[u8]) {
    let Ok(mem) = GuestMemory::from_ranges(&[(GuestAddress(0), MEM_SIZE)]) else {
        return;
    };
    let n = data.len().min(MEM_SIZE);
    if mem.write_slice(&data[..n], GuestAddress(0)).is_err() || data.len() < 16 {
        return;
    }
    let word = |i: usize| u16::from_le_bytes([data[i], data[i + 1]]);
    let max = dev.queue_max_sizes().to_vec();
    let mut queues: Vec<Queue> = Vec::new();
    for (q, &max_size) in max.iter().enumerate() {
        let Ok(mut queue) = Queue::new(max_size) else {
            return;
        };
        // Layout of each queue from bytes 0..12 (shifted per queue), size a power of two.
        let o = (q * 2) % 8;
        let size = 1u16 << (word(o) % (max_size.trailing_zeros() as u16 + 1));
        queue.set_size(size);
        queue.set_desc_table_address(Some(u32::from(word(o + 2)) & !0xf), Some(0));
        queue.set_avail_ring_address(Some(u32::from(word(o + 4)) & !0x1), Some(0));
        queue.set_used_ring_address(Some(u32::from(word(o + 6)) & !0x3), Some(0));
        queue.set_event_idx(data[14] & 1 != 0);
        queue.set_ready(true);
        if !queue.is_valid(&mem) {
            return;
        }
        queues.push(queue);
    }
    let rounds = 1 + usize::from(data[15] % 4);
    for r in 0..rounds {
        for q in 0..queues.len() {
            let _ = dev.process_queue((q + r) % queues.len(), &mut queues, &mem);
        }
        let _ = dev.process_backend(&mut queues, &mem);
    }
}
