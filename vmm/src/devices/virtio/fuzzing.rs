//! Fuzzing entry (`fuzz/fuzz_targets/virtio_*.rs`): a device's queue processing driven with guest
//! memory and a queue layout taken from fuzz input. Not an API.

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};

use super::VirtioDevice;
use crate::memory::GuestMemory;

/// Guest memory of a fuzzed queue: 64 KiB at guest address 0.
pub const MEM_SIZE: usize = 0x1_0000;
/// Most queues a fuzzed device may have.
pub const MAX_QUEUES: usize = 4;
/// Input bytes that set up the queues (8 per queue, then event-idx and round-count bytes); they
/// are guest memory too.
pub const HEADER: usize = MAX_QUEUES * 8 + 2;

/// Fills guest memory with `data`, then sets up every queue of `dev` at addresses (and a size)
/// read from the first [`HEADER`] bytes of `data`, and processes them (and the back-end) a few
/// times.
/// Invalid layouts are skipped, as the transport refuses them; everything else the guest
/// controls reaches the device.
pub fn drive(dev: &mut dyn VirtioDevice, data: &[u8]) {
    let Ok(mem) = GuestMemory::from_ranges(&[(GuestAddress(0), MEM_SIZE)]) else {
        return;
    };
    let n = data.len().min(MEM_SIZE);
    if mem.write_slice(&data[..n], GuestAddress(0)).is_err() || data.len() < HEADER {
        return;
    }
    let word = |i: usize| u16::from_le_bytes([data[i], data[i + 1]]);
    let max = dev.queue_max_sizes().to_vec();
    if max.len() > MAX_QUEUES {
        return;
    }
    let mut queues: Vec<Queue> = Vec::new();
    for (q, &max_size) in max.iter().enumerate() {
        let Ok(mut queue) = Queue::new(max_size) else {
            return;
        };
        // Queue q's layout: bytes 8q..8q+8 (size exponent, descriptor table, driver area,
        // device area).
        let o = q * 8;
        let size = 1u16 << (word(o) % (max_size.trailing_zeros() as u16 + 1));
        queue.set_size(size);
        queue.set_desc_table_address(Some(u32::from(word(o + 2)) & !0xf), Some(0));
        queue.set_avail_ring_address(Some(u32::from(word(o + 4)) & !0x1), Some(0));
        queue.set_used_ring_address(Some(u32::from(word(o + 6)) & !0x3), Some(0));
        queue.set_event_idx(data[HEADER - 2] & 1 != 0);
        queue.set_ready(true);
        if !queue.is_valid(&mem) {
            return;
        }
        queues.push(queue);
    }
    let rounds = 1 + usize::from(data[HEADER - 1] % 4);
    for r in 0..rounds {
        for q in 0..queues.len() {
            let _ = dev.process_queue((q + r) % queues.len(), &mut queues, &mem);
        }
        let _ = dev.process_backend(&mut queues, &mem);
    }
}

/// The driver features a fuzzed driver acks: of the device's `offered` bits, in order, those
/// whose bit in `pick` is set (bit i of `pick` for the i-th offered feature, cycling).
pub fn features_from(offered: u64, pick: u16) -> u64 {
    let mut acked = 0;
    let mut i = 0;
    for bit in 0..64 {
        if offered & (1 << bit) != 0 {
            if pick & (1 << (i % 16)) != 0 {
                acked |= 1 << bit;
            }
            i += 1;
        }
    }
    acked
}
