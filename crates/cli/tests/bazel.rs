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

fn bazel(bin: &str, root: &Path, ws: &Path, args: &[&str]) -> String {
    testutil::clients::bazel(bin, root, ws, args)
}

/// Writes a workspace of [`GENRULES`] genrules with unique outputs (so a warm server cannot
/// turn the first build into hits); returns the salt that makes them unique.
fn genrule_workspace(ws: &Path) -> String {
    std::fs::create_dir_all(ws).unwrap();
    std::fs::write(ws.join("WORKSPACE"), "").unwrap();
    let salt = uuid::Uuid::new_v4().simple().to_string();
    let mut build = String::new();
    for i in 0..GENRULES {
        build += &format!(
            "genrule(name = \"g{i}\", outs = [\"g{i}.txt\"], cmd = \"echo {salt}-{i} > $@; seq 1 {n} >> $@\")\n",
            n = 100 * (i + 1)
        );
    }
    std::fs::write(ws.join("BUILD"), build).unwrap();
    salt
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
    let salt = genrule_workspace(&ws);
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

/// Starts `recache serve` with the S3 tier on SeaweedFS (bucket prefix `prefix`, fast tier in
/// `cache_dir`); `None` (a loud skip) outside CI when the S3 servers are not running.
fn serve_on_s3(cache_dir: &Path, prefix: &str) -> Option<(std::process::Child, String)> {
    testutil::clients::serve_on_s3(Path::new(env!("CARGO_BIN_EXE_recache")), cache_dir, prefix)
}

/// Stops a server the way an operator does (SIGTERM) and checks it exits cleanly.
fn terminate(mut child: std::process::Child) {
    let term = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(term.success());
    assert!(
        child.wait().unwrap().success(),
        "recache serve exits 0 on SIGTERM"
    );
}

/// The genrule workspace against `recache serve` with S3 behind it: built through one server,
/// which is then stopped; `bazel clean` and a build through a second server with an empty fast
/// tier on the same bucket: every action is a remote cache hit, served from S3.
#[test]
fn bazel_hits_through_a_second_server_on_the_same_s3_bucket() {
    let Some(bin) = bazel_binary() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let prefix = format!("bazel-{}", uuid::Uuid::new_v4().simple());
    let Some((first_server, first_addr)) = serve_on_s3(&dir.path().join("server-a"), &prefix)
    else {
        return;
    };
    let (ws, root) = (dir.path().join("ws"), dir.path().join("bazel-root"));
    genrule_workspace(&ws);
    bazel(
        &bin,
        &root,
        &ws,
        &["build", "//:all", &format!("--remote_cache={first_addr}")],
    );
    let expected = outputs(&ws);
    // Stopping drains the upload queue into the bucket.
    terminate(first_server);

    let (second_server, second_addr) = serve_on_s3(&dir.path().join("server-b"), &prefix).unwrap();
    bazel(&bin, &root, &ws, &["clean"]);
    let again = bazel(
        &bin,
        &root,
        &ws,
        &["build", "//:all", &format!("--remote_cache={second_addr}")],
    );
    assert!(
        again.contains(&format!("{GENRULES} remote cache hit")),
        "every genrule is a remote cache hit through the second server:\n{again}"
    );
    assert_eq!(outputs(&ws), expected, "identical outputs from the bucket");
    bazel(&bin, &root, &ws, &["shutdown"]);
    terminate(second_server);
}

/// Bazel's remote downloader pointed at `recache serve`: an `http_file` from a local origin is
/// fetched by the server (FetchBlob with its checksum) and read from the CAS; a second build in
/// a fresh output base gets it with the origin gone.
#[test]
fn bazel_downloads_through_recache_serve_and_builds_with_the_origin_gone() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let Some(server) = rt.block_on(RealServer::require(ServerKind::Recache)) else {
        return;
    };
    let Some(bin) = bazel_binary() else {
        return;
    };
    let origin = rt.block_on(testutil::origin::Origin::start());
    let body = format!("a source archive {}\n", uuid::Uuid::new_v4()).repeat(500);
    origin.set(
        "/dl/asset.txt",
        testutil::origin::Behavior::Serve(body.clone().into_bytes()),
    );
    let d = hashing::Digest::of_bytes(body.as_bytes());
    let dir = tempfile::tempdir().unwrap();
    let ws = dir.path().join("ws");
    std::fs::create_dir_all(&ws).unwrap();
    std::fs::write(
        ws.join("WORKSPACE"),
        format!(
            "load(\"@bazel_tools//tools/build_defs/repo:http.bzl\", \"http_file\")\n\
             http_file(name = \"asset\", urls = [\"{}\"], sha256 = \"{}\", downloaded_file_path = \"asset.txt\")\n",
            origin.url("/dl/asset.txt"),
            d.hash
        ),
    )
    .unwrap();
    std::fs::write(
        ws.join("BUILD"),
        "genrule(name = \"use\", srcs = [\"@asset//file\"], outs = [\"use.txt\"], cmd = \"wc -c < $< > $@\")\n",
    )
    .unwrap();
    let flags = [
        format!("--experimental_remote_downloader={}", server.address),
        format!("--remote_cache={}", server.address),
        // No repository cache: the second build can only get the file from the server.
        "--repository_cache=".to_owned(),
    ];
    let build = |root: &Path| {
        let mut args = vec!["build", "//:use"];
        args.extend(flags.iter().map(String::as_str));
        let out = bazel(&bin, root, &ws, &args);
        let got = std::fs::read_to_string(ws.join("bazel-bin/use.txt")).unwrap();
        assert_eq!(got.trim(), body.len().to_string(), "{out}");
        bazel(&bin, root, &ws, &["shutdown"]);
    };
    build(&dir.path().join("root-1"));
    assert_eq!(
        origin.hits("/dl/asset.txt"),
        1,
        "the server downloaded it, once"
    );
    let agent = origin
        .last_headers("/dl/asset.txt")
        .into_iter()
        .find(|(k, _)| k == "user-agent")
        .map(|(_, v)| v)
        .unwrap_or_default();
    assert!(
        !agent.contains("Bazel"),
        "Bazel downloaded it itself ({agent})"
    );
    // The origin goes away; a fresh output base (and repository cache) still builds.
    origin.set("/dl/asset.txt", testutil::origin::Behavior::Status(404));
    build(&dir.path().join("root-2"));
    assert_eq!(
        origin.hits("/dl/asset.txt"),
        1,
        "nobody went back to the origin"
    );
}

/// Issue 27: objects vanish behind the servers' backs (a lifecycle rule, another server's
/// sweep, an operator's `aws s3 rm`). With two servers on one bucket, one genrule's output blob
/// and another's action result are deleted from the bucket directly; the next Bazel build
/// through the server with an empty fast tier is a correct miss for exactly those actions
/// (never a failed build, never a dangling hit), it rewrites them, and the build after that
/// hits everything through either server.
#[test]
fn objects_deleted_from_the_bucket_are_misses_then_rewritten() {
    let Some(bin) = bazel_binary() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let prefix = format!("vanish-{}", uuid::Uuid::new_v4().simple());
    let Some((a, a_addr)) = serve_on_s3(&dir.path().join("server-a"), &prefix) else {
        return;
    };
    let (ws, root) = (dir.path().join("ws"), dir.path().join("bazel-root"));
    genrule_workspace(&ws);
    bazel(
        &bin,
        &root,
        &ws,
        &["build", "//:all", &format!("--remote_cache={a_addr}")],
    );
    let expected = outputs(&ws);
    terminate(a); // drains its uploads into the bucket
    let (a, a_addr) = serve_on_s3(&dir.path().join("server-a"), &prefix).unwrap();
    let (b, b_addr) = serve_on_s3(&dir.path().join("server-b"), &prefix).unwrap();

    // Delete g3's output blob and one action result other than g3's.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut o = server::s3::S3Options::new(
        Some(std::env::var("RECACHE_TEST_S3_SEAWEED").unwrap()),
        "recache-test",
    );
    o.prefix = format!("{prefix}/");
    o.credentials = Some((
        std::env::var("RECACHE_TEST_S3_ACCESS_KEY").unwrap(),
        std::env::var("RECACHE_TEST_S3_SECRET_KEY").unwrap(),
    ));
    let s3 = server::s3::S3Blobs::new(o).unwrap();
    let blob = hashing::Digest::of_bytes(expected[3].as_bytes());
    rt.block_on(async {
        assert!(
            s3.contains(blob).await.unwrap(),
            "g3's output is in the bucket"
        );
        s3.delete(blob).await.unwrap();
        let records = s3.list("ac/").await.unwrap();
        assert_eq!(records.len(), GENRULES, "{records:?}");
        s3.delete_key(&records[0].0).await.unwrap();
    });

    bazel(&bin, &root, &ws, &["clean"]);
    let after = bazel(
        &bin,
        &root,
        &ws,
        &["build", "//:all", &format!("--remote_cache={b_addr}")],
    );
    assert_eq!(outputs(&ws), expected, "identical outputs");
    let hits = remote_hits(&after);
    assert!(
        (GENRULES - 2..GENRULES).contains(&hits),
        "the actions whose blob or record vanished are misses, the rest hits:\n{after}"
    );
    for addr in [&b_addr, &a_addr, &b_addr] {
        bazel(&bin, &root, &ws, &["clean"]);
        let again = bazel(
            &bin,
            &root,
            &ws,
            &["build", "//:all", &format!("--remote_cache={addr}")],
        );
        assert_eq!(
            remote_hits(&again),
            GENRULES,
            "rewritten: every action hits:\n{again}"
        );
        assert_eq!(outputs(&ws), expected);
    }
    bazel(&bin, &root, &ws, &["shutdown"]);
    terminate(a);
    terminate(b);
}

/// The "N remote cache hit" count of a Bazel build's summary (0 when none).
fn remote_hits(out: &str) -> usize {
    let Some(at) = out.find(" remote cache hit") else {
        return 0;
    };
    let before = &out[..at];
    let digits = before.len() - before.trim_end_matches(|c: char| c.is_ascii_digit()).len();
    before[before.len() - digits..].parse().unwrap_or(0)
}

/// Issue 24: Bazel's HTTP cache (`--remote_cache=http://…`) against `recache serve
/// --http-listen`: built, `bazel clean`, built again: every genrule a remote cache hit with
/// identical outputs. Then the two protocols share entries: what a gRPC build wrote, an HTTP
/// build hits, and the other way round.
#[test]
fn bazel_http_cache_hits_and_shares_entries_with_grpc() {
    let Some(bin) = bazel_binary() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let (child, grpc, http) = testutil::real_servers::spawn_serve_with_http(
        Path::new(env!("CARGO_BIN_EXE_recache")),
        &dir.path().join("cache"),
    );
    let root = dir.path().join("bazel-root");
    let http_remote = format!("--remote_cache={http}");
    let grpc_remote = format!("--remote_cache={grpc}");

    let ws = dir.path().join("ws-http");
    genrule_workspace(&ws);
    bazel(&bin, &root, &ws, &["build", "//:all", &http_remote]);
    let expected = outputs(&ws);
    bazel(&bin, &root, &ws, &["clean"]);
    let again = bazel(&bin, &root, &ws, &["build", "//:all", &http_remote]);
    assert_eq!(
        remote_hits(&again),
        GENRULES,
        "every genrule hits over HTTP:\n{again}"
    );
    assert_eq!(outputs(&ws), expected, "identical outputs from the cache");
    bazel(&bin, &root, &ws, &["shutdown"]);

    for (name, write, read) in [
        ("grpc-then-http", &grpc_remote, &http_remote),
        ("http-then-grpc", &http_remote, &grpc_remote),
    ] {
        let ws = dir.path().join(name);
        genrule_workspace(&ws);
        let first = bazel(&bin, &root, &ws, &["build", "//:all", write]);
        assert_eq!(remote_hits(&first), 0, "{name}: a fresh workspace misses");
        let expected = outputs(&ws);
        bazel(&bin, &root, &ws, &["clean"]);
        let again = bazel(&bin, &root, &ws, &["build", "//:all", read]);
        assert_eq!(
            remote_hits(&again),
            GENRULES,
            "{name}: what one protocol wrote, the other hits:\n{again}"
        );
        assert_eq!(outputs(&ws), expected, "{name}: identical outputs");
        bazel(&bin, &root, &ws, &["shutdown"]);
    }
    terminate(child);
}
