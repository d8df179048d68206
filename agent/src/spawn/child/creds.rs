//! The child's last steps: privileges (bounding set, ids, capabilities), seccomp, execve.

use super::super::plan::{Caps, Plan, MAX_ARGS, MAX_ENV};
use super::super::Step;
use super::{check, errno, fail, report, ChildFds};

/// Bounding set, groups, uid/gid, capability sets, ambient capabilities.
pub(super) fn drop_privileges(plan: &Plan, fds: &ChildFds) {
    if let Some(c) = &plan.caps {
        drop_bounding(c.bounding, fds);
    }
    set_ids(plan, fds);
    if let Some(c) = &plan.caps {
        set_caps(c, fds);
    }
}

fn drop_bounding(bounding: u64, fds: &ChildFds) {
    for cap in 0..64u64 {
        if bounding & (1 << cap) != 0 {
            continue;
        }
        // SAFETY: prctl with integer arguments; EINVAL marks caps the kernel lacks.
        let rc = unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) };
        if rc < 0 && errno() != libc::EINVAL {
            fail(fds, Step::Bounding, errno());
        }
    }
}

/// Raw system calls: glibc's wrappers broadcast the change to every thread it knows of, and the
/// agent's other threads do not exist in this child (it would wait forever).
fn set_ids(plan: &Plan, fds: &ChildFds) {
    // SAFETY: prctl with integer arguments.
    let rc = unsafe { libc::prctl(libc::PR_SET_KEEPCAPS, 1, 0, 0, 0) };
    check(fds, Step::Ids, rc);
    let (uid, gid) = (u64::from(plan.uid), u64::from(plan.gid));
    // SAFETY: setgroups with the plan's array and its length.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_setgroups,
            plan.groups.len() as u64,
            plan.groups.as_ptr(),
        )
    };
    check(fds, Step::Ids, rc);
    // SAFETY: setresgid/setresuid with integer arguments.
    check(fds, Step::Ids, unsafe {
        libc::syscall(libc::SYS_setresgid, gid, gid, gid)
    });
    // SAFETY: as above.
    check(fds, Step::Ids, unsafe {
        libc::syscall(libc::SYS_setresuid, uid, uid, uid)
    });
}

fn set_caps(c: &Caps, fds: &ChildFds) {
    #[repr(C)]
    struct Header {
        version: u32,
        pid: i32,
    }
    #[repr(C)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    let h = Header {
        version: 0x2008_0522,
        pid: 0,
    };
    let half = |v: u64, hi: bool| if hi { (v >> 32) as u32 } else { v as u32 };
    let d = [false, true].map(|hi| Data {
        effective: half(c.effective, hi),
        permitted: half(c.permitted, hi),
        inheritable: half(c.inheritable, hi),
    });
    // SAFETY: capset (version 3) with a local header and the two data structs it reads.
    let rc = unsafe { libc::syscall(libc::SYS_capset, &h, d.as_ptr()) };
    check(fds, Step::Capset, rc);
    for cap in &c.ambient {
        // SAFETY: prctl with integer arguments; a cap missing from the inheritable or permitted
        // set cannot be raised, and the spec's ambient set is best effort (as runc's).
        unsafe {
            libc::prctl(
                libc::PR_CAP_AMBIENT,
                libc::PR_CAP_AMBIENT_RAISE as libc::c_ulong,
                *cap as libc::c_ulong,
                0,
                0,
            )
        };
    }
}

/// `struct sock_fprog` with seccompiler's instruction type.
#[repr(C)]
struct SockFprog {
    len: libc::c_ushort,
    filter: *const seccompiler::sock_filter,
}

/// Installs the profile's filters (see [`super::seccomp`]).
pub(super) fn install_seccomp(plan: &Plan, fds: &ChildFds) {
    let Some(f) = &plan.seccomp else {
        return;
    };
    for p in &f.programs {
        let prog = SockFprog {
            len: p.len() as libc::c_ushort,
            filter: p.as_ptr(),
        };
        // SAFETY: seccomp(SET_MODE_FILTER) with a local sock_fprog pointing at the plan's
        // program of `len` instructions (seccompiler keeps them under BPF_MAXINSNS).
        let rc = unsafe {
            libc::syscall(
                libc::SYS_seccomp,
                libc::SECCOMP_SET_MODE_FILTER,
                f.flags,
                &prog as *const SockFprog,
            )
        };
        check(fds, Step::Seccomp, rc);
    }
}

/// execve each candidate path in turn; reports the most telling errno if none runs.
pub(super) fn exec(plan: &Plan, fds: &ChildFds) -> ! {
    let mut argv: [*const libc::c_char; MAX_ARGS + 1] = [std::ptr::null(); MAX_ARGS + 1];
    for (i, a) in plan.argv.iter().take(MAX_ARGS).enumerate() {
        argv[i] = a.as_ptr();
    }
    let mut envp: [*const libc::c_char; MAX_ENV + 1] = [std::ptr::null(); MAX_ENV + 1];
    for (i, e) in plan.envp.iter().take(MAX_ENV).enumerate() {
        envp[i] = e.as_ptr();
    }
    let mut last = libc::ENOENT;
    for cand in &plan.exec_candidates {
        // SAFETY: execve with a C string and NULL-terminated pointer arrays into the plan.
        unsafe { libc::execve(cand.as_ptr(), argv.as_ptr(), envp.as_ptr()) };
        let e = errno();
        if e != libc::ENOENT && e != libc::ENOTDIR {
            last = e;
        }
    }
    report(fds.ready, Step::Exec as i32, last);
    // SAFETY: ends the child without running destructors; 127 is the shell's "not found".
    unsafe { libc::_exit(127) }
}
