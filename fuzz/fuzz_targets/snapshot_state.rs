//! The snapshot state decoder (`snapshot::state::decode`) over a VM's state type: any state file
//! must be refused or decoded, never panic or allocate what its header claims without checking.
#![no_main]

use std::io::{Seek, SeekFrom, Write};
use std::path::Path;
use std::sync::Mutex;

use libfuzzer_sys::fuzz_target;

static FILE: Mutex<Option<std::fs::File>> = Mutex::new(None);

fuzz_target!(|data: &[u8]| {
    let mut guard = FILE.lock().unwrap_or_else(|p| p.into_inner());
    let f = guard.get_or_insert_with(|| tempfile::tempfile().expect("a temporary file"));
    f.set_len(0).expect("truncating the state file");
    f.seek(SeekFrom::Start(0)).expect("rewinding");
    f.write_all(data).expect("writing the state file");
    f.seek(SeekFrom::Start(0)).expect("rewinding");
    let _ = snapshot::state::decode::<vmm::MachineSnapshot>(f, Path::new("fuzz.state"), None);
});
