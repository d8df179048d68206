//! The runtime v2 Task service: containerd's requests turned into agent requests on the shim's
//! one sandbox, stdio relayed between containerd's fifos and the agent's streams, and the task
//! events published back to containerd.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use containerd_shim::api;
use containerd_shim::protos::cgroups::metrics;
use containerd_shim::protos::events::task as ev;
use containerd_shim::protos::protobuf::{EnumOrUnknown, MessageDyn, MessageField};
use containerd_shim::protos::ttrpc::{self, Code};
use containerd_shim::publisher::RemotePublisher;
use containerd_shim::{ExitSignal, TtrpcContext, TtrpcResult};
use protocol::client::Client;
use protocol::{ErrorCode, Request, Response, RootfsSource, StdioConfig, Streams};

use super::backend::{self, Owner};
use super::process::{timestamp, Exit, ExitCell, Phase, Proc};
use super::rootfs;
use super::stdio::{self, Paths, StdinCloser};
use crate::relay::{relay_from, HostIo};
use crate::sandbox::{manage, Kind};
use crate::state::ContainerDir;

/// How long Delete waits for a destroyed container's process to be reported gone.
const DESTROY_TIMEOUT: Duration = Duration::from_secs(10);

/// A task: a container and its execs.
struct Task {
    bundle: PathBuf,
    mounted: bool,
    /// Paused (Pause answered, no Resume yet).
    paused: bool,
    init: Proc,
    execs: HashMap<String, Proc>,
}

/// The shim's state, shared by the ttrpc workers and the relay threads.
pub struct Inner {
    namespace: String,
    /// The sandbox's state directory (agent socket, agent state, log).
    sandbox_dir: ContainerDir,
    publisher: Mutex<RemotePublisher>,
    tasks: Mutex<HashMap<String, Task>>,
    sandbox: Mutex<Option<(Owner, Kind)>>,
    exit: Arc<ExitSignal>,
}

/// The Task service (cheap to clone).
#[derive(Clone)]
pub struct Service {
    inner: Arc<Inner>,
}

fn err(code: Code, msg: impl Into<String>) -> ttrpc::Error {
    ttrpc::Error::RpcStatus(ttrpc::get_status(code, msg.into()))
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn not_found(id: &str, exec_id: &str) -> ttrpc::Error {
    if exec_id.is_empty() {
        err(
            Code::NOT_FOUND,
            format!("task {id} not found in this runv shim"),
        )
    } else {
        err(
            Code::NOT_FOUND,
            format!("exec {exec_id} of task {id} not found"),
        )
    }
}

/// `req` on the agent connection `c`; an agent's error answer becomes a ttrpc error.
fn call_on(c: &mut Client, what: &str, req: &Request) -> TtrpcResult<Response> {
    match c.call(req) {
        Ok(Response::Error(e)) => Err(agent_error(what, Response::Error(e))),
        Ok(r) => Ok(r),
        Err(e) => Err(err(
            Code::UNAVAILABLE,
            format!("{what}: agent connection: {e}"),
        )),
    }
}

/// An agent's error reply as a ttrpc status containerd maps to its error kinds.
fn agent_error(what: &str, r: Response) -> ttrpc::Error {
    match r {
        Response::Error(e) => {
            let code = match e.code {
                ErrorCode::NotFound => Code::NOT_FOUND,
                ErrorCode::AlreadyExists => Code::ALREADY_EXISTS,
                ErrorCode::InvalidState => Code::FAILED_PRECONDITION,
                ErrorCode::BadRequest => Code::INVALID_ARGUMENT,
                ErrorCode::ResourceExhausted => Code::RESOURCE_EXHAUSTED,
                _ => Code::INTERNAL,
            };
            err(code, format!("{what}: runv-agent: {}", e.message))
        }
        other => err(
            Code::INTERNAL,
            format!("{what}: runv-agent answered {other:?}"),
        ),
    }
}

impl Service {
    /// A service for containers of `namespace` whose sandbox keeps its state in `sandbox_dir`.
    pub fn new(
        namespace: String,
        sandbox_dir: ContainerDir,
        publisher: RemotePublisher,
        exit: Arc<ExitSignal>,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                namespace,
                sandbox_dir,
                publisher: Mutex::new(publisher),
                tasks: Mutex::new(HashMap::new()),
                sandbox: Mutex::new(None),
                exit,
            }),
        }
    }

    /// Starts the sandbox on the first Create (backend chosen as [`backend::choose`] says, its
    /// network and hostname from the first container's `spec`, its root file system `first`);
    /// returns its kind.
    fn ensure_sandbox(
        &self,
        options: Option<&containerd_shim::protos::protobuf::well_known_types::any::Any>,
        spec: &oci_spec::runtime::Spec,
        first: (&str, &Path),
    ) -> TtrpcResult<Kind> {
        let mut g = lock(&self.inner.sandbox);
        if let Some((_, kind)) = g.as_ref() {
            return Ok(*kind);
        }
        let config = options.and_then(|a| backend::options_config_path(&a.type_url, &a.value));
        let choice = backend::choose(config.as_deref())
            .map_err(|e| err(Code::INVALID_ARGUMENT, e.to_string()))?;
        if choice.kind == Kind::Host {
            log::warn!(
                "runv: sandbox backend `host` selected by {}: the containers of this shim run as \
                 HOST PROCESSES WITHOUT VM ISOLATION",
                choice.source
            );
        } else {
            log::info!(
                "runv: sandbox backend `{}` selected by {}",
                choice.kind.name(),
                choice.source
            );
        }
        let fail = |e: crate::sandbox::SandboxError| {
            err(
                Code::FAILED_PRECONDITION,
                format!(
                    "runv sandbox `{}` ({}): {e}",
                    choice.kind.name(),
                    choice.source
                ),
            )
        };
        choice.kind.preflight().map_err(fail)?;
        std::fs::create_dir_all(&self.inner.sandbox_dir.path).map_err(|e| {
            err(
                Code::INTERNAL,
                format!("creating {}: {e}", self.inner.sandbox_dir.path.display()),
            )
        })?;
        let first = Some((first.0.to_string(), first.1.to_path_buf()));
        let owner = Owner::launch(
            choice.kind,
            self.inner.sandbox_dir.clone(),
            spec.clone(),
            first,
        )
        .map_err(fail)?;
        *g = Some((owner, choice.kind));
        Ok(choice.kind)
    }

    /// How container `id`'s `path` (the bundle's rootfs) reaches the agent.
    fn rootfs_source(&self, id: &str, path: &Path) -> TtrpcResult<RootfsSource> {
        let g = lock(&self.inner.sandbox);
        let (owner, _) = g.as_ref().ok_or_else(|| {
            err(
                Code::FAILED_PRECONDITION,
                "this runv shim has no sandbox yet: create a task first",
            )
        })?;
        owner.rootfs(id, path).map_err(|e| {
            err(
                Code::FAILED_PRECONDITION,
                format!("the container's root file system {}: {e}", path.display()),
            )
        })
    }

    /// Gives back container `id`'s share of the sandbox (a VM's disk slot); failures are
    /// logged (the slot is free for the next container either way).
    fn release_rootfs(&self, id: &str) {
        if let Some((owner, _)) = lock(&self.inner.sandbox).as_ref() {
            if let Err(e) = owner.release_rootfs(id) {
                log::warn!("runv: releasing the root file system of {id}: {e}");
            }
        }
    }

    /// Pauses or resumes task `id`'s sandbox (the library's [`manage::pause`], as `runv pause`
    /// does) and publishes TaskPaused / TaskResumed.
    fn pause_task(&self, id: &str, pause: bool) -> TtrpcResult<()> {
        let verb = manage::verb(pause);
        let kind = lock(&self.inner.sandbox).as_ref().map(|(_, k)| *k);
        // The agent's client before the tasks' lock: `client` takes the sandbox's.
        let agent = match kind.map(manage::freezer) {
            Some(manage::Freezer::Agent) => Some(self.client()?),
            _ => None,
        };
        let mut tasks = lock(&self.inner.tasks);
        let others = tasks.len().saturating_sub(1);
        let t = tasks.get_mut(id).ok_or_else(|| not_found(id, ""))?;
        let kind = kind.ok_or_else(|| {
            err(
                Code::FAILED_PRECONDITION,
                "this runv shim has no sandbox yet: create a task first",
            )
        })?;
        let freezer = manage::freezer(kind);
        if freezer == manage::Freezer::Vm && others > 0 {
            // A VM is paused whole: pausing one container would freeze its pod mates too.
            return Err(err(
                Code::FAILED_PRECONDITION,
                format!("task {id} shares its sandbox VM with {others} other container(s) of its pod; runv can {verb} only a sandbox holding one container"),
            ));
        }
        if t.init.phase() != Phase::Running {
            return Err(err(
                Code::FAILED_PRECONDITION,
                format!("task {id} is not running: only a running task can be {verb}d"),
            ));
        }
        if t.paused == pause {
            return Err(err(
                Code::FAILED_PRECONDITION,
                format!(
                    "task {id} is {}",
                    if pause {
                        "already paused"
                    } else {
                        "not paused"
                    }
                ),
            ));
        }
        match freezer {
            manage::Freezer::Vm => manage::pause_vm(&self.inner.sandbox_dir, pause)
                .map_err(|e| err(Code::INTERNAL, format!("task {id}: {verb}: {e}")))?,
            manage::Freezer::Agent => {
                let mut c = agent.ok_or_else(|| err(Code::INTERNAL, "no agent client"))?;
                call_on(&mut c, verb, &manage::agent_request(id, pause))?;
            }
        }
        t.paused = pause;
        drop(tasks);
        let container_id = id.to_string();
        if pause {
            self.publish(
                containerd_shim::protos::topics::TASK_PAUSED_EVENT_TOPIC,
                Box::new(ev::TaskPaused {
                    container_id,
                    ..Default::default()
                }),
            );
        } else {
            self.publish(
                containerd_shim::protos::topics::TASK_RESUMED_EVENT_TOPIC,
                Box::new(ev::TaskResumed {
                    container_id,
                    ..Default::default()
                }),
            );
        }
        Ok(())
    }

    fn client(&self) -> TtrpcResult<Client> {
        let g = lock(&self.inner.sandbox);
        let (owner, _) = g.as_ref().ok_or_else(|| {
            err(
                Code::FAILED_PRECONDITION,
                "this runv shim has no sandbox yet: create a task first",
            )
        })?;
        owner.client().map_err(|e| {
            err(
                Code::UNAVAILABLE,
                format!("reaching the sandbox's agent: {e}"),
            )
        })
    }

    /// One request on a fresh connection.
    fn call(&self, what: &str, req: &Request) -> TtrpcResult<Response> {
        call_on(&mut self.client()?, what, req)
    }

    fn publish(&self, topic: &str, event: Box<dyn MessageDyn>) {
        self.inner.publish(topic, event);
    }

    fn create_task(&self, req: &api::CreateTaskRequest, bundle: &Path) -> TtrpcResult<Task> {
        let spec_path = bundle.join("config.json");
        let text = std::fs::read(&spec_path).map_err(|e| {
            err(
                Code::INVALID_ARGUMENT,
                format!("{}: {e}", spec_path.display()),
            )
        })?;
        let mut spec: oci_spec::runtime::Spec = serde_json::from_slice(&text).map_err(|e| {
            err(
                Code::INVALID_ARGUMENT,
                format!("{}: {e}", spec_path.display()),
            )
        })?;
        super::spec::adapt(&mut spec);
        let rootfs_dir = rootfs::target(bundle);
        let kind = self.ensure_sandbox(req.options.as_ref(), &spec, (&req.id, &rootfs_dir))?;
        kind.guest_spec(&mut spec);
        let rootfs = self.rootfs_source(&req.id, &rootfs_dir)?;
        let paths = Paths {
            stdin: req.stdin.clone(),
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
            terminal: req.terminal,
        };
        let io = open_io(&paths)?;
        let mut client = self.client()?;
        let r = client
            .call(&Request::Create {
                id: req.id.clone(),
                spec: Box::new(spec),
                rootfs,
                stdio: StdioConfig {
                    terminal: req.terminal,
                    stdin: !req.stdin.is_empty(),
                },
            })
            .map_err(|e| err(Code::UNAVAILABLE, format!("creating the container: {e}")))?;
        let (pid, streams) = match r {
            Response::Created { pid, streams, .. } => (pid, streams),
            other => return Err(agent_error("creating the container", other)),
        };
        let mut init = Proc::new(paths, None);
        init.pid = pid as u32;
        let (handle, closer) =
            self.spawn_relay(&req.id, None, init.pid, client, streams, io, &init)?;
        init.relay = Some(handle);
        init.stdin = closer;
        Ok(Task {
            bundle: bundle.into(),
            mounted: false,
            paused: false,
            init,
            execs: HashMap::new(),
        })
    }

    /// Sends the wait and starts the thread relaying a process's stdio until it exits; the thread
    /// publishes TaskOOM / TaskExit and records the exit.
    #[allow(clippy::too_many_arguments)]
    fn spawn_relay(
        &self,
        id: &str,
        exec_id: Option<String>,
        pid: u32,
        mut client: Client,
        streams: Streams,
        io: (HostIo, String),
        proc_: &Proc,
    ) -> TtrpcResult<(std::thread::JoinHandle<()>, StdinCloser)> {
        let (host, stdin_path) = io;
        let wait_id = client
            .send(&Request::Wait {
                id: id.into(),
                exec_id: exec_id.clone(),
            })
            .map_err(|e| err(Code::UNAVAILABLE, format!("waiting for the process: {e}")))?;
        let (input, closer) = stdio::stdin_source(&stdin_path)
            .map_err(|e| err(Code::INTERNAL, format!("stdin thread: {e}")))?;
        let inner = self.inner.clone();
        let cell = proc_.exit.clone();
        let id = id.to_string();
        let c2 = closer.clone();
        let handle = std::thread::Builder::new()
            .name("relay".into())
            .spawn(move || {
                let status = relay_from(&mut client, streams, wait_id, input, host);
                c2.close();
                let status = status.unwrap_or_else(|e| {
                    log::error!("runv: relaying {id} {exec_id:?}: {e}");
                    protocol::ExitStatus {
                        code: 255,
                        signal: None,
                        oom_killed: false,
                    }
                });
                let exit = Exit {
                    status: status.code as u32,
                    at: SystemTime::now(),
                };
                if status.oom_killed {
                    inner.publish(
                        containerd_shim::protos::topics::TASK_OOM_EVENT_TOPIC,
                        Box::new(ev::TaskOOM {
                            container_id: id.clone(),
                            ..Default::default()
                        }),
                    );
                }
                inner.publish(
                    containerd_shim::protos::topics::TASK_EXIT_EVENT_TOPIC,
                    Box::new(ev::TaskExit {
                        container_id: id.clone(),
                        id: exec_id.unwrap_or(id),
                        pid,
                        exit_status: exit.status,
                        exited_at: MessageField::some(timestamp(exit.at)),
                        ..Default::default()
                    }),
                );
                cell.set(exit);
            })
            .map_err(|e| err(Code::RESOURCE_EXHAUSTED, format!("relay thread: {e}")))?;
        Ok((handle, closer))
    }
}

impl Inner {
    fn publish(&self, topic: &str, event: Box<dyn MessageDyn>) {
        let p = lock(&self.publisher);
        if let Err(e) = p.publish(Default::default(), topic, &self.namespace, event) {
            log::error!("runv: publishing {topic} to containerd: {e}");
        }
    }
}

/// Opens a process's outputs (before the agent creates it, so a bad path fails early); the
/// stdin path is returned for the relay thread to open lazily.
fn open_io(p: &Paths) -> TtrpcResult<(HostIo, String)> {
    let open = |path: &str| {
        stdio::open_output(path)
            .map_err(|e| err(Code::INVALID_ARGUMENT, format!("opening {path}: {e}")))
    };
    let out = open(&p.stdout)?;
    let err_ = if p.terminal {
        open("")?
    } else {
        open(&p.stderr)?
    };
    Ok((
        HostIo {
            input: None,
            out,
            err: err_,
        },
        p.stdin.clone(),
    ))
}

fn status_of(phase: Phase) -> api::Status {
    match phase {
        Phase::Created => api::Status::CREATED,
        Phase::Running => api::Status::RUNNING,
        Phase::Stopped => api::Status::STOPPED,
    }
}

impl containerd_shim::Task for Service {
    fn create(
        &self,
        _ctx: &TtrpcContext,
        req: api::CreateTaskRequest,
    ) -> TtrpcResult<api::CreateTaskResponse> {
        if lock(&self.inner.tasks).contains_key(&req.id) {
            return Err(err(
                Code::ALREADY_EXISTS,
                format!("task {} already exists", req.id),
            ));
        }
        if !req.checkpoint.is_empty() {
            return Err(err(Code::UNIMPLEMENTED, "runv cannot restore checkpoints"));
        }
        let bundle = PathBuf::from(&req.bundle);
        let mounted =
            rootfs::mount(&bundle, &req.rootfs).map_err(|e| err(Code::INTERNAL, e.to_string()))?;
        let mut task = match self.create_task(&req, &bundle) {
            Ok(t) => t,
            Err(e) => {
                self.release_rootfs(&req.id);
                if mounted {
                    let _ = rootfs::unmount(&bundle);
                }
                return Err(e);
            }
        };
        task.mounted = mounted;
        let pid = task.init.pid;
        lock(&self.inner.tasks).insert(req.id.clone(), task);
        self.publish(
            containerd_shim::protos::topics::TASK_CREATE_EVENT_TOPIC,
            Box::new(ev::TaskCreate {
                container_id: req.id.clone(),
                bundle: req.bundle.clone(),
                rootfs: req.rootfs.clone(),
                io: MessageField::some(ev::TaskIO {
                    stdin: req.stdin.clone(),
                    stdout: req.stdout.clone(),
                    stderr: req.stderr.clone(),
                    terminal: req.terminal,
                    ..Default::default()
                }),
                pid,
                ..Default::default()
            }),
        );
        Ok(api::CreateTaskResponse {
            pid,
            ..Default::default()
        })
    }

    fn start(
        &self,
        _ctx: &TtrpcContext,
        req: api::StartRequest,
    ) -> TtrpcResult<api::StartResponse> {
        if req.exec_id.is_empty() {
            let pid = {
                let tasks = lock(&self.inner.tasks);
                let t = tasks.get(&req.id).ok_or_else(|| not_found(&req.id, ""))?;
                if t.init.phase() != Phase::Created {
                    return Err(err(
                        Code::FAILED_PRECONDITION,
                        format!("task {} is not in the created state", req.id),
                    ));
                }
                t.init.pid
            };
            self.call(
                "starting the container",
                &Request::Start { id: req.id.clone() },
            )?;
            if let Some(t) = lock(&self.inner.tasks).get_mut(&req.id) {
                t.init.phase = Phase::Running;
            }
            self.publish(
                containerd_shim::protos::topics::TASK_START_EVENT_TOPIC,
                Box::new(ev::TaskStart {
                    container_id: req.id.clone(),
                    pid,
                    ..Default::default()
                }),
            );
            return Ok(api::StartResponse {
                pid,
                ..Default::default()
            });
        }
        let (spec, paths) = {
            let mut tasks = lock(&self.inner.tasks);
            let t = tasks
                .get_mut(&req.id)
                .ok_or_else(|| not_found(&req.id, ""))?;
            let p = t
                .execs
                .get_mut(&req.exec_id)
                .ok_or_else(|| not_found(&req.id, &req.exec_id))?;
            let spec = p.spec.take().ok_or_else(|| {
                err(
                    Code::FAILED_PRECONDITION,
                    format!("exec {} was started already", req.exec_id),
                )
            })?;
            (spec, p.stdio.clone())
        };
        let io = open_io(&paths)?;
        let mut client = self.client()?;
        let r = client
            .call(&Request::Exec {
                id: req.id.clone(),
                exec_id: req.exec_id.clone(),
                process: Box::new(spec),
                stdio: StdioConfig {
                    terminal: paths.terminal,
                    stdin: !paths.stdin.is_empty(),
                },
            })
            .map_err(|e| {
                err(
                    Code::UNAVAILABLE,
                    format!("starting exec {}: {e}", req.exec_id),
                )
            })?;
        let (pid, streams) = match r {
            Response::ExecStarted { pid, streams, .. } => (pid as u32, streams),
            other => {
                return Err(agent_error(
                    &format!("starting exec {}", req.exec_id),
                    other,
                ))
            }
        };
        let mut tasks = lock(&self.inner.tasks);
        let p = tasks
            .get_mut(&req.id)
            .and_then(|t| t.execs.get_mut(&req.exec_id))
            .ok_or_else(|| not_found(&req.id, &req.exec_id))?;
        p.pid = pid;
        p.phase = Phase::Running;
        let (handle, closer) = self.spawn_relay(
            &req.id,
            Some(req.exec_id.clone()),
            pid,
            client,
            streams,
            io,
            p,
        )?;
        p.relay = Some(handle);
        p.stdin = closer;
        drop(tasks);
        self.publish(
            containerd_shim::protos::topics::TASK_EXEC_STARTED_EVENT_TOPIC,
            Box::new(ev::TaskExecStarted {
                container_id: req.id.clone(),
                exec_id: req.exec_id.clone(),
                pid,
                ..Default::default()
            }),
        );
        Ok(api::StartResponse {
            pid,
            ..Default::default()
        })
    }

    fn state(
        &self,
        _ctx: &TtrpcContext,
        req: api::StateRequest,
    ) -> TtrpcResult<api::StateResponse> {
        let tasks = lock(&self.inner.tasks);
        let t = tasks.get(&req.id).ok_or_else(|| not_found(&req.id, ""))?;
        let p = if req.exec_id.is_empty() {
            &t.init
        } else {
            t.execs
                .get(&req.exec_id)
                .ok_or_else(|| not_found(&req.id, &req.exec_id))?
        };
        let exit = p.exit.get();
        let status = match status_of(p.phase()) {
            api::Status::RUNNING if t.paused => api::Status::PAUSED,
            s => s,
        };
        Ok(api::StateResponse {
            id: req.id.clone(),
            bundle: t.bundle.display().to_string(),
            pid: p.pid,
            status: EnumOrUnknown::new(status),
            stdin: p.stdio.stdin.clone(),
            stdout: p.stdio.stdout.clone(),
            stderr: p.stdio.stderr.clone(),
            terminal: p.stdio.terminal,
            exit_status: exit.map_or(0, |e| e.status),
            exited_at: exit.map(|e| timestamp(e.at)).into(),
            exec_id: req.exec_id.clone(),
            ..Default::default()
        })
    }

    fn wait(&self, _ctx: &TtrpcContext, req: api::WaitRequest) -> TtrpcResult<api::WaitResponse> {
        let cell: Arc<ExitCell> = {
            let tasks = lock(&self.inner.tasks);
            let t = tasks.get(&req.id).ok_or_else(|| not_found(&req.id, ""))?;
            if req.exec_id.is_empty() {
                t.init.exit.clone()
            } else {
                t.execs
                    .get(&req.exec_id)
                    .ok_or_else(|| not_found(&req.id, &req.exec_id))?
                    .exit
                    .clone()
            }
        };
        let e = cell
            .wait(None)
            .ok_or_else(|| err(Code::INTERNAL, "waiting for the exit"))?;
        Ok(api::WaitResponse {
            exit_status: e.status,
            exited_at: MessageField::some(timestamp(e.at)),
            ..Default::default()
        })
    }

    fn kill(&self, _ctx: &TtrpcContext, req: api::KillRequest) -> TtrpcResult<api::Empty> {
        {
            let tasks = lock(&self.inner.tasks);
            let t = tasks.get(&req.id).ok_or_else(|| not_found(&req.id, ""))?;
            let p = if req.exec_id.is_empty() {
                &t.init
            } else {
                t.execs
                    .get(&req.exec_id)
                    .ok_or_else(|| not_found(&req.id, &req.exec_id))?
            };
            if p.phase() == Phase::Stopped && !req.all {
                return Err(err(Code::NOT_FOUND, "process already finished"));
            }
            if p.phase() == Phase::Created && !req.exec_id.is_empty() {
                return Err(err(
                    Code::FAILED_PRECONDITION,
                    format!("exec {} is not started", req.exec_id),
                ));
            }
        }
        let signal = i32::try_from(req.signal)
            .map_err(|_| err(Code::INVALID_ARGUMENT, format!("bad signal {}", req.signal)))?;
        self.call(
            "signalling",
            &Request::Signal {
                id: req.id.clone(),
                exec_id: (!req.exec_id.is_empty()).then(|| req.exec_id.clone()),
                signal,
                all: req.all,
            },
        )?;
        Ok(api::Empty::new())
    }

    fn delete(
        &self,
        _ctx: &TtrpcContext,
        req: api::DeleteRequest,
    ) -> TtrpcResult<api::DeleteResponse> {
        if !req.exec_id.is_empty() {
            let mut p = {
                let mut tasks = lock(&self.inner.tasks);
                let t = tasks
                    .get_mut(&req.id)
                    .ok_or_else(|| not_found(&req.id, ""))?;
                let p = t
                    .execs
                    .get(&req.exec_id)
                    .ok_or_else(|| not_found(&req.id, &req.exec_id))?;
                if p.phase() == Phase::Running {
                    return Err(err(
                        Code::FAILED_PRECONDITION,
                        format!("exec {} is still running: kill it first", req.exec_id),
                    ));
                }
                t.execs
                    .remove(&req.exec_id)
                    .ok_or_else(|| not_found(&req.id, &req.exec_id))?
            };
            if let Some(h) = p.relay.take() {
                let _ = h.join();
            }
            let exit = p.exit.get();
            return Ok(api::DeleteResponse {
                pid: p.pid,
                exit_status: exit.map_or(0, |e| e.status),
                exited_at: exit.map(|e| timestamp(e.at)).into(),
                ..Default::default()
            });
        }
        let (pid, cell, paused) = {
            let tasks = lock(&self.inner.tasks);
            let t = tasks.get(&req.id).ok_or_else(|| not_found(&req.id, ""))?;
            (t.init.pid, t.init.exit.clone(), t.paused)
        };
        if paused {
            // A paused VM's agent cannot destroy anything: thaw it first (the agent itself
            // destroys a frozen container without help).
            let kind = lock(&self.inner.sandbox).as_ref().map(|(_, k)| *k);
            if kind.map(manage::freezer) == Some(manage::Freezer::Vm) {
                if let Err(e) = manage::pause_vm(&self.inner.sandbox_dir, false) {
                    log::warn!("runv: resuming paused task {} to delete it: {e}", req.id);
                }
            }
        }
        // Kills whatever is left (execs, a never-started init) and frees the container in the
        // agent; a container that already went away there is fine.
        if let Err(e) = self.call(
            "deleting the container",
            &Request::Destroy { id: req.id.clone() },
        ) {
            if e.to_string().contains("NOT_FOUND") {
                log::debug!("runv: destroy {}: {e}", req.id);
            } else {
                log::warn!("runv: destroy {}: {e}", req.id);
            }
        }
        let exit = cell.wait(Some(DESTROY_TIMEOUT)).unwrap_or(Exit {
            status: 137,
            at: SystemTime::now(),
        });
        let mut task = lock(&self.inner.tasks)
            .remove(&req.id)
            .ok_or_else(|| not_found(&req.id, ""))?;
        for p in task
            .execs
            .values_mut()
            .chain(std::iter::once(&mut task.init))
        {
            p.stdin.close();
            if let Some(h) = p.relay.take() {
                let _ = h.join();
            }
        }
        self.release_rootfs(&req.id);
        if task.mounted {
            rootfs::unmount(&task.bundle).map_err(|e| err(Code::INTERNAL, e.to_string()))?;
        }
        self.publish(
            containerd_shim::protos::topics::TASK_DELETE_EVENT_TOPIC,
            Box::new(ev::TaskDelete {
                container_id: req.id.clone(),
                pid,
                exit_status: exit.status,
                exited_at: MessageField::some(timestamp(exit.at)),
                id: req.id.clone(),
                ..Default::default()
            }),
        );
        Ok(api::DeleteResponse {
            pid,
            exit_status: exit.status,
            exited_at: MessageField::some(timestamp(exit.at)),
            ..Default::default()
        })
    }

    fn pids(&self, _ctx: &TtrpcContext, req: api::PidsRequest) -> TtrpcResult<api::PidsResponse> {
        match self.call("listing processes", &Request::Ps { id: req.id.clone() })? {
            Response::Processes { pids, .. } => Ok(api::PidsResponse {
                processes: pids
                    .into_iter()
                    .map(|pid| containerd_shim::protos::types::task::ProcessInfo {
                        pid: pid as u32,
                        ..Default::default()
                    })
                    .collect(),
                ..Default::default()
            }),
            other => Err(agent_error("listing processes", other)),
        }
    }

    fn pause(&self, _ctx: &TtrpcContext, req: api::PauseRequest) -> TtrpcResult<api::Empty> {
        self.pause_task(&req.id, true)?;
        Ok(api::Empty::new())
    }

    fn resume(&self, _ctx: &TtrpcContext, req: api::ResumeRequest) -> TtrpcResult<api::Empty> {
        self.pause_task(&req.id, false)?;
        Ok(api::Empty::new())
    }

    fn exec(&self, _ctx: &TtrpcContext, req: api::ExecProcessRequest) -> TtrpcResult<api::Empty> {
        let spec: oci_spec::runtime::Process =
            serde_json::from_slice(&req.spec.value).map_err(|e| {
                err(
                    Code::INVALID_ARGUMENT,
                    format!("exec {}: the process spec: {e}", req.exec_id),
                )
            })?;
        {
            let mut tasks = lock(&self.inner.tasks);
            let t = tasks
                .get_mut(&req.id)
                .ok_or_else(|| not_found(&req.id, ""))?;
            if t.init.phase() == Phase::Stopped {
                return Err(err(
                    Code::FAILED_PRECONDITION,
                    format!("task {} has stopped", req.id),
                ));
            }
            if t.execs.contains_key(&req.exec_id) {
                return Err(err(
                    Code::ALREADY_EXISTS,
                    format!("exec {} already exists", req.exec_id),
                ));
            }
            let paths = Paths {
                stdin: req.stdin.clone(),
                stdout: req.stdout.clone(),
                stderr: req.stderr.clone(),
                terminal: req.terminal,
            };
            t.execs
                .insert(req.exec_id.clone(), Proc::new(paths, Some(spec)));
        }
        self.publish(
            containerd_shim::protos::topics::TASK_EXEC_ADDED_EVENT_TOPIC,
            Box::new(ev::TaskExecAdded {
                container_id: req.id.clone(),
                exec_id: req.exec_id.clone(),
                ..Default::default()
            }),
        );
        Ok(api::Empty::new())
    }

    fn resize_pty(
        &self,
        _ctx: &TtrpcContext,
        req: api::ResizePtyRequest,
    ) -> TtrpcResult<api::Empty> {
        let dim = |v: u32| {
            u16::try_from(v).map_err(|_| {
                err(
                    Code::INVALID_ARGUMENT,
                    format!("terminal size {v} is too large"),
                )
            })
        };
        self.call(
            "resizing the terminal",
            &Request::ResizeTty {
                id: req.id.clone(),
                exec_id: (!req.exec_id.is_empty()).then(|| req.exec_id.clone()),
                rows: dim(req.height)?,
                cols: dim(req.width)?,
            },
        )?;
        Ok(api::Empty::new())
    }

    fn close_io(&self, _ctx: &TtrpcContext, req: api::CloseIORequest) -> TtrpcResult<api::Empty> {
        let tasks = lock(&self.inner.tasks);
        let t = tasks.get(&req.id).ok_or_else(|| not_found(&req.id, ""))?;
        let p = if req.exec_id.is_empty() {
            &t.init
        } else {
            t.execs
                .get(&req.exec_id)
                .ok_or_else(|| not_found(&req.id, &req.exec_id))?
        };
        if req.stdin {
            // The relay closes the process's stdin once the fifo is drained (EOF).
            p.stdin.close();
        }
        Ok(api::Empty::new())
    }

    fn update(&self, _ctx: &TtrpcContext, req: api::UpdateTaskRequest) -> TtrpcResult<api::Empty> {
        if !lock(&self.inner.tasks).contains_key(&req.id) {
            return Err(not_found(&req.id, ""));
        }
        let Some(any) = req.resources.as_ref() else {
            // Annotations only: nothing runv applies.
            return Ok(api::Empty::new());
        };
        // containerd marshals the OCI type as JSON (typeurl).
        let r: oci_spec::runtime::LinuxResources =
            serde_json::from_slice(&any.value).map_err(|e| {
                err(
                    Code::INVALID_ARGUMENT,
                    format!(
                        "task {}: the resources ({}) are not OCI linux.resources JSON: {e}",
                        req.id, any.type_url
                    ),
                )
            })?;
        let resources = manage::resources(&r);
        if resources == protocol::Resources::default() {
            return Err(err(
                Code::INVALID_ARGUMENT,
                format!("task {}: no memory limit, pids limit or cpu quota to apply (runv updates only those)", req.id),
            ));
        }
        self.call(
            "updating the resources",
            &Request::Update {
                id: req.id.clone(),
                resources,
            },
        )?;
        Ok(api::Empty::new())
    }

    fn stats(
        &self,
        _ctx: &TtrpcContext,
        req: api::StatsRequest,
    ) -> TtrpcResult<api::StatsResponse> {
        let s = match self.call("reading stats", &Request::Stats { id: req.id.clone() })? {
            Response::Stats(s) => s,
            other => return Err(agent_error("reading stats", other)),
        };
        let m = metrics::Metrics {
            pids: MessageField::some(metrics::PidsStat {
                current: s.pids_current,
                ..Default::default()
            }),
            cpu: MessageField::some(metrics::CPUStat {
                usage: MessageField::some(metrics::CPUUsage {
                    total: s.cpu_usage_usec.saturating_mul(1000),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            memory: MessageField::some(metrics::MemoryStat {
                usage: MessageField::some(metrics::MemoryEntry {
                    usage: s.memory_current,
                    limit: s.memory_max.unwrap_or(u64::MAX),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            memory_oom_control: MessageField::some(metrics::MemoryOomControl {
                oom_kill: s.oom_kills,
                ..Default::default()
            }),
            ..Default::default()
        };
        let any = containerd_shim::util::convert_to_any(Box::new(m))
            .map_err(|e| err(Code::INTERNAL, format!("encoding stats: {e}")))?;
        Ok(api::StatsResponse {
            stats: MessageField::some(any),
            ..Default::default()
        })
    }

    fn connect(
        &self,
        _ctx: &TtrpcContext,
        req: api::ConnectRequest,
    ) -> TtrpcResult<api::ConnectResponse> {
        let task_pid = lock(&self.inner.tasks)
            .get(&req.id)
            .map_or(0, |t| t.init.pid);
        Ok(api::ConnectResponse {
            shim_pid: std::process::id(),
            task_pid,
            version: format!("runv {}", env!("CARGO_PKG_VERSION")),
            ..Default::default()
        })
    }

    fn shutdown(&self, _ctx: &TtrpcContext, _req: api::ShutdownRequest) -> TtrpcResult<api::Empty> {
        if !lock(&self.inner.tasks).is_empty() {
            // Other containers of the pod still run in this shim's sandbox.
            return Ok(api::Empty::new());
        }
        self.inner.stop_sandbox();
        self.inner.exit.signal();
        Ok(api::Empty::new())
    }
}

impl Inner {
    /// Ends the sandbox (if any) and removes its state directory.
    pub fn stop_sandbox(&self) {
        if let Some((owner, _)) = lock(&self.sandbox).take() {
            owner.shutdown();
        }
        let _ = self.sandbox_dir.remove();
    }
}
