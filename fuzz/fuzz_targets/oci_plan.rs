//! OCI spec → container plan (`agent::spawn::Plan::for_container`): any spec JSON must become a
//! plan or a refusal, never a panic. Plans only describe mounts and processes; nothing runs.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use protocol::RootfsSource;

static ROOT: OnceLock<tempfile::TempDir> = OnceLock::new();

fuzz_target!(|data: &[u8]| {
    let Ok(spec) = serde_json::from_slice::<oci_spec::runtime::Spec>(data) else {
        return;
    };
    let root = ROOT.get_or_init(|| {
        let d = tempfile::tempdir().expect("a temporary root");
        std::fs::create_dir_all(d.path().join("rootfs/bin")).expect("a rootfs");
        d
    });
    let dir = root.path();
    for source in [
        RootfsSource::Bind {
            path: dir.join("rootfs").to_string_lossy().into_owned(),
        },
        RootfsSource::Overlay {
            lower: dir.join("rootfs").to_string_lossy().into_owned(),
        },
    ] {
        let _ = agent::spawn::Plan::for_container(&spec, &source, &dir.join("scratch"));
    }
});
