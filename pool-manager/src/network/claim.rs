//! A pool's claim on the network objects of a VM before its VMM runs. The orphan sweep
//! ([`super::orphans`]) keeps what a live VMM claims through its command line, but a TAP or a
//! build namespace is made a few milliseconds before its VMM starts; another pool sweeping in
//! that window would take it away. So the maker first takes a claim: an exclusive `flock` on
//! `/run/runv/net-claims/<vm name>`, held as long as the objects are its own. The kernel drops
//! the lock when the maker dies, so a killed pool's objects become orphans again.

use std::collections::HashSet;
use std::fs::{File, OpenOptions, TryLockError};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use super::NetError;

/// Where claims live: host-wide, as namespaces and links are.
pub const CLAIM_DIR: &str = "/run/runv/net-claims";

/// A held claim on one VM name's network objects; released (and its file removed) on drop.
#[derive(Debug)]
pub struct Claim {
    path: PathBuf,
    _file: File,
}

impl Claim {
    /// Claims `vm_name` (`vm-<hex>`, or a build jail's `build-<hex>`) for this process.
    pub fn take(vm_name: &str) -> Result<Self, NetError> {
        Self::take_in(Path::new(CLAIM_DIR), vm_name)
    }

    fn take_in(dir: &Path, vm_name: &str) -> Result<Self, NetError> {
        // A file name of its own in `dir`, nothing else (a name can come from a recorded
        // sandbox's namespace).
        if vm_name.is_empty()
            || !vm_name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        {
            return Err(NetError::State(format!(
                "cannot claim the network of {vm_name:?}: a VM name is letters, digits and '-'"
            )));
        }
        let failed = |what: &str, e: std::io::Error| {
            NetError::State(format!(
                "claiming the network of {vm_name}: {what} in {}: {e}; check that {} is writable",
                dir.display(),
                dir.display()
            ))
        };
        std::fs::create_dir_all(dir).map_err(|e| failed("creating the directory", e))?;
        let path = dir.join(vm_name);
        loop {
            let file = OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .custom_flags(libc::O_NOFOLLOW)
                .open(&path)
                .map_err(|e| failed("opening the claim file", e))?;
            match file.try_lock() {
                Ok(()) => {}
                Err(TryLockError::WouldBlock) => return Err(NetError::State(format!(
                    "the network of {vm_name} is claimed by another process (lock on {}); VM names are random, so another pool is using this one",
                    path.display()
                ))),
                Err(TryLockError::Error(e)) => return Err(failed("locking the claim file", e)),
            }
            // A sweep may have found the new file unlocked and removed it just before the lock:
            // then the lock is on a file nobody else can see; take a new one.
            if same_file(&file, &path) {
                return Ok(Self { path, _file: file });
            }
        }
    }
}

/// Whether `path` still names the open `file`.
fn same_file(file: &File, path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (file.metadata(), std::fs::metadata(path)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        // Removed while still locked: a sweep that opened it earlier finds it unlocked only
        // after the objects are gone.
        let _ = std::fs::remove_file(&self.path);
    }
}

/// The VM names some live process holds a claim on. Claim files of dead processes are removed.
pub fn claimed() -> HashSet<String> {
    claimed_in(Path::new(CLAIM_DIR))
}

fn claimed_in(dir: &Path) -> HashSet<String> {
    let mut out = HashSet::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return out;
    };
    // Only the regular files claims make (a FIFO would block the open, a link lead elsewhere).
    for e in entries
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
    {
        let name = e.file_name().to_string_lossy().into_owned();
        // Opened for reading: a lock test needs no write access and creates nothing.
        let Ok(file) = File::open(e.path()) else {
            continue;
        };
        match file.try_lock() {
            Err(TryLockError::WouldBlock) => {
                out.insert(name);
            }
            Ok(()) => {
                // Removed while locked, so a maker that locks it after this sees that its file
                // is gone and takes a new one.
                let _ = std::fs::remove_file(e.path());
            }
            Err(TryLockError::Error(_)) => {
                // Unknown: keep the objects rather than risk a live VM's.
                out.insert(name);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_held_claim_is_seen_and_a_released_one_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().join("claims");
        let a = Claim::take_in(&d, "vm-aaaa").unwrap();
        let b = Claim::take_in(&d, "build-bbbb").unwrap();
        assert_eq!(
            claimed_in(&d),
            HashSet::from(["vm-aaaa".to_string(), "build-bbbb".to_string()])
        );
        let err = Claim::take_in(&d, "vm-aaaa").unwrap_err().to_string();
        assert!(err.contains("claimed by another process"), "{err}");
        for bad in ["", "../vm-x", "vm/x"] {
            let err = Claim::take_in(&d, bad).unwrap_err().to_string();
            assert!(err.contains("letters, digits and '-'"), "{bad}: {err}");
        }
        // Neither a FIFO nor a link among the claims is opened or counted.
        let ok = std::process::Command::new("mkfifo")
            .arg(d.join("vm-fifo"))
            .status()
            .unwrap();
        assert!(ok.success());
        std::os::unix::fs::symlink("/etc/hostname", d.join("vm-link")).unwrap();
        let err = Claim::take_in(&d, "vm-link").unwrap_err().to_string();
        assert!(err.contains("opening the claim file"), "{err}");
        drop(a);
        assert!(!d.join("vm-aaaa").exists());
        assert_eq!(claimed_in(&d), HashSet::from(["build-bbbb".to_string()]));
        drop(b);
        assert!(claimed_in(&d).is_empty());
    }

    #[test]
    fn a_dead_holders_claim_is_not_held_and_its_file_goes() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().to_path_buf();
        // A child process takes the claim and dies holding it.
        let script = format!("exec 9>{}/vm-dead && flock -x 9 && exit 0", d.display());
        let ok = std::process::Command::new("sh")
            .args(["-c", &script])
            .status()
            .unwrap();
        assert!(ok.success());
        assert!(d.join("vm-dead").exists());
        assert!(claimed_in(&d).is_empty());
        assert!(!d.join("vm-dead").exists(), "a stale claim file is removed");
        // And a live holder's claim is seen from another process's point of view.
        let mut child = std::process::Command::new("sh")
            .args([
                "-c",
                &format!(
                    "exec 9>{}/vm-live && flock -x 9 && echo locked && exec sleep 30",
                    d.display()
                ),
            ])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(child.stdout.take().unwrap()),
            &mut line,
        )
        .unwrap();
        assert_eq!(line.trim(), "locked");
        assert_eq!(claimed_in(&d), HashSet::from(["vm-live".to_string()]));
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(claimed_in(&d).is_empty());
    }
}
