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

/// A `runv-vmm` command booting `kernel` with `rd` (written gzipped into `dir`), 2 vCPUs,
/// `mem_mib` of RAM, the console in `dir/serial.log`.
fn boot_linux(
    kernel: &std::ffi::OsStr,
    rd: &Initramfs,
    dir: &std::path::Path,
    mem_mib: u64,
) -> Command {
    let initrd = dir.join("initrd.gz");
    std::fs::write(&initrd, rd.to_bytes(Compression::Gzip).unwrap()).unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_runv-vmm"));
    cmd.arg("--kernel")
        .arg(kernel)
        .arg("--initrd")
        .arg(&initrd)
        .args(["--mem-mib", &mem_mib.to_string(), "--vcpus", "2"])
        .args(["--cmdline", "console=ttyS0 reboot=k panic=-1 rdinit=/init"])
        .arg("--serial")
        .arg(format!("file:{}", dir.join("serial.log").display()));
    cmd
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
    let serial = dir.path().join("serial.log");
    let mut child = boot_linux(&kernel, &rd, dir.path(), 256).spawn().unwrap();
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

/// The agent as the guest's PID 1 over virtio-vsock: containers from a busybox rootfs inside the
/// initramfs, driven from the host through the VMM's vsock Unix socket.
#[test]
fn kvm_linux_agent_over_vsock() {
    if let Some(why) = skip_reason() {
        println!("SKIPPED: kvm_linux_agent_over_vsock: {why}");
        return;
    }
    use protocol::{Request, Response, RootfsSource, StdioConfig};
    use std::io::{BufRead, BufReader, Write};
    let kernel = std::env::var_os("RUNV_KERNEL").unwrap();
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/build-agent.sh");
    let out = Command::new("bash").arg(&script).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let agent_bin = std::fs::read(String::from_utf8(out.stdout).unwrap().trim()).unwrap();
    let busybox = std::fs::read("/bin/busybox").expect("busybox-static");
    let dir = tempfile::tempdir().unwrap();
    let mut rd = Initramfs::new();
    rd.file("init", 0o755, agent_bin).unwrap();
    for d in [
        "proc",
        "sys",
        "dev",
        "tmp",
        "run",
        "rootfs",
        "rootfs/bin",
        "rootfs/proc",
        "rootfs/dev",
        "rootfs/sys",
        "rootfs/tmp",
    ] {
        rd.dir(d, 0o755).unwrap();
    }
    rd.file("rootfs/bin/busybox", 0o755, busybox).unwrap();
    for a in ["sh", "echo", "cat", "sleep"] {
        rd.symlink(&format!("rootfs/bin/{a}"), "busybox").unwrap();
    }
    let uds = dir.path().join("vsock.sock");
    let serial = dir.path().join("serial.log");
    let mut child = boot_linux(&kernel, &rd, dir.path(), 512)
        .arg("--vsock")
        .arg(format!("cid=3,uds={}", uds.display()))
        .spawn()
        .unwrap();
    let console = || std::fs::read_to_string(&serial).unwrap_or_default();
    // Connect through the VMM until the agent listens (the guest is booting meanwhile).
    let deadline = Instant::now() + Duration::from_secs(60);
    let stream = loop {
        assert!(
            Instant::now() < deadline,
            "agent never answered on vsock; console:\n{}",
            console()
        );
        if let Ok(mut s) = std::os::unix::net::UnixStream::connect(&uds) {
            writeln!(s, "CONNECT 1024").unwrap();
            let mut line = String::new();
            s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
            if BufReader::new(s.try_clone().unwrap())
                .read_line(&mut line)
                .is_ok()
                && line.starts_with("OK")
            {
                break s;
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let mut c = protocol::client::Client::from_stream(stream).unwrap();
    assert!(matches!(
        c.call(&Request::Ping).unwrap(),
        Response::Pong { ready: true, .. }
    ));
    let mut spec = oci_spec::runtime::Spec::default();
    let run = |c: &mut protocol::client::Client,
               id: &str,
               args: &[&str],
               spec: &mut oci_spec::runtime::Spec| {
        let mut p = spec.process().clone().unwrap();
        p.set_args(Some(args.iter().map(|s| s.to_string()).collect()));
        p.set_terminal(Some(false));
        spec.set_process(Some(p));
        let r = c
            .call(&Request::Create {
                id: id.into(),
                spec: Box::new(spec.clone()),
                rootfs: RootfsSource::Bind {
                    path: "/rootfs".into(),
                },
                stdio: StdioConfig::default(),
            })
            .unwrap();
        let Response::Created { streams, .. } = r else {
            panic!("{r:?}\n{}", console())
        };
        c.call(&Request::Start { id: id.into() }).unwrap();
        let Response::Exited { status, .. } = c
            .call(&Request::Wait {
                id: id.into(),
                exec_id: None,
            })
            .unwrap()
        else {
            panic!()
        };
        let out = c
            .read_to_close(streams.stdout, Duration::from_secs(10))
            .unwrap();
        c.call(&Request::Destroy { id: id.into() }).unwrap();
        (String::from_utf8_lossy(&out).to_string(), status.code)
    };
    assert_eq!(
        run(&mut c, "echo", &["echo", "hello"], &mut spec),
        ("hello\n".into(), 0)
    );
    assert_eq!(
        run(&mut c, "seven", &["sh", "-c", "exit 7"], &mut spec).1,
        7
    );
    assert_eq!(
        run(&mut c, "k", &["sh", "-c", "kill -9 $$"], &mut spec).1,
        137
    );
    assert_eq!(
        c.call(&Request::Reseed {
            entropy: vec![7; 64]
        })
        .unwrap(),
        Response::Ok
    );
    assert_eq!(
        c.call(&Request::SetHostname {
            hostname: "clone-1".into()
        })
        .unwrap(),
        Response::Ok
    );
    let _ = child.kill();
    let _ = child.wait();
}
