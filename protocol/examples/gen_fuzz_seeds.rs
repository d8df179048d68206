//! Writes the seed corpus of the `frame_decoder` fuzz target from the real encoder:
//! `cargo run -p protocol --example gen_fuzz_seeds` (from anywhere in the workspace) replaces
//! `protocol/fuzz/corpus/frame_decoder/` with one file per seed. Rerun it whenever the protocol
//! changes and commit the result; `tests/fuzz_corpus.rs` fails while a seed no longer decodes.
//!
//! Seeds: every request kind, the common responses and events, `Data`/`Close`/`Window` frames,
//! and a few multi-frame streams like real sessions.

use std::path::PathBuf;

use protocol::stream;
use protocol::{
    ContainerStatus, ErrorCode, Event, ExitStatus, Frame, FrameKind, InterfaceConfig, Request,
    Response, RootfsSource, RouteConfig, StdioConfig, Streams, Writable, PROTOCOL_VERSION,
};

fn small_spec() -> Box<oci_spec::runtime::Spec> {
    let json = r#"{"ociVersion":"1.0.2","process":{"terminal":false,"user":{"uid":0,"gid":0},
        "args":["sh","-c","echo hi"],"env":["PATH=/bin"],"cwd":"/"},
        "root":{"path":"rootfs","readonly":true},"hostname":"c1",
        "linux":{"namespaces":[{"type":"pid"},{"type":"mount"}]}}"#;
    Box::new(serde_json::from_str(json).unwrap_or_else(|e| panic!("seed spec: {e}")))
}

fn small_process() -> Box<oci_spec::runtime::Process> {
    let json = r#"{"terminal":true,"user":{"uid":0,"gid":0},"args":["cat"],"cwd":"/"}"#;
    Box::new(serde_json::from_str(json).unwrap_or_else(|e| panic!("seed process: {e}")))
}

fn requests() -> Vec<(&'static str, Request)> {
    let id = || "c1".to_string();
    vec![
        ("ping", Request::Ping),
        (
            "create",
            Request::Create {
                id: id(),
                spec: small_spec(),
                rootfs: RootfsSource::Bind {
                    path: "/run/bundle/rootfs".into(),
                },
                stdio: StdioConfig::default(),
            },
        ),
        (
            "create_overlay_tty",
            Request::Create {
                id: id(),
                spec: small_spec(),
                rootfs: RootfsSource::Overlay {
                    lower: "/images/busybox".into(),
                },
                stdio: StdioConfig {
                    terminal: true,
                    stdin: true,
                },
            },
        ),
        (
            "create_block",
            Request::Create {
                id: id(),
                spec: small_spec(),
                rootfs: RootfsSource::Block {
                    serial: "rootfs0".into(),
                    fstype: "erofs".into(),
                    writable: Writable::Block {
                        serial: "scratch0".into(),
                    },
                },
                stdio: StdioConfig::default(),
            },
        ),
        (
            "create_image",
            Request::Create {
                id: id(),
                spec: small_spec(),
                rootfs: RootfsSource::Image {
                    path: "/var/lib/runv/images/k.erofs".into(),
                    fstype: "erofs".into(),
                    writable: Writable::Tmpfs,
                },
                stdio: StdioConfig::default(),
            },
        ),
        ("start", Request::Start { id: id() }),
        (
            "exec",
            Request::Exec {
                id: id(),
                exec_id: "e1".into(),
                process: small_process(),
                stdio: StdioConfig {
                    terminal: true,
                    stdin: true,
                },
            },
        ),
        (
            "signal",
            Request::Signal {
                id: id(),
                exec_id: Some("e1".into()),
                signal: 15,
                all: false,
            },
        ),
        (
            "wait",
            Request::Wait {
                id: id(),
                exec_id: None,
            },
        ),
        ("state", Request::State { id: id() }),
        ("ps", Request::Ps { id: id() }),
        ("stats", Request::Stats { id: id() }),
        ("destroy", Request::Destroy { id: id() }),
        (
            "resize_tty",
            Request::ResizeTty {
                id: id(),
                exec_id: None,
                rows: 50,
                cols: 120,
            },
        ),
        (
            "close_stdin",
            Request::CloseStdin {
                id: id(),
                exec_id: Some("e1".into()),
            },
        ),
        (
            "reseed",
            Request::Reseed {
                entropy: (0..32).collect(),
            },
        ),
        (
            "set_clock",
            Request::SetClock {
                unix_nanos: 1_764_000_000_000_000_000,
            },
        ),
        (
            "set_hostname",
            Request::SetHostname {
                hostname: "sandbox-1".into(),
            },
        ),
        ("list", Request::List),
        (
            "set_network",
            Request::SetNetwork {
                interfaces: vec![InterfaceConfig {
                    name: "eth0".into(),
                    mac: Some("02:00:00:00:00:07".into()),
                    addresses: vec!["10.0.0.2/24".into()],
                    mtu: Some(1500),
                }],
                routes: vec![RouteConfig {
                    destination: "default".into(),
                    gateway: "10.0.0.1".into(),
                }],
                dns: vec!["10.0.0.53".into()],
            },
        ),
    ]
}

fn exit_status() -> ExitStatus {
    ExitStatus {
        code: 137,
        signal: Some(9),
        oom_killed: false,
    }
}

fn responses() -> Vec<(&'static str, Response)> {
    vec![
        (
            "pong",
            Response::Pong {
                version: PROTOCOL_VERSION,
                uptime_ms: 12,
                ready: true,
                agent_version: "0.1.0".into(),
            },
        ),
        (
            "created",
            Response::Created {
                id: "c1".into(),
                pid: 42,
                streams: Streams {
                    stdin: Some(3),
                    stdout: 1,
                    stderr: Some(2),
                },
            },
        ),
        (
            "exited",
            Response::Exited {
                id: "c1".into(),
                exec_id: None,
                status: exit_status(),
            },
        ),
        (
            "state",
            Response::State(protocol::ContainerState {
                id: "c1".into(),
                status: ContainerStatus::Running,
                pid: 42,
                rootfs: "/run/bundle/rootfs".into(),
                exit: None,
            }),
        ),
        ("ok", Response::Ok),
        (
            "error",
            Response::error(ErrorCode::ResourceExhausted, "no thread for a connection"),
        ),
    ]
}

fn events() -> Vec<(&'static str, Event)> {
    vec![
        (
            "exited",
            Event::Exited {
                id: "c1".into(),
                exec_id: Some("e1".into()),
                status: exit_status(),
            },
        ),
        ("oom", Event::Oom { id: "c1".into() }),
    ]
}

fn bytes(frames: &[Frame]) -> Vec<u8> {
    frames.iter().flat_map(|f| f.to_bytes()).collect()
}

/// (file name, contents) of every seed.
fn seeds() -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    for (i, (name, r)) in requests().into_iter().enumerate() {
        out.push((format!("req_{name}"), r.to_frame(i as u32 + 1).to_bytes()));
    }
    for (name, r) in responses() {
        out.push((format!("resp_{name}"), r.to_frame(7).to_bytes()));
    }
    for (name, e) in events() {
        out.push((format!("event_{name}"), e.to_frame().to_bytes()));
    }
    out.push((
        "data".into(),
        Frame::new(FrameKind::Data, 3, b"echo hello\n".to_vec()).to_bytes(),
    ));
    out.push((
        "data_empty".into(),
        Frame::new(FrameKind::Data, 1, Vec::new()).to_bytes(),
    ));
    out.push(("close".into(), stream::close_frame(3).to_bytes()));
    out.push((
        "window".into(),
        stream::window_frame(1, stream::INITIAL_WINDOW).to_bytes(),
    ));
    // A session: create, start, stdin, credit, close stdin, wait, destroy.
    out.push((
        "stream_session".into(),
        bytes(&[
            requests()[1].1.to_frame(1),
            Request::Start { id: "c1".into() }.to_frame(2),
            Frame::new(FrameKind::Data, 3, b"line one\nline two\n".to_vec()),
            stream::window_frame(1, 65536),
            stream::window_frame(2, 4096),
            stream::close_frame(3),
            Request::Wait {
                id: "c1".into(),
                exec_id: None,
            }
            .to_frame(3),
            Request::Destroy { id: "c1".into() }.to_frame(4),
        ]),
    ));
    // Clone hooks as a restored guest gets them.
    out.push((
        "stream_clone_hooks".into(),
        bytes(&[
            Request::Ping.to_frame(1),
            requests()[13].1.to_frame(2),
            requests()[14].1.to_frame(3),
            requests()[15].1.to_frame(4),
            Request::List.to_frame(5),
        ]),
    ));
    // The agent's side: responses, output, events.
    out.push((
        "stream_agent_output".into(),
        bytes(&[
            responses()[1].1.to_frame(1),
            Response::Started { id: "c1".into() }.to_frame(2),
            Frame::new(FrameKind::Data, 1, b"hi\n".to_vec()),
            stream::close_frame(1),
            stream::close_frame(2),
            events()[0].1.to_frame(),
            responses()[2].1.to_frame(3),
        ]),
    ));
    // A valid frame followed by a truncated one.
    let mut tail = Request::Ping.to_frame(1).to_bytes();
    tail.extend_from_slice(&Request::List.to_frame(2).to_bytes()[..10]);
    out.push(("stream_truncated_tail".into(), tail));
    out
}

fn main() -> std::io::Result<()> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/frame_decoder");
    if dir.exists() {
        std::fs::remove_dir_all(&dir)?;
    }
    std::fs::create_dir_all(&dir)?;
    let seeds = seeds();
    for (name, data) in &seeds {
        std::fs::write(dir.join(name), data)?;
    }
    println!("wrote {} seeds to {}", seeds.len(), dir.display());
    Ok(())
}
