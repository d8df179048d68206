//! `runv-pool serve` and the `runv-pool` CLI end to end, with real KVM and test-guest
//! templates: 100 concurrent acquires, refill, VMM deaths, SIGTERM + restart with leased
//! sandboxes, TTL, every bad-input reply, and `/metrics` checked against what was done.

mod common;

use std::collections::{BTreeMap, HashSet};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_runv-pool");

/// A daemon started by a test; SIGKILLed (with its VMMs) if the test fails before stopping it.
struct Daemon {
    child: Option<Child>,
    sock: PathBuf,
}

impl Daemon {
    fn start(dirs: &Dirs) -> Self {
        std::fs::create_dir_all(dirs.tmp.path()).unwrap();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dirs.tmp.path().join("daemon.log"))
            .unwrap();
        let child = Command::new(BIN)
            .arg("serve")
            .arg("--state-dir")
            .arg(dirs.state())
            .arg("--run-dir")
            .arg(dirs.run())
            .arg("--tmpfs-dir")
            .arg(&dirs.shm)
            .arg("--vmm")
            .arg(vmm_bin())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let sock = dirs.run().join("pool.sock");
        let d = Self {
            child: Some(child),
            sock,
        };
        wait_until("the daemon's socket", Duration::from_secs(20), || {
            d.sock.exists() && std::os::unix::net::UnixStream::connect(&d.sock).is_ok()
        });
        d
    }

    fn cli(&self, args: &[&str]) -> (bool, String, String) {
        let out = Command::new(BIN)
            .arg("--socket")
            .arg(&self.sock)
            .args(args)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    fn json(&self, args: &[&str]) -> Value {
        let mut a = vec!["--json"];
        a.extend_from_slice(args);
        let (ok, out, err) = self.cli(&a);
        assert!(ok, "runv-pool {args:?}: {err}");
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"))
    }

    /// SIGTERM, then a bounded wait.
    fn stop(&mut self) {
        let mut c = self.child.take().unwrap();
        // SAFETY: kill(2) on the daemon this test started.
        unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        wait_until("the daemon to exit", Duration::from_secs(15), || {
            c.try_wait().unwrap().is_some()
        });
        assert!(c.wait().unwrap().success());
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Kills every VMM left under `dirs` (after a failed test) so nothing outlives it.
struct Reaper<'a>(&'a Dirs);

impl Drop for Reaper<'_> {
    fn drop(&mut self) {
        for p in processes_mentioning(self.0.run().to_str().unwrap()) {
            // SAFETY: kill(2) on a VMM of this test's run dir.
            unsafe { libc::kill(p as i32, libc::SIGKILL) };
        }
    }
}

/// `GET /metrics` parsed (Prometheus text format): `name{labels}` → value; every line is a
/// comment or a sample, and the exposition ends with `# EOF`. Cross-checked with
/// `runv-pool --json stats`.
fn metrics(d: &Daemon) -> BTreeMap<String, f64> {
    let (status, text) = http(&d.sock, "GET", "/metrics", b"");
    assert_eq!(status, 200);
    let m: BTreeMap<String, f64> = text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| {
            let (k, v) = l
                .rsplit_once(' ')
                .unwrap_or_else(|| panic!("bad line {l:?}"));
            (
                k.to_string(),
                v.parse().unwrap_or_else(|_| panic!("bad value {l:?}")),
            )
        })
        .collect();
    assert!(text.trim_end().ends_with("# EOF"), "{text}");
    let cli = d.json(&["stats"]);
    assert_eq!(
        cli["runv_sandboxes_live"].as_f64(),
        m.get("runv_sandboxes_live").copied()
    );
    m
}

/// What the command line of a VMM of this test (not its daemon) contains.
fn vm_needle(dirs: &Dirs) -> String {
    format!("{}/vm-", dirs.run().display())
}

fn build_counter(d: &Daemon, name: &str) {
    let g = test_guests::guest_path();
    let t = d.json(&[
        "template",
        "build",
        name,
        "--kernel",
        g.to_str().unwrap(),
        "--cmdline",
        "rt.counter rt.idle",
        "--mem-mib",
        "64",
    ]);
    assert_eq!(t["status"], "ready", "{t}");
    // No --slots: runv's default, room for four container roots.
    assert_eq!(
        t["spec"]["slots"],
        pool_manager::template::DEFAULT_BUILD_SLOTS,
        "{t}"
    );
}

fn pool_shells(d: &Daemon) -> u64 {
    d.json(&["pool", "ls"])[0]["shells"].as_u64().unwrap()
}

#[test]
fn daemon_serves_100_concurrent_acquires_refills_and_leaves_nothing() {
    if !kvm_available("daemon_serves_100_concurrent_acquires_refills_and_leaves_nothing") {
        return;
    }
    let dirs = Dirs::new();
    let _reaper = Reaper(&dirs);
    let mut d = Daemon::start(&dirs);
    build_counter(&d, "counter");
    // Warm clones once the VMM can activate them (pool_manager::warm::SUPPORTED).
    let warm = if pool_manager::warm::SUPPORTED { 4 } else { 0 };
    let p = d.json(&[
        "pool",
        "set",
        "counter",
        "--warm",
        &warm.to_string(),
        "--shells",
        "4",
        "--max",
        "200",
    ]);
    assert_eq!(p["targets"]["shells"], 4, "{p}");
    let filled = |d: &Daemon| {
        let p = &d.json(&["pool", "ls"])[0];
        p["shells"] == 4 && p["warm"] == warm
    };
    wait_until("the pool filled", Duration::from_secs(20), || filled(&d));

    let got: Vec<Value> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..4)
            .map(|t| {
                let d = &d;
                s.spawn(move || {
                    (0..25)
                        .map(|i| {
                            let id = format!("t{t}-{i}");
                            d.json(&["sandbox", "acquire", "counter", "--id", &id])
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        hs.into_iter().flat_map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(got.len(), 100);
    let mut ids = HashSet::new();
    let mut tiers: BTreeMap<String, u64> = BTreeMap::new();
    let mut entropy = HashSet::new();
    for s in &got {
        let id = s["id"].as_str().unwrap();
        assert!(ids.insert(id.to_string()));
        assert_eq!(s["generation"], 1, "{s}");
        *tiers.entry(s["tier"].as_str().unwrap().into()).or_default() += 1;
        let r = resumed_report(Path::new(s["debug_log"].as_str().unwrap()));
        assert_eq!(field(&r, "clone"), Some(id), "{r}");
        assert_eq!(field(&r, "gen"), Some("1"), "{r}");
        assert_eq!(field(&r, "pattern"), Some("ok"), "{r}");
        // Every clone has its own entropy (FNV-1a of the identity page's 32 bytes).
        let ent = field(&r, "ent").unwrap_or_else(|| panic!("no ent= in {r}"));
        assert!(entropy.insert(ent.to_string()), "entropy {ent} reused: {r}");
        assert!(Path::new(s["control"].as_str().unwrap()).exists());
    }
    let live = d.json(&["sandbox", "ls"]);
    assert_eq!(live.as_array().unwrap().len(), 100);
    let m = metrics(&d);
    assert_eq!(m["runv_sandboxes_live"], 100.0);
    assert_eq!(m["runv_acquire_seconds_count"], 100.0);
    for (tier, n) in &tiers {
        assert_eq!(
            m[&format!("runv_acquires_total{{tier=\"{tier}\"}}")],
            *n as f64,
            "{tier}"
        );
    }
    assert_eq!(m["runv_template_build_seconds_count"], 1.0);

    std::thread::scope(|s| {
        for chunk in got.chunks(25) {
            let d = &d;
            s.spawn(move || {
                for sb in chunk {
                    let (ok, _, err) = d.cli(&["sandbox", "release", sb["id"].as_str().unwrap()]);
                    assert!(ok, "{err}");
                }
            });
        }
    });
    assert!(d.json(&["sandbox", "ls"]).as_array().unwrap().is_empty());
    if warm > 0 {
        assert!(tiers.get("warm").copied().unwrap_or(0) >= 4, "{tiers:?}");
    }
    wait_until("refilled and reaped", Duration::from_secs(30), || {
        filled(&d) && live_processes_mentioning(&vm_needle(&dirs)).len() == 4 + warm as usize
    });
    let m = metrics(&d);
    assert_eq!(m["runv_pool_vms{template=\"counter\",tier=\"shell\"}"], 4.0);
    assert_eq!(
        m["runv_pool_vms{template=\"counter\",tier=\"warm\"}"],
        warm as f64
    );
    assert_eq!(m["runv_sandboxes_live"], 0.0);
    assert_eq!(m["runv_refill_failures_total"], 0.0);

    d.stop();
    assert!(live_processes_mentioning(&vm_needle(&dirs)).is_empty());
    assert!(dirs.run_files().is_empty(), "left: {:?}", dirs.run_files());
    let rec = std::fs::read_to_string(dirs.state().join("sandboxes.json")).unwrap();
    assert_eq!(
        serde_json::from_str::<Value>(&rec).unwrap(),
        serde_json::json!([])
    );
    // Only the template's own two files on tmpfs.
    let shm: Vec<_> = std::fs::read_dir(dirs.shm.join("counter"))
        .unwrap()
        .flatten()
        .collect();
    assert_eq!(shm.len(), 2, "{shm:?}");
}

#[test]
fn daemon_restart_readopts_leased_sandboxes_and_notices_deaths_and_ttls() {
    if !kvm_available("daemon_restart_readopts_leased_sandboxes_and_notices_deaths_and_ttls") {
        return;
    }
    let dirs = Dirs::new();
    let _reaper = Reaper(&dirs);
    let mut d = Daemon::start(&dirs);
    build_counter(&d, "counter");
    d.json(&["pool", "set", "counter", "--shells", "2"]);
    wait_until("2 shells", Duration::from_secs(20), || pool_shells(&d) == 2);
    let a = d.json(&["sandbox", "acquire", "counter", "--id", "keep-a"]);
    let b = d.json(&["sandbox", "acquire", "counter", "--id", "keep-b"]);
    let c = d.json(&["sandbox", "acquire", "counter", "--id", "dies-while-down"]);
    let pid = |v: &Value| v["pid"].as_u64().unwrap() as u32;

    // SIGTERM: pooled VMs end, leased ones keep running and are recorded.
    d.stop();
    assert!(alive(pid(&a)) && alive(pid(&b)) && alive(pid(&c)));
    let run = vm_needle(&dirs);
    assert_eq!(live_processes_mentioning(&run).len(), 3);
    // One dies while no daemon runs: the next one cleans it up instead of adopting it.
    // SAFETY: kill(2) on a VMM this test's daemon started.
    unsafe { libc::kill(pid(&c) as i32, libc::SIGKILL) };
    wait_until("the VMM gone", Duration::from_secs(5), || !alive(pid(&c)));
    let c_sock = PathBuf::from(c["control"].as_str().unwrap());
    assert!(c_sock.exists(), "a killed VMM leaves its socket file");
    let mut d = Daemon::start(&dirs);
    let ls = d.json(&["sandbox", "ls"]);
    assert_eq!(ls.as_array().unwrap().len(), 2, "{ls}");
    wait_until("its files removed", Duration::from_secs(2), || {
        !c_sock.exists()
    });
    // Still controllable through their control sockets.
    for s in [&a, &b] {
        let mut c = pool_manager::vmm_api::ControlClient::connect(
            Path::new(s["control"].as_str().unwrap()),
            Duration::from_secs(2),
        )
        .unwrap();
        assert_eq!(c.status().unwrap().generation, Some(1));
    }
    // kill -9 of a leased VMM: dead within a second (monitor period 100 ms).
    // SAFETY: kill(2) on a VMM this test's daemon started.
    unsafe { libc::kill(pid(&a) as i32, libc::SIGKILL) };
    wait_until("dead", Duration::from_secs(1), || {
        d.json(&["sandbox", "ls"])
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s["id"] == "keep-a" && s["state"] == "dead")
    });
    let (ok, _, _) = d.cli(&["sandbox", "release", "keep-a"]);
    assert!(ok);
    let (ok, _, _) = d.cli(&["sandbox", "release", "keep-b"]);
    assert!(ok);
    wait_until("adopted VMM ended", Duration::from_secs(5), || {
        !alive(pid(&b))
    });

    // kill -9 of a pooled VMM: replaced.
    wait_until("2 shells", Duration::from_secs(20), || pool_shells(&d) == 2);
    let pooled = live_processes_mentioning(&run);
    assert_eq!(pooled.len(), 2);
    // SAFETY: as above.
    unsafe { libc::kill(pooled[0] as i32, libc::SIGKILL) };
    wait_until("replacement", Duration::from_secs(20), || {
        let now = live_processes_mentioning(&run);
        now.len() == 2 && !now.contains(&pooled[0])
    });
    // The monitor counts the death when it notices it; the refill may replace the VM first.
    wait_until("the second death counted", Duration::from_secs(2), || {
        metrics(&d)["runv_vm_deaths_total"] == 2.0
    });

    // TTL.
    let t = d.json(&["sandbox", "acquire", "counter", "--ttl", "1"]);
    wait_until("TTL release", Duration::from_secs(3), || {
        d.json(&["sandbox", "ls"]).as_array().unwrap().is_empty()
    });
    wait_until("TTL VMM ended", Duration::from_secs(3), || !alive(pid(&t)));

    // kill -9 of the daemon: the next one re-adopts the leased sandbox (recorded within
    // 100 ms of its acquire) and ends the pooled VMMs left behind.
    let leased = d.json(&["sandbox", "acquire", "counter", "--id", "survivor"]);
    wait_until("2 shells", Duration::from_secs(20), || pool_shells(&d) == 2);
    let pooled: Vec<u32> = live_processes_mentioning(&run)
        .into_iter()
        .filter(|p| *p != pid(&leased))
        .collect();
    assert_eq!(pooled.len(), 2);
    wait_until("recorded", Duration::from_secs(2), || {
        std::fs::read_to_string(dirs.state().join("sandboxes.json"))
            .is_ok_and(|t| t.contains("survivor"))
    });
    let mut c = d.child.take().unwrap();
    c.kill().unwrap();
    c.wait().unwrap();
    let mut d = Daemon::start(&dirs);
    wait_until("orphans ended", Duration::from_secs(5), || {
        pooled.iter().all(|p| !alive(*p))
    });
    assert!(alive(pid(&leased)));
    let ls = d.json(&["sandbox", "ls"]);
    assert_eq!(ls[0]["id"], "survivor", "{ls}");
    let (ok, _, err) = d.cli(&["sandbox", "release", "survivor"]);
    assert!(ok, "{err}");
    wait_until("a fresh pool", Duration::from_secs(20), || {
        pool_shells(&d) == 2 && live_processes_mentioning(&run).len() == 2
    });
    d.stop();
    assert!(live_processes_mentioning(&run).is_empty());
    assert!(dirs.run_files().is_empty(), "left: {:?}", dirs.run_files());
}

#[test]
fn daemon_refuses_bad_input_with_json_errors() {
    if !kvm_available("daemon_refuses_bad_input_with_json_errors") {
        return;
    }
    let dirs = Dirs::new();
    let _reaper = Reaper(&dirs);
    let mut d = Daemon::start(&dirs);
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&d.sock).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600);
    build_counter(&d, "counter");
    // A second daemon on the same directories is refused and touches nothing.
    let second = Command::new(BIN)
        .arg("serve")
        .arg("--state-dir")
        .arg(dirs.state())
        .arg("--run-dir")
        .arg(dirs.run())
        .arg("--tmpfs-dir")
        .arg(&dirs.shm)
        .arg("--vmm")
        .arg(vmm_bin())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&second.stderr);
    assert!(
        !second.status.success() && err.contains("another runv-pool daemon"),
        "{err}"
    );
    let s = d.sock.clone();
    let check = |method: &str, path: &str, body: &[u8], status: u16, needle: &str| {
        let (got, text) = http(&s, method, path, body);
        assert_eq!(got, status, "{method} {path}: {text}");
        let v: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
        let e = v["error"]
            .as_str()
            .unwrap_or_else(|| panic!("no error field: {text}"));
        assert!(e.contains(needle), "{method} {path}: {e}");
    };
    check(
        "POST",
        "/v1/sandboxes",
        br#"{"template":"nope"}"#,
        404,
        "no template",
    );
    check("GET", "/v1/templates/nope", b"", 404, "no template");
    check("GET", "/v1/sandboxes/nope", b"", 404, "no sandbox");
    check("DELETE", "/v1/sandboxes/nope", b"", 404, "no sandbox");
    check("GET", "/v1/nothing", b"", 404, "no such endpoint");
    check("PATCH", "/v1/sandboxes", b"", 405, "not served");
    check(
        "DELETE",
        "/v1/templates/counter?force=maybe",
        b"",
        400,
        "force=true",
    );
    check("GET", "/v1/templates/%FF", b"", 400, "path");
    check(
        "POST",
        "/v1/sandboxes",
        br#"{"template":"Bad/Name"}"#,
        400,
        "invalid template",
    );
    check(
        "POST",
        "/v1/sandboxes",
        br#"{"template":"counter","id":"../x"}"#,
        400,
        "invalid sandbox id",
    );
    check(
        "POST",
        "/v1/sandboxes",
        br#"{"template":"counter","ttl_s":0}"#,
        400,
        "ttl_s",
    );
    check("POST", "/v1/sandboxes", b"{not json", 400, "invalid JSON");
    check(
        "POST",
        "/v1/sandboxes",
        br#"{"template":"counter","x":1}"#,
        400,
        "unknown field",
    );
    check(
        "POST",
        "/v1/sandboxes",
        &vec![b' '; 100 * 1024],
        413,
        "over 65536 bytes",
    );
    check(
        "POST",
        "/v1/templates",
        br#"{"name":"UPPER","kernel":"/bin/true"}"#,
        400,
        "invalid template",
    );
    check(
        "POST",
        "/v1/templates",
        br#"{"name":"k","kernel":"/no/such/kernel"}"#,
        400,
        "/no/such/kernel",
    );
    check(
        "POST",
        "/v1/templates",
        br#"{"name":"counter","kernel":"/bin/true"}"#,
        409,
        "already exists",
    );
    check(
        "PUT",
        "/v1/pools/counter",
        br#"{"warm":0,"shells":9,"max_sandboxes":4}"#,
        400,
        "max_sandboxes",
    );
    check(
        "PUT",
        "/v1/pools/nope",
        br#"{"shells":1}"#,
        404,
        "no template",
    );
    let many: BTreeMap<String, String> = (0..33).map(|i| (format!("k{i}"), "v".into())).collect();
    let body = serde_json::json!({"template": "counter", "labels": many}).to_string();
    check("POST", "/v1/sandboxes", body.as_bytes(), 400, "labels");
    // Labels and TTL travel through to the sandbox object.
    let (got, text) = http(
        &s,
        "POST",
        "/v1/sandboxes",
        br#"{"template":"counter","id":"labelled","ttl_s":600,"labels":{"fn":"hello"}}"#,
    );
    assert_eq!(got, 201, "{text}");
    let v: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(
        (v["labels"]["fn"].as_str(), v["id"].as_str()),
        (Some("hello"), Some("labelled"))
    );
    assert!(v["expires_at"].as_u64().is_some(), "{v}");
    assert_eq!(http(&s, "DELETE", "/v1/sandboxes/labelled", b"").0, 204);
    // A template with a live sandbox is kept unless forced.
    let sb = d.json(&["sandbox", "acquire", "counter", "--id", "busy"]);
    check(
        "DELETE",
        "/v1/templates/counter",
        b"",
        409,
        "live sandboxes",
    );
    let (ok, _, err) = d.cli(&["template", "rm", "counter"]);
    assert!(
        !ok && err.lines().count() == 1 && err.contains("live sandboxes"),
        "{err}"
    );
    let (got, _) = http(&s, "DELETE", "/v1/templates/counter?force=true", b"");
    assert_eq!(got, 204);
    wait_until("forced release", Duration::from_secs(5), || {
        !alive(sb["pid"].as_u64().unwrap() as u32)
    });
    assert!(!dirs.shm.join("counter").exists());
    assert_eq!(http(&s, "GET", "/healthz", b"").0, 200);
    d.stop();
    // The CLI without a daemon: one line that says how to start it.
    let (ok, _, err) = d.cli(&["pool", "ls"]);
    assert!(!ok && err.contains("runv-pool serve"), "{err}");
    assert!(dirs.run_files().is_empty(), "left: {:?}", dirs.run_files());
}

#[test]
fn a_listener_that_outlived_its_daemon_is_taken_over() {
    let dirs = Dirs::new();
    std::fs::create_dir_all(dirs.run()).unwrap();
    let sock = dirs.run().join("pool.sock");
    // A process listens on pool.sock, forks a child that inherits the listener, and exits:
    // connections are still accepted into the backlog, but nobody serves them (what a killed
    // daemon's child between fork and exec leaves for a moment).
    let script = "import os, socket, sys, time\n\
        s = socket.socket(socket.AF_UNIX)\n\
        s.bind(sys.argv[1])\n\
        s.listen(16)\n\
        if os.fork() == 0:\n    print(os.getpid(), flush=True)\n    time.sleep(60)\n";
    let mut parent = Command::new("python3")
        .args(["-c", script])
        .arg(&sock)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(parent.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    /// SIGKILLs the listener's holder however the test ends.
    struct Holder(i32);
    impl Drop for Holder {
        fn drop(&mut self) {
            // SAFETY: kill(2) on the python child this test started.
            unsafe { libc::kill(self.0, libc::SIGKILL) };
        }
    }
    let _holder = Holder(line.trim().parse().unwrap());
    assert!(parent.wait().unwrap().success());
    assert!(std::os::unix::net::UnixStream::connect(&sock).is_ok());

    let stale = std::fs::metadata(&sock).unwrap().ino();
    let d = Daemon::start(&dirs);
    wait_until("the daemon's own socket", Duration::from_secs(20), || {
        std::fs::metadata(&sock).is_ok_and(|m| m.ino() != stale)
    });
    let (code, body) = http(&d.sock, "GET", "/healthz", b"");
    assert_eq!(code, 200, "{body}");
}
