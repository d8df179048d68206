//! The Linux x86_64 boot protocol: kernel and initrd loading, the zero page with its e820 map,
//! the command line, the MP table, identity page tables, the GDT and the boot vCPU registers.

use std::path::Path;

use kvm_bindings::{kvm_fpu, kvm_regs, kvm_segment, kvm_sregs};
use linux_loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bzimage::BzImage;
use linux_loader::loader::elf::Elf;
use linux_loader::loader::{KernelLoader, KernelLoaderResult};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use crate::config::{initrd_rule, kernel_rule, open_regular, InputFileError};
use crate::layout::*;
use crate::memory::{ram_ranges, GuestMemory};

/// Longest clone id the identity page holds (its 64-byte field keeps a terminating NUL).
pub use vmm_api::MAX_CLONE_ID;
/// Highest address (exclusive) an initrd may end at: Linux's default `initrd_addr_max` is
/// 0x37ffffff, and it must sit in RAM below the MMIO gap.
const INITRD_TOP: u64 = 0x3800_0000;

fn initrd_top(mem_size: u64) -> u64 {
    mem_size.min(MMIO_GAP_START).min(INITRD_TOP)
}

/// The most bytes an initrd can have in a guest with `mem_size` bytes of RAM (the space between
/// [`HIMEM_START`] and the initrd's highest possible end; the kernel takes part of it).
pub fn initrd_room(mem_size: u64) -> u64 {
    initrd_top(mem_size).saturating_sub(HIMEM_START)
}

/// Error setting up the boot state.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// The kernel or initrd file was refused before reading it (type or size).
    #[error(transparent)]
    Input(#[from] crate::config::InputFileError),
    /// The kernel is neither a loadable ELF vmlinux nor a bzImage.
    #[error("kernel {path} is not a loadable x86_64 ELF vmlinux or bzImage ({detail}); pass an uncompressed vmlinux or a bzImage")]
    BadKernel {
        /// Kernel path.
        path: String,
        /// What the loader said.
        detail: String,
    },
    /// The initrd does not fit in low memory above the kernel.
    #[error("initrd of {size} bytes does not fit in guest RAM above the kernel (end {kernel_end:#x}); give the VM more memory")]
    InitrdTooBig {
        /// Initrd size.
        size: u64,
        /// End of the loaded kernel.
        kernel_end: u64,
    },
    /// PVH was asked for but the kernel has no PVH entry note.
    #[error("--boot-protocol pvh: the kernel ELF has no PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY); use auto or linux64")]
    NoPvhEntry,
    /// A clone id longer than the identity page holds.
    #[error("clone id of {len} bytes refused: the identity page holds at most {MAX_CLONE_ID} bytes and no NUL byte; use a shorter clone id")]
    CloneId {
        /// Its length in bytes.
        len: usize,
    },
    /// The command line is invalid or too long.
    #[error("kernel command line rejected: {0}")]
    Cmdline(String),
    /// Writing boot structures into guest memory failed.
    #[error("writing {what} into guest memory failed: {detail}")]
    GuestWrite {
        /// The structure.
        what: &'static str,
        /// Cause.
        detail: String,
    },
}

fn gw<E: std::fmt::Display>(what: &'static str) -> impl FnOnce(E) -> BootError {
    move |e| BootError::GuestWrite {
        what,
        detail: e.to_string(),
    }
}

/// Where the loaded kernel wants to be entered.
#[derive(Debug, Clone, Copy)]
pub struct KernelEntry {
    /// 64-bit entry point.
    pub entry: u64,
    /// PVH (32-bit) entry point, when the ELF announces one.
    pub pvh_entry: Option<u64>,
    /// First byte after the kernel image.
    pub kernel_end: u64,
}

/// Loads an ELF vmlinux (64-bit entry) or a bzImage into guest memory.
pub fn load_kernel(
    mem: &GuestMemory,
    path: &Path,
) -> Result<(KernelEntry, Option<linux_loader::bootparam::setup_header>), BootError> {
    let name = path.display().to_string();
    let ram: u64 = mem.iter().map(|r| r.len()).sum();
    let (mut f, _) = open_regular("kernel", path, ram, &kernel_rule(ram))?;
    let elf = Elf::load(mem, None, &mut f, Some(GuestAddress(HIMEM_START)));
    let (res, bz): (KernelLoaderResult, bool) = match elf {
        Ok(r) => (r, false),
        Err(elf_err) => match BzImage::load(mem, None, &mut f, Some(GuestAddress(HIMEM_START))) {
            Ok(r) => (r, true),
            Err(bz_err) => {
                return Err(BootError::BadKernel {
                    path: name,
                    detail: format!("as ELF: {elf_err}; as bzImage: {bz_err}"),
                })
            }
        },
    };
    // bzImage: the 64-bit entry sits 0x200 past the protected-mode kernel's start.
    let entry = if bz {
        res.kernel_load.0 + 0x200
    } else {
        res.kernel_load.0
    };
    let pvh_entry = match res.pvh_boot_cap {
        linux_loader::loader::elf::PvhBootCapability::PvhEntryPresent(a) => Some(a.0),
        _ => None,
    };
    Ok((
        KernelEntry {
            entry,
            pvh_entry,
            kernel_end: res.kernel_end,
        },
        res.setup_header,
    ))
}

/// Loads the initrd page-aligned as high as possible in low RAM; returns (address, size).
/// The file must be a regular file that fits (checked before reading); it is read straight into
/// guest memory.
pub fn load_initrd(
    mem: &GuestMemory,
    path: &Path,
    mem_size: u64,
    kernel_end: u64,
) -> Result<(u64, u64), BootError> {
    let room = initrd_room(mem_size);
    let (mut f, size) = open_regular("initrd", path, room, &initrd_rule(room))?;
    let too_big = || BootError::InitrdTooBig { size, kernel_end };
    let addr = initrd_top(mem_size).checked_sub(size).ok_or_else(too_big)? & !0xfff;
    if addr < kernel_end.max(HIMEM_START) {
        return Err(too_big());
    }
    let len = usize::try_from(size).map_err(|_| too_big())?;
    mem.read_exact_volatile_from(GuestAddress(addr), &mut f, len)
        .map_err(|e| InputFileError::Read {
            what: "initrd",
            path: path.display().to_string(),
            source: std::io::Error::other(e.to_string()),
        })?;
    Ok((addr, size))
}

/// The e820 map of a guest with `mem_size` bytes of RAM (see docs/ARCHITECTURE.md).
pub fn e820_map(mem_size: u64) -> Vec<(u64, u64, u32)> {
    const RAM: u32 = 1;
    const RESERVED: u32 = 2;
    let mut map = vec![
        (0, LOW_RAM_END, RAM),
        (LOW_RAM_END, HIMEM_START - LOW_RAM_END, RESERVED),
    ];
    for (region_start, len) in ram_ranges(mem_size) {
        let start = region_start.max(HIMEM_START);
        let end = region_start + len;
        if end > start {
            map.push((start, end - start, RAM));
        }
    }
    map
}

/// Everything the zero page needs.
pub struct BootInfo<'a> {
    /// Total guest RAM.
    pub mem_size: u64,
    /// Command line bytes (without NUL).
    pub cmdline: &'a str,
    /// Initrd address and size.
    pub initrd: Option<(u64, u64)>,
    /// bzImage setup header, if the kernel was a bzImage.
    pub setup_header: Option<linux_loader::bootparam::setup_header>,
}

fn write_cmdline(mem: &GuestMemory, cmdline: &str) -> Result<(), BootError> {
    if cmdline.len() + 1 > CMDLINE_MAX_SIZE || cmdline.as_bytes().contains(&0) {
        return Err(BootError::Cmdline(format!(
            "{} bytes, at most {} without NUL bytes",
            cmdline.len(),
            CMDLINE_MAX_SIZE - 1
        )));
    }
    let mut bytes = cmdline.as_bytes().to_vec();
    bytes.push(0);
    mem.write_slice(&bytes, GuestAddress(CMDLINE_START))
        .map_err(gw("command line"))
}

/// Writes the command line and the zero page.
pub fn write_boot_params(mem: &GuestMemory, info: &BootInfo) -> Result<(), BootError> {
    write_cmdline(mem, info.cmdline)?;

    let mut params = boot_params::default();
    if let Some(h) = info.setup_header {
        params.hdr = h;
    }
    params.hdr.type_of_loader = 0xff;
    params.hdr.boot_flag = 0xaa55;
    params.hdr.header = 0x5372_6448; // "HdrS"
    params.hdr.kernel_alignment = 0x0100_0000;
    params.hdr.cmd_line_ptr = CMDLINE_START as u32;
    params.hdr.cmdline_size = info.cmdline.len() as u32;
    if let Some((addr, size)) = info.initrd {
        params.hdr.ramdisk_image = addr as u32;
        params.hdr.ramdisk_size = size as u32;
    }
    let map = e820_map(info.mem_size);
    for (i, &(addr, size, type_)) in map.iter().enumerate() {
        params.e820_table[i] = boot_e820_entry {
            addr,
            size,
            r#type: type_,
        };
    }
    params.e820_entries = map.len() as u8;
    LinuxBootConfigurator::write_bootparams::<GuestMemory>(
        &BootParams::new(&params, GuestAddress(ZERO_PAGE_START)),
        mem,
    )
    .map_err(gw("zero page"))
}

/// Writes the command line and the PVH `hvm_start_info` with its memory map and module list.
pub fn write_pvh_start_info(mem: &GuestMemory, info: &BootInfo) -> Result<(), BootError> {
    use linux_loader::loader::elf::start_info::{
        hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
    };
    write_cmdline(mem, info.cmdline)?;
    let map = e820_map(info.mem_size);
    for (i, &(addr, size, type_)) in map.iter().enumerate() {
        let e = hvm_memmap_table_entry {
            addr,
            size,
            type_,
            reserved: 0,
        };
        mem.write_obj(e, GuestAddress(PVH_MEMMAP_START + i as u64 * 24))
            .map_err(gw("PVH memory map"))?;
    }
    let mut start = hvm_start_info {
        magic: 0x336e_c578,
        version: 1,
        cmdline_paddr: CMDLINE_START,
        memmap_paddr: PVH_MEMMAP_START,
        memmap_entries: map.len() as u32,
        ..Default::default()
    };
    if let Some((paddr, size)) = info.initrd {
        let m = hvm_modlist_entry {
            paddr,
            size,
            ..Default::default()
        };
        mem.write_obj(m, GuestAddress(PVH_MODLIST_START))
            .map_err(gw("PVH module list"))?;
        start.nr_modules = 1;
        start.modlist_paddr = PVH_MODLIST_START;
    }
    mem.write_obj(start, GuestAddress(PVH_INFO_START))
        .map_err(gw("PVH start info"))
}

/// Writes the identity page (contract in docs/ARCHITECTURE.md). A clone id longer than
/// [`MAX_CLONE_ID`] bytes, or one with a NUL byte, is refused (it would be cut).
pub fn write_identity(mem: &GuestMemory, generation: u64, clone_id: &str) -> Result<(), BootError> {
    let mut page = Vec::with_capacity(112);
    page.extend_from_slice(&0x564e_5552u32.to_le_bytes());
    page.extend_from_slice(&1u32.to_le_bytes());
    page.extend_from_slice(&generation.to_le_bytes());
    if clone_id.len() > MAX_CLONE_ID || clone_id.as_bytes().contains(&0) {
        return Err(BootError::CloneId {
            len: clone_id.len(),
        });
    }
    let mut id = [0u8; MAX_CLONE_ID + 1];
    id[..clone_id.len()].copy_from_slice(clone_id.as_bytes());
    page.extend_from_slice(&id);
    let mut entropy = [0u8; 32];
    // SAFETY: getrandom writes at most `entropy.len()` bytes into the buffer we own.
    let got = unsafe { libc::getrandom(entropy.as_mut_ptr().cast(), entropy.len(), 0) };
    if got != entropy.len() as isize {
        return Err(BootError::GuestWrite {
            what: "identity entropy",
            detail: std::io::Error::last_os_error().to_string(),
        });
    }
    page.extend_from_slice(&entropy);
    mem.write_slice(&page, GuestAddress(IDENTITY_PAGE_START))
        .map_err(gw("identity page"))
}

/// Offset of the guest's IPv4 address in the identity page (after the entropy).
pub const IDENTITY_IPV4_OFFSET: u64 = 112;

/// Writes the network part of the identity page: the IPv4 address announced for the guest
/// (network byte order at [`IDENTITY_IPV4_OFFSET`]; 0.0.0.0 when none is configured).
pub fn write_identity_net(
    mem: &GuestMemory,
    net: Option<&crate::config::NetConfig>,
) -> Result<(), BootError> {
    write_identity_ipv4(
        mem,
        net.and_then(|n| n.ipv4)
            .unwrap_or(std::net::Ipv4Addr::UNSPECIFIED),
    )
}

/// Writes the identity page's `ipv4` field alone (a warm clone's address, given at `activate`).
pub fn write_identity_ipv4(mem: &GuestMemory, ip: std::net::Ipv4Addr) -> Result<(), BootError> {
    mem.write_slice(
        &ip.octets(),
        GuestAddress(IDENTITY_PAGE_START + IDENTITY_IPV4_OFFSET),
    )
    .map_err(gw("identity page"))
}

/// IOAPIC base address, as listed in the MP table.
const IOAPIC_ADDR: u32 = 0xfec0_0000;
/// Local APIC base address.
const LAPIC_ADDR: u32 = 0xfee0_0000;

fn checksum(bytes: &[u8]) -> u8 {
    0u8.wrapping_sub(bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b)))
}

/// Builds the MP floating pointer and configuration table for `cpus` vCPUs (APIC ids 0..cpus).
pub fn mptable(cpus: u8) -> Vec<u8> {
    let ioapic_id = cpus;
    let mut entries = Vec::new();
    for id in 0..cpus {
        entries.extend_from_slice(&[0, id, 0x14, if id == 0 { 3 } else { 1 }]);
        entries.extend_from_slice(&0x600u32.to_le_bytes()); // signature: family 6
        entries.extend_from_slice(&0x201u32.to_le_bytes()); // features: FPU, APIC
        entries.extend_from_slice(&[0; 8]);
    }
    entries.extend_from_slice(&[1, 0, b'I', b'S', b'A', b' ', b' ', b' ']);
    entries.extend_from_slice(&[2, ioapic_id, 0x11, 1]);
    entries.extend_from_slice(&IOAPIC_ADDR.to_le_bytes());
    for irq in 0..24u8 {
        entries.extend_from_slice(&[3, 0, 0, 0, 0, irq, ioapic_id, irq]);
    }
    entries.extend_from_slice(&[4, 3, 0, 0, 0, 0, 0xff, 0]); // ExtINT → LINT0
    entries.extend_from_slice(&[4, 1, 0, 0, 0, 0, 0xff, 1]); // NMI → LINT1
    let count = (cpus as u16) + 1 + 1 + 24 + 2;

    let table_addr = MPTABLE_START as u32 + 16;
    let mut table = Vec::new();
    table.extend_from_slice(b"PCMP");
    table.extend_from_slice(&((44 + entries.len()) as u16).to_le_bytes());
    table.extend_from_slice(&[4, 0]); // spec 1.4, checksum (patched below)
    table.extend_from_slice(b"RUNV    ");
    table.extend_from_slice(b"MICROVM     ");
    table.extend_from_slice(&[0; 4]); // oem table pointer
    table.extend_from_slice(&[0; 2]); // oem table size
    table.extend_from_slice(&count.to_le_bytes());
    table.extend_from_slice(&LAPIC_ADDR.to_le_bytes());
    table.extend_from_slice(&[0; 4]);
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);

    let mut mpf = Vec::with_capacity(16);
    mpf.extend_from_slice(b"_MP_");
    mpf.extend_from_slice(&table_addr.to_le_bytes());
    mpf.extend_from_slice(&[1, 4, 0, 0, 0, 0, 0, 0]);
    mpf[10] = checksum(&mpf);
    mpf.extend_from_slice(&table);
    mpf
}

/// Writes the MP table at [`MPTABLE_START`].
pub fn write_mptable(mem: &GuestMemory, cpus: u8) -> Result<(), BootError> {
    let t = mptable(cpus);
    if MPTABLE_START + t.len() as u64 > HIMEM_START {
        return Err(BootError::GuestWrite {
            what: "MP table",
            detail: format!("{} bytes do not fit below 1 MiB", t.len()),
        });
    }
    mem.write_slice(&t, GuestAddress(MPTABLE_START))
        .map_err(gw("MP table"))
}

/// GDT entries: null, null, code64, data, TSS, code32 (selectors 0x10, 0x18, 0x20, 0x28).
const GDT: [u64; 6] = [
    0,
    0,
    0x00af_9b00_0000_ffff,
    0x00cf_9300_0000_ffff,
    0x008f_8b00_0000_ffff,
    0x00cf_9b00_0000_ffff,
];

fn segment(index: u16, entry: u64) -> kvm_segment {
    let raw_limit = ((entry & 0xffff) | (((entry >> 48) & 0xf) << 16)) as u32;
    // KVM wants the byte-granular limit: scale 4 KiB granularity (G bit).
    let limit = if (entry >> 55) & 1 == 1 {
        (raw_limit << 12) | 0xfff
    } else {
        raw_limit
    };
    kvm_segment {
        base: ((entry >> 16) & 0xff_ffff) | (((entry >> 56) & 0xff) << 24),
        limit,
        selector: index * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present: ((entry >> 47) & 1) as u8,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g: ((entry >> 55) & 1) as u8,
        avl: ((entry >> 52) & 1) as u8,
        unusable: 0,
        padding: 0,
    }
}

/// Writes the GDT, an empty IDT and the identity page tables (first 1 GiB, 2 MiB pages).
pub fn write_cpu_tables(mem: &GuestMemory) -> Result<(), BootError> {
    for (i, e) in GDT.iter().enumerate() {
        mem.write_obj(*e, GuestAddress(BOOT_GDT_START + i as u64 * 8))
            .map_err(gw("GDT"))?;
    }
    mem.write_obj(0u64, GuestAddress(BOOT_IDT_START))
        .map_err(gw("IDT"))?;
    mem.write_obj(PDPTE_START | 0x03, GuestAddress(PML4_START))
        .map_err(gw("PML4"))?;
    mem.write_obj(PDE_START | 0x03, GuestAddress(PDPTE_START))
        .map_err(gw("PDPTE"))?;
    for i in 0..512u64 {
        mem.write_obj((i << 21) | 0x83, GuestAddress(PDE_START + i * 8))
            .map_err(gw("PDE"))?;
    }
    Ok(())
}

/// Long-mode special registers for the boot vCPU, starting from the vCPU's current ones.
pub fn boot_sregs(mut sregs: kvm_sregs) -> kvm_sregs {
    let code = segment(2, GDT[2]);
    let data = segment(3, GDT[3]);
    let tss = segment(4, GDT[4]);
    sregs.gdt.base = BOOT_GDT_START;
    sregs.gdt.limit = (GDT.len() * 8 - 1) as u16;
    sregs.idt.base = BOOT_IDT_START;
    sregs.idt.limit = 7;
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;
    const CR0_PE: u64 = 1;
    const CR0_ET: u64 = 1 << 4;
    const CR0_PG: u64 = 1 << 31;
    const CR4_PAE: u64 = 1 << 5;
    const EFER_LME: u64 = 1 << 8;
    const EFER_LMA: u64 = 1 << 10;
    sregs.cr3 = PML4_START;
    sregs.cr4 |= CR4_PAE;
    sregs.cr0 |= CR0_PE | CR0_ET | CR0_PG;
    sregs.efer |= EFER_LME | EFER_LMA;
    sregs
}

/// 32-bit protected-mode special registers for a PVH entry (flat segments, paging off).
pub fn pvh_sregs(mut sregs: kvm_sregs) -> kvm_sregs {
    let data = segment(3, GDT[3]);
    sregs.gdt.base = BOOT_GDT_START;
    sregs.gdt.limit = (GDT.len() * 8 - 1) as u16;
    sregs.idt.base = BOOT_IDT_START;
    sregs.idt.limit = 7;
    sregs.cs = segment(5, GDT[5]);
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = segment(4, GDT[4]);
    sregs.cr0 = (sregs.cr0 | 1 | (1 << 4)) & !(1 << 31);
    sregs.cr4 = 0;
    sregs.efer = 0;
    sregs.cr3 = 0;
    sregs
}

/// General registers at a PVH entry: RIP = entry, RBX = `hvm_start_info`.
pub fn pvh_regs(entry: u64) -> kvm_regs {
    kvm_regs {
        rflags: 0x2,
        rip: entry,
        rbx: PVH_INFO_START,
        ..Default::default()
    }
}

/// General registers at the 64-bit entry: RIP = entry, RSI = zero page.
pub fn boot_regs(entry: u64) -> kvm_regs {
    kvm_regs {
        rflags: 0x2,
        rip: entry,
        rsp: BOOT_STACK_POINTER,
        rbp: BOOT_STACK_POINTER,
        rsi: ZERO_PAGE_START,
        ..Default::default()
    }
}

/// FPU state Linux expects at entry.
pub fn boot_fpu() -> kvm_fpu {
    kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn e820_reserves_the_identity_page_and_skips_the_gap() {
        let m = e820_map(128 << 20);
        assert_eq!(m[0], (0, LOW_RAM_END, 1));
        assert_eq!(m[1].2, 2);
        assert_eq!(m[2], (HIMEM_START, (128 << 20) - HIMEM_START, 1));
        let total: u64 = m.iter().filter(|e| e.2 == 1).map(|e| e.1).sum();
        assert_eq!(total, (128 << 20) - (HIMEM_START - LOW_RAM_END));
        let big = e820_map(4 << 30);
        assert_eq!(big.last().unwrap().0, MMIO_GAP_END);
    }

    #[test]
    fn mptable_checksums_hold() {
        let t = mptable(4);
        assert_eq!(&t[..4], b"_MP_");
        assert_eq!(t[..16].iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0);
        let len = u16::from_le_bytes([t[20], t[21]]) as usize;
        assert_eq!(
            t[16..16 + len].iter().fold(0u8, |a, b| a.wrapping_add(*b)),
            0
        );
        assert_eq!(16 + len, t.len());
    }

    #[test]
    fn gdt_segments_decode() {
        let cs = segment(2, GDT[2]);
        assert_eq!((cs.selector, cs.l, cs.present, cs.type_), (0x10, 1, 1, 0xb));
        let ds = segment(3, GDT[3]);
        assert_eq!((ds.selector, ds.db, ds.limit), (0x18, 1, 0xffff_ffff));
        let tss = segment(4, GDT[4]);
        assert_eq!((tss.limit, tss.type_), (0xffff_ffff, 0xb));
        let cs32 = segment(5, GDT[5]);
        assert_eq!(
            (cs32.selector, cs32.l, cs32.db, cs32.limit),
            (0x28, 0, 1, 0xffff_ffff)
        );
    }

    fn guest(mib: u64) -> GuestMemory {
        GuestMemory::from_ranges(&[(GuestAddress(0), (mib as usize) << 20)]).unwrap()
    }

    #[test]
    fn hostile_kernel_and_initrd_files_are_refused_before_reading() {
        use crate::config::tests::{hostile_inputs, within_timeout};
        let dir = tempfile::tempdir().unwrap();
        for (rule, path) in hostile_inputs(dir.path()) {
            for initrd in [false, true] {
                let p = path.clone();
                let e = within_timeout(move || {
                    let mem = guest(32);
                    if initrd {
                        load_initrd(&mem, &p, 32 << 20, HIMEM_START).unwrap_err()
                    } else {
                        load_kernel(&mem, &p).unwrap_err()
                    }
                    .to_string()
                });
                let what = if initrd { "initrd " } else { "kernel " };
                assert!(
                    e.contains(what) && e.contains(&*path.to_string_lossy()) && e.contains(rule),
                    "{e}"
                );
            }
        }
        // An initrd that fits in the file rule but not above the kernel; then one that fits.
        let img = dir.path().join("initrd");
        std::fs::write(&img, vec![0x5a; 3 << 20]).unwrap();
        let mem = guest(32);
        let e = load_initrd(&mem, &img, 32 << 20, 30 << 20).unwrap_err();
        assert!(matches!(e, BootError::InitrdTooBig { .. }), "{e}");
        let (addr, size) = load_initrd(&mem, &img, 32 << 20, HIMEM_START).unwrap();
        assert_eq!(size, 3 << 20);
        assert_eq!(addr + size, 32 << 20);
        let b: u8 = mem.read_obj(GuestAddress(addr + size - 1)).unwrap();
        assert_eq!(b, 0x5a);
    }

    #[test]
    fn over_long_clone_id_is_refused_not_cut() {
        let mem = guest(1);
        let id = "c".repeat(MAX_CLONE_ID);
        write_identity(&mem, 7, &id).unwrap();
        let mut field = [0xffu8; 64];
        mem.read_slice(&mut field, GuestAddress(IDENTITY_PAGE_START + 16))
            .unwrap();
        assert_eq!(&field[..MAX_CLONE_ID], id.as_bytes());
        assert_eq!(field[MAX_CLONE_ID], 0);
        for bad in [format!("{id}c"), "a\0b".to_string()] {
            let e = write_identity(&mem, 8, &bad).unwrap_err();
            assert!(matches!(e, BootError::CloneId { .. }), "{e}");
            assert!(e.to_string().contains("at most 63 bytes"), "{e}");
        }
        let gen: u64 = mem.read_obj(GuestAddress(IDENTITY_PAGE_START + 8)).unwrap();
        assert_eq!(gen, 7, "a refused identity leaves the page as it was");
    }
}
