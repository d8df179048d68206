//! The per-container state directory `<root>/<id>/`: `state.json` (what `create` and the monitor
//! record), the agent's socket and scratch directory.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Error reading or writing container state.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// The id is in use under this root.
    #[error("container {0} already exists (pick another id or `runv delete {0}`)")]
    Exists(String),
    /// No such container.
    #[error("container {0} does not exist (see `runv list`)")]
    NotFound(String),
    /// A file system operation failed.
    #[error("{0}: {1} (check --root and its permissions)")]
    Io(PathBuf, std::io::Error),
    /// `state.json` is damaged.
    #[error("{0}: damaged state file: {1} (`runv delete --force` removes the container)")]
    Corrupt(PathBuf, serde_json::Error),
}

/// What runv records about a container.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Record {
    /// Container id.
    pub id: String,
    /// Absolute bundle directory.
    pub bundle: PathBuf,
    /// Absolute root file system.
    pub rootfs: PathBuf,
    /// Creation time (RFC 3339, UTC).
    pub created: String,
    /// Sandbox backend (`host` or `vm`).
    pub sandbox: String,
    /// The monitor process (0 until it runs).
    pub monitor_pid: i32,
    /// The sandbox's agent process on the host (0 when none).
    pub agent_pid: i32,
    /// The container's init process as the agent reports it (0 until created).
    pub init_pid: i32,
    /// `runv start` has run.
    pub started: bool,
    /// The init process's exit status (code, or 128 + signal) once it ended.
    pub exit: Option<i32>,
    /// The spec's annotations plus runv's own.
    pub annotations: BTreeMap<String, String>,
    /// `runv pause` froze it (the vm backend: its vCPUs are parked).
    #[serde(default)]
    pub paused: bool,
}

/// A container's directory under `--root`.
#[derive(Debug, Clone)]
pub struct ContainerDir {
    /// `<root>/<id>`.
    pub path: PathBuf,
    /// The id.
    pub id: String,
}

impl ContainerDir {
    /// The directory of `id` (not checked for existence).
    pub fn new(root: &Path, id: &str) -> Self {
        Self {
            path: root.join(id),
            id: id.into(),
        }
    }

    /// Creates the directory; fails when the id is taken.
    pub fn create(root: &Path, id: &str) -> Result<Self, StateError> {
        std::fs::create_dir_all(root).map_err(|e| StateError::Io(root.into(), e))?;
        let d = Self::new(root, id);
        match std::fs::create_dir(&d.path) {
            Ok(()) => Ok(d),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                Err(StateError::Exists(id.into()))
            }
            Err(e) => Err(StateError::Io(d.path, e)),
        }
    }

    /// The agent's socket.
    pub fn agent_socket(&self) -> PathBuf {
        self.path.join("agent.sock")
    }

    fn state_file(&self) -> PathBuf {
        self.path.join("state.json")
    }

    /// Reads `state.json`.
    pub fn load(&self) -> Result<Record, StateError> {
        let f = self.state_file();
        let text = match std::fs::read(&f) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(StateError::NotFound(self.id.clone()))
            }
            Err(e) => return Err(StateError::Io(f, e)),
        };
        serde_json::from_slice(&text).map_err(|e| StateError::Corrupt(f, e))
    }

    /// Writes `state.json` atomically (temporary file, then rename).
    pub fn save(&self, r: &Record) -> Result<(), StateError> {
        let f = self.state_file();
        let tmp = self
            .path
            .join(format!(".state.json.{}", std::process::id()));
        let text = serde_json::to_vec_pretty(r).map_err(|e| StateError::Corrupt(f.clone(), e))?;
        std::fs::write(&tmp, text).map_err(|e| StateError::Io(tmp.clone(), e))?;
        std::fs::rename(&tmp, &f).map_err(|e| StateError::Io(f, e))
    }

    /// Loads, changes and saves the record.
    pub fn update(&self, change: impl FnOnce(&mut Record)) -> Result<Record, StateError> {
        let mut r = self.load()?;
        change(&mut r);
        self.save(&r)?;
        Ok(r)
    }

    /// Removes the directory and everything in it.
    pub fn remove(&self) -> Result<(), StateError> {
        match std::fs::remove_dir_all(&self.path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(StateError::Io(self.path.clone(), e)),
        }
    }
}

/// The current UTC time as RFC 3339 (`2026-01-02T03:04:05.123456789Z`).
pub fn now_rfc3339() -> String {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let secs = d.as_secs() as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:09}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        d.subsec_nanos()
    )
}

/// Whether process `pid` exists (and is not a zombie).
pub fn alive(pid: i32) -> bool {
    if pid <= 0 {
        return false;
    }
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state letter follows the last ')' of the command name.
        Ok(s) => s
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.trim_start().chars().next())
            .is_some_and(|c| c != 'Z' && c != 'X'),
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn rfc3339_shape() {
        let t = super::now_rfc3339();
        assert_eq!(t.len(), 30, "{t}");
        assert!(t.starts_with("20") && t.ends_with('Z'), "{t}");
    }

    #[test]
    fn own_process_is_alive() {
        assert!(super::alive(std::process::id() as i32));
        assert!(!super::alive(0));
    }
}

/// A container's OCI status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// `create` is setting it up.
    Creating,
    /// Created, not started.
    Created,
    /// Its process runs.
    Running,
    /// Its process ended (or its monitor is gone).
    Stopped,
}

impl Status {
    /// The OCI name.
    pub fn name(self) -> &'static str {
        match self {
            Self::Creating => "creating",
            Self::Created => "created",
            Self::Running => "running",
            Self::Stopped => "stopped",
        }
    }
}

impl Record {
    /// The status this record and the live processes imply.
    pub fn status(&self) -> Status {
        if self.exit.is_some() {
            Status::Stopped
        } else if self.monitor_pid == 0 || self.init_pid == 0 {
            if self.monitor_pid != 0 && !alive(self.monitor_pid) {
                Status::Stopped
            } else {
                Status::Creating
            }
        } else if !alive(self.monitor_pid) {
            Status::Stopped
        } else if self.started {
            Status::Running
        } else {
            Status::Created
        }
    }

    /// The OCI state document (`runv state`), plus `exitStatus` once stopped.
    pub fn oci_state(&self) -> serde_json::Value {
        let status = self.status();
        let pid = if matches!(status, Status::Created | Status::Running) {
            self.init_pid
        } else {
            0
        };
        let mut v = serde_json::json!({
            "ociVersion": "1.2.0",
            "id": self.id,
            "pid": pid,
            "status": if self.paused && status == Status::Running {
                "paused"
            } else {
                status.name()
            },
            "bundle": self.bundle,
            "rootfs": self.rootfs,
            "created": self.created,
            "owner": "",
            "annotations": self.annotations,
        });
        // Not in the OCI schema (consumers ignore unknown fields): how the process ended.
        if let (Some(code), Some(o)) = (self.exit, v.as_object_mut()) {
            o.insert("exitStatus".into(), code.into());
        }
        v
    }
}
