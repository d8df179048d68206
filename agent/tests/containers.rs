//! Real containers run by a real `runv-agent` process on this host.

mod common;

use std::time::Duration;

use common::*;
use protocol::client::Client;
use protocol::{Request, Response, StdioConfig};

#[test]
fn echo_exit_code_and_signal_death() {
    let Some((root, _agent, mut c)) = setup("echo_exit_code_and_signal_death") else {
        return;
    };
    let (out, _, st) = run(&mut c, "echo", spec(&["echo", "hello"]), &root);
    assert_eq!((out.as_str(), st.code), ("hello\n", 0));
    let (_, _, st) = run(&mut c, "seven", spec(&["sh", "-c", "exit 7"]), &root);
    assert_eq!((st.code, st.signal), (7, None));
}

/// A container starts with nothing blocked and no signal ignored, even when the agent was
/// started with signals ignored (a shell could not trap them otherwise); its shell's trap runs.
#[test]
fn a_container_starts_with_default_signal_dispositions() {
    let test = "a_container_starts_with_default_signal_dispositions";
    let Some(root) = rootfs(test) else {
        return;
    };
    let agent = Agent::start_ignoring_signals();
    let mut c = agent.client();
    let (out, _, st) = run(&mut c, "sigs", spec(&["cat", "/proc/self/status"]), &root);
    assert_eq!(st.code, 0);
    for field in ["SigBlk", "SigIgn"] {
        let line = out.lines().find(|l| l.starts_with(field)).unwrap();
        assert_eq!(line, format!("{field}:\t0000000000000000"), "{out}");
    }
    let script = "trap 'exit 130' INT; kill -INT $$; exit 1";
    let (_, _, st) = run(&mut c, "trap", spec(&["sh", "-c", script]), &root);
    assert_eq!(st.code, 130, "the shell's INT trap did not run");
}

#[test]
fn kill_9_reports_137() {
    let Some((root, _agent, mut c)) = setup("kill_9_reports_137") else {
        return;
    };
    launch(
        &mut c,
        "k",
        spec(&["sleep", "100"]),
        &root,
        StdioConfig::default(),
    );
    let r = c
        .call(&Request::Signal {
            id: "k".into(),
            exec_id: None,
            signal: 9,
            all: false,
        })
        .unwrap();
    assert_eq!(r, Response::Ok);
    let st = wait(&mut c, "k");
    assert_eq!((st.code, st.signal, st.oom_killed), (137, Some(9), false));
    assert_eq!(
        c.call(&Request::Destroy { id: "k".into() }).unwrap(),
        Response::Ok
    );
}

#[test]
fn stdin_is_piped_through_cat() {
    let Some((root, _agent, mut c)) = setup("stdin_is_piped_through_cat") else {
        return;
    };
    let s = launch(
        &mut c,
        "cat",
        spec(&["cat"]),
        &root,
        StdioConfig {
            terminal: false,
            stdin: true,
        },
    );
    let input: Vec<u8> = (0..300_000u32).map(|i| b'a' + (i % 26) as u8).collect();
    let stdin = s.stdin.unwrap();
    c.write_stdin(stdin, &input).unwrap();
    c.close_stdin(stdin).unwrap();
    let out = c.read_to_close(s.stdout, Duration::from_secs(20)).unwrap();
    assert!(
        out == input,
        "cat returned {} of {} bytes",
        out.len(),
        input.len()
    );
    assert_eq!(wait(&mut c, "cat").code, 0);
    c.call(&Request::Destroy { id: "cat".into() }).unwrap();
}

#[test]
fn terminal_mode() {
    let Some((root, _agent, mut c)) = setup("terminal_mode") else {
        return;
    };
    let s = launch(
        &mut c,
        "tty",
        spec(&[
            "sh",
            "-c",
            "[ -t 0 ] && [ -t 1 ] && echo is-a-tty; echo name:$(tty); read line; stty size; echo got:$line",
        ]),
        &root,
        StdioConfig {
            terminal: true,
            stdin: true,
        },
    );
    assert!(s.stderr.is_none());
    let r = c
        .call(&Request::ResizeTty {
            id: "tty".into(),
            exec_id: None,
            rows: 50,
            cols: 120,
        })
        .unwrap();
    assert_eq!(r, Response::Ok);
    c.write_stdin(s.stdin.unwrap(), b"ping\n").unwrap();
    let st = wait(&mut c, "tty");
    let out = String::from_utf8_lossy(&c.read_to_close(s.stdout, Duration::from_secs(10)).unwrap())
        .to_string();
    assert_eq!(st.code, 0, "{out}");
    assert!(
        out.contains("is-a-tty\r\n"),
        "stdin and stdout are a terminal: {out:?}"
    );
    assert!(out.contains("got:ping"), "{out:?}");
    // The terminal is the container's /dev/console, so ttyname(3) finds it inside.
    assert!(out.contains("name:/dev/console\r\n"), "{out:?}");
    assert!(
        out.contains("50 120"),
        "the resize reached the terminal: {out:?}"
    );
    let r = c
        .call(&Request::ResizeTty {
            id: "tty".into(),
            exec_id: None,
            rows: 5,
            cols: 5,
        })
        .unwrap();
    assert!(
        matches!(r, Response::Error(_)),
        "resizing an exited process's terminal: {r:?}"
    );
    c.call(&Request::Destroy { id: "tty".into() }).unwrap();
}

#[test]
fn exec_joins_the_running_container() {
    let Some((root, _agent, mut c)) = setup("exec_joins_the_running_container") else {
        return;
    };
    let mut sp = spec(&["sleep", "100"]);
    sp.set_hostname(Some("boxy".into()));
    launch(&mut c, "ex", sp, &root, StdioConfig::default());
    let mut p = spec(&[]).process().clone().unwrap();
    p.set_args(Some(vec![
        "sh".into(),
        "-c".into(),
        "hostname; echo $$".into(),
    ]));
    let r = c
        .call(&Request::Exec {
            id: "ex".into(),
            exec_id: "e1".into(),
            process: Box::new(p),
            stdio: StdioConfig::default(),
        })
        .unwrap();
    let Response::ExecStarted { streams, .. } = r else {
        panic!("{r:?}")
    };
    let st = match c
        .call(&Request::Wait {
            id: "ex".into(),
            exec_id: Some("e1".into()),
        })
        .unwrap()
    {
        Response::Exited { status, .. } => status,
        r => panic!("{r:?}"),
    };
    let out = String::from_utf8_lossy(
        &c.read_to_close(streams.stdout, Duration::from_secs(10))
            .unwrap(),
    )
    .to_string();
    assert_eq!(st.code, 0, "{out}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], "boxy", "same UTS namespace: {out}");
    let pid: i32 = lines[1].parse().unwrap();
    assert!(
        pid > 1 && pid < 100,
        "a pid inside the container's namespace: {out}"
    );
    let Response::Processes { pids, .. } = c.call(&Request::Ps { id: "ex".into() }).unwrap() else {
        panic!()
    };
    assert_eq!(pids.len(), 1, "the exec is gone, init remains: {pids:?}");
    c.call(&Request::Destroy { id: "ex".into() }).unwrap();
}

#[test]
fn hostname_env_cwd_user_and_mounts_applied() {
    let Some((root, _agent, mut c)) = setup("hostname_env_cwd_user_and_mounts_applied") else {
        return;
    };
    let host_dir = tempfile::tempdir().unwrap();
    std::fs::write(host_dir.path().join("file"), "from-host\n").unwrap();
    let mut sp = spec(&[
        "sh",
        "-c",
        "hostname; echo $FOO; pwd; id -u; id -g; cat /host/file; touch /host/x 2>/dev/null || echo ro; grep ' /data ' /proc/mounts | cut -d' ' -f3",
    ]);
    sp.set_hostname(Some("sandbox-7".into()));
    let mut p = sp.process().clone().unwrap();
    let mut env = p.env().clone().unwrap_or_default();
    env.push("FOO=bar".into());
    p.set_env(Some(env));
    p.set_cwd("/tmp".into());
    let mut user = p.user().clone();
    user.set_uid(65534);
    user.set_gid(65534);
    p.set_user(user);
    sp.set_process(Some(p));
    let mut mounts = sp.mounts().clone().unwrap_or_default();
    mounts.push(
        oci_spec::runtime::MountBuilder::default()
            .destination("/data")
            .typ("tmpfs")
            .source("tmpfs")
            .options(vec!["nosuid".to_string()])
            .build()
            .unwrap(),
    );
    mounts.push(
        oci_spec::runtime::MountBuilder::default()
            .destination("/host")
            .typ("bind")
            .source(host_dir.path())
            .options(vec!["rbind".to_string(), "ro".to_string()])
            .build()
            .unwrap(),
    );
    sp.set_mounts(Some(mounts));
    let (out, err, st) = run(&mut c, "env", sp, &root);
    assert_eq!(st.code, 0, "{out} {err}");
    assert_eq!(
        out.lines().collect::<Vec<_>>(),
        [
            "sandbox-7",
            "bar",
            "/tmp",
            "65534",
            "65534",
            "from-host",
            "ro",
            "tmpfs"
        ],
        "stderr: {err}"
    );
    assert!(!host_dir.path().join("x").exists());
}

fn with_resources(
    mut sp: oci_spec::runtime::Spec,
    memory: Option<i64>,
    pids: Option<i64>,
) -> oci_spec::runtime::Spec {
    use oci_spec::runtime::{LinuxMemoryBuilder, LinuxPidsBuilder, LinuxResourcesBuilder};
    let mut linux = sp.linux().clone().unwrap_or_default();
    let mut r = LinuxResourcesBuilder::default();
    if let Some(m) = memory {
        r = r.memory(LinuxMemoryBuilder::default().limit(m).build().unwrap());
    }
    if let Some(p) = pids {
        r = r.pids(LinuxPidsBuilder::default().limit(p).build().unwrap());
    }
    linux.set_resources(Some(r.build().unwrap()));
    sp.set_linux(Some(linux));
    sp
}

#[test]
fn memory_limit_exceeded_is_reported_as_oom() {
    let Some((root, _agent, mut c)) = setup("memory_limit_exceeded_is_reported_as_oom") else {
        return;
    };
    // The shell itself holds 64 MiB in a variable: with a 16 MiB limit the kernel kills it.
    let sp = with_resources(
        spec(&[
            "sh",
            "-c",
            "x=$(head -c 67108864 /dev/zero | tr '\\0' a); echo survived ${#x}",
        ]),
        Some(16 << 20),
        None,
    );
    let (out, err, st) = run(&mut c, "oom", sp, &root);
    assert!(st.oom_killed, "exit {st:?}, out {out:?}, err {err:?}");
    assert_eq!((st.code, st.signal), (137, Some(9)));
}

#[test]
fn pids_limit_stops_forks() {
    let Some((root, _agent, mut c)) = setup("pids_limit_stops_forks") else {
        return;
    };
    let sp = with_resources(
        spec(&[
            "sh",
            "-c",
            "for i in 1 2 3 4 5 6 7 8 9 10; do sleep 2 & done; echo started; wait",
        ]),
        None,
        Some(4),
    );
    let (out, err, st) = run(&mut c, "pids", sp, &root);
    assert!(
        err.contains("fork") || err.contains("Resource temporarily unavailable"),
        "no fork failed: out {out:?} err {err:?} {st:?}"
    );
}

#[test]
fn overlay_root_keeps_the_lower_directory_untouched() {
    let Some((root, _agent, mut c)) = setup("overlay_root_keeps_the_lower_directory_untouched")
    else {
        return;
    };
    let r = c
        .call(&Request::Create {
            id: "ov".into(),
            spec: Box::new(spec(&[
                "sh",
                "-c",
                "echo new > /etc/written; cat /etc/written; rm /bin/ls; ls 2>&1 | head -c 0",
            ])),
            rootfs: protocol::RootfsSource::Overlay {
                lower: root.display().to_string(),
            },
            stdio: StdioConfig::default(),
        })
        .unwrap();
    let Response::Created { streams, .. } = r else {
        panic!("{r:?}")
    };
    c.call(&Request::Start { id: "ov".into() }).unwrap();
    assert_eq!(wait(&mut c, "ov").code, 0);
    let out = c
        .read_to_close(streams.stdout, Duration::from_secs(10))
        .unwrap();
    assert_eq!(out, b"new\n");
    c.call(&Request::Destroy { id: "ov".into() }).unwrap();
    assert!(
        !root.join("etc/written").exists(),
        "the write went to the upper layer"
    );
    assert!(
        root.join("bin/ls").symlink_metadata().is_ok(),
        "the delete went to the upper layer"
    );
}

/// Bad input gets error replies, and the agent keeps serving other connections.
#[test]
fn malformed_frames_versions_disconnects_and_missing_rootfs() {
    let Some(root) = rootfs("malformed_frames_versions_disconnects_and_missing_rootfs") else {
        return;
    };
    let agent = Agent::start();
    // Garbage: an error reply, then the connection is closed.
    let mut c = agent.client();
    c.send_raw(b"GET / HTTP/1.1\r\n\r\n").unwrap();
    match c.response(0, Duration::from_secs(5)) {
        Ok(Response::Error(e)) => assert_eq!(e.code, protocol::ErrorCode::BadFrame, "{e:?}"),
        r => panic!("{r:?}"),
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let closed = loop {
        match c.pump() {
            Err(protocol::client::ClientError::Closed) => break true,
            _ if std::time::Instant::now() > deadline => break false,
            _ => {}
        }
    };
    assert!(closed, "the agent closes a connection that lost frame sync");
    // Another protocol version.
    let mut c = agent.client();
    let mut f = Request::Ping.to_frame(1).to_bytes();
    f[3] = 9;
    c.send_raw(&f).unwrap();
    match c.response(0, Duration::from_secs(5)) {
        Ok(Response::Error(e)) => {
            assert_eq!(e.code, protocol::ErrorCode::UnsupportedVersion);
            assert!(e.message.contains("version 9"), "{}", e.message);
        }
        r => panic!("{r:?}"),
    }
    // Oversized and truncated.
    let mut c = agent.client();
    let mut f = Request::Ping.to_frame(1).to_bytes();
    f[10..14].copy_from_slice(&u32::MAX.to_be_bytes());
    c.send_raw(&f).unwrap();
    assert!(matches!(
        c.response(0, Duration::from_secs(5)),
        Ok(Response::Error(_))
    ));
    let mut c = agent.client();
    c.send_raw(&Request::Ping.to_frame(1).to_bytes()[..10])
        .unwrap();
    drop(c);
    // A valid frame with an undecodable request: error reply, connection stays.
    let mut c = agent.client();
    c.send_raw(
        &protocol::Frame::new(
            protocol::FrameKind::Request,
            5,
            b"{\"op\":\"fly\"}".to_vec(),
        )
        .to_bytes(),
    )
    .unwrap();
    assert!(
        matches!(c.response(5, Duration::from_secs(5)), Ok(Response::Error(e)) if e.code == protocol::ErrorCode::BadRequest)
    );
    assert!(matches!(
        c.call(&Request::Ping).unwrap(),
        Response::Pong { ready: true, .. }
    ));
    // Missing rootfs, unknown container, bad id.
    let r = c
        .call(&Request::Create {
            id: "nofs".into(),
            spec: Box::new(spec(&["true"])),
            rootfs: protocol::RootfsSource::Bind {
                path: "/nonexistent/rootfs".into(),
            },
            stdio: StdioConfig::default(),
        })
        .unwrap();
    assert!(
        matches!(&r, Response::Error(e) if e.code == protocol::ErrorCode::NotFound && e.message.contains("/nonexistent/rootfs")),
        "{r:?}"
    );
    let r = c.call(&Request::Start { id: "ghost".into() }).unwrap();
    assert!(
        matches!(&r, Response::Error(e) if e.code == protocol::ErrorCode::NotFound),
        "{r:?}"
    );
    let r = c
        .call(&Request::Destroy {
            id: "../etc".into(),
        })
        .unwrap();
    assert!(matches!(&r, Response::Error(_)), "{r:?}");
    // A client that disconnects mid-stream: the container keeps running, others can see it.
    let mut c1 = agent.client();
    let s = launch(
        &mut c1,
        "chatty",
        spec(&["yes"]),
        &root,
        StdioConfig::default(),
    );
    c1.first_byte(s.stdout, Duration::from_secs(10)).unwrap();
    drop(c1);
    std::thread::sleep(Duration::from_millis(100));
    let mut c2 = agent.client();
    match c2
        .call(&Request::State {
            id: "chatty".into(),
        })
        .unwrap()
    {
        Response::State(st) => assert_eq!(st.status, protocol::ContainerStatus::Running),
        r => panic!("{r:?}"),
    }
    assert_eq!(
        c2.call(&Request::Destroy {
            id: "chatty".into()
        })
        .unwrap(),
        Response::Ok
    );
    assert_eq!(
        c2.call(&Request::List).unwrap(),
        Response::Containers { ids: vec![] }
    );
}

fn count_dir(p: &std::path::Path) -> usize {
    std::fs::read_dir(p).map(|d| d.count()).unwrap_or(0)
}

fn children_of(pid: u32) -> usize {
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok())
        .filter_map(|e| std::fs::read_to_string(e.path().join("stat")).ok())
        .filter(|s| {
            s.rsplit_once(") ")
                .and_then(|(_, rest)| rest.split(' ').nth(1).map(|pp| pp == pid.to_string()))
                .unwrap_or(false)
        })
        .count()
}

/// 200 containers created, run and destroyed in sequence leave no process, fd, thread, mount or
/// cgroup behind in the agent.
#[test]
fn two_hundred_containers_leak_nothing() {
    let Some((root, agent, mut c)) = setup("two_hundred_containers_leak_nothing") else {
        return;
    };
    let pid = agent.pid();
    let cg = |ctl: &str| {
        std::path::Path::new("/sys/fs/cgroup")
            .join(ctl)
            .join(&agent.group)
    };
    let snapshot = || {
        (
            count_dir(std::path::Path::new(&format!("/proc/{pid}/fd"))),
            count_dir(std::path::Path::new(&format!("/proc/{pid}/task"))),
            children_of(pid),
            std::fs::read_to_string(format!("/proc/{pid}/mountinfo"))
                .unwrap()
                .lines()
                .count(),
            count_dir(&cg("memory")) + count_dir(&cg("pids")) + count_dir(&cg("")),
        )
    };
    // One container first so the agent's lazily created state (cgroup parent) exists.
    run(&mut c, "warm", spec(&["true"]), &root);
    // Its exit watcher answers `wait` and then still sends the `exited` event before it ends;
    // settle as before the second snapshot.
    std::thread::sleep(Duration::from_millis(200));
    let before = snapshot();
    for i in 0..200 {
        let sp = with_resources(spec(&["sh", "-c", "echo $$"]), Some(64 << 20), Some(32));
        let (out, _, st) = run(&mut c, &format!("c{i}"), sp, &root);
        assert_eq!((out.as_str(), st.code), ("1\n", 0), "container {i}");
    }
    std::thread::sleep(Duration::from_millis(200));
    let after = snapshot();
    assert_eq!(
        before, after,
        "(fds, threads, children, mounts, cgroup entries) before vs after"
    );
    let group = agent.group.clone();
    drop(c);
    drop(agent);
    assert!(
        group_dirs(&group).is_empty(),
        "the agent removes its cgroup on SIGTERM: {:?}",
        group_dirs(&group)
    );
}

#[test]
fn sigterm_reaches_a_container_shell_with_a_trap() {
    let Some((root, _agent, mut c)) = setup("sigterm_reaches_a_container_shell_with_a_trap") else {
        return;
    };
    let s = launch(
        &mut c,
        "trap",
        spec(&[
            "sh",
            "-c",
            "trap 'echo got-term; exit 3' TERM; echo ready; while true; do sleep 0.05; done",
        ]),
        &root,
        StdioConfig::default(),
    );
    c.first_byte(s.stdout, Duration::from_secs(10)).unwrap();
    let r = c
        .call(&Request::Signal {
            id: "trap".into(),
            exec_id: None,
            signal: 15,
            all: false,
        })
        .unwrap();
    assert_eq!(r, Response::Ok);
    let st = wait(&mut c, "trap");
    let out = c.read_to_close(s.stdout, Duration::from_secs(10)).unwrap();
    assert_eq!(
        (st.code, String::from_utf8_lossy(&out).as_ref()),
        (3, "ready\ngot-term\n")
    );
    c.call(&Request::Destroy { id: "trap".into() }).unwrap();
}

/// The default spec's capabilities (KILL, NET_BIND_SERVICE, AUDIT_WRITE), RLIMIT_NOFILE 1024 and
/// noNewPrivileges reach the process.
#[test]
fn capabilities_rlimits_and_no_new_privs_applied() {
    let Some((root, _agent, mut c)) = setup("capabilities_rlimits_and_no_new_privs_applied") else {
        return;
    };
    let (out, err, st) = run(
        &mut c,
        "caps",
        spec(&[
            "sh",
            "-c",
            "ulimit -n; grep -E '^(CapEff|CapBnd|NoNewPrivs)' /proc/self/status",
        ]),
        &root,
    );
    assert_eq!(st.code, 0, "{err}");
    let want = (1u64 << 5) | (1 << 10) | (1 << 29);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], "1024", "{out}");
    assert_eq!(lines[1], format!("CapEff:\t{want:016x}"), "{out}");
    assert_eq!(lines[2], format!("CapBnd:\t{want:016x}"), "{out}");
    assert_eq!(lines[3], "NoNewPrivs:\t1", "{out}");
}

/// CPU ticks (utime + stime) `pid` has used.
fn cpu_ticks(pid: i32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name (which may hold spaces) start at state, field 3.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split(' ').collect();
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

fn status_of(c: &mut Client, id: &str) -> (protocol::ContainerStatus, i32) {
    match c.call(&Request::State { id: id.into() }).unwrap() {
        Response::State(s) => (s.status, s.pid),
        r => panic!("state {id}: {r:?}"),
    }
}

#[test]
fn pause_freezes_every_process_and_resume_thaws_them() {
    use protocol::ContainerStatus;
    let Some((root, _agent, mut c)) = setup("pause_freezes_every_process_and_resume_thaws_them")
    else {
        return;
    };
    // A process that burns CPU as long as it may run.
    launch(
        &mut c,
        "busy",
        spec(&["sh", "-c", "while :; do :; done"]),
        &root,
        StdioConfig::default(),
    );
    let (status, pid) = status_of(&mut c, "busy");
    assert_eq!(status, ContainerStatus::Running);
    let pause = || Request::Pause { id: "busy".into() };
    let resume = || Request::Resume { id: "busy".into() };
    // Resuming a running container is refused.
    let r = c.call(&resume()).unwrap();
    assert!(
        matches!(&r, Response::Error(e) if e.message.contains("is running, not paused")),
        "{r:?}"
    );
    assert_eq!(c.call(&pause()).unwrap(), Response::Ok);
    assert_eq!(status_of(&mut c, "busy").0, ContainerStatus::Paused);
    let frozen = cpu_ticks(pid);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(cpu_ticks(pid), frozen, "a paused process ran");
    // No second pause.
    let r = c.call(&pause()).unwrap();
    assert!(
        matches!(&r, Response::Error(e) if e.message.contains("is paused, not running")),
        "{r:?}"
    );
    assert_eq!(c.call(&resume()).unwrap(), Response::Ok);
    assert_eq!(status_of(&mut c, "busy").0, ContainerStatus::Running);
    let thawed = cpu_ticks(pid);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while cpu_ticks(pid) == thawed {
        assert!(
            std::time::Instant::now() < deadline,
            "the resumed process never ran"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // A paused container is destroyed without waiting for a thaw.
    assert_eq!(c.call(&pause()).unwrap(), Response::Ok);
    assert_eq!(
        c.call(&Request::Destroy { id: "busy".into() }).unwrap(),
        Response::Ok
    );
    assert!(!std::path::Path::new(&format!("/proc/{pid}")).exists());
}
