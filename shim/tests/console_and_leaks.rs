//! A console socket with a real pty (the master received over a Unix socket as containerd does),
//! and 50 containers created, started and deleted with nothing left behind.

mod common;

use std::io::{IoSliceMut, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixListener;
use std::time::{Duration, Instant};

use common::{processes_mentioning, Env};
use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};

/// Accepts one connection (10 s at most) and receives the fd sent with SCM_RIGHTS.
fn receive_master(listener: &UnixListener) -> (String, OwnedFd) {
    listener.set_nonblocking(true).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let conn = loop {
        match listener.accept() {
            Ok((c, _)) => break c,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                assert!(
                    Instant::now() < deadline,
                    "nobody connected to the console socket"
                );
                std::thread::sleep(Duration::from_millis(2));
            }
            Err(e) => panic!("accept: {e}"),
        }
    };
    conn.set_nonblocking(false).unwrap();
    let mut buf = [0u8; 4096];
    let mut iov = [IoSliceMut::new(&mut buf)];
    let mut cmsg = nix::cmsg_space!([std::os::fd::RawFd; 1]);
    let msg = recvmsg::<()>(
        conn.as_raw_fd(),
        &mut iov,
        Some(&mut cmsg),
        MsgFlags::empty(),
    )
    .unwrap();
    let mut fd = None;
    for c in msg.cmsgs().unwrap() {
        if let ControlMessageOwned::ScmRights(fds) = c {
            fd = fds.first().copied();
        }
    }
    let n = msg.bytes;
    let fd = fd.expect("no SCM_RIGHTS descriptor");
    // SAFETY: recvmsg just installed this descriptor in our table; nothing else owns it.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    (String::from_utf8_lossy(&buf[..n]).into_owned(), owned)
}

#[test]
fn console_socket_pty_echo() {
    let Some(env) = Env::new("console_socket_pty_echo") else {
        return;
    };
    let id = env.id("tty");
    let b = env.bundle("tty", &["cat"], true);
    let sock = env.dir.path().join("console.sock");
    let listener = UnixListener::bind(&sock).unwrap();
    let mut c = env.cmd(&[
        "create",
        "--bundle",
        b.to_str().unwrap(),
        "--console-socket",
        sock.to_str().unwrap(),
        &id,
    ]);
    c.stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    let create = c.spawn().unwrap();
    let (name, master) = receive_master(&listener);
    assert!(name.starts_with("/dev/pts/"), "pty name {name:?}");
    let st = common::wait_bounded(create, Duration::from_secs(20));
    assert!(st.success());
    assert!(env.runv(&["start", &id]).status.success());

    let mut m = std::fs::File::from(master);
    m.write_all(b"hello-pty\n").unwrap();
    // SAFETY: fcntl(2) on a descriptor we own.
    unsafe { libc::fcntl(m.as_raw_fd(), libc::F_SETFL, libc::O_NONBLOCK) };
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut seen = Vec::new();
    // The container's pty echoes our line (with onlcr: "\r\n") and cat repeats it.
    while String::from_utf8_lossy(&seen).matches("hello-pty").count() < 2 {
        let mut buf = [0u8; 1024];
        match m.read(&mut buf) {
            Ok(n) => seen.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(5))
            }
            Err(e) => panic!("reading the master: {e}"),
        }
        assert!(
            Instant::now() < deadline,
            "no echo: {:?}",
            String::from_utf8_lossy(&seen)
        );
    }
    let text = String::from_utf8_lossy(&seen);
    assert_eq!(text, "hello-pty\r\nhello-pty\r\n");
    assert!(env.runv(&["delete", "--force", &id]).status.success());
    assert!(env.left().is_empty());
}

#[test]
fn fifty_containers_leave_nothing() {
    let Some(env) = Env::new("fifty_containers_leave_nothing") else {
        return;
    };
    let b = env.bundle("many", &["sh", "-c", "echo $$"], false);
    let t0 = Instant::now();
    let ids: Vec<String> = (0..50).map(|i| env.id(&format!("n{i}"))).collect();
    for (i, id) in ids.iter().enumerate() {
        let (st, out, err) = env.runv_to_files(
            &["create", "--bundle", b.to_str().unwrap(), id],
            &format!("n{i}"),
        );
        assert!(
            st.success(),
            "{id}: {}",
            std::fs::read_to_string(err).unwrap()
        );
        let o = env.runv(&["start", id]);
        assert!(
            o.status.success(),
            "{id}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        // The container is PID 1 of its own pid namespace.
        assert_eq!(common::wait_file_contains(&out, "\n"), "1\n");
        // Every other one is deleted with --force without waiting for its exit.
        if i % 2 == 1 {
            env.wait_status(id, "stopped");
            let o = env.runv(&["delete", id]);
            assert!(
                o.status.success(),
                "{id}: {}",
                String::from_utf8_lossy(&o.stderr)
            );
        } else {
            let o = env.runv(&["delete", "--force", id]);
            assert!(
                o.status.success(),
                "{id}: {}",
                String::from_utf8_lossy(&o.stderr)
            );
        }
    }
    println!("50 containers: {:.2} s", t0.elapsed().as_secs_f64());
    let root = env.root.path().to_str().unwrap().to_string();
    assert!(env.left().is_empty(), "left under --root: {:?}", env.left());
    assert_eq!(std::fs::read_dir(&root).unwrap().count(), 0);
    // No monitor or agent (their command lines name the root).
    let procs = processes_mentioning(&root);
    assert!(procs.is_empty(), "processes left: {procs:?}");
    // No mount under the root or the rootfs.
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let rootfs = env.rootfs.to_str().unwrap();
    assert!(
        !mounts
            .lines()
            .any(|l| l.contains(&root) || l.contains(rootfs)),
        "mounts left: {mounts}"
    );
    // No cgroup of any of the 50 (each agent's group is runv-<id>).
    let mut cgroups = Vec::new();
    for ctl in std::fs::read_dir("/sys/fs/cgroup").unwrap().flatten() {
        for id in &ids {
            for p in [
                ctl.path().join(format!("runv-{id}")),
                std::path::Path::new("/sys/fs/cgroup").join(format!("runv-{id}")),
            ] {
                if p.exists() {
                    cgroups.push(p);
                }
            }
        }
    }
    assert!(cgroups.is_empty(), "cgroups left: {cgroups:?}");
}

#[test]
fn exec_tty_with_console_socket() {
    let Some(env) = Env::new("exec_tty_with_console_socket") else {
        return;
    };
    let id = env.id("extty");
    let b = env.bundle("extty", &["sleep", "100"], false);
    let (st, _, _) = env.runv_to_files(
        &["run", "-d", "--bundle", b.to_str().unwrap(), &id],
        "extty",
    );
    assert!(st.success());
    env.wait_status(&id, "running");
    let sock = env.dir.path().join("exec-console.sock");
    let listener = UnixListener::bind(&sock).unwrap();
    let mut c = env.cmd(&[
        "exec",
        "--tty",
        "--console-socket",
        sock.to_str().unwrap(),
        &id,
        "sh",
        "-c",
        "read line; echo got-$line; exit 6",
    ]);
    c.stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    let exec = c.spawn().unwrap();
    let (_, master) = receive_master(&listener);
    let mut m = std::fs::File::from(master);
    m.write_all(b"abc\n").unwrap();
    let st = common::wait_bounded(exec, Duration::from_secs(10));
    assert_eq!(st.code(), Some(6));
    // SAFETY: fcntl(2) on a descriptor we own.
    unsafe { libc::fcntl(m.as_raw_fd(), libc::F_SETFL, libc::O_NONBLOCK) };
    let mut seen = Vec::new();
    let mut buf = [0u8; 1024];
    while let Ok(n) = m.read(&mut buf) {
        if n == 0 {
            break;
        }
        seen.extend_from_slice(&buf[..n]);
    }
    // The pty echoes the line, then the process answers.
    assert_eq!(String::from_utf8_lossy(&seen), "abc\r\ngot-abc\r\n");
    assert!(env.runv(&["delete", "--force", &id]).status.success());
}
