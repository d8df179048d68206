//! The committed seed corpus of `protocol/fuzz` stays valid: every seed decodes into frames the
//! parsers accept. When this fails after a protocol change, regenerate the seeds with
//! `cargo run -p protocol --example gen_fuzz_seeds` and commit them.

use std::path::PathBuf;

use protocol::{Event, FrameDecoder, FrameKind, Request, Response};

#[test]
fn every_seed_decodes_into_valid_frames() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/frame_decoder");
    let mut seeds = 0;
    let mut kinds = std::collections::HashSet::new();
    let mut ops = std::collections::HashSet::new();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let data = std::fs::read(&path).unwrap();
        let mut d = FrameDecoder::new();
        d.push(&data);
        let mut frames = 0;
        while let Some(f) = d
            .next_frame()
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        {
            frames += 1;
            kinds.insert(f.kind as u8);
            match f.kind {
                FrameKind::Request => {
                    let r = Request::from_frame(&f)
                        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                    let v = serde_json::to_value(&r).unwrap();
                    ops.insert(v["op"].as_str().unwrap_or_default().to_string());
                }
                FrameKind::Response => {
                    Response::from_frame(&f).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                }
                FrameKind::Event => {
                    Event::from_frame(&f).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                }
                FrameKind::Window => {
                    protocol::stream::parse_window(&f)
                        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                }
                FrameKind::Data | FrameKind::Close => {}
            }
        }
        assert!(frames > 0, "{} holds no complete frame", path.display());
        seeds += 1;
    }
    assert!(seeds >= 30, "{seeds} seeds in {}", dir.display());
    assert_eq!(kinds.len(), 6, "every frame kind has a seed: {kinds:?}");
    assert_eq!(ops.len(), 17, "every request op has a seed: {ops:?}");
}
