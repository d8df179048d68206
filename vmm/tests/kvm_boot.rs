//! The Linux boot protocol as the test guest sees it, on real KVM.

mod common;

use common::*;
use vmm::config::BootProtocol;

#[test]
fn kvm_boot_protocol_state() {
    if !kvm_available("kvm_boot_protocol_state") {
        return;
    }
    for (protocol, name) in [
        (BootProtocol::Linux64, "linux64"),
        (BootProtocol::Pvh, "pvh"),
    ] {
        check_boot_state(protocol, name);
    }
}

fn check_boot_state(protocol: BootProtocol, name: &str) {
    let dir = tempfile::tempdir().unwrap();
    let initrd: Vec<u8> = (0..4096u32).map(|i| (i * 7 + 3) as u8).collect();
    std::fs::write(dir.path().join("initrd"), &initrd).unwrap();
    let mut cfg = guest_config("rt.boot rt.exit=reset", dir.path());
    cfg.initrd = Some(dir.path().join("initrd"));
    cfg.mem_mib = 64;
    cfg.vcpus = 3;
    cfg.boot_protocol = protocol;
    let (reports, reason) = run_vm(cfg);
    assert_eq!(reason, vmm::ExitReason::GuestReset, "reports: {reports:?}");
    assert_eq!(reports[0], "READY");
    let boot = reports
        .iter()
        .find(|r| r.starts_with("PASS boot"))
        .unwrap_or_else(|| panic!("no boot report: {reports:?}"));
    assert_eq!(field(boot, "proto"), Some(name));
    // e820 RAM = all of RAM minus the reserved [0x9e000, 1 MiB) hole.
    let expected_ram = (64u64 << 20) - (0x10_0000 - 0x9e000);
    assert_eq!(field(boot, "ram"), Some(expected_ram.to_string().as_str()));
    assert_eq!(field(boot, "e820"), Some("3"));
    assert_eq!(field(boot, "cmdline_len"), Some("21"));
    assert_eq!(field(boot, "initrd_size"), Some("4096"));
    assert_eq!(
        field(boot, "initrd_sum"),
        Some(format!("{:x}", fnv1a(&initrd)).as_str())
    );
    assert_eq!(field(boot, "cpus"), Some("3"), "MP table processor entries");
    assert_eq!(field(boot, "gen"), Some("0"), "identity page generation");
}

#[test]
fn kvm_serial_console_to_file() {
    if !kvm_available("kvm_serial_console_to_file") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = guest_config("rt.serial=hello-serial rt.exit=reset", dir.path());
    let serial = dir.path().join("serial.log");
    cfg.serial = vmm::config::SerialOutput::File(serial.clone());
    let (reports, reason) = run_vm(cfg);
    assert_eq!(reason, vmm::ExitReason::GuestReset);
    assert!(
        reports.iter().any(|r| r == "PASS serial bytes=12"),
        "{reports:?}"
    );
    assert_eq!(std::fs::read_to_string(serial).unwrap(), "hello-serial\r\n");
    let log = std::fs::read_to_string(dir.path().join("debug.log")).unwrap();
    assert!(log.starts_with("REPORT READY\n"), "{log}");
}

#[test]
fn kvm_bad_kernels_are_refused() {
    if !kvm_available("kvm_bad_kernels_are_refused") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let elf = std::fs::read(test_guests::guest_path()).unwrap();
    let cases: [(&str, Vec<u8>); 3] = [
        ("truncated", elf[..100].to_vec()),
        ("garbage", vec![0x42; 8192]),
        ("empty", Vec::new()),
    ];
    for (name, bytes) in cases {
        let k = dir.path().join(name);
        std::fs::write(&k, bytes).unwrap();
        let mut cfg = guest_config("", dir.path());
        cfg.kernel = k;
        let err = vmm::Vmm::build(cfg).err().expect(name).to_string();
        assert!(err.contains("not a loadable"), "{name}: {err}");
    }
    let mut cfg = guest_config("", dir.path());
    cfg.kernel = dir.path().join("missing");
    let err = vmm::Vmm::build(cfg).err().unwrap().to_string();
    assert!(
        err.contains("missing") && err.contains("not a readable file"),
        "{err}"
    );
}

#[test]
fn kvm_bad_sizes_are_refused() {
    if !kvm_available("kvm_bad_sizes_are_refused") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = guest_config("", dir.path());
    cfg.mem_mib = 8;
    assert!(vmm::Vmm::build(cfg)
        .err()
        .unwrap()
        .to_string()
        .contains("8 MiB"));
    let mut cfg = guest_config("", dir.path());
    cfg.vcpus = 9;
    assert!(vmm::Vmm::build(cfg)
        .err()
        .unwrap()
        .to_string()
        .contains("9 vCPUs"));
    // An initrd larger than RAM.
    let big = dir.path().join("big-initrd");
    std::fs::File::create(&big)
        .unwrap()
        .set_len(40 << 20)
        .unwrap();
    let mut cfg = guest_config("", dir.path());
    cfg.mem_mib = 32;
    cfg.initrd = Some(big);
    let err = vmm::Vmm::build(cfg).err().unwrap().to_string();
    assert!(err.contains("does not fit"), "{err}");
    let mut cfg = guest_config(&"x".repeat(5000), dir.path());
    cfg.mem_mib = 32;
    let err = vmm::Vmm::build(cfg).err().unwrap().to_string();
    assert!(err.contains("command line"), "{err}");
}

#[test]
fn kvm_smp_bring_up() {
    if !kvm_available("kvm_smp_bring_up") {
        return;
    }
    for (vcpus, mask) in [(2u8, "3"), (4, "f"), (8, "ff")] {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = guest_config("rt.smp rt.exit=reset", dir.path());
        cfg.vcpus = vcpus;
        let (reports, reason) = run_vm(cfg);
        assert_eq!(reason, vmm::ExitReason::GuestReset, "{reports:?}");
        let smp = reports
            .iter()
            .find(|r| r.starts_with("PASS smp"))
            .unwrap_or_else(|| panic!("{vcpus} vCPUs: {reports:?}"));
        assert_eq!(field(smp, "cpus"), Some(vcpus.to_string().as_str()));
        // Every AP saw its own APIC id in CPUID leaf 1.
        assert_eq!(field(smp, "apic_mask"), Some(mask));
    }
}

#[test]
fn kvm_boot_protocol_selection() {
    if !kvm_available("kvm_boot_protocol_selection") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // The same guest without its PVH note: auto falls back to the 64-bit entry, pvh is refused.
    let stripped = dir.path().join("no-pvh");
    let status = std::process::Command::new("objcopy")
        .args(["--remove-section", ".note.Xen"])
        .arg(test_guests::guest_path())
        .arg(&stripped)
        .status()
        .expect("objcopy (binutils)");
    assert!(status.success());
    let mut cfg = guest_config("rt.boot rt.exit=reset", dir.path());
    cfg.kernel = stripped.clone();
    let (reports, reason) = run_vm(cfg.clone());
    assert_eq!(reason, vmm::ExitReason::GuestReset, "{reports:?}");
    let boot = reports.iter().find(|r| r.starts_with("PASS boot")).unwrap();
    assert_eq!(field(boot, "proto"), Some("linux64"));
    cfg.boot_protocol = BootProtocol::Pvh;
    let err = vmm::Vmm::build(cfg).err().unwrap().to_string();
    assert!(err.contains("no PVH entry note"), "{err}");
    // With the note, auto prefers PVH (as Firecracker and Cloud Hypervisor do).
    let (reports, _) = run_vm(guest_config("rt.boot rt.exit=reset", dir.path()));
    let boot = reports.iter().find(|r| r.starts_with("PASS boot")).unwrap();
    assert_eq!(field(boot, "proto"), Some("pvh"));
}
