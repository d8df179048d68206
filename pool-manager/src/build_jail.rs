//! The jail of a template's build VM (the `runv-vmm` that boots the kernel and is snapshotted).
//!
//! Laid out like a pooled shell's ([`crate::shell`]): jail `build-<12 random hex>` (unique on
//! the host, as its cgroup `runv/build-<hex>` must be), root `<run_dir>/build-<hex>.root`, its
//! sockets in `<run_dir>/build-<hex>/` (owned by the jail uid, bound read-write). The kernel, initrd and
//! slot placeholders are bound by `runv-vmm --jail` itself (it binds `--kernel`, `--initrd` and
//! `--block` files). The build directory the snapshot goes to is bound read-write and owned by
//! the jail uid while the VM runs, and given back to root (files and directory) before the
//! template is published, so no jailed VMM owns a template.

use std::path::{Path, PathBuf};

use crate::shell::{remove_leftovers, ShellJail};
use crate::template::TemplateError;

fn io(what: String) -> impl FnOnce(std::io::Error) -> TemplateError {
    move |source| TemplateError::Guest(format!("{what}: {source}"))
}

/// A build VM's jail; its leftovers (directory, root, cgroup) are removed on drop.
pub(crate) struct BuildJail {
    run_dir: PathBuf,
    id: String,
    uid: u32,
    gid: u32,
    args: Vec<String>,
}

impl BuildJail {
    /// Prepares the jail of template `name`'s build VM (`mem_mib` of guest RAM) writing its
    /// snapshot into `building`.
    pub(crate) fn prepare(
        jail: &ShellJail,
        run_dir: &Path,
        name: &str,
        building: &Path,
        mem_mib: u64,
    ) -> Result<Self, TemplateError> {
        // Unique on the host (cgroups are): two pools may build templates of one name at once.
        let id = {
            use std::hash::BuildHasher;
            let r = std::collections::hash_map::RandomState::new().hash_one(name);
            format!("build-{:012x}", r >> 16)
        };
        let mut this = Self {
            run_dir: run_dir.to_path_buf(),
            id: id.clone(),
            uid: jail.uid,
            gid: jail.gid,
            args: Vec::new(),
        };
        let files = this.files_dir();
        std::fs::create_dir_all(run_dir).map_err(io(format!("creating {}", run_dir.display())))?;
        {
            use std::os::unix::fs::DirBuilderExt;
            std::fs::DirBuilder::new()
                .mode(0o700)
                .create(&files)
                .map_err(io(format!("creating {}", files.display())))?;
        }
        this.own(&files)?;
        this.own(building)?;
        let spec = vmm_api::jail::JailSpec {
            root: run_dir.join(format!("{id}.root")),
            id,
            uid: jail.uid,
            gid: jail.gid,
            read_only: jail.read_only.clone(),
            read_write: vec![files, building.to_path_buf()],
            mem_mib: mem_mib + vmm_api::jail::MEMORY_OVERHEAD_MIB,
            pids_max: vmm_api::jail::DEFAULT_PIDS_MAX,
        };
        this.args = spec.args();
        Ok(this)
    }

    /// The `runv-vmm` arguments that jail it.
    pub(crate) fn args(&self) -> &[String] {
        &self.args
    }

    /// The jail's id (`build-<hex>`, unique on the host).
    pub(crate) fn id(&self) -> &str {
        &self.id
    }

    /// The jail uid and gid.
    pub(crate) fn owner(&self) -> (u32, u32) {
        (self.uid, self.gid)
    }

    /// Where its control and vsock sockets go (bound read-write).
    pub(crate) fn files_dir(&self) -> PathBuf {
        self.run_dir.join(&self.id)
    }

    /// Gives `path` to the jail uid (a placeholder it opens read-write, a directory it writes).
    pub(crate) fn own(&self, path: &Path) -> Result<(), TemplateError> {
        std::os::unix::fs::chown(path, Some(self.uid), Some(self.gid)).map_err(io(format!(
            "chown {} to the jail uid {}",
            path.display(),
            self.uid
        )))
    }

    /// After the VM is gone: gives `building` and its files back to root.
    pub(crate) fn give_back(&self, building: &Path) -> Result<(), TemplateError> {
        let back = |p: &Path| {
            std::os::unix::fs::lchown(p, Some(0), Some(0))
                .map_err(io(format!("chown {} back to root", p.display())))
        };
        let entries =
            std::fs::read_dir(building).map_err(io(format!("listing {}", building.display())))?;
        for e in entries {
            let e = e.map_err(io(format!("listing {}", building.display())))?;
            back(&e.path())?;
        }
        back(building)
    }
}

impl Drop for BuildJail {
    fn drop(&mut self) {
        remove_leftovers(&self.run_dir, &self.id);
    }
}
