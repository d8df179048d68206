//! Spec fields beyond mounts and the process, with real containers run by a real `runv-agent`:
//! `linux.sysctl`, `linux.devices`, `linux.rootfsPropagation`, mqueue and cgroup mounts, the
//! cgroup namespace, `domainname` and `process.user.umask` are applied; every field the agent
//! does not implement is refused with an error naming it, leaving nothing behind.

mod common;

use std::path::Path;

use common::*;
use protocol::client::Client;
use protocol::{ErrorCode, Request, Response, RootfsSource, StdioConfig};

fn linux_json(
    sp: oci_spec::runtime::Spec,
    f: impl FnOnce(&mut serde_json::Value),
) -> oci_spec::runtime::Spec {
    let mut v = serde_json::to_value(sp).unwrap();
    f(&mut v);
    serde_json::from_value(v).unwrap()
}

/// Namespaced sysctls are written in the container (before /proc/sys is made read-only by the
/// default readonlyPaths) and the guest's own values stay as they were.
#[test]
fn namespaced_sysctls_are_applied_inside_the_container() {
    let Some((root, _agent, mut c)) = setup("namespaced_sysctls_are_applied_inside_the_container")
    else {
        return;
    };
    let host_shmmax = std::fs::read_to_string("/proc/sys/kernel/shmmax").unwrap();
    let host_fwd = std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward").unwrap();
    let want_fwd = if host_fwd.trim() == "1" { "0" } else { "1" };
    let sp = linux_json(
        spec(&[
            "sh",
            "-c",
            "cat /proc/sys/kernel/shmmax /proc/sys/net/ipv4/ip_forward /proc/sys/fs/mqueue/msg_max",
        ]),
        |v| {
            v["linux"]["sysctl"] = serde_json::json!({
                "kernel.shmmax": "123456789",
                "net.ipv4.ip_forward": want_fwd,
                "fs.mqueue.msg_max": "17",
            })
        },
    );
    let (out, err, st) = run(&mut c, "sysctl", sp, &root);
    assert_eq!(st.code, 0, "{out} {err}");
    assert_eq!(
        out.lines().collect::<Vec<_>>(),
        ["123456789", want_fwd, "17"],
        "{err}"
    );
    assert_eq!(
        std::fs::read_to_string("/proc/sys/kernel/shmmax").unwrap(),
        host_shmmax
    );
    assert_eq!(
        std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward").unwrap(),
        host_fwd
    );
}

/// A sysctl is written only through the container's procfs: a file system mounted over
/// /proc/sys (here a host directory holding a look-alike `shmmax`) is not crossed, so the create
/// fails at the sysctl step instead of writing into it.
#[test]
fn sysctls_never_cross_a_mount_over_proc_sys() {
    let Some((root, _agent, mut c)) = setup("sysctls_never_cross_a_mount_over_proc_sys") else {
        return;
    };
    let decoy = tempfile::tempdir().unwrap();
    std::fs::write(decoy.path().join("shmmax"), "orig\n").unwrap();
    let sp = linux_json(spec(&["true"]), |v| {
        v["linux"]["sysctl"] = serde_json::json!({"kernel.shmmax": "4096"});
        v["mounts"].as_array_mut().unwrap().push(serde_json::json!({
            "destination": "/proc/sys/kernel", "type": "bind",
            "source": decoy.path(), "options": ["bind"]}));
    });
    let r = c
        .call(&Request::Create {
            id: "xdev".into(),
            spec: Box::new(sp),
            rootfs: RootfsSource::Bind {
                path: root.display().to_string(),
            },
            stdio: StdioConfig::default(),
        })
        .unwrap();
    assert!(
        matches!(&r, Response::Error(e) if e.code == ErrorCode::Spawn
            && e.message.contains("write a sysctl")
            && e.message.contains("cross-device")),
        "{r:?}"
    );
    assert_eq!(
        std::fs::read_to_string(decoy.path().join("shmmax")).unwrap(),
        "orig\n"
    );
    assert_eq!(
        c.call(&Request::List).unwrap(),
        Response::Containers { ids: vec![] }
    );
}

/// Asserts that creating `sp` is refused with BadRequest and a message containing each of
/// `what`, and that no container, cgroup or scratch directory is left behind (overlay root, so
/// a scratch directory would be made).
fn assert_refused(
    agent: &Agent,
    c: &mut Client,
    root: &Path,
    id: &str,
    sp: oci_spec::runtime::Spec,
    what: &[&str],
) {
    let r = c
        .call(&Request::Create {
            id: id.into(),
            spec: Box::new(sp),
            rootfs: RootfsSource::Overlay {
                lower: root.display().to_string(),
            },
            stdio: StdioConfig::default(),
        })
        .unwrap();
    let Response::Error(e) = &r else {
        panic!("{id}: created: {r:?}")
    };
    assert_eq!(e.code, ErrorCode::BadRequest, "{id}: {e:?}");
    for w in what {
        assert!(e.message.contains(w), "{id}: {:?} lacks {w:?}", e.message);
    }
    let r = c.call(&Request::List).unwrap();
    assert_eq!(r, Response::Containers { ids: vec![] }, "{id}");
    assert!(
        !agent.dir.path().join("state").join(id).exists(),
        "{id}: scratch directory left behind"
    );
    for g in group_dirs(&agent.group) {
        assert!(
            !g.join(id).exists(),
            "{id}: cgroup {} left behind",
            g.display()
        );
    }
}

/// Every unsupported field, and each invalid value of the fields the agent implements, is
/// refused naming the field; nothing is left behind.
#[test]
fn unsupported_and_invalid_fields_are_refused_naming_them() {
    let Some((root, agent, mut c)) =
        setup("unsupported_and_invalid_fields_are_refused_naming_them")
    else {
        return;
    };
    let cases: Vec<(&str, serde_json::Value, Vec<&str>)> = vec![
        (
            "hooks",
            serde_json::json!({"hooks": {"prestart": [{"path": "/bin/true"}]}}),
            vec!["hooks", "not supported by runv-agent", "remove it"],
        ),
        (
            "apparmor",
            serde_json::json!({"process": {"apparmorProfile": "docker-default"}}),
            vec!["process.apparmorProfile", "not supported"],
        ),
        (
            "selinux",
            serde_json::json!({"process": {"selinuxLabel": "system_u:system_r:svirt_lxc_net_t:s0"}}),
            vec!["process.selinuxLabel"],
        ),
        (
            "ioprio",
            serde_json::json!({"process": {"ioPriority": {"class": "IOPRIO_CLASS_IDLE", "priority": 0}}}),
            vec!["process.ioPriority"],
        ),
        (
            "sched",
            serde_json::json!({"process": {"scheduler": {"policy": "SCHED_BATCH"}}}),
            vec!["process.scheduler"],
        ),
        (
            "oom",
            serde_json::json!({"process": {"oomScoreAdj": 500}}),
            vec!["process.oomScoreAdj"],
        ),
        (
            "rdt",
            serde_json::json!({"linux": {"intelRdt": {"closID": "x"}}}),
            vec!["linux.intelRdt"],
        ),
        (
            "pers",
            serde_json::json!({"linux": {"personality": {"domain": "LINUX32"}}}),
            vec!["linux.personality"],
        ),
        (
            "timeoff",
            serde_json::json!({"linux": {"timeOffsets": {"monotonic": {"secs": 1, "nanosecs": 0}}}}),
            vec!["linux.timeOffsets"],
        ),
        (
            "label",
            serde_json::json!({"linux": {"mountLabel": "system_u:object_r:svirt_sandbox_file_t:s0"}}),
            vec!["linux.mountLabel"],
        ),
        (
            "cgpath",
            serde_json::json!({"linux": {"cgroupsPath": "/elsewhere"}}),
            vec!["linux.cgroupsPath"],
        ),
        (
            "uidmap",
            serde_json::json!({"linux": {"uidMappings": [{"containerID": 0, "hostID": 1000, "size": 1}]}}),
            vec!["linux.uidMappings"],
        ),
        (
            "userns",
            serde_json::json!({"linux": {"namespaces": [{"type": "pid"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"}, {"type": "user"}]}}),
            vec!["type user"],
        ),
        (
            "netpath",
            serde_json::json!({"linux": {"namespaces": [{"type": "pid"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"}, {"type": "network", "path": "/proc/1/ns/net"}]}}),
            vec!["type network with a path", "not supported by runv-agent"],
        ),
        (
            "blkio",
            serde_json::json!({"linux": {"resources": {"blockIO": {"weight": 100}}}}),
            vec!["linux.resources.blockIO"],
        ),
        (
            "shares",
            serde_json::json!({"linux": {"resources": {"cpu": {"shares": 512}}}}),
            vec!["linux.resources.cpu.shares"],
        ),
        (
            "prop",
            serde_json::json!({"linux": {"rootfsPropagation": "sharedish"}}),
            vec!["linux.rootfsPropagation", "sharedish"],
        ),
        (
            "sysctl",
            serde_json::json!({"linux": {"sysctl": {"kernel.pid_max": "4096"}}}),
            vec!["kernel.pid_max", "not namespaced"],
        ),
        (
            "sysctlnet",
            serde_json::json!({"linux": {"namespaces": [{"type": "pid"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"}], "sysctl": {"net.ipv4.ip_forward": "1"}}}),
            vec!["net.ipv4.ip_forward", "network namespace"],
        ),
        (
            "noipc",
            serde_json::json!({"linux": {"namespaces": [{"type": "pid"}, {"type": "uts"}, {"type": "mount"}]}}),
            vec!["no ipc namespace", "not supported by runv-agent"],
        ),
        (
            "bindopt",
            serde_json::json!({"mounts": [{"destination": "/data", "type": "bind", "source": "/tmp", "options": ["rbind", "rro"]}]}),
            vec!["bind mount at /data", "rro", "not supported by runv-agent"],
        ),
        (
            "sysctldot",
            serde_json::json!({"linux": {"sysctl": {"net.ipv4.conf.all/../../x": "1"}}}),
            vec!["linux.sysctl key"],
        ),
        (
            "devtype",
            serde_json::json!({"linux": {"devices": [{"path": "/dev/x", "type": "a"}]}}),
            vec!["linux.devices", "type \"a\""],
        ),
        (
            "devpath",
            serde_json::json!({"linux": {"devices": [{"path": "/dev/../../x", "type": "c", "major": 1, "minor": 3}]}}),
            vec!["escapes"],
        ),
        (
            "cgopts",
            serde_json::json!({"mounts": [{"destination": "/sys/fs/cgroup", "type": "cgroup", "options": ["rbind"]}]}),
            vec!["mount of type cgroup"],
        ),
    ];
    for (id, patch, what) in cases {
        let sp = linux_json(spec(&["true"]), |v| {
            for (k, val) in patch.as_object().unwrap() {
                if let (Some(dst), Some(src)) = (v[k].as_object_mut(), val.as_object()) {
                    for (kk, vv) in src {
                        dst.insert(kk.clone(), vv.clone());
                    }
                } else {
                    v[k] = val.clone();
                }
            }
        });
        assert_refused(&agent, &mut c, &root, id, sp, &what);
    }
    // An exec'd process is held to the same rules.
    launch(
        &mut c,
        "running",
        spec(&["sleep", "100"]),
        &root,
        StdioConfig::default(),
    );
    let mut p = spec(&["true"]).process().clone().unwrap();
    p.set_apparmor_profile(Some("docker-default".into()));
    let r = c
        .call(&Request::Exec {
            id: "running".into(),
            exec_id: "e1".into(),
            process: Box::new(p),
            stdio: StdioConfig::default(),
        })
        .unwrap();
    assert!(
        matches!(&r, Response::Error(e) if e.code == ErrorCode::BadRequest && e.message.contains("process.apparmorProfile")),
        "{r:?}"
    );
    assert_eq!(
        c.call(&Request::Destroy {
            id: "running".into()
        })
        .unwrap(),
        Response::Ok
    );
}

/// `linux.devices` nodes exist with their type, numbers, mode and owner, in the default /dev
/// tmpfs next to the agent's default nodes (one of which the spec overrides).
#[test]
fn linux_devices_are_created_in_the_rootfs() {
    let Some((root, _agent, mut c)) = setup("linux_devices_are_created_in_the_rootfs") else {
        return;
    };
    let sp = linux_json(
        spec(&[
            "sh",
            "-c",
            "stat -c '%n %F %t %T %a %u %g' /dev/fuse2 /dev/sub/fifo /dev/zero /dev/null",
        ]),
        |v| {
            v["linux"]["devices"] = serde_json::json!([
                {"path": "/dev/fuse2", "type": "c", "major": 10, "minor": 229,
                 "fileMode": 0o640, "uid": 1, "gid": 2},
                {"path": "/dev/sub/fifo", "type": "p", "fileMode": 0o600},
                {"path": "/dev/zero", "type": "c", "major": 1, "minor": 5, "fileMode": 0o604},
            ])
        },
    );
    let (out, err, st) = run(&mut c, "devices", sp, &root);
    assert_eq!(st.code, 0, "{out} {err}");
    assert_eq!(
        out.lines().collect::<Vec<_>>(),
        [
            "/dev/fuse2 character special file a e5 640 1 2",
            "/dev/sub/fifo fifo 0 0 600 0 0",
            "/dev/zero character special file 1 5 604 0 0",
            "/dev/null character special file 1 3 666 0 0",
        ],
        "{err}"
    );
    assert!(
        !root.join("dev/fuse2").exists(),
        "created in the /dev tmpfs, not the image"
    );
}

/// The root mount's propagation as seen in the container's own mountinfo.
fn root_propagation(c: &mut Client, root: &Path, id: &str, value: Option<&str>) -> String {
    let sp = linux_json(
        spec(&[
            "grep",
            "-E",
            "^[0-9]+ [0-9]+ [0-9:]+ [^ ]+ / ",
            "/proc/self/mountinfo",
        ]),
        |v| {
            if let Some(p) = value {
                v["linux"]["rootfsPropagation"] = p.into();
            }
        },
    );
    let (out, err, st) = run(c, id, sp, root);
    assert_eq!(st.code, 0, "{out} {err}");
    assert_eq!(out.lines().count(), 1, "{out}");
    out
}

#[test]
fn rootfs_propagation_is_applied_to_the_root_mount() {
    let Some((root, _agent, mut c)) = setup("rootfs_propagation_is_applied_to_the_root_mount")
    else {
        return;
    };
    let private = root_propagation(&mut c, &root, "pdefault", None);
    assert!(
        !private.contains("shared:") && !private.contains("unbindable"),
        "{private}"
    );
    let shared = root_propagation(&mut c, &root, "pshared", Some("rshared"));
    assert!(shared.contains(" shared:"), "{shared}");
    let unbindable = root_propagation(&mut c, &root, "punbind", Some("unbindable"));
    assert!(unbindable.contains(" unbindable "), "{unbindable}");
}

/// The default spec's mqueue and cgroup mounts: an mqueue file system at /dev/mqueue, and the
/// container's own cgroup (its memory limit readable, read-only) at /sys/fs/cgroup; with the
/// cgroup namespace the container's cgroup is its `/`.
#[test]
fn mqueue_and_cgroup_mounts_and_the_cgroup_namespace() {
    let Some((root, _agent, mut c)) = setup("mqueue_and_cgroup_mounts_and_the_cgroup_namespace")
    else {
        return;
    };
    let v2 = Path::new("/sys/fs/cgroup/cgroup.controllers").exists();
    let (limit_file, pids_file) = if v2 {
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/pids.max")
    } else {
        (
            "/sys/fs/cgroup/memory/memory.limit_in_bytes",
            "/sys/fs/cgroup/pids/pids.max",
        )
    };
    let script = format!(
        "grep -c ' /dev/mqueue .* - mqueue ' /proc/self/mountinfo; cat {limit_file}; \
         echo 5 > {pids_file}; cat /proc/self/cgroup"
    );
    let with_limit = |sp: oci_spec::runtime::Spec| {
        linux_json(sp, |v| {
            v["linux"]["resources"]["memory"] = serde_json::json!({"limit": 67108864})
        })
    };
    let sp = with_limit(spec(&["sh", "-c", &script]));
    assert!(sp
        .linux()
        .as_ref()
        .unwrap()
        .namespaces()
        .as_ref()
        .unwrap()
        .iter()
        .any(|n| n.typ() == oci_spec::runtime::LinuxNamespaceType::Cgroup));
    let (out, err, st) = run(&mut c, "cgns", sp.clone(), &root);
    assert_eq!(st.code, 0, "{out} {err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[..2], ["1", "67108864"], "{out} {err}");
    assert!(err.contains("Read-only file system"), "{err}");
    assert!(lines.len() > 2, "{out}");
    for l in &lines[2..] {
        assert!(l.ends_with(":/"), "cgroup namespace root: {out}");
    }
    // Without the cgroup namespace the container sees its real cgroup path.
    let sp = linux_json(sp, |v| {
        let ns = v["linux"]["namespaces"].as_array_mut().unwrap();
        ns.retain(|n| n["type"] != "cgroup");
    });
    let (out, err, st) = run(&mut c, "nocgns", sp, &root);
    assert_eq!(st.code, 0, "{out} {err}");
    assert!(out.contains("/nocgns\n"), "{out}");
}

/// `domainname` and `process.user.umask` are applied.
#[test]
fn domainname_and_umask_are_applied() {
    let Some((root, _agent, mut c)) = setup("domainname_and_umask_are_applied") else {
        return;
    };
    let mut sp = spec(&[
        "sh",
        "-c",
        "cat /proc/sys/kernel/domainname; touch /dev/shm/f; stat -c %a /dev/shm/f",
    ]);
    sp.set_domainname(Some("example.test".into()));
    let mut p = sp.process().clone().unwrap();
    let mut u = p.user().clone();
    u.set_umask(Some(0o077));
    p.set_user(u);
    sp.set_process(Some(p));
    let (out, err, st) = run(&mut c, "domain", sp, &root);
    assert_eq!(st.code, 0, "{out} {err}");
    assert_eq!(out, "example.test\n600\n", "{err}");
}

/// Sends a request as raw JSON (fields oci-spec does not know survive only this way).
fn raw_call(c: &mut Client, id: u32, req: serde_json::Value) -> Response {
    let f = protocol::Frame::new(
        protocol::FrameKind::Request,
        id,
        serde_json::to_vec(&req).unwrap(),
    );
    c.send_raw(&f.to_bytes()).unwrap();
    c.response(id, std::time::Duration::from_secs(30)).unwrap()
}

/// `runc spec`'s config.json exactly as runc writes it (not round-tripped through oci-spec) is
/// accepted; a field unknown to the agent's OCI spec version, in a spec or an exec'd process,
/// is refused naming it instead of being dropped by decoding.
#[test]
fn fields_unknown_to_the_agent_are_refused_not_dropped() {
    let test = "fields_unknown_to_the_agent_are_refused_not_dropped";
    let Some((root, agent, mut c)) = setup(test) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let ok = std::process::Command::new("runc")
        .arg("spec")
        .current_dir(dir.path())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        println!("SKIPPED: {test}: runc is not installed (apt-get install runc)");
        return;
    }
    let mut runc: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("config.json")).unwrap()).unwrap();
    runc["process"]["args"] = serde_json::json!(["sleep", "100"]);
    runc["process"]["terminal"] = false.into();
    let create = |id: &str, spec: &serde_json::Value| {
        serde_json::json!({"op": "create", "id": id, "spec": spec,
            "rootfs": {"type": "bind", "path": root.display().to_string()}})
    };
    let r = raw_call(&mut c, 1, create("runcraw", &runc));
    assert!(matches!(r, Response::Created { .. }), "{r:?}");
    for (i, (patch, what)) in [
        ("/mounts/0", "mounts[0].uidMappings"),
        ("/linux", "linux.fancyNewThing"),
        ("/process", "process.fancyNewThing"),
    ]
    .into_iter()
    .enumerate()
    {
        let mut sp = runc.clone();
        let name = what.rsplit('.').next().unwrap();
        sp.pointer_mut(patch).unwrap()[name] =
            serde_json::json!([{"containerID": 0, "hostID": 1000, "size": 1}]);
        let id = format!("unknown{i}");
        let r = raw_call(&mut c, 10 + i as u32, create(&id, &sp));
        let Response::Error(e) = &r else {
            panic!("{what}: {r:?}")
        };
        assert_eq!(e.code, ErrorCode::BadRequest, "{e:?}");
        assert!(
            e.message.contains(what) && e.message.contains("not supported by runv-agent"),
            "{e:?}"
        );
        for g in group_dirs(&agent.group) {
            assert!(!g.join(&id).exists(), "{id}: cgroup left behind");
        }
    }
    let r = c
        .call(&Request::Start {
            id: "runcraw".into(),
        })
        .unwrap();
    assert!(matches!(r, Response::Started { .. }), "{r:?}");
    let mut process = runc["process"].clone();
    process["args"] = serde_json::json!(["true"]);
    process["fancyNewThing"] = true.into();
    let r = raw_call(
        &mut c,
        20,
        serde_json::json!({"op": "exec", "id": "runcraw", "exec_id": "e1", "process": process}),
    );
    assert!(
        matches!(&r, Response::Error(e) if e.code == ErrorCode::BadRequest && e.message.contains("process.fancyNewThing")),
        "{r:?}"
    );
    assert_eq!(
        c.call(&Request::List).unwrap(),
        Response::Containers {
            ids: vec!["runcraw".into()]
        }
    );
    assert_eq!(
        c.call(&Request::Destroy {
            id: "runcraw".into()
        })
        .unwrap(),
        Response::Ok
    );
}

/// `process.terminal: true` gives the process a terminal even when the request's stdio did not
/// ask for one, sized by `process.consoleSize`.
#[test]
fn spec_terminal_and_console_size_are_applied() {
    let Some((root, _agent, mut c)) = setup("spec_terminal_and_console_size_are_applied") else {
        return;
    };
    let sp = linux_json(
        spec(&["sh", "-c", "[ -t 1 ] && echo is-a-tty; stty size"]),
        |v| {
            v["process"]["terminal"] = true.into();
            v["process"]["consoleSize"] = serde_json::json!({"height": 33, "width": 77});
        },
    );
    let s = launch(&mut c, "tty", sp, &root, StdioConfig::default());
    assert!(s.stderr.is_none(), "a terminal has one output stream");
    let st = wait(&mut c, "tty");
    let out = c
        .read_to_close(s.stdout, std::time::Duration::from_secs(10))
        .unwrap();
    let out = String::from_utf8_lossy(&out);
    assert_eq!(st.code, 0, "{out}");
    assert_eq!(out, "is-a-tty\r\n33 77\r\n");
    assert_eq!(
        c.call(&Request::Destroy { id: "tty".into() }).unwrap(),
        Response::Ok
    );
}
