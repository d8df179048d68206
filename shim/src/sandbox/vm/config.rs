//! Where the `vm` backend finds its template and pool: `--template` / `RUNV_TEMPLATE`, then
//! the config file (`RUNV_CONFIG`, default `/etc/runv/config.toml`), then built-in defaults.
//!
//! The file is a flat `key = "value"` list (TOML's subset runv needs; `#` starts a comment):
//! `template`, `pool_socket`, `state_dir`, `run_dir`, `tmpfs_dir`, `vmm`, `image_cache`,
//! `agent_port`, `agent_timeout_ms`; `sandbox` (the backend choice, read by the containerd shim)
//! is allowed and ignored here.

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::VmError;

/// The default config file.
pub const DEFAULT_CONFIG: &str = "/etc/runv/config.toml";
/// The vsock port `runv-agent` listens on in a guest.
pub const AGENT_PORT: u32 = 1024;

/// Everything the `vm` backend needs to get a sandbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmConfig {
    /// Template to clone.
    pub template: String,
    /// The `runv-pool` daemon's socket (used when it answers).
    pub pool_socket: PathBuf,
    /// State directory of the embedded pool (the daemon's `--state-dir`).
    pub state_dir: PathBuf,
    /// Sockets and logs of the embedded pool's VMs.
    pub run_dir: PathBuf,
    /// tmpfs directory of the embedded pool's template copies.
    pub tmpfs_dir: PathBuf,
    /// `runv-vmm` for the embedded pool (`None`: `RUNV_VMM`, next to this executable, `PATH`).
    pub vmm: Option<PathBuf>,
    /// EROFS image cache.
    pub image_cache: PathBuf,
    /// vsock port of the guest's agent.
    pub agent_port: u32,
    /// How long the agent may take to answer the first `ping` after the clone runs.
    pub agent_timeout: Duration,
}

impl VmConfig {
    /// Defaults for template `template`.
    pub fn new(template: impl Into<String>) -> Self {
        Self {
            template: template.into(),
            pool_socket: "/run/runv/pool.sock".into(),
            state_dir: "/var/lib/runv".into(),
            run_dir: "/run/runv".into(),
            tmpfs_dir: "/dev/shm/runv".into(),
            vmm: None,
            image_cache: crate::image::DEFAULT_CACHE_DIR.into(),
            agent_port: AGENT_PORT,
            agent_timeout: Duration::from_secs(2),
        }
    }

    /// Resolves the configuration: `template` (from `--template`), else `RUNV_TEMPLATE`, else
    /// the file's `template`; the other keys from the file (`RUNV_CONFIG` or
    /// [`DEFAULT_CONFIG`], a missing file is no error).
    pub fn resolve(template: Option<&str>) -> Result<Self, VmError> {
        let path = std::env::var_os("RUNV_CONFIG")
            .map(PathBuf::from)
            .unwrap_or_else(|| DEFAULT_CONFIG.into());
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(VmError::Config(path, e.to_string())),
        };
        let env = std::env::var("RUNV_TEMPLATE")
            .ok()
            .filter(|t| !t.is_empty());
        Self::from_text(&text, &path, template.map(str::to_owned).or(env))
    }

    /// Parses config file `text` (read from `path`, for messages); `template` wins over the
    /// file's.
    pub fn from_text(text: &str, path: &Path, template: Option<String>) -> Result<Self, VmError> {
        let mut cfg = Self::new(template.clone().unwrap_or_default());
        let bad =
            |line: usize, why: &str| VmError::Config(path.into(), format!("line {line}: {why}"));
        for (n, raw) in text.lines().enumerate() {
            let line = raw.split('#').next().unwrap_or("").trim();
            if line.is_empty() {
                continue;
            }
            let (key, value) = line
                .split_once('=')
                .ok_or_else(|| bad(n + 1, "expected key = \"value\""))?;
            let value = value.trim();
            let value = value
                .strip_prefix('"')
                .and_then(|v| v.strip_suffix('"'))
                .unwrap_or(value);
            let num = |what: &str| {
                value
                    .parse::<u64>()
                    .map_err(|_| bad(n + 1, &format!("{what} must be a number")))
            };
            match key.trim() {
                "template" if template.is_none() => cfg.template = value.into(),
                "template" | "sandbox" => {}
                "pool_socket" => cfg.pool_socket = value.into(),
                "state_dir" => cfg.state_dir = value.into(),
                "run_dir" => cfg.run_dir = value.into(),
                "tmpfs_dir" => cfg.tmpfs_dir = value.into(),
                "vmm" => cfg.vmm = Some(value.into()),
                "image_cache" => cfg.image_cache = value.into(),
                "agent_port" => {
                    cfg.agent_port = u32::try_from(num("agent_port")?)
                        .map_err(|_| bad(n + 1, "agent_port is too large"))?
                }
                "agent_timeout_ms" => {
                    cfg.agent_timeout = Duration::from_millis(num("agent_timeout_ms")?)
                }
                other => return Err(bad(n + 1, &format!("unknown key {other:?}"))),
            }
        }
        if cfg.template.is_empty() {
            return Err(VmError::NoTemplate);
        }
        Ok(cfg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_keys_and_template_precedence() {
        let text =
            "# runv\ntemplate = \"py\"\nstate_dir = \"/s\"\nagent_timeout_ms = 500\nvmm=/v\n";
        let c = VmConfig::from_text(text, Path::new("/c"), None).unwrap();
        assert_eq!(c.template, "py");
        assert_eq!(c.state_dir, PathBuf::from("/s"));
        assert_eq!(c.vmm, Some(PathBuf::from("/v")));
        assert_eq!(c.agent_timeout, Duration::from_millis(500));
        assert_eq!(c.agent_port, AGENT_PORT);
        let c = VmConfig::from_text(text, Path::new("/c"), Some("go".into())).unwrap();
        assert_eq!(c.template, "go");
    }

    #[test]
    fn errors_name_the_file_and_line() {
        let e = VmConfig::from_text("template = x\nbogus = 1\n", Path::new("/c"), None)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("/c") && e.contains("line 2") && e.contains("bogus"),
            "{e}"
        );
        let e = VmConfig::from_text("agent_port = x\n", Path::new("/c"), Some("t".into()))
            .unwrap_err()
            .to_string();
        assert!(e.contains("number"), "{e}");
        assert!(matches!(
            VmConfig::from_text("", Path::new("/c"), None),
            Err(VmError::NoTemplate)
        ));
    }
}
