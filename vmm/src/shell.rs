//! VM shells: everything a VM has before it has a guest, made ahead of time.
//!
//! Creating a KVM VM costs ~8 ms here, almost all of it the first `KVM_SET_USER_MEMORY_REGION`.
//! A shell pays that before a clone is requested: KVM VM, irqchip, PIT, memslots over reserved
//! anonymous RAM and vCPUs that never ran. A restore then maps the clone's memory over the
//! reservation with `MAP_FIXED` (the memslots stay valid) and loads device, VM and vCPU state.
//! `runv-vmm --shell` keeps one waiting for a `restore` command on its control socket.

use std::collections::HashMap;
use std::io::Write;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::time::Instant;

use kvm_bindings::{kvm_pit_config, kvm_userspace_memory_region, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use serde_json::json;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent};

use crate::config::{MAX_MEM_MIB, MAX_VCPUS, MIN_MEM_MIB};
use crate::control::{self, Connection, Request, SocketFile};
use crate::memory::GuestRam;
use crate::vmm::{epoll_add, epoll_wait, io_err, register_connection, vm_err, Vmm, VmmError};

/// A KVM VM without a guest yet.
pub struct Shell {
    pub(crate) kvm: Kvm,
    pub(crate) vm: VmFd,
    pub(crate) ram: GuestRam,
    pub(crate) vcpu_fds: Vec<VcpuFd>,
}

impl Shell {
    /// Creates a VM with `mem_mib` MiB of reserved RAM and `vcpus` fresh vCPUs.
    pub fn create(mem_mib: u64, vcpus: u8) -> Result<Self, VmmError> {
        Self::with_kvm(Kvm::new().map_err(VmmError::Kvm)?, mem_mib, vcpus)
    }

    /// [`Shell::create`] on an already opened `/dev/kvm`.
    pub fn with_kvm(kvm: Kvm, mem_mib: u64, vcpus: u8) -> Result<Self, VmmError> {
        if !(MIN_MEM_MIB..=MAX_MEM_MIB).contains(&mem_mib) || !(1..=MAX_VCPUS).contains(&vcpus) {
            return Err(VmmError::Mismatch(format!(
                "a shell of {mem_mib} MiB and {vcpus} vCPUs: use {MIN_MEM_MIB}..={MAX_MEM_MIB} MiB and 1..={MAX_VCPUS} vCPUs"
            )));
        }
        let t0 = Instant::now();
        let ram = GuestRam::reserve(mem_mib << 20)?;
        let vm = kvm.create_vm().map_err(vm_err("KVM_CREATE_VM"))?;
        vm.set_tss_address(0xfffb_d000)
            .map_err(vm_err("KVM_SET_TSS_ADDR"))?;
        vm.create_irq_chip().map_err(vm_err("KVM_CREATE_IRQCHIP"))?;
        vm.create_pit2(kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        })
        .map_err(vm_err("KVM_CREATE_PIT2"))?;
        for (slot, (host, guest, size)) in ram.regions().into_iter().enumerate() {
            let region = kvm_userspace_memory_region {
                slot: slot as u32,
                flags: 0,
                guest_phys_addr: guest,
                memory_size: size,
                userspace_addr: host,
            };
            // SAFETY: the region is a live mapping owned by `ram`, which lives as long as the
            // VM fd (the shell, then the Vmm, own both); later MAP_FIXED replacements keep the
            // same addresses and size.
            unsafe { vm.set_user_memory_region(region) }
                .map_err(vm_err("KVM_SET_USER_MEMORY_REGION"))?;
        }
        let vcpu_fds = (0..vcpus)
            .map(|id| vm.create_vcpu(u64::from(id)))
            .collect::<Result<Vec<_>, _>>()
            .map_err(vm_err("KVM_CREATE_VCPU"))?;
        tracing::debug!(elapsed = ?t0.elapsed(), "VM shell created");
        Ok(Self {
            kvm,
            vm,
            ram,
            vcpu_fds,
        })
    }

    /// Number of vCPUs.
    pub fn vcpus(&self) -> u8 {
        self.vcpu_fds.len() as u8
    }
}

/// What a shell process does next.
pub enum ShellOutcome {
    /// A clone was restored; run it, keeping the connection that asked for it.
    Restored(Box<Vmm>, UnixStream),
    /// Asked to shut down (or terminated) before any restore.
    Shutdown,
}

const TOKEN_LISTENER: u64 = u64::MAX;
const TOKEN_TERM: u64 = u64::MAX - 1;

/// Serves the control socket of an idle shell until a `restore` arrives (answered, after which
/// the clone is ready to run), a `shutdown`, or `term_fd`. A failed restore consumes the shell:
/// the error is the reply and the caller should exit.
pub fn wait_for_restore(
    shell: Shell,
    listener: UnixListener,
    socket: SocketFile,
    term_fd: Option<RawFd>,
) -> Result<ShellOutcome, VmmError> {
    let epoll = Epoll::new().map_err(io_err("creating epoll"))?;
    let add = |fd: RawFd, token: u64| epoll_add(&epoll, fd, token);
    add(listener.as_raw_fd(), TOKEN_LISTENER)?;
    if let Some(fd) = term_fd {
        add(fd, TOKEN_TERM)?;
    }
    let mut conns: HashMap<u64, Connection> = HashMap::new();
    let mut events = vec![EpollEvent::default(); 8];
    loop {
        let n = epoll_wait(&epoll, &mut events)?;
        for ev in &events[..n] {
            match ev.data() {
                TOKEN_TERM => return Ok(ShellOutcome::Shutdown),
                TOKEN_LISTENER => {
                    while let Ok((stream, _)) = listener.accept() {
                        register_connection(&epoll, &mut conns, stream)?;
                    }
                }
                token => {
                    let Some(conn) = conns.get_mut(&token) else {
                        continue;
                    };
                    let open = conn.read_available();
                    let Connection { stream, buf } = conn;
                    let Some(pos) = buf.iter().position(|&b| b == b'\n') else {
                        if !open || buf.len() > control::MAX_REQUEST {
                            let _ = epoll.ctl(
                                ControlOperation::Delete,
                                token as RawFd,
                                EpollEvent::default(),
                            );
                            conns.remove(&token);
                        }
                        continue;
                    };
                    let line: Vec<u8> = buf.drain(..=pos).collect();
                    let reply = match control::parse(&line[..pos]) {
                        Err(e) => e,
                        Ok(Request::Status) => json!({
                            "ok": true,
                            "state": "shell",
                            "mem_mib": shell.ram.size >> 20,
                            "vcpus": shell.vcpus(),
                        }),
                        Ok(Request::Shutdown) => {
                            let _ = reply_line(stream, &json!({"ok": true, "state": "stopping"}));
                            return Ok(ShellOutcome::Shutdown);
                        }
                        Ok(Request::Restore(opts)) => {
                            let Some(Connection { mut stream, .. }) = conns.remove(&token) else {
                                continue;
                            };
                            let _ = epoll.ctl(
                                ControlOperation::Delete,
                                stream.as_raw_fd(),
                                EpollEvent::default(),
                            );
                            let t0 = Instant::now();
                            return match Vmm::restore_into(shell, &opts, Some((listener, socket))) {
                                Ok(vm) => {
                                    let mut reply = json!({
                                        "ok": true,
                                        "state": "running",
                                        "restore_ms": t0.elapsed().as_secs_f64() * 1e3,
                                    });
                                    if let Some(s) = vm.uffd_stats() {
                                        reply["uffd"] = json!(s);
                                    }
                                    let _ = reply_line(&mut stream, &reply);
                                    Ok(ShellOutcome::Restored(Box::new(vm), stream))
                                }
                                Err(e) => {
                                    let _ = reply_line(
                                        &mut stream,
                                        &json!({"ok": false, "error": e.to_string()}),
                                    );
                                    Err(e)
                                }
                            };
                        }
                        Ok(_) => json!({
                            "ok": false,
                            "error": "this shell has no VM yet: send {\"cmd\":\"restore\",\"dir\":...} first",
                        }),
                    };
                    if reply_line(stream, &reply).is_err() {
                        conns.remove(&token);
                    }
                }
            }
        }
    }
}

fn reply_line(stream: &mut UnixStream, v: &serde_json::Value) -> std::io::Result<()> {
    let mut out = v.to_string().into_bytes();
    out.push(b'\n');
    stream.set_nonblocking(false)?;
    stream.write_all(&out)?;
    stream.set_nonblocking(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn out_of_range_shells_are_refused() {
        for (mem, vcpus) in [(8, 1), (1 << 20, 1), (64, 0), (64, 9)] {
            let e = Shell::create(mem, vcpus)
                .err()
                .expect("refused")
                .to_string();
            assert!(e.contains("MiB") && e.contains("vCPUs"), "{e}");
        }
    }
}
