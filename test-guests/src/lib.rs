//! Freestanding x86_64 test guests for runv.
//!
//! `runv-test-guest` is an ELF64 executable loaded like a Linux vmlinux (one `PT_LOAD` at 1 MiB,
//! 64-bit entry, `boot_params` in RSI). It reads `rt.*` tasks from the kernel command line and
//! reports over the debug port; the task list and report formats are in docs/ARCHITECTURE.md.

use std::path::PathBuf;

pub mod netns;

/// Path of the built test guest ELF.
pub fn guest_path() -> PathBuf {
    PathBuf::from(env!("RUNV_TEST_GUEST"))
}

#[cfg(test)]
mod tests {
    #[test]
    fn elf_is_a_loadable_x86_64_vmlinux_lookalike() {
        let elf = std::fs::read(super::guest_path()).unwrap();
        assert_eq!(&elf[..4], b"\x7fELF");
        assert_eq!(elf[4], 2, "ELFCLASS64");
        assert_eq!(u16::from_le_bytes([elf[18], elf[19]]), 62, "EM_X86_64");
        let entry = u64::from_le_bytes(elf[24..32].try_into().unwrap());
        let phoff = u64::from_le_bytes(elf[32..40].try_into().unwrap()) as usize;
        let phnum = u16::from_le_bytes([elf[56], elf[57]]) as usize;
        let loads: Vec<(u64, u64)> = (0..phnum)
            .map(|i| &elf[phoff + i * 56..phoff + (i + 1) * 56])
            .filter(|ph| u32::from_le_bytes(ph[0..4].try_into().unwrap()) == 1)
            .map(|ph| {
                let paddr = u64::from_le_bytes(ph[24..32].try_into().unwrap());
                let memsz = u64::from_le_bytes(ph[40..48].try_into().unwrap());
                (paddr, memsz)
            })
            .collect();
        assert!(!loads.is_empty());
        assert!(loads.iter().all(|(p, _)| *p >= 0x100000));
        assert!(loads.iter().any(|(p, m)| (*p..p + m).contains(&entry)));
    }
}
