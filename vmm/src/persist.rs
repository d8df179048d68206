//! KVM state of a paused VM: save from, and restore into fresh, vCPUs and VM.
//!
//! Restore order follows what KVM requires: CPUID first; then sregs, regs, xsave, xcrs, debug
//! registers; the LAPIC before MSRs (TSC-deadline depends on it); MSRs with `IA32_TSC` written
//! before `IA32_TSC_DEADLINE`; mp_state; vcpu_events last.
//!
//! Saved state comes from a file and is untrusted. Decoding refuses a KVM structure whose byte
//! length is not exactly the structure's size (kvm-bindings' own serde impl would silently pad or
//! cut it) and a list longer than KVM accepts; [`VcpuState::validate`] and [`VmState::validate`]
//! check counts and values again before any ioctl, so a state built in memory is held to the
//! same rules. Nothing here panics on saved data.

use std::marker::PhantomData;

use kvm_bindings::{
    kvm_clock_data, kvm_cpuid_entry2, kvm_debugregs, kvm_irqchip, kvm_lapic_state, kvm_mp_state,
    kvm_msr_entry, kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave,
    CpuId, Msrs, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
    KVM_MAX_CPUID_ENTRIES, KVM_MAX_MSR_ENTRIES, KVM_MAX_XCRS, KVM_MP_STATE_SUSPENDED,
};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use serde::de::{DeserializeOwned, Deserializer, SeqAccess, Visitor};
use serde::{Deserialize, Serialize};

const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_TSC_DEADLINE: u32 = 0x6e0;
/// KVM_CLOCK_TSC_STABLE: informational on get, rejected on set.
const KVM_CLOCK_TSC_STABLE: u32 = 2;
/// The irqchips a VM state holds, in save order.
const IRQCHIPS: [u32; 3] = [
    KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE,
    KVM_IRQCHIP_IOAPIC,
];

/// Error saving or restoring KVM state.
#[derive(Debug, thiserror::Error)]
pub enum PersistError {
    /// A KVM ioctl failed.
    #[error("{op} failed for {what}: {source}")]
    Kvm {
        /// The ioctl.
        op: &'static str,
        /// What it was applied to.
        what: String,
        /// Cause.
        source: kvm_ioctls::Error,
    },
    /// Saved state breaks a rule KVM or this VMM relies on; nothing was applied from it.
    #[error("saved KVM state is invalid: {0}; the snapshot is corrupt or forged: take it again")]
    Invalid(String),
    /// The identity generation cannot be advanced.
    #[error("identity generation {0} cannot be incremented without wrapping; the snapshot is corrupt or forged: take it again")]
    GenerationOverflow(u64),
}

fn e(op: &'static str, what: impl Into<String>) -> impl FnOnce(kvm_ioctls::Error) -> PersistError {
    let what = what.into();
    move |source| PersistError::Kvm { op, what, source }
}

/// The identity generation a restore of a snapshot taken at generation `g` gives the guest:
/// `g + 1`, or an error where that would wrap (a guest must never see a generation repeat).
pub fn next_generation(g: u64) -> Result<u64, PersistError> {
    g.checked_add(1).ok_or(PersistError::GenerationOverflow(g))
}

/// Short name of a KVM structure for error messages.
fn short_name<T>() -> &'static str {
    let full = std::any::type_name::<T>();
    full.rsplit("::").next().unwrap_or(full)
}

/// Collects a byte string of exactly `len` bytes (as bytes or as a sequence of `u8`).
struct ExactBytes {
    len: usize,
    name: &'static str,
}

impl<'de> Visitor<'de> for ExactBytes {
    type Value = Vec<u8>;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        write!(f, "{} as {} bytes", self.name, self.len)
    }

    fn visit_bytes<E: serde::de::Error>(self, b: &[u8]) -> Result<Vec<u8>, E> {
        if b.len() != self.len {
            return Err(E::custom(format!(
                "{} is {} bytes in the snapshot, KVM's structure is {} bytes",
                self.name,
                b.len(),
                self.len
            )));
        }
        Ok(b.to_vec())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<u8>, A::Error> {
        let mut out = Vec::with_capacity(self.len);
        while let Some(b) = seq.next_element::<u8>()? {
            if out.len() == self.len {
                return Err(serde::de::Error::custom(format!(
                    "{} has more than {} bytes in the snapshot",
                    self.name, self.len
                )));
            }
            out.push(b);
        }
        self.visit_bytes(&out)
    }
}

/// A KVM structure decoded only from exactly `size_of::<T>()` bytes.
struct Exact<T>(T);

impl<'de, T: DeserializeOwned> Deserialize<'de> for Exact<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let bytes = d.deserialize_bytes(ExactBytes {
            len: std::mem::size_of::<T>(),
            name: short_name::<T>(),
        })?;
        T::deserialize(serde::de::value::BytesDeserializer::<D::Error>::new(&bytes)).map(Exact)
    }
}

fn exact<'de, D: Deserializer<'de>, T: DeserializeOwned>(d: D) -> Result<T, D::Error> {
    Exact::<T>::deserialize(d).map(|x| x.0)
}

/// Collects at most `max` elements.
struct Bounded<E> {
    max: usize,
    name: &'static str,
    _e: PhantomData<E>,
}

impl<'de, E: Deserialize<'de>> Visitor<'de> for Bounded<E> {
    type Value = Vec<E>;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        write!(f, "at most {} {}", self.max, self.name)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<E>, A::Error> {
        let too_many = |n: usize| {
            serde::de::Error::custom(format!(
                "{n} {} in the snapshot, KVM accepts at most {}",
                self.name, self.max
            ))
        };
        if let Some(n) = seq.size_hint().filter(|&n| n > self.max) {
            return Err(too_many(n));
        }
        let mut out = Vec::new();
        while let Some(x) = seq.next_element::<E>()? {
            if out.len() == self.max {
                return Err(too_many(out.len() + 1));
            }
            out.push(x);
        }
        Ok(out)
    }
}

fn bounded_exact<'de, D: Deserializer<'de>, T: DeserializeOwned, const MAX: usize>(
    d: D,
) -> Result<Vec<T>, D::Error> {
    let v = d.deserialize_seq(Bounded::<Exact<T>> {
        max: MAX,
        name: short_name::<T>(),
        _e: PhantomData,
    })?;
    Ok(v.into_iter().map(|x| x.0).collect())
}

fn bounded_u32<'de, D: Deserializer<'de>, const MAX: usize>(d: D) -> Result<Vec<u32>, D::Error> {
    d.deserialize_seq(Bounded::<u32> {
        max: MAX,
        name: "MSR indices",
        _e: PhantomData,
    })
}

/// Everything KVM holds for one vCPU.
#[derive(Debug, Serialize, Deserialize)]
pub struct VcpuState {
    /// CPUID as set at boot.
    #[serde(deserialize_with = "bounded_exact::<_, _, KVM_MAX_CPUID_ENTRIES>")]
    pub cpuid: Vec<kvm_cpuid_entry2>,
    /// Multiprocessing state (running, halted, waiting for SIPI).
    #[serde(deserialize_with = "exact")]
    pub mp_state: kvm_mp_state,
    /// General registers.
    #[serde(deserialize_with = "exact")]
    pub regs: kvm_regs,
    /// Special registers.
    #[serde(deserialize_with = "exact")]
    pub sregs: kvm_sregs,
    /// FPU/SSE/AVX state.
    #[serde(deserialize_with = "exact")]
    pub xsave: kvm_xsave,
    /// Extended control registers.
    #[serde(deserialize_with = "exact")]
    pub xcrs: kvm_xcrs,
    /// Debug registers.
    #[serde(deserialize_with = "exact")]
    pub debugregs: kvm_debugregs,
    /// Local APIC.
    #[serde(deserialize_with = "exact")]
    pub lapic: kvm_lapic_state,
    /// Every MSR the host lists that this vCPU let us read.
    #[serde(deserialize_with = "bounded_exact::<_, _, KVM_MAX_MSR_ENTRIES>")]
    pub msrs: Vec<kvm_msr_entry>,
    /// MSRs the host lists but refused to read (recorded, skipped).
    #[serde(deserialize_with = "bounded_u32::<_, KVM_MAX_MSR_ENTRIES>")]
    pub skipped_msrs: Vec<u32>,
    /// Pending exceptions, interrupts, NMIs.
    #[serde(deserialize_with = "exact")]
    pub events: kvm_vcpu_events,
}

/// VM-wide KVM state.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VmState {
    /// PIC master, PIC slave, IOAPIC.
    #[serde(deserialize_with = "bounded_exact::<_, _, 3>")]
    pub irqchips: Vec<kvm_irqchip>,
    /// PIT.
    #[serde(deserialize_with = "exact")]
    pub pit: kvm_pit_state2,
    /// kvmclock.
    #[serde(deserialize_with = "exact")]
    pub clock: kvm_clock_data,
}

impl VcpuState {
    /// Checks every count and value a restore relies on, before any of it reaches KVM.
    pub fn validate(&self) -> Result<(), PersistError> {
        let bad = |m: String| Err(PersistError::Invalid(m));
        if self.cpuid.is_empty() || self.cpuid.len() > KVM_MAX_CPUID_ENTRIES {
            return bad(format!(
                "{} CPUID entries, KVM accepts 1..={KVM_MAX_CPUID_ENTRIES}",
                self.cpuid.len()
            ));
        }
        if self.msrs.len() > KVM_MAX_MSR_ENTRIES {
            return bad(format!(
                "{} MSRs, KVM accepts at most {KVM_MAX_MSR_ENTRIES}",
                self.msrs.len()
            ));
        }
        if self.skipped_msrs.len() > KVM_MAX_MSR_ENTRIES {
            return bad(format!(
                "{} skipped MSRs, the host lists at most {KVM_MAX_MSR_ENTRIES}",
                self.skipped_msrs.len()
            ));
        }
        if self.xcrs.nr_xcrs > KVM_MAX_XCRS {
            return bad(format!(
                "{} XCRs, KVM accepts at most {KVM_MAX_XCRS}",
                self.xcrs.nr_xcrs
            ));
        }
        if self.mp_state.mp_state > KVM_MP_STATE_SUSPENDED {
            return bad(format!(
                "mp_state {} is not a KVM_MP_STATE_* value (0..={KVM_MP_STATE_SUSPENDED})",
                self.mp_state.mp_state
            ));
        }
        Ok(())
    }
}

impl VmState {
    /// Checks that the state holds each irqchip (PIC master, PIC slave, IOAPIC) exactly once.
    pub fn validate(&self) -> Result<(), PersistError> {
        let mut ids: Vec<u32> = self.irqchips.iter().map(|c| c.chip_id).collect();
        ids.sort_unstable();
        if ids != IRQCHIPS {
            return Err(PersistError::Invalid(format!(
                "irqchip ids {ids:?}, expected each of {IRQCHIPS:?} once"
            )));
        }
        Ok(())
    }
}

fn msrs(entries: &[kvm_msr_entry]) -> Result<Msrs, PersistError> {
    Msrs::from_entries(entries).map_err(|_| {
        PersistError::Invalid(format!(
            "{} MSRs in one batch, KVM accepts at most {KVM_MAX_MSR_ENTRIES}",
            entries.len()
        ))
    })
}

/// Reads the MSRs in `indices`, skipping ones the vCPU refuses (a batch read stops at the first
/// refused index; we record it and continue after it). Batches hold at most
/// `KVM_MAX_MSR_ENTRIES` MSRs.
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
            .take(KVM_MAX_MSR_ENTRIES)
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut m = msrs(&batch)?;
        let n = vcpu.get_msrs(&mut m).map_err(e("KVM_GET_MSRS", "vCPU"))?;
        got.extend_from_slice(m.as_slice().get(..n).unwrap_or_default());
        if n < batch.len() {
            skipped.push(rest[n]);
            rest = &rest[n + 1..];
        } else {
            rest = &rest[batch.len()..];
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

/// Restores a vCPU that has never run; returns the MSRs the host refused to set. The state is
/// validated ([`VcpuState::validate`]) before anything is applied.
pub fn restore_vcpu(vcpu: &VcpuFd, s: &VcpuState) -> Result<Vec<u32>, PersistError> {
    s.validate()?;
    let cpuid = CpuId::from_entries(&s.cpuid).map_err(|_| {
        PersistError::Invalid(format!(
            "{} CPUID entries, KVM accepts at most {KVM_MAX_CPUID_ENTRIES}",
            s.cpuid.len()
        ))
    })?;
    vcpu.set_cpuid2(&cpuid)
        .map_err(e("KVM_SET_CPUID2", "vCPU"))?;
    vcpu.set_sregs(&s.sregs)
        .map_err(e("KVM_SET_SREGS", "vCPU"))?;
    vcpu.set_regs(&s.regs).map_err(e("KVM_SET_REGS", "vCPU"))?;
    // SAFETY: `s.xsave` is a whole `kvm_xsave` (decoding accepts exactly its size) with an empty
    // flexible array, so KVM_SET_XSAVE reads only the 4 KiB legacy area we own; KVM validates
    // its content.
    unsafe { vcpu.set_xsave(&s.xsave) }.map_err(e("KVM_SET_XSAVE", "vCPU"))?;
    vcpu.set_xcrs(&s.xcrs).map_err(e("KVM_SET_XCRS", "vCPU"))?;
    vcpu.set_debug_regs(&s.debugregs)
        .map_err(e("KVM_SET_DEBUGREGS", "vCPU"))?;
    vcpu.set_lapic(&s.lapic)
        .map_err(e("KVM_SET_LAPIC", "vCPU"))?;
    // TSC before TSC-deadline; the rest in index order.
    let mut sorted = s.msrs.clone();
    sorted.sort_by_key(|m| match m.index {
        MSR_IA32_TSC => 0,
        MSR_IA32_TSC_DEADLINE => 2,
        _ => 1,
    });
    let mut refused = Vec::new();
    let mut rest = &sorted[..];
    while !rest.is_empty() {
        let batch = msrs(rest)?;
        let n = vcpu.set_msrs(&batch).map_err(e("KVM_SET_MSRS", "vCPU"))?;
        match rest.get(n) {
            Some(m) => {
                refused.push(m.index);
                rest = &rest[n + 1..];
            }
            None => rest = &[],
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
    for chip_id in IRQCHIPS {
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

/// Restores VM state into a fresh VM (irqchip and PIT already created). The state is validated
/// ([`VmState::validate`]) before anything is applied.
pub fn restore_vm(vm: &VmFd, s: &VmState) -> Result<(), PersistError> {
    s.validate()?;
    for chip in &s.irqchips {
        vm.set_irqchip(chip)
            .map_err(e("KVM_SET_IRQCHIP", format!("chip {}", chip.chip_id)))?;
    }
    vm.set_pit2(&s.pit).map_err(e("KVM_SET_PIT2", "VM"))?;
    vm.set_clock(&s.clock).map_err(e("KVM_SET_CLOCK", "VM"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vcpu_state() -> VcpuState {
        VcpuState {
            cpuid: vec![kvm_cpuid_entry2::default()],
            mp_state: kvm_mp_state::default(),
            regs: kvm_regs::default(),
            sregs: kvm_sregs::default(),
            xsave: kvm_xsave::default(),
            xcrs: kvm_xcrs::default(),
            debugregs: kvm_debugregs::default(),
            lapic: kvm_lapic_state::default(),
            msrs: Vec::new(),
            skipped_msrs: Vec::new(),
            events: kvm_vcpu_events::default(),
        }
    }

    fn msr_list(n: u32) -> Vec<kvm_msr_entry> {
        (0..n)
            .map(|i| kvm_msr_entry {
                index: 0x1000 + i,
                ..Default::default()
            })
            .collect()
    }

    /// `VcpuState` with the xsave area and MSR list as free-form values, to forge state files.
    #[derive(Serialize)]
    struct ForgedVcpu {
        cpuid: Vec<kvm_cpuid_entry2>,
        mp_state: kvm_mp_state,
        regs: kvm_regs,
        sregs: kvm_sregs,
        xsave: Vec<u8>,
        xcrs: kvm_xcrs,
        debugregs: kvm_debugregs,
        lapic: Vec<u8>,
        msrs: Vec<kvm_msr_entry>,
        skipped_msrs: Vec<u32>,
        events: kvm_vcpu_events,
    }

    fn forged(xsave: usize, lapic: usize, msrs: u32, cpuid: usize) -> ForgedVcpu {
        ForgedVcpu {
            cpuid: vec![kvm_cpuid_entry2::default(); cpuid],
            mp_state: kvm_mp_state::default(),
            regs: kvm_regs::default(),
            sregs: kvm_sregs::default(),
            xsave: vec![0; xsave],
            xcrs: kvm_xcrs::default(),
            debugregs: kvm_debugregs::default(),
            lapic: vec![0; lapic],
            msrs: msr_list(msrs),
            skipped_msrs: Vec::new(),
            events: kvm_vcpu_events::default(),
        }
    }

    /// Writes `state` as a checksummed state file and decodes it as `T`.
    fn round_trip<S: Serialize, T: DeserializeOwned>(
        state: &S,
    ) -> Result<T, snapshot::SnapshotError> {
        let dir = tempfile::tempdir().unwrap();
        let mut w = snapshot::SnapshotWriter::create(dir.path()).unwrap();
        w.write_memory_with(4096, &[], |_, _| Ok(())).unwrap();
        w.commit("forged", snapshot::HostFingerprint::current(12), state)
            .unwrap();
        snapshot::SnapshotDir::open::<T>(dir.path(), None).map(|(_, s)| s)
    }

    fn decode_err(r: Result<VcpuState, snapshot::SnapshotError>) -> String {
        match r {
            Err(e @ snapshot::SnapshotError::Decode { .. }) => e.to_string(),
            Err(e) => panic!("expected a decode error, got {e}"),
            Ok(_) => panic!("forged state decoded"),
        }
    }

    #[test]
    fn forged_state_files_with_valid_checksums_do_not_decode() {
        let xsave = std::mem::size_of::<kvm_xsave>();
        let lapic = std::mem::size_of::<kvm_lapic_state>();
        let ok: VcpuState = round_trip(&forged(xsave, lapic, 40, 3)).unwrap();
        assert_eq!((ok.msrs.len(), ok.cpuid.len()), (40, 3));
        let e = decode_err(round_trip(&forged(xsave, lapic, 300, 3)));
        assert!(e.contains("300 kvm_msr_entry") && e.contains("256"), "{e}");
        let e = decode_err(round_trip(&forged(xsave, lapic, 1, 257)));
        assert!(e.contains("257 kvm_cpuid_entry2"), "{e}");
        for bad in [0, 16, xsave - 1, xsave + 1, 1 << 20] {
            let e = decode_err(round_trip(&forged(bad, lapic, 1, 1)));
            assert!(
                e.contains("kvm_xsave") && e.contains(&bad.to_string()),
                "{e}"
            );
        }
        let e = decode_err(round_trip(&forged(xsave, lapic + 8, 1, 1)));
        assert!(e.contains("kvm_lapic_state"), "{e}");
    }

    #[test]
    fn forged_vm_state_does_not_decode_or_validate() {
        let chips = |ids: &[u32]| VmState {
            irqchips: ids
                .iter()
                .map(|&chip_id| kvm_irqchip {
                    chip_id,
                    ..Default::default()
                })
                .collect(),
            pit: kvm_pit_state2::default(),
            clock: kvm_clock_data::default(),
        };
        let good: VmState = round_trip(&chips(&[0, 1, 2])).unwrap();
        good.validate().unwrap();
        let r = round_trip::<_, VmState>(&chips(&[0, 1, 2, 2]));
        assert!(
            matches!(&r, Err(snapshot::SnapshotError::Decode { detail, .. }) if detail.contains("4 kvm_irqchip")),
            "{:?}",
            r.err()
        );
        for ids in [&[0, 1][..], &[0, 0, 2], &[0, 1, 7]] {
            let e = chips(ids).validate().unwrap_err().to_string();
            assert!(e.contains("irqchip ids"), "{e}");
        }
    }

    #[test]
    fn out_of_range_vcpu_state_is_refused_before_kvm_sees_it() {
        let kvm = Kvm::new().unwrap();
        let vm = kvm.create_vm().unwrap();
        vm.create_irq_chip().unwrap();
        let vcpu = vm.create_vcpu(0).unwrap();
        let cpuid = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).unwrap();
        vcpu.set_cpuid2(&cpuid).unwrap();
        let refuse = |f: &dyn Fn(&mut VcpuState)| {
            let mut s = vcpu_state();
            f(&mut s);
            match restore_vcpu(&vcpu, &s) {
                Err(e @ PersistError::Invalid(_)) => e.to_string(),
                Err(e) => panic!("expected Invalid, got {e}"),
                Ok(_) => panic!("restored"),
            }
        };
        let e = refuse(&|s| s.msrs = msr_list(300));
        assert!(e.contains("300 MSRs"), "{e}");
        let e = refuse(&|s| s.cpuid = vec![kvm_cpuid_entry2::default(); 257]);
        assert!(e.contains("257 CPUID entries"), "{e}");
        let e = refuse(&|s| s.cpuid.clear());
        assert!(e.contains("0 CPUID entries"), "{e}");
        let e = refuse(&|s| s.skipped_msrs = vec![1; 1000]);
        assert!(e.contains("1000 skipped MSRs"), "{e}");
        let e = refuse(&|s| s.xcrs.nr_xcrs = 17);
        assert!(e.contains("17 XCRs"), "{e}");
        let e = refuse(&|s| s.mp_state.mp_state = 99);
        assert!(e.contains("mp_state 99"), "{e}");
        // A real vCPU's state still saves, survives the file and restores into a fresh vCPU.
        let saved = save_vcpu(&kvm, &vcpu).unwrap();
        saved.validate().unwrap();
        let back: VcpuState = round_trip(&saved).unwrap();
        let fresh = vm.create_vcpu(1).unwrap();
        restore_vcpu(&fresh, &back).unwrap();
    }

    #[test]
    fn generation_never_wraps() {
        assert_eq!(next_generation(0).unwrap(), 1);
        assert_eq!(next_generation(u64::MAX - 1).unwrap(), u64::MAX);
        let e = next_generation(u64::MAX).unwrap_err();
        assert!(matches!(e, PersistError::GenerationOverflow(u64::MAX)));
        assert!(e.to_string().contains("18446744073709551615"), "{e}");
    }
}
