//! Where clones come from: the `runv-pool` daemon (HTTP over its Unix socket, docs/pool-api.md)
//! when it answers, else a `pool_manager::Pool` embedded in this process.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use pool_manager::{AcquireRequest, Pool, PoolConfig, SandboxInfo};

use super::{VmConfig, VmError};

/// A source of clones.
#[derive(Clone)]
pub enum Source {
    /// The daemon listening on this socket.
    Daemon(PathBuf),
    /// A pool in this process (shared with other users of the `Arc`).
    Embedded(Arc<Pool>),
}

impl std::fmt::Debug for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Daemon(p) => write!(f, "Daemon({})", p.display()),
            Self::Embedded(_) => f.write_str("Embedded"),
        }
    }
}

impl Source {
    /// The daemon when its socket accepts a connection, else a pool opened over
    /// `cfg.state_dir` (with one refill worker).
    pub fn open(cfg: &VmConfig) -> Result<Self, VmError> {
        if UnixStream::connect(&cfg.pool_socket).is_ok() {
            return Ok(Self::Daemon(cfg.pool_socket.clone()));
        }
        let vmm = match &cfg.vmm {
            Some(v) => v.clone(),
            None => find_vmm().ok_or(VmError::NoVmm)?,
        };
        let pool = Pool::open(PoolConfig {
            vmm,
            state_dir: cfg.state_dir.clone(),
            run_dir: cfg.run_dir.clone(),
            tmpfs_dir: cfg.tmpfs_dir.clone(),
            refill_workers: 1,
            // The pool's default: every VMM jailed (disks reach a jailed clone as descriptors).
            jail: Some(pool_manager::ShellJail::pool_default()),
        })
        .map_err(|e| {
            VmError::Pool(format!(
                "opening the pool in {}: {e}",
                cfg.state_dir.display()
            ))
        })?;
        Ok(Self::Embedded(Arc::new(pool)))
    }

    /// Whether `template` exists (and is ready) here.
    pub fn check_template(&self, template: &str) -> Result<(), VmError> {
        let status = match self {
            Self::Daemon(sock) => {
                let (code, body) = http(sock, "GET", &format!("/v1/templates/{template}"), None)?;
                if code == 404 {
                    return Err(VmError::UnknownTemplate(
                        template.into(),
                        sock.display().to_string(),
                    ));
                }
                if code != 200 {
                    return Err(VmError::Pool(format!(
                        "template {template}: HTTP {code}: {body}"
                    )));
                }
                let v: serde_json::Value = serde_json::from_str(&body)
                    .map_err(|e| VmError::Pool(format!("template {template}: bad reply: {e}")))?;
                (v["status"].as_str().unwrap_or("") == "ready")
                    .then_some(())
                    .ok_or_else(|| v["reason"].as_str().unwrap_or("broken").to_string())
            }
            Self::Embedded(p) => match p.template(template) {
                Ok(t) => match t.status {
                    pool_manager::TemplateStatus::Ready => Ok(()),
                    pool_manager::TemplateStatus::Broken(r) => Err(r),
                },
                Err(_) => {
                    return Err(VmError::UnknownTemplate(
                        template.into(),
                        p.config().state_dir.display().to_string(),
                    ))
                }
            },
        };
        status.map_err(|reason| {
            VmError::Pool(format!(
                "template {template} is broken: {reason}; rebuild it"
            ))
        })
    }

    /// How many disk slots `template` declares (its `slots`).
    pub fn template_slots(&self, template: &str) -> Result<usize, VmError> {
        let slots = match self {
            Self::Daemon(sock) => {
                let (code, body) = http(sock, "GET", &format!("/v1/templates/{template}"), None)?;
                if code != 200 {
                    return Err(VmError::Pool(format!(
                        "template {template}: HTTP {code}: {body}"
                    )));
                }
                let v: serde_json::Value = serde_json::from_str(&body)
                    .map_err(|e| VmError::Pool(format!("template {template}: bad reply: {e}")))?;
                v["spec"]["slots"].as_u64()
            }
            Self::Embedded(p) => p
                .template(template)
                .ok()
                .and_then(|t| t.spec)
                .map(|s| u64::from(s.slots)),
        };
        slots
            .map(|n| usize::try_from(n).unwrap_or(0))
            .ok_or_else(|| {
                VmError::Pool(format!(
                    "template {template}: its metadata (disk slots) is unreadable; rebuild it"
                ))
            })
    }

    /// Leases a clone of `template`, labelled with the container id; `network` as in
    /// [`AcquireRequest::network`] (`None`: the pool's setting, `Some(false)`: none).
    pub fn acquire(
        &self,
        template: &str,
        container: &str,
        network: Option<bool>,
    ) -> Result<SandboxInfo, VmError> {
        match self {
            Self::Daemon(sock) => {
                let mut body = serde_json::json!({
                    "template": template,
                    "labels": {"runv.container": container},
                });
                if let Some(n) = network {
                    body["network"] = n.into();
                }
                let (code, body) = http(sock, "POST", "/v1/sandboxes", Some(&body))?;
                if code != 201 {
                    return Err(VmError::Pool(format!(
                        "acquiring a clone of {template} from {}: HTTP {code}: {body}",
                        sock.display()
                    )));
                }
                serde_json::from_str(&body)
                    .map_err(|e| VmError::Pool(format!("the daemon's sandbox reply: {e}")))
            }
            Self::Embedded(p) => {
                let mut req = AcquireRequest {
                    template: template.into(),
                    network,
                    ..Default::default()
                };
                req.labels.insert("runv.container".into(), container.into());
                p.acquire(req)
                    .map_err(|e| VmError::Pool(format!("acquiring a clone of {template}: {e}")))
            }
        }
    }

    /// Releases sandbox `id` (its VMM is shut down).
    pub fn release(&self, id: &str) -> Result<(), VmError> {
        match self {
            Self::Daemon(sock) => {
                let (code, body) = http(sock, "DELETE", &format!("/v1/sandboxes/{id}"), None)?;
                match code {
                    204 | 404 => Ok(()),
                    _ => Err(VmError::Pool(format!(
                        "releasing sandbox {id}: HTTP {code}: {body}"
                    ))),
                }
            }
            Self::Embedded(p) => match p.release(id) {
                Ok(()) | Err(pool_manager::PoolError::NotFound(_)) => Ok(()),
                Err(e) => Err(VmError::Pool(format!("releasing sandbox {id}: {e}"))),
            },
        }
    }
}

/// `runv-vmm`: `$RUNV_VMM`, next to the running executable, then `$PATH`.
pub fn find_vmm() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("RUNV_VMM") {
        return Some(PathBuf::from(p)).filter(|p| p.is_file());
    }
    let beside = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(|d| d.join("runv-vmm")));
    let path = std::env::var_os("PATH").unwrap_or_default();
    beside
        .into_iter()
        .chain(std::env::split_paths(&path).map(|d| d.join("runv-vmm")))
        .find(|p| p.is_file())
}

/// One HTTP/1.1 request to the daemon (one connection, `Connection: close`): status and body.
fn http(
    sock: &Path,
    method: &str,
    path: &str,
    body: Option<&serde_json::Value>,
) -> Result<(u16, String), VmError> {
    let fail = |e: std::io::Error| {
        VmError::Pool(format!(
            "runv-pool daemon at {} ({method} {path}): {e}; is `runv-pool serve` running?",
            sock.display()
        ))
    };
    let mut s = UnixStream::connect(sock).map_err(fail)?;
    s.set_read_timeout(Some(Duration::from_secs(60)))
        .map_err(fail)?;
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: runv-pool\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).map_err(fail)?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).map_err(fail)?;
    let bad = || {
        VmError::Pool(format!(
            "the runv-pool daemon at {} sent a malformed HTTP reply",
            sock.display()
        ))
    };
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(bad)?;
    let head = String::from_utf8_lossy(&raw[..end]).to_ascii_lowercase();
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(bad)?;
    let mut body = raw[end + 4..].to_vec();
    if head.contains("transfer-encoding: chunked") {
        body = dechunk(&body).ok_or_else(bad)?;
    }
    Ok((code, String::from_utf8_lossy(&body).into_owned()))
}

fn dechunk(mut b: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let eol = b.windows(2).position(|w| w == b"\r\n")?;
        let size = usize::from_str_radix(std::str::from_utf8(&b[..eol]).ok()?.trim(), 16).ok()?;
        b = b.get(eol + 2..)?;
        if size == 0 {
            return Some(out);
        }
        out.extend_from_slice(b.get(..size)?);
        b = b.get(size + 2..)?;
    }
}
