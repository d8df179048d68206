//! Mount destinations and options from the spec: [`RootPath`] (a destination cleaned and split
//! for resolution inside the root) and [`mount_flags`] (OCI option words → mount(2) flags).

use std::ffi::{CString, OsStr};
use std::path::{Component, Path, PathBuf};

use super::plan::{cpath, cstr};
use super::SpawnError;

/// A path inside the container's root: its components, and each prefix joined with `/`
/// (`a`, `a/b`, `a/b/c`), ready for `openat2(RESOLVE_IN_ROOT)`.
#[derive(Debug)]
pub(super) struct RootPath {
    pub(super) names: Vec<CString>,
    pub(super) prefixes: Vec<CString>,
}

impl RootPath {
    /// Cleans `dest` lexically (`.` dropped, `..` pops); a `..` that would leave the root is
    /// refused. Relative destinations are taken relative to the root.
    pub(super) fn new(dest: &Path) -> Result<Self, SpawnError> {
        let mut parts: Vec<&OsStr> = Vec::new();
        for c in dest.components() {
            match c {
                Component::Normal(n) => parts.push(n),
                Component::ParentDir => {
                    if parts.pop().is_none() {
                        return Err(SpawnError::Invalid(format!(
                            "path {} escapes the container's root with ..: remove the ..",
                            dest.display()
                        )));
                    }
                }
                Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
            }
        }
        let mut names = Vec::with_capacity(parts.len());
        let mut prefixes = Vec::with_capacity(parts.len());
        let mut joined = PathBuf::new();
        for p in parts {
            joined.push(p);
            names.push(cstr(p.as_encoded_bytes())?);
            prefixes.push(cpath(&joined)?);
        }
        Ok(Self { names, prefixes })
    }
}

/// Parsed mount options.
#[derive(Debug, Default, PartialEq, Eq)]
pub(super) struct MountFlags {
    /// Flags for mount(2) (without `MS_BIND`/`MS_RDONLY`, see the fields).
    pub(super) flags: libc::c_ulong,
    /// File-system specific options, comma-joined into the data argument.
    pub(super) data: Vec<String>,
    pub(super) bind: bool,
    pub(super) recursive: bool,
    pub(super) readonly: bool,
    pub(super) propagation: libc::c_ulong,
}

/// Parses OCI mount `options` as runc does; unknown words are file-system data (`mode=755`).
pub(super) fn mount_flags(options: &[String]) -> MountFlags {
    let mut m = MountFlags::default();
    for o in options {
        let clear = |m: &mut MountFlags, f: libc::c_ulong| m.flags &= !f;
        match o.as_str() {
            "ro" => m.readonly = true,
            "rw" => m.readonly = false,
            "nosuid" => m.flags |= libc::MS_NOSUID,
            "suid" => clear(&mut m, libc::MS_NOSUID),
            "nodev" => m.flags |= libc::MS_NODEV,
            "dev" => clear(&mut m, libc::MS_NODEV),
            "noexec" => m.flags |= libc::MS_NOEXEC,
            "exec" => clear(&mut m, libc::MS_NOEXEC),
            "sync" => m.flags |= libc::MS_SYNCHRONOUS,
            "dirsync" => m.flags |= libc::MS_DIRSYNC,
            "relatime" => m.flags |= libc::MS_RELATIME,
            "norelatime" => clear(&mut m, libc::MS_RELATIME),
            "strictatime" => m.flags |= libc::MS_STRICTATIME,
            "nostrictatime" => clear(&mut m, libc::MS_STRICTATIME),
            "noatime" => m.flags |= libc::MS_NOATIME,
            "atime" => clear(&mut m, libc::MS_NOATIME),
            "nodiratime" => m.flags |= libc::MS_NODIRATIME,
            "diratime" => clear(&mut m, libc::MS_NODIRATIME),
            "bind" => m.bind = true,
            "rbind" => {
                m.bind = true;
                m.recursive = true;
            }
            "private" => m.propagation = libc::MS_PRIVATE,
            "rprivate" => m.propagation = libc::MS_PRIVATE | libc::MS_REC,
            "slave" => m.propagation = libc::MS_SLAVE,
            "rslave" => m.propagation = libc::MS_SLAVE | libc::MS_REC,
            "shared" => m.propagation = libc::MS_SHARED,
            "rshared" => m.propagation = libc::MS_SHARED | libc::MS_REC,
            "unbindable" => m.propagation = libc::MS_UNBINDABLE,
            "runbindable" => m.propagation = libc::MS_UNBINDABLE | libc::MS_REC,
            other => m.data.push(other.to_string()),
        }
    }
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(p: &RootPath) -> Vec<&str> {
        p.names.iter().map(|c| c.to_str().unwrap()).collect()
    }

    fn prefixes(p: &RootPath) -> Vec<&str> {
        p.prefixes.iter().map(|c| c.to_str().unwrap()).collect()
    }

    #[test]
    fn root_paths_are_cleaned_and_joined_under_the_root() {
        let p = RootPath::new(Path::new("/dev/./pts//x/../y")).unwrap();
        assert_eq!(names(&p), ["dev", "pts", "y"]);
        assert_eq!(prefixes(&p), ["dev", "dev/pts", "dev/pts/y"]);
        let rel = RootPath::new(Path::new("data/sub")).unwrap();
        assert_eq!(prefixes(&rel), ["data", "data/sub"]);
        assert!(RootPath::new(Path::new("/")).unwrap().names.is_empty());
    }

    #[test]
    fn destinations_escaping_the_root_are_refused() {
        for bad in ["../etc", "/../etc", "/a/../../etc", "a/b/../../../x"] {
            let e = RootPath::new(Path::new(bad)).unwrap_err();
            assert!(e.to_string().contains("escapes"), "{bad}: {e}");
        }
    }

    #[test]
    fn mount_options_become_flags_and_data() {
        let o = |v: &[&str]| mount_flags(&v.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        let m = o(&["nosuid", "noexec", "nodev", "ro", "mode=755", "size=65536k"]);
        assert_eq!(m.flags, libc::MS_NOSUID | libc::MS_NOEXEC | libc::MS_NODEV);
        assert!(m.readonly && !m.bind);
        assert_eq!(m.data, ["mode=755", "size=65536k"]);
        let m = o(&["rbind", "rprivate", "ro", "rw", "suid", "nosuid"]);
        assert!(m.bind && m.recursive && !m.readonly);
        assert_eq!(m.propagation, libc::MS_PRIVATE | libc::MS_REC);
        assert_eq!(m.flags, libc::MS_NOSUID);
        assert_eq!(o(&["noatime", "atime"]).flags, 0);
    }
}
