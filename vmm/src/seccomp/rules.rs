//! The allow-lists: which syscalls (and, for `ioctl`/`clone`/`prctl`, which argument values) each
//! kind of runv-vmm thread may make. Everything else is a violation.
//!
//! Filters stack: every thread is created by the (already filtered) VMM thread, so its effective
//! policy is the intersection of the [`ThreadKind::Vmm`] list and its own.

use std::collections::BTreeMap;

use seccompiler::{
    SeccompCmpArgLen as Len, SeccompCmpOp as Op, SeccompCondition as Cond, SeccompRule,
};
use vmm_sys_util::{ioctl_io_nr, ioctl_ior_nr};

use super::{SeccompError, ThreadKind};

const KVMIO: u32 = 0xAE;
ioctl_io_nr!(KVM_RUN, KVMIO, 0x80);
ioctl_ior_nr!(KVM_GET_REGS, KVMIO, 0x81, kvm_bindings::kvm_regs);

/// `ioctl` type byte of userfaultfd requests (`UFFDIO_*`).
const UFFDIO: u64 = 0xAA;
/// `ioctl` type byte of KVM requests (`KVM_*`).
const KVM_TYPE: u64 = KVMIO as u64;
/// Mask of an ioctl request's type byte.
const IOC_TYPE_MASK: u64 = 0xff00;
/// `PR_SET_NAME`: a new thread names itself (`vcpu0`, `uffd`) before it installs its filter.
const OPT_SET_NAME: u64 = 15;
/// `PR_SET_NO_NEW_PRIVS` and `SECCOMP_SET_MODE_FILTER`: a new thread adds its own (narrower)
/// filter; a filter can only take permissions away.
const OPT_NO_NEW_PRIVS: u64 = 38;
const OP_SET_MODE_FILTER: u64 = 1;

/// One syscall with the rules that allow it (an empty list allows it unconditionally).
type Entry = (i64, Vec<SeccompRule>);

fn always(sys: libc::c_long) -> Entry {
    (sys, vec![])
}

fn rule(conds: Vec<Cond>) -> Result<SeccompRule, SeccompError> {
    SeccompRule::new(conds).map_err(SeccompError::Build)
}

/// `ioctl(fd, REQ, ...)` for exactly the requests in `reqs`.
fn ioctl_eq(reqs: &[u64]) -> Result<Vec<SeccompRule>, SeccompError> {
    reqs.iter()
        .map(|r| {
            rule(vec![
                Cond::new(1, Len::Dword, Op::Eq, *r).map_err(SeccompError::Build)?
            ])
        })
        .collect()
}

/// `ioctl(fd, REQ, ...)` for any request of type byte `ty` (e.g. every `KVM_*`).
fn ioctl_type(ty: u64) -> Result<SeccompRule, SeccompError> {
    rule(vec![Cond::new(
        1,
        Len::Dword,
        Op::MaskedEq(IOC_TYPE_MASK),
        ty << 8,
    )
    .map_err(SeccompError::Build)?])
}

/// What every Rust thread needs: memory, locks, time, signals, its own exit, and writing its log
/// lines and reports to fds it already holds.
fn common() -> Vec<Entry> {
    use libc::*;
    [
        SYS_read,
        SYS_readv,
        SYS_write,
        SYS_writev,
        SYS_close,
        SYS_futex,
        SYS_mmap,
        SYS_munmap,
        SYS_mremap,
        SYS_mprotect,
        SYS_madvise,
        SYS_brk,
        SYS_rt_sigprocmask,
        SYS_rt_sigreturn,
        SYS_sigaltstack,
        SYS_restart_syscall,
        SYS_clock_gettime,
        SYS_clock_nanosleep,
        SYS_nanosleep,
        SYS_sched_yield,
        SYS_getrandom,
        SYS_gettid,
        SYS_getpid,
        // abort() and pthread_kill (the vCPU kick) signal a thread of this process.
        SYS_tgkill,
        SYS_rseq,
        SYS_poll,
        SYS_ppoll,
        SYS_exit,
        SYS_exit_group,
    ]
    .into_iter()
    .map(always)
    .collect()
}

/// File operations on paths and fds: snapshots, working sets, block files, `/proc/self/pagemap`.
fn files() -> Vec<Entry> {
    use libc::*;
    [
        SYS_openat,
        SYS_open,
        SYS_fstat,
        SYS_newfstatat,
        SYS_statx,
        SYS_lseek,
        SYS_pread64,
        SYS_pwrite64,
        SYS_preadv,
        SYS_pwritev,
        SYS_preadv2,
        SYS_pwritev2,
        SYS_fcntl,
        SYS_fsync,
        SYS_fdatasync,
        SYS_ftruncate,
        SYS_fallocate,
        SYS_fstatfs,
        SYS_statfs,
        SYS_getdents64,
        SYS_mkdirat,
        SYS_mkdir,
        SYS_unlinkat,
        SYS_unlink,
        SYS_rename,
        SYS_renameat,
        SYS_renameat2,
        // Publishing a working set without replacing one a concurrent clone published.
        SYS_linkat,
        SYS_readlinkat,
        SYS_readlink,
        SYS_fchmod,
        SYS_copy_file_range,
        SYS_sendfile,
        SYS_flock,
    ]
    .into_iter()
    .map(always)
    .collect()
}

/// The VMM thread: the device loop, the control plane, restores and snapshots.
fn vmm() -> Result<Vec<Entry>, SeccompError> {
    use libc::*;
    let mut v = common();
    v.extend(files());
    v.extend(
        [
            SYS_epoll_create1,
            SYS_epoll_ctl,
            SYS_epoll_wait,
            SYS_epoll_pwait,
            SYS_eventfd2,
            SYS_signalfd4,
            SYS_timerfd_create,
            SYS_timerfd_settime,
            SYS_pipe2,
            SYS_dup,
            SYS_dup3,
            // Control connections and the vsock device's Unix sockets.
            SYS_socket,
            SYS_socketpair,
            SYS_bind,
            SYS_listen,
            SYS_connect,
            SYS_accept4,
            SYS_accept,
            SYS_sendto,
            SYS_sendmsg,
            SYS_recvfrom,
            SYS_recvmsg,
            SYS_shutdown,
            SYS_getsockopt,
            SYS_setsockopt,
            SYS_getsockname,
            SYS_getpeername,
            // Guest RAM: memfds, userfaultfd registration, working-set prefetch.
            SYS_memfd_create,
            SYS_userfaultfd,
            // The vCPU kick handler; thread setup of new vCPU and page-server threads.
            SYS_rt_sigaction,
            SYS_set_robust_list,
            SYS_sched_getaffinity,
            SYS_getuid,
            SYS_geteuid,
            SYS_getgid,
            SYS_getegid,
            SYS_uname,
            SYS_getcwd,
            SYS_prlimit64,
            SYS_getrusage,
        ]
        .into_iter()
        .map(always),
    );
    v.push((
        SYS_ioctl,
        vec![
            ioctl_type(KVM_TYPE)?,
            // Every UFFDIO_* and /dev/userfaultfd's USERFAULTFD_IOC_NEW (type 0xAA too): how a
            // jailed VMM, without CAP_SYS_PTRACE, gets a userfaultfd that sees KVM's faults.
            ioctl_type(UFFDIO)?,
            // std's set_nonblocking/set_cloexec, isatty.
        ]
        .into_iter()
        .chain(ioctl_eq(&[FIONBIO, FIOCLEX, TCGETS])?)
        // virtio-net's TAP: whether it exists (if_nametoindex), attach (at build or restore),
        // header size, offloads.
        .chain(ioctl_eq(&[
            SIOCGIFINDEX,
            TUNSETIFF,
            TUNSETVNETHDRSZ,
            TUNSETOFFLOAD,
        ])?)
        .collect(),
    ));
    // Threads only (vCPUs, the page server): a fork of the VMM is refused. clone3 passes its
    // flags in memory, out of the filter's reach: it answers ENOSYS (see `super::no_clone3`) and
    // glibc falls back to clone.
    let thread = CLONE_VM | CLONE_THREAD | CLONE_SIGHAND;
    v.push((
        SYS_clone,
        vec![rule(vec![Cond::new(
            0,
            Len::Qword,
            Op::MaskedEq(thread as u64),
            thread as u64,
        )
        .map_err(SeccompError::Build)?])?],
    ));
    v.push(always(SYS_clone3));
    v.push((SYS_prctl, arg0_in(&[OPT_SET_NAME, OPT_NO_NEW_PRIVS])?));
    v.push((SYS_seccomp, arg0_in(&[OP_SET_MODE_FILTER])?));
    Ok(v)
}

/// Rules allowing a syscall whose first argument is one of `values`.
fn arg0_in(values: &[u64]) -> Result<Vec<SeccompRule>, SeccompError> {
    values
        .iter()
        .map(|v| {
            rule(vec![
                Cond::new(0, Len::Dword, Op::Eq, *v).map_err(SeccompError::Build)?
            ])
        })
        .collect()
}

/// A vCPU thread: `KVM_RUN` and the exits it dispatches (serial and debug output, eventfds).
fn vcpu() -> Result<Vec<Entry>, SeccompError> {
    let mut v = common();
    v.push((
        libc::SYS_ioctl,
        ioctl_eq(&[
            KVM_RUN() as u64,
            KVM_GET_REGS() as u64,
            // A driver starting virtio-net (an MMIO status write, handled on this thread)
            // sets the TAP's offloads and arms it in the device's epoll.
            libc::TUNSETOFFLOAD,
        ])?,
    ));
    v.push(always(libc::SYS_epoll_ctl));
    Ok(v)
}

/// The userfaultfd page server: fault events, `UFFDIO_*` installs from the snapshot's memory
/// file, and publishing a recorded working set beside the snapshot.
fn uffd() -> Result<Vec<Entry>, SeccompError> {
    let mut v = common();
    v.extend(files());
    v.push((libc::SYS_ioctl, vec![ioctl_type(UFFDIO)?]));
    Ok(v)
}

/// The allow-list of `kind`.
pub(super) fn allowed(kind: ThreadKind) -> Result<BTreeMap<i64, Vec<SeccompRule>>, SeccompError> {
    let list = match kind {
        ThreadKind::Vmm => vmm()?,
        ThreadKind::Vcpu => vcpu()?,
        ThreadKind::Uffd => uffd()?,
    };
    let mut map = BTreeMap::new();
    for (sys, rules) in list {
        map.insert(sys, rules);
    }
    Ok(map)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioctl_numbers_match_the_kernel_abi() {
        assert_eq!(KVM_RUN(), 0xAE80);
        // _IOR(0xAE, 0x81, struct kvm_regs): 144 bytes.
        assert_eq!(KVM_GET_REGS(), 0x8090_AE81);
    }

    #[test]
    fn no_list_allows_exec_or_fork() {
        for kind in [ThreadKind::Vmm, ThreadKind::Vcpu, ThreadKind::Uffd] {
            let map = allowed(kind).unwrap();
            for sys in [
                libc::SYS_execve,
                libc::SYS_execveat,
                libc::SYS_fork,
                libc::SYS_vfork,
                libc::SYS_ptrace,
                libc::SYS_mount,
                libc::SYS_setuid,
                libc::SYS_init_module,
            ] {
                assert!(!map.contains_key(&sys), "{kind:?} allows syscall {sys}");
            }
        }
        assert!(!allowed(ThreadKind::Vcpu)
            .unwrap()
            .contains_key(&libc::SYS_openat));
        assert!(!allowed(ThreadKind::Vcpu)
            .unwrap()
            .contains_key(&libc::SYS_socket));
        assert!(!allowed(ThreadKind::Uffd)
            .unwrap()
            .contains_key(&libc::SYS_socket));
    }
}
