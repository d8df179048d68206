//! The control API parser (`vmm_api::parse_request`): any line must parse or be refused, never
//! panic; what parses must validate without panicking and survive re-encoding.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vmm_api::Request;

fuzz_target!(|data: &[u8]| {
    let Ok(req) = vmm_api::parse_request(data) else {
        return;
    };
    if let Request::Restore(opts) = &req {
        let _ = opts.validate();
    }
    let line = vmm_api::encode_request(&req).expect("a parsed request re-encodes");
    vmm_api::parse_request(&line).expect("a re-encoded request parses");
});
