//! Read-only EROFS images of bundle root file systems, built by `mkfs.erofs` and cached by
//! content.
//!
//! [`ImageCache::erofs_for`] turns a rootfs directory into `<cache>/<key>.erofs`, where the key
//! is a SHA-256 of the caller's layer digests when given, else of the tree itself (paths, types,
//! modes, uids/gids, sizes, mtimes, device numbers, symlink targets and file contents, walked
//! without following symbolic links and bounded in entries and depth). A cache hit returns the
//! existing image without running anything. A miss builds into a temporary file in the cache
//! directory and renames it into place, so concurrent builders of one key never expose a partial
//! image. Cache files that are symbolic links (or anything but regular files) are refused.
//!
//! The agent mounts such an image as `RootfsSource::Image` (host) or, attached as a virtio disk,
//! `RootfsSource::Block` (guest).

use std::ffi::OsString;
use std::fs::File;
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};

use sha2::{Digest, Sha256};

/// The default cache directory.
pub const DEFAULT_CACHE_DIR: &str = "/var/lib/runv/images";

/// Default bound on the entries of a hashed tree.
pub const DEFAULT_MAX_ENTRIES: usize = 1_000_000;

/// Default bound on the directory depth of a hashed tree.
pub const DEFAULT_MAX_DEPTH: usize = 128;

/// Why an image could not be had.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// `mkfs.erofs` is not installed.
    #[error("mkfs.erofs was not found in PATH ({path}): install erofs-utils (apt-get install erofs-utils)")]
    MkfsMissing {
        /// The PATH searched.
        path: String,
    },
    /// `mkfs.erofs` failed.
    #[error("mkfs.erofs failed ({status}) building {rootfs}: {stderr}; check the rootfs and the space in the cache directory")]
    MkfsFailed {
        /// The rootfs.
        rootfs: String,
        /// Exit status.
        status: String,
        /// The end of its output.
        stderr: String,
    },
    /// A path is not what it must be.
    #[error("{path} is {found}, expected {expected}: {hint}")]
    WrongType {
        /// Path.
        path: String,
        /// What it is.
        found: &'static str,
        /// What it must be.
        expected: &'static str,
        /// What to do.
        hint: &'static str,
    },
    /// The tree has more entries than allowed.
    #[error("rootfs {rootfs} has more than {max} entries: raise the limit (ImageCache::with_limits) or pass layer digests as the key")]
    TooManyEntries {
        /// The rootfs.
        rootfs: String,
        /// The bound.
        max: usize,
    },
    /// The tree is deeper than allowed.
    #[error("rootfs {rootfs} nests deeper than {max} directories at {at}: raise the limit (ImageCache::with_limits) or pass layer digests as the key")]
    TooDeep {
        /// The rootfs.
        rootfs: String,
        /// The bound.
        max: usize,
        /// Where.
        at: String,
    },
    /// The caller's key is empty.
    #[error("the image key (layer digests) is empty: pass None to key by the tree's content")]
    EmptyKey,
    /// A file-system operation failed.
    #[error("{what} {path}: {source}")]
    Io {
        /// What failed.
        what: &'static str,
        /// On what.
        path: String,
        /// Cause.
        source: std::io::Error,
    },
}

fn io<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> ImageError + 'a {
    move |source| ImageError::Io {
        what,
        path: path.display().to_string(),
        source,
    }
}

/// A cached EROFS image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Image {
    /// `<cache>/<key>.erofs`.
    pub path: PathBuf,
    /// The content key (hex SHA-256).
    pub key: String,
    /// Size in bytes.
    pub size: u64,
    /// Built by this call (false: a cache hit).
    pub built: bool,
}

/// A directory of EROFS images keyed by content.
#[derive(Debug, Clone)]
pub struct ImageCache {
    dir: PathBuf,
    search_path: OsString,
    max_entries: usize,
    max_depth: usize,
}

static TMP_SEQ: AtomicU64 = AtomicU64::new(0);

impl ImageCache {
    /// A cache in `dir` (created if missing; it must be a directory, not a symbolic link).
    /// `mkfs.erofs` is looked up in the process's `PATH`.
    pub fn new(dir: impl Into<PathBuf>) -> Result<Self, ImageError> {
        let dir = dir.into();
        std::fs::create_dir_all(&dir).map_err(io("creating the image cache", &dir))?;
        let meta = std::fs::symlink_metadata(&dir).map_err(io("checking the image cache", &dir))?;
        if !meta.is_dir() {
            return Err(ImageError::WrongType {
                path: dir.display().to_string(),
                found: kind(&meta),
                expected: "a directory",
                hint: "give a real directory as the image cache",
            });
        }
        remove_stale_temps(&dir, STALE_TEMP_AGE);
        Ok(Self {
            dir,
            search_path: std::env::var_os("PATH").unwrap_or_default(),
            max_entries: DEFAULT_MAX_ENTRIES,
            max_depth: DEFAULT_MAX_DEPTH,
        })
    }

    /// Looks `mkfs.erofs` up in `path` (a `PATH`-style list) instead of the process's `PATH`.
    pub fn with_search_path(mut self, path: impl Into<OsString>) -> Self {
        self.search_path = path.into();
        self
    }

    /// Bounds of the tree walk that keys a rootfs without layer digests.
    pub fn with_limits(mut self, max_entries: usize, max_depth: usize) -> Self {
        self.max_entries = max_entries;
        self.max_depth = max_depth;
        self
    }

    /// The cache directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The EROFS image of `rootfs`: the cached one when its key is present, else built now.
    /// `key` is the rootfs's layer digests (any stable text naming the content); `None` keys
    /// by a hash of the tree.
    pub fn erofs_for(&self, rootfs: &Path, key: Option<&str>) -> Result<Image, ImageError> {
        let meta = std::fs::symlink_metadata(rootfs).map_err(io("checking the rootfs", rootfs))?;
        if !meta.is_dir() {
            return Err(ImageError::WrongType {
                path: rootfs.display().to_string(),
                found: kind(&meta),
                expected: "a directory",
                hint: "give the bundle's unpacked rootfs directory",
            });
        }
        let key = match key {
            Some(k) if k.trim().is_empty() => return Err(ImageError::EmptyKey),
            Some(k) => {
                let mut h = Sha256::new();
                h.update(b"runv-erofs-layers-v1\0");
                h.update(k.as_bytes());
                hex(&h.finalize())
            }
            None => self.tree_key(rootfs)?,
        };
        let path = self.dir.join(format!("{key}.erofs"));
        if let Some(size) = existing(&path)? {
            return Ok(Image {
                path,
                key,
                size,
                built: false,
            });
        }
        let mkfs = self.find_mkfs()?;
        let tmp = self.dir.join(format!(
            ".tmp-{key}-{}-{}",
            std::process::id(),
            TMP_SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        let result = build(&mkfs, rootfs, &tmp).and_then(|()| {
            std::fs::rename(&tmp, &path).map_err(io("moving the built image into place", &path))
        });
        if let Err(e) = result {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
        if let Ok(d) = File::open(&self.dir) {
            let _ = d.sync_all();
        }
        let size = existing(&path)?.ok_or_else(|| ImageError::Io {
            what: "finding the built image",
            path: path.display().to_string(),
            source: std::io::ErrorKind::NotFound.into(),
        })?;
        Ok(Image {
            path,
            key,
            size,
            built: true,
        })
    }

    /// The version of the `mkfs.erofs` this cache would run: the first line of its
    /// `--version` (erofs-utils 1.6 and later), or a note that it predates `--version`.
    /// Errors like a build would when it is missing.
    pub fn mkfs_version(&self) -> Result<String, ImageError> {
        let mkfs = self.find_mkfs()?;
        let out = Command::new(&mkfs)
            .arg("--version")
            .stdin(Stdio::null())
            .output()
            .map_err(io("running", &mkfs))?;
        let text = String::from_utf8_lossy(&out.stdout);
        let first = text.lines().next().unwrap_or("").trim();
        Ok(if out.status.success() && !first.is_empty() {
            first.chars().take(200).collect()
        } else {
            format!(
                "{} (erofs-utils older than 1.6: no --version)",
                mkfs.display()
            )
        })
    }

    fn find_mkfs(&self) -> Result<PathBuf, ImageError> {
        std::env::split_paths(&self.search_path)
            .filter(|d| d.is_absolute())
            .map(|d| d.join("mkfs.erofs"))
            .find(|p| std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.mode() & 0o111 != 0))
            .ok_or_else(|| ImageError::MkfsMissing {
                path: self.search_path.to_string_lossy().into_owned(),
            })
    }

    /// The hex SHA-256 of the tree at `rootfs` (see the module docs).
    pub fn tree_key(&self, rootfs: &Path) -> Result<String, ImageError> {
        let mut h = Sha256::new();
        h.update(b"runv-erofs-tree-v1\0");
        let mut entries = 0usize;
        // (directory, its path relative to rootfs, depth)
        let mut stack = vec![(rootfs.to_path_buf(), PathBuf::new(), 0usize)];
        let mut buf = vec![0u8; 64 * 1024];
        while let Some((dir, rel, depth)) = stack.pop() {
            if depth > self.max_depth {
                return Err(ImageError::TooDeep {
                    rootfs: rootfs.display().to_string(),
                    max: self.max_depth,
                    at: rel.display().to_string(),
                });
            }
            let mut names = Vec::new();
            for e in std::fs::read_dir(&dir).map_err(io("reading", &dir))? {
                let e = e.map_err(io("reading", &dir))?;
                entries += 1;
                if entries > self.max_entries {
                    return Err(ImageError::TooManyEntries {
                        rootfs: rootfs.display().to_string(),
                        max: self.max_entries,
                    });
                }
                names.push(e.file_name());
            }
            names.sort();
            let mut subdirs = Vec::new();
            for name in names {
                let p = dir.join(&name);
                let r = rel.join(&name);
                let m = std::fs::symlink_metadata(&p).map_err(io("checking", &p))?;
                h.update(r.as_os_str().as_bytes());
                h.update([0]);
                for v in [
                    u64::from(m.mode()),
                    u64::from(m.uid()),
                    u64::from(m.gid()),
                    m.size(),
                    m.mtime() as u64,
                    m.mtime_nsec() as u64,
                    m.rdev(),
                ] {
                    h.update(v.to_le_bytes());
                }
                let ft = m.file_type();
                if ft.is_symlink() {
                    let t = std::fs::read_link(&p).map_err(io("reading the link", &p))?;
                    h.update(t.as_os_str().as_bytes());
                    h.update([0]);
                } else if ft.is_file() {
                    let mut f = File::options()
                        .read(true)
                        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
                        .open(&p)
                        .map_err(io("opening", &p))?;
                    loop {
                        let n = f.read(&mut buf).map_err(io("reading", &p))?;
                        if n == 0 {
                            break;
                        }
                        h.update(&buf[..n]);
                    }
                } else if ft.is_dir() {
                    subdirs.push((p, r, depth + 1));
                }
            }
            // Reverse: popped in name order.
            stack.extend(subdirs.into_iter().rev());
        }
        Ok(hex(&h.finalize()))
    }
}

/// Temporary images older than this are left by a builder that died: removed by
/// [`ImageCache::new`]. (A live build takes seconds, far less than this.)
pub const STALE_TEMP_AGE: std::time::Duration = std::time::Duration::from_secs(3600);

/// Removes `.tmp-*` regular files in `dir` last modified more than `age` ago (best effort).
fn remove_stale_temps(dir: &Path, age: std::time::Duration) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten().take(100_000) {
        if !e.file_name().as_bytes().starts_with(b".tmp-") {
            continue;
        }
        let Ok(m) = e.path().symlink_metadata() else {
            continue;
        };
        let old = m
            .modified()
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|a| a > age);
        if m.is_file() && old {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

/// The size of regular file `path`, `None` when absent; anything else there is refused.
fn existing(path: &Path) -> Result<Option<u64>, ImageError> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.is_file() => Ok(Some(m.len())),
        Ok(m) => Err(ImageError::WrongType {
            path: path.display().to_string(),
            found: kind(&m),
            expected: "a regular image file",
            hint: "remove it from the image cache; it will be rebuilt",
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io("checking the cached image", path)(e)),
    }
}

/// Runs `mkfs.erofs tmp rootfs` into a freshly created `tmp` and syncs it.
fn build(mkfs: &Path, rootfs: &Path, tmp: &Path) -> Result<(), ImageError> {
    // Create it ourselves (exclusive, no symlink follow) so mkfs writes into our own file.
    File::options()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .open(tmp)
        .map_err(io("creating the temporary image", tmp))?;
    let out = Command::new(mkfs)
        .arg("--quiet")
        .arg(tmp)
        .arg(rootfs)
        .stdin(Stdio::null())
        .output()
        .map_err(io("running", mkfs))?;
    if !out.status.success() {
        let mut text = String::from_utf8_lossy(&out.stderr).into_owned();
        text.push_str(&String::from_utf8_lossy(&out.stdout));
        let text = text.trim();
        let skip = text.chars().count().saturating_sub(400);
        let tail: String = text.chars().skip(skip).collect();
        return Err(ImageError::MkfsFailed {
            rootfs: rootfs.display().to_string(),
            status: out.status.to_string(),
            stderr: tail
                .chars()
                .filter(|c| !c.is_control() || *c == ' ')
                .collect(),
        });
    }
    let f = File::options()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(tmp)
        .map_err(io("opening the built image", tmp))?;
    f.sync_all().map_err(io("syncing the built image", tmp))?;
    Ok(())
}

fn kind(m: &std::fs::Metadata) -> &'static str {
    let ft = m.file_type();
    if ft.is_symlink() {
        "a symbolic link"
    } else if ft.is_dir() {
        "a directory"
    } else if ft.is_file() {
        "a regular file"
    } else {
        "a special file"
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[cfg(test)]
mod tests;
