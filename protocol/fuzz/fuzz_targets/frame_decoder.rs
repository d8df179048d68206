//! `cargo fuzz run frame_decoder` (from protocol/): arbitrary bytes through the frame decoder and
//! every message parser must never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use protocol::{Event, FrameDecoder, Request, Response};

fuzz_target!(|data: &[u8]| {
    let split = data.first().map_or(0, |b| *b as usize % (data.len().max(1)));
    let mut d = FrameDecoder::new();
    d.push(&data[..split]);
    d.push(&data[split..]);
    while let Ok(Some(f)) = d.next_frame() {
        let _ = Request::from_frame(&f);
        let _ = Response::from_frame(&f);
        let _ = Event::from_frame(&f);
        let _ = protocol::stream::parse_window(&f);
    }
    let _ = protocol::frame::read_frame(&mut &data[..]);
});
