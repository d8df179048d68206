//! Per-container cgroups: v2 (what the agent mounts in a guest) or, on hybrid hosts whose
//! controllers are bound to v1 hierarchies, the v1 memory, pids and cpu controllers, and the
//! v1 devices controller when the spec has device rules ([`crate::devices`]).

use std::path::{Path, PathBuf};

use crate::devices::DeviceRule;

/// Limits from the OCI spec's `linux.resources`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Limits {
    /// Memory limit, bytes.
    pub memory: Option<i64>,
    /// Maximum processes.
    pub pids: Option<i64>,
    /// CPU quota and period, microseconds.
    pub cpu: Option<(i64, u64)>,
    /// Device rules, in order (empty: none).
    pub devices: Vec<DeviceRule>,
}

impl Limits {
    /// Reads the limits of `spec`; device rules the agent cannot apply are refused.
    pub fn from_spec(spec: &oci_spec::runtime::Spec) -> Result<Self, CgroupError> {
        let devices = crate::devices::rules_from_spec(spec)
            .map_err(|e| CgroupError::Unsupported(e.to_string()))?;
        let Some(r) = spec.linux().as_ref().and_then(|l| l.resources().as_ref()) else {
            return Ok(Self::default());
        };
        Ok(Self {
            memory: r
                .memory()
                .as_ref()
                .and_then(|m| m.limit())
                .filter(|&l| l > 0),
            pids: r.pids().as_ref().map(|p| p.limit()).filter(|&l| l > 0),
            cpu: r
                .cpu()
                .as_ref()
                .and_then(|c| match (c.quota(), c.period()) {
                    (Some(q), p) if q > 0 => Some((q, p.unwrap_or(100_000))),
                    _ => None,
                }),
            devices,
        })
    }
}

/// The cgroup(s) of one container.
#[derive(Debug)]
pub enum Cgroup {
    /// A directory in the unified hierarchy.
    V2(PathBuf),
    /// One directory per v1 controller: memory, pids, cpu, freezer (and devices with device
    /// rules).
    V1 {
        /// memory controller directory.
        memory: PathBuf,
        /// pids controller directory.
        pids: PathBuf,
        /// cpu controller directory.
        cpu: PathBuf,
        /// freezer controller directory (`pause`/`resume`).
        freezer: PathBuf,
        /// devices controller directory, when the spec has device rules.
        devices: Option<PathBuf>,
    },
}

/// Error creating or using a cgroup.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    /// A cgroupfs operation failed.
    #[error("cgroup {path}: {what}: {source} (is cgroupfs mounted and writable by the agent?)")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The operation.
        what: &'static str,
        /// Cause.
        source: std::io::Error,
    },
    /// The spec asks for something this host's cgroups cannot enforce.
    #[error("{0}")]
    Unsupported(String),
    /// The kernel did not finish freezing or thawing in time.
    #[error("cgroup {0}: still {1} after 5 s (a process stuck in the kernel?); try again")]
    FreezeTimeout(PathBuf, String),
}

fn write(path: &Path, file: &str, value: &str) -> Result<(), CgroupError> {
    std::fs::write(path.join(file), value).map_err(|source| CgroupError::Io {
        path: path.join(file),
        what: "write",
        source,
    })
}

fn read_u64(path: &Path, file: &str) -> u64 {
    std::fs::read_to_string(path.join(file))
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

fn read_key(path: &Path, file: &str, key: &str) -> u64 {
    std::fs::read_to_string(path.join(file))
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| {
                let (k, v) = l.split_once(' ')?;
                (k == key).then(|| v.trim().parse().ok())?
            })
        })
        .unwrap_or(0)
}

/// Where cgroups live: `root` is the cgroupfs mount (`/sys/fs/cgroup`), `group` our parent group.
#[derive(Debug, Clone)]
pub struct CgroupRoot {
    root: PathBuf,
    group: String,
    v2: bool,
}

impl CgroupRoot {
    /// Detects the layout under `root`.
    pub fn detect(root: &Path, group: &str) -> Self {
        Self {
            root: root.to_path_buf(),
            group: group.to_string(),
            v2: root.join("cgroup.controllers").exists(),
        }
    }

    /// Removes the (empty) parent group; a group still holding containers stays.
    pub fn remove_parent(&self) {
        let dirs = if self.v2 {
            vec![self.root.join(&self.group)]
        } else {
            ["memory", "pids", "cpu", "freezer", "devices"]
                .iter()
                .map(|c| self.root.join(c).join(&self.group))
                .collect()
        };
        for d in dirs {
            let _ = std::fs::remove_dir(d);
        }
    }

    /// Creates the cgroup of container `id` with `limits`.
    pub fn create(&self, id: &str, limits: &Limits) -> Result<Cgroup, CgroupError> {
        let mk = |p: &Path| {
            std::fs::create_dir_all(p).map_err(|source| CgroupError::Io {
                path: p.to_path_buf(),
                what: "mkdir",
                source,
            })
        };
        if self.v2
            && !limits.devices.is_empty()
            && !crate::devices::is_default_policy(&limits.devices)
        {
            return Err(CgroupError::Unsupported(
                "linux.resources.devices: this host has cgroup v2 only, where device rules need an eBPF program the agent does not build; only the default policy (deny all but the standard devices) is accepted: remove the other rules".into(),
            ));
        }
        let cg = if self.v2 {
            let parent = self.root.join(&self.group);
            mk(&parent)?;
            // Delegate the controllers we set to our children (both levels).
            let _ = write(&self.root, "cgroup.subtree_control", "+memory +pids +cpu");
            let _ = write(&parent, "cgroup.subtree_control", "+memory +pids +cpu");
            let dir = parent.join(id);
            mk(&dir)?;
            Cgroup::V2(dir)
        } else {
            let at = |c: &str| self.root.join(c).join(&self.group).join(id);
            let cg = Cgroup::V1 {
                memory: at("memory"),
                pids: at("pids"),
                cpu: at("cpu"),
                freezer: at("freezer"),
                devices: (!limits.devices.is_empty()).then(|| at("devices")),
            };
            for d in cg.dirs() {
                mk(d)?;
            }
            cg
        };
        if let Err(e) = cg.apply(limits) {
            cg.remove();
            return Err(e);
        }
        Ok(cg)
    }
}

impl Cgroup {
    /// The directory of a v2 cgroup; None on v1.
    pub fn unified_dir(&self) -> Option<&Path> {
        match self {
            Cgroup::V2(d) => Some(d),
            Cgroup::V1 { .. } => None,
        }
    }

    /// The v1 controllers' directories, by controller name; None on v2.
    pub fn controller_dirs(&self) -> Option<Vec<(&'static str, &Path)>> {
        match self {
            Cgroup::V2(_) => None,
            Cgroup::V1 {
                memory,
                pids,
                cpu,
                freezer,
                devices,
            } => {
                let mut v: Vec<(&'static str, &Path)> = vec![
                    ("memory", memory),
                    ("pids", pids),
                    ("cpu", cpu),
                    ("freezer", freezer),
                ];
                v.extend(devices.as_deref().map(|d| ("devices", d)));
                Some(v)
            }
        }
    }

    fn dirs(&self) -> Vec<&Path> {
        match self {
            Cgroup::V2(d) => vec![d],
            Cgroup::V1 {
                memory,
                pids,
                cpu,
                freezer,
                devices,
            } => {
                let mut v: Vec<&Path> = vec![memory, pids, cpu, freezer];
                v.extend(devices.as_deref());
                v
            }
        }
    }

    /// Sets the memory, pids and cpu limits of `l` that are present (`runv update`); device
    /// rules are not changed.
    pub fn update(&self, l: &Limits) -> Result<(), CgroupError> {
        self.apply(&Limits {
            devices: Vec::new(),
            ..l.clone()
        })
    }

    fn apply(&self, l: &Limits) -> Result<(), CgroupError> {
        match self {
            Cgroup::V2(d) => {
                if let Some(m) = l.memory {
                    write(d, "memory.max", &m.to_string())?;
                    let _ = write(d, "memory.swap.max", "0");
                }
                if let Some(p) = l.pids {
                    write(d, "pids.max", &p.to_string())?;
                }
                if let Some((q, p)) = l.cpu {
                    write(d, "cpu.max", &format!("{q} {p}"))?;
                }
            }
            Cgroup::V1 {
                memory,
                pids,
                cpu,
                devices,
                ..
            } => {
                if let Some(d) = devices {
                    // In order, as runc: the spec's rules, then the default allowed devices.
                    for r in &l.devices {
                        write(d, r.file(), &r.line())?;
                    }
                }
                if let Some(m) = l.memory {
                    write(memory, "memory.limit_in_bytes", &m.to_string())?;
                    let _ = write(memory, "memory.memsw.limit_in_bytes", &m.to_string());
                }
                if let Some(p) = l.pids {
                    write(pids, "pids.max", &p.to_string())?;
                }
                if let Some((q, p)) = l.cpu {
                    write(cpu, "cpu.cfs_period_us", &p.to_string())?;
                    write(cpu, "cpu.cfs_quota_us", &q.to_string())?;
                }
            }
        }
        Ok(())
    }

    /// Moves `pid` into the cgroup.
    pub fn add(&self, pid: i32) -> Result<(), CgroupError> {
        let file = if matches!(self, Cgroup::V2(_)) {
            "cgroup.procs"
        } else {
            "tasks"
        };
        for d in self.dirs() {
            write(d, file, &pid.to_string())?;
        }
        Ok(())
    }

    /// Pids in the cgroup.
    pub fn pids(&self) -> Vec<i32> {
        let d = self.dirs()[0];
        std::fs::read_to_string(d.join("cgroup.procs"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect()
    }

    /// OOM kills so far.
    pub fn oom_kills(&self) -> u64 {
        match self {
            Cgroup::V2(d) => read_key(d, "memory.events", "oom_kill"),
            Cgroup::V1 { memory, .. } => read_key(memory, "memory.oom_control", "oom_kill"),
        }
    }

    /// Usage: memory bytes, memory limit, pids, CPU microseconds.
    pub fn usage(&self) -> (u64, Option<u64>, u64, u64) {
        match self {
            Cgroup::V2(d) => (
                read_u64(d, "memory.current"),
                std::fs::read_to_string(d.join("memory.max"))
                    .ok()
                    .and_then(|s| s.trim().parse().ok()),
                read_u64(d, "pids.current"),
                read_key(d, "cpu.stat", "usage_usec"),
            ),
            Cgroup::V1 {
                memory, pids, cpu, ..
            } => {
                let limit = read_u64(memory, "memory.limit_in_bytes");
                (
                    read_u64(memory, "memory.usage_in_bytes"),
                    (limit < (1 << 62)).then_some(limit),
                    read_u64(pids, "pids.current"),
                    read_u64(cpu, "cpuacct.usage") / 1000,
                )
            }
        }
    }

    /// Freezes (`true`) or thaws every process in the cgroup, and waits until the kernel says
    /// it is done (v1 `freezer.state` leaves `FREEZING`; v2 `cgroup.events` shows `frozen`);
    /// a freeze that does not complete within 5 s is undone and reported.
    pub fn freeze(&self, on: bool) -> Result<(), CgroupError> {
        let (dir, file, want) = match self {
            Cgroup::V2(d) => (d, "cgroup.freeze", if on { "1" } else { "0" }),
            Cgroup::V1 { freezer, .. } => (
                freezer,
                "freezer.state",
                if on { "FROZEN" } else { "THAWED" },
            ),
        };
        write(dir, file, want)?;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        loop {
            let done = match self {
                Cgroup::V2(d) => read_key(d, "cgroup.events", "frozen") == u64::from(on),
                Cgroup::V1 { freezer, .. } => {
                    std::fs::read_to_string(freezer.join(file)).is_ok_and(|s| s.trim() == want)
                }
            };
            if done {
                return Ok(());
            }
            if std::time::Instant::now() >= deadline {
                if on {
                    let _ = self.freeze(false);
                }
                let what = if on { "freezing" } else { "thawing" };
                return Err(CgroupError::FreezeTimeout(dir.join(file), what.into()));
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }

    /// SIGKILLs every process in the cgroup until it is empty (bounded), then removes it.
    /// Frozen processes are thawed first: they could not die.
    pub fn kill_all_and_remove(&self) {
        for _ in 0..200 {
            let pids = self.pids();
            if pids.is_empty() {
                break;
            }
            for p in pids {
                // SAFETY: kill(2) with a pid read from our own cgroup; ESRCH is harmless.
                unsafe { libc::kill(p, libc::SIGKILL) };
            }
            // After the signals, so nothing frozen runs on before it is killed.
            let _ = self.freeze(false);
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        self.remove();
    }

    /// Removes the cgroup directories (they must be empty of processes).
    pub fn remove(&self) {
        for d in self.dirs() {
            for _ in 0..100 {
                match std::fs::remove_dir(d) {
                    Ok(()) => break,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => break,
                    Err(_) => std::thread::sleep(std::time::Duration::from_millis(2)),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(devices: serde_json::Value) -> Limits {
        let mut v = serde_json::to_value(oci_spec::runtime::Spec::default()).unwrap();
        v["linux"]["resources"]["devices"] = devices;
        Limits::from_spec(&serde_json::from_value(v).unwrap()).unwrap()
    }

    #[test]
    fn v2_refuses_device_rules_beyond_the_default_policy() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("cgroup.controllers"), "memory pids cpu\n").unwrap();
        let root = CgroupRoot::detect(d.path(), "g");
        let l = limits(serde_json::json!([
            {"allow": false, "access": "rwm"},
            {"allow": true, "type": "c", "major": 10, "minor": 229, "access": "rwm"}
        ]));
        let e = root.create("c1", &l).unwrap_err();
        assert!(
            matches!(&e, CgroupError::Unsupported(m) if m.contains("cgroup v2")),
            "{e}"
        );
        assert!(!d.path().join("g").exists(), "nothing created");
        // runc's default (deny all + the standard devices) is accepted.
        let l = limits(serde_json::json!([{"allow": false, "access": "rwm"}]));
        assert!(root.create("c2", &l).is_ok());
    }

    #[test]
    fn invalid_device_rules_are_refused_when_reading_the_spec() {
        let mut v = serde_json::to_value(oci_spec::runtime::Spec::default()).unwrap();
        v["linux"]["resources"]["devices"] =
            serde_json::json!([{"allow": true, "type": "c", "access": "rwx"}]);
        let e = Limits::from_spec(&serde_json::from_value(v).unwrap()).unwrap_err();
        assert!(e.to_string().contains("access"), "{e}");
    }
}
