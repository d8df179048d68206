//! virtio-vsock queue processing (rx, tx, event) with fuzzed guest memory: packet headers, ops,
//! ports, lengths and chains all come from the input. Guest connections go to a Unix socket
//! path nobody listens on, so they are refused like a real stale host socket.
#![no_main]

use std::sync::Mutex;

use libfuzzer_sys::fuzz_target;
use vmm::devices::virtio::vsock::Vsock;

struct Rig {
    _dir: tempfile::TempDir,
    dev: Vsock,
}

static RIG: Mutex<Option<Rig>> = Mutex::new(None);

fuzz_target!(|data: &[u8]| {
    let mut guard = RIG.lock().unwrap_or_else(|p| p.into_inner());
    let rig = guard.get_or_insert_with(|| {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let dev = Vsock::new(3, &dir.path().join("v.sock")).expect("the vsock device");
        Rig { _dir: dir, dev }
    });
    vmm::devices::virtio::fuzzing::drive(&mut rig.dev, data);
});
