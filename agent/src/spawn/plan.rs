//! The safe half of spawning: an OCI spec (untrusted) becomes a [`Plan`], plain C data the
//! cloned child uses without allocating. Everything that can be rejected is rejected here.
//!
//! Mount destinations become [`RootPath`]s ([`super::mounts`]): lexically cleaned component
//! lists that the child resolves inside the container's root (see [`super::resolve`]), never
//! host path strings.

use std::ffi::CString;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

use oci_spec::runtime::{LinuxNamespaceType, Spec};
use protocol::RootfsSource;

use crate::rootdev::ImageRoot;

use super::fields::{DeviceNode, Sysctl};
use super::mounts::{mount_flags, RootPath};
use super::names::{cap_number, rlimit_resource};
use super::seccomp::Filters;
use super::SpawnError;

fn invalid(msg: impl Into<String>) -> SpawnError {
    SpawnError::Invalid(msg.into())
}

pub(super) fn cstr(s: impl AsRef<[u8]>) -> Result<CString, SpawnError> {
    CString::new(s.as_ref().to_vec())
        .map_err(|_| invalid("a path or string in the spec contains a NUL byte: remove it"))
}

pub(super) fn cpath(p: &Path) -> Result<CString, SpawnError> {
    cstr(p.as_os_str().as_encoded_bytes())
}

/// A mount the agent controls (the root file system itself), at a host path.
pub(super) struct HostMount {
    pub(super) source: Option<CString>,
    pub(super) target: CString,
    pub(super) fstype: Option<CString>,
    pub(super) flags: libc::c_ulong,
    pub(super) data: Option<CString>,
    /// Directories to create first (in a tmpfs the child just mounted).
    pub(super) mkdirs: Vec<CString>,
}

/// A mount inside the container's root, from the spec or the device list.
pub(super) struct MountOp {
    pub(super) source: Option<CString>,
    pub(super) target: RootPath,
    pub(super) fstype: Option<CString>,
    pub(super) flags: libc::c_ulong,
    pub(super) data: Option<CString>,
    /// Create a missing target as an empty file (a file bind) rather than a directory.
    pub(super) file: bool,
    /// Bind mounts: flags for a `MS_REMOUNT | MS_BIND` after the bind (ro, nosuid, ...).
    pub(super) remount: Option<libc::c_ulong>,
    /// Propagation to set after mounting (`MS_PRIVATE`, `MS_SLAVE`, ... with `MS_REC`), or 0.
    pub(super) propagation: libc::c_ulong,
}

/// The container's file system: root, mounts, masked and read-only paths.
pub(super) struct Rootfs {
    /// Mounts that make the root (bind, or tmpfs + overlay), in order.
    pub(super) setup: Vec<HostMount>,
    /// Where the root is mounted (host path, checked: not a symbolic link).
    pub(super) path: CString,
    pub(super) readonly: bool,
    pub(super) mounts: Vec<MountOp>,
    /// `linux.maskedPaths`, absolute container paths.
    pub(super) masked: Vec<CString>,
    /// `linux.readonlyPaths`, absolute container paths.
    pub(super) readonly_paths: Vec<CString>,
    /// `linux.devices`: nodes created inside the root after the mounts.
    pub(super) devices: Vec<DeviceNode>,
    /// `linux.rootfsPropagation` as mount flags, applied to `/` after the pivot (0: none).
    pub(super) propagation: libc::c_ulong,
    /// `linux.sysctl`, written through the container's /proc after the pivot.
    pub(super) sysctls: Vec<Sysctl>,
    /// Mounts of type `cgroup`/`cgroup2`, waiting for the container's cgroup
    /// ([`Plan::bind_cgroup`]): where they go in `mounts`, destination and options.
    pub(super) cgroup_mounts: Vec<CgroupMount>,
    /// `/dev/console`, where the terminal is bound when the process has one (as runc does):
    /// `ttyname(3)` and `tty` look for their terminal inside the container's /dev.
    pub(super) console: RootPath,
}

/// A spec mount of the container's cgroup, expanded by [`Plan::bind_cgroup`].
pub(super) struct CgroupMount {
    /// Index in [`Rootfs::mounts`] where its mounts go.
    at: usize,
    dest: PathBuf,
    /// nosuid/nodev/noexec/... flags of the spec's options.
    flags: libc::c_ulong,
    readonly: bool,
}

/// Capability sets, as bit masks.
pub(super) struct Caps {
    pub(super) bounding: u64,
    pub(super) effective: u64,
    pub(super) permitted: u64,
    pub(super) inheritable: u64,
    /// Ambient capability numbers to raise.
    pub(super) ambient: Vec<u64>,
}

/// Everything the child needs, as C data.
pub struct Plan {
    pub(super) clone_flags: libc::c_int,
    pub(super) rootfs: Option<Rootfs>,
    pub(super) hostname: Option<CString>,
    /// `domainname`, set with setdomainname(2) in the container's UTS namespace.
    pub(super) domainname: Option<CString>,
    /// Unshare the cgroup namespace once in the container's cgroup (after start).
    pub(super) cgroupns: bool,
    /// `process.user.umask`.
    pub(super) umask: Option<libc::mode_t>,
    /// `process.consoleSize`, applied to the terminal (ignored without one, as the spec says).
    pub(super) console: Option<libc::winsize>,
    pub(super) rlimits: Vec<(libc::c_int, libc::rlimit)>,
    pub(super) cwd: CString,
    pub(super) exec_candidates: Vec<CString>,
    pub(super) argv: Vec<CString>,
    pub(super) envp: Vec<CString>,
    pub(super) uid: libc::uid_t,
    pub(super) gid: libc::gid_t,
    pub(super) groups: Vec<libc::gid_t>,
    pub(super) caps: Option<Caps>,
    pub(super) no_new_privs: bool,
    /// Shared with the processes later exec'd into the container.
    pub(super) seccomp: Option<std::sync::Arc<Filters>>,
    /// Namespaces to join (exec into a running container).
    pub(super) join: Vec<OwnedFd>,
    /// Fork once more after joining (the pid namespace applies to children).
    pub(super) fork_after_join: bool,
}

/// Most argv and envp entries the child passes (its pointer arrays are fixed-size).
pub(super) const MAX_ARGS: usize = 255;
/// See [`MAX_ARGS`].
pub(super) const MAX_ENV: usize = 511;

fn cap_mask(set: &Option<oci_spec::runtime::Capabilities>) -> Result<u64, SpawnError> {
    let mut mask = 0u64;
    for c in set.iter().flatten() {
        let name = serde_json::to_value(c)
            .ok()
            .and_then(|v| v.as_str().map(String::from))
            .unwrap_or_default();
        let n = cap_number(&name).ok_or_else(|| {
            invalid(format!(
                "capability {name} is unknown to this agent: remove it from process.capabilities"
            ))
        })?;
        mask |= 1 << n;
    }
    Ok(mask)
}

/// Refuses a host path given as the root (or overlay lower) that is a symbolic link, and
/// returns it with its parents resolved.
fn real_dir(path: &Path, what: &str) -> Result<PathBuf, SpawnError> {
    let meta = std::fs::symlink_metadata(path).map_err(|source| SpawnError::Sys {
        what: "checking the root file system",
        source,
    })?;
    if meta.file_type().is_symlink() {
        return Err(invalid(format!(
            "{what} {} is a symbolic link: give the directory it points to",
            path.display()
        )));
    }
    if !meta.is_dir() {
        return Err(invalid(format!(
            "{what} {} is not a directory",
            path.display()
        )));
    }
    std::fs::canonicalize(path).map_err(|source| SpawnError::Sys {
        what: "resolving the root file system's path",
        source,
    })
}

/// Whether `/proc/filesystems` lists `fstype` (built in or loaded).
fn kernel_has_fs(fstype: &str) -> bool {
    std::fs::read_to_string("/proc/filesystems").is_ok_and(|s| {
        s.lines()
            .any(|l| l.split_whitespace().last() == Some(fstype))
    })
}

/// Device nodes bind-mounted from the agent's /dev when the spec mounts a tmpfs on /dev.
const DEVICES: &[&str] = &["null", "zero", "full", "random", "urandom", "tty"];

fn container_paths(paths: &Option<Vec<String>>, what: &str) -> Result<Vec<CString>, SpawnError> {
    paths
        .iter()
        .flatten()
        .map(|p| {
            let rp = RootPath::new(Path::new(p))?;
            if !p.starts_with('/') || rp.names.is_empty() {
                return Err(invalid(format!(
                    "{what} entry {p:?} is not an absolute path below /: fix the spec"
                )));
            }
            cstr(p)
        })
        .collect()
}

impl Plan {
    /// Prepares the container process of `spec` with root file system `source`; an overlay
    /// root is mounted on a tmpfs at `scratch`. Returns the plan and where the root will be.
    pub fn for_container(
        spec: &Spec,
        source: &RootfsSource,
        scratch: &Path,
    ) -> Result<(Self, PathBuf), SpawnError> {
        Self::for_container_with(spec, source, scratch, None)
    }

    /// [`Plan::for_container`] for every source: `image` is the block device the agent found
    /// or attached for a `Block` or `Image` source (required for those, ignored otherwise).
    pub fn for_container_with(
        spec: &Spec,
        source: &RootfsSource,
        scratch: &Path,
        image: Option<&ImageRoot>,
    ) -> Result<(Self, PathBuf), SpawnError> {
        let process = spec
            .process()
            .as_ref()
            .ok_or_else(|| invalid("the spec has no process: add process.args"))?;
        let linux = spec.linux().as_ref();
        super::fields::refuse_unsupported(spec)?;
        let mut flags =
            libc::CLONE_NEWNS | libc::CLONE_NEWPID | libc::CLONE_NEWUTS | libc::CLONE_NEWIPC;
        if linux
            .and_then(|l| l.namespaces().as_ref())
            .is_some_and(|ns| {
                ns.iter()
                    .any(|n| n.typ() == LinuxNamespaceType::Network && n.path().is_none())
            })
        {
            flags |= libc::CLONE_NEWNET;
        }
        let cgroupns = linux
            .and_then(|l| l.namespaces().as_ref())
            .is_some_and(|ns| ns.iter().any(|n| n.typ() == LinuxNamespaceType::Cgroup));
        if cgroupns && !Path::new("/proc/self/ns/cgroup").exists() {
            return Err(invalid(
                "linux.namespaces asks for a cgroup namespace, which this kernel lacks (CONFIG_CGROUPS): remove it or use a kernel with it",
            ));
        }
        let devices = super::fields::devices(spec)?;
        let sysctls = super::fields::sysctls(spec, flags & libc::CLONE_NEWNET != 0)?;
        let propagation = super::fields::root_propagation(spec)?;
        crate::devices::rules_from_spec(spec).map_err(|e| invalid(e.to_string()))?;
        let (setup, root) = Self::root_mounts(source, scratch, image)?;
        let mut mounts = Vec::new();
        let mut cgroup_mounts = Vec::new();
        let mut dev_tmpfs = false;
        for m in spec.mounts().iter().flatten() {
            let typ = m.typ().clone().unwrap_or_default();
            let dest = m.destination();
            let target = RootPath::new(dest)?;
            let mf = mount_flags(&m.options().clone().unwrap_or_default());
            if typ == "cgroup" || typ == "cgroup2" {
                if mf.bind || mf.propagation != 0 || !mf.data.is_empty() {
                    return Err(invalid(format!(
                        "mount of type {typ} at {}: options {:?} are not supported for the container's cgroup (use only ro/rw, nosuid, nodev, noexec and atime options)",
                        dest.display(),
                        m.options().clone().unwrap_or_default()
                    )));
                }
                // The container's own cgroup, bound once it exists (Plan::bind_cgroup).
                cgroup_mounts.push(CgroupMount {
                    at: mounts.len(),
                    dest: dest.clone(),
                    flags: mf.flags,
                    readonly: mf.readonly,
                });
                continue;
            }
            if typ == "mqueue" && !kernel_has_fs("mqueue") {
                return Err(invalid(format!(
                    "mount of type mqueue at {}: this kernel has no mqueue file system (CONFIG_POSIX_MQUEUE): remove the mount or use a kernel with it",
                    dest.display()
                )));
            }
            let bind = mf.bind || typ == "bind";
            if bind && !mf.data.is_empty() {
                // mount(2) ignores the data argument of a bind mount: these would be lost.
                return Err(invalid(format!(
                    "bind mount at {}: options {:?} are not supported by runv-agent for bind mounts (use ro/rw, [r]bind, nosuid/nodev/noexec, atime and propagation options): remove them",
                    dest.display(),
                    mf.data
                )));
            }
            if target.names.len() == 1 && target.names[0].as_bytes() == b"dev" && typ == "tmpfs" {
                dev_tmpfs = true;
            }
            let src = m.source().as_ref().map(|s| s.as_path());
            let (flags, remount) = if bind {
                let rec = if mf.recursive { libc::MS_REC } else { 0 };
                let ro = if mf.readonly { libc::MS_RDONLY } else { 0 };
                let extra = mf.flags | ro;
                (libc::MS_BIND | rec, (extra != 0).then_some(extra))
            } else {
                let ro = if mf.readonly { libc::MS_RDONLY } else { 0 };
                (mf.flags | ro, None)
            };
            mounts.push(MountOp {
                source: Some(match src {
                    Some(s) => cpath(s)?,
                    None => cstr(&typ)?,
                }),
                target,
                fstype: (!bind).then(|| cstr(&typ)).transpose()?,
                flags,
                data: (!mf.data.is_empty())
                    .then(|| cstr(mf.data.join(",")))
                    .transpose()?,
                file: bind && src.is_some_and(|s| s.is_file()),
                remount,
                propagation: mf.propagation,
            });
        }
        if dev_tmpfs {
            for d in DEVICES {
                let path = Path::new("/dev").join(d);
                if spec
                    .linux()
                    .as_ref()
                    .and_then(|l| l.devices().as_ref())
                    .is_some_and(|v| v.iter().any(|dev| dev.path() == &path))
                {
                    // linux.devices lists it: created from the spec, as runc does.
                    continue;
                }
                mounts.push(MountOp {
                    source: Some(cstr(format!("/dev/{d}"))?),
                    target: RootPath::new(&path)?,
                    fstype: None,
                    flags: libc::MS_BIND,
                    data: None,
                    file: true,
                    remount: None,
                    propagation: 0,
                });
            }
        }
        let mut plan = Self::for_process(process)?;
        plan.clone_flags = flags;
        plan.rootfs = Some(Rootfs {
            setup,
            path: cpath(&root)?,
            readonly: spec
                .root()
                .as_ref()
                .and_then(|r| r.readonly())
                .unwrap_or(false),
            mounts,
            masked: container_paths(&linux.and_then(|l| l.masked_paths().clone()), "maskedPaths")?,
            readonly_paths: container_paths(
                &linux.and_then(|l| l.readonly_paths().clone()),
                "readonlyPaths",
            )?,
            devices,
            propagation,
            sysctls,
            cgroup_mounts,
            console: RootPath::new(Path::new("/dev/console"))?,
        });
        plan.hostname = spec.hostname().as_ref().map(cstr).transpose()?;
        plan.domainname = spec
            .domainname()
            .as_ref()
            .filter(|d| !d.is_empty())
            .map(cstr)
            .transpose()?;
        plan.cgroupns = cgroupns;
        plan.seccomp = linux
            .and_then(|l| l.seccomp().as_ref())
            .map(super::seccomp::compile)
            .transpose()?
            .map(std::sync::Arc::new);
        Ok((plan, root))
    }

    /// Adds the spec's `cgroup`/`cgroup2` mounts once the container's cgroup exists: its
    /// directory bound at the destination (v2), or on v1 hosts a tmpfs there with each
    /// controller's directory bound below it (`memory`, `pids`, `cpu`, `devices`), as runc
    /// does; read-only unless the spec's options say `rw`. A plan with such mounts cannot be
    /// spawned before this was called.
    pub fn bind_cgroup(&mut self, cgroup: &crate::cgroup::Cgroup) -> Result<(), SpawnError> {
        let Some(r) = self.rootfs.as_mut() else {
            return Ok(());
        };
        let pending = std::mem::take(&mut r.cgroup_mounts);
        // Back to front: each insertion leaves the earlier indices valid.
        for cm in pending.into_iter().rev() {
            let ro = if cm.readonly { libc::MS_RDONLY } else { 0 };
            let bind = |src: &Path, dest: &Path| -> Result<MountOp, SpawnError> {
                Ok(MountOp {
                    source: Some(cpath(src)?),
                    target: RootPath::new(dest)?,
                    fstype: None,
                    flags: libc::MS_BIND,
                    data: None,
                    file: false,
                    remount: Some(cm.flags | ro),
                    propagation: 0,
                })
            };
            let ops = match cgroup.unified_dir() {
                Some(dir) => vec![bind(dir, &cm.dest)?],
                None => {
                    let dirs = cgroup.controller_dirs().unwrap_or_default();
                    let mut ops = vec![MountOp {
                        source: Some(cstr("tmpfs")?),
                        target: RootPath::new(&cm.dest)?,
                        fstype: Some(cstr("tmpfs")?),
                        flags: cm.flags,
                        data: Some(cstr("mode=755")?),
                        file: false,
                        remount: None,
                        propagation: 0,
                    }];
                    for (name, dir) in dirs {
                        ops.push(bind(dir, &cm.dest.join(name))?);
                    }
                    if cm.readonly {
                        // The tmpfs itself, read-only once the binds are in place.
                        ops.push(MountOp {
                            source: None,
                            target: RootPath::new(&cm.dest)?,
                            fstype: None,
                            flags: libc::MS_REMOUNT | libc::MS_BIND | libc::MS_RDONLY | cm.flags,
                            data: None,
                            file: false,
                            remount: None,
                            propagation: 0,
                        });
                    }
                    ops
                }
            };
            let at = cm.at.min(r.mounts.len());
            r.mounts.splice(at..at, ops);
        }
        Ok(())
    }

    /// Whether the plan still waits for [`Plan::bind_cgroup`].
    pub(super) fn needs_cgroup(&self) -> bool {
        self.rootfs
            .as_ref()
            .is_some_and(|r| !r.cgroup_mounts.is_empty())
    }

    /// The mounts that make the root, and where it will be.
    fn root_mounts(
        source: &RootfsSource,
        scratch: &Path,
        image: Option<&ImageRoot>,
    ) -> Result<(Vec<HostMount>, PathBuf), SpawnError> {
        Ok(match source {
            RootfsSource::Bind { path } => {
                let p = real_dir(Path::new(path), "root file system")?;
                let bind = HostMount {
                    source: Some(cpath(&p)?),
                    target: cpath(&p)?,
                    fstype: None,
                    flags: libc::MS_BIND | libc::MS_REC,
                    data: None,
                    mkdirs: Vec::new(),
                };
                (vec![bind], p)
            }
            RootfsSource::Overlay { lower } => {
                let lower = overlay_dir(Path::new(lower), "overlay lower directory")?;
                let scratch = overlay_dir(scratch, "overlay scratch directory")?;
                let (overlay, merged) = overlay_mount(&lower, &scratch)?;
                (vec![tmpfs_mount(&scratch)?, overlay], merged)
            }
            RootfsSource::Block { .. } | RootfsSource::Image { .. } => {
                let image = image.ok_or_else(|| {
                    invalid("an image root source needs its block device: use Runtime::create")
                })?;
                let scratch = overlay_dir(scratch, "overlay scratch directory")?;
                let lower = scratch.join("lower");
                // The writable layer: a tmpfs, or a scratch ext4 device.
                let writable = match &image.scratch_device {
                    None => tmpfs_mount(&scratch)?,
                    Some(dev) => HostMount {
                        source: Some(cpath(dev)?),
                        target: cpath(&scratch)?,
                        fstype: Some(cstr("ext4")?),
                        flags: libc::MS_NODEV | libc::MS_NOSUID,
                        data: None,
                        mkdirs: Vec::new(),
                    },
                };
                let ro = HostMount {
                    source: Some(cpath(&image.device)?),
                    target: cpath(&lower)?,
                    fstype: Some(cstr(image.fstype)?),
                    flags: libc::MS_RDONLY | libc::MS_NODEV,
                    // ext4: never replay a journal into the image (that would write to it).
                    data: (image.fstype == "ext4")
                        .then(|| cstr("noload"))
                        .transpose()?,
                    mkdirs: vec![cpath(&lower)?],
                };
                let (overlay, merged) = overlay_mount(&lower, &scratch)?;
                (vec![writable, ro, overlay], merged)
            }
        })
    }

    /// Prepares `process` to run in namespaces of `init_pid` (exec into a running container),
    /// under the container's seccomp filters.
    pub fn for_exec(
        process: &oci_spec::runtime::Process,
        init_pid: i32,
    ) -> Result<Self, SpawnError> {
        let mut plan = Self::for_process(process)?;
        // Order matters: user-visible namespaces first, mount last (it changes /proc).
        for ns in ["ipc", "uts", "net", "pid", "cgroup", "mnt"] {
            let path = format!("/proc/{init_pid}/ns/{ns}");
            let fd = std::fs::File::open(&path).map_err(|source| SpawnError::Sys {
                what: "opening the container's namespaces",
                source,
            })?;
            plan.join.push(OwnedFd::from(fd));
        }
        plan.fork_after_join = true;
        plan.seccomp = super::seccomp::of_container(init_pid);
        Ok(plan)
    }

    fn for_process(p: &oci_spec::runtime::Process) -> Result<Self, SpawnError> {
        super::fields::refuse_unsupported_process(p)?;
        let args = p.args().clone().unwrap_or_default();
        let Some(arg0) = args.first() else {
            return Err(invalid("process.args is empty: give the program to run"));
        };
        let env = p.env().clone().unwrap_or_default();
        if args.len() > MAX_ARGS || env.len() > MAX_ENV {
            return Err(invalid(format!(
                "{} args and {} env entries: at most {MAX_ARGS} and {MAX_ENV}",
                args.len(),
                env.len()
            )));
        }
        let exec_candidates = if arg0.contains('/') {
            vec![cstr(arg0)?]
        } else {
            let path = env
                .iter()
                .find_map(|e| e.strip_prefix("PATH="))
                .unwrap_or("/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin");
            path.split(':')
                .filter(|d| !d.is_empty())
                .map(|d| cstr(format!("{d}/{arg0}")))
                .collect::<Result<_, _>>()?
        };
        let mut rlimits = Vec::new();
        for r in p.rlimits().iter().flatten() {
            let name = serde_json::to_value(r.typ())
                .ok()
                .and_then(|v| v.as_str().map(String::from))
                .unwrap_or_default();
            let res = rlimit_resource(&name).ok_or_else(|| {
                invalid(format!(
                    "rlimit {name} is unknown to this agent: remove it from process.rlimits"
                ))
            })?;
            if r.soft() > r.hard() {
                return Err(invalid(format!(
                    "rlimit {name}: soft limit {} above hard limit {}",
                    r.soft(),
                    r.hard()
                )));
            }
            rlimits.push((
                res,
                libc::rlimit {
                    rlim_cur: r.soft(),
                    rlim_max: r.hard(),
                },
            ));
        }
        let caps = match p.capabilities() {
            Some(c) => {
                let ambient = cap_mask(c.ambient())?;
                Some(Caps {
                    bounding: cap_mask(c.bounding())?,
                    effective: cap_mask(c.effective())?,
                    permitted: cap_mask(c.permitted())?,
                    inheritable: cap_mask(c.inheritable())?,
                    ambient: (0..64).filter(|b| ambient & (1 << b) != 0).collect(),
                })
            }
            None => None,
        };
        let user = p.user();
        let umask = match user.umask() {
            Some(m) if m > 0o777 => {
                return Err(invalid(format!(
                    "process.user.umask {m:#o} has bits beyond 0777: fix the spec"
                )))
            }
            m => m,
        };
        let console = p.console_size().as_ref().map(|b| libc::winsize {
            ws_row: u16::try_from(b.height()).unwrap_or(u16::MAX),
            ws_col: u16::try_from(b.width()).unwrap_or(u16::MAX),
            ws_xpixel: 0,
            ws_ypixel: 0,
        });
        Ok(Self {
            clone_flags: 0,
            rootfs: None,
            hostname: None,
            domainname: None,
            cgroupns: false,
            umask,
            console,
            rlimits,
            cwd: cpath(p.cwd())?,
            exec_candidates,
            argv: args.iter().map(cstr).collect::<Result<_, _>>()?,
            envp: env.iter().map(cstr).collect::<Result<_, _>>()?,
            uid: user.uid(),
            gid: user.gid(),
            groups: user.additional_gids().clone().unwrap_or_default(),
            caps,
            no_new_privs: p.no_new_privileges().unwrap_or(false),
            seccomp: None,
            join: Vec::new(),
            fork_after_join: false,
        })
    }
}

/// A real directory (see `real_dir`) whose path overlayfs options can carry (no `,` or `:`).
fn overlay_dir(p: &Path, what: &str) -> Result<PathBuf, SpawnError> {
    let p = real_dir(p, what)?;
    let bytes = p.as_os_str().as_encoded_bytes();
    if bytes.contains(&b',') || bytes.contains(&b':') {
        return Err(invalid(format!(
            "overlay path {} contains ',' or ':', which overlayfs options cannot carry: rename it",
            p.display()
        )));
    }
    Ok(p)
}

/// A fresh tmpfs at `target` (the writable layer of an overlay root).
fn tmpfs_mount(target: &Path) -> Result<HostMount, SpawnError> {
    Ok(HostMount {
        source: Some(cstr("tmpfs")?),
        target: cpath(target)?,
        fstype: Some(cstr("tmpfs")?),
        flags: 0,
        data: Some(cstr("mode=0755")?),
        mkdirs: Vec::new(),
    })
}

/// The overlay of `lower` with `scratch/upper` (work dir `scratch/work`) at `scratch/merged`,
/// and that mount point.
fn overlay_mount(lower: &Path, scratch: &Path) -> Result<(HostMount, PathBuf), SpawnError> {
    let merged = scratch.join("merged");
    let (upper, work) = (scratch.join("upper"), scratch.join("work"));
    let mount = HostMount {
        source: Some(cstr("overlay")?),
        target: cpath(&merged)?,
        fstype: Some(cstr("overlay")?),
        flags: 0,
        data: Some(cstr(format!(
            "lowerdir={},upperdir={},workdir={}",
            lower.display(),
            upper.display(),
            work.display()
        ))?),
        mkdirs: vec![cpath(&upper)?, cpath(&work)?, cpath(&merged)?],
    };
    Ok((mount, merged))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec_with_process(f: impl FnOnce(&mut oci_spec::runtime::Process)) -> Spec {
        let mut s = Spec::default();
        let mut p = s.process().clone().unwrap();
        p.set_args(Some(vec!["sh".into()]));
        f(&mut p);
        s.set_process(Some(p));
        s
    }

    fn bind_root() -> (tempfile::TempDir, RootfsSource) {
        let d = tempfile::tempdir().unwrap();
        let src = RootfsSource::Bind {
            path: d.path().display().to_string(),
        };
        (d, src)
    }

    #[test]
    fn default_spec_plans_mounts_capabilities_and_rlimits() {
        let (d, src) = bind_root();
        let (plan, root) =
            Plan::for_container(&spec_with_process(|_| {}), &src, Path::new("/x")).unwrap();
        assert_eq!(root, std::fs::canonicalize(d.path()).unwrap());
        let caps = plan.caps.as_ref().unwrap();
        let want = (1 << 5) | (1 << 10) | (1 << 29);
        assert_eq!((caps.bounding, caps.effective), (want, want));
        assert_eq!(plan.rlimits.len(), 1);
        assert_eq!(plan.rlimits[0].0, libc::RLIMIT_NOFILE as libc::c_int);
        let r = plan.rootfs.as_ref().unwrap();
        let dests: Vec<String> = r
            .mounts
            .iter()
            .map(|m| m.target.prefixes.last().unwrap().to_str().unwrap().into())
            .collect();
        assert!(dests.contains(&"proc".to_string()), "{dests:?}");
        assert!(dests.contains(&"dev/null".to_string()), "{dests:?}");
        assert!(!dests.iter().any(|d| d.contains("cgroup")), "{dests:?}");
        assert!(r.masked.iter().any(|p| p.to_str() == Ok("/proc/keys")));
        assert!(r
            .readonly_paths
            .iter()
            .any(|p| p.to_str() == Ok("/proc/sys")));
        let sys = r
            .mounts
            .iter()
            .find(|m| m.target.prefixes.last().unwrap().to_str() == Ok("sys"))
            .unwrap();
        assert_ne!(sys.flags & libc::MS_RDONLY, 0, "sysfs is mounted ro");
    }

    fn targets(plan: &Plan) -> Vec<String> {
        let r = plan.rootfs.as_ref().unwrap();
        r.mounts
            .iter()
            .map(|m| m.target.prefixes.last().unwrap().to_str().unwrap().into())
            .collect()
    }

    #[test]
    fn cgroup_mounts_wait_for_the_cgroup_and_keep_their_place() {
        let (_d, src) = bind_root();
        let s = spec_with_process(|_| {});
        for (cg, want) in [
            (
                crate::cgroup::Cgroup::V2("/sys/fs/cgroup/g/c".into()),
                vec!["sys/fs/cgroup"],
            ),
            (
                crate::cgroup::Cgroup::V1 {
                    memory: "/sys/fs/cgroup/memory/g/c".into(),
                    pids: "/sys/fs/cgroup/pids/g/c".into(),
                    cpu: "/sys/fs/cgroup/cpu/g/c".into(),
                    freezer: "/sys/fs/cgroup/freezer/g/c".into(),
                    devices: None,
                },
                vec![
                    "sys/fs/cgroup",
                    "sys/fs/cgroup/memory",
                    "sys/fs/cgroup/pids",
                    "sys/fs/cgroup/cpu",
                    "sys/fs/cgroup/freezer",
                    "sys/fs/cgroup",
                ],
            ),
        ] {
            let (mut plan, _) = Plan::for_container(&s, &src, Path::new("/x")).unwrap();
            assert!(plan.needs_cgroup());
            let before = targets(&plan);
            plan.bind_cgroup(&cg).unwrap();
            assert!(!plan.needs_cgroup());
            let after = targets(&plan);
            // The default spec's cgroup mount is its last one, after /sys.
            let sys = before.iter().position(|t| t == "sys").unwrap();
            assert_eq!(after[..=sys], before[..=sys]);
            assert_eq!(after[sys + 1..sys + 1 + want.len()], want[..], "{cg:?}");
            let r = plan.rootfs.as_ref().unwrap();
            let first = &r.mounts[sys + 1];
            let ro = first.remount.unwrap_or(first.flags);
            if matches!(cg, crate::cgroup::Cgroup::V2(_)) {
                assert_eq!(first.flags, libc::MS_BIND);
                assert_ne!(ro & libc::MS_RDONLY, 0, "read-only by default");
            } else {
                let last = &r.mounts[sys + want.len()];
                assert_ne!(last.flags & libc::MS_REMOUNT, 0);
                assert_ne!(last.flags & libc::MS_RDONLY, 0);
            }
        }
    }

    #[test]
    fn kernel_file_systems_are_read_from_proc() {
        assert!(kernel_has_fs("proc") && kernel_has_fs("tmpfs"));
        assert!(!kernel_has_fs("nodev") && !kernel_has_fs("no-such-fs"));
    }

    #[test]
    fn bind_mount_options_become_a_remount() {
        let (_d, src) = bind_root();
        let mut s = spec_with_process(|_| {});
        let host = tempfile::tempdir().unwrap();
        s.set_mounts(Some(vec![oci_spec::runtime::MountBuilder::default()
            .destination("/host")
            .typ("bind")
            .source(host.path())
            .options(vec!["rbind".into(), "ro".into(), "nosuid".into()])
            .build()
            .unwrap()]));
        let (plan, _) = Plan::for_container(&s, &src, Path::new("/x")).unwrap();
        let m = &plan.rootfs.unwrap().mounts[0];
        assert_eq!(m.flags, libc::MS_BIND | libc::MS_REC);
        assert_eq!(m.remount, Some(libc::MS_RDONLY | libc::MS_NOSUID));
        assert!(m.fstype.is_none() && !m.file);
    }

    #[test]
    fn bad_specs_are_refused() {
        let (_d, src) = bind_root();
        let scratch = Path::new("/x");
        let refuse = |s: Spec, what: &str| {
            let e = Plan::for_container(&s, &src, scratch).err().unwrap();
            assert!(e.to_string().contains(what), "{e}");
        };
        refuse(
            spec_with_process(|p| {
                p.set_args(Some(vec![]));
            }),
            "process.args is empty",
        );
        let mut s = spec_with_process(|_| {});
        s.set_mounts(Some(vec![oci_spec::runtime::MountBuilder::default()
            .destination("../../etc")
            .typ("tmpfs")
            .build()
            .unwrap()]));
        refuse(s, "escapes");
        let mut s = spec_with_process(|_| {});
        let mut l = s.linux().clone().unwrap();
        l.set_masked_paths(Some(vec!["proc/keys".into()]));
        s.set_linux(Some(l));
        refuse(s, "not an absolute path");
        let mut v = serde_json::to_value(spec_with_process(|_| {})).unwrap();
        v["process"]["rlimits"] =
            serde_json::json!([{"type": "RLIMIT_NOFILE", "soft": 10, "hard": 5}]);
        refuse(serde_json::from_value(v).unwrap(), "above hard limit");
        let s = spec_with_process(|p| {
            p.set_args(Some(vec!["a\0b".into()]));
        });
        refuse(s, "NUL byte");
    }

    /// A spec (as JSON) that either does not parse or that the plan builder refuses naming `what`.
    fn refused(v: serde_json::Value, what: &str) {
        match serde_json::from_value::<Spec>(v) {
            // oci-spec parses only names it knows: the protocol layer already refuses the spec.
            Err(e) => assert!(!e.to_string().is_empty()),
            Ok(s) => {
                let e = Plan::for_container(&s, &bind_root().1, Path::new("/x"))
                    .err()
                    .unwrap();
                assert!(e.to_string().contains(what), "{e}");
            }
        }
    }

    #[test]
    fn unknown_capabilities_and_rlimits_are_refused() {
        let mut v = serde_json::to_value(spec_with_process(|_| {})).unwrap();
        v["process"]["capabilities"]["bounding"] = serde_json::json!(["CAP_KILL", "CAP_FLY"]);
        refused(v, "CAP_FLY");
        let mut v = serde_json::to_value(spec_with_process(|_| {})).unwrap();
        v["process"]["rlimits"] =
            serde_json::json!([{"type": "RLIMIT_TURBO", "soft": 1, "hard": 1}]);
        refused(v, "RLIMIT_TURBO");
    }

    /// An image root mounts the writable layer, the image read-only on `lower/`, then the
    /// overlay on `merged/`, which becomes the root.
    #[test]
    fn image_roots_mount_writable_then_image_then_overlay() {
        let scratch = tempfile::tempdir().unwrap();
        let s = spec_with_process(|_| {});
        let src = RootfsSource::Image {
            path: "/i.erofs".into(),
            fstype: "erofs".into(),
            writable: protocol::Writable::Tmpfs,
        };
        let e = Plan::for_container(&s, &src, scratch.path()).err().unwrap();
        assert!(e.to_string().contains("needs its block device"), "{e}");
        for scratch_device in [None, Some(PathBuf::from("/dev/vdb"))] {
            let image = ImageRoot {
                device: "/dev/loop7".into(),
                fstype: "erofs",
                scratch_device: scratch_device.clone(),
            };
            let (setup, root) = Plan::root_mounts(&src, scratch.path(), Some(&image)).unwrap();
            let real = std::fs::canonicalize(scratch.path()).unwrap();
            assert_eq!(root, real.join("merged"));
            let fstypes: Vec<_> = setup
                .iter()
                .map(|m| m.fstype.as_ref().unwrap().to_str().unwrap().to_string())
                .collect();
            let first = if scratch_device.is_some() {
                "ext4"
            } else {
                "tmpfs"
            };
            assert_eq!(fstypes, [first, "erofs", "overlay"]);
            assert_eq!(
                setup[1].source.as_ref().unwrap().to_str().unwrap(),
                "/dev/loop7"
            );
            assert_ne!(setup[1].flags & libc::MS_RDONLY, 0);
        }
    }

    #[test]
    fn symlinked_root_file_systems_are_refused() {
        let d = tempfile::tempdir().unwrap();
        let link = d.path().join("rootfs");
        std::os::unix::fs::symlink("/", &link).unwrap();
        let s = spec_with_process(|_| {});
        let e = Plan::for_container(
            &s,
            &RootfsSource::Bind {
                path: link.display().to_string(),
            },
            Path::new("/x"),
        )
        .err()
        .unwrap();
        assert!(e.to_string().contains("symbolic link"), "{e}");
        let e = Plan::for_container(
            &s,
            &RootfsSource::Overlay {
                lower: link.display().to_string(),
            },
            d.path(),
        )
        .err()
        .unwrap();
        assert!(e.to_string().contains("symbolic link"), "{e}");
    }
}
