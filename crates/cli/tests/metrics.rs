//! Issue 25 §1: `recache serve`'s Prometheus metrics, scraped by a real Prometheus (Debian's,
//! installed by `scripts/install-apt.sh prometheus`, run by this test on 127.0.0.1 with a scrape
//! config for the server), queried through Prometheus's HTTP API after real traffic: `recache
//! run` misses and hits over gRPC, and curl over HTTP. Under `CI=true` a missing Prometheus
//! fails the test.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use testutil::clients::Killed;
use testutil::real_servers::in_ci;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn curl(url: &str) -> String {
    let out = Command::new("curl")
        .args(["-s", "--max-time", "5", url])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The value of a PromQL query with one result (or `None`).
fn query(prometheus: &str, promql: &str) -> Option<f64> {
    let out = Command::new("curl")
        .args(["-s", "--max-time", "5", "-G"])
        .arg(format!("{prometheus}/api/v1/query"))
        .arg("--data-urlencode")
        .arg(format!("query={promql}"))
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    v["data"]["result"][0]["value"][1].as_str()?.parse().ok()
}

fn run(ws: &Path, cache: &Path, remote: &str) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_recache"))
        .current_dir(ws)
        .env("RECACHE_CACHE_DIR", cache)
        .args([
            "run",
            "--json",
            "--remote",
            remote,
            "--output",
            "out.txt",
            "--",
            "sh",
            "-c",
            "head -c 2000000 /dev/zero | tr '\\0' x > out.txt; echo made",
        ])
        .output()
        .unwrap()
}

#[test]
fn prometheus_scrapes_what_the_server_counts() {
    let have = Command::new("prometheus")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !have {
        let msg = "no prometheus on PATH: run scripts/install-apt.sh prometheus";
        assert!(!in_ci(), "CI=true, so this is a failure, not a skip: {msg}");
        eprintln!("\n*** SKIPPED (not in CI): {msg}\n");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (server, grpc, http) = testutil::real_servers::spawn_serve_with_http(
        Path::new(env!("CARGO_BIN_EXE_recache")),
        &dir.path().join("server"),
    );
    let _server = Killed(server);
    let target = http.trim_start_matches("http://");
    std::fs::write(
        dir.path().join("prometheus.yml"),
        format!(
            "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: recache\n    static_configs:\n      - targets: ['{target}']\n"
        ),
    )
    .unwrap();
    let port = free_port();
    let prometheus = Killed(
        Command::new("prometheus")
            .arg(format!(
                "--config.file={}",
                dir.path().join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("tsdb").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let prom = format!("http://127.0.0.1:{port}");

    // Traffic: a miss (uploads), a hit (downloads) and one over HTTP.
    let ws = tempfile::tempdir().unwrap();
    let miss = run(ws.path(), &dir.path().join("c1"), &grpc);
    assert!(String::from_utf8_lossy(&miss.stderr).contains("\"cache\":\"miss\""));
    let hit = run(ws.path(), &dir.path().join("c2"), &grpc);
    assert!(
        String::from_utf8_lossy(&hit.stderr).contains("\"cache\":\"hit\""),
        "{}",
        String::from_utf8_lossy(&hit.stderr)
    );
    assert_eq!(curl(&format!("{http}/healthz")), "ok\n");
    let text = curl(&format!("{http}/metrics"));
    assert!(
        text.contains("# TYPE recache_requests_total counter"),
        "{text}"
    );

    // What Prometheus scraped.
    let checks = [
        (
            "sum(recache_requests_total{protocol=\"grpc\",method=\"GetActionResult\"})",
            2.0,
        ),
        ("recache_action_cache_requests_total{result=\"hit\"}", 1.0),
        ("recache_action_cache_requests_total{result=\"miss\"}", 1.0),
        ("recache_find_missing_digests_total{result=\"asked\"}", 1.0),
        // The 2 MB output is compressible: it travels as zstd, a few KiB.
        (
            "sum(recache_blob_bytes_total{protocol=\"grpc\",direction=\"in\",compression=\"zstd\"})",
            1.0,
        ),
        (
            "sum(recache_blob_bytes_total{protocol=\"grpc\",direction=\"out\"})",
            1.0,
        ),
        ("recache_store_bytes", 2_000_000.0),
        ("recache_store_max_bytes", 1.0),
        (
            "sum(recache_requests_total{protocol=\"http\",method=\"healthz\",code=\"200\"})",
            1.0,
        ),
        (
            "sum(recache_request_duration_seconds_count{protocol=\"grpc\",method=\"UpdateActionResult\"})",
            1.0,
        ),
    ];
    let start = Instant::now();
    let mut pending: Vec<(&str, f64)> = checks.to_vec();
    while !pending.is_empty() {
        pending.retain(|(q, at_least)| query(&prom, q).is_none_or(|v| v < *at_least));
        if pending.is_empty() {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "Prometheus never saw: {pending:?}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    drop(prometheus);
}
