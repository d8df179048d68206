//! A jailed VMM serves guest memory through userfaultfd: the jail (unprivileged uid, no
//! capabilities, no_new_privs, seccomp) cannot create a userfaultfd that sees kernel (KVM)
//! faults with the syscall, so it gets one from its own `/dev/userfaultfd` node
//! (`USERFAULTFD_IOC_NEW`). This runs the VMM's real page server ([`vmm::uffd::PageServer`])
//! inside a real jail ([`vmm::jail::enter`]) in MINOR (tmpfs snapshot) and MISSING (disk
//! snapshot) modes, with the VMM thread's seccomp filter on, serves faults the kernel takes on
//! guest RAM (as KVM does; `write(2)` from it into a pipe) and checks the data; from outside,
//! checks that the process doing so runs as the jail uid.
//!
//! `harness = false`: the jail forks, which needs a single-threaded process, so this is a plain
//! `main` that re-runs itself as the jailed child.

use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::os::fd::FromRawFd;
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use vmm::uffd::{FaultMode, PageServer};
use vmm_api::jail::{JailSpec, DEFAULT_JAIL_ID};

const SIZE: u64 = 16 << 20;
const PAGE: u64 = 4096;
/// Set in the child: the two snapshot directories and the jail root, `:`-separated.
const CHILD_ENV: &str = "RUNV_TEST_JAIL_UFFD_CHILD";

fn byte_at(i: u64) -> u8 {
    ((i as u32).wrapping_mul(2_654_435_761) >> 11) as u8
}

/// Offsets the toucher reads: 200 scattered pages.
fn offsets() -> impl Iterator<Item = u64> {
    (0..200u64).map(|i| i * 37 * PAGE % SIZE + 5)
}

/// Writes a snapshot of patterned RAM into `dir`, readable by the jail.
fn template(dir: &Path) {
    let data: Vec<u8> = (0..SIZE).map(byte_at).collect();
    // SAFETY: valid NUL-terminated name; the fd is checked and then owned.
    let fd = unsafe { libc::memfd_create(c"ram".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: a fresh fd owned by nobody else.
    let ram = unsafe { File::from_raw_fd(fd) };
    ram.write_all_at(&data, 0).unwrap();
    std::fs::create_dir(dir).unwrap();
    let mut w = snapshot::SnapshotWriter::create(dir).unwrap();
    w.write_memory(&ram, SIZE).unwrap();
    w.commit("test", snapshot::HostFingerprint::current(12), &())
        .unwrap();
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    for f in std::fs::read_dir(dir).unwrap().flatten() {
        std::fs::set_permissions(f.path(), std::fs::Permissions::from_mode(0o644)).unwrap();
    }
}

fn main() {
    match std::env::var(CHILD_ENV) {
        Ok(arg) => jailed(&arg),
        Err(_) => parent(),
    }
}

fn parent() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 || !Path::new("/dev/userfaultfd").exists() {
        eprintln!("SKIPPED: jail_uffd needs root and /dev/userfaultfd (Linux >= 6.1)");
        return;
    }
    let shm = tempfile::tempdir_in("/dev/shm").unwrap();
    let disk = tempfile::tempdir_in(env!("CARGO_MANIFEST_DIR")).unwrap();
    let run = tempfile::tempdir().unwrap();
    let (minor, missing) = (shm.path().join("snap"), disk.path().join("snap"));
    template(&minor);
    template(&missing);
    let root = run.path().join("jail");
    let mut child = Command::new(std::env::current_exe().unwrap())
        .env(
            CHILD_ENV,
            format!(
                "{}:{}:{}",
                minor.display(),
                missing.display(),
                root.display()
            ),
        )
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let keeper = child.id();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "READY", "the jailed child said {line:?}");
    // The process serving the faults: the keeper's only child, as the jail uid.
    let vmm = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .find(|p| {
            std::fs::read_to_string(format!("/proc/{p}/stat"))
                .ok()
                .and_then(|s| {
                    s.rsplit_once(')')?
                        .1
                        .split_whitespace()
                        .nth(1)?
                        .parse()
                        .ok()
                })
                == Some(keeper)
        })
        .expect("the jail keeper has a child");
    let status = std::fs::read_to_string(format!("/proc/{vmm}/status")).unwrap();
    let field = |k: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(k))
            .unwrap()
            .split_whitespace()
            .map(str::to_owned)
            .collect::<Vec<_>>()
    };
    let id = DEFAULT_JAIL_ID.to_string();
    assert_eq!(field("Uid:"), vec![id.clone(); 4], "{status}");
    assert_eq!(field("Gid:"), vec![id; 4], "{status}");
    assert_eq!(field("CapEff:"), vec!["0000000000000000"], "{status}");
    assert_eq!(field("NoNewPrivs:"), vec!["1"], "{status}");
    assert_eq!(field("Seccomp:"), vec!["2"], "{status}");
    child.stdin.take().unwrap().write_all(b"go\n").unwrap();
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut out, &mut rest).unwrap();
    let code = child.wait().unwrap();
    eprint!("{rest}");
    assert!(code.success(), "the jailed child failed: {code}\n{rest}");
    let sysctl = std::fs::read_to_string("/proc/sys/vm/unprivileged_userfaultfd");
    if sysctl.is_ok_and(|v| v.trim() == "0") {
        assert!(rest.contains("SYSCALL refused"), "{rest}");
    }
    for mode in ["Minor", "Missing"] {
        assert!(rest.contains(&format!("PASS {mode}")), "{rest}");
    }
    assert!(!root.exists(), "the keeper left the jail root");
    // The child named its jail after its own pid, which is the keeper's.
    let cgroup = vmm_api::jail::Cgroup::of(&format!("test-uffd-{keeper}"));
    assert!(!cgroup.exists(), "the keeper left the cgroup {cgroup:?}");
    println!(
        "jail_uffd: jailed page server (uid {DEFAULT_JAIL_ID}) served MINOR and MISSING faults"
    );
}

/// In the child: jail, confine, serve.
fn jailed(arg: &str) {
    let parts: Vec<&str> = arg.split(':').collect();
    let (minor, missing, root) = (
        PathBuf::from(parts[0]),
        PathBuf::from(parts[1]),
        PathBuf::from(parts[2]),
    );
    let spec = JailSpec {
        root,
        // The keeper keeps this pid.
        id: format!("test-uffd-{}", std::process::id()),
        uid: DEFAULT_JAIL_ID,
        gid: DEFAULT_JAIL_ID,
        read_only: vec![minor.clone(), missing.clone()],
        read_write: Vec::new(),
        mem_mib: 256,
        pids_max: 16,
    };
    vmm::jail::enter(&spec, &vmm::jail::Netns::New).expect("entering the jail");
    // Inside, the syscall is refused (a userfaultfd that sees kernel faults needs
    // CAP_SYS_PTRACE, or vm.unprivileged_userfaultfd=1): the page server must use the device.
    // SAFETY: userfaultfd(2) with flags only; a returned fd is closed right away.
    let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC) };
    let syscall = if fd >= 0 {
        // SAFETY: the fd just returned, owned here.
        unsafe { libc::close(fd as i32) };
        "allowed"
    } else {
        "refused"
    };
    vmm::seccomp::set_mode(vmm::seccomp::SeccompMode::Kill).unwrap();
    vmm::seccomp::install(vmm::seccomp::ThreadKind::Vmm).unwrap();
    println!("READY");
    let mut go = String::new();
    std::io::stdin().read_line(&mut go).unwrap();
    println!("SYSCALL {syscall}");
    for (dir, mode) in [(&minor, FaultMode::Minor), (&missing, FaultMode::Missing)] {
        let snap = snapshot::SnapshotDir::open::<()>(dir, None).unwrap().0;
        let mut ram = vmm::memory::GuestRam::reserve(SIZE).unwrap();
        match mode {
            FaultMode::Missing => ram.map_anonymous().unwrap(),
            _ => ram.map_file_private(snap.memory().clone()).unwrap(),
        }
        // A long window: this test publishes no working set into the read-only snapshot.
        let server = PageServer::start(&ram, &snap, mode, Duration::from_secs(600))
            .unwrap_or_else(|e| panic!("{mode:?}: {e}"));
        // Read by the kernel, as KVM reads guest RAM: write(2) of each byte into a pipe makes
        // copy_from_user fault in kernel mode, which only a full (not user-mode-only)
        // userfaultfd reports to the page server; the bytes come back out of the pipe.
        let base = ram.regions()[0].0;
        let got: Vec<u8> = std::thread::spawn(move || {
            let mut fds = [0i32; 2];
            // SAFETY: pipe2 writes two fds into the array.
            assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
            let out = offsets()
                .map(|o| {
                    // SAFETY: base + o lies in guest RAM (one region of SIZE bytes, mapped
                    // while this thread runs: it is joined before `ram` drops).
                    let n = unsafe { libc::write(fds[1], (base + o) as *const libc::c_void, 1) };
                    assert_eq!(
                        n,
                        1,
                        "write from guest RAM at {o:#x}: {}",
                        std::io::Error::last_os_error()
                    );
                    let mut b = [0u8; 1];
                    // SAFETY: reads one byte into a local buffer.
                    assert_eq!(unsafe { libc::read(fds[0], b.as_mut_ptr().cast(), 1) }, 1);
                    b[0]
                })
                .collect();
            // SAFETY: closing the two fds this thread made.
            unsafe {
                libc::close(fds[0]);
                libc::close(fds[1]);
            }
            out
        })
        .join()
        .unwrap();
        let want: Vec<u8> = offsets().map(byte_at).collect();
        assert!(
            got == want,
            "{mode:?}: the served pages differ from the snapshot"
        );
        let stats = server.stats();
        assert!(stats.faults >= 200, "{mode:?}: {stats:?}");
        println!("PASS {mode:?} faults={}", stats.faults);
        drop(server);
    }
}
