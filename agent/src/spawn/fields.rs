//! Spec fields beyond mounts and the process: refused when the agent does not implement them
//! ([`refuse_unsupported`], [`refuse_unsupported_process`]), or translated into plan data
//! ([`sysctls`], [`devices`], [`root_propagation`]). The rule: a field the agent does not
//! honour is refused with an error naming it, never ignored.

use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use oci_spec::runtime::{LinuxDeviceType, LinuxNamespaceType, Process, Spec};

use super::mounts::RootPath;
use super::plan::cstr;
use super::SpawnError;

fn invalid(msg: impl Into<String>) -> SpawnError {
    SpawnError::Invalid(msg.into())
}

fn unsupported(field: &str) -> SpawnError {
    invalid(format!(
        "{field} is not supported by runv-agent: remove it from the spec"
    ))
}

/// Whether a JSON value asks for something: not null, an empty string, array or object.
fn non_empty(v: &serde_json::Value) -> bool {
    match v {
        serde_json::Value::Null => false,
        serde_json::Value::String(s) => !s.is_empty(),
        serde_json::Value::Array(a) => !a.is_empty(),
        serde_json::Value::Object(o) => o.values().any(non_empty),
        _ => true,
    }
}

/// The first of `fields` (JSON pointers into `v`, with their spec names) that is set.
fn first_set<'a>(v: &serde_json::Value, fields: &[(&'a str, &str)]) -> Option<&'a str> {
    fields
        .iter()
        .find(|(_, ptr)| v.pointer(ptr).is_some_and(non_empty))
        .map(|(name, _)| *name)
}

/// The keys of the object at `ptr` in `v` that are set but not in `known`.
fn unknown_keys(v: &serde_json::Value, ptr: &str, known: &[&str]) -> Option<String> {
    let o = v.pointer(ptr)?.as_object()?;
    o.iter()
        .find(|(k, val)| !known.contains(&k.as_str()) && non_empty(val))
        .map(|(k, _)| k.clone())
}

/// Refuses the spec-level and `linux` fields the agent does not implement.
pub(super) fn refuse_unsupported(spec: &Spec) -> Result<(), SpawnError> {
    let v = serde_json::to_value(spec)
        .map_err(|e| invalid(format!("the spec cannot be re-encoded: {e}")))?;
    let fields = [
        ("hooks", "/hooks"),
        ("uidMappings", "/uidMappings"),
        ("gidMappings", "/gidMappings"),
        ("solaris", "/solaris"),
        ("windows", "/windows"),
        ("vm", "/vm"),
        ("zos", "/zos"),
        ("linux.uidMappings (user namespaces)", "/linux/uidMappings"),
        ("linux.gidMappings (user namespaces)", "/linux/gidMappings"),
        ("linux.netDevices", "/linux/netDevices"),
        ("linux.cgroupsPath", "/linux/cgroupsPath"),
        ("linux.mountLabel", "/linux/mountLabel"),
        ("linux.intelRdt", "/linux/intelRdt"),
        ("linux.memoryPolicy", "/linux/memoryPolicy"),
        ("linux.personality", "/linux/personality"),
        ("linux.timeOffsets", "/linux/timeOffsets"),
    ];
    if let Some(f) = first_set(&v, &fields) {
        return Err(unsupported(f));
    }
    for (ptr, known) in [
        (
            "/linux/resources",
            &["devices", "memory", "cpu", "pids"][..],
        ),
        ("/linux/resources/memory", &["limit"][..]),
        ("/linux/resources/cpu", &["quota", "period"][..]),
        ("/linux/resources/pids", &["limit"][..]),
    ] {
        if let Some(k) = unknown_keys(&v, ptr, known) {
            let field = format!("{}/{k}", &ptr[1..]).replace('/', ".");
            return Err(unsupported(&field));
        }
    }
    let Some(l) = spec.linux() else {
        return Err(invalid(
            "the spec has no linux section: runv-agent needs linux.namespaces (pid, ipc, uts, mount): add it",
        ));
    };
    for (typ, name) in [
        (LinuxNamespaceType::Pid, "pid"),
        (LinuxNamespaceType::Ipc, "ipc"),
        (LinuxNamespaceType::Uts, "uts"),
        (LinuxNamespaceType::Mount, "mount"),
    ] {
        if !l.namespaces().iter().flatten().any(|n| n.typ() == typ) {
            return Err(invalid(format!(
                "linux.namespaces has no {name} namespace: sharing the guest's is not supported by runv-agent, which gives every container its own pid, ipc, uts and mount namespaces: add {{\"type\": \"{name}\"}}"
            )));
        }
    }
    for ns in l.namespaces().iter().flatten() {
        let name = serde_json::to_value(ns.typ())
            .ok()
            .and_then(|v| v.as_str().map(String::from))
            .unwrap_or_else(|| ns.typ().to_string());
        match ns.typ() {
            LinuxNamespaceType::User => {
                return Err(unsupported("a linux.namespaces entry of type user"))
            }
            LinuxNamespaceType::Time => {
                return Err(unsupported("a linux.namespaces entry of type time"))
            }
            _ if ns.path().is_some() => {
                return Err(invalid(format!(
                    "a linux.namespaces entry of type {name} with a path (joining an existing namespace) is not supported by runv-agent: remove the path (the container gets a new {name} namespace)"
                )))
            }
            _ => {}
        }
    }
    Ok(())
}

/// Refuses the `process` fields the agent does not implement (container and exec processes).
pub(super) fn refuse_unsupported_process(p: &Process) -> Result<(), SpawnError> {
    let v = serde_json::to_value(p)
        .map_err(|e| invalid(format!("process cannot be re-encoded: {e}")))?;
    let fields = [
        ("process.apparmorProfile", "/apparmorProfile"),
        ("process.selinuxLabel", "/selinuxLabel"),
        ("process.ioPriority", "/ioPriority"),
        ("process.scheduler", "/scheduler"),
        ("process.execCPUAffinity", "/execCPUAffinity"),
        ("process.oomScoreAdj", "/oomScoreAdj"),
        ("process.commandLine", "/commandLine"),
        ("process.user.username", "/user/username"),
    ];
    match first_set(&v, &fields) {
        Some(f) => Err(unsupported(f)),
        None => Ok(()),
    }
}

/// The first field of `raw` (a spec or process as received) that decoding dropped: present and
/// not null in `raw` but absent from `decoded` (the decoded value encoded again), as a dotted
/// path (`mounts[2].uidMappings`). oci-spec ignores names it does not know; this keeps such a
/// field from being ignored silently.
pub fn unknown_field(raw: &serde_json::Value, decoded: &serde_json::Value) -> Option<String> {
    fn walk(raw: &serde_json::Value, dec: &serde_json::Value, path: &str) -> Option<String> {
        match (raw, dec) {
            (serde_json::Value::Object(r), serde_json::Value::Object(d)) => {
                r.iter().filter(|(_, v)| !v.is_null()).find_map(|(k, v)| {
                    let p = if path.is_empty() {
                        k.clone()
                    } else {
                        format!("{path}.{k}")
                    };
                    match d.get(k) {
                        None => Some(p),
                        Some(dv) => walk(v, dv, &p),
                    }
                })
            }
            (serde_json::Value::Array(r), serde_json::Value::Array(d)) => r
                .iter()
                .zip(d)
                .enumerate()
                .find_map(|(i, (rv, dv))| walk(rv, dv, &format!("{path}[{i}]"))),
            _ => None,
        }
    }
    walk(raw, decoded, "")
}

/// One `linux.sysctl` entry: the file under the container's proc mount and the value.
#[derive(Debug)]
pub(super) struct Sysctl {
    /// `sys/net/ipv4/ip_forward`, relative to the proc mount.
    pub(super) path: RootPath,
    pub(super) value: std::ffi::CString,
}

/// runc's namespaced IPC sysctls (with `fs.mqueue.*`).
const IPC_SYSCTLS: &[&str] = &[
    "kernel.msgmax",
    "kernel.msgmnb",
    "kernel.msgmni",
    "kernel.sem",
    "kernel.shmall",
    "kernel.shmmax",
    "kernel.shmmni",
    "kernel.shm_rmid_forced",
];

/// Validates `linux.sysctl` as runc does: only sysctls of a namespace the container has its
/// own of (IPC and UTS always; network when `new_net`). Sorted by key, for determinism.
pub(super) fn sysctls(spec: &Spec, new_net: bool) -> Result<Vec<Sysctl>, SpawnError> {
    let Some(map) = spec.linux().as_ref().and_then(|l| l.sysctl().as_ref()) else {
        return Ok(Vec::new());
    };
    let mut keys: Vec<&String> = map.keys().collect();
    keys.sort();
    let has_proc = spec
        .mounts()
        .iter()
        .flatten()
        .any(|m| m.typ().as_deref() == Some("proc"));
    let mut out = Vec::with_capacity(keys.len());
    for key in keys {
        let value = &map[key];
        if key.is_empty()
            || key.contains('/')
            || key.contains("..")
            || key.starts_with('.')
            || key.ends_with('.')
            || key.contains('\0')
        {
            return Err(invalid(format!(
                "linux.sysctl key {key:?} is not a dotted sysctl name (no '/', '..' or empty parts): fix the spec"
            )));
        }
        if IPC_SYSCTLS.contains(&key.as_str()) || key.starts_with("fs.mqueue.") {
            // The agent always gives containers their own IPC namespace.
        } else if key.starts_with("net.") {
            if !new_net {
                return Err(invalid(format!(
                    "linux.sysctl {key:?} would change the guest's network namespace: add a network namespace to linux.namespaces or remove the sysctl"
                )));
            }
        } else if key == "kernel.domainname" {
            // The agent always gives containers their own UTS namespace.
        } else if key == "kernel.hostname" {
            return Err(invalid(
                "linux.sysctl \"kernel.hostname\" conflicts with the spec's hostname field: set hostname instead",
            ));
        } else {
            return Err(invalid(format!(
                "linux.sysctl {key:?} is not namespaced (only kernel.msg*/sem/shm*, fs.mqueue.*, net.* and kernel.domainname are): remove it from the spec"
            )));
        }
        if !has_proc {
            return Err(invalid(
                "linux.sysctl needs a mount of type proc in mounts (sysctls are written through the container's /proc): add one",
            ));
        }
        let path = RootPath::new(Path::new(&format!("sys/{}", key.replace('.', "/"))))?;
        out.push(Sysctl {
            path,
            value: cstr(value)?,
        });
    }
    Ok(out)
}

/// One `linux.devices` node to create inside the root.
pub(super) struct DeviceNode {
    /// The parent directory (created if missing, resolved in the root).
    pub(super) dir: RootPath,
    /// The node's name in `dir`.
    pub(super) name: std::ffi::CString,
    /// `S_IFCHR`, `S_IFBLK` or `S_IFIFO`.
    pub(super) kind: libc::mode_t,
    /// Permission bits (`fileMode` without type bits), applied after mknod (umask).
    pub(super) perm: libc::mode_t,
    pub(super) dev: libc::dev_t,
    pub(super) uid: libc::uid_t,
    pub(super) gid: libc::gid_t,
}

/// Validates `linux.devices` as runc does: type `c`/`u` (character), `b` (block) or `p` (FIFO),
/// an absolute path inside the root, major/minor within 32 bits; `fileMode` defaults to 0666.
pub(super) fn devices(spec: &Spec) -> Result<Vec<DeviceNode>, SpawnError> {
    let mut out = Vec::new();
    for d in spec
        .linux()
        .as_ref()
        .and_then(|l| l.devices().as_ref())
        .into_iter()
        .flatten()
    {
        let path = d.path();
        let shown = path.display();
        let kind = match d.typ() {
            LinuxDeviceType::C | LinuxDeviceType::U => libc::S_IFCHR,
            LinuxDeviceType::B => libc::S_IFBLK,
            LinuxDeviceType::P => libc::S_IFIFO,
            LinuxDeviceType::A => {
                return Err(invalid(format!(
                    "linux.devices entry {shown}: type \"a\" is not a device node type (use c, u, b or p)"
                )))
            }
        };
        let rp = RootPath::new(path)?;
        let Some((name, dir)) = rp.names.split_last() else {
            return Err(invalid(format!(
                "linux.devices entry {shown:?} is not an absolute path below /: fix the spec"
            )));
        };
        if !path.is_absolute() {
            return Err(invalid(format!(
                "linux.devices entry {shown:?} is not an absolute path below /: fix the spec"
            )));
        }
        let range = |v: i64, what: &str| {
            u32::try_from(v).map_err(|_| {
                invalid(format!(
                    "linux.devices entry {shown}: {what} {v} is not in 0..=4294967295"
                ))
            })
        };
        let (major, minor) = if kind == libc::S_IFIFO {
            (0, 0)
        } else {
            (range(d.major(), "major")?, range(d.minor(), "minor")?)
        };
        let perm = d.file_mode().unwrap_or(0o666) & !libc::S_IFMT;
        if perm > 0o7777 {
            return Err(invalid(format!(
                "linux.devices entry {shown}: fileMode {:#o} has bits beyond permissions and the file type",
                d.file_mode().unwrap_or(0)
            )));
        }
        let dir_path: std::path::PathBuf = dir
            .iter()
            .map(|c| std::ffi::OsStr::from_bytes(c.as_bytes()))
            .collect();
        out.push(DeviceNode {
            dir: RootPath::new(&dir_path)?,
            name: name.clone(),
            kind,
            perm,
            dev: libc::makedev(major, minor),
            uid: d.uid().unwrap_or(0),
            gid: d.gid().unwrap_or(0),
        });
    }
    Ok(out)
}

/// `linux.rootfsPropagation` as mount(2) flags (0: leave the root private, the agent's default).
pub(super) fn root_propagation(spec: &Spec) -> Result<libc::c_ulong, SpawnError> {
    let v = spec
        .linux()
        .as_ref()
        .and_then(|l| l.rootfs_propagation().clone())
        .unwrap_or_default();
    Ok(match v.as_str() {
        "" => 0,
        "private" => libc::MS_PRIVATE,
        "rprivate" => libc::MS_PRIVATE | libc::MS_REC,
        "slave" => libc::MS_SLAVE,
        "rslave" => libc::MS_SLAVE | libc::MS_REC,
        "shared" => libc::MS_SHARED,
        "rshared" => libc::MS_SHARED | libc::MS_REC,
        "unbindable" => libc::MS_UNBINDABLE,
        "runbindable" => libc::MS_UNBINDABLE | libc::MS_REC,
        other => {
            return Err(invalid(format!(
                "linux.rootfsPropagation {other:?} is not one of private, slave, shared, unbindable (or their r- variants): fix the spec"
            )))
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(v: serde_json::Value) -> Spec {
        let mut base = serde_json::to_value(Spec::default()).unwrap();
        for (k, val) in v.as_object().unwrap() {
            if k == "linux" {
                for (lk, lv) in val.as_object().unwrap() {
                    base["linux"][lk] = lv.clone();
                }
            } else {
                base[k] = val.clone();
            }
        }
        serde_json::from_value(base).unwrap()
    }

    #[test]
    fn the_default_spec_passes_and_unsupported_fields_are_named() {
        refuse_unsupported(&Spec::default()).unwrap();
        refuse_unsupported_process(Spec::default().process().as_ref().unwrap()).unwrap();
        for (v, what) in [
            (
                serde_json::json!({"hooks": {"prestart": [{"path": "/bin/true"}]}}),
                "hooks",
            ),
            (
                serde_json::json!({"linux": {"intelRdt": {"closID": "x"}}}),
                "linux.intelRdt",
            ),
            (
                serde_json::json!({"linux": {"personality": {"domain": "LINUX32"}}}),
                "linux.personality",
            ),
            (
                serde_json::json!({"linux": {"mountLabel": "system_u:object_r:x"}}),
                "linux.mountLabel",
            ),
            (
                serde_json::json!({"linux": {"uidMappings": [{"containerID": 0, "hostID": 1000, "size": 1}]}}),
                "linux.uidMappings",
            ),
            (
                serde_json::json!({"linux": {"namespaces": [{"type": "pid"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"}, {"type": "user"}]}}),
                "type user",
            ),
            (
                serde_json::json!({"linux": {"namespaces": [{"type": "pid"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"}, {"type": "network", "path": "/proc/1/ns/net"}]}}),
                "type network with a path",
            ),
        ] {
            let e = refuse_unsupported(&spec(v)).unwrap_err().to_string();
            assert!(e.contains(what), "{e}");
            assert!(e.contains("not supported by runv-agent"), "{e}");
        }
        let e = refuse_unsupported(&spec(serde_json::json!({"linux": {"namespaces": [
            {"type": "pid"}, {"type": "uts"}, {"type": "mount"}]}})))
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("no ipc namespace") && e.contains("not supported"),
            "{e}"
        );
        let mut p = Spec::default().process().clone().unwrap();
        p.set_apparmor_profile(Some("docker-default".into()));
        let e = refuse_unsupported_process(&p).unwrap_err().to_string();
        assert!(e.contains("process.apparmorProfile"), "{e}");
    }

    #[test]
    fn fields_dropped_by_decoding_are_found() {
        let raw = serde_json::json!({
            "ociVersion": "1.0.2",
            "process": {"args": ["sh"], "cwd": "/", "user": {"uid": 0, "gid": 0}},
            "annotations": {"a": "b"},
            "linux": {"sysctl": {"kernel.shmmax": "1"}, "devices": null},
            "mounts": [{"destination": "/proc", "type": "proc"},
                       {"destination": "/x", "type": "bind", "source": "/y",
                        "uidMappings": [{"containerID": 0, "hostID": 1, "size": 1}]}]
        });
        let spec: Spec = serde_json::from_value(raw.clone()).unwrap();
        let dec = serde_json::to_value(&spec).unwrap();
        assert_eq!(
            unknown_field(&raw, &dec).as_deref(),
            Some("mounts[1].uidMappings")
        );
        let mut known = raw.clone();
        known["mounts"][1]
            .as_object_mut()
            .unwrap()
            .remove("uidMappings");
        assert_eq!(unknown_field(&known, &dec), None);
        known["linux"]["fancyNewThing"] = serde_json::json!({"on": true});
        assert_eq!(
            unknown_field(&known, &dec).as_deref(),
            Some("linux.fancyNewThing")
        );
        let runc = serde_json::to_value(Spec::default()).unwrap();
        assert_eq!(unknown_field(&runc, &runc), None);
    }

    #[test]
    fn sysctls_follow_runc_namespacing_rules() {
        let s = spec(serde_json::json!({"linux": {"sysctl": {
            "kernel.shmmax": "1000", "net.ipv4.ip_forward": "1", "fs.mqueue.msg_max": "20"}}}));
        let v = sysctls(&s, true).unwrap();
        let paths: Vec<&str> = v
            .iter()
            .map(|s| s.path.prefixes.last().unwrap().to_str().unwrap())
            .collect();
        assert_eq!(
            paths,
            [
                "sys/fs/mqueue/msg_max",
                "sys/kernel/shmmax",
                "sys/net/ipv4/ip_forward"
            ]
        );
        let e = sysctls(&s, false).unwrap_err().to_string();
        assert!(e.contains("network namespace"), "{e}");
        for (key, what) in [
            ("kernel.pid_max", "not namespaced"),
            ("vm.overcommit_memory", "not namespaced"),
            ("kernel.hostname", "hostname field"),
            ("net.ipv4..conf", "not a dotted"),
            ("net/ipv4/ip_forward", "not a dotted"),
            ("net.ipv4.", "not a dotted"),
        ] {
            let s = spec(serde_json::json!({"linux": {"sysctl": {key: "1"}}}));
            let e = sysctls(&s, true).unwrap_err().to_string();
            assert!(e.contains(what), "{key}: {e}");
        }
    }

    #[test]
    fn devices_are_validated() {
        let s = spec(serde_json::json!({"linux": {"devices": [
            {"path": "/dev/fuse", "type": "c", "major": 10, "minor": 229, "fileMode": 0o20640u32, "uid": 1, "gid": 2},
            {"path": "/dev/sub/fifo", "type": "p"}]}}));
        let v = devices(&s).unwrap();
        assert_eq!(v.len(), 2);
        assert_eq!(
            (v[0].kind, v[0].perm, v[0].uid, v[0].gid),
            (libc::S_IFCHR, 0o640, 1, 2)
        );
        assert_eq!(v[0].dev, libc::makedev(10, 229));
        assert_eq!(v[0].name.to_str().unwrap(), "fuse");
        assert_eq!(
            v[1].dir.prefixes.last().unwrap().to_str().unwrap(),
            "dev/sub"
        );
        assert_eq!((v[1].kind, v[1].perm), (libc::S_IFIFO, 0o666));
        for (d, what) in [
            (
                serde_json::json!({"path": "/dev/x", "type": "a"}),
                "type \"a\"",
            ),
            (
                serde_json::json!({"path": "/dev/x", "type": "c", "major": -1}),
                "major -1",
            ),
            (serde_json::json!({"path": "/../x", "type": "c"}), "escapes"),
            (
                serde_json::json!({"path": "dev/x", "type": "c"}),
                "absolute",
            ),
        ] {
            let s = spec(serde_json::json!({"linux": {"devices": [d]}}));
            let e = devices(&s).err().unwrap().to_string();
            assert!(e.contains(what), "{e}");
        }
    }

    #[test]
    fn root_propagation_values() {
        let p = |v: &str| {
            root_propagation(&spec(
                serde_json::json!({"linux": {"rootfsPropagation": v}}),
            ))
        };
        assert_eq!(p("").unwrap(), 0);
        assert_eq!(p("rshared").unwrap(), libc::MS_SHARED | libc::MS_REC);
        assert_eq!(p("slave").unwrap(), libc::MS_SLAVE);
        let e = p("sharedish").unwrap_err().to_string();
        assert!(e.contains("linux.rootfsPropagation"), "{e}");
    }
}
