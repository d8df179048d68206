//! Wiring a VM: virtio-mmio devices (ioeventfds, irqfds, MMIO slots, kernel command line),
//! legacy port devices and the debug report port, around a [`Shell`].

use std::fs::OpenOptions;
use std::os::fd::RawFd;
use std::sync::{Arc, Mutex};

use crossbeam_channel::{Receiver, Sender};
use kvm_ioctls::IoEventAddress;
use vmm_sys_util::eventfd::EventFd;

use crate::config::{SerialOutput, VmConfig};
use crate::devices::bus::Bus;
use crate::devices::legacy::{DebugPort, EventFdTrigger, Serial, Sink, I8042};
use crate::devices::virtio::block::Block;
use crate::devices::virtio::mmio::{MmioTransport, QUEUE_NOTIFY};
use crate::devices::virtio::net::Net;
use crate::devices::virtio::vsock::Vsock;
use crate::devices::virtio::VirtioDevice;
use crate::error::{io_err, vm_err, VmmError};
use crate::layout::*;
use crate::serve::ControlPlane;
use crate::shell::Shell;
use crate::vmm::Vmm;
use crate::ExitSignal;

/// A queue's notification eventfd and the transport to poke when it fires.
pub(crate) struct QueueEvent {
    pub(crate) evt: EventFd,
    pub(crate) transport: Arc<Mutex<MmioTransport>>,
    pub(crate) queue: usize,
}

/// A device back-end's fd (its own epoll) and its transport.
pub(crate) struct Backend {
    pub(crate) fd: RawFd,
    pub(crate) transport: Arc<Mutex<MmioTransport>>,
}

/// Opens a debug-log or serial sink: `-` is stdout, anything else a file appended to.
fn open_sink(spec: &str) -> Result<Sink, VmmError> {
    if spec == "-" {
        return Ok(Box::new(std::io::stdout()));
    }
    let f = OpenOptions::new()
        .create(true)
        .append(true)
        .open(spec)
        .map_err(io_err(format!("opening {spec}")))?;
    Ok(Box::new(f))
}

impl Vmm {
    /// Wires a VM around `shell` (KVM VM with irqchip, PIT and memslots, vCPUs that never ran):
    /// virtio devices with their ioeventfds and irqfds, legacy devices, the control plane.
    pub(crate) fn assemble(
        config: VmConfig,
        shell: Shell,
        control: ControlPlane,
    ) -> Result<Self, VmmError> {
        let Shell {
            kvm,
            vm,
            ram,
            vcpu_fds,
        } = shell;
        let mut mmio = Bus::new();
        let mut irq_fds = Vec::new();
        let mut queue_events = Vec::new();
        let mut cmdline = config.cmdline.clone();
        let mut backends = Vec::new();
        let mut devices: Vec<Box<dyn VirtioDevice>> = Vec::new();
        let mut transports = Vec::new();
        for b in &config.block {
            devices.push(Box::new(Block::new(&b.path, b.read_only, b.id.as_deref())?));
        }
        if let Some(v) = &config.vsock {
            devices.push(Box::new(Vsock::new(v.cid, &v.uds)?));
        }
        if let Some(n) = &config.net {
            devices.push(Box::new(Net::new(&n.tap, n.mac_or_default().0)?));
        }
        for (i, dev) in devices.into_iter().enumerate() {
            let base = VIRTIO_MMIO_BASE + i as u64 * VIRTIO_MMIO_SIZE;
            let gsi = VIRTIO_IRQ_BASE + i as u32;
            let transport = MmioTransport::new(ram.mem.clone(), dev)
                .map_err(io_err("creating virtio-mmio eventfds"))?;
            for (q, evt) in transport.queue_events().iter().enumerate() {
                vm.register_ioevent(evt, &IoEventAddress::Mmio(base + QUEUE_NOTIFY), q as u32)
                    .map_err(vm_err("KVM_IOEVENTFD"))?;
            }
            vm.register_irqfd(transport.irq(), gsi)
                .map_err(vm_err("KVM_IRQFD (virtio)"))?;
            let events: Vec<EventFd> = transport
                .queue_events()
                .iter()
                .map(EventFd::try_clone)
                .collect::<Result<_, _>>()
                .map_err(io_err("cloning a queue eventfd"))?;
            let backend_fd = transport.backend_fd();
            let transport = Arc::new(Mutex::new(transport));
            transports.push(transport.clone());
            if let Some(fd) = backend_fd {
                backends.push(Backend {
                    fd,
                    transport: transport.clone(),
                });
            }
            for (q, evt) in events.into_iter().enumerate() {
                queue_events.push(QueueEvent {
                    evt,
                    transport: transport.clone(),
                    queue: q,
                });
            }
            mmio.insert(transport, base, VIRTIO_MMIO_SIZE)
                .map_err(|e| {
                    io_err("placing a virtio device")(std::io::Error::other(e.to_string()))
                })?;
            if !cmdline.is_empty() {
                cmdline.push(' ');
            }
            cmdline += &format!("virtio_mmio.device=4K@{base:#x}:{gsi}");
        }

        let vcpu_fds = vcpu_fds
            .into_iter()
            .map(|fd| Arc::new(Mutex::new(fd)))
            .collect();

        let exit = Arc::new(ExitSignal::new().map_err(io_err("creating the exit eventfd"))?);
        let mut pio = Bus::new();
        let serial_irq = EventFd::new(libc::EFD_NONBLOCK).map_err(io_err("creating an eventfd"))?;
        vm.register_irqfd(&serial_irq, SERIAL_IRQ)
            .map_err(vm_err("KVM_IRQFD (serial)"))?;
        let serial_out: Sink = match &config.serial {
            SerialOutput::Stdout => Box::new(std::io::stdout()),
            SerialOutput::None => Box::new(std::io::sink()),
            SerialOutput::File(p) => open_sink(&p.to_string_lossy())?,
        };
        let serial_trigger = serial_irq
            .try_clone()
            .map_err(io_err("cloning an eventfd"))?;
        let serial = Serial(vm_superio::Serial::new(
            EventFdTrigger(serial_trigger),
            serial_out,
        ));
        let insert_err = |e: crate::devices::bus::BusError| VmmError::Io {
            what: "placing a device".into(),
            source: std::io::Error::other(e.to_string()),
        };
        pio.insert(Arc::new(Mutex::new(serial)), SERIAL_PORT_BASE.into(), 8)
            .map_err(insert_err)?;
        let i8042 = I8042::new(exit.clone()).map_err(io_err("creating the i8042 eventfd"))?;
        pio.insert(Arc::new(Mutex::new(i8042)), I8042_PORT_BASE.into(), 5)
            .map_err(insert_err)?;
        let reports = match &config.debug_log {
            Some(spec) => {
                let (tx, rx): (Sender<String>, Receiver<String>) = crossbeam_channel::unbounded();
                let port = DebugPort::new(ram.mem.clone(), open_sink(spec)?, vec![tx]);
                pio.insert(Arc::new(Mutex::new(port)), DEBUG_REPORT_PORT.into(), 4)
                    .map_err(insert_err)?;
                Some(rx)
            }
            None => None,
        };
        Ok(Self {
            pages: None,
            config,
            ram,
            kvm,
            vm,
            vcpu_fds,
            cmdline,
            generation: 0,
            pio: Arc::new(pio),
            mmio: Arc::new(mmio),
            exit,
            control,
            reports,
            queue_events,
            backends,
            transports,
            mem_mode: None,
            source: None,
            awaiting_activation: Default::default(),
            _irq_fds: {
                irq_fds.push(serial_irq);
                irq_fds
            },
        })
    }
}
