//! A reproducible initramfs builder: newc ("070701") cpio, optionally gzip-compressed.
//!
//! Entries are written sorted by path with fixed inode numbers, uid/gid 0 and mtime 0, so the
//! same inputs always give the same bytes. Parent directories are added implicitly (mode 0755).

use std::collections::BTreeMap;
use std::io::Write;

/// Error adding an entry.
#[derive(Debug, thiserror::Error)]
pub enum InitramfsError {
    /// The path is empty, absolute-only, or has `.`/`..` components.
    #[error("invalid initramfs path {0:?}: use a relative path like \"bin/sh\" without . or ..")]
    BadPath(String),
    /// A file is too large for the newc format (4 GiB).
    #[error("{0}: {1} bytes is too large for a newc cpio entry (limit 4 GiB)")]
    TooLarge(String, usize),
    /// Writing the archive failed.
    #[error("writing the initramfs: {0}")]
    Io(#[from] std::io::Error),
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Entry {
    Dir { mode: u32 },
    File { mode: u32, data: Vec<u8> },
    Symlink { target: String },
}

/// Output compression.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    /// Plain cpio.
    None,
    /// gzip (mtime 0, so still reproducible).
    Gzip,
}

/// An initramfs being assembled.
#[derive(Debug, Default, Clone)]
pub struct Initramfs {
    entries: BTreeMap<String, Entry>,
}

fn normalize(path: &str) -> Result<String, InitramfsError> {
    let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
    if parts.is_empty() || parts.iter().any(|p| *p == "." || *p == "..") || path.contains('\0') {
        return Err(InitramfsError::BadPath(path.into()));
    }
    Ok(parts.join("/"))
}

impl Initramfs {
    /// An empty archive.
    pub fn new() -> Self {
        Self::default()
    }

    fn insert(&mut self, path: &str, entry: Entry) -> Result<&mut Self, InitramfsError> {
        let path = normalize(path)?;
        let mut parent = String::new();
        for part in path
            .split('/')
            .collect::<Vec<_>>()
            .split_last()
            .map_or(&[][..], |(_, p)| p)
        {
            if !parent.is_empty() {
                parent.push('/');
            }
            parent.push_str(part);
            self.entries
                .entry(parent.clone())
                .or_insert(Entry::Dir { mode: 0o755 });
        }
        self.entries.insert(path, entry);
        Ok(self)
    }

    /// Adds a directory.
    pub fn dir(&mut self, path: &str, mode: u32) -> Result<&mut Self, InitramfsError> {
        self.insert(
            path,
            Entry::Dir {
                mode: mode & 0o7777,
            },
        )
    }

    /// Adds a regular file.
    pub fn file(
        &mut self,
        path: &str,
        mode: u32,
        data: Vec<u8>,
    ) -> Result<&mut Self, InitramfsError> {
        if u32::try_from(data.len()).is_err() {
            return Err(InitramfsError::TooLarge(path.into(), data.len()));
        }
        self.insert(
            path,
            Entry::File {
                mode: mode & 0o7777,
                data,
            },
        )
    }

    /// Adds a symbolic link.
    pub fn symlink(&mut self, path: &str, target: &str) -> Result<&mut Self, InitramfsError> {
        self.insert(
            path,
            Entry::Symlink {
                target: target.into(),
            },
        )
    }

    /// Writes the archive.
    pub fn write<W: Write>(&self, out: W, compression: Compression) -> Result<(), InitramfsError> {
        match compression {
            Compression::None => self.write_cpio(out),
            Compression::Gzip => {
                let mut gz = flate2::GzBuilder::new()
                    .mtime(0)
                    .write(out, flate2::Compression::best());
                self.write_cpio(&mut gz)?;
                gz.finish()?;
                Ok(())
            }
        }
    }

    /// The archive as bytes.
    pub fn to_bytes(&self, compression: Compression) -> Result<Vec<u8>, InitramfsError> {
        let mut v = Vec::new();
        self.write(&mut v, compression)?;
        Ok(v)
    }

    fn write_cpio<W: Write>(&self, mut out: W) -> Result<(), InitramfsError> {
        let mut offset = 0usize;
        for (ino, (path, entry)) in self.entries.iter().enumerate() {
            let (mode, data): (u32, &[u8]) = match entry {
                Entry::Dir { mode } => (0o040000 | mode, &[]),
                Entry::File { mode, data } => (0o100000 | mode, data),
                Entry::Symlink { target } => (0o120777, target.as_bytes()),
            };
            let nlink = if matches!(entry, Entry::Dir { .. }) {
                2
            } else {
                1
            };
            offset += record(&mut out, ino as u32 + 1, mode, nlink, path, data, offset)?;
        }
        record(&mut out, 0, 0, 1, "TRAILER!!!", &[], offset)?;
        Ok(())
    }
}

/// Writes one newc record starting at archive offset `offset`; returns its length.
fn record<W: Write>(
    out: &mut W,
    ino: u32,
    mode: u32,
    nlink: u32,
    name: &str,
    data: &[u8],
    offset: usize,
) -> std::io::Result<usize> {
    let namesize = name.len() + 1;
    let fields = [
        ino,
        mode,
        0,
        0,
        nlink,
        0,
        data.len() as u32,
        0,
        0,
        0,
        0,
        namesize as u32,
        0,
    ];
    let mut header = String::from("070701");
    for f in fields {
        header += &format!("{f:08x}");
    }
    let pad = |n: usize| (4 - n % 4) % 4;
    let mut len = 0;
    let mut put = |b: &[u8]| -> std::io::Result<()> {
        out.write_all(b)?;
        len += b.len();
        Ok(())
    };
    put(header.as_bytes())?;
    put(name.as_bytes())?;
    put(&[0])?;
    put(&[0; 3][..pad(offset + 110 + namesize)])?;
    put(data)?;
    put(&[0; 3][..pad(data.len())])?;
    Ok(len)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Initramfs {
        let mut i = Initramfs::new();
        i.file("init", 0o755, b"#!/bin/sh\necho hi\n".to_vec())
            .unwrap();
        i.file("etc/hostname", 0o644, b"runv\n".to_vec()).unwrap();
        i.symlink("bin/sh", "busybox").unwrap();
        i
    }

    #[test]
    fn reproducible_and_readable_by_cpio() {
        let a = sample().to_bytes(Compression::None).unwrap();
        assert_eq!(a, sample().to_bytes(Compression::None).unwrap());
        assert_eq!(a.len() % 4, 0);
        let gz = sample().to_bytes(Compression::Gzip).unwrap();
        assert_eq!(gz, sample().to_bytes(Compression::Gzip).unwrap());
        assert_eq!(&gz[..2], &[0x1f, 0x8b]);
        // GNU cpio, when installed, must list exactly our entries.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("i.cpio");
        std::fs::write(&path, &a).unwrap();
        if let Ok(out) = std::process::Command::new("cpio")
            .args(["-it", "--quiet", "-F"])
            .arg(&path)
            .output()
        {
            let listed = String::from_utf8(out.stdout).unwrap();
            assert_eq!(listed, "bin\nbin/sh\netc\netc/hostname\ninit\n");
        }
    }

    #[test]
    fn header_fields_and_alignment() {
        let a = sample().to_bytes(Compression::None).unwrap();
        assert!(a.starts_with(b"070701"));
        // First entry is "bin": a directory with mode 040755.
        assert_eq!(&a[14..22], b"000041ed");
        assert_eq!(&a[110..114], b"bin\0");
        let text = String::from_utf8_lossy(&a);
        assert!(text.contains("TRAILER!!!"));
        assert!(text.contains("#!/bin/sh\necho hi\n"));
    }

    #[test]
    fn bad_paths_are_refused() {
        let mut i = Initramfs::new();
        for p in ["", "/", "a/../b", "./x", "a\0b"] {
            assert!(
                matches!(i.file(p, 0o644, vec![]), Err(InitramfsError::BadPath(_))),
                "{p:?}"
            );
        }
    }
}
