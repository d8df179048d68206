//! The agent's bounds, with a real `runv-agent` process: it refuses what it cannot serve with an
//! error reply instead of aborting (threads in a pids-limited cgroup, connections, waits), and
//! drops a peer that stalls inside a frame.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;
use protocol::client::{Client, ClientError};
use protocol::frame::FrameError;
use protocol::{ErrorCode, ErrorReply, Request, Response, StdioConfig};

/// A pids cgroup of its own (v1 `pids` controller, or v2 with `pids` enabled), removed on drop.
struct PidsCgroup {
    dir: PathBuf,
}

impl PidsCgroup {
    /// None (after a loud SKIPPED line) when neither cgroup v1 pids nor v2 pids exists.
    fn create(test: &str, max: u32) -> Option<Self> {
        let name = format!("runv-test-pids-{}", std::process::id());
        let v1 = Path::new("/sys/fs/cgroup/pids");
        let v2 = Path::new("/sys/fs/cgroup");
        let parent = if v1.join("cgroup.procs").exists() {
            v1.to_path_buf()
        } else if std::fs::read_to_string(v2.join("cgroup.controllers"))
            .is_ok_and(|c| c.split_whitespace().any(|x| x == "pids"))
        {
            // The children of the root need the controller enabled.
            let _ = std::fs::write(v2.join("cgroup.subtree_control"), "+pids");
            v2.to_path_buf()
        } else {
            println!("SKIPPED: {test}: neither cgroup v1 pids nor cgroup v2 with pids is mounted");
            return None;
        };
        let dir = parent.join(name);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("pids.max"), max.to_string()).unwrap();
        Some(Self { dir })
    }

    /// Moves process `pid` (all its threads) into the cgroup.
    fn add(&self, pid: u32) {
        std::fs::write(self.dir.join("cgroup.procs"), pid.to_string()).unwrap();
    }
}

impl Drop for PidsCgroup {
    fn drop(&mut self) {
        for _ in 0..100 {
            if std::fs::remove_dir(&self.dir).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!("leaked cgroup {}", self.dir.display());
    }
}

/// Pings on a fresh connection: `Ok` with the pong, or the error frame (id 0) of a refusal.
/// A refused connection is closed right away: the ping may meet a closed socket (EPIPE) and,
/// as it went unread, reading past the error frame may fail with a reset instead of EOF.
fn ping_new(agent: &Agent) -> (Client, Result<Response, ErrorReply>) {
    let mut c = agent.client();
    let sent = c.send(&Request::Ping).is_ok();
    let r = match c.response(1, Duration::from_secs(10)) {
        Ok(r) if sent => Ok(r),
        Ok(r) => panic!("an answer to a ping that was not sent: {r:?}"),
        Err(ClientError::Closed) => Err(refusal(&mut c)),
        Err(ClientError::Frame(FrameError::Io(e)))
            if matches!(
                e.kind(),
                std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe
            ) =>
        {
            Err(refusal(&mut c))
        }
        Err(e) => panic!("no answer to ping: {e}"),
    };
    (c, r)
}

/// The error frame a refused connection got before it was closed.
fn refusal(c: &mut Client) -> ErrorReply {
    match c.response(0, Duration::from_secs(1)) {
        Ok(Response::Error(e)) => e,
        r => panic!("a closed connection without an error frame: {r:?}"),
    }
}

fn is_pong(r: &Response) -> bool {
    matches!(r, Response::Pong { ready: true, .. })
}

fn wait_request(id: &str) -> Request {
    Request::Wait {
        id: id.into(),
        exec_id: None,
    }
}

/// The regression: in a pids-limited cgroup 100 idle connections or 100 pending waits made the
/// agent abort (`panic = "abort"` on a failed thread spawn) and orphan its container.
#[test]
fn pids_limited_agent_refuses_instead_of_aborting() {
    let test = "pids_limited_agent_refuses_instead_of_aborting";
    let Some(root) = rootfs(test) else {
        return;
    };
    // Dropped after the agent (declared first).
    let Some(cg) = PidsCgroup::create(test, 24) else {
        return;
    };
    let mut agent = Agent::start();
    cg.add(agent.pid());
    let mut c = agent.client();
    launch(
        &mut c,
        "sleeper",
        spec(&["sleep", "1000"]),
        &root,
        StdioConfig::default(),
    );
    // 100 pending waits on one connection: no thread each.
    let waits: Vec<u32> = (0..100)
        .map(|_| c.send(&wait_request("sleeper")).unwrap())
        .collect();
    // 100 connections: those the pids limit leaves no thread for get an error frame.
    let mut held = Vec::new();
    let mut refused = Vec::new();
    for _ in 0..100 {
        let (conn, r) = ping_new(&agent);
        match r {
            Ok(r) => {
                assert!(is_pong(&r), "{r:?}");
                held.push(conn);
            }
            Err(e) => refused.push(e),
        }
    }
    assert!(
        agent.child.try_wait().unwrap().is_none(),
        "the agent died under its pids limit"
    );
    assert!(
        !refused.is_empty(),
        "a pids limit of 24 refuses some of 100 connection threads"
    );
    for e in &refused {
        assert_eq!(e.code, ErrorCode::ResourceExhausted, "{e:?}");
        assert!(
            e.message.contains("cannot start a thread for a connection"),
            "{}",
            e.message
        );
    }
    // At the limit, a create gets a clear error and leaves nothing behind.
    let r = c
        .call(&Request::Create {
            id: "second".into(),
            spec: Box::new(spec(&["true"])),
            rootfs: protocol::RootfsSource::Bind {
                path: root.display().to_string(),
            },
            stdio: StdioConfig::default(),
        })
        .unwrap();
    assert!(
        matches!(&r, Response::Error(e) if e.code == ErrorCode::ResourceExhausted && e.message.contains("thread")),
        "{r:?}"
    );
    assert!(is_pong(&c.call(&Request::Ping).unwrap()));
    // Connections closed: new ones are served again.
    drop(held);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match ping_new(&agent).1 {
            Ok(r) if is_pong(&r) => break,
            r => assert!(Instant::now() < deadline, "still refused: {r:?}"),
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    // The container can still be destroyed, and every wait is answered.
    assert_eq!(
        c.call(&Request::Destroy {
            id: "sleeper".into()
        })
        .unwrap(),
        Response::Ok
    );
    for id in waits {
        match c.response(id, Duration::from_secs(10)).unwrap() {
            Response::Exited { status, .. } => assert_eq!(status.signal, Some(9)),
            r => panic!("wait {id}: {r:?}"),
        }
    }
    assert_eq!(
        c.call(&Request::List).unwrap(),
        Response::Containers { ids: vec![] }
    );
    assert!(agent.child.try_wait().unwrap().is_none());
}

/// 64 connections are served at once; one more gets an error frame. A connection has at most
/// 1024 pending waits.
#[test]
fn connection_and_wait_bounds() {
    let Some((root, agent, mut c)) = setup("connection_and_wait_bounds") else {
        return;
    };
    launch(
        &mut c,
        "sleeper",
        spec(&["sleep", "1000"]),
        &root,
        StdioConfig::default(),
    );
    // `c` is one of the 64.
    let mut held = Vec::new();
    let mut refused = Vec::new();
    for _ in 0..70 {
        let (conn, r) = ping_new(&agent);
        match r {
            Ok(r) => {
                assert!(is_pong(&r), "{r:?}");
                held.push(conn);
            }
            Err(e) => refused.push(e),
        }
    }
    assert_eq!((held.len(), refused.len()), (63, 7));
    for e in &refused {
        assert_eq!(e.code, ErrorCode::ResourceExhausted, "{e:?}");
        assert!(
            e.message.contains("at most 64 connections"),
            "{}",
            e.message
        );
    }
    drop(held);
    let waits: Vec<u32> = (0..1024)
        .map(|_| c.send(&wait_request("sleeper")).unwrap())
        .collect();
    match c.call(&wait_request("sleeper")).unwrap() {
        Response::Error(e) => {
            assert_eq!(e.code, ErrorCode::ResourceExhausted);
            assert!(e.message.contains("1024 waits"), "{}", e.message);
        }
        r => panic!("wait 1025 was not refused: {r:?}"),
    }
    assert_eq!(
        c.call(&Request::Destroy {
            id: "sleeper".into()
        })
        .unwrap(),
        Response::Ok
    );
    for id in waits {
        assert!(
            matches!(
                c.response(id, Duration::from_secs(10)).unwrap(),
                Response::Exited { .. }
            ),
            "wait {id}"
        );
    }
    // Answered waits free their slots.
    assert!(matches!(
        c.call(&Request::Wait {
            id: "sleeper".into(),
            exec_id: None
        })
        .unwrap(),
        Response::Error(e) if e.code == ErrorCode::NotFound
    ));
}

/// A peer that stops inside a frame is disconnected after the frame timeout; one idle between
/// frames, or slow but within the timeout, is served.
#[test]
fn a_stalled_frame_is_dropped_an_idle_connection_is_not() {
    if rootfs("a_stalled_frame_is_dropped_an_idle_connection_is_not").is_none() {
        return;
    }
    let agent = Agent::start_with(&["--frame-timeout-ms", "500"]);
    let mut idle = agent.client();
    let mut slow = agent.client();
    let mut stalled = agent.client();
    let ping = Request::Ping.to_frame(1).to_bytes();
    stalled.send_raw(&ping[..10]).unwrap();
    let t = Instant::now();
    slow.send_raw(&ping[..10]).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    slow.send_raw(&ping[10..]).unwrap();
    assert!(is_pong(&slow.response(1, Duration::from_secs(5)).unwrap()));
    // The stalled peer gets an error frame and the connection closes.
    let closed_after = loop {
        match stalled.pump() {
            Err(ClientError::Closed) => break t.elapsed(),
            Err(e) => panic!("{e}"),
            Ok(()) => assert!(t.elapsed() < Duration::from_secs(10), "never disconnected"),
        }
    };
    assert!(
        closed_after >= Duration::from_millis(400),
        "{closed_after:?}"
    );
    match stalled.response(0, Duration::from_secs(1)) {
        Ok(Response::Error(e)) => {
            assert_eq!(e.code, ErrorCode::BadFrame);
            assert!(e.message.contains("part of a frame"), "{}", e.message);
        }
        r => panic!("{r:?}"),
    }
    // Idle for longer than the timeout, between frames: still served.
    std::thread::sleep(Duration::from_millis(1000));
    assert!(is_pong(&idle.call(&Request::Ping).unwrap()));
}
