//! KVM state of a paused VM: save from, and restore into fresh, vCPUs and VM.
//!
//! Restore order follows what KVM requires: CPUID first; then sregs, regs, xsave, xcrs, debug
//! registers; the LAPIC before MSRs (TSC-deadline depends on it); MSRs with `IA32_TSC` written
//! before `IA32_TSC_DEADLINE`; mp_state; vcpu_events last.

use kvm_bindings::{
    kvm_clock_data, kvm_cpuid_entry2, kvm_debugregs, kvm_irqchip, kvm_lapic_state, kvm_mp_state,
    kvm_msr_entry, kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave,
    CpuId, Msrs, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
    KVM_MAX_CPUID_ENTRIES,
};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use serde::{Deserialize, Serialize};

const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_TSC_DEADLINE: u32 = 0x6e0;
/// KVM_CLOCK_TSC_STABLE: informational on get, rejected on set.
const KVM_CLOCK_TSC_STABLE: u32 = 2;

/// Error saving or restoring KVM state.
#[derive(Debug, thiserror::Error)]
#[error("{op} failed for {what}: {source}")]
pub struct PersistError {
    op: &'static str,
    what: String,
    source: kvm_ioctls::Error,
}

fn e(op: &'static str, what: impl Into<String>) -> impl FnOnce(kvm_ioctls::Error) -> PersistError {
    let what = what.into();
    move |source| PersistError { op, what, source }
}

/// Everything KVM holds for one vCPU.
#[derive(Debug, Serialize, Deserialize)]
pub struct VcpuState {
    /// CPUID as set at boot.
    pub cpuid: Vec<kvm_cpuid_entry2>,
    /// Multiprocessing state (running, halted, waiting for SIPI).
    pub mp_state: kvm_mp_state,
    /// General registers.
    pub regs: kvm_regs,
    /// Special registers.
    pub sregs: kvm_sregs,
    /// FPU/SSE/AVX state.
    pub xsave: kvm_xsave,
    /// Extended control registers.
    pub xcrs: kvm_xcrs,
    /// Debug registers.
    pub debugregs: kvm_debugregs,
    /// Local APIC.
    pub lapic: kvm_lapic_state,
    /// Every MSR the host lists that this vCPU let us read.
    pub msrs: Vec<kvm_msr_entry>,
    /// MSRs the host lists but refused to read (recorded, skipped).
    pub skipped_msrs: Vec<u32>,
    /// Pending exceptions, interrupts, NMIs.
    pub events: kvm_vcpu_events,
}

/// VM-wide KVM state.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VmState {
    /// PIC master, PIC slave, IOAPIC.
    pub irqchips: Vec<kvm_irqchip>,
    /// PIT.
    pub pit: kvm_pit_state2,
    /// kvmclock.
    pub clock: kvm_clock_data,
}

/// Reads the MSRs in `indices`, skipping ones the vCPU refuses (a batch read stops at the first
/// refused index; we record it and continue after it).
fn read_msrs(
    vcpu: &VcpuFd,
    indices: &[u32],
) -> Result<(Vec<kvm_msr_entry>, Vec<u32>), PersistError> {
    let mut got = Vec::with_capacity(indices.len());
    let mut skipped = Vec::new();
    let mut rest = indices;
    while !rest.is_empty() {
        let batch: Vec<kvm_msr_entry> = rest
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = Msrs::from_entries(&batch).expect("MSR list fits KVM_MAX_MSR_ENTRIES");
        let n = vcpu
            .get_msrs(&mut msrs)
            .map_err(e("KVM_GET_MSRS", "vCPU"))?;
        got.extend_from_slice(&msrs.as_slice()[..n]);
        if n < rest.len() {
            skipped.push(rest[n]);
            rest = &rest[n + 1..];
        } else {
            rest = &[];
        }
    }
    Ok((got, skipped))
}

/// Saves one (paused) vCPU.
pub fn save_vcpu(kvm: &Kvm, vcpu: &VcpuFd) -> Result<VcpuState, PersistError> {
    let mut indices: Vec<u32> = kvm
        .get_msr_index_list()
        .map_err(e("KVM_GET_MSR_INDEX_LIST", "host"))?
        .as_slice()
        .to_vec();
    indices.sort_unstable();
    indices.dedup();
    let (msrs, skipped_msrs) = read_msrs(vcpu, &indices)?;
    Ok(VcpuState {
        cpuid: vcpu
            .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
            .map_err(e("KVM_GET_CPUID2", "vCPU"))?
            .as_slice()
            .to_vec(),
        mp_state: vcpu.get_mp_state().map_err(e("KVM_GET_MP_STATE", "vCPU"))?,
        regs: vcpu.get_regs().map_err(e("KVM_GET_REGS", "vCPU"))?,
        sregs: vcpu.get_sregs().map_err(e("KVM_GET_SREGS", "vCPU"))?,
        xsave: vcpu.get_xsave().map_err(e("KVM_GET_XSAVE", "vCPU"))?,
        xcrs: vcpu.get_xcrs().map_err(e("KVM_GET_XCRS", "vCPU"))?,
        debugregs: vcpu
            .get_debug_regs()
            .map_err(e("KVM_GET_DEBUGREGS", "vCPU"))?,
        lapic: vcpu.get_lapic().map_err(e("KVM_GET_LAPIC", "vCPU"))?,
        msrs,
        skipped_msrs,
        events: vcpu
            .get_vcpu_events()
            .map_err(e("KVM_GET_VCPU_EVENTS", "vCPU"))?,
    })
}

/// Restores a vCPU that has never run; returns the MSRs the host refused to set.
pub fn restore_vcpu(vcpu: &VcpuFd, s: &VcpuState) -> Result<Vec<u32>, PersistError> {
    let cpuid = CpuId::from_entries(&s.cpuid).map_err(|_| PersistError {
        op: "KVM_SET_CPUID2",
        what: format!("{} CPUID entries", s.cpuid.len()),
        source: kvm_ioctls::Error::new(libc::E2BIG),
    })?;
    vcpu.set_cpuid2(&cpuid)
        .map_err(e("KVM_SET_CPUID2", "vCPU"))?;
    vcpu.set_sregs(&s.sregs)
        .map_err(e("KVM_SET_SREGS", "vCPU"))?;
    vcpu.set_regs(&s.regs).map_err(e("KVM_SET_REGS", "vCPU"))?;
    // SAFETY: the xsave area is a full kvm_xsave read from KVM_GET_XSAVE on a vCPU with the same
    // CPUID; KVM validates it.
    unsafe { vcpu.set_xsave(&s.xsave) }.map_err(e("KVM_SET_XSAVE", "vCPU"))?;
    vcpu.set_xcrs(&s.xcrs).map_err(e("KVM_SET_XCRS", "vCPU"))?;
    vcpu.set_debug_regs(&s.debugregs)
        .map_err(e("KVM_SET_DEBUGREGS", "vCPU"))?;
    vcpu.set_lapic(&s.lapic)
        .map_err(e("KVM_SET_LAPIC", "vCPU"))?;
    // TSC before TSC-deadline; the rest in index order.
    let mut msrs = s.msrs.clone();
    msrs.sort_by_key(|m| match m.index {
        MSR_IA32_TSC => 0,
        MSR_IA32_TSC_DEADLINE => 2,
        _ => 1,
    });
    let mut refused = Vec::new();
    let mut rest = &msrs[..];
    while !rest.is_empty() {
        let batch = Msrs::from_entries(rest).expect("MSR list fits KVM_MAX_MSR_ENTRIES");
        let n = vcpu.set_msrs(&batch).map_err(e("KVM_SET_MSRS", "vCPU"))?;
        if n < rest.len() {
            refused.push(rest[n].index);
            rest = &rest[n + 1..];
        } else {
            rest = &[];
        }
    }
    vcpu.set_mp_state(s.mp_state)
        .map_err(e("KVM_SET_MP_STATE", "vCPU"))?;
    vcpu.set_vcpu_events(&s.events)
        .map_err(e("KVM_SET_VCPU_EVENTS", "vCPU"))?;
    Ok(refused)
}

/// Saves the irqchip, PIT and clock of a paused VM.
pub fn save_vm(vm: &VmFd) -> Result<VmState, PersistError> {
    let mut irqchips = Vec::new();
    for chip_id in [
        KVM_IRQCHIP_PIC_MASTER,
        KVM_IRQCHIP_PIC_SLAVE,
        KVM_IRQCHIP_IOAPIC,
    ] {
        let mut chip = kvm_irqchip {
            chip_id,
            ..Default::default()
        };
        vm.get_irqchip(&mut chip)
            .map_err(e("KVM_GET_IRQCHIP", format!("chip {chip_id}")))?;
        irqchips.push(chip);
    }
    let mut clock = vm.get_clock().map_err(e("KVM_GET_CLOCK", "VM"))?;
    clock.flags &= !KVM_CLOCK_TSC_STABLE;
    Ok(VmState {
        irqchips,
        pit: vm.get_pit2().map_err(e("KVM_GET_PIT2", "VM"))?,
        clock,
    })
}

/// Restores VM state into a fresh VM (irqchip and PIT already created).
pub fn restore_vm(vm: &VmFd, s: &VmState) -> Result<(), PersistError> {
    for chip in &s.irqchips {
        vm.set_irqchip(chip)
            .map_err(e("KVM_SET_IRQCHIP", format!("chip {}", chip.chip_id)))?;
    }
    vm.set_pit2(&s.pit).map_err(e("KVM_SET_PIT2", "VM"))?;
    vm.set_clock(&s.clock).map_err(e("KVM_SET_CLOCK", "VM"))
}
