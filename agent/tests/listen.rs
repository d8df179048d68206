//! `--listen unix:PATH` replaces only a stale socket: anything else at the path is kept and the
//! agent exits with a clear error.

mod common;

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::*;
use protocol::{Request, Response};

/// A cgroup parent of this test binary's own (the agent removes its parent on SIGTERM).
fn group() -> String {
    format!("runv-test-listen-{}", std::process::id())
}

/// Runs the agent on `path` and expects it to exit on its own within 10 s.
fn agent_exit(path: &Path, state: &Path) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_runv-agent"))
        .arg("--listen")
        .arg(format!("unix:{}", path.display()))
        .arg("--state-dir")
        .arg(state)
        .args(["--cgroup-group", &group()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the agent kept running on {}", path.display());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    child.wait_with_output().unwrap()
}

#[test]
fn a_regular_file_or_directory_at_the_listen_path_survives() {
    if rootfs("a_regular_file_or_directory_at_the_listen_path_survives").is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("agent.sock");
    std::fs::write(&file, "precious").unwrap();
    let out = agent_exit(&file, &dir.path().join("state"));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("is a regular file, not a stale socket"),
        "{stderr}"
    );
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "precious");

    let sub = dir.path().join("dir.sock");
    std::fs::create_dir(&sub).unwrap();
    std::fs::write(sub.join("keep"), "x").unwrap();
    let out = agent_exit(&sub, &dir.path().join("state"));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("is a directory"), "{stderr}");
    assert!(sub.join("keep").exists());

    let link = dir.path().join("link.sock");
    std::os::unix::fs::symlink(&file, &link).unwrap();
    let out = agent_exit(&link, &dir.path().join("state"));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("is a symbolic link"), "{stderr}");
    assert!(link.symlink_metadata().is_ok());
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "precious");
}

#[test]
fn a_stale_socket_is_replaced_a_live_one_is_not() {
    if rootfs("a_stale_socket_is_replaced_a_live_one_is_not").is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // A live agent: a second one on its path refuses.
    let agent = Agent::start();
    let out = agent_exit(&agent.socket, &dir.path().join("state"));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("in use by a running agent"), "{stderr}");
    assert!(matches!(
        agent.client().call(&Request::Ping).unwrap(),
        Response::Pong { .. }
    ));
    // A socket nobody listens on is replaced.
    let stale = dir.path().join("stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
    assert!(stale.exists());
    let mut child = Command::new(env!("CARGO_BIN_EXE_runv-agent"))
        .arg("--listen")
        .arg(format!("unix:{}", stale.display()))
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .args(["--cgroup-group", &group()])
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let pong = loop {
        if let Ok(mut c) = protocol::client::Client::connect(&stale) {
            break c.call(&Request::Ping).unwrap();
        }
        assert!(Instant::now() < deadline, "the agent did not listen");
        assert!(child.try_wait().unwrap().is_none(), "the agent exited");
        std::thread::sleep(Duration::from_millis(10));
    };
    assert!(matches!(pong, Response::Pong { .. }), "{pong:?}");
    // SAFETY: kill(2) on our child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let _ = child.wait();
}

/// Runs the agent with `--listen fd:3`, fd 3 being `fd` in the child.
fn agent_on_fd(fd: std::os::fd::RawFd, state: &Path) -> std::process::Child {
    use std::os::unix::process::CommandExt;
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_runv-agent"));
    cmd.args(["--listen", "fd:3", "--state-dir"])
        .arg(state)
        .args(["--cgroup-group", &group()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // SAFETY: dup2(2)/fcntl(2) in the forked child, async-signal-safe; fd is open in the
    // parent. dup2 onto itself would keep close-on-exec: then the flag is cleared instead.
    unsafe {
        cmd.pre_exec(move || {
            let rc = if fd == 3 {
                libc::fcntl(3, libc::F_SETFD, 0)
            } else {
                libc::dup2(fd, 3)
            };
            if rc < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd.spawn().unwrap()
}

#[test]
fn an_inherited_listening_socket_is_served_at_once() {
    if rootfs("an_inherited_listening_socket_is_served_at_once").is_none() {
        return;
    }
    use std::os::fd::AsRawFd;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("agent.sock");
    let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
    let mut child = agent_on_fd(listener.as_raw_fd(), &dir.path().join("state"));
    drop(listener);
    // Bound and listening before the agent ran: the first connect succeeds, no retry.
    let mut c = protocol::client::Client::connect(&path).unwrap();
    assert!(matches!(
        c.call(&Request::Ping).unwrap(),
        Response::Pong { .. }
    ));
    // SAFETY: kill(2) on our child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let _ = child.wait();
    // The path belongs to whoever bound it: the agent leaves it.
    assert!(path.exists());
}

#[test]
fn an_inherited_descriptor_that_is_no_listening_socket_is_refused() {
    if rootfs("an_inherited_descriptor_that_is_no_listening_socket_is_refused").is_none() {
        return;
    }
    use std::os::fd::AsRawFd;
    let dir = tempfile::tempdir().unwrap();
    let file = std::fs::File::create(dir.path().join("plain")).unwrap();
    let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
    // Not a descriptor number the agent may take over.
    for bad in ["fd:2", "fd:x", "fd:"] {
        let out = Command::new(env!("CARGO_BIN_EXE_runv-agent"))
            .args(["--listen", bad, "--state-dir"])
            .arg(dir.path().join("state"))
            .args(["--cgroup-group", &group()])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{bad}: {stderr}");
        assert!(
            stderr.contains("give a file descriptor number above 2"),
            "{bad}: {stderr}"
        );
    }
    for fd in [file.as_raw_fd(), a.as_raw_fd()] {
        let out = agent_on_fd(fd, &dir.path().join("state"))
            .wait_with_output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{stderr}");
        assert!(
            stderr.contains("is not a listening unix socket"),
            "{stderr}"
        );
    }
}
