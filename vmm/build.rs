//! Compiles runv-vmm's seccomp allow-lists (`src/seccomp/rules.rs`, the one source of truth) to
//! BPF at build time, as Firecracker does, so that starting a VMM pays no filter compilation
//! (~0.6 ms here, on the path of every fresh restore and boot). `src/seccomp/mod.rs` loads the
//! programs from `OUT_DIR`.

use std::path::PathBuf;

use seccompiler::{BpfProgram, SeccompAction, SeccompFilter, TargetArch};

/// The thread kinds, as `src/seccomp/mod.rs` has them (rules.rs matches on them).
#[allow(dead_code)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ThreadKind {
    Vmm,
    Vcpu,
    Uffd,
}

/// What rules.rs reports when a rule does not build.
#[derive(Debug)]
enum SeccompError {
    Build(#[allow(dead_code)] seccompiler::BackendError),
}

#[path = "src/seccomp/rules.rs"]
#[allow(dead_code, unused_imports)]
mod rules;

/// `code u16 | jt u8 | jf u8 | k u32`, little endian, per instruction.
fn bytes(p: &BpfProgram) -> Vec<u8> {
    let mut out = Vec::with_capacity(p.len() * 8);
    for i in p {
        out.extend_from_slice(&i.code.to_le_bytes());
        out.push(i.jt);
        out.push(i.jf);
        out.extend_from_slice(&i.k.to_le_bytes());
    }
    out
}

fn compile(
    rules: std::collections::BTreeMap<i64, Vec<seccompiler::SeccompRule>>,
    mismatch: SeccompAction,
    matched: SeccompAction,
) -> Vec<u8> {
    let filter = SeccompFilter::new(rules, mismatch, matched, TargetArch::x86_64)
        .expect("the seccomp allow-lists in src/seccomp/rules.rs build");
    bytes(&BpfProgram::try_from(filter).expect("the seccomp allow-lists compile to BPF"))
}

fn main() {
    println!("cargo:rerun-if-changed=src/seccomp/rules.rs");
    println!("cargo:rerun-if-changed=build.rs");
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    for (kind, name) in [
        (ThreadKind::Vmm, "vmm"),
        (ThreadKind::Vcpu, "vcpu"),
        (ThreadKind::Uffd, "uffd"),
    ] {
        for (mode, action) in [
            ("log", SeccompAction::Log),
            ("kill", SeccompAction::KillProcess),
        ] {
            let rules = rules::allowed(kind).expect("the seccomp allow-lists build");
            let p = compile(rules, action, SeccompAction::Allow);
            std::fs::write(out.join(format!("seccomp-{name}-{mode}.bpf")), p)
                .expect("writing a BPF program to OUT_DIR");
        }
    }
    let clone3 = compile(
        std::collections::BTreeMap::from([(libc::SYS_clone3, vec![])]),
        SeccompAction::Allow,
        SeccompAction::Errno(libc::ENOSYS as u32),
    );
    std::fs::write(out.join("seccomp-no-clone3.bpf"), clone3).expect("writing a BPF program");
}
