//! The daemon: the HTTP/1.1 + JSON API of `docs/pool-api.md` over a Unix socket, on top of a
//! [`Pool`]. Every pool operation that may block runs in `spawn_blocking`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path as UrlPath, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, put};
use axum::{Json, Router};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::manager::{AcquireRequest, ErrorClass, Pool, PoolConfig, PoolError};
use crate::metrics::Metrics;
use crate::sandbox::{PoolTargets, SandboxInfo};
use crate::template::{ReadyCheck, TemplateSpec};

/// Largest request body accepted (413 beyond).
pub const MAX_BODY: usize = 64 * 1024;
/// Most labels on one sandbox, and the longest key or value.
const MAX_LABELS: usize = 32;
const MAX_LABEL_LEN: usize = 256;
/// The file leased sandboxes are recorded in across restarts.
pub const SANDBOXES_FILE: &str = "sandboxes.json";

/// Shared state of the handlers.
pub struct Daemon {
    pool: Pool,
    metrics: Metrics,
}

/// An API error: a status and `{"error": "..."}`.
#[derive(Debug)]
pub struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        #[derive(Serialize)]
        struct E {
            error: String,
        }
        (self.0, Json(E { error: self.1 })).into_response()
    }
}

impl From<PoolError> for ApiError {
    fn from(e: PoolError) -> Self {
        let status = match e.class() {
            ErrorClass::BadRequest => StatusCode::BAD_REQUEST,
            ErrorClass::NotFound => StatusCode::NOT_FOUND,
            ErrorClass::Conflict => StatusCode::CONFLICT,
            ErrorClass::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError(status, e.to_string())
    }
}

fn bad(msg: impl Into<String>) -> ApiError {
    ApiError(StatusCode::BAD_REQUEST, msg.into())
}

type ApiResult<T> = Result<T, ApiError>;

/// Reads a JSON body of at most [`MAX_BODY`] bytes.
async fn json_body<T: DeserializeOwned>(body: Body) -> ApiResult<T> {
    let bytes = axum::body::to_bytes(body, MAX_BODY).await.map_err(|_| {
        ApiError(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("request body over {MAX_BODY} bytes: send a smaller body"),
        )
    })?;
    serde_json::from_slice(&bytes).map_err(|e| bad(format!("invalid JSON body: {e}")))
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, PoolError> + Send + 'static,
) -> ApiResult<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, format!("worker: {e}")))?
        .map_err(ApiError::from)
}

/// Body of `POST /v1/templates`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct BuildBody {
    name: String,
    kernel: PathBuf,
    #[serde(default)]
    initrd: Option<PathBuf>,
    #[serde(default)]
    cmdline: String,
    #[serde(default)]
    mem_mib: Option<u64>,
    #[serde(default)]
    vcpus: Option<u8>,
    #[serde(default)]
    ready: ReadyCheck,
    #[serde(default = "default_slots")]
    slots: u8,
    #[serde(default)]
    net: bool,
    #[serde(default)]
    mem_mode: vmm_api::MemoryMode,
    #[serde(default)]
    warmup_ms: u64,
}

/// Body of `POST /v1/sandboxes`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AcquireBody {
    template: String,
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    ttl_s: Option<u64>,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    #[serde(default)]
    network: Option<bool>,
}

#[derive(Debug, Deserialize)]
struct ForceQuery {
    #[serde(default)]
    force: bool,
}

type St = State<Arc<Daemon>>;

/// A path parameter, or a JSON 400 that says what is wrong with it.
type Seg = Result<UrlPath<String>, PathRejection>;

fn seg(p: Seg) -> ApiResult<String> {
    p.map(|UrlPath(s)| s)
        .map_err(|e| bad(format!("bad path parameter: {e}")))
}

async fn build_template(State(d): St, body: Body) -> ApiResult<Response> {
    let b: BuildBody = json_body(body).await?;
    let spec = TemplateSpec {
        kernel: b.kernel,
        initrd: b.initrd,
        cmdline: b.cmdline,
        mem_mib: b.mem_mib.unwrap_or(128),
        vcpus: b.vcpus.unwrap_or(1),
        ready: b.ready,
        slots: b.slots,
        net: b.net,
        mem_mode: b.mem_mode,
        warmup_ms: b.warmup_ms,
    };
    let d2 = d.clone();
    let info = blocking(move || d2.pool.build_template(&b.name, &spec)).await?;
    d.metrics.built(info.build_s);
    Ok((StatusCode::CREATED, Json(info)).into_response())
}

async fn list_templates(State(d): St) -> Response {
    Json(d.pool.templates()).into_response()
}

async fn get_template(State(d): St, name: Seg) -> ApiResult<Response> {
    let name = seg(name)?;
    match d.pool.template(&name) {
        Ok(t) => Ok(Json(t).into_response()),
        // Not built yet: where its build is, if one runs.
        Err(e) => match d.pool.build_progress(&name) {
            Some(p) => Ok(Json(p).into_response()),
            None => Err(e.into()),
        },
    }
}

async fn delete_template(
    State(d): St,
    name: Seg,
    q: Result<Query<ForceQuery>, QueryRejection>,
) -> ApiResult<Response> {
    let name = seg(name)?;
    let Query(q) = q.map_err(|e| bad(format!("{e}: use ?force=true or ?force=false")))?;
    blocking(move || d.pool.remove_template(&name, q.force)).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn set_pool(State(d): St, name: Seg, body: Body) -> ApiResult<Response> {
    let name = seg(name)?;
    let targets: PoolTargets = json_body(body).await?;
    Ok(Json(blocking(move || d.pool.set_pool(&name, targets)).await?).into_response())
}

async fn list_pools(State(d): St) -> Response {
    Json(d.pool.pools()).into_response()
}

async fn acquire(State(d): St, body: Body) -> ApiResult<Response> {
    let b: AcquireBody = json_body(body).await?;
    if b.labels.len() > MAX_LABELS
        || b.labels
            .iter()
            .any(|(k, v)| k.len() > MAX_LABEL_LEN || v.len() > MAX_LABEL_LEN)
    {
        return Err(bad(format!(
            "labels: at most {MAX_LABELS}, keys and values at most {MAX_LABEL_LEN} bytes"
        )));
    }
    if b.ttl_s == Some(0) || b.ttl_s.is_some_and(|t| t > 365 * 86400) {
        return Err(bad("ttl_s: use 1 to 31536000 seconds, or leave it out"));
    }
    let req = AcquireRequest {
        template: b.template,
        id: b.id,
        ttl: b.ttl_s.map(Duration::from_secs),
        labels: b.labels,
        network: b.network,
    };
    let d2 = d.clone();
    let info = blocking(move || d2.pool.acquire(req)).await?;
    d.metrics.acquired(info.tier, info.acquire_ms);
    Ok((StatusCode::CREATED, Json(info)).into_response())
}

async fn list_sandboxes(State(d): St) -> Response {
    Json(d.pool.sandboxes()).into_response()
}

async fn get_sandbox(State(d): St, id: Seg) -> ApiResult<Response> {
    Ok(Json(d.pool.sandbox(&seg(id)?)?).into_response())
}

async fn release(State(d): St, id: Seg) -> ApiResult<Response> {
    d.pool.release(&seg(id)?)?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn metrics(State(d): St) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        d.metrics.render(&d.pool),
    )
        .into_response()
}

async fn healthz() -> Response {
    Json(serde_json::json!({"ok": true})).into_response()
}

async fn not_found() -> ApiError {
    ApiError(
        StatusCode::NOT_FOUND,
        "no such endpoint: see docs/pool-api.md (paths start with /v1/)".into(),
    )
}

async fn method_not_allowed() -> ApiError {
    ApiError(
        StatusCode::METHOD_NOT_ALLOWED,
        "this method is not served on this path: see docs/pool-api.md".into(),
    )
}

/// The API's routes.
pub fn router(d: Arc<Daemon>) -> Router {
    Router::new()
        .route("/v1/templates", get(list_templates).post(build_template))
        .route(
            "/v1/templates/{name}",
            get(get_template).delete(delete_template),
        )
        .route("/v1/pools", get(list_pools))
        .route("/v1/pools/{template}", put(set_pool))
        .route("/v1/sandboxes", get(list_sandboxes).post(acquire))
        .route("/v1/sandboxes/{id}", get(get_sandbox).delete(release))
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(d)
}

/// Binds `<run_dir>/pool.sock` (mode 0600), refusing if another live daemon listens on it.
fn bind(path: &Path) -> anyhow::Result<tokio::net::UnixListener> {
    use std::os::unix::fs::PermissionsExt;
    if path.exists() {
        if let Ok(s) = std::os::unix::net::UnixStream::connect(path) {
            // The listener may outlive a killed daemon in a process that inherited it (a child
            // between its fork and exec): only a live listening process is another daemon.
            match listener_pid(s) {
                Some(pid) if crate::manager::pid_alive(pid) => anyhow::bail!(
                    "another runv-pool daemon (pid {pid}) answers on {}: stop it first or use another --run-dir",
                    path.display()
                ),
                pid => tracing::warn!(
                    "{} still accepts connections, but the process that listens on it ({}) is gone: taking it over",
                    path.display(),
                    pid.map_or("unknown".into(), |p| format!("pid {p}"))
                ),
            }
        }
        std::fs::remove_file(path)?;
    }
    let l = tokio::net::UnixListener::bind(path)
        .map_err(|e| anyhow::anyhow!("binding {}: {e}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(l)
}

/// The pid of the process that called `listen` on the socket `s` is connected to (`SO_PEERCRED`).
fn listener_pid(s: std::os::unix::net::UnixStream) -> Option<u32> {
    s.set_nonblocking(true).ok()?;
    let s = tokio::net::UnixStream::from_std(s).ok()?;
    let pid = s.peer_cred().ok()?.pid()?;
    u32::try_from(pid).ok().filter(|&p| p > 0)
}

/// Runs the daemon until SIGTERM/SIGINT: opens the pool, re-adopts the sandboxes recorded in
/// `<state_dir>/sandboxes.json`, serves, then stops refilling, shuts pooled VMs down and records
/// the leased sandboxes (left running) for the next start.
pub async fn serve(cfg: PoolConfig) -> anyhow::Result<()> {
    let sock = cfg.run_dir.join("pool.sock");
    let record = cfg.state_dir.join(SANDBOXES_FILE);
    // Bind first: a second daemon on the same directories must not adopt the first one's VMs.
    std::fs::create_dir_all(&cfg.run_dir)
        .map_err(|e| anyhow::anyhow!("creating {}: {e}", cfg.run_dir.display()))?;
    let listener = bind(&sock)?;
    let c2 = cfg.clone();
    let pool = tokio::task::spawn_blocking(move || Pool::open(c2)).await??;
    let recorded: Vec<SandboxInfo> = std::fs::read(&record)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default();
    let pool = tokio::task::spawn_blocking(move || {
        for info in recorded {
            let id = info.id.clone();
            if pool.adopt(info) {
                tracing::info!("re-adopted sandbox {id}");
            } else {
                tracing::info!("sandbox {id} did not survive; cleaned up");
            }
        }
        let orphans = pool.clean_orphans();
        if orphans > 0 {
            tracing::info!("shut down {orphans} VMs an earlier daemon left behind");
        }
        pool
    })
    .await?;
    pool.record_to(record.clone());
    let daemon = Arc::new(Daemon {
        pool,
        metrics: Metrics::new(),
    });
    tracing::info!("runv-pool serving on {}", sock.display());
    let app = router(daemon.clone());
    axum::serve(listener, app)
        .with_graceful_shutdown(async {
            use tokio::signal::unix::{signal, SignalKind};
            let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
            let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
            tokio::select! {
                _ = term.recv() => {},
                _ = int.recv() => {},
            }
            tracing::info!("stopping");
        })
        .await?;
    let _ = std::fs::remove_file(&sock);
    let kept = tokio::task::spawn_blocking(move || daemon.pool.shutdown(true)).await?;
    let tmp = record.with_extension("json.tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(&kept)?)?;
    std::fs::rename(&tmp, &record)?;
    tracing::info!(
        "{} leased sandboxes left running, recorded in {}",
        kept.len(),
        record.display()
    );
    Ok(())
}

/// A build request without `slots` gets runv's default.
fn default_slots() -> u8 {
    crate::template::DEFAULT_BUILD_SLOTS
}
