//! The agent a guest boots is one static ELF (no interpreter, no shared libraries), small, and it
//! serves the protocol.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

/// Builds the static agent with `scripts/build-agent.sh` (a no-op when up to date).
fn static_agent() -> PathBuf {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../scripts/build-agent.sh");
    let out = Command::new("bash").arg(&script).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
}

/// Program header types of an ELF64 little-endian file.
fn program_header_types(elf: &[u8]) -> Vec<u32> {
    assert_eq!(&elf[..4], b"\x7fELF", "not an ELF file");
    assert_eq!(elf[4], 2, "not ELF64");
    let u16_at = |o: usize| u16::from_le_bytes([elf[o], elf[o + 1]]) as usize;
    let u64_at = |o: usize| u64::from_le_bytes(elf[o..o + 8].try_into().unwrap()) as usize;
    let (phoff, phentsize, phnum) = (u64_at(0x20), u16_at(0x36), u16_at(0x38));
    (0..phnum)
        .map(|i| {
            let o = phoff + i * phentsize;
            u32::from_le_bytes(elf[o..o + 4].try_into().unwrap())
        })
        .collect()
}

#[test]
fn static_agent_has_no_interpreter_and_serves() {
    let bin = static_agent();
    let elf = std::fs::read(&bin).unwrap();
    const PT_INTERP: u32 = 3;
    const PT_DYNAMIC: u32 = 2;
    let types = program_header_types(&elf);
    assert!(
        !types.contains(&PT_INTERP),
        "{} has an ELF interpreter",
        bin.display()
    );
    // static-pie keeps a PT_DYNAMIC for self-relocation but needs no shared library.
    let mib = elf.len() as f64 / (1 << 20) as f64;
    println!(
        "runv-agent (static): {mib:.2} MiB, program headers {types:?}, dynamic={}",
        types.contains(&PT_DYNAMIC)
    );
    assert!(mib <= 8.0, "agent is {mib:.2} MiB, budget 8");

    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("a.sock");
    let mut child = Command::new(&bin)
        .arg("--listen")
        .arg(format!("unix:{}", sock.display()))
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !sock.exists() {
        assert!(Instant::now() < deadline, "static agent did not listen");
        std::thread::sleep(Duration::from_millis(5));
    }
    let mut c = protocol::client::Client::connect(&sock).unwrap();
    let r = c.call(&protocol::Request::Ping).unwrap();
    assert!(
        matches!(
            r,
            protocol::Response::Pong {
                ready: true,
                version: 1,
                ..
            }
        ),
        "{r:?}"
    );
    // SAFETY: kill(2) on our child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    assert!(child.wait().unwrap().success());
    assert!(!sock.exists(), "the agent removes its socket on SIGTERM");
}
