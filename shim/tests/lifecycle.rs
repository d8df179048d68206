//! runv end to end with the host sandbox: create/start/state, run exit codes, kill, delete,
//! exec, ps, pid files, logs.

mod common;

use std::time::Duration;

use common::{processes_mentioning, wait_file_contains, Env};

fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn create_start_state_output_and_exit_code() {
    let Some(env) = Env::new("create_start_state_output_and_exit_code") else {
        return;
    };
    let id = env.id("life");
    let b = env.bundle(
        "life",
        &["sh", "-c", "echo hello from runv; echo oops >&2; exit 3"],
        false,
    );
    let pid_file = env.dir.path().join("life.pid");
    let (st, out, err) = env.runv_to_files(
        &[
            "create",
            "--bundle",
            b.to_str().unwrap(),
            "--pid-file",
            pid_file.to_str().unwrap(),
            &id,
        ],
        "life",
    );
    assert!(
        st.success(),
        "create: {}",
        std::fs::read_to_string(&err).unwrap()
    );
    let warning = std::fs::read_to_string(&err).unwrap();
    assert!(
        warning.contains("WARNING") && warning.contains("NO VM isolation"),
        "{warning}"
    );

    let s = env.state(&id);
    assert_eq!(s["status"], "created", "{s}");
    assert_eq!(s["id"], id.as_str());
    assert_eq!(s["bundle"], b.canonicalize().unwrap().to_str().unwrap());
    assert_eq!(s["annotations"]["runv.sandbox"], "host");
    assert_eq!(s["annotations"]["org.example.test"], "yes");
    assert!(s["pid"].as_i64().unwrap() > 0, "{s}");

    // The pid file holds the monitor's pid.
    let monitor: i32 = std::fs::read_to_string(&pid_file)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let comm = std::fs::read_to_string(format!("/proc/{monitor}/comm")).unwrap();
    assert_eq!(comm.trim_end(), "runv-monitor", "pid file {monitor}");

    let o = env.runv(&["start", &id]);
    assert!(o.status.success(), "start: {}", stderr(&o));
    let s = env.wait_status(&id, "stopped");
    assert_eq!(s["exitStatus"], 3, "{s}");
    assert_eq!(s["pid"], 0);
    assert_eq!(wait_file_contains(&out, "hello"), "hello from runv\n");
    wait_file_contains(&err, "oops");

    // A stopped container deletes without --force; the root is empty afterwards.
    let o = env.runv(&["delete", &id]);
    assert!(o.status.success(), "delete: {}", stderr(&o));
    assert!(env.left().is_empty(), "{:?}", env.left());
    assert!(common::gone(monitor.into()), "monitor {monitor} survived");
    assert!(env.runv(&["state", &id]).status.code() == Some(1));
}

#[test]
fn run_foreground_exit_codes() {
    let Some(env) = Env::new("run_foreground_exit_codes") else {
        return;
    };
    for (name, script, want) in [("zero", "echo ok", 0), ("seven", "exit 7", 7)] {
        let id = env.id(name);
        let b = env.bundle(name, &["sh", "-c", script], false);
        let o = env.runv(&["run", "--bundle", b.to_str().unwrap(), &id]);
        assert_eq!(o.status.code(), Some(want), "{name}: {}", stderr(&o));
        if want == 0 {
            assert_eq!(String::from_utf8_lossy(&o.stdout), "ok\n");
        }
    }
    // Killed with SIGKILL: 128 + 9.
    let id = env.id("killed");
    let b = env.bundle("killed", &["sleep", "100"], false);
    let mut c = env.cmd(&["run", "--bundle", b.to_str().unwrap(), &id]);
    c.stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    let child = c.spawn().unwrap();
    env.wait_status(&id, "running");
    let o = env.runv(&["kill", &id, "KILL"]);
    assert!(o.status.success(), "kill: {}", stderr(&o));
    let st = common::wait_bounded(child, Duration::from_secs(10));
    assert_eq!(st.code(), Some(137));
    // run (foreground) deletes the container.
    assert!(env.left().is_empty(), "{:?}", env.left());
}

#[test]
fn kill_with_signal_names_and_numbers() {
    let Some(env) = Env::new("kill_with_signal_names_and_numbers") else {
        return;
    };
    // PID 1 of a pid namespace ignores signals it has no handler for: --all reaches the sleep,
    // and sh exits with wait's 128 + signal. A background job of a non-interactive shell ignores
    // SIGINT, though, so for SIGINT sh's own trap answers (any other signal would be ignored).
    let sleeper = "sleep 100 & wait $!";
    let trapped = "trap 'exit 130' INT; sleep 100 & wait $!";
    for (name, sig, script, want) in [
        ("term", "TERM", sleeper, 143),
        ("num", "15", sleeper, 143),
        ("sigint", "SIGINT", trapped, 130),
    ] {
        let id = env.id(name);
        let b = env.bundle(name, &["sh", "-c", script], false);
        let (st, _, err) =
            env.runv_to_files(&["run", "-d", "--bundle", b.to_str().unwrap(), &id], name);
        assert!(st.success(), "{}", std::fs::read_to_string(err).unwrap());
        // Signal once the sleep runs (before, only the signal-immune PID 1 would get it, and
        // before its trap is set, not even the trapped one). A second pid is not enough: it may
        // be sh's child not yet exec'd, or sh not yet past its trap; a `sleep` is both.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let o = env.runv(&["ps", "--format", "json", &id]);
            let pids: Vec<i64> = serde_json::from_slice(&o.stdout).unwrap_or_default();
            let comm = |pid: &i64| std::fs::read_to_string(format!("/proc/{pid}/comm"));
            if pids
                .iter()
                .any(|p| comm(p).is_ok_and(|c| c.trim() == "sleep"))
            {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "no sleep in {id}");
            std::thread::sleep(Duration::from_millis(5));
        }
        let o = env.runv(&["kill", "--all", &id, sig]);
        assert!(o.status.success(), "kill {sig}: {}", stderr(&o));
        let s = env.wait_status(&id, "stopped");
        assert_eq!(s["exitStatus"], want, "{sig}: {s}");
        assert!(env.runv(&["delete", &id]).status.success());
    }
    let o = env.runv(&["kill", &env.id("term"), "NOPE"]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("unknown signal"), "{}", stderr(&o));
}

#[test]
fn delete_running_needs_force() {
    let Some(env) = Env::new("delete_running_needs_force") else {
        return;
    };
    let id = env.id("busy");
    let b = env.bundle("busy", &["sleep", "100"], false);
    let (st, _, err) =
        env.runv_to_files(&["run", "-d", "--bundle", b.to_str().unwrap(), &id], "busy");
    assert!(st.success(), "{}", std::fs::read_to_string(err).unwrap());
    let s = env.wait_status(&id, "running");
    let init = s["pid"].as_i64().unwrap();
    let o = env.runv(&["delete", &id]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("is running") && stderr(&o).contains("--force"),
        "{}",
        stderr(&o)
    );
    assert_eq!(env.state(&id)["status"], "running");
    let o = env.runv(&["delete", "--force", &id]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(env.left().is_empty());
    assert!(
        !std::path::Path::new(&format!("/proc/{init}")).exists(),
        "init {init} survived"
    );
    assert!(processes_mentioning(env.root.path().to_str().unwrap()).is_empty());
}

#[test]
fn delete_created_container() {
    let Some(env) = Env::new("delete_created_container") else {
        return;
    };
    let id = env.id("idle");
    let b = env.bundle("idle", &["sleep", "100"], false);
    let (st, _, _) = env.runv_to_files(&["create", "--bundle", b.to_str().unwrap(), &id], "idle");
    assert!(st.success());
    assert_eq!(env.state(&id)["status"], "created");
    let o = env.runv(&["delete", &id]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(env.left().is_empty());
    assert!(processes_mentioning(env.root.path().to_str().unwrap()).is_empty());
}

#[test]
fn exec_output_exit_code_and_ps() {
    let Some(env) = Env::new("exec_output_exit_code_and_ps") else {
        return;
    };
    let id = env.id("ex");
    let b = env.bundle("ex", &["sleep", "100"], false);
    let (st, _, _) = env.runv_to_files(&["run", "-d", "--bundle", b.to_str().unwrap(), &id], "ex");
    assert!(st.success());
    let init = env.wait_status(&id, "running")["pid"].as_i64().unwrap();

    let o = env.runv(&[
        "exec",
        &id,
        "sh",
        "-c",
        "echo out $(hostname 2>/dev/null || cat /proc/sys/kernel/hostname); echo err >&2; exit 5",
    ]);
    assert_eq!(o.status.code(), Some(5), "{}", stderr(&o));
    assert_eq!(String::from_utf8_lossy(&o.stdout), "out runv-test\n");
    assert_eq!(stderr(&o), "err\n");

    // exec --process with a process.json.
    let p = env.dir.path().join("process.json");
    std::fs::write(&p, r#"{"args":["sh","-c","echo $FOO"],"env":["PATH=/bin","FOO=bar"],"cwd":"/","user":{"uid":0,"gid":0}}"#).unwrap();
    let o = env.runv(&["exec", "--process", p.to_str().unwrap(), &id]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(String::from_utf8_lossy(&o.stdout), "bar\n");

    // ps: the init and a detached exec's process.
    let pid_file = env.dir.path().join("exec.pid");
    let o = env.runv(&[
        "exec",
        "-d",
        "--pid-file",
        pid_file.to_str().unwrap(),
        &id,
        "sleep",
        "50",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let exec_pid: i64 = std::fs::read_to_string(&pid_file)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let o = env.runv(&["ps", "--format", "json", &id]);
    assert!(o.status.success(), "{}", stderr(&o));
    let pids: Vec<i64> = serde_json::from_slice(&o.stdout).unwrap();
    assert!(
        pids.contains(&init) && pids.contains(&exec_pid),
        "{pids:?} init {init} exec {exec_pid}"
    );
    let o = env.runv(&["ps", &id]);
    let table = String::from_utf8_lossy(&o.stdout);
    assert!(
        table.starts_with("PID\tCMD\n")
            && table.contains("sleep 100")
            && table.contains("sleep 50"),
        "{table}"
    );

    // exec into a stopped container fails.
    assert!(env.runv(&["kill", &id, "KILL"]).status.success());
    env.wait_status(&id, "stopped");
    let o = env.runv(&["exec", &id, "true"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("stopped"), "{}", stderr(&o));
    assert!(env.runv(&["delete", &id]).status.success());
    assert!(common::gone(exec_pid), "exec {exec_pid} survived");
}

#[test]
fn list_features_spec_and_json_log() {
    let Some(env) = Env::new("list_features_spec_and_json_log") else {
        return;
    };
    let id = env.id("ls");
    let b = env.bundle("ls", &["sleep", "100"], false);
    let (st, _, _) = env.runv_to_files(&["create", "--bundle", b.to_str().unwrap(), &id], "ls");
    assert!(st.success());
    let o = env.runv(&["list", "--format", "json"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v[0]["id"], id.as_str());
    assert_eq!(v[0]["status"], "created");
    let o = env.runv(&["list", "-q"]);
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), id);

    let o = env.runv(&["features"]);
    let f: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(f["ociVersionMax"], "1.2.0");
    assert!(f["linux"]["namespaces"].as_array().unwrap().len() >= 5);

    let sd = env.dir.path().join("specdir");
    std::fs::create_dir(&sd).unwrap();
    assert!(env
        .runv(&["spec", "--bundle", sd.to_str().unwrap()])
        .status
        .success());
    let s: serde_json::Value =
        serde_json::from_slice(&std::fs::read(sd.join("config.json")).unwrap()).unwrap();
    assert!(s["ociVersion"].as_str().unwrap().starts_with("1."));
    let o = env.runv(&["spec", "--bundle", sd.to_str().unwrap()]);
    assert!(!o.status.success() && stderr(&o).contains("exists"));

    // Errors go to stderr and, with --log-format json, to the log file as runc writes them.
    let log = env.dir.path().join("runv.log");
    let o = env.runv(&[
        "--log",
        log.to_str().unwrap(),
        "--log-format",
        "json",
        "start",
        "nosuch",
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("nosuch does not exist"),
        "{}",
        stderr(&o)
    );
    let line: serde_json::Value =
        serde_json::from_str(std::fs::read_to_string(&log).unwrap().trim()).unwrap();
    assert_eq!(line["level"], "error");
    assert!(line["msg"].as_str().unwrap().contains("nosuch"), "{line}");
    assert!(line["time"].as_str().unwrap().ends_with('Z'));

    let o = env.runv(&["pause", &id]);
    assert!(
        !o.status.success() && stderr(&o).contains("only a running container can be paused"),
        "{}",
        stderr(&o)
    );
    assert!(env.runv(&["delete", &id]).status.success());
}

#[test]
fn delete_after_monitor_killed_leaves_nothing() {
    let Some(env) = Env::new("delete_after_monitor_killed_leaves_nothing") else {
        return;
    };
    let id = env.id("orphan");
    let b = env.bundle("orphan", &["sleep", "100"], false);
    let pid_file = env.dir.path().join("orphan.pid");
    let (st, _, _) = env.runv_to_files(
        &[
            "run",
            "-d",
            "--pid-file",
            pid_file.to_str().unwrap(),
            "--bundle",
            b.to_str().unwrap(),
            &id,
        ],
        "orphan",
    );
    assert!(st.success());
    let init = env.wait_status(&id, "running")["pid"].as_i64().unwrap();
    let monitor: i32 = std::fs::read_to_string(&pid_file)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    // SAFETY: kill(2) on the monitor this test created.
    unsafe { libc::kill(monitor, libc::SIGKILL) };
    env.wait_status(&id, "stopped");
    // The agent ended with its monitor (parent-death signal); the container's process did not.
    std::thread::sleep(Duration::from_millis(50));
    assert!(!common::gone(init), "init {init} died with the agent");
    let o = env.runv(&["delete", &id]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        common::gone(init),
        "init {init} survived its monitor's death and delete"
    );
    assert!(env.left().is_empty());
    assert!(processes_mentioning(env.root.path().to_str().unwrap()).is_empty());
    let group = format!("runv-{id}");
    for ctl in std::fs::read_dir("/sys/fs/cgroup").unwrap().flatten() {
        assert!(
            !ctl.path().join(&group).exists(),
            "{}",
            ctl.path().display()
        );
    }
}

#[test]
fn run_forwards_signals_to_the_container() {
    let Some(env) = Env::new("run_forwards_signals_to_the_container") else {
        return;
    };
    let id = env.id("fwd");
    let script = "trap 'echo got-term; exit 42' TERM; echo ready; while true; do sleep 0.05; done";
    let b = env.bundle("fwd", &["sh", "-c", script], false);
    let mut c = env.cmd(&["run", "--bundle", b.to_str().unwrap(), &id]);
    c.stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null());
    let mut child = c.spawn().unwrap();
    let mut out = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        use std::io::Read;
        let mut all = Vec::new();
        let mut buf = [0u8; 256];
        let mut signalled = false;
        while let Ok(n) = out.read(&mut buf) {
            if n == 0 {
                break;
            }
            all.extend_from_slice(&buf[..n]);
            if !signalled && String::from_utf8_lossy(&all).contains("ready") {
                signalled = true;
                // The container trapped TERM: signal `runv run` itself.
                // SAFETY: kill(2) on the runv process this test started.
                unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            }
        }
        (child, String::from_utf8_lossy(&all).into_owned())
    });
    // Bounded: a runv that never forwards leaves the monitor holding the pipe.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !reader.is_finished() {
        assert!(
            std::time::Instant::now() < deadline,
            "runv run did not end after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let (child, text) = reader.join().unwrap();
    let st = common::wait_bounded(child, Duration::from_secs(10));
    assert_eq!(st.code(), Some(42), "output {text:?}");
    assert_eq!(text, "ready\ngot-term\n");
    assert!(env.left().is_empty());
}

#[test]
fn concurrent_execs_all_succeed() {
    let Some(env) = Env::new("concurrent_execs_all_succeed") else {
        return;
    };
    let id = env.id("par");
    let b = env.bundle("par", &["sleep", "100"], false);
    let (st, _, _) = env.runv_to_files(&["run", "-d", "--bundle", b.to_str().unwrap(), &id], "par");
    assert!(st.success());
    env.wait_status(&id, "running");
    // Parallel execs once raced the agent's exec helper (its pid report and the inner child's
    // ready report share a pipe) into kill(0, SIGKILL), taking the monitor with it.
    for round in 0..10 {
        let outs: Vec<_> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..4)
                .map(|i| {
                    let (env, id) = (&env, &id);
                    s.spawn(move || {
                        env.runv(&["exec", id, "sh", "-c", &format!("echo r{round}-{i}")])
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for (i, o) in outs.iter().enumerate() {
            assert!(o.status.success(), "round {round} exec {i}: {}", stderr(o));
            assert_eq!(
                String::from_utf8_lossy(&o.stdout),
                format!("r{round}-{i}\n")
            );
        }
    }
    assert_eq!(env.state(&id)["status"], "running");
    assert!(env.runv(&["delete", "--force", &id]).status.success());
}

#[test]
fn run_foreground_with_a_terminal_uses_runv_stdio() {
    let Some(env) = Env::new("run_foreground_with_a_terminal_uses_runv_stdio") else {
        return;
    };
    let id = env.id("fgtty");
    let b = env.bundle("fgtty", &["sh", "-c", "echo on-a-pty; exit 3"], true);
    let o = env.runv(&["run", "--bundle", b.to_str().unwrap(), &id]);
    assert_eq!(o.status.code(), Some(3), "{}", stderr(&o));
    // The container's pty turns "\n" into "\r\n".
    assert_eq!(String::from_utf8_lossy(&o.stdout), "on-a-pty\r\n");
    assert!(env.left().is_empty());
    // Detached, a terminal still needs a console socket.
    let o = env.runv(&["run", "-d", "--bundle", b.to_str().unwrap(), &id]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("--console-socket"), "{}", stderr(&o));
    assert!(env.left().is_empty());
}
