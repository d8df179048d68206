//! Loading an OCI bundle: `config.json` (untrusted input: every failure is an error value) and
//! its root file system.

use std::path::{Path, PathBuf};

use oci_spec::runtime::Spec;

/// Why a bundle cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    /// The bundle directory is missing or unreadable.
    #[error("bundle {0}: {1} (pass the directory holding config.json with --bundle)")]
    Dir(PathBuf, std::io::Error),
    /// No readable config.json.
    #[error("bundle {0}: cannot read config.json: {1} (create one with `runv spec`)")]
    Config(PathBuf, std::io::Error),
    /// config.json is not an OCI runtime spec.
    #[error("bundle {0}: config.json is not a valid OCI runtime spec: {1}")]
    Invalid(PathBuf, serde_json::Error),
    /// An `ociVersion` this runtime does not implement.
    #[error("bundle {0}: unsupported ociVersion {1:?} (runv accepts 1.0.x to 1.2.x)")]
    Version(PathBuf, String),
    /// No `process` to run.
    #[error("bundle {0}: config.json has no process (process.args is required)")]
    NoProcess(PathBuf),
    /// No `root`.
    #[error("bundle {0}: config.json has no root (root.path is required)")]
    NoRoot(PathBuf),
    /// The root file system is not a directory.
    #[error("bundle {0}: root file system {1} is not a directory (unpack the image there or fix root.path)")]
    Rootfs(PathBuf, PathBuf),
}

/// A checked bundle.
#[derive(Debug, Clone)]
pub struct Bundle {
    /// Absolute bundle directory.
    pub dir: PathBuf,
    /// Its `config.json`.
    pub spec: Spec,
    /// Absolute root file system directory.
    pub rootfs: PathBuf,
}

/// Accepted `ociVersion`s: 1.0.x, 1.1.x, 1.2.x (pre-release suffixes allowed).
pub fn version_supported(v: &str) -> bool {
    let core = v.split(['-', '+']).next().unwrap_or("");
    let mut parts = core.split('.');
    let (Some(major), Some(minor), Some(patch), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return false;
    };
    major == "1"
        && matches!(minor, "0" | "1" | "2")
        && !patch.is_empty()
        && patch.bytes().all(|b| b.is_ascii_digit())
}

impl Bundle {
    /// Loads and checks the bundle in `dir`.
    pub fn load(dir: &Path) -> Result<Self, BundleError> {
        let dir = std::fs::canonicalize(dir).map_err(|e| BundleError::Dir(dir.into(), e))?;
        let text = std::fs::read(dir.join("config.json"))
            .map_err(|e| BundleError::Config(dir.clone(), e))?;
        // Check the version on the raw JSON first: a newer spec may not even decode.
        let raw: serde_json::Value =
            serde_json::from_slice(&text).map_err(|e| BundleError::Invalid(dir.clone(), e))?;
        let version = raw
            .get("ociVersion")
            .and_then(|v| v.as_str())
            .unwrap_or("")
            .to_string();
        if !version_supported(&version) {
            return Err(BundleError::Version(dir, version));
        }
        let spec: Spec =
            serde_json::from_value(raw).map_err(|e| BundleError::Invalid(dir.clone(), e))?;
        if spec
            .process()
            .as_ref()
            .and_then(|p| p.args().as_ref())
            .is_none_or(|a| a.is_empty())
        {
            return Err(BundleError::NoProcess(dir));
        }
        let Some(root) = spec.root() else {
            return Err(BundleError::NoRoot(dir));
        };
        let rootfs = dir.join(root.path());
        if !std::fs::metadata(&rootfs).is_ok_and(|m| m.is_dir()) {
            return Err(BundleError::Rootfs(dir, rootfs));
        }
        Ok(Self { dir, spec, rootfs })
    }
}

#[cfg(test)]
mod tests {
    use super::version_supported;

    #[test]
    fn versions() {
        for ok in ["1.0.0", "1.0.2-dev", "1.1.0", "1.2.0", "1.2.1+x"] {
            assert!(version_supported(ok), "{ok}");
        }
        for bad in ["", "1.3.0", "2.0.0", "0.9.0", "1.0", "1.0.x", "1.2.0.1"] {
            assert!(!version_supported(bad), "{bad}");
        }
    }
}
