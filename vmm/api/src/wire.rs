//! JSON-lines framing of requests and replies.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::{ApiError, ErrorKind, Request};

/// Longest request or reply line in bytes, without its newline. A longer request is answered
/// with [`ErrorKind::TooLong`] and the connection is closed.
pub const MAX_LINE: usize = 64 * 1024;

const EXPECTED: &str =
    "expected {\"cmd\": \"status\"|\"pause\"|\"resume\"|\"shutdown\"|\"snapshot\"|\"restore\"|\"activate\", ...}";

/// Parses one request line (without its newline).
pub fn parse_request(line: &[u8]) -> Result<Request, ApiError> {
    if line.len() > MAX_LINE {
        return Err(ApiError::new(
            ErrorKind::TooLong,
            format!("request line of {} bytes exceeds {MAX_LINE}", line.len()),
        ));
    }
    serde_json::from_slice(line).map_err(|e| {
        ApiError::new(
            ErrorKind::BadRequest,
            format!("bad request: {e}; {EXPECTED}"),
        )
    })
}

/// Encodes `req` as one line (with its newline). Fails when a path is not UTF-8 (JSON strings
/// cannot carry it) or the line would exceed [`MAX_LINE`].
pub fn encode_request(req: &Request) -> Result<Vec<u8>, String> {
    let mut line = serde_json::to_vec(req).map_err(|e| {
        format!(
            "the {} request cannot be encoded: {e} (control paths must be valid UTF-8)",
            req.name()
        )
    })?;
    if line.len() > MAX_LINE {
        return Err(format!(
            "the {} request is {} bytes; the control socket accepts at most {MAX_LINE}",
            req.name(),
            line.len()
        ));
    }
    line.push(b'\n');
    Ok(line)
}

#[derive(Serialize)]
struct OkReply<'a, T> {
    ok: bool,
    #[serde(flatten)]
    body: &'a T,
}

#[derive(Serialize, Deserialize)]
struct ErrReply {
    ok: bool,
    #[serde(flatten)]
    error: ApiError,
}

/// Encodes a successful reply: `{"ok": true, ...fields of body}` and a newline.
pub fn encode_ok<T: Serialize>(body: &T) -> Vec<u8> {
    let mut line = serde_json::to_vec(&OkReply { ok: true, body }).unwrap_or_else(|e| {
        encode_error(&ApiError::new(
            ErrorKind::Failed,
            format!("encoding the reply: {e}"),
        ))
    });
    if line.last() != Some(&b'\n') {
        line.push(b'\n');
    }
    line
}

/// Encodes an error reply: `{"ok": false, "kind": ..., "error": ...}` and a newline.
pub fn encode_error(e: &ApiError) -> Vec<u8> {
    let reply = ErrReply {
        ok: false,
        error: e.clone(),
    };
    // Serialising two plain fields cannot fail; fall back to a fixed line all the same.
    let mut line = serde_json::to_vec(&reply).unwrap_or_else(|_| {
        br#"{"ok":false,"kind":"failed","error":"unencodable error"}"#.to_vec()
    });
    line.push(b'\n');
    line
}

/// Decodes a reply line into `T`, or the [`ApiError`] it carries.
pub fn decode_reply<T: DeserializeOwned>(line: &[u8]) -> Result<Result<T, ApiError>, String> {
    let mut v: serde_json::Value =
        serde_json::from_slice(line).map_err(|e| format!("reply is not JSON: {e}"))?;
    let obj = v
        .as_object_mut()
        .ok_or_else(|| "reply is not a JSON object".to_string())?;
    match obj.remove("ok") {
        Some(serde_json::Value::Bool(true)) => serde_json::from_value(v)
            .map(Ok)
            .map_err(|e| format!("reply does not decode: {e}")),
        Some(serde_json::Value::Bool(false)) => serde_json::from_value(v)
            .map(Err)
            .map_err(|e| format!("error reply does not decode: {e}")),
        _ => Err("reply has no boolean \"ok\"".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::*;
    use std::os::unix::ffi::OsStrExt;
    use std::path::PathBuf;

    #[test]
    fn every_request_round_trips() {
        let mut opts = RestoreOptions::new("/s\"quoted\"\nnewline", MemoryMode::Uffd);
        opts.clone_id = "c1".into();
        opts.block.push(BlockOverride {
            index: 0,
            path: "/b".into(),
        });
        opts.serial = SerialOutput::File("/tmp/serial \"x\"".into());
        for req in [
            Request::Status {},
            Request::Pause {},
            Request::Resume {},
            Request::Shutdown {},
            Request::Snapshot {
                dir: PathBuf::from("/tmp/a\"b\nc"),
            },
            Request::Restore(opts),
            Request::Activate {
                clone_id: "warm-1".into(),
                ipv4: None,
            },
            Request::Activate {
                clone_id: "warm-2".into(),
                ipv4: Some("10.200.0.2".parse().unwrap()),
            },
            Request::AttachDisk {
                slot: 1,
                path: PathBuf::from("/img \"x\"\n"),
                read_only: true,
                fd: false,
            },
            Request::AttachDisk {
                slot: 0,
                path: PathBuf::from("/img"),
                read_only: false,
                fd: true,
            },
            Request::DetachDisk { slot: 0 },
        ] {
            let line = encode_request(&req).unwrap();
            assert_eq!(line.iter().filter(|&&b| b == b'\n').count(), 1, "one line");
            let back = parse_request(&line[..line.len() - 1]).unwrap();
            assert_eq!(back, req);
        }
    }

    #[test]
    fn bad_requests_are_refused_with_a_kind() {
        for bad in [
            &b"nope"[..],
            br#"{"cmd":"fly"}"#,
            br#"{"cmd":"restore"}"#,
            br#"{"cmd":"restore","dir":"/s","mem_mode":"teleport"}"#,
            br#"{"cmd":"restore","dir":"/s","memmode":"copy"}"#,
            br#"{"cmd":"status","verbose":true}"#,
            br#"{"cmd":"snapshot","dir":"/s","force":true}"#,
            br#"{"nocmd":1}"#,
            br#"{"cmd":"attach_disk","slot":-1,"path":"/d"}"#,
            br#"{"cmd":"attach_disk","path":"/d"}"#,
            br#"{"cmd":"detach_disk","slot":0,"path":"/d"}"#,
            br#"{"cmd":"attach_disk","slot":0,"path":"/d","fd":1}"#,
            b"\xff",
        ] {
            let e = parse_request(bad).unwrap_err();
            assert_eq!(e.kind, ErrorKind::BadRequest, "{bad:?}");
        }
        let e = parse_request(br#"{"cmd":"restore","dir":"/s","memmode":"copy"}"#).unwrap_err();
        assert!(e.error.contains("memmode"), "{e}");
        let long = vec![b' '; MAX_LINE + 1];
        assert_eq!(parse_request(&long).unwrap_err().kind, ErrorKind::TooLong);
    }

    #[test]
    fn non_utf8_paths_are_refused_on_encode() {
        let dir = PathBuf::from(std::ffi::OsStr::from_bytes(b"/tmp/\xff\xfe"));
        let e = encode_request(&Request::Snapshot { dir }).unwrap_err();
        assert!(e.contains("UTF-8") && e.contains("snapshot"), "{e}");
    }

    #[test]
    fn replies_round_trip() {
        let line = encode_ok(&StateReply {
            state: VmState::Paused,
        });
        assert!(line.starts_with(br#"{"ok":true"#));
        let r: StateReply = decode_reply(&line).unwrap().unwrap();
        assert_eq!(r.state, VmState::Paused);
        let line = encode_error(&ApiError::new(ErrorKind::InvalidState, "no VM yet"));
        let e = decode_reply::<StateReply>(&line).unwrap().unwrap_err();
        assert_eq!(
            (e.kind, e.error.as_str()),
            (ErrorKind::InvalidState, "no VM yet")
        );
        assert!(decode_reply::<StateReply>(b"[]").is_err());
        assert!(decode_reply::<StateReply>(br#"{"ok":true}"#).is_err());
    }
}
