//! Issue 23: `recache cache save|restore|list|delete`, a CI job's directories cached by key,
//! against every backend recache speaks: the embedded default, `file://`, `recache serve`,
//! BuildGrid, buildbox-casd, and `recache serve` on S3 (SeaweedFS). Under `CI=true` a
//! backend that cannot be reached fails its test.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, UNIX_EPOCH};

use testutil::real_servers::{RealServer, ServerKind};

/// Runs `recache cache ARGS` in `ws` with `home` as HOME and `cache` as the cache directory.
fn cache_cmd(ws: &Path, home: &Path, cache: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_recache"))
        .current_dir(ws)
        .env("HOME", home)
        .env("RECACHE_CACHE_DIR", cache)
        .env_remove("RECACHE_REMOTE")
        .arg("cache")
        .args(args)
        .output()
        .unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn json(o: &Output) -> serde_json::Value {
    serde_json::from_slice(&o.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {:?} / {}", o.stdout, stderr(o)))
}

/// A job's directories: `target/` (nested files, an executable, a 3 MB file, a symlink inside,
/// an empty directory), `~/.cargo/registry/cache/x.crate` under HOME, with set mtimes.
fn make_job(ws: &Path, home: &Path, salt: &str) {
    let t = ws.join("target");
    std::fs::create_dir_all(t.join("debug/deps")).unwrap();
    std::fs::create_dir_all(t.join("debug/incremental/empty")).unwrap();
    std::fs::write(t.join("debug/deps/libfoo.rlib"), format!("rlib {salt}")).unwrap();
    let mut big: Vec<u8> = (0..3_000_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect();
    // Unique per test run, so no server holds it from an earlier run.
    big[..salt.len()].copy_from_slice(salt.as_bytes());
    std::fs::write(t.join("debug/deps/big.so"), big).unwrap();
    std::fs::write(t.join("debug/app"), b"#!/bin/sh\necho app\n").unwrap();
    std::fs::set_permissions(t.join("debug/app"), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::os::unix::fs::symlink("deps/libfoo.rlib", t.join("debug/libfoo.rlib")).unwrap();
    std::fs::create_dir_all(home.join(".cargo/registry/cache")).unwrap();
    std::fs::write(home.join(".cargo/registry/cache/x.crate"), b"crate bytes").unwrap();
    // Distinct, old times on every file and directory.
    for (i, rel) in [
        "target/debug/deps/libfoo.rlib",
        "target/debug/deps/big.so",
        "target/debug/app",
        "target/debug/incremental/empty",
        "target/debug/incremental",
        "target/debug/deps",
        "target/debug",
    ]
    .iter()
    .enumerate()
    {
        set_mtime(&ws.join(rel), 1_500_000_000 + i as u64 * 777);
    }
    set_mtime(&home.join(".cargo/registry/cache/x.crate"), 1_400_000_000);
}

fn set_mtime(p: &Path, secs: u64) {
    std::fs::File::open(p)
        .unwrap()
        .set_modified(UNIX_EPOCH + Duration::new(secs, 250_000_000))
        .unwrap();
}

/// Everything a restore must reproduce under `root`: per path, its kind, exec bit, content or
/// target, and modification time (files and directories; the top directory's own time is left
/// out, as adding the saved path changes it).
fn snapshot(root: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let p = root.join(&rel);
        let meta = std::fs::symlink_metadata(&p).unwrap();
        let mtime = format!("{}.{:09}", meta.mtime(), meta.mtime_nsec());
        if meta.file_type().is_symlink() {
            out.push(format!(
                "{} -> {}",
                rel.display(),
                std::fs::read_link(&p).unwrap().display()
            ));
        } else if meta.is_dir() {
            if !rel.as_os_str().is_empty() {
                out.push(format!("{}/ {mtime}", rel.display()));
            }
            for e in std::fs::read_dir(&p).unwrap() {
                stack.push(rel.join(e.unwrap().file_name()));
            }
        } else {
            let exec = meta.permissions().mode() & 0o111 != 0;
            let sum = hashing::Digest::of_bytes(&std::fs::read(&p).unwrap());
            out.push(format!("{} exec={exec} {sum} {mtime}", rel.display()));
        }
    }
    out.sort();
    out
}

/// The flags that point `recache cache` at a backend.
struct Backend {
    name: &'static str,
    flags: Vec<String>,
    _server: Option<Box<dyn std::any::Any>>,
}

fn backends_ready() -> Vec<Backend> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let shared = tempfile::tempdir().unwrap();
    let mut out = vec![
        Backend {
            name: "default",
            flags: vec![],
            _server: None,
        },
        Backend {
            name: "file",
            flags: vec![
                "--remote".into(),
                format!("file://{}", shared.path().display()),
            ],
            _server: Some(Box::new(shared)),
        },
    ];
    for kind in [
        ServerKind::Recache,
        ServerKind::BuildGrid,
        ServerKind::BuildboxCasd,
    ] {
        let Some(server) = rt.block_on(RealServer::require(kind)) else {
            continue;
        };
        let mut flags = vec!["--remote".to_owned(), server.address.clone()];
        if !server.instance.is_empty() {
            flags.extend(["--instance-name".to_owned(), server.instance.clone()]);
        }
        out.push(Backend {
            name: kind.name(),
            flags,
            _server: None,
        });
    }
    let s3_dir = tempfile::tempdir().unwrap();
    let prefix = format!("jobcache-{}", uuid::Uuid::new_v4().simple());
    if let Some((child, address)) = testutil::clients::serve_on_s3(
        Path::new(env!("CARGO_BIN_EXE_recache")),
        s3_dir.path(),
        &prefix,
    ) {
        out.push(Backend {
            name: "recache serve on S3",
            flags: vec!["--remote".into(), address],
            _server: Some(Box::new((testutil::clients::Killed(child), s3_dir))),
        });
    }
    out
}

/// The round trip on every backend: byte-identical (modes, symlinks, empty directories,
/// mtimes) into a fresh machine (empty local store, nothing on disk); a second save after one
/// file changed uploads only that file; a prefix restores the newest entry.
#[test]
fn round_trip_on_every_backend() {
    for backend in backends_ready() {
        let salt = uuid::Uuid::new_v4().simple().to_string();
        let key_base = format!("job-{}-{salt}-", backend.name.replace(' ', "_"));
        let dir = tempfile::tempdir().unwrap();
        let (ws, home) = (dir.path().join("ws"), dir.path().join("home"));
        make_job(&ws, &home, &salt);
        let before = (snapshot(&ws.join("target")), snapshot(&home.join(".cargo")));
        let shared_cache = dir.path().join("c1");
        let flags: Vec<&str> = backend.flags.iter().map(String::as_str).collect();
        let with = |args: &[&str]| -> Vec<String> {
            args.iter()
                .map(|s| s.to_string())
                .chain(flags.iter().map(|s| s.to_string()))
                .collect()
        };
        let run = |cache: &Path, args: Vec<String>| {
            let refs: Vec<&str> = args.iter().map(String::as_str).collect();
            cache_cmd(&ws, &home, cache, &refs)
        };
        let k1 = format!("{key_base}v1");
        let saved = run(
            &shared_cache,
            with(&["save", "--json", &k1, "target", "~/.cargo/registry"]),
        );
        assert!(
            saved.status.success(),
            "{}: {}",
            backend.name,
            stderr(&saved)
        );
        let s = json(&saved);
        assert_eq!(s["files"], 4, "{}: {s}", backend.name);
        assert!(s["bytes_transferred"].as_u64().unwrap() >= 3_000_000, "{s}");

        // The default cache lives in the cache directory: a fresh machine there is the same
        // directory with the local store emptied. Elsewhere, a fresh cache directory.
        let fresh = |name: &str| {
            if backend.name == "default" {
                let _ = std::fs::remove_dir_all(shared_cache.join("store"));
                shared_cache.clone()
            } else {
                dir.path().join(name)
            }
        };
        let restore_cache = fresh("c2");
        std::fs::remove_dir_all(ws.join("target")).unwrap();
        std::fs::remove_dir_all(home.join(".cargo")).unwrap();
        let restored = run(&restore_cache, with(&["restore", "--json", &k1]));
        assert!(
            restored.status.success(),
            "{}: {}",
            backend.name,
            stderr(&restored)
        );
        let r = json(&restored);
        assert_eq!(r["matched"], "exact", "{}: {r}", backend.name);
        assert!(r["bytes_transferred"].as_u64().unwrap() >= 3_000_000, "{r}");
        assert_eq!(
            (snapshot(&ws.join("target")), snapshot(&home.join(".cargo"))),
            before,
            "{}: the round trip is identical",
            backend.name
        );

        // One file changed: the next save uploads about that file only.
        std::fs::write(ws.join("target/debug/deps/libfoo.rlib"), "changed").unwrap();
        let k2 = format!("{key_base}v2");
        let again = run(
            &restore_cache,
            with(&["save", "--json", &k2, "target", "~/.cargo/registry"]),
        );
        assert!(again.status.success(), "{}", stderr(&again));
        let up = json(&again)["bytes_transferred"].as_u64().unwrap();
        assert!(
            up < 100_000,
            "{}: incremental save uploaded {up} bytes",
            backend.name
        );

        // A prefix restores the newest entry (v2), and says so.
        std::fs::remove_dir_all(ws.join("target")).unwrap();
        let by_prefix = run(
            &fresh("c3"),
            with(&[
                "restore",
                "--json",
                &format!("{key_base}v3"),
                "--restore-key",
                "no-such-prefix-",
                "--restore-key",
                &key_base,
            ]),
        );
        assert!(by_prefix.status.success(), "{}", stderr(&by_prefix));
        let p = json(&by_prefix);
        assert_eq!(p["matched"], "prefix", "{}: {p}", backend.name);
        assert_eq!(p["restored_key"], k2.as_str(), "{}: {p}", backend.name);
        assert_eq!(
            std::fs::read_to_string(ws.join("target/debug/deps/libfoo.rlib")).unwrap(),
            "changed"
        );

        // Deleted: neither the key nor the prefix restores it any more.
        let deleted = run(&restore_cache, with(&["delete", &k2]));
        assert!(deleted.status.success(), "{}", stderr(&deleted));
        let gone = run(
            &fresh("c4"),
            with(&["restore", "--json", &k2, "--restore-key", &key_base]),
        );
        assert!(gone.status.success(), "{}", stderr(&gone));
        assert_eq!(json(&gone)["matched"], "none", "{}", backend.name);
        eprintln!(
            "{}: round trip, incremental save, prefix, delete: ok",
            backend.name
        );
    }
}

/// Listing works where it can (the default and file:// caches), newest first, by prefix; a
/// REAPI server says it cannot list (a usage error, exit 125).
#[test]
fn list_shows_the_entries_newest_first() {
    let dir = tempfile::tempdir().unwrap();
    let (ws, home) = (dir.path().join("ws"), dir.path().join("home"));
    make_job(&ws, &home, "list");
    let cache = dir.path().join("c");
    for key in ["linux-a", "linux-b", "mac-a"] {
        let o = cache_cmd(&ws, &home, &cache, &["save", key, "target"]);
        assert!(o.status.success(), "{}", stderr(&o));
        std::thread::sleep(Duration::from_millis(20));
    }
    let o = cache_cmd(&ws, &home, &cache, &["list", "--json", "linux-"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let keys: Vec<String> = json(&o)
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["key"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(keys, vec!["linux-b", "linux-a"]);
    let o = cache_cmd(
        &ws,
        &home,
        &cache,
        &["list", "--remote", "grpc://127.0.0.1:1"],
    );
    assert_eq!(o.status.code(), Some(125), "{}", stderr(&o));
    assert!(stderr(&o).contains("cannot list") || stderr(&o).contains("no way to list"));
}

/// Never fails the job: a server that is down, an entry missing a blob, a full disk and a key
/// never saved are each one warning and exit 0 (1 with --strict); bad input is exit 125.
#[test]
fn cache_problems_warn_and_exit_zero() {
    let dir = tempfile::tempdir().unwrap();
    let (ws, home) = (dir.path().join("ws"), dir.path().join("home"));
    make_job(&ws, &home, "problems");
    let cache = dir.path().join("c");
    // A port nothing listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let down = format!("grpc://127.0.0.1:{port}");
    for args in [
        vec!["save", "k", "target", "--remote", &down],
        vec!["restore", "k", "--remote", &down],
        vec!["restore", "never-saved"],
    ] {
        let o = cache_cmd(&ws, &home, &cache, &args);
        assert_eq!(o.status.code(), Some(0), "{args:?}: {}", stderr(&o));
        let mut strict = args.clone();
        strict.push("--strict");
        let o = cache_cmd(&ws, &home, &cache, &strict);
        let expect = if args[1] == "never-saved" { 0 } else { 1 };
        assert_eq!(o.status.code(), Some(expect), "{strict:?}: {}", stderr(&o));
    }
    for args in [
        vec!["save", "bad key", "target"],
        vec!["save", "k", "../outside"],
        vec!["restore", "k", "--restore-key", "a/b"],
    ] {
        let o = cache_cmd(&ws, &home, &cache, &args);
        assert_eq!(o.status.code(), Some(125), "{args:?}: {}", stderr(&o));
    }

    // A blob of the entry deleted from a file:// cache: a warning, nothing half-written.
    let shared = dir.path().join("shared");
    let remote = format!("file://{}", shared.display());
    let o = cache_cmd(
        &ws,
        &home,
        &cache,
        &["save", "whole", "target", "--remote", &remote],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let big =
        hashing::Digest::of_bytes(&std::fs::read(ws.join("target/debug/deps/big.so")).unwrap());
    let mut removed = 0;
    for e in walk_files(&shared) {
        if e.file_name()
            .unwrap()
            .to_string_lossy()
            .contains(&big.hash.to_hex())
        {
            std::fs::remove_file(&e).unwrap();
            removed += 1;
        }
    }
    assert_eq!(removed, 1, "the blob's file in the shared cache");
    std::fs::write(ws.join("target/keep.txt"), "mine").unwrap();
    for strict in [false, true] {
        let mut args = vec!["restore", "whole", "--remote", &remote];
        if strict {
            args.push("--strict");
        }
        let o = cache_cmd(&ws, &home, &dir.path().join("fresh"), &args);
        assert_eq!(o.status.code(), Some(i32::from(strict)), "{}", stderr(&o));
        assert!(stderr(&o).contains("warning"), "{}", stderr(&o));
        assert_eq!(
            std::fs::read_to_string(ws.join("target/keep.txt")).unwrap(),
            "mine",
            "nothing replaced by a partial entry"
        );
    }

    // A full disk under the cache directory.
    testutil::tmpfs::with_small_tmpfs(2, |mnt| {
        let o = cache_cmd(&ws, &home, &mnt.join("c"), &["save", "full", "target"]);
        assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
        assert!(stderr(&o).contains("warning"), "{}", stderr(&o));
    });
}

fn walk_files(root: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let t = e.file_type().unwrap();
            if t.is_dir() {
                stack.push(e.path());
            } else if t.is_file() {
                out.push(e.path());
            }
        }
    }
    out
}

/// Hostile entries are refused and write nothing outside the saved places: a record naming
/// `../escape`, and a tree whose symlink points out of the saved directory. Also, a restore
/// never writes through a symlink it finds between the root and a saved path.
#[test]
fn hostile_entries_are_refused() {
    use prost::Message as _;
    use store::remote::ActionCacheProvider as _;
    use store::remote::ByteStoreProvider as _;
    let dir = tempfile::tempdir().unwrap();
    let (ws, home) = (dir.path().join("ws"), dir.path().join("home"));
    std::fs::create_dir_all(&ws).unwrap();
    std::fs::create_dir_all(&home).unwrap();
    let shared = dir.path().join("shared");
    let remote = format!("file://{}", shared.display());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let provider = store::remote::local_dir::LocalDirProvider::open(&shared).unwrap();
    let put = |bytes: Vec<u8>| {
        let d = hashing::Digest::of_bytes(&bytes);
        rt.block_on(provider.store_bytes(d, bytes.into())).unwrap();
        d
    };
    use reapi::build::bazel::remote::execution::v2 as remexec;
    let file = put(b"payload".to_vec());
    // A directory whose symlink leaves it.
    let evil_dir = remexec::Directory {
        files: vec![remexec::FileNode {
            name: "f".into(),
            digest: Some(file.into()),
            ..Default::default()
        }],
        symlinks: vec![remexec::SymlinkNode {
            name: "out".into(),
            target: "../../../etc".into(),
            ..Default::default()
        }],
        ..Default::default()
    };
    let entry = |key: &str, paths: &[&str], top: remexec::Directory| {
        let top_d = put(top.encode_to_vec());
        let root_dir = remexec::Directory {
            directories: vec![remexec::DirectoryNode {
                name: "root".into(),
                digest: Some(top_d.into()),
            }],
            ..Default::default()
        };
        let tree = remexec::Tree {
            root: Some(root_dir),
            children: vec![top.clone()],
        };
        let tree_d = put(tree.encode_to_vec());
        let record = serde_json::json!({
            "format": 1, "key": key, "created": 1.0, "size": 7, "files": 1,
            "paths": paths, "deleted": false
        });
        let ar = remexec::ActionResult {
            output_directories: vec![remexec::OutputDirectory {
                path: "entry".into(),
                tree_digest: Some(tree_d.into()),
                ..Default::default()
            }],
            stdout_raw: serde_json::to_vec(&record).unwrap(),
            ..Default::default()
        };
        let action =
            hashing::Digest::of_bytes(format!("recache job cache v1\0entry\0{key}").as_bytes());
        rt.block_on(provider.update_action_result(action, ar))
            .unwrap();
    };
    // 1. A path with `..`.
    let holder = remexec::Directory {
        directories: vec![remexec::DirectoryNode {
            name: "x".into(),
            digest: Some(put(evil_dir.encode_to_vec()).into()),
        }],
        ..Default::default()
    };
    entry("dotdot", &["../escape"], holder.clone());
    // 2. A saved directory whose symlink escapes it.
    entry("symlink", &["x"], holder);
    for key in ["dotdot", "symlink"] {
        let o = cache_cmd(
            &ws,
            &home,
            &dir.path().join("c"),
            &["restore", key, "--remote", &remote],
        );
        assert_eq!(o.status.code(), Some(0), "{key}: {}", stderr(&o));
        assert!(stderr(&o).contains("warning"), "{key}: {}", stderr(&o));
        assert!(!dir.path().join("escape").exists(), "{key}");
        assert!(!ws.join("x").exists(), "{key}: nothing written");
    }

    // 3. A symlink between the root and a saved path is never written through.
    let outside = dir.path().join("outside");
    std::fs::create_dir_all(ws.join("a/b")).unwrap();
    std::fs::write(ws.join("a/b/f"), "saved").unwrap();
    let o = cache_cmd(
        &ws,
        &home,
        &dir.path().join("c"),
        &["save", "nested", "a/b", "--remote", &remote],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    std::fs::remove_dir_all(ws.join("a")).unwrap();
    std::fs::create_dir_all(&outside).unwrap();
    std::os::unix::fs::symlink(&outside, ws.join("a")).unwrap();
    let o = cache_cmd(
        &ws,
        &home,
        &dir.path().join("c"),
        &["restore", "nested", "--remote", &remote],
    );
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(stderr(&o).contains("symlink"), "{}", stderr(&o));
    assert!(
        !outside.join("b").exists(),
        "nothing written through the symlink"
    );
}

/// `recache cache rust`: a workspace of two crates (a binary and a library of its own) with two
/// crates.io dependencies, built; saved; then `cargo clean` and the registry removed, restored,
/// and built again: cargo compiles only the workspace's crates (no "Compiling itoa" or
/// "Compiling cfg-if"). A changed manifest then restores by the toolchain's prefix.
#[test]
fn cargo_rebuilds_only_the_workspace_after_a_restore() {
    let dir = tempfile::tempdir().unwrap();
    let (ws, home) = (dir.path().join("ws"), dir.path().join("home"));
    std::fs::create_dir_all(ws.join("app/src")).unwrap();
    std::fs::create_dir_all(ws.join("helper/src")).unwrap();
    std::fs::create_dir_all(&home).unwrap();
    std::fs::write(
        ws.join("Cargo.toml"),
        "[workspace]\nmembers = [\"app\", \"helper\"]\nresolver = \"2\"\n",
    )
    .unwrap();
    std::fs::write(
        ws.join("app/Cargo.toml"),
        "[package]\nname = \"app\"\nversion = \"0.1.0\"\nedition = \"2021\"\n\n[dependencies]\n\
         helper = { path = \"../helper\" }\nitoa = \"1\"\ncfg-if = \"1\"\n",
    )
    .unwrap();
    std::fs::write(
        ws.join("app/src/main.rs"),
        "fn main() { cfg_if::cfg_if! { if #[cfg(unix)] { let mut b = itoa::Buffer::new(); \
         println!(\"{}\", helper::twice(b.format(21).len())); } } }\n",
    )
    .unwrap();
    std::fs::write(
        ws.join("helper/Cargo.toml"),
        "[package]\nname = \"helper\"\nversion = \"0.1.0\"\nedition = \"2021\"\n",
    )
    .unwrap();
    std::fs::write(
        ws.join("helper/src/lib.rs"),
        "pub fn twice(x: usize) -> usize { x * 2 }\n",
    )
    .unwrap();
    let rustup_home = std::env::var_os("RUSTUP_HOME").unwrap_or_else(|| {
        Path::new(&std::env::var_os("HOME").unwrap())
            .join(".rustup")
            .into_os_string()
    });
    let cargo_bin = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let env = |c: &mut Command| {
        c.current_dir(&ws)
            .env("HOME", &home)
            .env("CARGO_HOME", home.join(".cargo"))
            .env("RUSTUP_HOME", &rustup_home)
            .env("CARGO_INCREMENTAL", "0")
            .env("RECACHE_CACHE_DIR", dir.path().join("cache"))
            .env_remove("CARGO_TARGET_DIR")
            .env_remove("CARGO_BUILD_TARGET_DIR")
            .env_remove("RECACHE_REMOTE");
    };
    let cargo = |args: &[&str]| {
        let mut c = Command::new(&cargo_bin);
        env(&mut c);
        let o = c.args(args).output().unwrap();
        assert!(o.status.success(), "cargo {args:?}: {}", stderr(&o));
        stderr(&o)
    };
    let recache = |args: &[&str]| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_recache"));
        env(&mut c);
        let o = c.args(["cache", "rust"]).args(args).output().unwrap();
        assert!(
            o.status.success(),
            "recache cache rust {args:?}: {}",
            stderr(&o)
        );
        o
    };
    let first = cargo(&["build"]);
    assert!(first.contains("Compiling itoa"), "{first}");
    let saved = recache(&["save", "--json"]);
    let s = json(&saved);
    assert!(s["key"].as_str().unwrap().starts_with("rust-"), "{s}");
    assert!(!s["paths"].to_string().contains("incremental"), "{s}");

    cargo(&["clean"]);
    std::fs::remove_dir_all(home.join(".cargo/registry")).unwrap();
    let restored = json(&recache(&["restore", "--json"]));
    assert_eq!(restored["matched"], "exact", "{restored}");
    let again = cargo(&["build"]);
    let compiled: Vec<&str> = again
        .lines()
        .filter(|l| l.trim_start().starts_with("Compiling"))
        .collect();
    assert!(
        compiled
            .iter()
            .all(|l| l.contains("app") || l.contains("helper")),
        "only the workspace's crates are compiled after a restore:\n{again}"
    );
    assert!(compiled.iter().any(|l| l.contains("helper")), "{again}");

    // A changed manifest: the same toolchain's newest entry restores, by prefix.
    cargo(&["clean"]);
    let mut manifest = std::fs::read_to_string(ws.join("app/Cargo.toml")).unwrap();
    manifest.push_str("# changed\n");
    std::fs::write(ws.join("app/Cargo.toml"), manifest).unwrap();
    let fallback = json(&recache(&["restore", "--json"]));
    assert_eq!(fallback["matched"], "prefix", "{fallback}");
    let third = cargo(&["build"]);
    assert!(!third.contains("Compiling itoa"), "{third}");
}

/// A save skips reading files whose size, times and inode it saw before; a file rewritten with
/// the same size and its old modification time (as `touch -r` or a build tool might) still
/// changes its status time, so the next save reads it and the restore has the new content.
#[test]
fn a_file_rewritten_with_the_same_size_and_time_is_saved_anew() {
    let dir = tempfile::tempdir().unwrap();
    let (ws, home) = (dir.path().join("ws"), dir.path().join("home"));
    make_job(&ws, &home, "stamps");
    let cache = dir.path().join("c");
    let f = ws.join("target/debug/deps/libfoo.rlib");
    let before = std::fs::metadata(&f).unwrap().modified().unwrap();
    let o = cache_cmd(&ws, &home, &cache, &["save", "s1", "target"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let old = std::fs::read(&f).unwrap();
    let mut new = old.clone();
    new[0] ^= 0xff;
    std::fs::write(&f, &new).unwrap();
    std::fs::File::open(&f)
        .unwrap()
        .set_modified(before)
        .unwrap();
    let o = cache_cmd(&ws, &home, &cache, &["save", "s2", "target"]);
    assert!(o.status.success(), "{}", stderr(&o));
    std::fs::remove_dir_all(ws.join("target")).unwrap();
    let o = cache_cmd(&ws, &home, &cache, &["restore", "s2"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(std::fs::read(&f).unwrap(), new);
    assert_eq!(std::fs::metadata(&f).unwrap().modified().unwrap(), before);
}
