//! virtio-blk queue processing with fuzzed guest memory: descriptor chains, headers, sectors and
//! lengths all come from the input; a request may fail, the VMM must not.
#![no_main]

use std::sync::Mutex;

use libfuzzer_sys::fuzz_target;
use vmm::devices::virtio::block::Block;

struct Rig {
    _dir: tempfile::TempDir,
    dev: Block,
}

static RIG: Mutex<Option<Rig>> = Mutex::new(None);

fuzz_target!(|data: &[u8]| {
    let mut guard = RIG.lock().unwrap_or_else(|p| p.into_inner());
    let rig = guard.get_or_insert_with(|| {
        // On tmpfs: a flush is an fsync, which on a busy disk can take seconds per input.
        let dir = tempfile::tempdir_in("/dev/shm")
            .or_else(|_| tempfile::tempdir())
            .expect("a temporary directory");
        let path = dir.path().join("disk.img");
        std::fs::write(&path, vec![0u8; 64 * 512]).expect("a disk image");
        let dev = Block::new(&path, false, Some("fuzz")).expect("the block device");
        Rig { _dir: dir, dev }
    });
    vmm::devices::virtio::fuzzing::drive(&mut rig.dev, data);
});
