//! Real containers run by a real `runv-agent` process on this host.

mod common;

use std::time::Duration;

use common::*;
use protocol::{Request, Response, StdioConfig};

#[test]
fn echo_exit_code_and_signal_death() {
    let Some(root) = rootfs("echo_exit_code_and_signal_death") else {
        return;
    };
    let agent = Agent::start();
    let mut c = agent.client();
    let (out, _, st) = run(&mut c, "echo", spec(&["echo", "hello"]), &root);
    assert_eq!((out.as_str(), st.code), ("hello\n", 0));
    let (_, _, st) = run(&mut c, "seven", spec(&["sh", "-c", "exit 7"]), &root);
    assert_eq!((st.code, st.signal), (7, None));
}

#[test]
fn kill_9_reports_137() {
    let Some(root) = rootfs("kill_9_reports_137") else {
        return;
    };
    let agent = Agent::start();
    let mut c = agent.client();
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
    let Some(root) = rootfs("stdin_is_piped_through_cat") else {
        return;
    };
    let agent = Agent::start();
    let mut c = agent.client();
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
    let Some(root) = rootfs("terminal_mode") else {
        return;
    };
    let agent = Agent::start();
    let mut c = agent.client();
    let s = launch(
        &mut c,
        "tty",
        spec(&[
            "sh",
            "-c",
            "[ -t 0 ] && [ -t 1 ] && echo is-a-tty; read line; stty size; echo got:$line",
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
    let Some(root) = rootfs("exec_joins_the_running_container") else {
        return;
    };
    let agent = Agent::start();
    let mut c = agent.client();
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
    let Some(root) = rootfs("hostname_env_cwd_user_and_mounts_applied") else {
        return;
    };
    let agent = Agent::start();
    let mut c = agent.client();
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
