//! The running VM's device loop: exit events, termination signals, virtio queue notifications,
//! device back-ends and the control plane, all on one thread.

use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::Ordering;
use std::time::Instant;

use vmm_api::{
    encode_error, encode_ok, slot_id, validate_clone_id, ActivateReply, ApiError, DiskReply,
    ErrorKind, Request, SnapshotReply, StateReply, StatusReply, VmState, PROTOCOL_VERSION,
};
use vmm_sys_util::epoll::{Epoll, EpollEvent};

use super::{epoll_add, epoll_wait, ControlPlane, Dispatch};
use crate::devices::virtio::block::Backing;
use crate::error::{io_err, VmmError};
use crate::sync::LockOrRecover;
use crate::vcpu::{self, RunControl, VcpuThread};
use crate::vmm::Vmm;
use crate::ExitReason;

/// Back-end `i` uses token `TOKEN_BACKEND_BASE + i`.
const TOKEN_BACKEND_BASE: u64 = 1 << 40;
/// Queue event `i` uses token `TOKEN_QUEUE_BASE + i` (connections use their fd, below 2^32).
const TOKEN_QUEUE_BASE: u64 = 1 << 32;
const TOKEN_EXIT: u64 = u64::MAX;
const TOKEN_TERM: u64 = u64::MAX - 1;

/// What the device loop serves.
pub(crate) struct DeviceLoop<'a> {
    pub(crate) vmm: &'a Vmm,
    pub(crate) ctl: &'a RunControl,
    pub(crate) threads: &'a [VcpuThread],
}

impl DeviceLoop<'_> {
    /// Waits for the exit event, termination signals, queue notifications and control requests
    /// until the VM must end.
    pub(crate) fn run(
        &self,
        term_fd: Option<RawFd>,
        plane: &mut ControlPlane,
    ) -> Result<(), VmmError> {
        let exit = &*self.vmm.exit;
        let (queue_events, backends) = (&self.vmm.queue_events, &self.vmm.backends);
        let epoll = Epoll::new().map_err(io_err("creating epoll"))?;
        let add = |fd: RawFd, token: u64| {
            epoll_add(&epoll, fd, token).map_err(io_err("registering an fd with epoll"))
        };
        add(exit.eventfd().as_raw_fd(), TOKEN_EXIT)?;
        if let Some(fd) = term_fd {
            add(fd, TOKEN_TERM)?;
        }
        for (i, q) in queue_events.iter().enumerate() {
            add(q.evt.as_raw_fd(), TOKEN_QUEUE_BASE + i as u64)?;
        }
        for (i, b) in backends.iter().enumerate() {
            add(b.fd, TOKEN_BACKEND_BASE + i as u64)?;
        }
        plane
            .register(&epoll)
            .map_err(io_err("registering the control socket with epoll"))?;
        let mut handle = |req, fd| Dispatch::Reply(self.handle(req, fd));
        plane.serve_buffered(&epoll, &mut handle);
        let mut events = vec![EpollEvent::default(); 16];
        while exit.reason().is_none() {
            let n = epoll_wait(&epoll, &mut events, plane.poll_timeout_ms())
                .map_err(io_err("waiting on epoll"))?;
            plane.tick(&epoll);
            for ev in &events[..n] {
                match ev.data() {
                    TOKEN_EXIT => {}
                    TOKEN_TERM => exit.exit(ExitReason::Signal),
                    token if plane.owns(token) => {
                        plane.on_event(&epoll, token, &mut handle);
                    }
                    token if token >= TOKEN_BACKEND_BASE => {
                        if let Some(b) = backends.get((token - TOKEN_BACKEND_BASE) as usize) {
                            b.transport.lock_or_recover().backend_event();
                        }
                    }
                    token if token >= TOKEN_QUEUE_BASE => {
                        if let Some(q) = queue_events.get((token - TOKEN_QUEUE_BASE) as usize) {
                            let _ = q.evt.read();
                            q.transport.lock_or_recover().notify(q.queue);
                        }
                    }
                    _ => {}
                }
            }
        }
        plane.flush_all();
        Ok(())
    }

    /// Writes a warm clone's identity (fresh entropy) and starts its vCPUs.
    fn activate(&self, clone_id: &str, ipv4: Option<std::net::Ipv4Addr>) -> Vec<u8> {
        let vmm = self.vmm;
        if let Err(e) = validate_clone_id(clone_id) {
            return encode_error(&ApiError::new(ErrorKind::BadRequest, e));
        }
        if ipv4.is_some() && vmm.config.net.is_none() {
            return encode_error(&ApiError::new(
                ErrorKind::BadRequest,
                "activate with ipv4: this VM has no network device (build the template with one)",
            ));
        }
        if !vmm.awaiting_activation.load(Ordering::Relaxed) {
            return encode_error(&ApiError::new(
                ErrorKind::InvalidState,
                "activate applies to a clone restored with paused=true that has not run yet",
            ));
        }
        // The vCPUs are parked and have never run since the restore: the guest first sees
        // this identity.
        if let Err(e) = crate::boot::write_identity(&vmm.ram.mem, vmm.generation, clone_id) {
            return encode_error(&ApiError::new(ErrorKind::Failed, e.to_string()));
        }
        if let Some(ip) = ipv4 {
            if let Err(e) = crate::boot::write_identity_ipv4(&vmm.ram.mem, ip) {
                return encode_error(&ApiError::new(ErrorKind::Failed, e.to_string()));
            }
        }
        vmm.awaiting_activation.store(false, Ordering::Relaxed);
        vcpu::resume(self.ctl);
        encode_ok(&ActivateReply {
            state: VmState::Running,
            generation: vmm.generation,
        })
    }

    /// Attaches a disk to slot `slot` (`attach` = Some) or puts its placeholder back. Runs on
    /// the device-loop thread, which serves the queues: the swap happens between two requests.
    fn swap_disk(&self, slot: usize, attach: Option<Attach>) -> Vec<u8> {
        let refuse = |kind, msg: String| encode_error(&ApiError::new(kind, msg));
        if self.ctl.is_paused() {
            return refuse(
                ErrorKind::InvalidState,
                "the VM is paused: resume (or activate) it before attaching or detaching disks"
                    .into(),
            );
        }
        let blocks = self.vmm.config.block.len();
        let Some(transport) = self.vmm.transports.get(slot).filter(|_| slot < blocks) else {
            return refuse(
                ErrorKind::BadRequest,
                format!("slot {slot} is out of range: this VM has {blocks} block devices"),
            );
        };
        let want = slot_id(slot);
        if self.vmm.config.block[slot].id.as_deref() != Some(want.as_str()) {
            return refuse(
                ErrorKind::BadRequest,
                format!(
                    "block device {slot} is not a disk slot (its id is {:?}): declare slots as --block path=PLACEHOLDER,id={want}",
                    self.vmm.config.block[slot].id.as_deref().unwrap_or("")
                ),
            );
        }
        // Opened before taking the transport's lock: a slow open never holds up the vCPUs.
        let backing = match attach.map(Attach::backing).transpose() {
            Ok(b) => b,
            Err(e) => return refuse(ErrorKind::Failed, e.to_string()),
        };
        let mut t = transport.lock_or_recover();
        let Some(blk) = t.device_mut().as_block_mut() else {
            return refuse(
                ErrorKind::BadRequest,
                format!("device {slot} is not a block device"),
            );
        };
        let changed = match backing {
            Some(b) => {
                blk.attach(b);
                true
            }
            None => blk.detach(),
        };
        let reply = DiskReply {
            slot,
            capacity_sectors: blk.capacity_sectors(),
            serial: blk.id(),
        };
        if changed {
            t.config_changed();
        }
        encode_ok(&reply)
    }

    /// The first slot holding an attached disk, if any.
    fn attached_slot(&self) -> Option<usize> {
        self.vmm.transports.iter().position(|t| {
            t.lock_or_recover()
                .device()
                .as_block()
                .is_some_and(|b| b.is_attached())
        })
    }

    fn handle(&self, req: Request, fd: Option<OwnedFd>) -> Vec<u8> {
        let vmm = self.vmm;
        let (ctl, threads) = (self.ctl, self.threads);
        let state = || {
            if ctl.is_paused() {
                VmState::Paused
            } else {
                VmState::Running
            }
        };
        match req {
            Request::Status {} => encode_ok(&StatusReply {
                version: PROTOCOL_VERSION,
                state: state(),
                vcpus: vmm.config.vcpus,
                mem_mib: vmm.ram.size >> 20,
                generation: Some(vmm.generation),
                mem_mode: vmm.mem_mode,
                uffd: vmm.uffd_stats(),
            }),
            Request::Restore(_) => encode_error(&ApiError::new(
                ErrorKind::InvalidState,
                "this VMM already runs a VM; restore into an idle shell (runv-vmm --shell)",
            )),
            Request::Pause {} => {
                vcpu::pause(ctl, threads);
                encode_ok(&StateReply {
                    state: VmState::Paused,
                })
            }
            Request::Activate { clone_id, ipv4 } => self.activate(&clone_id, ipv4),
            Request::Resume {} => {
                vmm.awaiting_activation.store(false, Ordering::Relaxed);
                vcpu::resume(ctl);
                encode_ok(&StateReply {
                    state: VmState::Running,
                })
            }
            Request::Shutdown {} => {
                vmm.exit.exit(ExitReason::Shutdown);
                encode_ok(&StateReply {
                    state: VmState::Stopping,
                })
            }
            Request::AttachDisk {
                slot,
                path,
                read_only,
                fd: carries_fd,
            } => {
                let source = match (carries_fd, fd) {
                    (false, _) => Source::Path,
                    (true, Some(fd)) => Source::Fd(fd),
                    (true, None) => {
                        return encode_error(&ApiError::new(
                            ErrorKind::BadRequest,
                            format!(
                                "attach_disk {} with fd: true, but no file descriptor came with the request: send it with SCM_RIGHTS on the request line (ControlClient::attach_disk does), or omit fd to have the VMM open the path",
                                path.display()
                            ),
                        ))
                    }
                };
                self.swap_disk(
                    slot,
                    Some(Attach {
                        path,
                        read_only,
                        source,
                    }),
                )
            }
            Request::DetachDisk { slot } => self.swap_disk(slot, None),
            Request::Snapshot { dir } => {
                if let Some(slot) = self.attached_slot() {
                    return encode_error(&ApiError::new(
                        ErrorKind::InvalidState,
                        format!("disk slot {slot} holds an attached disk, which a snapshot cannot record: detach disks before snapshotting"),
                    ));
                }
                vcpu::pause(ctl, threads);
                let t0 = Instant::now();
                match vmm.snapshot(&dir) {
                    Ok(mem) => encode_ok(&SnapshotReply {
                        state: VmState::Paused,
                        ms: t0.elapsed().as_secs_f64() * 1e3,
                        memory_bytes: mem.data_bytes,
                    }),
                    Err(e) => encode_error(&ApiError::new(ErrorKind::Failed, e.to_string())),
                }
            }
        }
    }
}

/// Where an attached disk comes from.
enum Source {
    /// The VMM opens the request's path (it must see it).
    Path,
    /// A descriptor the client sent with the request; the path only labels it.
    Fd(OwnedFd),
}

/// An `attach_disk` request's disk.
struct Attach {
    path: std::path::PathBuf,
    read_only: bool,
    source: Source,
}

impl Attach {
    fn backing(self) -> Result<Backing, crate::devices::virtio::block::AttachError> {
        match self.source {
            Source::Path => Backing::open(&self.path, self.read_only),
            Source::Fd(fd) => Backing::from_fd(fd, &self.path, self.read_only),
        }
    }
}
