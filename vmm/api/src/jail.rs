//! The jail `runv-vmm --jail` puts itself in, as its spawner sees it: the flags that ask for it
//! ([`JailSpec::args`]), its cgroup ([`Cgroup`]) and the host-side clean-up ([`cleanup`]) that a
//! spawner runs after the VMM is gone on any path, `kill -9` included.
//!
//! Paths are mapped one to one: every file the jailed VMM uses exists at the same path inside
//! the jail as on the host (bind mounts of exactly those files and directories), so the paths a
//! spawner sends over the control API need no translation, and a path that was not bound in is
//! simply absent inside the jail.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The pool's default jail uid and gid: one unprivileged id for every jailed VMM (each is alone
/// in its own pid, mount and ipc namespaces, so it cannot see or signal the others).
pub const DEFAULT_JAIL_ID: u32 = 47_000;
/// The cgroup directory (in each hierarchy) that holds one child per jailed VMM.
pub const CGROUP_PARENT: &str = "runv";
/// Default pids limit of a jailed VMM (threads count: vCPUs, device loop, page server...).
pub const DEFAULT_PIDS_MAX: u64 = 64;
/// Memory a jailed VMM may use beyond its guest RAM (page tables, buffers, the VMM itself).
pub const MEMORY_OVERHEAD_MIB: u64 = 128;

/// How to jail one `runv-vmm`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JailSpec {
    /// The jail's root directory on the host (created if missing; a fresh tmpfs is mounted on
    /// it inside the jail, so nothing the jail makes stays there); removed by [`cleanup`].
    pub root: PathBuf,
    /// The jail's name: its cgroup is `<hierarchy>/runv/<id>`.
    pub id: String,
    /// Unprivileged uid the VMM runs as.
    pub uid: u32,
    /// Unprivileged gid the VMM runs as.
    pub gid: u32,
    /// Files or directories bound read-only at the same path (kernel, initrd, snapshot dir).
    pub read_only: Vec<PathBuf>,
    /// Directories bound read-write at the same path (where its sockets and logs go); they
    /// should be owned by `uid`.
    pub read_write: Vec<PathBuf>,
    /// Memory limit in MiB (guest RAM + overhead).
    pub mem_mib: u64,
    /// pids (tasks) limit.
    pub pids_max: u64,
}

impl JailSpec {
    /// The `runv-vmm` flags that ask for this jail.
    pub fn args(&self) -> Vec<String> {
        let mut a = vec![
            "--jail".to_string(),
            self.root.display().to_string(),
            "--jail-id".into(),
            self.id.clone(),
            "--jail-uid".into(),
            self.uid.to_string(),
            "--jail-gid".into(),
            self.gid.to_string(),
            "--jail-mem-mib".into(),
            self.mem_mib.to_string(),
            "--jail-pids".into(),
            self.pids_max.to_string(),
        ];
        for p in &self.read_only {
            a.push("--jail-ro".into());
            a.push(p.display().to_string());
        }
        for p in &self.read_write {
            a.push("--jail-rw".into());
            a.push(p.display().to_string());
        }
        a
    }
}

/// Error creating or removing a jail's cgroup or directory.
#[derive(Debug, thiserror::Error)]
#[error("{what} {path}: {source}")]
pub struct JailError {
    /// What was being done.
    pub what: &'static str,
    /// The file or directory.
    pub path: PathBuf,
    /// Cause.
    pub source: std::io::Error,
}

fn err(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> JailError {
    let path = path.to_path_buf();
    move |source| JailError { what, path, source }
}

/// A jail's cgroup: one directory per controller hierarchy (cgroup v1: `memory` and `pids`;
/// v2: one unified directory).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cgroup {
    /// The directories, each `<hierarchy>/runv/<id>`.
    pub dirs: Vec<PathBuf>,
    /// Whether this is the unified (v2) hierarchy.
    pub v2: bool,
}

impl Cgroup {
    /// The cgroup of jail `id` under `/sys/fs/cgroup` (v2 when it is a unified mount).
    pub fn of(id: &str) -> Self {
        Self::under(Path::new("/sys/fs/cgroup"), id)
    }

    /// The cgroup of jail `id` under the cgroup mount `root`.
    pub fn under(root: &Path, id: &str) -> Self {
        if root.join("cgroup.controllers").exists() {
            Self {
                dirs: vec![root.join(CGROUP_PARENT).join(id)],
                v2: true,
            }
        } else {
            Self {
                dirs: ["memory", "pids"]
                    .iter()
                    .map(|c| root.join(c).join(CGROUP_PARENT).join(id))
                    .collect(),
                v2: false,
            }
        }
    }

    /// Creates the cgroup with its limits (memory without swap, pids).
    pub fn create(&self, mem_mib: u64, pids_max: u64) -> Result<(), JailError> {
        let bytes = (mem_mib << 20).to_string();
        if self.v2 {
            let dir = &self.dirs[0];
            let parent = dir.parent().unwrap_or(dir);
            std::fs::create_dir_all(parent).map_err(err("creating cgroup", parent))?;
            // Children of the root and of runv/ get the two controllers.
            for p in [parent.parent().unwrap_or(parent), parent] {
                let ctl = p.join("cgroup.subtree_control");
                write(&ctl, "+memory +pids")?;
            }
            std::fs::create_dir(dir).map_err(err("creating cgroup", dir))?;
            write(&dir.join("memory.max"), &bytes)?;
            // Absent when the kernel has no swap accounting.
            let _ = std::fs::write(dir.join("memory.swap.max"), "0");
            write(&dir.join("pids.max"), &pids_max.to_string())?;
        } else {
            for dir in &self.dirs {
                std::fs::create_dir_all(dir).map_err(err("creating cgroup", dir))?;
            }
            let mem = &self.dirs[0];
            write(&mem.join("memory.limit_in_bytes"), &bytes)?;
            // Absent without swap accounting: then memory.limit_in_bytes bounds it alone.
            let _ = std::fs::write(mem.join("memory.memsw.limit_in_bytes"), &bytes);
            write(&self.dirs[1].join("pids.max"), &pids_max.to_string())?;
        }
        Ok(())
    }

    /// Moves process `pid` into the cgroup.
    pub fn add(&self, pid: u32) -> Result<(), JailError> {
        for dir in &self.dirs {
            write(&dir.join("cgroup.procs"), &pid.to_string())?;
        }
        Ok(())
    }

    /// The processes in the cgroup (empty when it does not exist).
    pub fn procs(&self) -> Vec<u32> {
        let mut out: Vec<u32> = self
            .dirs
            .iter()
            .filter_map(|d| std::fs::read_to_string(d.join("cgroup.procs")).ok())
            .flat_map(|s| {
                s.lines()
                    .filter_map(|l| l.trim().parse().ok())
                    .collect::<Vec<u32>>()
            })
            .collect();
        out.sort_unstable();
        out.dedup();
        out
    }

    /// Whether any of its directories exists.
    pub fn exists(&self) -> bool {
        self.dirs.iter().any(|d| d.exists())
    }

    /// Removes the cgroup, waiting up to `wait` for its processes to be gone (a killed VMM
    /// leaves it a moment after it is reaped).
    pub fn remove(&self, wait: Duration) -> Result<(), JailError> {
        let deadline = Instant::now() + wait;
        for dir in &self.dirs {
            loop {
                match std::fs::remove_dir(dir) {
                    Ok(()) => break,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => break,
                    Err(e) if Instant::now() < deadline => {
                        let _ = e;
                        std::thread::sleep(Duration::from_millis(5));
                    }
                    Err(e) => return Err(err("removing cgroup", dir)(e)),
                }
            }
        }
        Ok(())
    }
}

fn write(path: &Path, value: &str) -> Result<(), JailError> {
    std::fs::write(path, value).map_err(err("writing", path))
}

/// Removes what jail `id` rooted at `root` leaves on the host once its VMM is gone: the cgroup
/// (waiting up to a second for a killed VMM to leave it) and the root directory (empty on the
/// host: the jail's mounts live in its own mount namespace and vanish with it). Idempotent.
pub fn cleanup(root: &Path, id: &str) -> Result<(), JailError> {
    let cg = Cgroup::of(id);
    let r = cg.remove(Duration::from_secs(1));
    match std::fs::remove_dir(root) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(err("removing jail root", root)(e)),
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn args_name_every_part_of_the_spec() {
        let s = JailSpec {
            root: "/run/j".into(),
            id: "vm-1".into(),
            uid: 5,
            gid: 6,
            read_only: vec!["/snap".into()],
            read_write: vec!["/run/x".into()],
            mem_mib: 256,
            pids_max: 32,
        };
        let a = s.args().join(" ");
        assert_eq!(
            a,
            "--jail /run/j --jail-id vm-1 --jail-uid 5 --jail-gid 6 --jail-mem-mib 256 \
             --jail-pids 32 --jail-ro /snap --jail-rw /run/x"
        );
    }

    #[test]
    fn cgroup_layout_follows_the_mounted_hierarchy() {
        let d = tempfile::tempdir().unwrap();
        let v1 = Cgroup::under(d.path(), "a");
        assert!(!v1.v2);
        assert_eq!(v1.dirs[0], d.path().join("memory/runv/a"));
        assert_eq!(v1.dirs[1], d.path().join("pids/runv/a"));
        std::fs::write(d.path().join("cgroup.controllers"), "memory pids").unwrap();
        let v2 = Cgroup::under(d.path(), "a");
        assert!(v2.v2);
        assert_eq!(v2.dirs, vec![d.path().join("runv/a")]);
    }
}
