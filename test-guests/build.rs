//! Builds the freestanding test guest with the host's gcc and ld (no extra rustup target needed).

use std::path::PathBuf;
use std::process::Command;

fn run(cmd: &mut Command) {
    let status = cmd
        .status()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e} (install gcc and binutils)"));
    assert!(status.success(), "{cmd:?} failed with {status}");
}

fn main() {
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let src = PathBuf::from("guest");
    for f in ["start.S", "main.c", "net.c", "agent.c", "guest.ld"] {
        println!("cargo:rerun-if-changed=guest/{f}");
    }
    let cflags = [
        "-ffreestanding",
        "-fno-pic",
        "-fno-pie",
        "-mno-red-zone",
        "-mgeneral-regs-only",
        "-mcmodel=small",
        "-fno-stack-protector",
        "-fno-asynchronous-unwind-tables",
        "-nostdlib",
        "-Os",
        "-Wall",
        "-Werror",
        "-c",
    ];
    let mut objs = Vec::new();
    for f in ["start.S", "main.c", "net.c"] {
        let obj = out.join(format!("{f}.o"));
        run(Command::new("gcc")
            .args(cflags)
            .arg(src.join(f))
            .arg("-o")
            .arg(&obj));
        objs.push(obj);
    }
    let elf = out.join("runv-test-guest");
    run(Command::new("ld")
        .args([
            "-static",
            "-nostdlib",
            "--no-dynamic-linker",
            "-z",
            "max-page-size=4096",
            "-T",
        ])
        .arg(src.join("guest.ld"))
        .args(&objs)
        .arg("-o")
        .arg(&elf));
    println!("cargo:rustc-env=RUNV_TEST_GUEST={}", elf.display());
}
