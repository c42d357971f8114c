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
    // The cache's trouble is one warning line, naming the server.
    let warnings: Vec<&str> = err.lines().filter(|l| l.contains("warning")).collect();
    assert_eq!(warnings.len(), 1, "{err}");
    assert!(warnings[0].contains(&remote), "{err}");
    assert!(err.contains("the cache failed, ran locally"), "{err}");
}

fn miss_then_hit_against(kind: ServerKind) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let Some(server) = rt.block_on(RealServer::require(kind)) else {
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
    // Two machines: separate local caches, one shared server.
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

#[test]
fn miss_then_hit_against_buildgrid() {
    miss_then_hit_against(ServerKind::BuildGrid);
}

#[test]
fn miss_then_hit_against_recache_serve() {
    miss_then_hit_against(ServerKind::Recache);
}

/// Where the embedded default cache keeps the blob `content`.
fn default_cache_blob(cache: &Path, content: &[u8]) -> std::path::PathBuf {
    let d = hashing::Digest::of_bytes(content);
    let hex = d.hash.to_hex();
    cache
        .join("cache/cas")
        .join(&hex[..2])
        .join(format!("{hex}-{}", d.size_bytes))
}

/// The JSON record a run printed last on stderr.
fn record(o: &Output) -> serde_json::Value {
    let line = stderr(o).lines().last().unwrap().to_owned();
    serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {}", stderr(o)))
}

/// Makes the next run start from a fresh machine: no local store, no outputs in the workspace.
fn fresh_machine(ws: &Path, cache: &Path) {
    let _ = std::fs::remove_dir_all(cache.join("store"));
    let _ = std::fs::remove_file(ws.join("out.txt"));
    let _ = std::fs::remove_dir_all(ws.join("gen"));
}

#[test]
fn a_hit_whose_outputs_are_gone_or_corrupt_never_fails_the_run() {
    // gen/copy.txt is a file nested in an output directory: defer recovery used to know only
    // top-level outputs, and validate/defer exited 125 when fetching failed.
    for behavior in ["fetch", "validate", "defer"] {
        for damage in ["delete", "corrupt", "stdout"] {
            let ws = workspace();
            let cache = tempfile::tempdir().unwrap();
            let args = build_args(&["run", "--json", "--cache-content-behavior", behavior]);
            let first = recache(ws.path(), cache.path(), &args);
            assert_eq!(first.status.code(), Some(0), "{}", stderr(&first));
            let victim = if damage == "stdout" {
                default_cache_blob(cache.path(), b"built\n")
            } else {
                default_cache_blob(cache.path(), b"HELLO\n")
            };
            assert!(victim.exists(), "{}", victim.display());
            if damage == "corrupt" {
                std::fs::write(&victim, b"HELLX\n").unwrap();
            } else {
                std::fs::remove_file(&victim).unwrap();
            }
            fresh_machine(ws.path(), cache.path());
            let o = recache(ws.path(), cache.path(), &args);
            let what = format!("{behavior}/{damage}: {}", stderr(&o));
            assert_eq!(o.status.code(), Some(0), "{what}");
            assert_eq!(
                std::fs::read_to_string(ws.path().join("gen/copy.txt")).unwrap(),
                "HELLO\n",
                "{what}"
            );
            assert_eq!(stdout(&o), "built\n", "stdout is shown, never lost: {what}");
            assert_eq!(record(&o)["cache"], "miss-after-error", "{what}");
            // The local run wrote the entry back: the next fresh machine hits.
            fresh_machine(ws.path(), cache.path());
            let again = recache(ws.path(), cache.path(), &args);
            assert_eq!(
                record(&again)["cache"],
                "hit",
                "repaired: {behavior}/{damage}"
            );
        }
    }
}

#[test]
fn a_planted_symlink_chain_never_leaves_the_workspace() {
    use prost::Message;
    use reapi::build::bazel::remote::execution::v2 as remexec;
    let ws = workspace();
    let cache = tempfile::tempdir().unwrap();
    let args = build_args(&["run", "--json"]);
    let first = recache(ws.path(), cache.path(), &args);
    let action: String = record(&first)["action_digest"].as_str().unwrap().into();
    let (hash, size) = action.split_once('/').unwrap();
    // A hostile server's entry for that action: gen/ holds `a -> .` and `b -> a/a/../..`,
    // textually inside gen/, really two levels up (outside the workspace).
    let tree = remexec::Tree {
        root: Some(remexec::Directory {
            symlinks: vec![
                remexec::SymlinkNode {
                    name: "a".into(),
                    target: ".".into(),
                    node_properties: None,
                },
                remexec::SymlinkNode {
                    name: "b".into(),
                    target: "a/a/../..".into(),
                    node_properties: None,
                },
            ],
            ..Default::default()
        }),
        children: vec![],
    };
    let tree_bytes = tree.encode_to_vec();
    let tree_path = default_cache_blob(cache.path(), &tree_bytes);
    std::fs::create_dir_all(tree_path.parent().unwrap()).unwrap();
    std::fs::write(&tree_path, &tree_bytes).unwrap();
    let tree_digest = hashing::Digest::of_bytes(&tree_bytes);
    let evil = remexec::ActionResult {
        output_directories: vec![remexec::OutputDirectory {
            path: "gen".into(),
            tree_digest: Some(tree_digest.into()),
            ..Default::default()
        }],
        ..Default::default()
    };
    let ac = cache
        .path()
        .join("cache/ac")
        .join(&hash[..2])
        .join(format!("{hash}-{size}"));
    std::fs::write(&ac, evil.encode_to_vec()).unwrap();
    fresh_machine(ws.path(), cache.path());
    let o = recache(ws.path(), cache.path(), &args);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_eq!(record(&o)["cache"], "miss-after-error", "{}", stderr(&o));
    assert!(
        std::fs::symlink_metadata(ws.path().join("gen/b")).is_err(),
        "the escaping link was never created"
    );
    assert_eq!(
        std::fs::read_to_string(ws.path().join("gen/copy.txt")).unwrap(),
        "HELLO\n"
    );
}

#[test]
fn newcomer_papercuts() {
    let ws = workspace();
    let cache_in_ws = ws.path().join(".recache");
    let run = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_recache"))
            .current_dir(ws.path())
            .env_remove("RECACHE_REMOTE")
            .env("RECACHE_CACHE_DIR", &cache_in_ws)
            .args(args)
            .output()
            .unwrap()
    };
    // A cache directory inside the current directory is left out of the default input (and
    // `--input .` means the default), so the second run hits.
    let cmd = [
        "--env",
        "LDFLAGS=-Wl,-O1",
        "--read-timeout",
        "inf",
        "--speculation-delay",
        "5",
        "--output",
        "e.txt",
        "--json",
        "--",
        "sh",
        "-c",
        "echo \"$LDFLAGS\" > e.txt",
    ];
    let mut first_args = vec!["run", "--input", "."];
    first_args.extend(cmd);
    let first = run(&first_args);
    assert_eq!(first.status.code(), Some(0), "{}", stderr(&first));
    assert_eq!(record(&first)["cache"], "miss");
    // Commas in a value are part of it.
    assert_eq!(
        std::fs::read_to_string(ws.path().join("e.txt")).unwrap(),
        "-Wl,-O1\n"
    );
    let mut second_args = vec!["run"];
    second_args.extend(cmd);
    let second = run(&second_args);
    assert_eq!(record(&second)["cache"], "hit", "{}", stderr(&second));

    // Bad values are clear errors, never a panic.
    let o = run(&["run", "--read-timeout=-1", "--", "true"]);
    assert_eq!(o.status.code(), Some(125), "{}", stderr(&o));
    assert!(stderr(&o).contains("must be 0 or more"), "{}", stderr(&o));

    // RECACHE_ENV takes one K=V per line, values whole.
    let o = Command::new(env!("CARGO_BIN_EXE_recache"))
        .current_dir(ws.path())
        .env_remove("RECACHE_REMOTE")
        .env("RECACHE_CACHE_DIR", &cache_in_ws)
        .env("RECACHE_ENV", "A=1,2\nB=3")
        .args(["run", "--input", "src", "--", "sh", "-c", "echo $A $B"])
        .output()
        .unwrap();
    assert_eq!(stdout(&o), "1,2 3\n", "{}", stderr(&o));
}

#[test]
fn stats_read_running_totals() {
    let ws = workspace();
    let cache = tempfile::tempdir().unwrap();
    for _ in 0..3 {
        recache(ws.path(), cache.path(), &build_args(&["run"]));
    }
    // The per-run log may be rotated or lost; the totals stay.
    std::fs::remove_file(cache.path().join("runs.jsonl")).unwrap();
    let stats = recache(ws.path(), cache.path(), &["stats"]);
    assert!(
        stdout(&stats).contains("runs              3 (2 hits, 1 misses"),
        "{}",
        stdout(&stats)
    );
}

/// Runs `f` with an 8 MiB tmpfs mounted at a fresh directory (needs root).
fn with_small_tmpfs(f: impl FnOnce(&Path)) {
    testutil::tmpfs::with_small_tmpfs(8, f);
}

#[test]
fn a_full_cache_disk_never_fails_the_build() {
    with_small_tmpfs(|disk| {
        let cache = disk.join("cache");
        let ws = workspace();
        // A first run while there is room, then the disk fills up.
        let first = recache(ws.path(), &cache, &build_args(&["run"]));
        assert_eq!(first.status.code(), Some(0), "{}", stderr(&first));
        let filler = vec![0u8; 1024 * 1024];
        let mut f = std::fs::File::create(disk.join("filler")).unwrap();
        while std::io::Write::write_all(&mut f, &filler).is_ok() {}
        drop(f);

        for cmd in ["echo small > s.txt", "echo other > s.txt; exit 3"] {
            let o = recache(
                ws.path(),
                &cache,
                &["run", "--output", "s.txt", "--", "sh", "-c", cmd],
            );
            let expected = if cmd.contains("exit 3") { 3 } else { 0 };
            assert_eq!(o.status.code(), Some(expected), "{cmd}: {}", stderr(&o));
            assert!(
                std::fs::read_to_string(ws.path().join("s.txt"))
                    .unwrap()
                    .starts_with(if expected == 0 { "small" } else { "other" })
            );
            assert!(stderr(&o).contains("without"), "{}", stderr(&o));
        }
        // A cache directory that cannot even be created is no reason to fail either.
        let o = recache(
            ws.path(),
            &disk.join("new-cache"),
            &["run", "--", "sh", "-c", "echo fine"],
        );
        assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
        assert_eq!(stdout(&o), "fine\n");
        // Nothing partial is counted as a blob.
        std::fs::remove_file(disk.join("filler")).unwrap();
        let stats = recache(ws.path(), &cache, &["stats"]);
        assert_eq!(stats.status.code(), Some(0), "{}", stderr(&stats));
    });
}

#[test]
fn an_output_patched_through_its_hardlink_comes_back_intact() {
    // Unprivileged users get read-only hardlinks of pool files (root gets copies): run recache
    // as `nobody` when we are root, so the hardlink path is the one tested.
    let ws = workspace();
    let cache = tempfile::tempdir().unwrap();
    let root_user = Command::new("id").arg("-u").output().unwrap().stdout == b"0\n";
    let run = |args: &[&str]| {
        let mut c = if root_user {
            let mut c = Command::new("setpriv");
            c.args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
                .arg(env!("CARGO_BIN_EXE_recache"));
            c
        } else {
            Command::new(env!("CARGO_BIN_EXE_recache"))
        };
        c.current_dir(ws.path())
            .env_remove("RECACHE_REMOTE")
            .env("RECACHE_CACHE_DIR", cache.path())
            .env("HOME", cache.path())
            .args(args)
            .output()
            .unwrap()
    };
    if root_user {
        for d in [ws.path(), cache.path()] {
            let ok = Command::new("chown")
                .args(["-R", "65534:65534"])
                .arg(d)
                .status()
                .unwrap();
            assert!(ok.success());
        }
    }
    let args = [
        "run",
        "--json",
        "--input",
        "src",
        "--output",
        "big.bin",
        "--",
        "sh",
        "-c",
        "head -c 1048576 /dev/urandom > big.bin",
    ];
    let first = run(&args);
    assert_eq!(first.status.code(), Some(0), "{}", stderr(&first));
    let original = std::fs::read(ws.path().join("big.bin")).unwrap();
    let hit = run(&args);
    assert_eq!(record(&hit)["cache"], "hit", "{}", stderr(&hit));
    // The user makes the restored output writable and patches it in place.
    let patch = Command::new(if root_user { "setpriv" } else { "sh" })
        .args(if root_user {
            vec!["--reuid=65534", "--regid=65534", "--clear-groups", "--", "sh"]
        } else {
            vec![]
        })
        .args([
            "-c",
            "chmod u+w big.bin && printf PATCHED | dd of=big.bin bs=1 seek=1000 conv=notrunc 2>/dev/null",
        ])
        .current_dir(ws.path())
        .status()
        .unwrap();
    assert!(patch.success());
    assert_ne!(std::fs::read(ws.path().join("big.bin")).unwrap(), original);
    let again = run(&args);
    assert_eq!(again.status.code(), Some(0), "{}", stderr(&again));
    assert_eq!(
        std::fs::read(ws.path().join("big.bin")).unwrap(),
        original,
        "the next run restores the original bytes, not the patched ones"
    );
}

#[test]
fn runs_share_the_server_capabilities_and_report_their_phases() {
    use testutil::server::{Method, TestServer};
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let server = rt.block_on(TestServer::start());
    let remote = format!("grpc://{}", server.socket_addr());
    let ws = workspace();
    let cache = tempfile::tempdir().unwrap();
    let args = build_args(&["run", "--remote", &remote, "--json"]);
    for expect in ["miss", "hit"] {
        let o = recache(ws.path(), cache.path(), &args);
        assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
        let record: serde_json::Value =
            serde_json::from_str(stderr(&o).lines().last().unwrap()).unwrap();
        assert_eq!(record["cache"], expect, "{record}");
        // Where the time went, phase by phase, adding up to (at most) the wall time.
        let phases = record["phases_ms"].as_object().unwrap();
        let mut names: Vec<&str> = phases.keys().map(String::as_str).collect();
        names.sort();
        assert_eq!(
            names,
            [
                "capture",
                "connect",
                "flush",
                "lookup",
                "open_store",
                "restore",
                "setup"
            ]
        );
        let sum: f64 = phases.values().map(|v| v.as_f64().unwrap()).sum();
        let wall = record["wall_time_ms"].as_f64().unwrap();
        assert!(
            sum > 0.0 && sum <= wall + 0.01,
            "phases {sum} ms, wall {wall} ms"
        );
    }
    // The second process took the capabilities the first remembered: one call between them.
    assert_eq!(server.calls(Method::GetCapabilities), 1);
    // Another cache directory asks again.
    let other = tempfile::tempdir().unwrap();
    let o = recache(ws.path(), other.path(), &args);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_eq!(server.calls(Method::GetCapabilities), 2);
    drop(rt);
}

/// Issue 29 item 4: `--output ./out.txt` names `out.txt` (as `--input ./x` names `x`), and the
/// same run written either way is the same cache entry; outputs that overlap are refused
/// before the command runs (they used to fail with exit 125 after it ran).
#[test]
fn output_paths_are_normalized_and_overlaps_refused_before_running() {
    let ws = workspace();
    let cache = tempfile::tempdir().unwrap();
    let run = |out: &str, marker: &str| {
        let cmd = format!("touch {marker}; tr a-z A-Z < src/in.txt > out.txt");
        recache(
            ws.path(),
            cache.path(),
            &[
                "run", "--input", "src", "--output", out, "--", "sh", "-c", &cmd,
            ],
        )
    };
    let first = run("./out.txt", "ran-1");
    assert_eq!(first.status.code(), Some(0), "{}", stderr(&first));
    assert_eq!(
        std::fs::read_to_string(ws.path().join("out.txt")).unwrap(),
        "HELLO\n"
    );
    std::fs::remove_file(ws.path().join("out.txt")).unwrap();
    let second = run(".//out.txt", "ran-1");
    assert!(
        stderr(&second).contains("recache: hit"),
        "the same output spelled differently is the same entry: {}",
        stderr(&second)
    );
    assert_eq!(
        std::fs::read_to_string(ws.path().join("out.txt")).unwrap(),
        "HELLO\n"
    );

    for (a, b) in [("d/", "d/f"), ("x", "x/"), ("./e/", "e/sub/")] {
        let o = recache(
            ws.path(),
            cache.path(),
            &[
                "run",
                "--output",
                a,
                "--output",
                b,
                "--",
                "sh",
                "-c",
                "touch overlap-ran",
            ],
        );
        assert_eq!(o.status.code(), Some(125), "{a} {b}: {}", stderr(&o));
        assert!(stderr(&o).contains("overlap"), "{}", stderr(&o));
        assert!(!ws.path().join("overlap-ran").exists(), "the command ran");
    }
    for bad in ["/abs.txt", "../up.txt", "./"] {
        let o = recache(
            ws.path(),
            cache.path(),
            &["run", "--output", bad, "--", "sh", "-c", "touch bad-ran"],
        );
        assert_eq!(o.status.code(), Some(125), "{bad}: {}", stderr(&o));
        assert!(!ws.path().join("bad-ran").exists());
    }
}

/// Issue 29 item 3: a restore interrupted by a kill leaves its staging directory in the
/// workspace. With the default inputs (the whole current directory) it used to become an input,
/// so the next identical run was a miss. It is left out of the inputs, and removed by the next
/// run once the run that made it is gone; a live run's staging directory is left alone.
#[test]
fn a_leftover_restore_staging_directory_is_no_input_and_is_cleaned() {
    let ws = workspace();
    let cache = tempfile::tempdir().unwrap();
    let args = [
        "run",
        "--output",
        "out.txt",
        "--",
        "sh",
        "-c",
        "tr a-z A-Z < src/in.txt > out.txt",
    ];
    let first = recache(ws.path(), cache.path(), &args);
    assert_eq!(first.status.code(), Some(0), "{}", stderr(&first));

    // A dead run's leftover (a PID that has exited) and a live one's (this test's own PID).
    let mut child = Command::new("true").spawn().unwrap();
    let dead_pid = child.id();
    child.wait().unwrap();
    let dead = ws.path().join(format!(".recache-restore-{dead_pid}-x1"));
    let live = ws
        .path()
        .join(format!(".recache-restore-{}-x2", std::process::id()));
    for d in [&dead, &live] {
        std::fs::create_dir_all(d.join("o")).unwrap();
        std::fs::write(d.join("o/out.txt"), "half-restored").unwrap();
    }
    let second = recache(ws.path(), cache.path(), &args);
    assert!(
        stderr(&second).contains("recache: hit"),
        "a staging directory is not an input: {}",
        stderr(&second)
    );
    assert!(
        !dead.exists(),
        "the dead run's staging directory was removed"
    );
    assert!(
        live.exists(),
        "a live run's staging directory is left alone"
    );
}

/// `recache run` started in the background; killed if the test ends before it exits.
struct Running(std::process::Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `recache run` on `script` in the background (`{ws}` in it is the workspace's
/// absolute path: the command itself runs in a sandbox), waits until the command wrote its PID
/// to `{ws}/pid.txt`, and returns recache and the command's PID.
fn start_running(ws: &Path, cache: &Path, script: &str) -> (Running, u32) {
    let script = script.replace("{ws}", &ws.display().to_string());
    let child = Command::new(env!("CARGO_BIN_EXE_recache"))
        .current_dir(ws)
        .env_remove("RECACHE_REMOTE")
        .env("RECACHE_CACHE_DIR", cache)
        .args([
            "run", "--input", "src", "--output", "out.txt", "--", "sh", "-c", &script,
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let running = Running(child);
    let start = std::time::Instant::now();
    loop {
        if let Ok(pid) = std::fs::read_to_string(ws.join("pid.txt"))
            && let Ok(pid) = pid.trim().parse()
        {
            return (running, pid);
        }
        assert!(
            start.elapsed() < std::time::Duration::from_secs(20),
            "the command never started"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// Waits (at most 30 s: a deadline, not a timing claim) for recache to exit; its exit code.
fn exit_within(running: &mut Running) -> i32 {
    let start = std::time::Instant::now();
    loop {
        if let Some(status) = running.0.try_wait().unwrap() {
            return status.code().unwrap_or(-1);
        }
        assert!(
            start.elapsed() < std::time::Duration::from_secs(30),
            "recache did not exit"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// Issue 29 item 3: the command runs in its own process group, so a Ctrl-C (SIGINT) or a
/// SIGTERM sent to recache never reached it: recache exited 130/143 and left it running.
/// Now recache forwards the signal to the command's group (its handler runs), waits a bounded
/// grace period (a command that ignores the signal is killed after it), and exits 128 + the
/// signal; the command is gone and no sandbox or staging directory is left.
#[test]
fn signals_reach_the_command_and_nothing_is_left_running() {
    for (signal, script, code, handled) in [
        (
            "INT",
            "echo $$ > {ws}/pid.txt; trap 'echo got-int > {ws}/sig.txt; exit 3' INT; while :; do sleep 0.1; done",
            130,
            true,
        ),
        ("TERM", "echo $$ > {ws}/pid.txt; exec sleep 60", 143, false),
        // Ignores SIGTERM (inherited by `sleep`): killed once the grace period is over.
        (
            "TERM",
            "echo $$ > {ws}/pid.txt; trap '' TERM; sleep 60",
            143,
            false,
        ),
    ] {
        let ws = workspace();
        let cache = tempfile::tempdir().unwrap();
        let (mut recache_run, pid) = start_running(ws.path(), cache.path(), script);
        let sent = Command::new("kill")
            .args([&format!("-{signal}"), &recache_run.0.id().to_string()])
            .status()
            .unwrap();
        assert!(sent.success());
        assert_eq!(exit_within(&mut recache_run), code, "SIG{signal}: {script}");
        if handled {
            assert_eq!(
                std::fs::read_to_string(ws.path().join("sig.txt")).unwrap(),
                "got-int\n",
                "the command's own handler ran"
            );
        }
        let alive =
            std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| !s.contains(") Z "));
        assert!(!alive, "SIG{signal}: the command {pid} is still running");
        let sandboxes: Vec<_> = std::fs::read_dir(cache.path().join("sandboxes"))
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .collect();
        assert!(sandboxes.is_empty(), "sandboxes left: {sandboxes:?}");
        let staging: Vec<_> = std::fs::read_dir(ws.path())
            .unwrap()
            .flatten()
            .filter(|e| {
                e.file_name()
                    .to_string_lossy()
                    .starts_with(".recache-restore-")
            })
            .collect();
        assert!(staging.is_empty(), "staging left: {staging:?}");
        // No temp file of the default cache, no lease holder of the store.
        let left: Vec<_> = ["cache/tmp", "store/leases"]
            .iter()
            .flat_map(|d| {
                std::fs::read_dir(cache.path().join(d))
                    .into_iter()
                    .flatten()
            })
            .flatten()
            .map(|e| e.path())
            .filter(|p| !p.ends_with("leases/lock"))
            .collect();
        assert!(left.is_empty(), "SIG{signal}: left behind: {left:?}");
    }
}

/// Issue 29 item 3: an exit through `std::process::exit` (here exit 125: a command that cannot
/// be started) skipped the store's clean close while a write-behind task still held it, so the
/// next run reported "not closed cleanly (a crash?)" and repaired the store from a listing.
#[test]
fn an_early_exit_closes_the_store_cleanly() {
    let ws = workspace();
    let cache = tempfile::tempdir().unwrap();
    let o = recache(
        ws.path(),
        cache.path(),
        &["run", "--", "/nonexistent-command"],
    );
    assert_eq!(o.status.code(), Some(125), "{}", stderr(&o));
    assert!(stderr(&o).contains("could not start"), "{}", stderr(&o));
    let next = Command::new(env!("CARGO_BIN_EXE_recache"))
        .current_dir(ws.path())
        .env_remove("RECACHE_REMOTE")
        .env("RECACHE_CACHE_DIR", cache.path())
        .env("RECACHE_LOG", "warn")
        .args(["run", "--", "true"])
        .output()
        .unwrap();
    assert_eq!(next.status.code(), Some(0), "{}", stderr(&next));
    assert!(
        !stderr(&next).contains("not closed cleanly"),
        "{}",
        stderr(&next)
    );
}

/// Issue 29 item 4: REAPI paths are UTF-8. A file name that is not, in an output directory, made
/// the run exit 125 after the command succeeded (its outputs lost); anywhere in the workspace,
/// it made every default-input run exit 125. Now such a run is not cached, says so once naming
/// the path, and the user gets the command's result: its exit code, its stdout, its outputs as
/// it wrote them.
#[test]
fn a_file_name_that_is_not_utf8_makes_a_run_uncacheable_not_failed() {
    use std::os::unix::ffi::OsStrExt;
    let bad = std::ffi::OsStr::from_bytes(b"caf\xe9");
    let ws = workspace();
    let cache = tempfile::tempdir().unwrap();
    let args = [
        "run",
        "--input",
        "src",
        "--output",
        "d/",
        "--output",
        "link",
        "--",
        "sh",
        "-c",
        // \351 is Latin-1 é: a name (and a symlink target) that is not UTF-8.
        "mkdir -p d; echo ok > d/f; echo weird > \"d/$(printf 'caf\\351')\"; \
         ln -s \"$(printf 'caf\\351')\" link; echo printed; exit 3",
    ];
    for round in 0..2 {
        let o = recache(ws.path(), cache.path(), &args);
        assert_eq!(o.status.code(), Some(3), "round {round}: {}", stderr(&o));
        assert_eq!(stdout(&o), "printed\n", "round {round}");
        let warnings: Vec<String> = stderr(&o)
            .lines()
            .filter(|l| l.starts_with("recache: warning"))
            .map(str::to_owned)
            .collect();
        assert_eq!(warnings.len(), 1, "round {round}: {}", stderr(&o));
        assert!(warnings[0].contains("not UTF-8"), "{}", warnings[0]);
        // Names what cannot be cached (a file of d/, or the symlink `link`).
        assert!(warnings[0].contains(r#""caf\xE9""#), "{}", warnings[0]);
        assert!(
            !stderr(&o).contains("recache: hit"),
            "never cached: {}",
            stderr(&o)
        );
        assert_eq!(
            std::fs::read_to_string(ws.path().join("d/f")).unwrap(),
            "ok\n"
        );
        assert_eq!(
            std::fs::read(ws.path().join("d").join(bad)).unwrap(),
            b"weird\n"
        );
        assert_eq!(
            std::fs::read_link(ws.path().join("link"))
                .unwrap()
                .as_os_str(),
            bad
        );
    }

    // The same name in the workspace, with the whole directory as the input: the command runs
    // (without the cache), once.
    std::fs::write(ws.path().join(bad), "input").unwrap();
    let o = recache(
        ws.path(),
        cache.path(),
        &[
            "run",
            "--output",
            "out.txt",
            "--",
            "sh",
            "-c",
            "echo hi > out.txt; echo ran >> ran.log",
        ],
    );
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_eq!(
        std::fs::read_to_string(ws.path().join("out.txt")).unwrap(),
        "hi\n"
    );
    assert_eq!(
        std::fs::read_to_string(ws.path().join("ran.log")).unwrap(),
        "ran\n"
    );
    let err = stderr(&o);
    let warnings: Vec<&str> = err
        .lines()
        .filter(|l| l.starts_with("recache: warning"))
        .collect();
    assert_eq!(warnings.len(), 1, "{}", stderr(&o));
    assert!(warnings[0].contains("not UTF-8"), "{}", warnings[0]);
}

/// Issue 29 item 3: the default cache's `tmp/` kept a killed write's partial file forever (it
/// survived later runs and `gc --target-size 0`, uncounted by --max-size). A temp file no
/// writer holds (its lock went with its process) is removed by the next run or by gc.
#[test]
fn a_killed_writes_temp_file_is_removed_by_the_next_run_or_gc() {
    let ws = workspace();
    let cache = tempfile::tempdir().unwrap();
    let first = recache(ws.path(), cache.path(), &build_args(&["run"]));
    assert_eq!(first.status.code(), Some(0), "{}", stderr(&first));
    let tmp = cache.path().join("cache/tmp");
    let plant = |name: &str| {
        let p = tmp.join(name);
        let f = std::fs::File::create(&p).unwrap();
        f.set_len(3 << 20).unwrap();
        // Older than the grace a just-created file gets.
        f.set_modified(std::time::SystemTime::now() - std::time::Duration::from_secs(60))
            .unwrap();
        p
    };
    let stale = plant("4242-partial");
    let o = recache(ws.path(), cache.path(), &build_args(&["run"]));
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(!stale.exists(), "the next run removed it");
    let stale = plant("4243-partial");
    let gc = recache(ws.path(), cache.path(), &["gc", "--target-size", "0"]);
    assert_eq!(gc.status.code(), Some(0), "{}", stderr(&gc));
    assert!(!stale.exists(), "gc removed it");
    // A write in progress (its writer holds the lock) is left alone.
    let live = plant("4244-live");
    let held = std::fs::File::open(&live).unwrap();
    held.lock().unwrap();
    let gc = recache(ws.path(), cache.path(), &["gc", "--target-size", "0"]);
    assert_eq!(gc.status.code(), Some(0), "{}", stderr(&gc));
    assert!(live.exists(), "a live write's temp file stays");
}

/// The commands between `<!-- tls-recipe -->` and `<!-- /tls-recipe -->` in README.md.
fn readme_tls_recipe() -> String {
    readme_block("tls-recipe")
}

/// The shell block between `<!-- NAME -->` and `<!-- /NAME -->` in README.md.
fn readme_block(name: &str) -> String {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../README.md")).unwrap();
    let start = readme
        .find(&format!("<!-- {name} -->"))
        .unwrap_or_else(|| panic!("the README's {name} block"));
    let end = readme.find(&format!("<!-- /{name} -->")).unwrap();
    let block = &readme[start..end];
    let code = block.split("```sh").nth(1).unwrap();
    code.split("```").next().unwrap().to_owned()
}

/// Starts `recache serve` with TLS on a free port; its child and grpcs address.
fn serve_tls(dir: &Path, cert: &str, key: &str) -> (std::process::Child, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_recache"));
    cmd.args(["serve", "--listen", "127.0.0.1:0", "--cache-dir"])
        .arg(dir.join("server-cache"))
        .arg("--tls-cert")
        .arg(dir.join(cert))
        .arg("--tls-key")
        .arg(dir.join(key));
    testutil::real_servers::spawn_serve(cmd)
}

/// Issue 25 §6: TLS a newcomer gets right. The README's recipe (a small CA signing the
/// server's certificate), run as written, gives a server `recache run` hits through. The quick
/// self-signed certificate instead is refused at once, with one warning that says what to do,
/// not three retries per call.
#[test]
fn the_readme_tls_recipe_works_and_a_self_signed_ca_cert_is_explained() {
    let dir = tempfile::tempdir().unwrap();
    testutil::clients::output_of(
        Command::new("sh")
            .args(["-ec", &readme_tls_recipe()])
            .current_dir(dir.path()),
        "the README's TLS recipe",
    );
    let (mut server, address) = serve_tls(dir.path(), "server.pem", "server.key");
    let ws = workspace();
    let cache = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca.pem");
    let args = |extra: &[&str]| {
        let mut v = vec![
            "run",
            "--json",
            "--remote",
            &address,
            "--tls-ca-cert",
            ca.to_str().unwrap(),
        ];
        v.extend_from_slice(extra);
        v.iter().map(|s| s.to_string()).collect::<Vec<String>>()
    };
    for expect in ["miss", "hit"] {
        let a = args(&build_args(&[]));
        let refs: Vec<&str> = a.iter().map(String::as_str).collect();
        let o = recache(ws.path(), cache.path(), &refs);
        assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
        assert_eq!(record(&o)["cache"], expect, "{}", stderr(&o));
    }
    let _ = server.kill();
    let _ = server.wait();

    // The quick way: a self-signed certificate, which is a CA certificate.
    let quick = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=DNS:localhost,IP:127.0.0.1",
            "-keyout",
            "quick.key",
            "-out",
            "quick.pem",
        ])
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(quick.status.success());
    let (mut server, address) = serve_tls(dir.path(), "quick.pem", "quick.key");
    let o = recache(
        ws.path(),
        cache.path(),
        &[
            "run",
            "--remote",
            &address,
            "--tls-ca-cert",
            dir.path().join("quick.pem").to_str().unwrap(),
            "--",
            "sh",
            "-c",
            "echo fine",
        ],
    );
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_eq!(stdout(&o), "fine\n");
    let err = stderr(&o);
    let warnings: Vec<&str> = err
        .lines()
        .filter(|l| l.starts_with("recache: warning"))
        .collect();
    assert_eq!(warnings.len(), 1, "{err}");
    assert!(warnings[0].contains("CaUsedAsEndEntity"), "{err}");
    assert!(warnings[0].contains("create a small CA"), "{err}");
    assert!(!err.contains("gave up after"), "not retried: {err}");
    let _ = server.kill();
    let _ = server.wait();
}

/// Issue 25 §4, mutual TLS: the README's recipes make a CA, a server certificate and a CI
/// client certificate (and the same for a laptop); `cert:` lines give them roles. The CI
/// certificate writes, the laptop's reads what CI wrote and is refused writes (one warning),
/// the access log names each, and a client with no certificate is refused in the handshake:
/// its run still succeeds, uncached.
#[test]
fn client_certificates_get_the_roles_their_names_are_given() {
    let dir = tempfile::tempdir().unwrap();
    let laptop = readme_block("mtls-recipe")
        .replace("ci-runner", "laptop-7")
        .replace("ci.", "laptop.");
    let script = format!(
        "{}\n{}\n{laptop}",
        readme_tls_recipe(),
        readme_block("mtls-recipe")
    );
    testutil::clients::output_of(
        Command::new("sh")
            .args(["-ec", &script])
            .current_dir(dir.path()),
        "the README's TLS and mTLS recipes",
    );
    std::fs::write(
        dir.path().join("roles"),
        "cert:ci-runner write ci\ncert:laptop-7 read laptop\n",
    )
    .unwrap();
    let log = dir.path().join("access.jsonl");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_recache"));
    cmd.args(["serve", "--listen", "127.0.0.1:0", "--cache-dir"])
        .arg(dir.path().join("server-cache"))
        .arg("--tls-cert")
        .arg(dir.path().join("server.pem"))
        .arg("--tls-key")
        .arg(dir.path().join("server.key"))
        .arg("--tls-client-ca")
        .arg(dir.path().join("ca.pem"))
        .arg("--auth-tokens")
        .arg(dir.path().join("roles"))
        .arg("--access-log")
        .arg(&log);
    let (mut server, address) = testutil::real_servers::spawn_serve(cmd);
    let p = |f: &str| dir.path().join(f).to_str().unwrap().to_owned();
    let as_who = |cert: Option<&str>, extra: &[&str], cache: &str| {
        let mut args: Vec<String> = ["run", "--json", "--remote", &address, "--tls-ca-cert"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        args.push(p("ca.pem"));
        if let Some(c) = cert {
            args.extend([
                "--tls-client-cert".to_owned(),
                p(&format!("{c}.pem")),
                "--tls-client-key".to_owned(),
                p(&format!("{c}.key")),
            ]);
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        let ws = dir.path().join("ws");
        std::fs::create_dir_all(&ws).unwrap();
        recache(&ws, &dir.path().join(cache), &refs)
    };
    let build = ["--", "sh", "-c", "echo built-by-ci"];
    let ci = as_who(Some("ci"), &build, "c-ci");
    assert_eq!(record(&ci)["cache"], "miss", "{}", stderr(&ci));
    assert_eq!(record(&ci)["cache_written"], true, "{}", stderr(&ci));
    let hit = as_who(Some("laptop"), &build, "c-laptop");
    assert_eq!(record(&hit)["cache"], "hit", "{}", stderr(&hit));
    let own = as_who(
        Some("laptop"),
        &["--", "sh", "-c", "echo laptop-only"],
        "c-laptop",
    );
    assert_eq!(own.status.code(), Some(0), "{}", stderr(&own));
    assert_eq!(record(&own)["cache_written"], false, "{}", stderr(&own));
    assert!(
        stderr(&own).contains("needs the write role"),
        "{}",
        stderr(&own)
    );
    let nobody = as_who(None, &["--", "sh", "-c", "echo no-certificate"], "c-none");
    assert_eq!(nobody.status.code(), Some(0), "{}", stderr(&nobody));
    assert_eq!(stdout(&nobody), "no-certificate\n");
    assert_ne!(record(&nobody)["cache"], "hit", "{}", stderr(&nobody));
    let _ = server.kill();
    let _ = server.wait();
    let text = std::fs::read_to_string(&log).unwrap();
    for who in ["\"identity\":\"ci\"", "\"identity\":\"laptop\""] {
        assert!(text.contains(who), "{who} in the access log:\n{text}");
    }
}

/// Issue 25 §4, the common setup: CI writes with a write token, a developer's laptop reads with
/// a read token. The laptop hits what CI wrote; its own misses run locally and are not written:
/// the cache's PERMISSION_DENIED is one warning ("read-only"), not a failure or a retry.
#[test]
fn a_read_token_hits_what_ci_wrote_and_never_writes() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("tokens"),
        "ci-secret write ci\ndev-secret read laptop\n",
    )
    .unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_recache"));
    cmd.args(["serve", "--listen", "127.0.0.1:0", "--cache-dir"])
        .arg(dir.path().join("server"))
        .arg("--auth-tokens")
        .arg(dir.path().join("tokens"));
    let (mut server, address) = testutil::real_servers::spawn_serve(cmd);
    let as_who = |token: &str, extra: &[&str], ws: &Path, cache: &Path| {
        let header = format!("authorization=Bearer {token}");
        let mut args = vec!["run", "--json", "--remote", &address, "--header", &header];
        args.extend_from_slice(extra);
        recache(ws, cache, &args)
    };
    let ws = workspace();
    let ci = as_who(
        "ci-secret",
        &build_args(&[]),
        ws.path(),
        &dir.path().join("ci"),
    );
    assert_eq!(record(&ci)["cache"], "miss", "{}", stderr(&ci));
    assert_eq!(record(&ci)["cache_written"], true, "{}", stderr(&ci));
    let laptop = as_who(
        "dev-secret",
        &build_args(&[]),
        ws.path(),
        &dir.path().join("dev"),
    );
    assert_eq!(record(&laptop)["cache"], "hit", "{}", stderr(&laptop));
    // A miss on the laptop: runs, is not written, one warning says why.
    let other = as_who(
        "dev-secret",
        &["--", "sh", "-c", "echo laptop-only"],
        ws.path(),
        &dir.path().join("dev"),
    );
    assert_eq!(other.status.code(), Some(0), "{}", stderr(&other));
    assert_eq!(stdout(&other), "laptop-only\n");
    assert_eq!(record(&other)["cache_written"], false);
    let err = stderr(&other);
    let warnings: Vec<&str> = err
        .lines()
        .filter(|l| l.starts_with("recache: warning"))
        .collect();
    assert_eq!(warnings.len(), 1, "{err}");
    assert!(warnings[0].contains("read-only"), "{err}");
    assert!(warnings[0].contains("needs the write role"), "{err}");
    assert!(!err.contains("gave up after"), "not retried: {err}");
    let _ = server.kill();
    let _ = server.wait();
}
