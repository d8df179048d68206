//! seccomp-bpf confinement of runv-vmm's threads (`seccompiler`).
//!
//! Each kind of thread ([`ThreadKind`]) installs its own filter, built from the allow-lists in
//! [`rules`], before it touches anything the guest controls: the VMM thread before it restores a
//! snapshot, serves a shell's control plane or runs a booted VM; a vCPU thread before its first
//! `KVM_RUN`; the userfaultfd page server before it serves a page. A syscall outside the list
//! kills the whole process (`SECCOMP_RET_KILL_PROCESS`: the kernel's audit log records
//! `type=1326 ... sig=31 syscall=N comm="vcpu0"`, and the parent sees the VMM die of `SIGSYS`);
//! in [`SeccompMode::Log`] it is allowed and logged (`SECCOMP_RET_LOG`).
//!
//! The mode is process-wide and set once by the binary ([`set_mode`]); a library user that never
//! sets it (tests that run a VM inside the test process) gets [`SeccompMode::Off`].

// Compiled to BPF by build.rs; here only for the tests that check the prebuilt programs.
#[cfg(test)]
mod rules;

use std::sync::OnceLock;

use seccompiler::BpfProgram;

/// What a syscall outside a thread's allow-list does.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Default,
    clap::ValueEnum,
    serde::Serialize,
    serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum SeccompMode {
    /// No filters.
    Off,
    /// Allowed, and logged by the kernel (`SECCOMP_RET_LOG`): for finding a missing entry.
    Log,
    /// Kills the process (`SECCOMP_RET_KILL_PROCESS`).
    #[default]
    Kill,
}

/// The kinds of thread runv-vmm runs, each with its own allow-list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThreadKind {
    /// The main thread: device loop, control plane, restore and snapshot.
    Vmm,
    /// A vCPU thread (`KVM_RUN`).
    Vcpu,
    /// The userfaultfd page server.
    Uffd,
}

impl ThreadKind {
    /// The name used in logs and by the test trigger.
    pub fn name(self) -> &'static str {
        match self {
            ThreadKind::Vmm => "vmm",
            ThreadKind::Vcpu => "vcpu",
            ThreadKind::Uffd => "uffd",
        }
    }

    const ALL: [ThreadKind; 3] = [ThreadKind::Vmm, ThreadKind::Vcpu, ThreadKind::Uffd];
}

/// Building or installing a filter failed.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    /// An allow-list did not compile (a bug in [`rules`]).
    #[error("building a seccomp filter: {0}")]
    Build(seccompiler::BackendError),
    /// Compiling to BPF failed.
    #[error("compiling a seccomp filter: {0}")]
    Compile(seccompiler::BackendError),
    /// The kernel refused the filter.
    #[error("installing the {kind} seccomp filter: {source} (needs Linux with CONFIG_SECCOMP_FILTER; run with --seccomp off to go without)")]
    Install {
        /// The thread kind.
        kind: &'static str,
        /// Cause.
        source: seccompiler::Error,
    },
    /// A thread ended before saying whether it is confined.
    #[error("the {0} thread ended before reporting whether its seccomp filter is installed")]
    NoReport(&'static str),
    /// [`set_mode`] was called twice with different modes.
    #[error("the seccomp mode is already set")]
    AlreadySet,
}

struct Compiled {
    mode: SeccompMode,
    /// Indexed like [`ThreadKind::ALL`]; empty when off.
    programs: Vec<BpfProgram>,
    /// Refuses `clone3` with ENOSYS (its flags are out of the filter's reach; glibc then uses
    /// `clone`, whose flags the allow-list checks).
    no_clone3: Option<BpfProgram>,
    /// Debug builds only: the thread kind that makes a forbidden syscall once filtered.
    violate: Option<ThreadKind>,
}

static COMPILED: OnceLock<Compiled> = OnceLock::new();

/// Environment variable honoured by debug builds only: `vmm`, `vcpu` or `uffd` makes that thread
/// attempt `execve` right after installing its filter, to prove the filter stops it.
pub const TEST_VIOLATION_ENV: &str = "RUNV_VMM_TEST_SECCOMP_VIOLATION";

/// Sets the process-wide mode and compiles every filter (once, at start-up, off the request path).
pub fn set_mode(mode: SeccompMode) -> Result<(), SeccompError> {
    let compiled = compile(mode)?;
    COMPILED.set(compiled).map_err(|_| SeccompError::AlreadySet)
}

/// The process-wide mode ([`SeccompMode::Off`] until [`set_mode`]).
pub fn mode() -> SeccompMode {
    COMPILED.get().map_or(SeccompMode::Off, |c| c.mode)
}

fn compile(mode: SeccompMode) -> Result<Compiled, SeccompError> {
    let violate = if cfg!(debug_assertions) {
        std::env::var(TEST_VIOLATION_ENV)
            .ok()
            .and_then(|v| ThreadKind::ALL.into_iter().find(|k| k.name() == v))
    } else {
        None
    };
    // Compiled by build.rs from `rules` (indexed like ThreadKind::ALL).
    let programs: [&[u8]; 3] = match mode {
        SeccompMode::Off => {
            return Ok(Compiled {
                mode,
                programs: Vec::new(),
                no_clone3: None,
                violate,
            })
        }
        SeccompMode::Log => [
            include_bytes!(concat!(env!("OUT_DIR"), "/seccomp-vmm-log.bpf")),
            include_bytes!(concat!(env!("OUT_DIR"), "/seccomp-vcpu-log.bpf")),
            include_bytes!(concat!(env!("OUT_DIR"), "/seccomp-uffd-log.bpf")),
        ],
        SeccompMode::Kill => [
            include_bytes!(concat!(env!("OUT_DIR"), "/seccomp-vmm-kill.bpf")),
            include_bytes!(concat!(env!("OUT_DIR"), "/seccomp-vcpu-kill.bpf")),
            include_bytes!(concat!(env!("OUT_DIR"), "/seccomp-uffd-kill.bpf")),
        ],
    };
    Ok(Compiled {
        mode,
        programs: programs.iter().map(|b| program(b)).collect(),
        no_clone3: Some(program(include_bytes!(concat!(
            env!("OUT_DIR"),
            "/seccomp-no-clone3.bpf"
        )))),
        violate,
    })
}

/// A BPF program as build.rs wrote it: `code u16 | jt u8 | jf u8 | k u32`, little endian.
fn program(bytes: &[u8]) -> BpfProgram {
    bytes
        .chunks_exact(8)
        .map(|i| seccompiler::sock_filter {
            code: u16::from_le_bytes([i[0], i[1]]),
            jt: i[2],
            jf: i[3],
            k: u32::from_le_bytes([i[4], i[5], i[6], i[7]]),
        })
        .collect()
}

/// The same programs compiled now from `rules` (the build-time ones must match them).
#[cfg(test)]
fn compile_now(kind: ThreadKind, mismatch: seccompiler::SeccompAction) -> BpfProgram {
    use seccompiler::{SeccompAction, SeccompFilter, TargetArch};
    let filter = SeccompFilter::new(
        rules::allowed(kind).unwrap(),
        mismatch,
        SeccompAction::Allow,
        TargetArch::x86_64,
    )
    .unwrap();
    BpfProgram::try_from(filter).unwrap()
}

/// Confines the calling thread as `kind` (nothing when the mode is off). Sets `no_new_privs`.
pub fn install(kind: ThreadKind) -> Result<(), SeccompError> {
    let Some(c) = COMPILED.get() else {
        return Ok(());
    };
    let Some(i) = ThreadKind::ALL.iter().position(|k| *k == kind) else {
        return Ok(());
    };
    let err = |source| SeccompError::Install {
        kind: kind.name(),
        source,
    };
    if let Some(prog) = c.programs.get(i) {
        if kind == ThreadKind::Vmm {
            if let Some(p) = &c.no_clone3 {
                seccompiler::apply_filter(p).map_err(err)?;
            }
        }
        seccompiler::apply_filter(prog).map_err(err)?;
        tracing::debug!(thread = kind.name(), mode = ?c.mode, "seccomp filter installed");
    }
    if c.violate == Some(kind) {
        test_violation(kind);
    }
    Ok(())
}

/// Debug builds' proof that a filter holds: attempt what an escaped guest would want, `execve`.
/// The path does not exist, so in `log` (or `off`) mode the call fails harmlessly and is reported.
fn test_violation(kind: ThreadKind) {
    // Straight to stderr, whatever the log filter: the test reads it.
    eprintln!(
        "{TEST_VIOLATION_ENV}: {} thread attempting a forbidden execve (test builds only)",
        kind.name()
    );
    let path = c"/nonexistent/runv-seccomp-probe";
    let argv = [path.as_ptr(), std::ptr::null()];
    let envp = [std::ptr::null()];
    // SAFETY: execve with NUL-terminated argv/envp arrays of valid C strings; the path does not
    // exist, so when the filter allows it, it fails and returns.
    let rc = unsafe { libc::execve(path.as_ptr(), argv.as_ptr(), envp.as_ptr()) };
    eprintln!(
        "{TEST_VIOLATION_ENV}: {} thread: the forbidden execve returned {rc} ({}): seccomp is not killing",
        kind.name(),
        std::io::Error::last_os_error()
    );
}

#[cfg(test)]
mod prebuilt_tests {
    use super::*;

    #[test]
    fn the_build_time_programs_are_the_rules_compiled() {
        let kill = compile(SeccompMode::Kill).unwrap();
        let log = compile(SeccompMode::Log).unwrap();
        use seccompiler::SeccompAction;
        for (i, kind) in ThreadKind::ALL.into_iter().enumerate() {
            assert_eq!(
                kill.programs[i],
                compile_now(kind, SeccompAction::KillProcess)
            );
            assert_eq!(log.programs[i], compile_now(kind, SeccompAction::Log));
        }
        assert!(compile(SeccompMode::Off).unwrap().programs.is_empty());
    }
}
