//! ccache (Debian's 4.7.x, installed by `scripts/install-apt.sh ccache`) against `recache serve
//! --http-listen`, as ccache's own documentation sets it up with bazel-remote:
//! `remote_storage = http://HOST:PORT/opaque|layout=bazel`. ccache stores its own result
//! format under `/ac/<key>`, which is not an ActionResult: recache keeps such values in the
//! opaque namespace (`/opaque/ac/`), apart from the ActionCache. Under `CI=true` a missing
//! ccache fails the test.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::path::Path;
use std::process::Command;

use testutil::real_servers::in_ci;

const SOURCES: usize = 4;

fn have_ccache() -> bool {
    let ok = Command::new("ccache")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        let msg = "no ccache on PATH: run scripts/install-apt.sh ccache";
        assert!(!in_ci(), "CI=true, so this is a failure, not a skip: {msg}");
        eprintln!("\n*** SKIPPED (not in CI): {msg}\n");
    }
    ok
}

/// Runs ccache with the test's configuration; returns stdout, failing the test if it fails.
fn ccache(dir: &Path, remote: &str, args: &[&str]) -> String {
    let out = Command::new("ccache")
        .args(args)
        .current_dir(dir.join("src"))
        .env("CCACHE_DIR", dir.join("ccache"))
        .env("CCACHE_CONFIGPATH", dir.join("ccache.conf"))
        .env("CCACHE_REMOTE_STORAGE", remote)
        .env("CCACHE_NOHASHDIR", "1")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "ccache {args:?} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A counter of `ccache --print-stats` (tab-separated name and value).
fn stat(stats: &str, name: &str) -> u64 {
    stats
        .lines()
        .find_map(|l| {
            l.strip_prefix(name)?
                .strip_prefix('\t')?
                .trim()
                .parse()
                .ok()
        })
        .unwrap_or(0)
}

fn compile_all(dir: &Path, remote: &str) {
    for i in 0..SOURCES {
        ccache(
            dir,
            remote,
            &[
                "gcc",
                "-O1",
                "-c",
                &format!("f{i}.c"),
                "-o",
                &format!("f{i}.o"),
            ],
        );
    }
}

fn objects(dir: &Path) -> Vec<Vec<u8>> {
    (0..SOURCES)
        .map(|i| std::fs::read(dir.join(format!("src/f{i}.o"))).unwrap())
        .collect()
}

#[test]
fn ccache_hits_recache_serve_over_http_after_its_local_cache_is_wiped() {
    if !have_ccache() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("src")).unwrap();
    std::fs::write(dir.path().join("ccache.conf"), "").unwrap();
    let salt = uuid::Uuid::new_v4().simple().to_string();
    for i in 0..SOURCES {
        std::fs::write(
            dir.path().join(format!("src/f{i}.c")),
            format!(
                "int f{i}(int x) {{ /* {salt} */ int s = 0; for (int k = 0; k < x; k++) s += k * {i}; return s; }}\n"
            ),
        )
        .unwrap();
    }
    let (mut child, _grpc, http) = testutil::real_servers::spawn_serve_with_http(
        Path::new(env!("CARGO_BIN_EXE_recache")),
        &dir.path().join("server"),
    );
    let remote = format!("{http}/opaque|layout=bazel");

    compile_all(dir.path(), &remote);
    let first = ccache(dir.path(), &remote, &["--print-stats"]);
    assert_eq!(stat(&first, "remote_storage_hit"), 0, "{first}");
    assert!(
        stat(&first, "remote_storage_write") > 0 || stat(&first, "cache_miss") == SOURCES as u64,
        "{first}"
    );
    let expected = objects(dir.path());

    // A fresh machine: no local cache, no objects.
    std::fs::remove_dir_all(dir.path().join("ccache")).unwrap();
    for i in 0..SOURCES {
        std::fs::remove_file(dir.path().join(format!("src/f{i}.o"))).unwrap();
    }
    compile_all(dir.path(), &remote);
    let second = ccache(dir.path(), &remote, &["--print-stats"]);
    assert_eq!(
        stat(&second, "remote_storage_hit"),
        SOURCES as u64,
        "every compilation hits the server:\n{second}"
    );
    assert_eq!(objects(dir.path()), expected, "identical object files");
    let _ = child.kill();
    let _ = child.wait();
}
