//! Legacy PC devices on the port-I/O bus: COM1 (16550), the i8042 reset line and the debug
//! report port of the test guests.

use crate::sync::LockOrRecover;
use std::io::Write;
use std::sync::{Arc, Mutex};

use crossbeam_channel::Sender;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use super::bus::BusDevice;
use crate::layout::DEBUG_REPORT_MAX;
use crate::memory::GuestMemory;
use crate::ExitSignal;

/// An eventfd as the interrupt/reset line of a vm-superio device.
pub struct EventFdTrigger(pub EventFd);

impl vm_superio::Trigger for EventFdTrigger {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

/// Where guest output goes.
pub type Sink = Box<dyn Write + Send>;

/// COM1: a vm-superio 16550 whose interrupt is an irqfd.
pub struct Serial(pub vm_superio::Serial<EventFdTrigger, vm_superio::serial::NoEvents, Sink>);

impl BusDevice for Serial {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if let (Ok(off), [b]) = (u8::try_from(offset), data) {
            *b = self.0.read(off);
        }
    }
    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (Ok(off), [b]) = (u8::try_from(offset), data) {
            if let Err(e) = self.0.write(off, *b) {
                tracing::warn!("serial write failed: {e:?}");
            }
        }
    }
}

/// The i8042 controller: the guest's CPU reset (0xFE to port 0x64) ends the VM cleanly.
pub struct I8042 {
    dev: vm_superio::I8042Device<EventFdTrigger>,
    exit: Arc<ExitSignal>,
}

impl I8042 {
    /// A controller whose reset ends the VM through `exit`.
    pub fn new(exit: Arc<ExitSignal>) -> std::io::Result<Self> {
        let evt = EventFd::new(libc::EFD_NONBLOCK)?;
        Ok(Self {
            dev: vm_superio::I8042Device::new(EventFdTrigger(evt)),
            exit,
        })
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if let [b] = data {
            *b = self.dev.read(offset as u8);
        }
    }
    fn write(&mut self, offset: u64, data: &[u8]) {
        if let [b] = data {
            // Port 0x64 is offset 4 from 0x60.
            if self.dev.write(offset as u8, *b).is_ok() && offset == 4 && *b == 0xfe {
                self.exit.exit(crate::ExitReason::GuestReset);
            }
        }
    }
}

/// The debug report port (contract in docs/ARCHITECTURE.md).
pub struct DebugPort {
    mem: GuestMemory,
    log: Arc<Mutex<Sink>>,
    listeners: Vec<Sender<String>>,
}

impl DebugPort {
    /// A port writing `REPORT` lines to `log` and to every listener.
    pub fn new(mem: GuestMemory, log: Sink, listeners: Vec<Sender<String>>) -> Self {
        Self {
            mem,
            log: Arc::new(Mutex::new(log)),
            listeners,
        }
    }

    /// Reads the NUL-terminated report at `addr`; invalid bytes become '?', the length is capped.
    fn read_report(&self, addr: u64) -> String {
        let mut buf = [0u8; DEBUG_REPORT_MAX];
        let mut len = 0;
        while len < DEBUG_REPORT_MAX {
            match self
                .mem
                .read_obj::<u8>(GuestAddress(addr.wrapping_add(len as u64)))
            {
                Ok(0) | Err(_) => break,
                Ok(b) => {
                    buf[len] = if b.is_ascii_graphic() || b == b' ' {
                        b
                    } else {
                        b'?'
                    }
                }
            }
            len += 1;
        }
        String::from_utf8_lossy(&buf[..len]).into_owned()
    }
}

impl BusDevice for DebugPort {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0xff);
    }
    fn write(&mut self, offset: u64, data: &[u8]) {
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            return;
        };
        if offset != 0 {
            return;
        }
        let report = self.read_report(u64::from(u32::from_le_bytes(bytes)));
        // One write per report: readers (benches, the pool) see a whole line at once, and an
        // unbuffered log pays one syscall, not three.
        let line = format!("REPORT {report}\n");
        let mut log = self.log.lock_or_recover();
        let _ = log.write_all(line.as_bytes());
        let _ = log.flush();
        drop(log);
        for l in &self.listeners {
            let _ = l.send(report.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_port_reads_bounded_reports() {
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        mem.write_slice(b"PASS x\0", GuestAddress(0x100)).unwrap();
        let (tx, rx) = crossbeam_channel::unbounded();
        let mut port = DebugPort::new(mem.clone(), Box::new(std::io::sink()), vec![tx]);
        port.write(0, &0x100u32.to_le_bytes());
        assert_eq!(rx.try_recv().unwrap(), "PASS x");
        // Unterminated at the end of memory: stops at the boundary, no panic.
        mem.write_slice(&[b'A'; 16], GuestAddress(0xfff0)).unwrap();
        port.write(0, &0xfff0u32.to_le_bytes());
        assert_eq!(rx.try_recv().unwrap(), "A".repeat(16));
        // Outside guest memory: an empty report.
        port.write(0, &0xffff_0000u32.to_le_bytes());
        assert_eq!(rx.try_recv().unwrap(), "");
        // Long report is capped.
        mem.write_slice(&[b'B'; 2000], GuestAddress(0x1000))
            .unwrap();
        port.write(0, &0x1000u32.to_le_bytes());
        assert_eq!(rx.try_recv().unwrap().len(), DEBUG_REPORT_MAX);
    }
}
