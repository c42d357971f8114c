//! Capturing directories into the store and materializing them back, and refusing unsafe
//! Directory messages.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use hashing::Digest;
use reapi::build::bazel::remote::execution::v2 as remexec;
use store::directory::{TreeEntry, symlink_resolves_inside, validate_directory};
use store::{ErrorKind, LocalStore, LocalStoreOptions, MaterializeOptions};

fn open(dir: &Path) -> LocalStore {
    LocalStore::open(LocalStoreOptions::new(dir)).unwrap()
}

fn pseudo(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

/// src/
///   README            small file
///   bin/tool          executable
///   data/big.bin      5 MiB
///   data/nested/deep/leaf.txt
///   data/nested/empty/   (empty dir)
///   link_to_readme -> README
///   data/nested/up -> ../../README   (inside the root)
fn make_tree(root: &Path) {
    std::fs::create_dir_all(root.join("bin")).unwrap();
    std::fs::create_dir_all(root.join("data/nested/deep")).unwrap();
    std::fs::create_dir_all(root.join("data/nested/empty")).unwrap();
    std::fs::write(root.join("README"), b"read me\n").unwrap();
    std::fs::write(root.join("bin/tool"), b"#!/bin/sh\necho hi\n").unwrap();
    std::fs::set_permissions(
        root.join("bin/tool"),
        std::fs::Permissions::from_mode(0o755),
    )
    .unwrap();
    std::fs::write(root.join("data/big.bin"), pseudo(5 * 1024 * 1024, 7)).unwrap();
    std::fs::write(root.join("data/nested/deep/leaf.txt"), b"leaf").unwrap();
    std::os::unix::fs::symlink("README", root.join("link_to_readme")).unwrap();
    std::os::unix::fs::symlink("../../README", root.join("data/nested/up")).unwrap();
}

#[test]
fn capture_then_materialize_round_trips() {
    let store_dir = tempfile::tempdir().unwrap();
    let work = tempfile::tempdir().unwrap();
    let store = open(store_dir.path());
    let src = work.path().join("src");
    make_tree(&src);

    let digest = store.capture_directory(&src).unwrap();
    // Capturing the same content again yields the same digest (content addressing).
    assert_eq!(store.capture_directory(&src).unwrap(), digest);

    let out = work.path().join("out");
    store
        .materialize_directory(digest, &out, MaterializeOptions::default())
        .unwrap();

    assert_eq!(std::fs::read(out.join("README")).unwrap(), b"read me\n");
    assert_eq!(
        std::fs::read(out.join("data/nested/deep/leaf.txt")).unwrap(),
        b"leaf"
    );
    assert!(out.join("data/nested/empty").is_dir());
    let tool_mode = std::fs::metadata(out.join("bin/tool"))
        .unwrap()
        .permissions()
        .mode();
    assert!(tool_mode & 0o111 != 0, "executable bit kept: {tool_mode:o}");
    let readme_mode = std::fs::metadata(out.join("README"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(readme_mode & 0o111, 0);

    // Symlinks stay symlinks, with their targets.
    assert_eq!(
        std::fs::read_link(out.join("link_to_readme")).unwrap(),
        Path::new("README")
    );
    assert_eq!(
        std::fs::read_link(out.join("data/nested/up")).unwrap(),
        Path::new("../../README")
    );

    // The 5 MiB file is a read-only hardlink of the pool file: no copy.
    let big = out.join("data/big.bin");
    assert_eq!(std::fs::read(&big).unwrap(), pseudo(5 * 1024 * 1024, 7));
    let big_digest = Digest::of_bytes(&pseudo(5 * 1024 * 1024, 7));
    let pool = store.load_file(big_digest).unwrap().unwrap();
    assert_eq!(
        std::fs::metadata(&big).unwrap().ino(),
        std::fs::metadata(&pool).unwrap().ino()
    );
    assert!(std::fs::metadata(&big).unwrap().permissions().readonly());

    // Capturing the materialized copy gives the same digest again.
    assert_eq!(store.capture_directory(&out).unwrap(), digest);
}

#[test]
fn mutable_materialization_copies_and_is_writable() {
    let store_dir = tempfile::tempdir().unwrap();
    let work = tempfile::tempdir().unwrap();
    let store = open(store_dir.path());
    let src = work.path().join("src");
    make_tree(&src);
    let digest = store.capture_directory(&src).unwrap();
    let out = work.path().join("out");
    store
        .materialize_directory(
            digest,
            &out,
            MaterializeOptions {
                mutable: true,
                ..Default::default()
            },
        )
        .unwrap();
    let big = out.join("data/big.bin");
    let pool = store
        .load_file(Digest::of_bytes(&pseudo(5 * 1024 * 1024, 7)))
        .unwrap()
        .unwrap();
    assert_ne!(
        std::fs::metadata(&big).unwrap().ino(),
        std::fs::metadata(&pool).unwrap().ino()
    );
    // Writing the copy does not touch the store.
    std::fs::write(&big, b"changed").unwrap();
    assert_eq!(std::fs::metadata(&pool).unwrap().len(), 5 * 1024 * 1024);
}

#[test]
fn tree_round_trip() {
    let store_dir = tempfile::tempdir().unwrap();
    let work = tempfile::tempdir().unwrap();
    let store = open(store_dir.path());
    make_tree(&work.path().join("src"));
    let digest = store.capture_directory(&work.path().join("src")).unwrap();
    let tree = store.build_tree(digest).unwrap();
    // root, bin, data, data/nested, nested/deep, nested/empty
    assert_eq!(tree.children.len(), 5);

    // Into a fresh store: expanding the Tree restores every Directory.
    let other_dir = tempfile::tempdir().unwrap();
    let other = open(other_dir.path());
    assert_eq!(other.expand_tree(&tree).unwrap(), digest);
    let files = other.file_digests(digest).unwrap();
    assert_eq!(files.len(), 4);
    assert!(files.contains(&Digest::of_bytes(b"leaf")));

    // A Tree missing a child is refused and stores nothing.
    let mut broken = tree.clone();
    broken.children.pop();
    let third_dir = tempfile::tempdir().unwrap();
    let third = open(third_dir.path());
    let err = third.expand_tree(&broken).unwrap_err();
    assert_eq!(err.kind(), &ErrorKind::InvalidData);
    assert!(err.to_string().contains("incomplete"), "{err}");
    assert_eq!(third.usage().total_blobs(), 0);
}

fn file(name: &str) -> remexec::FileNode {
    remexec::FileNode {
        name: name.into(),
        digest: Some(Digest::of_bytes(name.as_bytes()).into()),
        ..Default::default()
    }
}

#[test]
fn unsafe_names_are_rejected() {
    for bad in ["", ".", "..", "a/b", "/etc", "nul\0byte"] {
        let dir = remexec::Directory {
            files: vec![file(bad)],
            ..Default::default()
        };
        let err = validate_directory(&dir).unwrap_err();
        assert_eq!(err.kind(), &ErrorKind::InvalidData);
        assert!(
            err.to_string().contains("invalid entry name"),
            "{bad:?}: {err}"
        );
    }
    // Unsorted.
    let dir = remexec::Directory {
        files: vec![file("b"), file("a")],
        ..Default::default()
    };
    assert!(
        validate_directory(&dir)
            .unwrap_err()
            .to_string()
            .contains("not sorted")
    );
    // Duplicate within a list.
    let dir = remexec::Directory {
        files: vec![file("a"), file("a")],
        ..Default::default()
    };
    assert!(validate_directory(&dir).is_err());
    // Duplicate across lists (a file and a directory of the same name).
    let dir = remexec::Directory {
        files: vec![file("a")],
        directories: vec![remexec::DirectoryNode {
            name: "a".into(),
            digest: Some(hashing::EMPTY_DIGEST.into()),
        }],
        ..Default::default()
    };
    assert!(
        validate_directory(&dir)
            .unwrap_err()
            .to_string()
            .contains("duplicate")
    );
    // Bad digest.
    let dir = remexec::Directory {
        files: vec![remexec::FileNode {
            name: "x".into(),
            digest: Some(remexec::Digest {
                hash: "zz".into(),
                size_bytes: 1,
            }),
            ..Default::default()
        }],
        ..Default::default()
    };
    assert!(
        validate_directory(&dir)
            .unwrap_err()
            .to_string()
            .contains("files[x].digest")
    );

    // The store refuses to store or materialize such a directory, and writes nothing.
    let store_dir = tempfile::tempdir().unwrap();
    let store = open(store_dir.path());
    let evil = remexec::Directory {
        files: vec![file("..")],
        ..Default::default()
    };
    assert!(store.store_directory(&evil).is_err());
    let raw = store
        .store_bytes(&prost::Message::encode_to_vec(&evil))
        .unwrap();
    let out = tempfile::tempdir().unwrap();
    let err = store
        .materialize_directory(raw, &out.path().join("o"), MaterializeOptions::default())
        .unwrap_err();
    assert_eq!(err.kind(), &ErrorKind::InvalidData);
    assert!(!out.path().join("o").exists(), "nothing written");
}

#[test]
fn escaping_symlinks_are_refused_before_writing() {
    let nothing = |_: &Path| TreeEntry::Absent;
    let inside = |dir: &str, t: &str| symlink_resolves_inside(Path::new(dir), t, &nothing).is_ok();
    assert!(inside("", "a/b"));
    assert!(inside("x/y", "../../z"));
    assert!(!inside("x/y", "../../../z"));
    assert!(!inside("", "/etc/passwd"));
    assert!(!inside("", ".."));

    let store_dir = tempfile::tempdir().unwrap();
    let store = open(store_dir.path());
    let dir = remexec::Directory {
        files: vec![file("ok")],
        symlinks: vec![remexec::SymlinkNode {
            name: "escape".into(),
            target: "../../outside".into(),
            ..Default::default()
        }],
        ..Default::default()
    };
    store.store_bytes(b"ok").unwrap();
    let d = store.store_directory(&dir).unwrap();
    let out = tempfile::tempdir().unwrap();
    let dest = out.path().join("o");
    let err = store
        .materialize_directory(d, &dest, MaterializeOptions::default())
        .unwrap_err();
    assert_eq!(err.kind(), &ErrorKind::InvalidData);
    assert!(err.to_string().contains("outside"), "{err}");
    assert!(!dest.exists(), "nothing was written");
}

#[test]
fn materializing_with_a_missing_blob_names_it() {
    let store_dir = tempfile::tempdir().unwrap();
    let store = open(store_dir.path());
    let dir = remexec::Directory {
        files: vec![file("absent")],
        ..Default::default()
    };
    let d = store.store_directory(&dir).unwrap();
    let out = tempfile::tempdir().unwrap();
    let err = store
        .materialize_directory(d, &out.path().join("o"), MaterializeOptions::default())
        .unwrap_err();
    assert_eq!(
        err.missing_digest(),
        Some(Digest::of_bytes(b"absent")),
        "{err}"
    );
}

#[test]
fn capture_refuses_special_files() {
    let store_dir = tempfile::tempdir().unwrap();
    let store = open(store_dir.path());
    let src = tempfile::tempdir().unwrap();
    let sock = src.path().join("a.sock");
    let _listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    let err = store.capture_directory(src.path()).unwrap_err();
    assert!(err.to_string().contains("a.sock"), "{err}");
}

#[test]
fn directory_builder_removes_paths_from_a_stored_tree() {
    let store_dir = tempfile::tempdir().unwrap();
    let work = tempfile::tempdir().unwrap();
    let store = open(store_dir.path());
    make_tree(&work.path().join("src"));
    let full = store.capture_directory(&work.path().join("src")).unwrap();

    let mut b = store::directory::DirectoryBuilder::from_directory(&store, full);
    b.remove("data/big.bin").unwrap();
    b.remove("bin").unwrap();
    b.remove("not/there").unwrap(); // absent is fine
    let trimmed = b.build().unwrap();

    // The same as capturing a copy without those paths.
    std::fs::remove_file(work.path().join("src/data/big.bin")).unwrap();
    std::fs::remove_dir_all(work.path().join("src/bin")).unwrap();
    assert_eq!(
        store.capture_directory(&work.path().join("src")).unwrap(),
        trimmed
    );
    // Removing nothing leaves the digest alone.
    assert_eq!(
        store::directory::DirectoryBuilder::from_directory(&store, full)
            .build()
            .unwrap(),
        full
    );
}

/// Materializes a directory holding `links` (name -> target) under `gen/` and returns the error.
fn materialize_links(links: &[(&str, &str)]) -> Result<(), store::StoreError> {
    let store_dir = tempfile::tempdir().unwrap();
    let store = open(store_dir.path());
    let mut symlinks: Vec<remexec::SymlinkNode> = links
        .iter()
        .map(|(n, t)| remexec::SymlinkNode {
            name: (*n).into(),
            target: (*t).into(),
            ..Default::default()
        })
        .collect();
    symlinks.sort_by(|a, b| a.name.cmp(&b.name));
    let gen_dir = store
        .store_directory(&remexec::Directory {
            symlinks,
            ..Default::default()
        })
        .unwrap();
    let mut b = store::directory::DirectoryBuilder::new(&store);
    b.add_directory("gen", gen_dir).unwrap();
    let root = b.build().unwrap();
    let checked = store.check_symlinks(root);
    let out = tempfile::tempdir().unwrap();
    let dest = out.path().join("o");
    let materialized = store.materialize_directory(root, &dest, MaterializeOptions::default());
    // Both entry points apply the same rule, and a refusal writes nothing.
    assert_eq!(
        checked.is_ok(),
        materialized.is_ok(),
        "{checked:?} vs {materialized:?}"
    );
    if materialized.is_err() {
        assert!(!dest.exists(), "nothing may be written before the check");
    }
    materialized
}

#[test]
fn a_chain_of_symlinks_that_escapes_is_refused() {
    // The reported escape: `a -> .` and `b -> a/a/../..`. Textually `b` stays in gen/; resolved
    // through `a` it climbs two levels from gen/, out of the output root.
    let err = materialize_links(&[("a", "."), ("b", "a/a/../..")]).unwrap_err();
    assert_eq!(err.kind(), &ErrorKind::InvalidData);
    assert!(err.to_string().contains("gen/b"), "{err}");
    // `..` after a symlink to a deeper directory is fine as long as it stays inside.
    materialize_links(&[("a", "."), ("b", "a/a/..")]).unwrap();
    // A symlink to a symlink that leaves.
    assert!(materialize_links(&[("up", "../.."), ("via", "up")]).is_err());
    assert!(materialize_links(&[("up", ".."), ("via", "up/x")]).is_ok());
    // Loops are refused, not followed forever.
    let err = materialize_links(&[("l1", "l2"), ("l2", "l1")]).unwrap_err();
    assert!(err.to_string().contains("loop"), "{err}");
    // A self-referencing chain that only ever stays inside is fine.
    materialize_links(&[("a", "."), ("b", "a/a/a/a/c")]).unwrap();
    // An absolute target reached through a chain.
    assert!(materialize_links(&[("abs", "/etc"), ("via", "abs/passwd")]).is_err());
}

#[test]
fn symlink_resolution_follows_links_in_the_tree() {
    let tree = |p: &Path| match p.to_str() {
        Some("d") | Some("d/e") => TreeEntry::Dir,
        Some("d/up") => TreeEntry::Symlink("../..".into()),
        Some("d/e/f") => TreeEntry::File,
        Some("d/deep") => TreeEntry::Symlink("e".into()),
        _ => TreeEntry::Absent,
    };
    let check = |dir: &str, t: &str| symlink_resolves_inside(Path::new(dir), t, &tree);
    assert!(check("d", "deep/..").is_ok()); // d/e/.. = d
    assert!(check("d", "deep/../..").is_ok()); // the root itself
    assert!(check("d", "deep/../../..").is_err());
    assert!(check("", "d/up").is_err()); // d/up climbs above the root
    assert!(check("d", "e/f/../../../..").is_ok()); // walks through a file: ENOTDIR, no escape
}

/// Issue 23: a tree captured with its modification times (as cargo's freshness check needs
/// them) comes back with the same times on every file and directory, as writable copies (a
/// hardlink into the pool would share one inode's time between paths).
#[test]
fn modification_times_round_trip() {
    let tmp = tempfile::tempdir().unwrap();
    let store = open(&tmp.path().join("store"));
    let src = tmp.path().join("src");
    make_tree(&src);
    let mut times = Vec::new();
    for (i, rel) in [
        "README",
        "bin/tool",
        "data/big.bin",
        "data/nested/deep/leaf.txt",
        "data/nested/empty",
        "data/nested/deep",
        "data/nested",
        "data",
        "bin",
    ]
    .iter()
    .enumerate()
    {
        let t = std::time::UNIX_EPOCH
            + std::time::Duration::new(1_600_000_000 + i as u64 * 1000, 123_456_789);
        std::fs::File::open(src.join(rel))
            .unwrap()
            .set_modified(t)
            .unwrap();
        times.push((*rel, t));
    }
    let options = store::CaptureOptions {
        mtimes: true,
        ..Default::default()
    };
    let (root, digests) = store.capture_directory_with(&src, &options).unwrap();
    assert!(digests.contains(&root));
    let plain = store.capture_directory(&src).unwrap();
    assert_ne!(root, plain, "the times are part of the tree");
    let out = tmp.path().join("out");
    store
        .materialize_directory(
            root,
            &out,
            MaterializeOptions {
                mtimes: true,
                ..Default::default()
            },
        )
        .unwrap();
    for (rel, t) in times {
        let got = std::fs::metadata(out.join(rel))
            .unwrap()
            .modified()
            .unwrap();
        assert_eq!(got, t, "{rel}");
    }
    let big = std::fs::metadata(out.join("data/big.bin")).unwrap();
    assert_eq!(big.nlink(), 1, "a copy, not a hardlink into the pool");
    assert_eq!(
        std::fs::read(out.join("data/big.bin")).unwrap(),
        std::fs::read(src.join("data/big.bin")).unwrap()
    );
}
