//! vCPU threads: one per vCPU, running `KVM_RUN` and dispatching exits to the buses; parked at a
//! consistent point (outside `KVM_RUN`) on pause and on shutdown.

use crate::sync::LockOrRecover;
use std::os::unix::thread::JoinHandleExt;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use kvm_ioctls::{VcpuExit, VcpuFd};

use crate::devices::bus::Bus;
use crate::{ExitReason, ExitSignal};

/// Signal used to kick vCPU threads out of `KVM_RUN`.
pub fn kick_signal() -> i32 {
    libc::SIGRTMIN() + 2
}

extern "C" fn noop_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// Installs the (empty) kick signal handler; idempotent.
pub fn install_kick_handler() -> std::io::Result<()> {
    vmm_sys_util::signal::register_signal_handler(kick_signal(), noop_handler)
        .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))
}

#[derive(Default)]
struct RunState {
    paused: bool,
    stop: bool,
    parked: usize,
}

/// Shared run control of all vCPU threads.
#[derive(Default)]
pub struct RunControl {
    state: Mutex<RunState>,
    cv: Condvar,
}

impl RunControl {
    /// Run control whose vCPUs start parked when `paused` (until [`resume`]).
    pub fn new(paused: bool) -> Self {
        Self {
            state: Mutex::new(RunState {
                paused,
                ..RunState::default()
            }),
            cv: Condvar::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, RunState> {
        self.state.lock_or_recover()
    }

    /// Whether the vCPUs are (asked to be) paused.
    pub fn is_paused(&self) -> bool {
        self.lock().paused
    }

    /// Parks the calling vCPU thread while paused; returns false when the VM stops.
    fn checkpoint(&self) -> bool {
        let mut s = self.lock();
        if s.paused && !s.stop {
            s.parked += 1;
            self.cv.notify_all();
            while s.paused && !s.stop {
                s = self.cv.wait(s).unwrap_or_else(|p| p.into_inner());
            }
            s.parked -= 1;
        }
        !s.stop
    }
}

/// A running vCPU thread.
pub struct VcpuThread {
    handle: Option<JoinHandle<()>>,
}

/// Spawns the thread of vCPU `id`.
pub fn spawn(
    id: u8,
    fd: Arc<Mutex<VcpuFd>>,
    pio: Arc<Bus>,
    mmio: Arc<Bus>,
    exit: Arc<ExitSignal>,
    ctl: Arc<RunControl>,
) -> std::io::Result<VcpuThread> {
    let handle = std::thread::Builder::new()
        .name(format!("vcpu{id}"))
        .spawn(move || {
            // Confined before the first KVM_RUN: guest code only ever runs under the filter.
            if let Err(e) = crate::seccomp::install(crate::seccomp::ThreadKind::Vcpu) {
                exit.exit(ExitReason::Error(format!("vCPU {id}: {e}")));
                return;
            }
            while ctl.checkpoint() {
                let outcome = {
                    let mut fd = fd.lock_or_recover();
                    run_once(&mut fd, &pio, &mmio)
                };
                if let Some(reason) = outcome {
                    exit.exit(reason);
                    // Park until the VMM stops us; never spin on a dead vCPU.
                    let mut s = ctl.lock();
                    while !s.stop {
                        s = ctl.cv.wait(s).unwrap_or_else(|p| p.into_inner());
                    }
                    break;
                }
            }
        })?;
    Ok(VcpuThread {
        handle: Some(handle),
    })
}

/// One `KVM_RUN`; `Some` when the VM must end.
fn run_once(fd: &mut VcpuFd, pio: &Bus, mmio: &Bus) -> Option<ExitReason> {
    match fd.run() {
        Ok(VcpuExit::IoOut(port, data)) => {
            pio.write(u64::from(port), data);
            None
        }
        Ok(VcpuExit::IoIn(port, data)) => {
            if !pio.read(u64::from(port), data) {
                data.fill(0xff);
            }
            None
        }
        Ok(VcpuExit::MmioRead(addr, data)) => {
            if !mmio.read(addr, data) {
                data.fill(0xff);
            }
            None
        }
        Ok(VcpuExit::MmioWrite(addr, data)) => {
            mmio.write(addr, data);
            None
        }
        Ok(VcpuExit::Intr) | Ok(VcpuExit::IrqWindowOpen) => None,
        Ok(VcpuExit::Hlt) => Some(ExitReason::GuestHalt),
        Ok(VcpuExit::Shutdown) => {
            // A triple fault: how a broken guest dies (Linux reboots through the i8042 first).
            let rip = fd.get_regs().map(|r| r.rip).unwrap_or(0);
            Some(ExitReason::Error(format!(
                "the guest crashed: triple fault (KVM_EXIT_SHUTDOWN) at rip {rip:#x}"
            )))
        }
        Ok(VcpuExit::SystemEvent(kind, _)) => Some(match kind {
            kvm_bindings::KVM_SYSTEM_EVENT_RESET => ExitReason::GuestReset,
            kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN => ExitReason::GuestPowerOff,
            other => ExitReason::Error(format!("guest system event {other}")),
        }),
        Ok(VcpuExit::FailEntry(reason, cpu)) => Some(ExitReason::Error(format!(
            "KVM_RUN failed to enter the guest (hardware reason {reason:#x}, cpu {cpu})"
        ))),
        Ok(VcpuExit::InternalError) => Some(ExitReason::Error(
            "KVM internal error (emulation failure in the guest)".into(),
        )),
        Ok(other) => Some(ExitReason::Error(format!("unexpected vCPU exit {other:?}"))),
        Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
            fd.set_kvm_immediate_exit(0);
            None
        }
        Err(e) => Some(ExitReason::Error(format!("KVM_RUN failed: {e}"))),
    }
}

impl VcpuThread {
    fn kick(&self) {
        if let Some(h) = &self.handle {
            // SAFETY: the pthread is alive until joined (we hold its JoinHandle); the kick signal
            // has an installed no-op handler, so it only interrupts KVM_RUN.
            unsafe { libc::pthread_kill(h.as_pthread_t(), kick_signal()) };
        }
    }
}

/// Pauses every vCPU: returns once all are parked outside `KVM_RUN`.
pub fn pause(ctl: &RunControl, vcpus: &[VcpuThread]) {
    ctl.lock().paused = true;
    loop {
        // Re-kick until parked: a signal that lands just before KVM_RUN starts is not lost for
        // long.
        vcpus.iter().for_each(VcpuThread::kick);
        let s = ctl.lock();
        let (s, _) = ctl
            .cv
            .wait_timeout_while(s, Duration::from_millis(2), |s| {
                s.parked < vcpus.len() && !s.stop
            })
            .unwrap_or_else(|p| p.into_inner());
        if s.parked >= vcpus.len() || s.stop {
            return;
        }
    }
}

/// Resumes paused vCPUs.
pub fn resume(ctl: &RunControl) {
    ctl.lock().paused = false;
    ctl.cv.notify_all();
}

/// Stops and joins every vCPU thread.
pub fn stop(ctl: &RunControl, vcpus: &mut [VcpuThread]) {
    ctl.lock().stop = true;
    ctl.cv.notify_all();
    for v in vcpus.iter_mut() {
        while v.handle.as_ref().is_some_and(|h| !h.is_finished()) {
            v.kick();
            std::thread::sleep(Duration::from_micros(200));
        }
        if let Some(h) = v.handle.take() {
            let _ = h.join();
        }
    }
}
