//! `linux.seccomp` compiled into BPF in the agent (with rust-vmm's `seccompiler`), installed
//! by the child with `seccomp(SECCOMP_SET_MODE_FILTER)`.
//!
//! seccompiler builds filters with one action on match and one on mismatch, while OCI gives
//! each syscall rule its own action. The profile therefore becomes several filters, whose
//! results the kernel combines by taking the most restrictive: one filter per distinct
//! non-allow action (its rules → that action, anything else → allow), and last a filter that
//! allows every syscall any rule names (with the rule's argument conditions) and applies the
//! default action to the rest. A syscall matched by rules of two actions gets the more
//! restrictive one. Names this architecture lacks are skipped, as runc does; anything else
//! the agent cannot honour (notify actions, a listener, unknown flags, a profile without the
//! native architecture) is refused.

use std::collections::BTreeMap;
use std::str::FromStr;
use std::sync::{Arc, Mutex};

use oci_spec::runtime::{
    Arch, LinuxSeccomp, LinuxSeccompAction, LinuxSeccompArg, LinuxSeccompFilterFlag,
    LinuxSeccompOperator,
};
use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

use super::SpawnError;

/// Compiled filters, in installation order, and the flags for seccomp(2).
pub(super) struct Filters {
    pub(super) programs: Vec<BpfProgram>,
    pub(super) flags: libc::c_ulong,
}

/// The filters of each container's init process, by pid, so that processes exec'd into the
/// container get them too (the runtime keeps no spec after create). Every container spawn sets
/// or clears its pid's entry, so a reused pid never inherits another container's profile.
static BY_INIT_PID: Mutex<BTreeMap<i32, Arc<Filters>>> = Mutex::new(BTreeMap::new());

/// Records the filters (or none) of the container whose init is `pid`.
pub(super) fn remember(pid: i32, filters: Option<&Arc<Filters>>) {
    let mut m = BY_INIT_PID.lock().unwrap_or_else(|p| p.into_inner());
    match filters {
        Some(f) => {
            m.insert(pid, f.clone());
        }
        None => {
            m.remove(&pid);
        }
    }
}

/// The filters of the container whose init is `pid`.
pub(super) fn of_container(pid: i32) -> Option<Arc<Filters>> {
    BY_INIT_PID
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get(&pid)
        .cloned()
}

fn invalid(msg: impl Into<String>) -> SpawnError {
    SpawnError::Invalid(format!("linux.seccomp: {}", msg.into()))
}

#[cfg(target_arch = "x86_64")]
const NATIVE: (TargetArch, Arch) = (TargetArch::x86_64, Arch::ScmpArchX86_64);
#[cfg(target_arch = "aarch64")]
const NATIVE: (TargetArch, Arch) = (TargetArch::aarch64, Arch::ScmpArchAarch64);

fn action(a: LinuxSeccompAction, errno: Option<u32>) -> Result<SeccompAction, SpawnError> {
    let errno = errno.unwrap_or(libc::EPERM as u32);
    if errno > 4095 {
        return Err(invalid(format!(
            "errnoRet {errno} is not an errno (0..4095)"
        )));
    }
    Ok(match a {
        LinuxSeccompAction::ScmpActKill | LinuxSeccompAction::ScmpActKillThread => {
            SeccompAction::KillThread
        }
        LinuxSeccompAction::ScmpActKillProcess => SeccompAction::KillProcess,
        LinuxSeccompAction::ScmpActTrap => SeccompAction::Trap,
        LinuxSeccompAction::ScmpActErrno => SeccompAction::Errno(errno),
        LinuxSeccompAction::ScmpActTrace => SeccompAction::Trace(errno),
        LinuxSeccompAction::ScmpActLog => SeccompAction::Log,
        LinuxSeccompAction::ScmpActAllow => SeccompAction::Allow,
        LinuxSeccompAction::ScmpActNotify => {
            return Err(invalid(
                "SCMP_ACT_NOTIFY needs a seccomp agent, which runv does not support: use SCMP_ACT_ERRNO or SCMP_ACT_KILL",
            ))
        }
    })
}

fn condition(a: &LinuxSeccompArg) -> Result<SeccompCondition, SpawnError> {
    let index = u8::try_from(a.index())
        .ok()
        .filter(|i| *i < 6)
        .ok_or_else(|| invalid(format!("argument index {} (syscalls have 6)", a.index())))?;
    let (op, value) = match a.op() {
        LinuxSeccompOperator::ScmpCmpNe => (SeccompCmpOp::Ne, a.value()),
        LinuxSeccompOperator::ScmpCmpLt => (SeccompCmpOp::Lt, a.value()),
        LinuxSeccompOperator::ScmpCmpLe => (SeccompCmpOp::Le, a.value()),
        LinuxSeccompOperator::ScmpCmpEq => (SeccompCmpOp::Eq, a.value()),
        LinuxSeccompOperator::ScmpCmpGe => (SeccompCmpOp::Ge, a.value()),
        LinuxSeccompOperator::ScmpCmpGt => (SeccompCmpOp::Gt, a.value()),
        // libseccomp: (arg & value) == valueTwo.
        LinuxSeccompOperator::ScmpCmpMaskedEq => (
            SeccompCmpOp::MaskedEq(a.value()),
            a.value_two().unwrap_or(0),
        ),
    };
    SeccompCondition::new(index, SeccompCmpArgLen::Qword, op, value)
        .map_err(|e| invalid(format!("argument condition: {e}")))
}

/// The rules of one syscall entry: all conditions in one rule (AND), or — when an argument
/// index appears twice — one rule per condition (OR), as runc does. Empty: unconditional.
fn rules(args: &[LinuxSeccompArg]) -> Result<Vec<SeccompRule>, SpawnError> {
    if args.is_empty() {
        return Ok(Vec::new());
    }
    let conds: Vec<SeccompCondition> = args.iter().map(condition).collect::<Result<_, _>>()?;
    let mut seen = [false; 6];
    let repeated = args
        .iter()
        .any(|a| std::mem::replace(&mut seen[a.index()], true));
    let rule =
        |c: Vec<SeccompCondition>| SeccompRule::new(c).map_err(|e| invalid(format!("rule: {e}")));
    if repeated {
        conds.into_iter().map(|c| rule(vec![c])).collect()
    } else {
        Ok(vec![rule(conds)?])
    }
}

type RuleMap = BTreeMap<i64, Vec<SeccompRule>>;

/// Adds `rules` for `nr`; an unconditional entry (empty) absorbs conditional ones.
fn add(map: &mut RuleMap, nr: i64, rules: &[SeccompRule]) {
    match map.get_mut(&nr) {
        Some(existing) if existing.is_empty() => {}
        Some(existing) if !rules.is_empty() => existing.extend(rules.iter().cloned()),
        _ => {
            map.insert(nr, rules.to_vec());
        }
    }
}

fn program(
    rules: RuleMap,
    mismatch: SeccompAction,
    matched: SeccompAction,
) -> Result<BpfProgram, SpawnError> {
    let filter = SeccompFilter::new(rules, mismatch, matched, NATIVE.0)
        .map_err(|e| invalid(format!("building the filter: {e}")))?;
    BpfProgram::try_from(filter).map_err(|e| invalid(format!("compiling the filter: {e}")))
}

/// Compiles `s` for the native architecture.
pub(super) fn compile(s: &LinuxSeccomp) -> Result<Filters, SpawnError> {
    if s.listener_path().is_some() || s.listener_metadata().is_some() {
        return Err(invalid(
            "listenerPath/listenerMetadata (seccomp notify) are not supported: remove them",
        ));
    }
    if let Some(arches) = s.architectures().as_ref().filter(|a| !a.is_empty()) {
        if !arches
            .iter()
            .any(|a| *a == NATIVE.1 || *a == Arch::ScmpArchNative)
        {
            return Err(invalid(format!(
                "architectures {arches:?} do not include the native {:?}: add it",
                NATIVE.1
            )));
        }
        // Other architectures (x86, x32 on x86_64) are not compiled in: the filter's arch check
        // kills any system call made through them, which is stricter than the profile.
    }
    let mut flags = 0;
    for f in s.flags().iter().flatten() {
        flags |= match f {
            LinuxSeccompFilterFlag::SeccompFilterFlagLog => libc::SECCOMP_FILTER_FLAG_LOG,
            LinuxSeccompFilterFlag::SeccompFilterFlagSpecAllow => {
                libc::SECCOMP_FILTER_FLAG_SPEC_ALLOW
            }
            LinuxSeccompFilterFlag::SeccompFilterFlagTsync => libc::SECCOMP_FILTER_FLAG_TSYNC,
        };
    }
    let default = action(s.default_action(), s.default_errno_ret())?;
    let mut by_action: Vec<(SeccompAction, RuleMap)> = Vec::new();
    let mut named = RuleMap::new();
    for sc in s.syscalls().iter().flatten() {
        let act = action(sc.action(), sc.errno_ret())?;
        let r = rules(sc.args().as_deref().unwrap_or_default())?;
        if act == default {
            // As runc: a rule with the default action changes nothing.
            continue;
        }
        for name in sc.names() {
            let Ok(sysno) = syscalls::Sysno::from_str(name) else {
                tracing::debug!("seccomp: {name} is not a syscall of this architecture; skipped");
                continue;
            };
            let nr = i64::from(sysno.id());
            add(&mut named, nr, &r);
            if act != SeccompAction::Allow {
                let i = match by_action.iter().position(|(a, _)| *a == act) {
                    Some(i) => i,
                    None => {
                        by_action.push((act.clone(), RuleMap::new()));
                        by_action.len() - 1
                    }
                };
                add(&mut by_action[i].1, nr, &r);
            }
        }
    }
    let seccomp_nr = i64::from(syscalls::Sysno::seccomp.id());
    if by_action.iter().any(|(_, m)| m.contains_key(&seccomp_nr)) {
        return Err(invalid(
            "a rule restricts seccomp(2) itself, which the agent needs to install the profile's filters: allow it",
        ));
    }
    let mut programs = Vec::new();
    for (act, map) in by_action {
        programs.push(program(map, SeccompAction::Allow, act)?);
    }
    if default != SeccompAction::Allow {
        programs.push(program(named, default, SeccompAction::Allow)?);
    }
    Ok(Filters { programs, flags })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn profile(json: serde_json::Value) -> LinuxSeccomp {
        serde_json::from_value(json).unwrap()
    }

    #[test]
    fn one_filter_per_action_then_the_default() {
        let f = compile(&profile(serde_json::json!({
            "defaultAction": "SCMP_ACT_ERRNO",
            "defaultErrnoRet": 38,
            "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"],
            "syscalls": [
                {"names": ["read", "write", "no_such_syscall"], "action": "SCMP_ACT_ALLOW"},
                {"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1},
                {"names": ["personality"], "action": "SCMP_ACT_ALLOW",
                 "args": [{"index": 0, "value": 0, "op": "SCMP_CMP_EQ"},
                          {"index": 0, "value": 8, "op": "SCMP_CMP_EQ"}]},
                {"names": ["kexec_load"], "action": "SCMP_ACT_KILL_PROCESS"},
                {"names": ["getpid"], "action": "SCMP_ACT_ERRNO", "errnoRet": 38}
            ]
        })))
        .unwrap();
        // ERRNO(1), KILL_PROCESS, then the default filter; ERRNO(38) equals the default.
        assert_eq!(f.programs.len(), 3);
        assert!(f.programs.iter().all(|p| !p.is_empty()));
        assert_eq!(f.flags, 0);
    }

    #[test]
    fn an_allow_default_needs_no_default_filter() {
        let f = compile(&profile(serde_json::json!({
            "defaultAction": "SCMP_ACT_ALLOW",
            "flags": ["SECCOMP_FILTER_FLAG_LOG"],
            "syscalls": [{"names": ["mkdir"], "action": "SCMP_ACT_ERRNO"}]
        })))
        .unwrap();
        assert_eq!(f.programs.len(), 1);
        assert_eq!(f.flags, libc::SECCOMP_FILTER_FLAG_LOG);
    }

    #[test]
    fn what_cannot_be_honoured_is_refused() {
        let refused = |j: serde_json::Value, what: &str| {
            let e = compile(&profile(j)).err().unwrap().to_string();
            assert!(e.contains(what), "{e}");
        };
        refused(
            serde_json::json!({"defaultAction": "SCMP_ACT_ALLOW", "listenerPath": "/run/agent.sock"}),
            "listenerPath",
        );
        refused(
            serde_json::json!({"defaultAction": "SCMP_ACT_ALLOW",
                "syscalls": [{"names": ["mkdir"], "action": "SCMP_ACT_NOTIFY"}]}),
            "SCMP_ACT_NOTIFY",
        );
        refused(
            serde_json::json!({"defaultAction": "SCMP_ACT_ALLOW", "architectures": ["SCMP_ARCH_ARM"]}),
            "native",
        );
        refused(
            serde_json::json!({"defaultAction": "SCMP_ACT_ALLOW",
                "syscalls": [{"names": ["mkdir"], "action": "SCMP_ACT_ERRNO",
                    "args": [{"index": 6, "value": 0, "op": "SCMP_CMP_EQ"}]}]}),
            "argument index 6",
        );
        refused(
            serde_json::json!({"defaultAction": "SCMP_ACT_ALLOW",
                "syscalls": [{"names": ["seccomp"], "action": "SCMP_ACT_ERRNO"}]}),
            "seccomp(2)",
        );
        refused(
            serde_json::json!({"defaultAction": "SCMP_ACT_ERRNO", "defaultErrnoRet": 5000}),
            "errnoRet 5000",
        );
    }
}
