//! Containers whose root is a real EROFS image (built by `mkfs.erofs` from the busybox rootfs),
//! given to a real `runv-agent` as `RootfsSource::Image`: loop device, read-only mount, tmpfs
//! upper, and nothing left behind (mounts, loop devices, scratch directories).
//!
//! `RootfsSource::Block` (a virtio disk found by serial) needs a Linux guest; its serial
//! lookup is unit-tested in `agent::rootdev` against a sysfs-shaped directory.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use protocol::{ErrorCode, Request, Response, RootfsSource, StdioConfig, Writable};

/// The busybox rootfs as an EROFS image of this test's own (so parallel tests never share a
/// loop backing file), in a temporary directory removed on drop; None (after a loud SKIPPED
/// line) without root, busybox or mkfs.erofs.
fn image(test: &str) -> Option<(tempfile::TempDir, PathBuf)> {
    let root = rootfs(test)?;
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("busybox.erofs");
    let built = Command::new("mkfs.erofs")
        .args(["-T", "0", "--quiet"])
        .arg(&out)
        .arg(&root)
        .status()
        .is_ok_and(|s| s.success());
    if !built {
        println!("SKIPPED: {test}: mkfs.erofs missing or failed (apt-get install erofs-utils)");
        return None;
    }
    Some((dir, out))
}

fn image_source(path: &Path) -> RootfsSource {
    RootfsSource::Image {
        path: path.display().to_string(),
        fstype: "erofs".into(),
        writable: Writable::Tmpfs,
    }
}

/// Loop devices backed by `path` (from /sys/block/loop*/loop/backing_file).
fn loops_backed_by(path: &Path) -> Vec<String> {
    let want = path.display().to_string();
    let mut v = Vec::new();
    for e in std::fs::read_dir("/sys/block").unwrap().flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        if !name.starts_with("loop") {
            continue;
        }
        if let Ok(b) = std::fs::read_to_string(e.path().join("loop/backing_file")) {
            if b.trim_end() == want {
                v.push(name);
            }
        }
    }
    v
}

/// Mount lines of this mount namespace (the agent's) that mention `needle`.
fn mounts_with(needle: &str) -> Vec<String> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter(|l| l.contains(needle))
        .map(String::from)
        .collect()
}

/// Waits (bounded) until no loop device is backed by `path`: autoclear runs at the last close.
fn assert_no_loop(path: &Path) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !loops_backed_by(path).is_empty() {
        assert!(
            Instant::now() < deadline,
            "loop devices still backed by {}: {:?}",
            path.display(),
            loops_backed_by(path)
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// No mount, loop device or scratch directory of `agent` is left.
fn assert_clean(agent: &Agent, img: &Path) {
    assert_no_loop(img);
    let dir = agent.dir.path().display().to_string();
    assert_eq!(mounts_with(&dir), Vec::<String>::new(), "mounts left");
    let state = agent.dir.path().join("state");
    let left: Vec<_> = std::fs::read_dir(&state)
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert_eq!(left, Vec::<PathBuf>::new(), "scratch directories left");
}

#[test]
fn erofs_root_runs_writes_go_to_tmpfs_and_delete_leaves_nothing() {
    let Some((_img_dir, img)) = image("erofs_root_runs") else {
        return;
    };
    let Some((_, agent, mut c)) = setup("erofs_root_runs") else {
        return;
    };
    let before = std::fs::read(&img).unwrap();
    let (out, err, st) = run_from(
        &mut c,
        "e1",
        spec(&[
            "sh",
            "-c",
            "echo hello; echo data > /etc/new; cat /etc/new; rm /bin/true; \
             grep -c ' / / .* - overlay ' /proc/self/mountinfo",
        ]),
        image_source(&img),
    );
    assert_eq!(
        (out.as_str(), err.as_str(), st.code),
        ("hello\ndata\n1\n", "", 0)
    );
    // A fresh container sees the image, not the previous container's writes.
    let (out, _, st) = run_from(
        &mut c,
        "e2",
        spec(&["sh", "-c", "ls /etc/new 2>/dev/null; ls /bin/true"]),
        image_source(&img),
    );
    assert_eq!((out.as_str(), st.code), ("/bin/true\n", 0));
    assert_eq!(std::fs::read(&img).unwrap(), before, "image bytes changed");
    assert_clean(&agent, &img);
}

#[test]
fn twenty_erofs_containers_leak_nothing() {
    let Some((_img_dir, img)) = image("twenty_erofs") else {
        return;
    };
    let Some((_, agent, mut c)) = setup("twenty_erofs") else {
        return;
    };
    // Created (holding a loop device each) side by side, then destroyed.
    for i in 0..20 {
        launch_from(
            &mut c,
            &format!("t{i}"),
            spec(&["sleep", "100"]),
            image_source(&img),
            StdioConfig::default(),
        );
    }
    let loops = loops_backed_by(&img);
    assert_eq!(loops.len(), 20, "{loops:?}");
    for i in 0..20 {
        let r = c
            .call(&Request::Destroy {
                id: format!("t{i}"),
            })
            .unwrap();
        assert_eq!(r, Response::Ok);
    }
    // The image mounts lived in the containers' namespaces: none of these devices is mounted
    // here (checked before autoclear can hand the numbers to anyone else).
    for l in &loops {
        assert_eq!(mounts_with(&format!(" /dev/{l} ")), Vec::<String>::new());
    }
    assert_clean(&agent, &img);
}

fn create_err(
    c: &mut protocol::client::Client,
    id: &str,
    rootfs: RootfsSource,
) -> (ErrorCode, String) {
    match c
        .call(&Request::Create {
            id: id.into(),
            spec: Box::new(spec(&["echo", "x"])),
            rootfs,
            stdio: StdioConfig::default(),
        })
        .unwrap()
    {
        Response::Error(e) => (e.code, e.message),
        r => panic!("{id}: expected an error, got {r:?}"),
    }
}

#[test]
fn bad_images_are_refused_clearly_and_cleaned_up() {
    let Some((_img_dir, img)) = image("bad_images") else {
        return;
    };
    let Some((_, agent, mut c)) = setup("bad_images") else {
        return;
    };
    let d = tempfile::tempdir().unwrap();
    let src = |p: &Path, fstype: &str| RootfsSource::Image {
        path: p.display().to_string(),
        fstype: fstype.into(),
        writable: Writable::Tmpfs,
    };
    let missing = d.path().join("missing.erofs");
    let (code, msg) = create_err(&mut c, "m", src(&missing, "erofs"));
    assert_eq!(code, ErrorCode::NotFound, "{msg}");
    assert!(msg.contains("missing.erofs"), "{msg}");

    let fifo = d.path().join("fifo");
    let cpath = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: mkfifo with a NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(cpath.as_ptr(), 0o600) }, 0);
    let (code, msg) = create_err(&mut c, "f", src(&fifo, "erofs"));
    assert_eq!(code, ErrorCode::BadRequest, "{msg}");
    assert!(msg.contains("not a regular file (a FIFO)"), "{msg}");

    let link = d.path().join("link.erofs");
    std::os::unix::fs::symlink(&img, &link).unwrap();
    let (_, msg) = create_err(&mut c, "l", src(&link, "erofs"));
    assert!(msg.contains("symbolic link"), "{msg}");

    let junk = d.path().join("junk.img");
    std::fs::write(&junk, vec![0x5au8; 8192]).unwrap();
    let (code, msg) = create_err(&mut c, "j", src(&junk, "erofs"));
    assert_eq!(code, ErrorCode::BadRequest, "{msg}");
    assert!(msg.contains("is not an erofs file system"), "{msg}");

    let (code, msg) = create_err(&mut c, "x", src(&img, "xfs"));
    assert_eq!(code, ErrorCode::BadRequest, "{msg}");
    assert!(msg.contains("\"xfs\" is not supported"), "{msg}");

    let (code, msg) = create_err(&mut c, "r", src(Path::new("rel.erofs"), "erofs"));
    assert_eq!(code, ErrorCode::BadRequest, "{msg}");

    // The right magic over a corrupt body: attached, then the child's mount fails; the loop
    // device and scratch directory must still go.
    let corrupt = d.path().join("corrupt.erofs");
    let mut bytes = std::fs::read(&img).unwrap();
    bytes.truncate(8192);
    for b in &mut bytes[1028..4096] {
        *b = 0xff;
    }
    std::fs::write(&corrupt, &bytes).unwrap();
    let (code, msg) = create_err(&mut c, "c", src(&corrupt, "erofs"));
    assert_eq!(code, ErrorCode::Spawn, "{msg}");
    assert_no_loop(&corrupt);

    for p in [&missing, &fifo, &junk, &img] {
        assert_no_loop(p);
    }
    assert_clean(&agent, &img);
    let r = c.call(&Request::List).unwrap();
    assert_eq!(r, Response::Containers { ids: vec![] });
}

/// An ext4 image (`mkfs.ext4 -d`) works the same way, mounted read-only without journal replay.
#[test]
fn ext4_image_root_runs_and_stays_unchanged() {
    let Some((_, agent, mut c)) = setup("ext4_image_root") else {
        return;
    };
    let root = rootfs("ext4_image_root").unwrap();
    let d = tempfile::tempdir().unwrap();
    let img = d.path().join("busybox.ext4");
    let built = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-E", "root_owner=0:0", "-d"])
        .arg(&root)
        .arg(&img)
        .arg("16M")
        .status()
        .is_ok_and(|s| s.success());
    if !built {
        println!("SKIPPED: ext4_image_root: mkfs.ext4 -d failed (apt-get install e2fsprogs)");
        return;
    }
    let before = std::fs::read(&img).unwrap();
    let (out, err, st) = run_from(
        &mut c,
        "x1",
        spec(&["sh", "-c", "echo ext4 > /etc/w; cat /etc/w"]),
        RootfsSource::Image {
            path: img.display().to_string(),
            fstype: "ext4".into(),
            writable: Writable::Tmpfs,
        },
    );
    assert_eq!((out.as_str(), err.as_str(), st.code), ("ext4\n", "", 0));
    assert_eq!(std::fs::read(&img).unwrap(), before, "image bytes changed");
    assert_clean(&agent, &img);
}

/// A rootfs type this agent does not know (what an agent older than `block`/`image` sees) is
/// refused as `bad_request` naming it, and the connection stays usable.
#[test]
fn unknown_rootfs_types_are_refused_by_name() {
    let Some((_, _agent, mut c)) = setup("unknown_rootfs_types") else {
        return;
    };
    c.send_raw(
        &protocol::Frame::new(
            protocol::FrameKind::Request,
            7,
            br#"{"op":"create","id":"u","spec":{"ociVersion":"1.0.2"},"rootfs":{"type":"nbd","export":"x"}}"#
                .to_vec(),
        )
        .to_bytes(),
    )
    .unwrap();
    match c.response(7, Duration::from_secs(5)).unwrap() {
        Response::Error(e) => {
            assert_eq!(e.code, ErrorCode::BadRequest);
            assert!(e.message.contains("unknown variant `nbd`"), "{}", e.message);
        }
        r => panic!("{r:?}"),
    }
    assert!(matches!(
        c.call(&Request::Ping).unwrap(),
        Response::Pong { ready: true, .. }
    ));
}
