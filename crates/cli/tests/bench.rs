//! `recache bench` as a user runs it: the real binary against real servers (recache serve,
//! BuildGrid, buildbox-casd), a shared directory and the embedded default, with a small N.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::process::Command;

use testutil::real_servers::{RealServer, ServerKind};

const ACTIONS: u64 = 12;

/// Runs `recache bench` with a small N and returns its JSON record and the HTML report.
fn bench(remote: &[&str]) -> (serde_json::Value, String) {
    let cache = tempfile::tempdir().unwrap();
    let report = cache.path().join("bench.html");
    let o = Command::new(env!("CARGO_BIN_EXE_recache"))
        .arg("bench")
        .args(remote)
        .args(["--actions", &ACTIONS.to_string()])
        .args(["--outputs", "3x4KiB,1x2MiB", "--concurrency", "1,4"])
        .args(["--misses", "3", "--json", "--report"])
        .arg(&report)
        .env("RECACHE_CACHE_DIR", cache.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&o.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(
        o.status.success(),
        "recache bench failed:\n{stdout}\n{stderr}"
    );
    let json: serde_json::Value = serde_json::from_str(stdout.trim())
        .unwrap_or_else(|e| panic!("--json printed something else ({e}):\n{stdout}"));
    let html = std::fs::read_to_string(&report).unwrap();
    // Nothing of the bench is left in the cache directory but its stores' parent.
    let left: Vec<_> = std::fs::read_dir(cache.path())
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("bench-"))
        .collect();
    assert!(
        left.is_empty(),
        "bench work directories left behind: {left:?}"
    );
    (json, html)
}

/// The record has every row, every hit really hit, and each hit has its ratio to its floor.
fn check_record(json: &serde_json::Value) {
    assert_eq!(json["actions"], ACTIONS);
    // 12 actions × (3 × 4 KiB + 2 MiB).
    assert_eq!(json["populated_blobs"], ACTIONS * 4);
    assert_eq!(json["populated_bytes"], ACTIONS * (3 * 4096 + 2 * 1048576));
    assert!(
        json["namespace"]
            .as_str()
            .unwrap()
            .starts_with("recache-bench-")
    );
    let rows = json["rows"].as_array().unwrap();
    for c in [1u64, 4] {
        for b in ["fetch", "validate", "defer"] {
            for kind in ["floor", "hit"] {
                let row = rows
                    .iter()
                    .find(|r| r["kind"] == kind && r["behavior"] == b && r["concurrency"] == c)
                    .unwrap_or_else(|| panic!("no {kind} {b} row at concurrency {c}: {json}"));
                assert_eq!(row["errors"], 0, "{row}");
                assert_eq!(
                    row["count"], ACTIONS,
                    "every {kind} {b} must succeed: {row}"
                );
                for field in ["p50_us", "p90_us", "p99_us", "max_us", "ops_per_s"] {
                    assert!(row[field].as_f64().unwrap() > 0.0, "{field}: {row}");
                }
                assert!(row["p50_us"].as_f64() <= row["p99_us"].as_f64(), "{row}");
                assert_eq!(row["percentiles"].as_array().unwrap().len(), 12);
                if kind == "hit" {
                    assert!(row["p50_over_floor"].as_f64().unwrap() > 0.0, "{row}");
                }
            }
        }
        let miss = rows
            .iter()
            .find(|r| r["kind"] == "miss" && r["concurrency"] == c)
            .unwrap();
        assert_eq!(miss["count"], 3, "{miss}");
        assert_eq!(
            miss["written"], 3,
            "the write-behind must write every miss: {miss}"
        );
    }
}

/// The page carries the record and one chart per behavior plus throughput, each with its
/// series.
fn check_report(json: &serde_json::Value, html: &str) {
    let start = html
        .find("<script type=\"application/json\" id=\"recache-bench-data\">")
        .expect("embedded data");
    let rest = &html[start..];
    let data = &rest[rest.find('>').unwrap() + 1..rest.find("</script>").unwrap()];
    let embedded: serde_json::Value = serde_json::from_str(&data.replace("<\\/", "</")).unwrap();
    assert_eq!(
        embedded["rows"], json["rows"],
        "the page must hold the data it charts"
    );
    for b in ["fetch", "validate", "defer"] {
        let at = html
            .find(&format!("data-chart=\"latency-{b}\""))
            .unwrap_or_else(|| panic!("no latency chart for {b}"));
        let chart = &html[at..at + html[at..].find("</figure>").unwrap()];
        assert!(chart.contains("<svg"), "{b}: not an inline SVG");
        for series in ["floor c1", "hit c1", "floor c4", "hit c4"] {
            assert!(
                chart.contains(series),
                "{b} chart lacks the series {series:?}"
            );
        }
        // One drawn line per series, each through every percentile point.
        assert!(
            chart.matches("<polyline").count() >= 4,
            "{b}: lines missing"
        );
    }
    let at = html
        .find("data-chart=\"throughput\"")
        .expect("throughput chart");
    let chart = &html[at..];
    for series in [
        "hit fetch",
        "hit defer",
        "floor validate",
        "miss write-behind",
    ] {
        assert!(chart.contains(series), "throughput chart lacks {series:?}");
    }
}

fn against(kind: ServerKind) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let Some(server) = rt.block_on(RealServer::require(kind)) else {
        return;
    };
    let (json, html) = bench(&[
        "--remote",
        &server.address,
        "--instance-name",
        &server.instance,
    ]);
    assert_eq!(json["target"], server.address.as_str());
    assert_eq!(json["floor"], "bare gRPC calls (tonic)");
    check_record(&json);
    check_report(&json, &html);
}

#[test]
fn bench_against_recache_serve() {
    against(ServerKind::Recache);
}

#[test]
fn bench_against_buildgrid() {
    against(ServerKind::BuildGrid);
}

#[test]
fn bench_against_buildbox_casd() {
    against(ServerKind::BuildboxCasd);
}

#[test]
fn bench_against_a_shared_directory_and_the_default_cache() {
    let shared = tempfile::tempdir().unwrap();
    let url = format!("file://{}", shared.path().display());
    let (json, html) = bench(&["--remote", &url]);
    assert_eq!(json["floor"], "the cache provider's calls");
    check_record(&json);
    check_report(&json, &html);
    let (json, _) = bench(&[]);
    assert!(
        json["target"]
            .as_str()
            .unwrap()
            .starts_with("the default cache")
    );
    check_record(&json);
}

#[test]
fn bad_bench_flags_name_what_is_wrong() {
    for (flag, value, says) in [
        ("--outputs", "10", "COUNTxSIZE"),
        ("--concurrency", "0", "1 to 4096"),
        ("--behaviors", "fetch,sometimes", "--behaviors"),
        ("--actions", "0", "--actions"),
    ] {
        let cache = tempfile::tempdir().unwrap();
        let o = Command::new(env!("CARGO_BIN_EXE_recache"))
            .args(["bench", flag, value])
            .env("RECACHE_CACHE_DIR", cache.path())
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(125), "{flag} {value}: {err}");
        assert!(err.contains(says), "{flag} {value}: {err}");
    }
}
