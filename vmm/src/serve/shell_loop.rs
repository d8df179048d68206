//! An idle VM shell's loop: serves the control plane until a `restore` turns the shell into a
//! clone, a `shutdown`, or a termination signal.

use std::os::fd::RawFd;
use std::time::Instant;

use vmm_api::{
    encode_error, encode_ok, ApiError, ErrorKind, Request, RestoreReply, StateReply, StatusReply,
    VmState, PROTOCOL_VERSION,
};
use vmm_sys_util::epoll::{Epoll, EpollEvent};

use super::{epoll_add, epoll_wait, ControlPlane, Deferred, Dispatch};
use crate::error::{io_err, VmmError};
use crate::shell::Shell;
use crate::vmm::Vmm;

const TOKEN_TERM: u64 = u64::MAX - 1;

/// What a shell process does next.
pub enum ShellOutcome {
    /// A clone was restored and answered; run it (it keeps serving the shell's control plane).
    Restored(Box<Vmm>),
    /// Asked to shut down (or terminated) before any restore.
    Shutdown,
}

/// Serves `plane` for an idle `shell` until a `restore` arrives (answered, after which the clone
/// is ready to run), a `shutdown`, or `term_fd`. A restore that fails consumes the shell: the
/// error is the reply, and it is returned so the caller exits non-zero.
pub fn wait_for_restore(
    shell: Shell,
    mut plane: ControlPlane,
    term_fd: Option<RawFd>,
) -> Result<ShellOutcome, VmmError> {
    let epoll = Epoll::new().map_err(io_err("creating epoll"))?;
    if let Some(fd) = term_fd {
        epoll_add(&epoll, fd, TOKEN_TERM).map_err(io_err("registering the signalfd"))?;
    }
    plane
        .register(&epoll)
        .map_err(io_err("registering the control socket with epoll"))?;
    let status = StatusReply {
        version: PROTOCOL_VERSION,
        state: VmState::Shell,
        vcpus: shell.vcpus(),
        mem_mib: shell.ram.size >> 20,
        generation: None,
        mem_mode: None,
        uffd: None,
    };
    let shutdown = std::cell::Cell::new(false);
    let has_listener = plane.has_listener();
    // A descriptor sent with a request is closed: a shell takes none.
    let mut handle = |req: Request, _fd| {
        match req {
        Request::Status {} => Dispatch::Reply(encode_ok(&status)),
        Request::Shutdown {} => {
            shutdown.set(true);
            Dispatch::Reply(encode_ok(&StateReply {
                state: VmState::Stopping,
            }))
        }
        Request::Restore(opts) => match opts.validate() {
            Ok(()) if opts.control.is_some() && has_listener => {
                Dispatch::Reply(encode_error(&ApiError::new(
                    ErrorKind::BadRequest,
                    "this shell already serves a control socket, which the clone keeps: omit control",
                )))
            }
            Ok(()) => Dispatch::Defer(Request::Restore(opts)),
            Err(e) => Dispatch::Reply(encode_error(&ApiError::new(ErrorKind::BadRequest, e))),
        },
        Request::Pause {}
        | Request::Resume {}
        | Request::Snapshot { .. }
        | Request::Activate { .. }
        | Request::AttachDisk { .. }
        | Request::DetachDisk { .. } => {
            Dispatch::Reply(encode_error(&ApiError::new(
                ErrorKind::InvalidState,
                "this shell has no VM yet: send a restore request first",
            )))
        }
    }
    };
    let mut events = vec![EpollEvent::default(); 8];
    let deferred = 'serve: loop {
        let n = epoll_wait(&epoll, &mut events, plane.poll_timeout_ms())
            .map_err(io_err("waiting on epoll"))?;
        plane.tick(&epoll);
        for ev in &events[..n] {
            let token = ev.data();
            if token == TOKEN_TERM {
                return Ok(ShellOutcome::Shutdown);
            }
            if let Some(d) = plane.on_event(&epoll, token, &mut handle) {
                break 'serve d;
            }
            if shutdown.get() {
                plane.flush_all();
                return Ok(ShellOutcome::Shutdown);
            }
        }
    };
    let Deferred {
        token,
        request: Request::Restore(opts),
    } = deferred
    else {
        return Err(VmmError::Invalid("only a restore is deferred".into()));
    };
    plane.unregister(&epoll);
    let t0 = Instant::now();
    match Vmm::restore_into(shell, &opts, ControlPlane::default()) {
        Ok(mut vm) => {
            let reply = encode_ok(&RestoreReply {
                state: if opts.paused {
                    VmState::Paused
                } else {
                    VmState::Running
                },
                restore_ms: t0.elapsed().as_secs_f64() * 1e3,
                generation: vm.generation,
                uffd: vm.uffd_stats(),
            });
            plane.send_to(token, &reply);
            vm.adopt_control(plane);
            Ok(ShellOutcome::Restored(Box::new(vm)))
        }
        Err(e) => {
            plane.reply(
                &epoll,
                token,
                &encode_error(&ApiError::new(ErrorKind::Failed, e.to_string())),
            );
            plane.flush_all();
            Err(e)
        }
    }
}
