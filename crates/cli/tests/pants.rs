//! Pants 2.17.1 as a client of `recache serve` (issue 22): Pants' engine is the one whose
//! remote-cache runner recache mirrors (eager fetch, validate, defer), so it must never break
//! against our server unnoticed.
//!
//! A workspace of shell_command targets (small outputs, a 2 MiB output, nested output
//! directories with an empty directory and an executable file, chained consumers) is built
//! through `recache serve` under a fresh cache namespace, then rebuilt from a fresh local store,
//! named caches and execution root in each cache-content behavior: no remote miss (`--stats-log`
//! counters; hits can vary, as Pants races a local run against the cache) and byte-identical
//! outputs. Once more with small batch and chunk limits, which force ByteStream writes.
//!
//! Pants is installed by `scripts/install-pants.sh` into `.reapi/pants`; `RECACHE_TEST_PANTS`
//! overrides the binary. Under `CI=true` a missing Pants or server fails the test.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use testutil::real_servers::{RealServer, ServerKind, in_ci};

fn pants_binary() -> Option<PathBuf> {
    let bin = std::env::var("RECACHE_TEST_PANTS")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.reapi/pants/bin/pants")
        });
    if bin.is_file() {
        return Some(bin);
    }
    let msg = format!(
        "no Pants at {}: run scripts/install-pants.sh (or set RECACHE_TEST_PANTS)",
        bin.display()
    );
    assert!(!in_ci(), "CI=true, so this is a failure, not a skip: {msg}");
    eprintln!("\n*** SKIPPED (not in CI): {msg}\n");
    None
}

/// Small outputs, one of them 2 MiB, nested directories with an empty one and an executable,
/// and consumers chained on them: 20 targets.
fn workspace(ws: &Path) {
    std::fs::create_dir_all(ws).unwrap();
    std::fs::write(
        ws.join("pants.toml"),
        "[GLOBAL]\npants_version = \"2.17.1\"\n\
         backend_packages = [\"pants.backend.shell\", \"pants.backend.experimental.adhoc\"]\n\n\
         [shell-setup]\ndependency_inference = false\n",
    )
    .unwrap();
    let mut build = String::new();
    for i in 0..12 {
        build += &format!(
            "shell_command(name=\"s{i}\", command=\"echo small-{i} > s{i}.txt; seq 1 {n} >> s{i}.txt\", \
             tools=[\"echo\", \"seq\"], output_files=[\"s{i}.txt\"])\n",
            n = 50 * (i + 1)
        );
    }
    build += "shell_command(name=\"big\", command=\"head -c 2097152 /dev/zero | tr '\\\\0' 'b' > big.bin\", \
              tools=[\"head\", \"tr\"], output_files=[\"big.bin\"])\n";
    for i in 0..3 {
        build += &format!(
            "shell_command(name=\"d{i}\", command=\"mkdir -p tree{i}/a/b tree{i}/empty && echo leaf-{i} > tree{i}/a/b/leaf.txt && \
             printf '#!/bin/sh\\\\necho run-{i}\\\\n' > tree{i}/a/run.sh && chmod +x tree{i}/a/run.sh\", \
             tools=[\"mkdir\", \"echo\", \"printf\", \"chmod\"], output_directories=[\"tree{i}\"])\n"
        );
    }
    build += "shell_command(name=\"c0\", command=\"cat s0.txt s1.txt > c0.txt\", tools=[\"cat\"], \
              execution_dependencies=[\":s0\", \":s1\"], output_files=[\"c0.txt\"])\n";
    build += "shell_command(name=\"c1\", command=\"cat c0.txt tree0/a/b/leaf.txt > c1.txt\", tools=[\"cat\"], \
              execution_dependencies=[\":c0\", \":d0\"], output_files=[\"c1.txt\"])\n";
    build += "shell_command(name=\"c2\", command=\"wc -c < big.bin > c2.txt; cat c1.txt >> c2.txt\", tools=[\"wc\", \"cat\"], \
              execution_dependencies=[\":big\", \":c1\"], output_files=[\"c2.txt\"])\n";
    build += "shell_command(name=\"c3\", command=\"mkdir -p all && cp -r tree1 all/ && cp c2.txt all/\", tools=[\"mkdir\", \"cp\"], \
              execution_dependencies=[\":d1\", \":c2\"], output_directories=[\"all\"])\n";
    std::fs::write(ws.join("BUILD"), build).unwrap();
}

/// What `export-codegen` wrote: every path under `dist/codegen` with its kind, bytes and
/// executable bit.
fn exported(ws: &Path) -> BTreeMap<String, (bool, Vec<u8>, bool)> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, (bool, Vec<u8>, bool)>) {
        for e in std::fs::read_dir(dir).unwrap().flatten() {
            let path = e.path();
            let rel = path
                .strip_prefix(root)
                .unwrap()
                .to_string_lossy()
                .into_owned();
            let meta = std::fs::symlink_metadata(&path).unwrap();
            if meta.is_dir() {
                out.insert(rel, (true, Vec::new(), false));
                walk(root, &path, out);
            } else {
                let exec = meta.permissions().mode() & 0o111 != 0;
                out.insert(rel, (false, std::fs::read(&path).unwrap(), exec));
            }
        }
    }
    let root = ws.join("dist/codegen");
    let mut out = BTreeMap::new();
    walk(&root, &root, &mut out);
    out
}

/// One `pants export-codegen ::` through `server`, with fresh local state under `state`;
/// returns the `--stats-log` counters.
fn pants(
    bin: &Path,
    ws: &Path,
    state: &Path,
    server: &RealServer,
    namespace: &str,
    extra: &[&str],
) -> BTreeMap<String, u64> {
    let _ = std::fs::remove_dir_all(ws.join("dist"));
    let out = Command::new(bin)
        .args([
            "--no-pantsd",
            "--stats-log",
            "--remote-cache-read",
            "--remote-cache-write",
        ])
        .arg(format!("--remote-store-address={}", server.address))
        .arg(format!("--process-execution-cache-namespace={namespace}"))
        .arg(format!(
            "--local-store-dir={}",
            state.join("store").display()
        ))
        .arg(format!(
            "--named-caches-dir={}",
            state.join("named").display()
        ))
        .arg(format!(
            "--local-execution-root-dir={}",
            state.join("exec").display()
        ))
        .args(extra)
        .args(["export-codegen", "::"])
        .current_dir(ws)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "pants {extra:?} failed:\n{text}");
    let counters: BTreeMap<String, u64> = text
        .lines()
        .filter_map(|l| {
            let (k, v) = l.trim().split_once(": ")?;
            Some((k.to_owned(), v.trim().parse().ok()?))
        })
        .collect();
    assert!(
        counters.contains_key("remote_cache_requests"),
        "no --stats-log counters in:\n{text}"
    );
    counters
}

#[test]
fn pants_builds_hit_recache_serve_in_every_cache_content_behavior() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let Some(server) = rt.block_on(RealServer::require(ServerKind::Recache)) else {
        return;
    };
    let Some(bin) = pants_binary() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let ws = dir.path().join("ws");
    workspace(&ws);
    for (round, extra) in [
        (0, &[][..]),
        // Small batch and chunk limits force ByteStream writes of most blobs.
        (
            1,
            &[
                "--remote-store-batch-api-size-limit=1024",
                "--remote-store-chunk-bytes=65536",
            ][..],
        ),
    ] {
        let namespace = format!("recache-pants-{}", uuid::Uuid::new_v4().simple());
        let first = pants(
            &bin,
            &ws,
            &dir.path().join(format!("state-{round}")),
            &server,
            &namespace,
            extra,
        );
        assert_eq!(first["remote_cache_write_errors"], 0, "{first:?}");
        assert!(first["remote_cache_write_successes"] >= 20, "{first:?}");
        let expected = exported(&ws);
        assert!(
            expected
                .get("big.bin")
                .is_some_and(|(_, b, _)| b.len() == 2 << 20)
        );
        assert!(
            expected.get("tree0/empty").is_some_and(|(dir, _, _)| *dir),
            "{:?}",
            expected.keys()
        );
        assert!(
            expected
                .get("tree0/a/run.sh")
                .is_some_and(|(_, _, exec)| *exec)
        );
        let behaviors: &[&str] = if round == 0 {
            &["fetch", "validate", "defer"]
        } else {
            &["fetch"]
        };
        for behavior in behaviors {
            let state = dir.path().join(format!("state-{round}-{behavior}"));
            let flag = format!("--cache-content-behavior={behavior}");
            let mut args = extra.to_vec();
            args.push(&flag);
            let again = pants(&bin, &ws, &state, &server, &namespace, &args);
            for counter in [
                "remote_cache_requests_uncached",
                "remote_cache_read_errors",
                "remote_store_missing_digest",
            ] {
                assert_eq!(
                    again[counter], 0,
                    "{behavior} (round {round}): {counter}: {again:?}"
                );
            }
            assert_eq!(
                exported(&ws),
                expected,
                "{behavior} (round {round}): identical outputs"
            );
        }
    }
}
