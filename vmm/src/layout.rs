//! Guest physical memory layout shared by the boot code, the devices and the test guests.
//!
//! Test guests (see `test-guests/`) rely on these values: change them only together.

/// GDT used for the 64-bit boot entry.
pub const BOOT_GDT_START: u64 = 0x500;
/// IDT (empty) used for the 64-bit boot entry.
pub const BOOT_IDT_START: u64 = 0x520;
/// PVH `hvm_start_info` (the zero page's place: a PVH boot has no zero page).
pub const PVH_INFO_START: u64 = 0x7000;
/// PVH memory map entries.
pub const PVH_MEMMAP_START: u64 = 0x7040;
/// PVH module list (the initrd).
pub const PVH_MODLIST_START: u64 = 0x7c00;
/// Initial stack pointer of the boot vCPU.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// The Linux "zero page" (`struct boot_params`).
pub const ZERO_PAGE_START: u64 = 0x7000;
/// PML4 of the identity-mapped boot page tables; PDPTE and PDE follow in the next pages.
pub const PML4_START: u64 = 0x9000;
/// PDPTE of the boot page tables.
pub const PDPTE_START: u64 = 0xa000;
/// PDE of the boot page tables (maps the first 1 GiB with 2 MiB pages).
pub const PDE_START: u64 = 0xb000;
/// Kernel command line.
pub const CMDLINE_START: u64 = 0x20000;
/// Maximum command line size, including the NUL terminator.
pub const CMDLINE_MAX_SIZE: usize = 4096;
/// End of the low usable RAM reported in e820 (start of the reserved area below 1 MiB).
pub const LOW_RAM_END: u64 = 0x9e000;
/// Page the VMM writes the clone identity into (reserved in e820).
pub const IDENTITY_PAGE_START: u64 = 0x9e000;
/// Start of the MP table (Intel MultiProcessor spec), in the reserved area.
pub const MPTABLE_START: u64 = 0x9fc00;
/// Start of high memory; kernels and initrds are loaded at or above it.
pub const HIMEM_START: u64 = 0x10_0000;
/// Start of the 32-bit MMIO gap; RAM beyond this address continues at 4 GiB.
pub const MMIO_GAP_START: u64 = 0xc000_0000;
/// End of the 32-bit MMIO gap.
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;
/// First virtio-mmio device window; device `i` lives at `VIRTIO_MMIO_BASE + i * VIRTIO_MMIO_SIZE`.
pub const VIRTIO_MMIO_BASE: u64 = 0xd000_0000;
/// Size of one virtio-mmio device window.
pub const VIRTIO_MMIO_SIZE: u64 = 0x1000;
/// GSI of the first virtio-mmio device; device `i` uses `VIRTIO_IRQ_BASE + i`.
pub const VIRTIO_IRQ_BASE: u32 = 5;
/// Highest GSI usable by virtio-mmio devices (IOAPIC has 24 pins).
pub const VIRTIO_IRQ_MAX: u32 = 23;
/// COM1 serial port base and IRQ.
pub const SERIAL_PORT_BASE: u16 = 0x3f8;
/// IRQ of COM1.
pub const SERIAL_IRQ: u32 = 4;
/// i8042 controller data/command ports (0x60..=0x64).
pub const I8042_PORT_BASE: u16 = 0x60;
/// Debug report port (only with `--debug-log`): a 32-bit OUT of the guest physical address of a
/// NUL-terminated ASCII report (at most [`DEBUG_REPORT_MAX`] bytes) records one report.
pub const DEBUG_REPORT_PORT: u16 = 0xf4;
/// Longest debug report accepted.
pub const DEBUG_REPORT_MAX: usize = 1024;
