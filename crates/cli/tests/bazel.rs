//! Bazel as a client of `recache serve`: a workspace of genrules built with
//! `--remote_cache=grpc://…`, then `bazel clean`, then built again: every action must be a
//! remote cache hit with identical outputs; once more with `--remote_download_minimal`.
//!
//! Bazel 4.2.3 (Debian's `bazel-bootstrap`, installed by `scripts/install-bazel.sh`) speaks
//! REAPI 2.0 only and refuses a server whose `low_api_version` is above 2.0. Under `CI=true` a
//! missing Bazel or server fails the test.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::path::Path;
use std::process::Command;

use testutil::real_servers::{RealServer, ServerKind, in_ci};

const GENRULES: usize = 10;

fn bazel_binary() -> Option<String> {
    let bin = std::env::var("RECACHE_TEST_BAZEL").unwrap_or_else(|_| "bazel".into());
    let ok = Command::new(&bin)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if ok {
        return Some(bin);
    }
    let msg =
        format!("no Bazel at {bin:?}: run scripts/install-bazel.sh (or set RECACHE_TEST_BAZEL)");
    assert!(!in_ci(), "CI=true, so this is a failure, not a skip: {msg}");
    eprintln!("\n*** SKIPPED (not in CI): {msg}\n");
    None
}

/// Runs bazel in `ws`; returns its combined output, failing the test if the command fails.
fn bazel(bin: &str, root: &Path, ws: &Path, args: &[&str]) -> String {
    let out = Command::new(bin)
        .arg(format!("--output_user_root={}", root.display()))
        .arg("--batch")
        .args(args)
        .current_dir(ws)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "bazel {args:?} failed:\n{text}");
    text
}

fn outputs(ws: &Path) -> Vec<String> {
    (0..GENRULES)
        .map(|i| std::fs::read_to_string(ws.join(format!("bazel-bin/g{i}.txt"))).unwrap())
        .collect()
}

#[test]
fn bazel_builds_hit_recache_serve_after_a_clean() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let Some(server) = rt.block_on(RealServer::require(ServerKind::Recache)) else {
        return;
    };
    let Some(bin) = bazel_binary() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let (ws, root) = (dir.path().join("ws"), dir.path().join("bazel-root"));
    std::fs::create_dir_all(&ws).unwrap();
    std::fs::write(ws.join("WORKSPACE"), "").unwrap();
    // Unique outputs, so a warm server cannot turn the first build into hits.
    let salt = uuid::Uuid::new_v4().simple().to_string();
    let mut build = String::new();
    for i in 0..GENRULES {
        build += &format!(
            "genrule(name = \"g{i}\", outs = [\"g{i}.txt\"], cmd = \"echo {salt}-{i} > $@; seq 1 {n} >> $@\")\n",
            n = 100 * (i + 1)
        );
    }
    std::fs::write(ws.join("BUILD"), build).unwrap();
    let remote = format!("--remote_cache={}", server.address);
    let first = bazel(&bin, &root, &ws, &["build", "//:all", &remote]);
    assert!(
        first.contains(&format!("{GENRULES} linux-sandbox"))
            || first.contains(&format!("{GENRULES} processwrapper-sandbox"))
            || first.contains(&format!("{GENRULES} local")),
        "the first build runs every genrule:\n{first}"
    );
    let expected = outputs(&ws);
    assert!(expected[3].starts_with(&format!("{salt}-3\n")));

    for extra in [None, Some("--remote_download_minimal")] {
        bazel(&bin, &root, &ws, &["clean"]);
        let mut args = vec!["build", "//:all", remote.as_str()];
        args.extend(extra);
        let again = bazel(&bin, &root, &ws, &args);
        assert!(
            again.contains(&format!("{GENRULES} remote cache hit")),
            "every genrule is a remote cache hit ({extra:?}):\n{again}"
        );
        if extra.is_none() {
            assert_eq!(outputs(&ws), expected, "identical outputs from the cache");
        }
    }
    bazel(&bin, &root, &ws, &["shutdown"]);
}
