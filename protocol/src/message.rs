//! Requests, responses and events: JSON payloads of `Request`, `Response` and `Event` frames.

use serde::{Deserialize, Serialize};

use crate::frame::{Frame, FrameKind};

/// A request to the agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
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
    /// Clone hook: configure the guest's network (PID 1 only): each interface gets exactly
    /// the given IPv4 addresses (the template's are removed), its MAC and MTU if given, and is
    /// brought up; routes are added or replaced; `dns` non-empty rewrites `/etc/resolv.conf`.
    SetNetwork {
        /// Interfaces to configure.
        interfaces: Vec<InterfaceConfig>,
        /// IPv4 routes.
        #[serde(default)]
        routes: Vec<RouteConfig>,
        /// Name servers (IP addresses).
        #[serde(default)]
        dns: Vec<String>,
    },
    /// Container ids.
    List,
    /// Change a container's cgroup limits (`runv update`); absent fields stay as they are.
    /// Additive: an agent that predates it refuses it as `bad_request`.
    Update {
        /// Container id.
        id: String,
        /// Resources to set.
        resources: Resources,
    },
    /// Freeze every process of a running container (its cgroup's freezer: `runv pause`).
    /// Additive: an agent that predates it refuses it as `bad_request`.
    Pause {
        /// Container id.
        id: String,
    },
    /// Thaw a paused container (`runv resume`).
    Resume {
        /// Container id.
        id: String,
    },
}

/// Cgroup limits of [`Request::Update`] (the subset of OCI `linux.resources` runv applies).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resources {
    /// Memory limit, bytes.
    #[serde(default)]
    pub memory: Option<i64>,
    /// Maximum processes.
    #[serde(default)]
    pub pids: Option<i64>,
    /// CPU quota per period, microseconds.
    #[serde(default)]
    pub cpu_quota: Option<i64>,
    /// CPU period, microseconds (default 100000 with a quota).
    #[serde(default)]
    pub cpu_period: Option<u64>,
}

/// One guest interface for [`Request::SetNetwork`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InterfaceConfig {
    /// Interface name in the guest (e.g. `eth0`).
    pub name: String,
    /// New MAC address (`aa:bb:cc:dd:ee:ff`): a clone's device has its own, which the guest
    /// kernel learned from the template.
    #[serde(default)]
    pub mac: Option<String>,
    /// IPv4 addresses with prefix length (`10.0.0.2/24`).
    #[serde(default)]
    pub addresses: Vec<String>,
    /// MTU.
    #[serde(default)]
    pub mtu: Option<u32>,
}

/// One IPv4 route for [`Request::SetNetwork`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// `default` or a network (`10.1.0.0/16`).
    pub destination: String,
    /// Next hop.
    pub gateway: String,
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
    /// A read-only file-system image on a virtio block device (in a guest), found by its virtio
    /// serial (`/sys/block/*/serial`), mounted read-only with `fstype` under an overlay whose
    /// upper layer is `writable`. Added in protocol version 1 as an additive variant: an agent
    /// that predates it refuses the request as `bad_request` ("unknown variant `block`").
    Block {
        /// Virtio serial of the image's block device.
        serial: String,
        /// File system of the image: `erofs` or `ext4`.
        fstype: String,
        /// Where the container's writes go.
        #[serde(default)]
        writable: Writable,
    },
    /// A read-only file-system image **file**, for an agent running as a host process (no virtio
    /// serials): attached to a free loop device (read-only, autoclear), mounted read-only with
    /// `fstype` under an overlay whose upper layer is `writable`. The path must name a regular
    /// file, not a symbolic link. Additive like `Block`.
    Image {
        /// Absolute path of the image file.
        path: String,
        /// File system of the image: `erofs` or `ext4`.
        fstype: String,
        /// Where the container's writes go.
        #[serde(default)]
        writable: Writable,
    },
}

/// The writable upper layer over a read-only image root.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Writable {
    /// An overlay upper on a fresh tmpfs (lost on destroy).
    #[default]
    Tmpfs,
    /// An overlay upper on a scratch ext4 block device found by its virtio serial (guest only).
    Block {
        /// Virtio serial of the scratch device.
        serial: String,
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
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
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
    /// Running, its processes frozen ([`Request::Pause`]).
    Paused,
    /// Its process exited.
    Stopped,
}

impl ContainerStatus {
    /// Its name on the wire (as serialized), for messages.
    pub fn name(self) -> &'static str {
        match self {
            ContainerStatus::Created => "created",
            ContainerStatus::Running => "running",
            ContainerStatus::Paused => "paused",
            ContainerStatus::Stopped => "stopped",
        }
    }
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
    /// The agent is at a limit (threads it may start, connections, pending waits): retry later
    /// or close idle connections.
    ResourceExhausted,
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
    #[error(
        "expected a {expected:?} frame, got a {found:?} frame: the peer sent a message where \
         another kind belongs; check that both sides run matching builds"
    )]
    WrongKind {
        /// Expected.
        expected: FrameKind,
        /// Found.
        found: FrameKind,
    },
    /// Invalid JSON for the message.
    #[error(
        "undecodable message: {0}; the JSON does not match this side's message types, check \
         that the host and the agent run matching builds"
    )]
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

    #[test]
    fn container_status_names_are_the_wire_names() {
        for st in [
            ContainerStatus::Created,
            ContainerStatus::Running,
            ContainerStatus::Paused,
            ContainerStatus::Stopped,
        ] {
            assert_eq!(
                serde_json::to_string(&st).unwrap(),
                format!("\"{}\"", st.name())
            );
        }
    }
    use super::*;
    use crate::frame::{FrameDecoder, FrameError};

    fn requests() -> Vec<Request> {
        let id = || "c1".to_string();
        vec![
            Request::Ping,
            Request::Create {
                id: id(),
                spec: Box::default(),
                rootfs: RootfsSource::Block {
                    serial: "rootfs0".into(),
                    fstype: "erofs".into(),
                    writable: Writable::Block {
                        serial: "scratch0".into(),
                    },
                },
                stdio: StdioConfig::default(),
            },
            Request::Create {
                id: id(),
                spec: Box::default(),
                rootfs: RootfsSource::Image {
                    path: "/var/lib/runv/images/k.erofs".into(),
                    fstype: "erofs".into(),
                    writable: Writable::Tmpfs,
                },
                stdio: StdioConfig::default(),
            },
            Request::Create {
                id: id(),
                spec: Box::default(),
                rootfs: RootfsSource::Overlay { lower: "/r".into() },
                stdio: StdioConfig {
                    terminal: true,
                    stdin: true,
                },
            },
            Request::Create {
                id: id(),
                spec: Box::default(),
                rootfs: RootfsSource::Bind {
                    path: "/bundle/rootfs".into(),
                },
                stdio: StdioConfig::default(),
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
                exec_id: Some("e".into()),
            },
            Request::Reseed {
                entropy: vec![0, 1, 255],
            },
            Request::SetClock {
                unix_nanos: 1_700_000_000_000_000_000,
            },
            Request::SetClock {
                unix_nanos: i64::MIN,
            },
            Request::Update {
                id: "c".into(),
                resources: Resources {
                    memory: Some(1 << 20),
                    pids: Some(10),
                    cpu_quota: Some(5000),
                    cpu_period: None,
                },
            },
            Request::Pause { id: "c".into() },
            Request::Resume { id: "c".into() },
            Request::SetHostname {
                hostname: "h".into(),
            },
            Request::SetNetwork {
                interfaces: vec![InterfaceConfig {
                    name: "eth0".into(),
                    mac: Some("02:00:00:00:00:01".into()),
                    addresses: vec!["10.0.0.2/24".into()],
                    mtu: Some(1500),
                }],
                routes: vec![RouteConfig {
                    destination: "default".into(),
                    gateway: "10.0.0.1".into(),
                }],
                dns: vec!["10.0.0.53".into()],
            },
            Request::List,
        ]
    }

    fn status() -> ExitStatus {
        ExitStatus {
            code: 137,
            signal: Some(9),
            oom_killed: true,
        }
    }

    fn responses() -> Vec<Response> {
        let streams = Streams {
            stdin: Some(1),
            stdout: 2,
            stderr: None,
        };
        vec![
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
                streams: Streams {
                    stdin: None,
                    stdout: 5,
                    stderr: Some(6),
                },
            },
            Response::Exited {
                id: "c".into(),
                exec_id: None,
                status: status(),
            },
            Response::State(ContainerState {
                id: "c".into(),
                status: ContainerStatus::Stopped,
                pid: 3,
                rootfs: "/r".into(),
                exit: Some(status()),
            }),
            Response::State(ContainerState {
                id: "c".into(),
                status: ContainerStatus::Created,
                pid: 3,
                rootfs: "/r".into(),
                exit: None,
            }),
            Response::Processes {
                id: "c".into(),
                pids: vec![3, 4],
            },
            Response::Stats(ContainerStats {
                id: "c".into(),
                memory_current: 1,
                memory_max: Some(u64::MAX),
                pids_current: 3,
                cpu_usage_usec: 4,
                oom_kills: 0,
            }),
            Response::Ok,
            Response::Containers {
                ids: vec!["c".into(), "d".into()],
            },
            Response::error(ErrorCode::NotFound, "no container c"),
            Response::error(ErrorCode::ResourceExhausted, "no thread"),
        ]
    }

    fn events() -> Vec<Event> {
        vec![
            Event::Exited {
                id: "c".into(),
                exec_id: Some("e".into()),
                status: status(),
            },
            Event::Oom { id: "c".into() },
        ]
    }

    #[test]
    fn every_message_round_trips() {
        for (i, r) in requests().into_iter().enumerate() {
            let f = r.to_frame(i as u32);
            assert_eq!((f.kind, f.id), (FrameKind::Request, i as u32));
            assert_eq!(Request::from_frame(&f).unwrap(), r);
            // Through the wire and the decoder as well.
            let mut d = FrameDecoder::new();
            d.push(&f.to_bytes());
            assert_eq!(d.next_frame().unwrap(), Some(f));
        }
        for r in responses() {
            let f = r.to_frame(9);
            assert_eq!((f.kind, f.id), (FrameKind::Response, 9));
            assert_eq!(Response::from_frame(&f).unwrap(), r);
        }
        for e in events() {
            let f = e.to_frame();
            assert_eq!((f.kind, f.id), (FrameKind::Event, 0));
            assert_eq!(Event::from_frame(&f).unwrap(), e);
        }
    }

    #[test]
    fn wrong_kinds_and_bad_json_are_errors() {
        let e = Request::from_frame(&Response::Ok.to_frame(1)).unwrap_err();
        assert!(matches!(
            e,
            MessageError::WrongKind {
                expected: FrameKind::Request,
                found: FrameKind::Response
            }
        ));
        assert!(e.to_string().contains("expected a Request"), "{e}");
        assert!(matches!(
            Response::from_frame(&Request::Ping.to_frame(1)),
            Err(MessageError::WrongKind { .. })
        ));
        assert!(matches!(
            Event::from_frame(&Frame::new(FrameKind::Data, 1, b"{}".to_vec())),
            Err(MessageError::WrongKind { .. })
        ));
        for bad in [
            &b""[..],
            b"{",
            b"null",
            b"{\"op\":\"fly\"}",
            b"{\"op\":\"start\"}",
            b"{\"op\":\"signal\",\"id\":\"c\",\"signal\":\"x\"}",
            b"{\"op\":\"resize_tty\",\"id\":\"c\",\"rows\":70000,\"cols\":1}",
            b"\xff\xfe",
        ] {
            let f = Frame::new(FrameKind::Request, 1, bad.to_vec());
            let e = Request::from_frame(&f).unwrap_err();
            assert!(matches!(e, MessageError::Decode(_)), "{e}");
            assert!(e.to_string().starts_with("undecodable message"), "{e}");
        }
        // Deep nesting hits serde_json's recursion limit instead of the stack.
        let deep = format!(
            "{{\"op\":\"ping\",\"x\":{}{}}}",
            "[".repeat(10_000),
            "]".repeat(10_000)
        );
        let f = Frame::new(FrameKind::Request, 1, deep.into_bytes());
        assert!(Request::from_frame(&f).is_err());
    }

    /// Image sources on the wire: `writable` defaults to tmpfs; a source type this build does
    /// not know (what an older agent sees for `block`/`image`) is a decode error naming it.
    #[test]
    fn rootfs_sources_wire_shape_and_unknown_refused() {
        let r: RootfsSource =
            serde_json::from_str(r#"{"type":"image","path":"/i.erofs","fstype":"erofs"}"#).unwrap();
        assert_eq!(
            r,
            RootfsSource::Image {
                path: "/i.erofs".into(),
                fstype: "erofs".into(),
                writable: Writable::Tmpfs
            }
        );
        assert_eq!(
            serde_json::to_string(&RootfsSource::Block {
                serial: "s".into(),
                fstype: "ext4".into(),
                writable: Writable::Block { serial: "w".into() }
            })
            .unwrap(),
            r#"{"type":"block","serial":"s","fstype":"ext4","writable":{"type":"block","serial":"w"}}"#
        );
        let f = Frame::new(
            FrameKind::Request,
            1,
            br#"{"op":"create","id":"c","spec":{"ociVersion":"1.0.2"},"rootfs":{"type":"nbd","path":"/r"}}"#
                .to_vec(),
        );
        let e = Request::from_frame(&f).unwrap_err().to_string();
        assert!(e.contains("unknown variant `nbd`"), "{e}");
    }

    /// The JSON on the wire: agent and host may be different builds, so the shape is pinned.
    #[test]
    fn wire_shape() {
        let json = |f: Frame| String::from_utf8(f.payload).unwrap();
        assert_eq!(json(Request::Ping.to_frame(1)), r#"{"op":"ping"}"#);
        assert_eq!(
            json(
                Request::Signal {
                    id: "c".into(),
                    exec_id: None,
                    signal: 15,
                    all: false
                }
                .to_frame(1)
            ),
            r#"{"op":"signal","id":"c","exec_id":null,"signal":15,"all":false}"#
        );
        assert_eq!(json(Response::Ok.to_frame(1)), r#"{"result":"ok"}"#);
        assert_eq!(
            json(Response::error(ErrorCode::InvalidState, "m").to_frame(1)),
            r#"{"result":"error","code":"invalid_state","message":"m"}"#
        );
        assert_eq!(
            json(Event::Oom { id: "c".into() }.to_frame()),
            r#"{"event":"oom","id":"c"}"#
        );
        // Optional fields may be left out by the sender.
        let f = Frame::new(
            FrameKind::Request,
            1,
            br#"{"op":"create","id":"c","spec":{"ociVersion":"1.0.2"},"rootfs":{"type":"bind","path":"/r"}}"#
                .to_vec(),
        );
        match Request::from_frame(&f).unwrap() {
            Request::Create { rootfs, stdio, .. } => {
                assert_eq!(rootfs, RootfsSource::Bind { path: "/r".into() });
                assert_eq!(stdio, StdioConfig::default());
            }
            r => panic!("{r:?}"),
        }
        let f = Frame::new(FrameKind::Request, 1, br#"{"op":"wait","id":"c"}"#.to_vec());
        assert_eq!(
            Request::from_frame(&f).unwrap(),
            Request::Wait {
                id: "c".into(),
                exec_id: None
            }
        );
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
        fn below(&mut self, n: usize) -> usize {
            if n == 0 {
                0
            } else {
                (self.next() % n as u64) as usize
            }
        }
    }

    /// 20 000 mutated and random byte streams through the decoder and message parsers: errors
    /// are fine, panics are not.
    #[test]
    fn random_and_mutated_input_never_panics() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let mut valid: Vec<Vec<u8>> = requests()
            .iter()
            .enumerate()
            .map(|(i, r)| r.to_frame(i as u32).to_bytes())
            .collect();
        valid.extend(responses().iter().map(|r| r.to_frame(1).to_bytes()));
        valid.extend(events().iter().map(|e| e.to_frame().to_bytes()));
        valid.push(crate::stream::window_frame(3, 4096).to_bytes());
        valid.push(crate::stream::close_frame(3).to_bytes());
        let mut decoded = 0;
        let mut messages = 0;
        for round in 0..20_000 {
            let mut bytes = valid[round % valid.len()].clone();
            // Sometimes a stream of several frames.
            for _ in 0..rng.below(3) {
                bytes.extend_from_slice(&valid[rng.below(valid.len())]);
            }
            match rng.next() % 6 {
                0 => {
                    // Flip bytes anywhere.
                    for _ in 0..1 + rng.below(8) {
                        let i = rng.below(bytes.len());
                        bytes[i] ^= rng.next() as u8;
                    }
                }
                1 => {
                    // Flip bytes in the JSON only: the frame stays valid, the message does not.
                    for _ in 0..1 + rng.below(4) {
                        if bytes.len() > crate::frame::HEADER_LEN {
                            let i = crate::frame::HEADER_LEN
                                + rng.below(bytes.len() - crate::frame::HEADER_LEN);
                            const ALPHABET: &[u8] = b"{}[]\":,0-9ae\\ \xff";
                            bytes[i] = ALPHABET[rng.below(ALPHABET.len())];
                        }
                    }
                }
                2 => bytes.truncate(rng.below(bytes.len())),
                3 => {
                    // Splice the tail of another frame in.
                    let other = &valid[rng.below(valid.len())];
                    let cut = rng.below(other.len());
                    let at = rng.below(bytes.len());
                    bytes.truncate(at);
                    bytes.extend_from_slice(&other[cut..]);
                }
                4 => {
                    // A valid header announcing a random length.
                    let len = (rng.next() as u32) >> rng.below(32);
                    bytes[10..14].copy_from_slice(&len.to_be_bytes());
                }
                _ => {
                    let n = rng.below(256);
                    bytes = (0..n).map(|_| rng.next() as u8).collect();
                    if n > 6 && rng.next() & 1 == 0 {
                        bytes[..4].copy_from_slice(b"RV\0\x01");
                        bytes[4] = 1 + rng.below(6) as u8;
                        bytes[5] = 0;
                    }
                }
            }
            let mut d = FrameDecoder::new();
            let (head, tail) = bytes.split_at(rng.below(bytes.len()));
            d.push(head);
            let mut tail = Some(tail);
            loop {
                match d.next_frame() {
                    Ok(Some(f)) => {
                        decoded += 1;
                        messages += usize::from(Request::from_frame(&f).is_ok());
                        messages += usize::from(Response::from_frame(&f).is_ok());
                        messages += usize::from(Event::from_frame(&f).is_ok());
                        let _ = crate::stream::parse_window(&f);
                    }
                    Ok(None) => match tail.take() {
                        Some(t) => d.push(t),
                        None => break,
                    },
                    Err(_) => {
                        assert!(matches!(d.next_frame(), Err(FrameError::Poisoned)));
                        break;
                    }
                }
            }
            let _ = crate::frame::read_frame(&mut &bytes[..]);
        }
        assert!(
            decoded > 5_000,
            "too few mutations decoded as frames: {decoded}"
        );
        assert!(
            messages > 1_000,
            "too few mutations decoded as messages: {messages}"
        );
    }
}
