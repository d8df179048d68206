//! Per-vCPU CPU configuration: CPUID, boot MSRs and the local APIC's LINT pins.

use kvm_bindings::{kvm_msr_entry, CpuId, Msrs};
use kvm_ioctls::VcpuFd;

/// Error configuring a vCPU.
#[derive(Debug, thiserror::Error)]
pub enum CpuError {
    /// A KVM ioctl failed.
    #[error("{op} failed for vCPU {cpu}: {source}")]
    Kvm {
        /// The ioctl.
        op: &'static str,
        /// vCPU index.
        cpu: u8,
        /// Cause.
        source: kvm_ioctls::Error,
    },
}

/// Adapts the host's supported CPUID for vCPU `cpu` of `count`.
///
/// Leaves `0x4000_00xx` (hypervisor leaves) exactly as KVM reports them.
pub fn vcpu_cpuid(supported: &CpuId, cpu: u8, count: u8) -> CpuId {
    let mut cpuid = supported.clone();
    for e in cpuid.as_mut_slice() {
        match e.function {
            1 => {
                // Initial APIC id, logical processor count; hypervisor present.
                e.ebx = (e.ebx & 0x0000_ffff) | (u32::from(cpu) << 24) | (u32::from(count) << 16);
                e.ecx |= 1 << 31;
                if count > 1 {
                    e.edx |= 1 << 28; // HTT: the count field is valid
                }
            }
            4 => {
                // Cores per package - 1 in EAX[31:26]; one thread per core.
                e.eax = (e.eax & 0x03ff_ffff) | (u32::from(count.saturating_sub(1)) << 26);
            }
            0xb | 0x1f => {
                // x2APIC topology: level 0 = SMT (1 thread), level 1 = core (count).
                e.edx = u32::from(cpu);
                match e.index {
                    0 => {
                        e.eax = 0;
                        e.ebx = 1;
                        e.ecx = 1 << 8;
                    }
                    1 => {
                        e.eax = 32 - u32::from(count.max(1) - 1).leading_zeros();
                        e.ebx = u32::from(count);
                        e.ecx = (2 << 8) | 1;
                    }
                    _ => {
                        e.eax = 0;
                        e.ebx = 0;
                        e.ecx = e.index;
                    }
                }
            }
            _ => {}
        }
    }
    cpuid
}

/// MSRs Linux expects initialised at entry (the values of a just-reset CPU, fast strings on).
const BOOT_MSRS: [(u32, u64); 9] = [
    (0x174, 0),       // IA32_SYSENTER_CS
    (0x175, 0),       // IA32_SYSENTER_ESP
    (0x176, 0),       // IA32_SYSENTER_EIP
    (0xc000_0081, 0), // STAR
    (0xc000_0082, 0), // LSTAR
    (0xc000_0083, 0), // CSTAR
    (0xc000_0084, 0), // SYSCALL_MASK
    (0xc000_0102, 0), // KERNEL_GS_BASE
    (0x1a0, 1),       // IA32_MISC_ENABLE: fast strings
];

/// Sets the boot MSRs; returns the indices the host rejected (skipped, not fatal).
pub fn set_boot_msrs(vcpu: &VcpuFd, cpu: u8) -> Result<Vec<u32>, CpuError> {
    let mut rejected = Vec::new();
    let entries: Vec<kvm_msr_entry> = BOOT_MSRS
        .iter()
        .map(|&(index, data)| kvm_msr_entry {
            index,
            data,
            ..Default::default()
        })
        .collect();
    // KVM_SET_MSRS sets entries in order and stops at the first one the host refuses: one
    // ioctl normally, one more per refused MSR.
    let mut rest = &entries[..];
    while !rest.is_empty() {
        let msrs = Msrs::from_entries(rest).map_err(|_| CpuError::Kvm {
            op: "KVM_SET_MSRS",
            cpu,
            source: kvm_ioctls::Error::new(libc::E2BIG),
        })?;
        let set = vcpu.set_msrs(&msrs).map_err(|source| CpuError::Kvm {
            op: "KVM_SET_MSRS",
            cpu,
            source,
        })?;
        if let Some(refused) = rest.get(set) {
            rejected.push(refused.index);
        }
        rest = rest.get(set + 1..).unwrap_or(&[]);
    }
    if !rejected.is_empty() {
        tracing::debug!(cpu, ?rejected, "host rejected boot MSRs; skipped");
    }
    Ok(rejected)
}

/// Routes LINT0 to ExtINT and LINT1 to NMI, as a PC's BIOS leaves them.
pub fn set_lint(vcpu: &VcpuFd, cpu: u8) -> Result<(), CpuError> {
    const APIC_LVT0: usize = 0x350;
    const APIC_LVT1: usize = 0x360;
    const MODE_EXTINT: u32 = 0x7;
    const MODE_NMI: u32 = 0x4;
    let err = |op| move |source| CpuError::Kvm { op, cpu, source };
    let mut lapic = vcpu.get_lapic().map_err(err("KVM_GET_LAPIC"))?;
    for (off, mode) in [(APIC_LVT0, MODE_EXTINT), (APIC_LVT1, MODE_NMI)] {
        let bytes: [u8; 4] = std::array::from_fn(|i| lapic.regs[off + i] as u8);
        let v = (u32::from_le_bytes(bytes) & !0x700) | (mode << 8);
        for (i, b) in v.to_le_bytes().iter().enumerate() {
            lapic.regs[off + i] = *b as _;
        }
    }
    vcpu.set_lapic(&lapic).map_err(err("KVM_SET_LAPIC"))
}
