//! Which sandbox backend the shim uses, and the thread that owns the shim's one sandbox.
//!
//! The backend is chosen once per shim (= per CRI pod, or per container under `ctr`), first match
//! wins: the runtime options' `ConfigPath` (containerd's `runtimeoptions.v1.Options`, what the CRI
//! plugin sends for a non-runc runtime), `RUNV_SANDBOX` in containerd's environment,
//! `/etc/runv/config.toml`, else `vm`. The config file is a TOML subset: `sandbox = "host"` lines.

use std::path::{Path, PathBuf};
use std::sync::mpsc;

use protocol::client::Client;

use crate::sandbox::{FirstRootfs, Kind, Sandbox, SandboxError};
use crate::state::ContainerDir;

/// The system-wide runv config file.
pub const SYSTEM_CONFIG: &str = "/etc/runv/config.toml";

/// The backend and where the choice came from (for the loud announcement).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Choice {
    /// The backend.
    pub kind: Kind,
    /// What selected it (`RUNV_SANDBOX`, a config file, or the default).
    pub source: String,
}

/// Why no backend could be chosen.
#[derive(Debug, thiserror::Error)]
pub enum ChoiceError {
    /// A config file could not be read.
    #[error("reading the runv config {0}: {1} (fix the runtime's ConfigPath option or the file)")]
    Read(PathBuf, std::io::Error),
    /// A bad `sandbox` value.
    #[error("{0}: {1}")]
    Kind(String, SandboxError),
}

/// The `sandbox` key of a config file's text (`sandbox = "host"`; `#` comments).
pub fn config_sandbox(text: &str) -> Option<String> {
    text.lines()
        .map(|l| l.split('#').next().unwrap_or("").trim())
        .filter_map(|l| l.split_once('='))
        .find(|(k, _)| k.trim() == "sandbox")
        .map(|(_, v)| v.trim().trim_matches('"').trim_matches('\'').to_string())
}

fn from_file(path: &Path, required: bool) -> Result<Option<Choice>, ChoiceError> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if !required && e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(ChoiceError::Read(path.into(), e)),
    };
    let source = format!("`sandbox` in {}", path.display());
    config_sandbox(&text)
        .map(|v| {
            Kind::parse(&v)
                .map(|kind| Choice {
                    kind,
                    source: source.clone(),
                })
                .map_err(|e| ChoiceError::Kind(source.clone(), e))
        })
        .transpose()
}

/// Chooses the backend: `config_path` (from the runtime options), `RUNV_SANDBOX`,
/// [`SYSTEM_CONFIG`], else `vm`.
pub fn choose(config_path: Option<&Path>) -> Result<Choice, ChoiceError> {
    if let Some(p) = config_path {
        if let Some(c) = from_file(p, true)? {
            return Ok(c);
        }
    }
    if let Ok(v) = std::env::var("RUNV_SANDBOX") {
        if !v.is_empty() {
            let kind = Kind::parse(&v).map_err(|e| ChoiceError::Kind("RUNV_SANDBOX".into(), e))?;
            return Ok(Choice {
                kind,
                source: "RUNV_SANDBOX in containerd's environment".into(),
            });
        }
    }
    if let Some(c) = from_file(Path::new(SYSTEM_CONFIG), false)? {
        return Ok(c);
    }
    Ok(Choice {
        kind: Kind::Vm,
        source: "the default".into(),
    })
}

/// `ConfigPath` of containerd's `runtimeoptions.v1.Options` (field 2, a string), decoded from the
/// protobuf bytes of the runtime options; `None` for other option types or no path.
pub fn options_config_path(type_url: &str, value: &[u8]) -> Option<PathBuf> {
    if !type_url.ends_with("runtimeoptions.v1.Options") {
        return None;
    }
    let mut input = containerd_shim::protos::protobuf::CodedInputStream::from_bytes(value);
    while let Ok(Some(tag)) = input.read_raw_tag_or_eof() {
        let (field, wire) = (tag >> 3, tag & 7);
        if wire != 2 {
            return None;
        }
        let s = input.read_string().ok()?;
        if field == 2 && !s.is_empty() {
            return Some(PathBuf::from(s));
        }
    }
    None
}

enum Cmd {
    Client(mpsc::Sender<Result<Client, SandboxError>>),
    Rootfs(
        String,
        std::path::PathBuf,
        mpsc::Sender<Result<protocol::RootfsSource, SandboxError>>,
    ),
    ReleaseRootfs(String, mpsc::Sender<Result<(), SandboxError>>),
    Shutdown(mpsc::Sender<()>),
}

/// The shim's sandbox, owned by one long-lived thread: the host backend's agent dies with the
/// thread that spawned it (`PR_SET_PDEATHSIG`), and ttrpc worker threads come and go.
pub struct Owner {
    tx: mpsc::Sender<Cmd>,
    /// Host pid of the sandbox (agent or VMM).
    pub pid: i32,
}

impl Owner {
    /// Launches a `kind` sandbox with its state in `dir` for the first container's `spec` on a
    /// new owner thread; `first` is that container's id and root file system (the vm backend
    /// builds its image meanwhile).
    pub fn launch(
        kind: Kind,
        dir: ContainerDir,
        spec: oci_spec::runtime::Spec,
        first: Option<(String, std::path::PathBuf)>,
    ) -> Result<Self, SandboxError> {
        let (ready_tx, ready_rx) = mpsc::channel();
        let (tx, rx) = mpsc::channel::<Cmd>();
        std::thread::Builder::new()
            .name("sandbox".into())
            .spawn(move || {
                let first = first
                    .as_ref()
                    .map(|(container, dir)| FirstRootfs { container, dir });
                let mut sb: Box<dyn Sandbox> = match kind.launch(&dir, Some(&spec), first) {
                    Ok(s) => s,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                let _ = ready_tx.send(Ok(sb.pid()));
                for cmd in rx {
                    match cmd {
                        Cmd::Client(reply) => {
                            let _ = reply.send(sb.client());
                        }
                        Cmd::Rootfs(id, path, reply) => {
                            let _ = reply.send(sb.rootfs(&id, &path));
                        }
                        Cmd::ReleaseRootfs(id, reply) => {
                            let _ = reply.send(sb.release_rootfs(&id));
                        }
                        Cmd::Shutdown(done) => {
                            sb.shutdown();
                            let _ = done.send(());
                            return;
                        }
                    }
                }
                sb.shutdown();
            })
            .map_err(|e| SandboxError::Spawn("sandbox owner thread".into(), e))?;
        let pid = ready_rx
            .recv()
            .map_err(|_| SandboxError::Spawn("sandbox owner thread".into(), gone()))??;
        Ok(Self { tx, pid })
    }

    /// A new connection to the sandbox's agent.
    pub fn client(&self) -> Result<Client, SandboxError> {
        let (tx, rx) = mpsc::channel();
        self.tx
            .send(Cmd::Client(tx))
            .map_err(|_| SandboxError::Spawn("sandbox owner thread".into(), gone()))?;
        rx.recv()
            .map_err(|_| SandboxError::Spawn("sandbox owner thread".into(), gone()))?
    }

    /// How container `id`'s root file system at `path` (a host directory) reaches the agent
    /// (the directory itself for host processes, an EROFS image in a disk slot of its own for a
    /// VM).
    pub fn rootfs(
        &self,
        id: &str,
        path: &std::path::Path,
    ) -> Result<protocol::RootfsSource, SandboxError> {
        let (tx, rx) = mpsc::channel();
        self.tx
            .send(Cmd::Rootfs(id.into(), path.to_path_buf(), tx))
            .map_err(|_| SandboxError::Spawn("sandbox owner thread".into(), gone()))?;
        rx.recv()
            .map_err(|_| SandboxError::Spawn("sandbox owner thread".into(), gone()))?
    }

    /// Gives back what [`Owner::rootfs`] took for container `id` (a VM's disk slot).
    pub fn release_rootfs(&self, id: &str) -> Result<(), SandboxError> {
        let (tx, rx) = mpsc::channel();
        self.tx
            .send(Cmd::ReleaseRootfs(id.into(), tx))
            .map_err(|_| SandboxError::Spawn("sandbox owner thread".into(), gone()))?;
        rx.recv()
            .map_err(|_| SandboxError::Spawn("sandbox owner thread".into(), gone()))?
    }

    /// Ends the sandbox and waits for it.
    pub fn shutdown(&self) {
        let (tx, rx) = mpsc::channel();
        if self.tx.send(Cmd::Shutdown(tx)).is_ok() {
            let _ = rx.recv();
        }
    }
}

fn gone() -> std::io::Error {
    std::io::Error::other("the sandbox owner thread ended")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_subset() {
        assert_eq!(
            config_sandbox("# runv\nsandbox = \"host\" # no VM\n").as_deref(),
            Some("host")
        );
        assert_eq!(config_sandbox("other = 1\n"), None);
    }

    #[test]
    fn runtime_options_config_path() {
        // runtimeoptions.v1.Options{type_url: "x", config_path: "/etc/runv/config.toml"}.
        let mut b = vec![0x0a, 1, b'x', 0x12, 21];
        b.extend_from_slice(b"/etc/runv/config.toml");
        let url = "runtimeoptions.v1.Options";
        assert_eq!(
            options_config_path(url, &b),
            Some(PathBuf::from("/etc/runv/config.toml"))
        );
        assert_eq!(options_config_path("containerd.runc.v1.Options", &b), None);
        assert_eq!(options_config_path(url, &[0x12, 200]), None);
    }
}
