//! The cache against real trees and the real `mkfs.erofs` (skipped loudly when missing).

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;

use super::*;

fn have_mkfs(test: &str) -> bool {
    let cache_dir = tempfile::tempdir().unwrap();
    let ok = ImageCache::new(cache_dir.path())
        .unwrap()
        .find_mkfs()
        .is_ok();
    if !ok {
        println!("SKIPPED: {test}: mkfs.erofs missing (apt-get install erofs-utils)");
    }
    ok
}

/// A small rootfs: files, a nested directory, a symlink to a file outside it.
fn tree(outside: &Path) -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    let r = d.path();
    std::fs::create_dir_all(r.join("bin")).unwrap();
    std::fs::create_dir_all(r.join("etc/deep")).unwrap();
    std::fs::write(r.join("bin/tool"), b"#!/bin/sh\necho hi\n").unwrap();
    std::fs::set_permissions(r.join("bin/tool"), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::write(r.join("etc/deep/conf"), b"a=1\n").unwrap();
    std::fs::write(outside, b"secret outside the rootfs").unwrap();
    std::os::unix::fs::symlink(outside, r.join("etc/escape")).unwrap();
    std::os::unix::fs::symlink("tool", r.join("bin/alias")).unwrap();
    d
}

fn erofs_magic(p: &Path) -> bool {
    let b = std::fs::read(p).unwrap();
    b.len() > 1028 && b[1024..1028] == 0xE0F5_E1E2u32.to_le_bytes()
}

fn leftovers(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".tmp-"))
        .collect()
}

#[test]
fn cold_build_then_hit_and_layer_keys() {
    if !have_mkfs("cold_build_then_hit") {
        return;
    }
    let cache_dir = tempfile::tempdir().unwrap();
    let outside = cache_dir.path().join("outside");
    let root = tree(&outside);
    let cache = ImageCache::new(cache_dir.path().join("images")).unwrap();
    assert!(cache.mkfs_version().unwrap().contains("mkfs.erofs"));
    let cold = cache.erofs_for(root.path(), None).unwrap();
    assert!(cold.built);
    assert_eq!(cold.path, cache.dir().join(format!("{}.erofs", cold.key)));
    assert_eq!(cold.size, std::fs::metadata(&cold.path).unwrap().len());
    assert!(erofs_magic(&cold.path));
    let hit = cache.erofs_for(root.path(), None).unwrap();
    assert_eq!(
        hit,
        Image {
            built: false,
            ..cold.clone()
        }
    );
    // Layer digests key the image instead of the tree.
    let l = cache
        .erofs_for(root.path(), Some("sha256:aa,sha256:bb"))
        .unwrap();
    assert!(l.built && l.key != cold.key);
    let l2 = cache
        .erofs_for(root.path(), Some("sha256:aa,sha256:bb"))
        .unwrap();
    assert!(!l2.built && l2.key == l.key);
    assert!(matches!(
        cache.erofs_for(root.path(), Some(" ")),
        Err(ImageError::EmptyKey)
    ));
    assert!(leftovers(cache.dir()).is_empty());
}

/// The key moves with content, mode, mtime and symlink targets; walking never follows links.
#[test]
fn tree_key_tracks_changes_and_does_not_follow_symlinks() {
    let d = tempfile::tempdir().unwrap();
    let outside = d.path().join("outside");
    let root = tree(&outside);
    let cache = ImageCache::new(d.path().join("images")).unwrap();
    let k0 = cache.tree_key(root.path()).unwrap();
    assert_eq!(k0, cache.tree_key(root.path()).unwrap(), "deterministic");
    // Content outside the rootfs, behind a symlink, does not matter: the link is not followed.
    std::fs::write(&outside, b"changed outside").unwrap();
    assert_eq!(k0, cache.tree_key(root.path()).unwrap());
    // Same size, same mtime, different content.
    let conf = root.path().join("etc/deep/conf");
    let mtime = std::fs::metadata(&conf).unwrap().modified().unwrap();
    std::fs::write(&conf, b"a=2\n").unwrap();
    File::options()
        .write(true)
        .open(&conf)
        .unwrap()
        .set_modified(mtime)
        .unwrap();
    let k1 = cache.tree_key(root.path()).unwrap();
    assert_ne!(k0, k1);
    std::fs::set_permissions(&conf, std::fs::Permissions::from_mode(0o600)).unwrap();
    let k2 = cache.tree_key(root.path()).unwrap();
    assert_ne!(k1, k2);
    std::fs::remove_file(root.path().join("bin/alias")).unwrap();
    std::os::unix::fs::symlink("other", root.path().join("bin/alias")).unwrap();
    assert_ne!(k2, cache.tree_key(root.path()).unwrap());
}

/// Symlinks are stored as symlinks in the image: the escaping link's target file is not in it.
#[test]
fn symlinks_are_stored_not_followed() {
    if !have_mkfs("symlinks_are_stored") {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let outside = d.path().join("outside");
    let root = tree(&outside);
    let cache = ImageCache::new(d.path().join("images")).unwrap();
    let img = cache.erofs_for(root.path(), None).unwrap();
    let bytes = std::fs::read(&img.path).unwrap();
    let has = |needle: &[u8]| bytes.windows(needle.len()).any(|w| w == needle);
    assert!(has(outside.as_os_str().as_bytes()), "link target stored");
    assert!(!has(b"secret outside the rootfs"), "link followed");
    assert!(has(b"echo hi"));
}

#[test]
fn changed_file_builds_a_new_image() {
    if !have_mkfs("changed_file") {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let root = tree(&d.path().join("outside"));
    let cache = ImageCache::new(d.path().join("images")).unwrap();
    let a = cache.erofs_for(root.path(), None).unwrap();
    std::fs::write(root.path().join("etc/deep/conf"), b"a=22\n").unwrap();
    let b = cache.erofs_for(root.path(), None).unwrap();
    assert!(a.built && b.built && a.key != b.key && a.path.exists() && b.path.exists());
}

#[test]
fn concurrent_builders_of_one_key_agree() {
    if !have_mkfs("concurrent_builders") {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let root = Arc::new(tree(&d.path().join("outside")));
    let cache = Arc::new(ImageCache::new(d.path().join("images")).unwrap());
    let threads: Vec<_> = (0..6)
        .map(|_| {
            let (cache, root) = (cache.clone(), root.clone());
            std::thread::spawn(move || cache.erofs_for(root.path(), None).unwrap())
        })
        .collect();
    let imgs: Vec<Image> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    assert!(imgs
        .iter()
        .all(|i| i.path == imgs[0].path && i.key == imgs[0].key));
    assert!(erofs_magic(&imgs[0].path));
    assert!(leftovers(cache.dir()).is_empty());
    let names: Vec<_> = std::fs::read_dir(cache.dir()).unwrap().flatten().collect();
    assert_eq!(names.len(), 1);
}

#[test]
fn missing_mkfs_is_a_clear_error() {
    let d = tempfile::tempdir().unwrap();
    let root = tree(&d.path().join("outside"));
    let cache = ImageCache::new(d.path().join("images"))
        .unwrap()
        .with_search_path(d.path().join("empty-bin"));
    let e = cache.erofs_for(root.path(), None).unwrap_err();
    assert!(matches!(e, ImageError::MkfsMissing { .. }), "{e}");
    assert!(matches!(
        cache.mkfs_version(),
        Err(ImageError::MkfsMissing { .. })
    ));
    assert!(e.to_string().contains("install erofs-utils"), "{e}");
    assert!(leftovers(cache.dir()).is_empty());
}

#[test]
fn symlinked_cache_entries_and_roots_are_refused() {
    let d = tempfile::tempdir().unwrap();
    let root = tree(&d.path().join("outside"));
    let cache = ImageCache::new(d.path().join("images")).unwrap();
    let key = cache.tree_key(root.path()).unwrap();
    let target = d.path().join("elsewhere.erofs");
    std::fs::write(&target, b"not an image").unwrap();
    std::os::unix::fs::symlink(&target, cache.dir().join(format!("{key}.erofs"))).unwrap();
    let e = cache.erofs_for(root.path(), None).unwrap_err().to_string();
    assert!(e.contains("is a symbolic link"), "{e}");
    let link = d.path().join("rootlink");
    std::os::unix::fs::symlink(root.path(), &link).unwrap();
    let e = cache.erofs_for(&link, None).unwrap_err().to_string();
    assert!(e.contains("expected a directory"), "{e}");
    let cache_link = d.path().join("cachelink");
    std::os::unix::fs::symlink(cache.dir(), &cache_link).unwrap();
    assert!(ImageCache::new(&cache_link).is_err());
}

#[test]
fn walk_bounds_are_enforced() {
    let d = tempfile::tempdir().unwrap();
    let root = tree(&d.path().join("outside"));
    let cache = ImageCache::new(d.path().join("images")).unwrap();
    let e = cache
        .clone()
        .with_limits(3, 64)
        .tree_key(root.path())
        .unwrap_err();
    assert!(
        matches!(e, ImageError::TooManyEntries { max: 3, .. }),
        "{e}"
    );
    let e = cache
        .with_limits(1000, 1)
        .tree_key(root.path())
        .unwrap_err();
    assert!(matches!(e, ImageError::TooDeep { max: 1, .. }), "{e}");
    assert!(e.to_string().contains("etc/deep"), "{e}");
}

/// A temporary image a dead builder left is removed when a cache opens; a fresh one is not.
#[test]
fn stale_temporaries_are_removed() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().join("images");
    std::fs::create_dir(&dir).unwrap();
    let stale = dir.join(".tmp-abc-1-0");
    let fresh = dir.join(".tmp-abc-2-0");
    std::fs::write(&stale, b"partial").unwrap();
    std::fs::write(&fresh, b"partial").unwrap();
    let two_hours = std::time::SystemTime::now() - std::time::Duration::from_secs(7200);
    File::options()
        .write(true)
        .open(&stale)
        .unwrap()
        .set_modified(two_hours)
        .unwrap();
    ImageCache::new(&dir).unwrap();
    assert!(!stale.exists() && fresh.exists());
}
