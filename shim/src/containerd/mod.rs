//! `containerd-shim-runv-v2`, the containerd runtime v2 shim (`io.containerd.runv.v2`), on the
//! same sandbox library as the `runv` CLI.
//!
//! One shim per sandbox: containers that carry the same CRI sandbox id
//! (`io.kubernetes.cri.sandbox-id`) share one shim and one sandbox (one agent), so a pod's
//! containers, pause container first, run in one sandbox; under `ctr` every container is its
//! own sandbox. Modules: [`backend`] (which sandbox kind, and the thread owning the sandbox),
//! [`service`] (the Task service), [`process`] (per-process state and exits), [`stdio`]
//! (containerd's fifos), [`rootfs`] (the `rootfs` mounts), [`spec`] (the spec adapted for the
//! sandbox).

pub mod backend;
pub mod process;
pub mod rootfs;
pub mod service;
pub mod spec;
pub mod stdio;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use containerd_shim::api::DeleteResponse;
use containerd_shim::publisher::RemotePublisher;
use containerd_shim::{Config, ExitSignal, Flags, StartOpts};
use sha2::Digest;

use crate::state::ContainerDir;

/// containerd's runtime name for this shim.
pub const RUNTIME: &str = "io.containerd.runv.v2";

/// The annotation that groups a CRI pod's containers into one shim.
pub const SANDBOX_ID_ANNOTATION: &str = "io.kubernetes.cri.sandbox-id";

/// Environment variable carrying the group from `start` to the shim server it spawns.
const GROUP_ENV: &str = "RUNV_SHIM_GROUP";

/// Where the shims of containerd namespace `ns` keep their sandboxes' state.
pub fn state_root(ns: &str) -> PathBuf {
    Path::new("/run/runv/containerd").join(ns)
}

/// The group (sandbox) a bundle's container belongs to: its CRI sandbox id, else its own id.
pub fn group_of(bundle: &Path, id: &str) -> String {
    std::fs::read(bundle.join("config.json"))
        .ok()
        .and_then(|t| serde_json::from_slice::<serde_json::Value>(&t).ok())
        .and_then(|v| {
            v.get("annotations")?
                .get(SANDBOX_ID_ANNOTATION)?
                .as_str()
                .map(str::to_string)
        })
        .filter(|g| !g.is_empty())
        .unwrap_or_else(|| id.to_string())
}

/// The sandbox state directory of `group` in namespace `ns`: the group itself when it is a
/// short plain name, else a hash of it (the agent's socket path must stay under 108 bytes).
pub fn sandbox_dir(ns: &str, group: &str) -> ContainerDir {
    let plain = group.len() <= 64
        && !group.starts_with('.')
        && group
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
    let name = if plain {
        group.to_string()
    } else {
        let h = sha2::Sha256::digest(group.as_bytes());
        h.iter().take(16).map(|b| format!("{b:02x}")).collect()
    };
    ContainerDir::new(&state_root(ns), &name)
}

/// The shim: containerd's `start`/`delete` actions and the server's lifetime.
pub struct Shim {
    namespace: String,
    id: String,
    exit: Arc<ExitSignal>,
}

impl containerd_shim::Shim for Shim {
    type T = service::Service;

    fn new(_runtime_id: &str, args: &Flags, config: &mut Config) -> Self {
        // The shim's only child is the sandbox (its agent or VMM), which the sandbox owner
        // waits for itself; a library reaper would race it for the exit status.
        config.no_reaper = true;
        config.no_sub_reaper = true;
        Shim {
            namespace: args.namespace.clone(),
            id: args.id.clone(),
            exit: Arc::new(ExitSignal::default()),
        }
    }

    fn start_shim(&mut self, opts: StartOpts) -> Result<String, containerd_shim::Error> {
        let bundle = std::env::current_dir().unwrap_or_default();
        let group = group_of(&bundle, &opts.id);
        let (_pid, address) =
            containerd_shim::spawn(opts, &group, vec![(GROUP_ENV, group.as_str())])?;
        containerd_shim::util::write_address(&address)?;
        Ok(address)
    }

    fn delete_shim(&mut self) -> Result<DeleteResponse, containerd_shim::Error> {
        // containerd runs this when the shim is gone (or never came up): clean up what the dead
        // shim left of this container.
        let bundle = std::env::current_dir().unwrap_or_default();
        if let Err(e) = rootfs::unmount(&bundle) {
            log::warn!("runv delete {}: {e}", self.id);
        }
        let group = group_of(&bundle, &self.id);
        let dir = sandbox_dir(&self.namespace, &group);
        let alive = protocol::client::Client::connect(&dir.agent_socket()).ok();
        match alive {
            // Another container of the pod keeps the sandbox: remove only this one.
            Some(mut c) if group != self.id => {
                let _ = c.call(&protocol::Request::Destroy {
                    id: self.id.clone(),
                });
            }
            _ => {
                drop(alive);
                crate::sandbox::host::reap_leftovers(&dir.id);
                crate::sandbox::vm::reap_leftovers(&dir);
                let _ = dir.remove();
            }
        }
        Ok(DeleteResponse {
            pid: 0,
            exit_status: 128 + libc::SIGKILL as u32,
            exited_at: containerd_shim::protos::protobuf::MessageField::some(process::timestamp(
                std::time::SystemTime::now(),
            )),
            ..Default::default()
        })
    }

    fn wait(&mut self) {
        self.exit.wait();
    }

    fn create_task_service(&self, publisher: RemotePublisher) -> Self::T {
        let group = std::env::var(GROUP_ENV).unwrap_or_else(|_| self.id.clone());
        service::Service::new(
            self.namespace.clone(),
            sandbox_dir(&self.namespace, &group),
            publisher,
            self.exit.clone(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sandbox_dirs_stay_short_and_plain() {
        let d = sandbox_dir("default", "web-1");
        assert_eq!(d.id, "web-1");
        let long = "a".repeat(65);
        let d = sandbox_dir("k8s.io", &long);
        assert_eq!(d.id.len(), 32);
        assert_eq!(sandbox_dir("default", "../x").id.len(), 32);
        assert!(d.agent_socket().as_os_str().len() < 108);
    }

    #[test]
    fn group_from_cri_annotation() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(group_of(dir.path(), "c1"), "c1");
        std::fs::write(
            dir.path().join("config.json"),
            r#"{"annotations":{"io.kubernetes.cri.sandbox-id":"pod1"}}"#,
        )
        .unwrap();
        assert_eq!(group_of(dir.path(), "c1"), "pod1");
    }
}
