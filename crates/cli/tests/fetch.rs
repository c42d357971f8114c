//! `recache fetch` as a user runs it: the real binary, an in-process HTTP origin, and real
//! Remote Asset services (`recache serve`, buildbox-casd) started by scripts/reapi-servers.sh.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::path::Path;
use std::process::{Command, Output};

use base64::Engine as _;
use hashing::Digest;
use testutil::origin::{Behavior, Origin};
use testutil::real_servers::{RealServer, ServerKind};

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap()
}

fn sri(data: &[u8]) -> String {
    format!(
        "sha256-{}",
        base64::engine::general_purpose::STANDARD.encode(Digest::of_bytes(data).hash.0)
    )
}

fn fetch(cwd: &Path, cache: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_recache"))
        .current_dir(cwd)
        .env_remove("RECACHE_REMOTE")
        .env("RECACHE_CACHE_DIR", cache)
        .arg("fetch")
        .arg("--json")
        .args(args)
        .output()
        .unwrap()
}

/// The JSON record of a successful fetch.
fn record(o: &Output) -> serde_json::Value {
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(0), "{err}");
    serde_json::from_str(err.lines().last().unwrap()).unwrap()
}

#[test]
fn from_the_origin_then_from_the_local_store() {
    let rt = runtime();
    let origin = rt.block_on(Origin::start());
    let body = testutil::data::pseudo_random(700_000, 80);
    origin.set("/pkg/tool-1.0.tar.gz", Behavior::Serve(body.clone()));
    let url = origin.url("/pkg/tool-1.0.tar.gz");
    let (ws, cache) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());

    let r = record(&fetch(
        ws.path(),
        cache.path(),
        &[&url, "--sri", &sri(&body)],
    ));
    assert_eq!(r["source"], "origin");
    assert_eq!(r["pushed"], false);
    assert_eq!(r["digest"], Digest::of_bytes(&body).to_string());
    assert_eq!(
        std::fs::read(ws.path().join("tool-1.0.tar.gz")).unwrap(),
        body
    );

    // The origin goes away: the local store has it, by its checksum.
    origin.set("/pkg/tool-1.0.tar.gz", Behavior::Status(404));
    let out = ws.path().join("again.tgz");
    let r = record(&fetch(
        ws.path(),
        cache.path(),
        &[&url, "--sri", &sri(&body), "-o", out.to_str().unwrap()],
    ));
    assert_eq!(r["source"], "local-store");
    assert_eq!(std::fs::read(&out).unwrap(), body);
}

#[test]
fn a_wrong_checksum_fails_and_writes_nothing() {
    let rt = runtime();
    let origin = rt.block_on(Origin::start());
    origin.set("/f.bin", Behavior::Serve(b"tampered".to_vec()));
    let (ws, cache) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let o = fetch(
        ws.path(),
        cache.path(),
        &[&origin.url("/f.bin"), "--sri", &sri(b"genuine")],
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("checksum mismatch"), "{err}");
    assert!(!ws.path().join("f.bin").exists());
    // A bad --sri is the user's mistake.
    let o = fetch(
        ws.path(),
        cache.path(),
        &[&origin.url("/f.bin"), "--sri", "md5-x"],
    );
    assert_eq!(o.status.code(), Some(125));
}

#[test]
fn a_dead_asset_service_falls_back_to_the_origin() {
    let rt = runtime();
    let origin = rt.block_on(Origin::start());
    origin.set("/x.zip", Behavior::Serve(b"zip bytes".to_vec()));
    let (ws, cache) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let o = fetch(
        ws.path(),
        cache.path(),
        &[&origin.url("/x.zip"), "--remote", "grpc://127.0.0.1:9"],
    );
    let r = record(&o);
    assert_eq!(r["source"], "origin");
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(err.matches("recache: warning:").count(), 1, "{err}");
    assert_eq!(
        std::fs::read(ws.path().join("x.zip")).unwrap(),
        b"zip bytes"
    );
}

/// One machine fetches from the origin and pushes; another, with the origin down, gets it from
/// the service.
fn second_machine_hits(kind: ServerKind) {
    let rt = runtime();
    let Some(server) = rt.block_on(RealServer::require(kind)) else {
        return;
    };
    let origin = rt.block_on(Origin::start());
    let body = format!("asset {}\n", uuid::Uuid::new_v4())
        .repeat(2000)
        .into_bytes();
    origin.set("/dist/lib.tar", Behavior::Serve(body.clone()));
    let url = origin.url("/dist/lib.tar");
    let remote = [
        "--remote",
        &server.address,
        "--instance-name",
        &server.instance,
    ];
    let ws = tempfile::tempdir().unwrap();

    let first = tempfile::tempdir().unwrap();
    let mut args = vec![url.as_str(), "--sri"];
    let checksum = sri(&body);
    args.push(&checksum);
    args.extend(remote);
    let out = fetch(ws.path(), first.path(), &args);
    let r = record(&out);
    assert!(
        r["source"] == "origin" || r["source"] == "remote-asset",
        "{r}"
    );
    if r["source"] == "origin" {
        assert_eq!(r["pushed"], true, "{r}");
        // The service answered NOT_FOUND (not cached): an ordinary miss, not a warning.
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!err.contains("recache: warning:"), "{err}");
        assert_eq!(r["warnings"], serde_json::json!([]), "{r}");
    }

    origin.set("/dist/lib.tar", Behavior::Status(503));
    let second = tempfile::tempdir().unwrap();
    let out = ws.path().join("second.tar");
    args.extend(["-o", out.to_str().unwrap()]);
    let r = record(&fetch(ws.path(), second.path(), &args));
    assert_eq!(r["source"], "remote-asset", "{r}");
    assert_eq!(std::fs::read(&out).unwrap(), body);
}

#[test]
fn a_second_machine_gets_it_from_recache_serve() {
    second_machine_hits(ServerKind::Recache);
}

#[test]
fn a_second_machine_gets_it_from_buildbox_casd() {
    second_machine_hits(ServerKind::BuildboxCasd);
}

#[test]
fn a_fetch_through_the_casd_proxy_is_answered_by_recache_serve_from_the_origin() {
    let rt = runtime();
    let Some(_serve) = rt.block_on(RealServer::require(ServerKind::Recache)) else {
        return;
    };
    let Some(proxy) = rt.block_on(RealServer::require(ServerKind::CasdProxy)) else {
        return;
    };
    let origin = rt.block_on(Origin::start());
    let body = format!("through the proxy {}\n", uuid::Uuid::new_v4()).into_bytes();
    origin.set("/p.txt", Behavior::Serve(body.clone()));
    let (ws, cache) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    // casd forwards FetchBlob to recache serve, which downloads from the origin; the client
    // then reads the blob through casd's CAS.
    let r = record(&fetch(
        ws.path(),
        cache.path(),
        &[
            &origin.url("/p.txt"),
            "--sri",
            &sri(&body),
            "--remote",
            &proxy.address,
        ],
    ));
    assert_eq!(r["source"], "remote-asset", "{r}");
    assert_eq!(origin.hits("/p.txt"), 1, "recache serve downloaded it once");
    assert_eq!(std::fs::read(ws.path().join("p.txt")).unwrap(), body);
}
