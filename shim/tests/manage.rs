//! `pause`/`resume`, `update` and `events` with the host sandbox (root and busybox-static
//! needed, otherwise a loud SKIPPED line).

mod common;

use std::io::BufRead;
use std::time::Duration;

use common::Env;

fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn pause_resume_update_limits_and_events_with_the_host_sandbox() {
    let Some(env) = Env::new("pause_resume_update_limits_and_events_with_the_host_sandbox") else {
        return;
    };
    let id = env.id("mg");
    let b = env.bundle("mg", &["sleep", "100"], false);
    let (st, _, _) = env.runv_to_files(&["run", "-d", "--bundle", b.to_str().unwrap(), &id], "mg");
    assert!(st.success());
    env.wait_status(&id, "running");

    // The host sandbox freezes the container's processes (the agent's cgroup freezer), as runc.
    let pid = env.state(&id)["pid"].as_i64().unwrap();
    let o = env.runv(&["pause", &id]);
    assert!(o.status.success(), "pause: {}", stderr(&o));
    assert_eq!(env.state(&id)["status"], "paused");
    let o = env.runv(&["pause", &id]);
    assert!(
        !o.status.success() && stderr(&o).contains("already paused"),
        "{}",
        stderr(&o)
    );
    // The container's processes sit in the freezer (`ps` still lists them).
    let o = env.runv(&["ps", "--format", "json", &id]);
    let pids: Vec<i64> = serde_json::from_slice(&o.stdout).unwrap();
    assert!(!pids.is_empty(), "{}", stderr(&o));
    let o = env.runv(&["resume", &id]);
    assert!(o.status.success(), "resume: {}", stderr(&o));
    assert_eq!(env.state(&id)["status"], "running");
    assert_eq!(env.state(&id)["pid"].as_i64(), Some(pid));

    // update: the memory limit reaches the container's cgroup (stats report it back).
    let res = env.dir.path().join("res.json");
    std::fs::write(&res, r#"{"memory":{"limit":67108864},"pids":{"limit":32}}"#).unwrap();
    let o = env.runv(&["update", "--resources", res.to_str().unwrap(), &id]);
    assert!(o.status.success(), "update: {}", stderr(&o));
    let o = env.runv(&["events", "--stats", &id]);
    assert!(o.status.success(), "events: {}", stderr(&o));
    let ev: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(ev["type"], "stats");
    assert_eq!(ev["id"], id.as_str());
    assert_eq!(ev["data"]["memory"]["usage"]["limit"], 67108864);
    assert!(ev["data"]["pids"]["current"].as_u64().unwrap() >= 1, "{ev}");
    assert!(
        ev["data"]["memory"]["usage"]["usage"].as_u64().unwrap() > 0,
        "{ev}"
    );

    // Nothing to apply, or not JSON: refused with the file named.
    std::fs::write(&res, r#"{"blockIO":{}}"#).unwrap();
    let o = env.runv(&["update", "--resources", res.to_str().unwrap(), &id]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("no memory.limit"), "{}", stderr(&o));
    std::fs::write(&res, "nope").unwrap();
    let o = env.runv(&["update", "--resources", res.to_str().unwrap(), &id]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("res.json"), "{}", stderr(&o));

    // events without --stats: a line per interval until the container stops.
    let mut c = env.cmd(&["events", "--interval", "100ms", &id]);
    c.stdout(std::process::Stdio::piped());
    let mut child = c.spawn().unwrap();
    let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
    for _ in 0..2 {
        let l = lines.next().unwrap().unwrap();
        let v: serde_json::Value = serde_json::from_str(&l).unwrap();
        assert_eq!(v["type"], "stats", "{l}");
    }
    // A paused container is killed too (the agent thaws what it signalled).
    assert!(env.runv(&["pause", &id]).status.success());
    assert!(env.runv(&["kill", &id, "KILL"]).status.success());
    // It ends by itself (stdout closes) once the container has stopped.
    for l in lines {
        let l = l.unwrap();
        assert!(serde_json::from_str::<serde_json::Value>(&l).is_ok(), "{l}");
    }
    let st = common::wait_bounded(child, Duration::from_secs(10));
    assert!(st.success(), "events ended with {st}");
    env.wait_status(&id, "stopped");
    assert!(env.runv(&["delete", &id]).status.success());
    assert!(env.left().is_empty(), "{:?}", env.left());
}
