//! Requests, responses and events: JSON payloads of `Request`, `Response` and `Event` frames.

use serde::{Deserialize, Serialize};

use crate::frame::{Frame, FrameKind};

/// A request to the agent.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// Liveness, uptime and readiness.
    Ping,
    /// Create a container (its process waits for `Start`).
    Create {
        /// Container id.
        id: String,
        /// The bundle's `config.json`.
        spec: Box<oci_spec::runtime::Spec>,
        /// Where the root file system comes from.
        rootfs: RootfsSource,
        /// stdio of the container's process.
        #[serde(default)]
        stdio: StdioConfig,
    },
    /// Start a created container.
    Start {
        /// Container id.
        id: String,
    },
    /// Run an extra process in a running container.
    Exec {
        /// Container id.
        id: String,
        /// Id of the new process.
        exec_id: String,
        /// The process (args, env, cwd, user, terminal, ...).
        process: Box<oci_spec::runtime::Process>,
        /// Its stdio.
        #[serde(default)]
        stdio: StdioConfig,
    },
    /// Send a signal.
    Signal {
        /// Container id.
        id: String,
        /// A process started by `Exec`; `None` = the container's process.
        #[serde(default)]
        exec_id: Option<String>,
        /// Signal number.
        signal: i32,
        /// Every process of the container.
        #[serde(default)]
        all: bool,
    },
    /// Wait until a process exits; the response is `Exited`.
    Wait {
        /// Container id.
        id: String,
        /// A process started by `Exec`; `None` = the container's process.
        #[serde(default)]
        exec_id: Option<String>,
    },
    /// Container state.
    State {
        /// Container id.
        id: String,
    },
    /// Processes of a container (agent-side pids).
    Ps {
        /// Container id.
        id: String,
    },
    /// Resource usage.
    Stats {
        /// Container id.
        id: String,
    },
    /// Kill every process of the container and remove it.
    Destroy {
        /// Container id.
        id: String,
    },
    /// Resize a process's terminal.
    ResizeTty {
        /// Container id.
        id: String,
        /// Exec id, or the container's process.
        #[serde(default)]
        exec_id: Option<String>,
        /// Rows.
        rows: u16,
        /// Columns.
        cols: u16,
    },
    /// Close a process's stdin.
    CloseStdin {
        /// Container id.
        id: String,
        /// Exec id, or the container's process.
        #[serde(default)]
        exec_id: Option<String>,
    },
    /// Clone hook: mix host entropy into the guest RNG (`RNDADDENTROPY`).
    Reseed {
        /// Fresh random bytes (at most 512).
        entropy: Vec<u8>,
    },
    /// Clone hook: set the wall clock.
    SetClock {
        /// Nanoseconds since the Unix epoch.
        unix_nanos: i64,
    },
    /// Clone hook: set the sandbox hostname.
    SetHostname {
        /// Hostname.
        hostname: String,
    },
    /// Container ids.
    List,
}

/// Source of a container's root file system.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum RootfsSource {
    /// Use this directory as is (read-only if the spec's `root.readonly`).
    Bind {
        /// Directory.
        path: String,
    },
    /// This directory read-only, with a writable overlay upper layer on tmpfs.
    Overlay {
        /// Lower directory.
        lower: String,
    },
}

/// How a process's stdio is wired.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StdioConfig {
    /// A pseudo terminal (stdout and stderr are one stream).
    #[serde(default)]
    pub terminal: bool,
    /// Open a stdin stream (otherwise stdin is /dev/null).
    #[serde(default)]
    pub stdin: bool,
}

/// A response.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum Response {
    /// Answer to `Ping`.
    Pong {
        /// Protocol version.
        version: u16,
        /// Milliseconds since the agent started.
        uptime_ms: u64,
        /// Ready to run containers.
        ready: bool,
        /// Agent build.
        agent_version: String,
    },
    /// Container created.
    Created {
        /// Container id.
        id: String,
        /// Agent-side pid of its process.
        pid: i32,
        /// Its stdio streams.
        streams: Streams,
    },
    /// Container started.
    Started {
        /// Container id.
        id: String,
    },
    /// Exec process started.
    ExecStarted {
        /// Container id.
        id: String,
        /// Exec id.
        exec_id: String,
        /// Agent-side pid.
        pid: i32,
        /// Its stdio streams.
        streams: Streams,
    },
    /// A process exited.
    Exited {
        /// Container id.
        id: String,
        /// Exec id, or `None` for the container's process.
        exec_id: Option<String>,
        /// How it ended.
        status: ExitStatus,
    },
    /// Container state.
    State(ContainerState),
    /// Processes.
    Processes {
        /// Container id.
        id: String,
        /// Agent-side pids.
        pids: Vec<i32>,
    },
    /// Resource usage.
    Stats(ContainerStats),
    /// Done.
    Ok,
    /// Container ids.
    Containers {
        /// Ids.
        ids: Vec<String>,
    },
    /// The request failed.
    Error(ErrorReply),
}

/// Stream ids of a process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Streams {
    /// stdin (host → agent), when asked for.
    pub stdin: Option<u32>,
    /// stdout (or the terminal).
    pub stdout: u32,
    /// stderr (`None` with a terminal).
    pub stderr: Option<u32>,
}

/// How a process ended, as runc reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitStatus {
    /// Exit code, or 128 + signal.
    pub code: i32,
    /// The signal that killed it.
    pub signal: Option<i32>,
    /// The container's memory limit OOM-killed a process.
    pub oom_killed: bool,
}

/// Container lifecycle state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ContainerStatus {
    /// Created, not started.
    Created,
    /// Running.
    Running,
    /// Its process exited.
    Stopped,
}

/// State of a container.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerState {
    /// Id.
    pub id: String,
    /// Lifecycle state.
    pub status: ContainerStatus,
    /// Agent-side pid of its process.
    pub pid: i32,
    /// Root file system in use.
    pub rootfs: String,
    /// Exit status once stopped.
    pub exit: Option<ExitStatus>,
}

/// Resource usage of a container.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerStats {
    /// Id.
    pub id: String,
    /// Memory in use, bytes.
    pub memory_current: u64,
    /// Memory limit, bytes.
    pub memory_max: Option<u64>,
    /// Processes.
    pub pids_current: u64,
    /// CPU time, microseconds.
    pub cpu_usage_usec: u64,
    /// OOM kills.
    pub oom_kills: u64,
}

/// An error reply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorReply {
    /// Class.
    pub code: ErrorCode,
    /// What failed and what to do.
    pub message: String,
}

/// Error classes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// Undecodable frame.
    BadFrame,
    /// Protocol version mismatch.
    UnsupportedVersion,
    /// Undecodable or invalid request.
    BadRequest,
    /// No such container or process.
    NotFound,
    /// Id in use.
    AlreadyExists,
    /// Not possible in the current state.
    InvalidState,
    /// Starting the process failed.
    Spawn,
    /// An I/O error.
    Io,
    /// A bug.
    Internal,
}

/// An unsolicited event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    /// A process exited.
    Exited {
        /// Container id.
        id: String,
        /// Exec id.
        exec_id: Option<String>,
        /// How.
        status: ExitStatus,
    },
    /// An OOM kill in a container.
    Oom {
        /// Container id.
        id: String,
    },
}

/// Why a frame is not the expected message.
#[derive(Debug, thiserror::Error)]
pub enum MessageError {
    /// Another frame kind.
    #[error("expected a {expected:?} frame, got {found:?}")]
    WrongKind {
        /// Expected.
        expected: FrameKind,
        /// Found.
        found: FrameKind,
    },
    /// Invalid JSON for the message.
    #[error("undecodable message: {0}")]
    Decode(#[from] serde_json::Error),
}

fn decode<T: serde::de::DeserializeOwned>(f: &Frame, kind: FrameKind) -> Result<T, MessageError> {
    if f.kind != kind {
        return Err(MessageError::WrongKind {
            expected: kind,
            found: f.kind,
        });
    }
    Ok(serde_json::from_slice(&f.payload)?)
}

fn encode<T: Serialize>(v: &T, kind: FrameKind, id: u32) -> Frame {
    // Serialising these types cannot fail: no maps with non-string keys, no failing Serialize.
    Frame::new(kind, id, serde_json::to_vec(v).unwrap_or_default())
}

impl Request {
    /// As request frame `id`.
    pub fn to_frame(&self, id: u32) -> Frame {
        encode(self, FrameKind::Request, id)
    }
    /// Decodes a request frame.
    pub fn from_frame(f: &Frame) -> Result<Self, MessageError> {
        decode(f, FrameKind::Request)
    }
}

impl Response {
    /// As the response to request `id`.
    pub fn to_frame(&self, id: u32) -> Frame {
        encode(self, FrameKind::Response, id)
    }
    /// Decodes a response frame.
    pub fn from_frame(f: &Frame) -> Result<Self, MessageError> {
        decode(f, FrameKind::Response)
    }
    /// An error response.
    pub fn error(code: ErrorCode, message: impl Into<String>) -> Self {
        Self::Error(ErrorReply {
            code,
            message: message.into(),
        })
    }
}

impl Event {
    /// As an event frame.
    pub fn to_frame(&self) -> Frame {
        encode(self, FrameKind::Event, 0)
    }
    /// Decodes an event frame.
    pub fn from_frame(f: &Frame) -> Result<Self, MessageError> {
        decode(f, FrameKind::Event)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::FrameDecoder;

    fn requests() -> Vec<Request> {
        let id = || "c1".to_string();
        vec![
            Request::Ping,
            Request::Create {
                id: id(),
                spec: Box::default(),
                rootfs: RootfsSource::Overlay { lower: "/r".into() },
                stdio: StdioConfig {
                    terminal: true,
                    stdin: true,
                },
            },
            Request::Start { id: id() },
            Request::Exec {
                id: id(),
                exec_id: "e".into(),
                process: Box::default(),
                stdio: StdioConfig::default(),
            },
            Request::Signal {
                id: id(),
                exec_id: None,
                signal: 9,
                all: true,
            },
            Request::Wait {
                id: id(),
                exec_id: Some("e".into()),
            },
            Request::State { id: id() },
            Request::Ps { id: id() },
            Request::Stats { id: id() },
            Request::Destroy { id: id() },
            Request::ResizeTty {
                id: id(),
                exec_id: None,
                rows: 24,
                cols: 80,
            },
            Request::CloseStdin {
                id: id(),
                exec_id: None,
            },
            Request::Reseed {
                entropy: vec![1, 2, 3],
            },
            Request::SetClock {
                unix_nanos: 1_700_000_000_000_000_000,
            },
            Request::SetHostname {
                hostname: "h".into(),
            },
            Request::List,
        ]
    }

    #[test]
    fn every_message_round_trips() {
        for (i, r) in requests().into_iter().enumerate() {
            let f = r.to_frame(i as u32);
            let back = Request::from_frame(&f).unwrap();
            assert_eq!(
                normalize(serde_json::to_value(&back).unwrap()),
                normalize(serde_json::to_value(&r).unwrap())
            );
        }
        let status = ExitStatus {
            code: 137,
            signal: Some(9),
            oom_killed: false,
        };
        let streams = Streams {
            stdin: Some(1),
            stdout: 2,
            stderr: None,
        };
        let responses = vec![
            Response::Pong {
                version: 1,
                uptime_ms: 5,
                ready: true,
                agent_version: "x".into(),
            },
            Response::Created {
                id: "c".into(),
                pid: 3,
                streams,
            },
            Response::Started { id: "c".into() },
            Response::ExecStarted {
                id: "c".into(),
                exec_id: "e".into(),
                pid: 4,
                streams,
            },
            Response::Exited {
                id: "c".into(),
                exec_id: None,
                status,
            },
            Response::State(ContainerState {
                id: "c".into(),
                status: ContainerStatus::Stopped,
                pid: 3,
                rootfs: "/r".into(),
                exit: Some(status),
            }),
            Response::Processes {
                id: "c".into(),
                pids: vec![3, 4],
            },
            Response::Stats(ContainerStats {
                id: "c".into(),
                memory_current: 1,
                memory_max: Some(2),
                pids_current: 3,
                cpu_usage_usec: 4,
                oom_kills: 0,
            }),
            Response::Ok,
            Response::Containers {
                ids: vec!["c".into()],
            },
            Response::error(ErrorCode::NotFound, "no container c"),
        ];
        for r in responses {
            assert_eq!(Response::from_frame(&r.to_frame(9)).unwrap(), r);
        }
        for e in [
            Event::Exited {
                id: "c".into(),
                exec_id: None,
                status,
            },
            Event::Oom { id: "c".into() },
        ] {
            assert_eq!(Event::from_frame(&e.to_frame()).unwrap(), e);
        }
        let e = Request::from_frame(&Response::Ok.to_frame(1)).unwrap_err();
        assert!(e.to_string().contains("expected a Request"), "{e}");
    }

    /// Sorts arrays (oci-spec keeps capabilities in hash sets, which serialise in any order).
    fn normalize(v: serde_json::Value) -> serde_json::Value {
        match v {
            serde_json::Value::Array(a) => {
                let mut a: Vec<_> = a.into_iter().map(normalize).collect();
                a.sort_by_key(|x| x.to_string());
                serde_json::Value::Array(a)
            }
            serde_json::Value::Object(o) => {
                serde_json::Value::Object(o.into_iter().map(|(k, v)| (k, normalize(v))).collect())
            }
            other => other,
        }
    }

    /// Deterministic xorshift: the same inputs on every run.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
    }

    /// 20 000 mutated and random byte streams through the decoder and message parsers: errors
    /// are fine, panics are not.
    #[test]
    fn random_and_mutated_input_never_panics() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let valid: Vec<Vec<u8>> = requests()
            .iter()
            .enumerate()
            .map(|(i, r)| r.to_frame(i as u32).to_bytes())
            .collect();
        let mut decoded = 0;
        for round in 0..20_000 {
            let mut bytes = valid[round % valid.len()].clone();
            match rng.next() % 4 {
                0 => {
                    for _ in 0..1 + rng.next() % 8 {
                        let i = (rng.next() as usize) % bytes.len();
                        bytes[i] ^= rng.next() as u8;
                    }
                }
                1 => bytes.truncate((rng.next() as usize) % bytes.len()),
                2 => {
                    let other = &valid[(rng.next() as usize) % valid.len()];
                    let cut = (rng.next() as usize) % other.len();
                    bytes.extend_from_slice(&other[cut..]);
                }
                _ => {
                    let n = (rng.next() % 256) as usize;
                    bytes = (0..n).map(|_| rng.next() as u8).collect();
                    if n > 2 && rng.next().is_multiple_of(2) {
                        bytes[..2].copy_from_slice(b"RV");
                    }
                }
            }
            let mut d = FrameDecoder::new();
            let split = if bytes.is_empty() {
                0
            } else {
                (rng.next() as usize) % bytes.len()
            };
            d.push(&bytes[..split]);
            d.push(&bytes[split..]);
            while let Ok(Some(f)) = d.next_frame() {
                decoded += 1;
                let _ = Request::from_frame(&f);
                let _ = Response::from_frame(&f);
                let _ = Event::from_frame(&f);
                let _ = crate::stream::parse_window(&f);
            }
        }
        assert!(
            decoded > 1000,
            "mutations still produced valid frames: {decoded}"
        );
    }
}
