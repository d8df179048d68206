//! Isolation with real containers run by a real `runv-agent`: image symlinks never make the
//! agent write outside the rootfs, and maskedPaths, readonlyPaths, device rules and seccomp
//! profiles are enforced (or refused), never ignored.

mod common;

use std::path::{Path, PathBuf};

use common::*;
use protocol::{Request, Response, RootfsSource, StdioConfig};

/// A busybox rootfs of this test's own (the shared one must stay unmodified).
fn private_rootfs(dir: &Path) -> PathBuf {
    let root = dir.join("rootfs");
    for d in ["bin", "proc", "dev", "sys", "tmp", "etc", "data2"] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    std::fs::copy("/bin/busybox", root.join("bin/busybox")).unwrap();
    for a in [
        "sh", "cat", "grep", "wc", "mkdir", "mknod", "echo", "ls", "true", "cut",
    ] {
        std::os::unix::fs::symlink("busybox", root.join("bin").join(a)).unwrap();
    }
    root
}

fn create(
    c: &mut protocol::client::Client,
    id: &str,
    spec: oci_spec::runtime::Spec,
    rootfs: RootfsSource,
) -> Response {
    c.call(&Request::Create {
        id: id.into(),
        spec: Box::new(spec),
        rootfs,
        stdio: StdioConfig::default(),
    })
    .unwrap()
}

fn tmpfs_at(dest: &str) -> oci_spec::runtime::Mount {
    oci_spec::runtime::MountBuilder::default()
        .destination(dest)
        .typ("tmpfs")
        .source("tmpfs")
        .build()
        .unwrap()
}

fn with_mounts(
    mut sp: oci_spec::runtime::Spec,
    extra: Vec<oci_spec::runtime::Mount>,
) -> oci_spec::runtime::Spec {
    let mut mounts = sp.mounts().clone().unwrap_or_default();
    mounts.extend(extra);
    sp.set_mounts(Some(mounts));
    sp
}

/// Mount destinations through `hostetc -> /etc`, `relup -> ../../../../../../../../etc` and
/// `linkdir -> data2` land inside the rootfs, resolved as if the rootfs were `/`; nothing is
/// created on the host.
#[test]
fn image_symlinks_resolve_inside_the_rootfs() {
    let Some((_shared, _agent, mut c)) = setup("image_symlinks_resolve_inside_the_rootfs") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let root = private_rootfs(dir.path());
    std::os::unix::fs::symlink("/etc", root.join("hostetc")).unwrap();
    std::os::unix::fs::symlink("../../../../../../../../etc", root.join("relup")).unwrap();
    std::os::unix::fs::symlink("data2", root.join("linkdir")).unwrap();
    let marker = format!("runv-symlink-test-{}", std::process::id());
    let host_file = dir.path().join("bound");
    std::fs::write(&host_file, "bound-file\n").unwrap();
    let sp = with_mounts(
        spec(&[
            "sh",
            "-c",
            "cut -d' ' -f5 /proc/self/mountinfo | grep -E 'runv-symlink|/data2/m3'; cat /etc/*-file",
        ]),
        vec![
            tmpfs_at(&format!("/hostetc/{marker}-abs")),
            tmpfs_at(&format!("/relup/{marker}-rel")),
            tmpfs_at("/linkdir/m3"),
            oci_spec::runtime::MountBuilder::default()
                .destination(format!("/relup/{marker}-file"))
                .typ("bind")
                .source(&host_file)
                .options(vec!["bind".to_string(), "ro".to_string()])
                .build()
                .unwrap(),
        ],
    );
    let (out, err, st) = run(&mut c, "links", sp, &root);
    assert_eq!(st.code, 0, "{out} {err}");
    let mut lines: Vec<&str> = out.lines().collect();
    lines.sort();
    assert_eq!(
        lines,
        [
            "/data2/m3".to_string(),
            format!("/etc/{marker}-abs"),
            format!("/etc/{marker}-file"),
            format!("/etc/{marker}-rel"),
            "bound-file".to_string(),
        ],
        "stderr: {err}"
    );
    for suffix in ["abs", "rel", "file"] {
        let name = format!("{marker}-{suffix}");
        assert!(
            !Path::new("/etc").join(&name).exists(),
            "/etc/{name} was created on the host"
        );
        assert!(
            root.join("etc").join(&name).exists(),
            "{name} in the rootfs"
        );
    }
    assert!(root.join("data2/m3").is_dir());
}

/// A rootfs whose `etc` is itself `-> /etc` (or `-> ../../../../../etc`) loops when resolved
/// inside the rootfs: the create is refused and nothing appears on the host.
#[test]
fn self_referencing_etc_links_are_refused_without_touching_the_host() {
    let Some((_shared, _agent, mut c)) =
        setup("self_referencing_etc_links_are_refused_without_touching_the_host")
    else {
        return;
    };
    for (i, target) in ["/etc", "../../../../../etc"].iter().enumerate() {
        let dir = tempfile::tempdir().unwrap();
        let root = private_rootfs(dir.path());
        std::fs::remove_dir(root.join("etc")).unwrap();
        std::os::unix::fs::symlink(target, root.join("etc")).unwrap();
        let marker = format!("runv-selfloop-test-{}-{i}", std::process::id());
        let sp = with_mounts(spec(&["true"]), vec![tmpfs_at(&format!("/etc/{marker}"))]);
        let r = create(
            &mut c,
            &format!("loop{i}"),
            sp,
            RootfsSource::Bind {
                path: root.display().to_string(),
            },
        );
        assert!(
            matches!(&r, Response::Error(e) if e.message.contains("mount point") && e.message.contains("symbolic links")),
            "etc -> {target}: {r:?}"
        );
        assert!(
            !Path::new("/etc").join(&marker).exists(),
            "host /etc/{marker}"
        );
    }
}

#[test]
fn symlinked_rootfs_and_overlay_lower_are_refused() {
    let Some((shared, _agent, mut c)) = setup("symlinked_rootfs_and_overlay_lower_are_refused")
    else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    for (i, target) in [Path::new("/"), shared.as_path()].iter().enumerate() {
        let link = dir.path().join(format!("link{i}"));
        std::os::unix::fs::symlink(target, &link).unwrap();
        let path = link.display().to_string();
        for (kind, src) in [
            ("bind", RootfsSource::Bind { path: path.clone() }),
            (
                "overlay",
                RootfsSource::Overlay {
                    lower: path.clone(),
                },
            ),
        ] {
            let r = create(&mut c, &format!("sym{i}{kind}"), spec(&["true"]), src);
            assert!(
                matches!(&r, Response::Error(e) if e.code == protocol::ErrorCode::BadRequest && e.message.contains("symbolic link")),
                "{kind} {path} -> {}: {r:?}",
                target.display()
            );
        }
    }
}

/// `runc spec`'s default config, or None (with a SKIPPED line) without runc.
fn runc_default_spec(test: &str, args: &[&str]) -> Option<oci_spec::runtime::Spec> {
    let dir = tempfile::tempdir().unwrap();
    let ok = std::process::Command::new("runc")
        .arg("spec")
        .current_dir(dir.path())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        println!("SKIPPED: {test}: runc is not installed (apt-get install runc)");
        return None;
    }
    let mut sp: oci_spec::runtime::Spec =
        serde_json::from_slice(&std::fs::read(dir.path().join("config.json")).unwrap()).unwrap();
    let mut p = sp.process().clone().unwrap();
    p.set_args(Some(args.iter().map(|a| a.to_string()).collect()));
    p.set_terminal(Some(false));
    sp.set_process(Some(p));
    Some(sp)
}

/// With runc's default masked and read-only paths, `/proc/keys` and `/proc/timer_list` read
/// empty (masked by /dev/null binds) and `/proc/sys` cannot be opened for writing.
#[test]
fn runc_default_masked_and_readonly_paths_are_enforced() {
    let test = "runc_default_masked_and_readonly_paths_are_enforced";
    let Some((root, _agent, mut c)) = setup(test) else {
        return;
    };
    let Some(sp) = runc_default_spec(
        test,
        &[
            "sh",
            "-c",
            "cat /proc/keys | wc -c; cat /proc/timer_list | wc -c; \
             grep -cE ' /proc/(keys|timer_list) ' /proc/self/mountinfo; \
             echo x > /proc/sys/kernel/hostname && echo wrote; \
             cat /proc/sys/kernel/ostype",
        ],
    ) else {
        return;
    };
    let (out, err, st) = run(&mut c, "masked", sp, &root);
    assert_eq!(st.code, 0, "{out} {err}");
    assert_eq!(
        out.lines().collect::<Vec<_>>(),
        ["0", "0", "2", "Linux"],
        "stderr: {err}"
    );
    assert!(err.contains("Read-only file system"), "{err}");
    assert!(
        std::fs::read_to_string("/proc/timer_list").is_ok_and(|s| !s.is_empty()),
        "the host's timer_list has content, so the empty read above is the mask"
    );
}

/// runc's default device rules (deny all, then the standard devices): a character device the
/// rules deny cannot be opened even by root with CAP_MKNOD, while /dev/null works; without
/// device rules the same device opens.
#[test]
fn device_rules_deny_unlisted_devices() {
    let test = "device_rules_deny_unlisted_devices";
    let Some((root, _agent, mut c)) = setup(test) else {
        return;
    };
    if !Path::new("/sys/fs/cgroup/devices").is_dir() {
        println!("SKIPPED: {test}: no cgroup v1 devices controller on this host");
        return;
    }
    let script = "mknod /dev/kmsg2 c 1 11 || exit 9; \
                  (: > /dev/kmsg2) 2>&1 && echo kmsg-opened; \
                  : > /dev/null && echo null-ok";
    let Some(mut sp) = runc_default_spec(test, &["sh", "-c", script]) else {
        return;
    };
    let mut p = sp.process().clone().unwrap();
    let mut caps = p.capabilities().clone().unwrap();
    let add = |set: &Option<oci_spec::runtime::Capabilities>| {
        let mut s = set.clone().unwrap_or_default();
        s.insert(oci_spec::runtime::Capability::Mknod);
        Some(s)
    };
    caps.set_bounding(add(caps.bounding()));
    caps.set_effective(add(caps.effective()));
    caps.set_permitted(add(caps.permitted()));
    p.set_capabilities(Some(caps));
    sp.set_process(Some(p));
    let (out, err, st) = run(&mut c, "devdeny", sp.clone(), &root);
    assert_eq!(st.code, 0, "{out} {err}");
    assert!(out.contains("Operation not permitted"), "{out} {err}");
    assert!(!out.contains("kmsg-opened"), "{out}");
    assert!(out.contains("null-ok"), "{out}");
    // The control: no device rules, same device.
    let mut linux = sp.linux().clone().unwrap();
    linux.set_resources(None);
    sp.set_linux(Some(linux));
    let (out, err, st) = run(&mut c, "devallow", sp, &root);
    assert_eq!(st.code, 0, "{out} {err}");
    assert!(out.contains("kmsg-opened"), "{out} {err}");
}

fn with_seccomp(
    mut sp: oci_spec::runtime::Spec,
    profile: serde_json::Value,
) -> oci_spec::runtime::Spec {
    let mut linux = sp.linux().clone().unwrap_or_default();
    linux.set_seccomp(Some(serde_json::from_value(profile).unwrap()));
    sp.set_linux(Some(linux));
    sp
}

/// A profile makes mkdir fail with its errnoRet (EACCES) and `kill -USR1` (an argument
/// condition) fail with EPERM, while everything else runs; with and without no_new_privs, and
/// in a process exec'd into the container.
#[test]
fn seccomp_profile_is_enforced() {
    let Some((root, _agent, mut c)) = setup("seccomp_profile_is_enforced") else {
        return;
    };
    let profile = serde_json::json!({
        "defaultAction": "SCMP_ACT_ALLOW",
        "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"],
        "syscalls": [
            {"names": ["mkdir", "mkdirat", "not_a_syscall"], "action": "SCMP_ACT_ERRNO", "errnoRet": 13},
            {"names": ["kill"], "action": "SCMP_ACT_ERRNO",
             "args": [{"index": 1, "value": 10, "op": "SCMP_CMP_EQ"}]}
        ]
    });
    let script = "mkdir /tmp/seccomp-dir 2>&1; kill -0 $$ && echo kill0-ok; \
                  kill -USR1 $$ 2>&1; echo done";
    for nnp in [true, false] {
        let mut sp = with_seccomp(spec(&["sh", "-c", script]), profile.clone());
        let mut p = sp.process().clone().unwrap();
        p.set_no_new_privileges(Some(nnp));
        sp.set_process(Some(p));
        let (out, err, st) = run(&mut c, &format!("sc{nnp}"), sp, &root);
        assert_eq!(st.code, 0, "nnp {nnp}: {out} {err}");
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 4, "nnp {nnp}: {out}");
        assert!(lines[0].contains("Permission denied"), "nnp {nnp}: {out}");
        assert_eq!(lines[1], "kill0-ok", "nnp {nnp}: {out}");
        assert!(lines[2].contains("not permitted"), "nnp {nnp}: {out}");
        assert_eq!(lines[3], "done");
        assert!(!root.join("tmp/seccomp-dir").exists());
    }
    // A process exec'd into the running container gets the container's profile too.
    let sp = with_seccomp(spec(&["sleep", "100"]), profile.clone());
    launch(&mut c, "scexec", sp, &root, StdioConfig::default());
    let mut p = spec(&[]).process().clone().unwrap();
    p.set_args(Some(vec![
        "sh".into(),
        "-c".into(),
        "mkdir /tmp/exec-dir 2>&1; echo after".into(),
    ]));
    let r = c
        .call(&Request::Exec {
            id: "scexec".into(),
            exec_id: "e1".into(),
            process: Box::new(p),
            stdio: StdioConfig::default(),
        })
        .unwrap();
    let Response::ExecStarted { streams, .. } = r else {
        panic!("{r:?}")
    };
    let r = c
        .call(&Request::Wait {
            id: "scexec".into(),
            exec_id: Some("e1".into()),
        })
        .unwrap();
    assert!(matches!(r, Response::Exited { .. }), "{r:?}");
    let out = c
        .read_to_close(streams.stdout, std::time::Duration::from_secs(10))
        .unwrap();
    let out = String::from_utf8_lossy(&out);
    assert!(
        out.contains("Permission denied") && out.contains("after"),
        "{out}"
    );
    assert!(!root.join("tmp/exec-dir").exists());
    c.call(&Request::Destroy {
        id: "scexec".into(),
    })
    .unwrap();
    // Without the profile the same script creates the directory.
    let (out, _, _) = run(
        &mut c,
        "nosc",
        spec(&["sh", "-c", "mkdir /tmp/sc-ok && echo made"]),
        &root,
    );
    assert_eq!(out, "made\n");
    std::fs::remove_dir(root.join("tmp/sc-ok")).unwrap();
}

/// A default-deny profile (SCMP_ACT_ERRNO with its default errno EPERM) that allows every
/// syscall of this architecture but mkdir/mkdirat: the shell runs, mkdir fails with EPERM.
#[test]
fn default_deny_seccomp_profile_is_enforced() {
    let Some((root, _agent, mut c)) = setup("default_deny_seccomp_profile_is_enforced") else {
        return;
    };
    let allowed: Vec<&str> = syscalls::Sysno::iter()
        .map(|s| s.name())
        .filter(|n| *n != "mkdir" && *n != "mkdirat")
        .collect();
    let profile = serde_json::json!({
        "defaultAction": "SCMP_ACT_ERRNO",
        "syscalls": [{"names": allowed, "action": "SCMP_ACT_ALLOW"}]
    });
    let sp = with_seccomp(
        spec(&["sh", "-c", "mkdir /tmp/deny-dir 2>&1; echo still-running"]),
        profile,
    );
    let (out, err, st) = run(&mut c, "scdeny", sp, &root);
    assert_eq!(st.code, 0, "{out} {err}");
    assert!(out.contains("Operation not permitted"), "{out}");
    assert!(out.ends_with("still-running\n"), "{out}");
    assert!(!root.join("tmp/deny-dir").exists());
}

#[test]
fn unsupported_seccomp_features_are_refused() {
    let Some((root, _agent, mut c)) = setup("unsupported_seccomp_features_are_refused") else {
        return;
    };
    for (i, (profile, what)) in [
        (
            serde_json::json!({"defaultAction": "SCMP_ACT_ALLOW", "listenerPath": "/run/seccomp.sock"}),
            "listenerPath",
        ),
        (
            serde_json::json!({"defaultAction": "SCMP_ACT_ALLOW",
                "syscalls": [{"names": ["mkdir"], "action": "SCMP_ACT_NOTIFY"}]}),
            "SCMP_ACT_NOTIFY",
        ),
    ]
    .into_iter()
    .enumerate()
    {
        let r = create(
            &mut c,
            &format!("unsup{i}"),
            with_seccomp(spec(&["true"]), profile),
            RootfsSource::Bind {
                path: root.display().to_string(),
            },
        );
        assert!(
            matches!(&r, Response::Error(e) if e.code == protocol::ErrorCode::BadRequest && e.message.contains(what)),
            "{r:?}"
        );
    }
}

/// Masking binds the container's /dev/null: without one the create fails rather than leaving
/// the masked paths readable.
#[test]
fn masking_without_dev_null_is_an_error() {
    let Some((_shared, _agent, mut c)) = setup("masking_without_dev_null_is_an_error") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let root = private_rootfs(dir.path());
    let mut sp = spec(&["true"]);
    let mounts = sp.mounts().clone().unwrap_or_default();
    sp.set_mounts(Some(
        mounts
            .into_iter()
            .filter(|m| !m.destination().starts_with("/dev"))
            .collect(),
    ));
    let r = create(
        &mut c,
        "nonull",
        sp,
        RootfsSource::Bind {
            path: root.display().to_string(),
        },
    );
    assert!(
        matches!(&r, Response::Error(e) if e.message.contains("mask a path")),
        "{r:?}"
    );
}
