//! Taking a snapshot of a paused VM.

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
        let same = source
            .is_same_dir(dir)
            .map_err(io_err(format!("snapshot directory {}", dir.display())))?;
        if same {
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
        // Everything is written aside and published by `commit`: nothing in `dir` changes
        // before it, and a failure leaves the previous snapshot there intact.
        let mut writer = snapshot::SnapshotWriter::create(dir)?;
        let mem = if let Backing::Memfd(memfd) = &self.ram.backing {
            writer.write_memory(memfd, self.ram.size)?
        } else {
            // A copy-on-write or userfaultfd clone: its writes live only in its mapping. Read
            // through it in chunks that never cross a region boundary (both are 1 MiB aligned).
            writer.write_memory_with(self.ram.size, &[(0, self.ram.size)], |off, buf| {
                self.ram.read_at(off, buf)
            })?
        };
        let state = MachineSnapshot {
            config: self.config.clone(),
            generation: self.generation,
            vm,
            vcpus,
            devices,
            block_bytes,
        };
        writer.commit(
            env!("CARGO_PKG_VERSION"),
            snapshot::HostFingerprint::current(self.kvm.get_api_version()),
            &state,
        )?;
        Ok(mem)
    }
}
