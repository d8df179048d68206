//! Taking a snapshot of a paused VM.

use std::os::unix::fs::MetadataExt;
use std::path::Path;

use crate::error::{io_err, VmmError};
use crate::machine::MachineSnapshot;
use crate::memory::Backing;
use crate::persist;
use crate::sync::LockOrRecover;
use crate::vmm::Vmm;

impl Vmm {
    /// Refuses a snapshot into the directory this VM was restored from: its files back this
    /// clone (and its siblings), and the template they hold must stay as it is.
    fn refuse_backing_dir(&self, dir: &Path) -> Result<(), VmmError> {
        let Some(source) = &self.source else {
            return Ok(());
        };
        let id = |p: &Path| std::fs::metadata(p).map(|m| (m.dev(), m.ino()));
        let target = id(dir).map_err(io_err(format!("snapshot directory {}", dir.display())))?;
        if id(source).ok() == Some(target) {
            return Err(VmmError::Invalid(format!(
                "{} is the snapshot this VM was restored from: snapshot a clone into another directory",
                dir.display()
            )));
        }
        Ok(())
    }

    /// Writes a snapshot of this (paused) VM into `dir`, which must exist.
    pub(crate) fn snapshot(&self, dir: &Path) -> Result<snapshot::memory::MemoryStats, VmmError> {
        self.refuse_backing_dir(dir)?;
        let devices = self
            .transports
            .iter()
            .map(|t| t.lock_or_recover().save())
            .collect();
        let block_bytes = self
            .config
            .block
            .iter()
            .map(|b| {
                std::fs::metadata(&b.path)
                    .map(|m| m.len())
                    .map_err(io_err(format!("block device {}", b.path.display())))
            })
            .collect::<Result<_, _>>()?;
        let vm = persist::save_vm(&self.vm)?;
        let mut vcpus = Vec::new();
        for fd in &self.vcpu_fds {
            let fd = fd.lock_or_recover();
            vcpus.push(persist::save_vcpu(&self.kvm, &fd)?);
        }
        let mem = if let Backing::Memfd(memfd) = &self.ram.backing {
            snapshot::memory::write_sparse(memfd, self.ram.size, dir)?
        } else {
            // A copy-on-write or userfaultfd clone: its writes live only in its mapping. Read through
            // it in chunks that never cross a region boundary (both are 1 MiB aligned).
            snapshot::memory::write_sparse_with(
                self.ram.size,
                &[(0, self.ram.size)],
                dir,
                |off, buf| self.ram.read_at(off, buf),
            )?
        };
        let header = snapshot::StateFile {
            producer_version: env!("CARGO_PKG_VERSION").into(),
            host: snapshot::HostFingerprint::current(self.kvm.get_api_version()),
        };
        let state = MachineSnapshot {
            config: self.config.clone(),
            generation: self.generation,
            vm,
            vcpus,
            devices,
            block_bytes,
        };
        snapshot::write_state(dir, &header, &state)?;
        Ok(mem)
    }
}
