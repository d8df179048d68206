//! Bad bundles and ids: a clear error, exit status 1, and nothing left under `--root`.

mod common;

use common::Env;

fn create_fails(env: &Env, bundle: &std::path::Path, id: &str, want: &str) {
    let o = env.runv(&["create", "--bundle", bundle.to_str().unwrap(), id]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{id}: {err}");
    assert!(err.contains(want), "{id}: want {want:?} in {err}");
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn bad_bundles_leave_nothing() {
    let Some(env) = Env::new("bad_bundles_leave_nothing") else {
        return;
    };
    let id = env.id("bad");
    let good = env.bundle("good", &["true"], false);
    let config = std::fs::read_to_string(good.join("config.json")).unwrap();
    let variant = |name: &str, text: Option<&str>| {
        let b = env.dir.path().join(name);
        std::fs::create_dir_all(&b).unwrap();
        if let Some(t) = text {
            std::fs::write(b.join("config.json"), t).unwrap();
        }
        b
    };
    let missing = variant("missing", None);
    create_fails(&env, &missing, &id, "cannot read config.json");
    create_fails(&env, &env.dir.path().join("nowhere"), &id, "nowhere");
    let invalid = variant("invalid", Some("{\"ociVersion\": \"1.2.0\", "));
    create_fails(&env, &invalid, &id, "not a valid OCI runtime spec");
    let wrong_type = variant(
        "wrongtype",
        Some(&config.replace("\"args\":[\"true\"]", "\"args\":7")),
    );
    create_fails(&env, &wrong_type, &id, "not a valid OCI runtime spec");
    for v in ["2.0.0", "1.3.0", "0.9.9", ""] {
        let b = variant(
            &format!("v{v}"),
            Some(&config.replace("\"1.2.0\"", &format!("{v:?}"))),
        );
        create_fails(&env, &b, &id, "unsupported ociVersion");
    }
    let old = variant("v100", Some(&config.replace("\"1.2.0\"", "\"1.0.0\"")));
    let rootfs = env.rootfs.to_str().unwrap();
    let no_rootfs = variant(
        "norootfs",
        Some(&config.replace(rootfs, "/nonexistent/rootfs")),
    );
    create_fails(
        &env,
        &no_rootfs,
        &id,
        "/nonexistent/rootfs is not a directory",
    );
    let no_process = variant(
        "noproc",
        Some(&config.replace("\"args\":[\"true\"]", "\"args\":[]")),
    );
    create_fails(&env, &no_process, &id, "has no process");
    let tty = variant(
        "tty",
        Some(&config.replace("\"terminal\":false", "\"terminal\":true")),
    );
    create_fails(&env, &tty, &id, "--console-socket");
    for bad in [
        "../escape",
        "a/b",
        ".hidden",
        "_x",
        "",
        "sp ace",
        &"x".repeat(129),
    ] {
        create_fails(&env, &good, bad, "invalid container id");
    }
    let o = env.runv(&[
        "create",
        "--preserve-fds",
        "2",
        "--bundle",
        good.to_str().unwrap(),
        &id,
    ]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("--preserve-fds 2 is not supported"));
    assert!(env.left().is_empty(), "left under --root: {:?}", env.left());
    assert!(!env.root.path().parent().unwrap().join("escape").exists());

    // The vm backend without a template points at --sandbox host.
    let c = common::run_bounded(
        std::process::Command::new(env!("CARGO_BIN_EXE_runv"))
            .args([
                "--root",
                env.root.path().to_str().unwrap(),
                "--sandbox",
                "vm",
            ])
            .args(["create", "--bundle", good.to_str().unwrap(), &id])
            .stdin(std::process::Stdio::null()),
    );
    let err = String::from_utf8_lossy(&c.stderr).into_owned();
    assert_eq!(c.status.code(), Some(1));
    assert!(
        err.contains("runv-pool") && err.contains("--sandbox host"),
        "{err}"
    );
    assert!(env.left().is_empty(), "{:?}", env.left());

    // A taken id: the existing container is untouched. ociVersion 1.0.0 is accepted.
    let (st, _, err) =
        env.runv_to_files(&["create", "--bundle", old.to_str().unwrap(), &id], "first");
    assert!(st.success(), "{}", std::fs::read_to_string(err).unwrap());
    create_fails(&env, &good, &id, "already exists");
    assert_eq!(env.state(&id)["status"], "created");
    assert!(env.runv(&["delete", &id]).status.success());
    assert!(env.left().is_empty(), "{:?}", env.left());
}

#[test]
fn damaged_state_is_reported_and_force_deleted() {
    let Some(env) = Env::new("damaged_state_is_reported_and_force_deleted") else {
        return;
    };
    let id = env.id("damaged");
    let dir = env.root.path().join(&id);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("state.json"), "{not json").unwrap();
    for cmd in ["state", "start", "delete"] {
        let o = env.runv(&[cmd, &id]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{cmd}: {err}");
        assert!(
            err.contains("damaged state file") && err.contains("--force"),
            "{cmd}: {err}"
        );
    }
    let o = env.runv(&["delete", "--force", &id]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(env.left().is_empty(), "{:?}", env.left());
}

#[test]
fn an_agent_that_dies_at_start_is_a_clear_error_and_leaves_nothing() {
    let Some(env) = Env::new("an_agent_that_dies_at_start_is_a_clear_error_and_leaves_nothing")
    else {
        return;
    };
    let id = env.id("dead");
    let b = env.bundle("dead", &["true"], false);
    // An "agent" that exits at once: the socket runv bound for it refuses the first request.
    let mut c = env.cmd(&["create", "--bundle", b.to_str().unwrap(), &id]);
    c.env("RUNV_AGENT", "/bin/false");
    let o = common::run_bounded(&mut c);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("the container's agent does not answer") && err.contains("agent.log"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
    assert!(env.left().is_empty(), "left under --root: {:?}", env.left());
}
