//! Boots a real Linux kernel (`RUNV_KERNEL`: a vmlinux or bzImage with virtio-mmio and a serial
//! console built in) with a generated busybox initramfs, to a marker on the serial console.
//!
//! Needs hardware virtualization: on hosts whose KVM cannot boot Linux (no vmx/svm, see
//! ../shared/platform.md) or without `RUNV_KERNEL`, it prints a loud `SKIPPED:` line.

use std::process::Command;
use std::time::{Duration, Instant};

use agent::initramfs::{Compression, Initramfs};

const MARKER: &str = "RUNV_LINUX_BOOT_OK";

fn skip_reason() -> Option<String> {
    if !std::path::Path::new("/dev/kvm").exists() {
        return Some("/dev/kvm missing".into());
    }
    let Some(kernel) = std::env::var_os("RUNV_KERNEL") else {
        return Some("RUNV_KERNEL is not set (point it at a vmlinux or bzImage)".into());
    };
    if !std::path::Path::new(&kernel).is_file() {
        return Some(format!(
            "RUNV_KERNEL={} is not a file",
            kernel.to_string_lossy()
        ));
    }
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let hw_virt = cpuinfo
        .lines()
        .filter(|l| l.starts_with("flags"))
        .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"));
    if !hw_virt {
        return Some("no vmx/svm: this host's KVM cannot boot a Linux guest".into());
    }
    None
}

#[test]
fn kvm_linux_boot_to_marker() {
    if let Some(why) = skip_reason() {
        println!("SKIPPED: kvm_linux_boot_to_marker: {why}");
        return;
    }
    let kernel = std::env::var_os("RUNV_KERNEL").unwrap();
    let busybox =
        std::fs::read("/bin/busybox").expect("busybox-static (scripts/setup.sh installs it)");
    let dir = tempfile::tempdir().unwrap();
    let mut rd = Initramfs::new();
    rd.file("bin/busybox", 0o755, busybox).unwrap();
    rd.symlink("bin/sh", "busybox").unwrap();
    rd.dir("proc", 0o755).unwrap();
    rd.file(
        "init",
        0o755,
        format!("#!/bin/sh\n/bin/busybox mount -t proc proc /proc\n/bin/busybox echo {MARKER}\n/bin/busybox reboot -f\n")
            .into_bytes(),
    )
    .unwrap();
    let initrd = dir.path().join("initrd.gz");
    std::fs::write(&initrd, rd.to_bytes(Compression::Gzip).unwrap()).unwrap();
    let serial = dir.path().join("serial.log");
    let mut child = Command::new(env!("CARGO_BIN_EXE_runv-vmm"))
        .arg("--kernel")
        .arg(&kernel)
        .arg("--initrd")
        .arg(&initrd)
        .args(["--mem-mib", "256", "--vcpus", "2"])
        .args(["--cmdline", "console=ttyS0 reboot=k panic=-1 rdinit=/init"])
        .arg("--serial")
        .arg(format!("file:{}", serial.display()))
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!(
                "Linux did not reboot within 60 s; console:\n{}",
                std::fs::read_to_string(&serial).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let console = std::fs::read_to_string(&serial).unwrap_or_default();
    assert!(status.success(), "runv-vmm failed: {status}\n{console}");
    assert!(
        console.contains(MARKER),
        "no marker on the console:\n{console}"
    );
}
