//! What a snapshot needs to know about the host it was taken on.

use serde::{Deserialize, Serialize};

/// Host properties a restore must match.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostFingerprint {
    /// CPUID vendor string, e.g. `GenuineIntel`.
    pub cpu_vendor: String,
    /// CPUID family.
    pub cpu_family: u32,
    /// CPUID model.
    pub cpu_model: u32,
    /// KVM API version (`KVM_GET_API_VERSION`).
    pub kvm_api_version: i32,
    /// KVM without vmx/svm (a software, PVM-like hypervisor): guest state differs in subtle ways.
    pub pvm_like: bool,
}

impl HostFingerprint {
    /// The fingerprint of this host, given the KVM API version the caller read.
    pub fn current(kvm_api_version: i32) -> Self {
        // CPUID exists on every x86_64 CPU and has no side effects.
        let (leaf0, leaf1) = (std::arch::x86_64::__cpuid(0), std::arch::x86_64::__cpuid(1));
        let mut vendor = Vec::with_capacity(12);
        for r in [leaf0.ebx, leaf0.edx, leaf0.ecx] {
            vendor.extend_from_slice(&r.to_le_bytes());
        }
        let base_family = (leaf1.eax >> 8) & 0xf;
        let family = if base_family == 0xf {
            base_family + ((leaf1.eax >> 20) & 0xff)
        } else {
            base_family
        };
        let mut model = (leaf1.eax >> 4) & 0xf;
        if base_family == 0x6 || base_family == 0xf {
            model |= ((leaf1.eax >> 16) & 0xf) << 4;
        }
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let hw_virt = cpuinfo
            .lines()
            .filter(|l| l.starts_with("flags"))
            .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"));
        Self {
            cpu_vendor: String::from_utf8_lossy(&vendor).into_owned(),
            cpu_family: family,
            cpu_model: model,
            kvm_api_version,
            pvm_like: !hw_virt,
        }
    }

    /// The first field that differs from `host`, as (name, snapshot value, host value).
    pub fn mismatch(&self, host: &HostFingerprint) -> Option<(&'static str, String, String)> {
        let fields: [(&'static str, String, String); 5] = [
            (
                "cpu_vendor",
                self.cpu_vendor.clone(),
                host.cpu_vendor.clone(),
            ),
            (
                "cpu_family",
                self.cpu_family.to_string(),
                host.cpu_family.to_string(),
            ),
            (
                "cpu_model",
                self.cpu_model.to_string(),
                host.cpu_model.to_string(),
            ),
            (
                "kvm_api_version",
                self.kvm_api_version.to_string(),
                host.kvm_api_version.to_string(),
            ),
            (
                "pvm_like",
                self.pvm_like.to_string(),
                host.pvm_like.to_string(),
            ),
        ];
        fields.into_iter().find(|(_, a, b)| a != b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn current_host_is_self_consistent() {
        let a = HostFingerprint::current(12);
        assert_eq!(a.cpu_vendor.len(), 12);
        assert!(a.cpu_family > 0);
        assert_eq!(a.mismatch(&HostFingerprint::current(12)), None);
        let mut b = a.clone();
        b.cpu_model += 1;
        assert_eq!(b.mismatch(&a).unwrap().0, "cpu_model");
    }
}
