//! The real `recache` binary, as a user runs it.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::path::Path;
use std::process::{Command, Output};

use testutil::real_servers::{RealServer, ServerKind};

fn recache(cwd: &Path, cache: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_recache"))
        .current_dir(cwd)
        .env_remove("RECACHE_REMOTE")
        .env("RECACHE_CACHE_DIR", cache)
        .args(args)
        .output()
        .unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// A workspace with one input file; the command upper-cases it into out.txt and a directory.
fn workspace() -> tempfile::TempDir {
    let ws = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(ws.path().join("src")).unwrap();
    std::fs::write(ws.path().join("src/in.txt"), "hello\n").unwrap();
    ws
}

const BUILD: &str = "tr a-z A-Z < src/in.txt > out.txt; mkdir -p gen; cp out.txt gen/copy.txt; \
                     echo built; echo note >&2";

fn build_args<'a>(extra: &[&'a str]) -> Vec<&'a str> {
    let mut v = extra.to_vec();
    v.extend([
        "--input", "src", "--output", "out.txt", "--output", "gen/", "--", "sh", "-c", BUILD,
    ]);
    v
}

#[test]
fn miss_then_hit_on_the_embedded_default() {
    let ws = workspace();
    let cache = tempfile::tempdir().unwrap();

    let first = recache(ws.path(), cache.path(), &build_args(&["run"]));
    assert_eq!(first.status.code(), Some(0), "{}", stderr(&first));
    assert_eq!(stdout(&first), "built\n");
    assert!(stderr(&first).contains("note\n"));
    assert!(
        stderr(&first).contains("recache: miss (fetch)"),
        "{}",
        stderr(&first)
    );
    assert!(stderr(&first).contains("cached"), "{}", stderr(&first));
    assert_eq!(
        std::fs::read_to_string(ws.path().join("out.txt")).unwrap(),
        "HELLO\n"
    );

    // Remove the outputs: the hit restores them without running the command.
    std::fs::remove_file(ws.path().join("out.txt")).unwrap();
    std::fs::remove_dir_all(ws.path().join("gen")).unwrap();
    let second = recache(ws.path(), cache.path(), &build_args(&["run"]));
    assert_eq!(second.status.code(), Some(0));
    assert!(
        stderr(&second).contains("recache: hit (fetch)"),
        "{}",
        stderr(&second)
    );
    assert_eq!(stdout(&second), "built\n", "stdout replayed from the cache");
    assert_eq!(
        std::fs::read_to_string(ws.path().join("out.txt")).unwrap(),
        "HELLO\n"
    );
    assert_eq!(
        std::fs::read_to_string(ws.path().join("gen/copy.txt")).unwrap(),
        "HELLO\n"
    );

    // Changing an input is a miss.
    std::fs::write(ws.path().join("src/in.txt"), "changed\n").unwrap();
    let third = recache(ws.path(), cache.path(), &build_args(&["run"]));
    assert!(
        stderr(&third).contains("recache: miss"),
        "{}",
        stderr(&third)
    );
    assert_eq!(
        std::fs::read_to_string(ws.path().join("out.txt")).unwrap(),
        "CHANGED\n"
    );

    // stats reports the runs; gc shrinks the local store.
    let stats = recache(ws.path(), cache.path(), &["stats"]);
    assert_eq!(stats.status.code(), Some(0));
    assert!(
        stdout(&stats).contains("runs              3 (1 hits, 2 misses"),
        "{}",
        stdout(&stats)
    );
    let gc = recache(ws.path(), cache.path(), &["gc", "--target-size", "0"]);
    assert_eq!(gc.status.code(), Some(0), "{}", stderr(&gc));
    assert!(stdout(&gc).contains("-> 0 B"), "{}", stdout(&gc));
}

#[test]
fn the_default_input_ignores_restored_outputs() {
    // No --input: the whole directory is the input, and the outputs the first run restores
    // into it must not change the key of the second.
    let ws = workspace();
    let cache = tempfile::tempdir().unwrap();
    let args = [
        "run", "--output", "out.txt", "--output", "gen/", "--", "sh", "-c", BUILD,
    ];
    let first = recache(ws.path(), cache.path(), &args);
    assert!(
        stderr(&first).contains("recache: miss"),
        "{}",
        stderr(&first)
    );
    assert!(ws.path().join("out.txt").exists());
    let second = recache(ws.path(), cache.path(), &args);
    assert!(
        stderr(&second).contains("recache: hit"),
        "{}",
        stderr(&second)
    );
    // A real input change is still a miss.
    std::fs::write(ws.path().join("src/in.txt"), "other\n").unwrap();
    let third = recache(ws.path(), cache.path(), &args);
    assert!(
        stderr(&third).contains("recache: miss"),
        "{}",
        stderr(&third)
    );
}

#[test]
fn exit_codes_pass_through_and_json_names_the_action() {
    let ws = workspace();
    let cache = tempfile::tempdir().unwrap();
    let o = recache(
        ws.path(),
        cache.path(),
        &[
            "run", "--json", "--input", "src", "--", "sh", "-c", "exit 7",
        ],
    );
    assert_eq!(o.status.code(), Some(7));
    let line = stderr(&o).lines().last().unwrap().to_owned();
    let record: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(record["exit_code"], 7);
    assert_eq!(record["cache"], "miss");
    assert_eq!(
        record["cache_written"], false,
        "failures are not cached by default"
    );
    let digest = record["action_digest"].as_str().unwrap();
    assert!(digest.len() > 65 && digest.contains('/'), "{digest}");
}

#[test]
fn bad_flags_give_clear_messages_and_a_distinct_exit_code() {
    let ws = workspace();
    let cache = tempfile::tempdir().unwrap();
    let cases: &[(&[&str], &str)] = &[
        (
            &["run", "--bogus", "--", "true"],
            "unexpected argument '--bogus'",
        ),
        (&["run", "--"], "required"),
        (
            &["run", "--cache-content-behavior", "sometimes", "--", "true"],
            "sometimes",
        ),
        (
            &[
                "run",
                "--remote",
                "http://x:1",
                "--input",
                "src",
                "--",
                "true",
            ],
            "grpc://host:port",
        ),
        (
            &[
                "run",
                "--remote",
                "file://relative",
                "--input",
                "src",
                "--",
                "true",
            ],
            "absolute path",
        ),
        (&["run", "--env", "NOEQUALS", "--", "true"], "KEY=VALUE"),
        (
            &["run", "--input", "../escape", "--", "true"],
            "--input ../escape",
        ),
        (
            &["run", "--timeout=0", "--input", "src", "--", "true"],
            "--timeout 0: must be a positive",
        ),
        (&["gc", "--target-size", "lots"], "invalid size"),
    ];
    for (args, expect) in cases {
        let o = recache(ws.path(), cache.path(), args);
        assert_eq!(o.status.code(), Some(125), "{args:?}: {}", stderr(&o));
        assert!(stderr(&o).contains(expect), "{args:?}: {}", stderr(&o));
    }
}

#[test]
fn an_unreachable_remote_degrades_to_running_locally() {
    let ws = workspace();
    let cache = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let remote = format!("grpc://127.0.0.1:{port}");
    let o = recache(
        ws.path(),
        cache.path(),
        &build_args(&["run", "--remote", &remote]),
    );
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_eq!(
        std::fs::read_to_string(ws.path().join("out.txt")).unwrap(),
        "HELLO\n"
    );
    let err = stderr(&o);
    assert!(err.contains("WARN") && err.contains(&remote), "{err}");
    assert!(err.contains("the cache failed, ran locally"), "{err}");
}

#[test]
fn miss_then_hit_against_buildgrid() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let Some(server) = rt.block_on(RealServer::require(ServerKind::BuildGrid)) else {
        return;
    };
    let ws = workspace();
    // A unique input, so a warm server does not make the first run a hit.
    std::fs::write(
        ws.path().join("src/in.txt"),
        format!("{}\n", uuid::Uuid::new_v4()),
    )
    .unwrap();
    let expected = std::fs::read_to_string(ws.path().join("src/in.txt"))
        .unwrap()
        .to_uppercase();
    let remote = [
        "run",
        "--remote",
        &server.address,
        "--instance-name",
        &server.instance,
    ];
    // Two machines: separate local caches, shared BuildGrid.
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let first = recache(ws.path(), a.path(), &build_args(&remote));
    assert_eq!(first.status.code(), Some(0), "{}", stderr(&first));
    assert!(
        stderr(&first).contains("recache: miss (fetch)"),
        "{}",
        stderr(&first)
    );
    assert!(stderr(&first).contains("cached"), "{}", stderr(&first));

    std::fs::remove_file(ws.path().join("out.txt")).unwrap();
    let second = recache(ws.path(), b.path(), &build_args(&remote));
    assert_eq!(second.status.code(), Some(0), "{}", stderr(&second));
    assert!(
        stderr(&second).contains("recache: hit (fetch)"),
        "{}",
        stderr(&second)
    );
    assert_eq!(
        std::fs::read_to_string(ws.path().join("out.txt")).unwrap(),
        expected
    );
    assert_eq!(stdout(&second), "built\n");
}
