//! Prints ONE JSON object of medians measured in this run, so ratios compare like with like on a
//! noisy machine:
//!
//! - `hit_{fetch,validate,defer}_us`: one cache hit through `remote_cache::RemoteCacheRunner`
//!   (10 outputs of 4 KiB, in-process REAPI server on loopback) on a warm local store that,
//!   for fetch, is emptied (untimed) before each hit so the outputs are really downloaded;
//! - `floor_{fetch,validate,defer}_us`: the bare RPCs that hit must make (GetActionResult;
//!   + FindMissingBlobs for validate; + BatchReadBlobs for fetch), plain tonic clients;
//! - the same with `_ct` before `_us`: on a current-thread runtime, as the CLI runs;
//! - `defer_rss_mib_per_10k_hits`: the RSS a runner's deferred hits hold for recovery, per
//!   10 000 hits of distinct actions with one shared 8 KiB environment (see
//!   `benches::hit::defer_rss_mib_per_10k_hits`; goal ≤ 10);
//! - `spawn_true_us`: spawning and waiting for `/bin/true`;
//! - `download_mib_s`, `upload_mib_s`, `hash_mib_s`: a `blob_mib` MiB blob through the server,
//!   and hashing the same bytes in memory;
//! - `download_peak_rss_growth_mib`: peak memory growth of one download;
//! - `fetch_20k_outputs_peak_rss_growth_mib` / `_anon_growth_mib`: peak memory growth of one
//!   fetch hit with 20 000 outputs of 4 KiB (goal ≤ 64: memory flat in the number of outputs).
//!   The RSS figure includes clean LMDB file pages the kernel maps around each touched page (see
//!   `benches::scale::HitMemory`); the anonymous figure is what the hit holds;
//! - `cli_hit_store_empty_us`, `cli_hit_store_200k_us` and their ratio `cli_hit_store_ratio`:
//!   the CLI's in-process hit path (open the store, build the runner, a fetch hit with outputs
//!   already local; current-thread runtime) on an empty store and on one with 200 000 blobs
//!   (goal ≤ 1.1: opening must not read the store);
//! - `server_restart_ms`: `recache serve` on a store of `server_restart_blobs` blobs (1 000 000;
//!   200 000 with `--quick`), from open to its first answered RPCs (goal < 1000);
//! - `storage_at_rest_ratio`: bytes on disk / logical bytes for `storage_corpus_mib` of the Rust
//!   sources in the cargo registry, stored as `recache serve` keeps them (goal ≤ 0.5).
//!
//! - `asset_*`: Remote Asset through `recache serve`: `asset_cold_fetch_mib_s` (FetchBlob of an
//!   `asset_mib` MiB file the server must download, verify and store) over
//!   `asset_plain_http_mib_s` (the same file into a file with a plain HTTP client, same
//!   loopback) = `asset_cold_over_plain` (goal ≥ 0.8); `asset_cold_fetch_peak_rss_growth_mib`
//!   (goal ≤ 64); `asset_warm_fetch_us` (an indexed asset) over `asset_get_action_result_us` =
//!   `asset_warm_over_get_action_result` (goal ≤ 1.5);
//! - `job_cache`: `recache cache save|restore` against tar + `zstd -T0` through the same
//!   caches (see `benches::job_cache`), when the release `recache` binary is built;
//! - `http`: `recache serve --http-listen` beside nginx, and against our own gRPC path (see
//!   `benches::http`), when `scripts/nginx.sh` runs it and `RECACHE_TEST_NGINX` is set;
//! - `server`: `recache serve` beside buildbox-casd and BuildGrid, the same workloads against
//!   each with ratios per row (see `benches::peers`), when `scripts/reapi-servers.sh` runs them
//!   and its `RECACHE_TEST_*` variables are set; left out (with a line on stderr) otherwise.
//!
//! `cargo run --release -p benches --bin perf-report -- [--quick]` (quick: fewer repetitions).
//! With the peers:
//!
//! ```sh
//! cargo build --release -p recache && RECACHE_BIN=target/release/recache scripts/reapi-servers.sh start
//! eval "$(scripts/reapi-servers.sh env)"
//! cargo run --release -p benches --bin perf-report -- [--quick]
//! ```

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use benches::hit::{HitFixture, median};
use benches::transfer::{TransferFixture, mib_per_s};
use remote_cache::CacheContentBehavior;

fn us(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e7).round() / 10.0
}

/// Medians of hits and floors for each behavior, interleaved so drift affects both alike.
fn hits_and_floors(rt: &tokio::runtime::Runtime, reps: usize, suffix: &str) -> Vec<(String, f64)> {
    // Runners start their write-behind task on construction: keep the runtime entered.
    let _entered = rt.enter();
    let fixture = rt.block_on(HitFixture::new());
    let mut out = vec![];
    for (behavior, name) in [
        (CacheContentBehavior::Fetch, "fetch"),
        (CacheContentBehavior::Validate, "validate"),
        (CacheContentBehavior::Defer, "defer"),
    ] {
        // One warm machine per behavior, as an engine keeps its store open; before each fetch
        // hit the local store is emptied (untimed) so the outputs are really downloaded.
        let machine = fixture.machine(behavior);
        let (mut hits, mut floors) = (vec![], vec![]);
        for i in 0..reps + 20 {
            if behavior == CacheContentBehavior::Fetch {
                machine.forget_outputs();
            }
            // Alternate which goes first, so neither always runs in the other's wake.
            let (h, f) = if i % 2 == 0 {
                let h = rt.block_on(fixture.hit(&machine));
                (h, rt.block_on(fixture.floor(behavior)))
            } else {
                let f = rt.block_on(fixture.floor(behavior));
                (rt.block_on(fixture.hit(&machine)), f)
            };
            if i >= 20 {
                hits.push(h);
                floors.push(f);
            }
        }
        out.push((format!("hit_{name}{suffix}_us"), us(median(&mut hits))));
        out.push((format!("floor_{name}{suffix}_us"), us(median(&mut floors))));
    }
    out
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let hit_reps = if quick { 300 } else { 2000 };
    let spawn_reps = if quick { 200 } else { 1000 };
    let transfer_reps = if quick { 3 } else { 7 };
    let blob_mib = benches::blob_mib(256);
    let started = Instant::now();

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let mut report = serde_json::Map::new();
    let mut put = |k: &str, v: f64| {
        report.insert(k.to_owned(), serde_json::json!(v));
    };

    // Cache hits and their floors on a multi-thread runtime (as build engines embed us), then
    // on a current-thread runtime (as the `recache` CLI runs; keys ending in `_ct_us`).
    for (key, value) in hits_and_floors(&rt, hit_reps, "") {
        put(&key, value);
    }
    let ct = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    for (key, value) in hits_and_floors(&ct, hit_reps, "_ct") {
        put(&key, value);
    }
    // What deferred hits hold for recovery (goal ≤ 10 MiB per 10 000 with 8 KiB environments).
    let defer_hits = if quick { 5_000 } else { 20_000 };
    put(
        "defer_rss_mib_per_10k_hits",
        (rt.block_on(benches::hit::defer_rss_mib_per_10k_hits(defer_hits)) * 10.0).round() / 10.0,
    );

    let mut spawns: Vec<Duration> = (0..spawn_reps)
        .map(|_| {
            let s = Instant::now();
            std::process::Command::new("/bin/true").status().unwrap();
            s.elapsed()
        })
        .collect();
    put("spawn_true_us", us(median(&mut spawns)));

    // Large blob: download, upload, hash-only.
    // Where the downloads land: RECACHE_BENCH_DIR, else the system temp dir.
    let tmp = std::env::var_os("RECACHE_BENCH_DIR").map_or_else(std::env::temp_dir, Into::into);
    std::fs::create_dir_all(&tmp).unwrap();
    let t = rt.block_on(TransferFixture::new(blob_mib, &tmp));
    let growth = rt.block_on(t.download_peak_rss_growth_mib());
    let mut downloads: Vec<Duration> = (0..transfer_reps)
        .map(|_| rt.block_on(t.download()))
        .collect();
    let (_keep, path) = rt.block_on(t.local_copy());
    let mut uploads: Vec<Duration> = (0..transfer_reps)
        .map(|_| rt.block_on(t.upload(&path)))
        .collect();
    let data = t.bytes();
    let mut hashes: Vec<Duration> = (0..transfer_reps).map(|_| t.hash_only(&data)).collect();
    put(
        "download_mib_s",
        (mib_per_s(t.size, median(&mut downloads)) * 10.0).round() / 10.0,
    );
    put(
        "upload_mib_s",
        (mib_per_s(t.size, median(&mut uploads)) * 10.0).round() / 10.0,
    );
    put(
        "hash_mib_s",
        (mib_per_s(t.size, median(&mut hashes)) * 10.0).round() / 10.0,
    );
    put(
        "download_peak_rss_growth_mib",
        (growth * 10.0).round() / 10.0,
    );
    put("blob_mib", blob_mib as f64);

    // Scale: many outputs, big stores.
    let mem = rt.block_on(benches::scale::many_outputs_fetch_memory(20_000, 4 * 1024));
    put(
        "fetch_20k_outputs_peak_rss_growth_mib",
        (mem.rss_mib * 10.0).round() / 10.0,
    );
    put(
        "fetch_20k_outputs_peak_anon_growth_mib",
        (mem.anon_mib * 10.0).round() / 10.0,
    );
    let (server, process, _, _) = rt.block_on(benches::scale::server_with_outputs(
        benches::hit::OUTPUTS,
        benches::hit::OUTPUT_BYTES,
    ));
    let stores = tempfile::tempdir_in(&tmp).unwrap();
    let (empty, full) = (stores.path().join("empty"), stores.path().join("full"));
    benches::scale::fill_store(&empty, 0, false);
    benches::scale::fill_store(&full, 200_000, false);
    let cli_reps = if quick { 100 } else { 400 };
    let (mut e, mut f) = (vec![], vec![]);
    // Interleaved rounds, so drift affects both alike.
    for _ in 0..4 {
        e.push(benches::scale::cli_path_hit(
            &ct,
            &server,
            &process,
            &empty,
            cli_reps / 4,
        ));
        f.push(benches::scale::cli_path_hit(
            &ct,
            &server,
            &process,
            &full,
            cli_reps / 4,
        ));
    }
    let (e, f) = (median(&mut e), median(&mut f));
    put("cli_hit_store_empty_us", us(e));
    put("cli_hit_store_200k_us", us(f));
    // recache serve: cold restart on a big store (1 000 000 blobs; 200 000 with --quick).
    let restart_blobs = if quick { 200_000 } else { 1_000_000 };
    let server_dir = tempfile::tempdir_in(&tmp).unwrap();
    benches::scale::fill_store(&server_dir.path().join("store"), restart_blobs, true);
    let mut restarts: Vec<Duration> = (0..5)
        .map(|_| rt.block_on(benches::scale::server_restart(server_dir.path())))
        .collect();
    put("server_restart_blobs", restart_blobs as f64);
    // Storage at rest on source code: the Rust sources in the cargo registry on this machine.
    let registry = std::env::var_os("CARGO_HOME")
        .map(std::path::PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| std::path::PathBuf::from(h).join(".cargo")))
        .map(|c| c.join("registry/src"));
    if let Some(registry) = registry.filter(|r| r.is_dir()) {
        let (logical, on_disk) =
            benches::scale::storage_at_rest(&registry, if quick { 32 << 20 } else { 256 << 20 });
        put(
            "storage_corpus_mib",
            (logical as f64 / 1048576.0 * 10.0).round() / 10.0,
        );
        put(
            "storage_at_rest_ratio",
            (on_disk as f64 / logical.max(1) as f64 * 1000.0).round() / 1000.0,
        );
    }
    put(
        "server_restart_ms",
        (median(&mut restarts).as_secs_f64() * 1e4).round() / 10.0,
    );
    put(
        "cli_hit_store_ratio",
        (f.as_secs_f64() / e.as_secs_f64() * 100.0).round() / 100.0,
    );
    // Remote Asset: a cold fetch through recache serve vs a plain download; warm vs AC.
    let asset_mib = if quick { 64 } else { 256 };
    for (k, v) in rt.block_on(benches::asset::rows(
        asset_mib,
        if quick { 3 } else { 5 },
        &tmp,
    )) {
        report.insert(k, serde_json::json!(v));
    }
    // recache serve against its peers, when they run.
    let server_mib = if quick { 64 } else { 256 };
    let peers = rt.block_on(benches::peers::report(quick, server_mib));
    match peers {
        Some(p) => {
            report.insert("server".into(), p);
        }
        None => eprintln!(
            "perf-report: no `server` section: recache serve is not reachable (start \
             scripts/reapi-servers.sh and eval its env)"
        ),
    }
    // The HTTP front end beside nginx, when scripts/nginx.sh runs.
    match rt.block_on(benches::http::report(quick, &tmp)) {
        Some(h) => {
            report.insert("http".into(), h);
        }
        None => eprintln!(
            "perf-report: no `http` section: nginx is not running (scripts/nginx.sh start, and \
             eval \"$(scripts/nginx.sh env)\")"
        ),
    }
    // The CI job cache against tar + zstd, when the release recache binary is built.
    match rt.block_on(benches::job_cache::report(quick, &tmp)) {
        Some(j) => {
            report.insert("job_cache".into(), j);
        }
        None => eprintln!(
            "perf-report: no `job_cache` section: build the release recache binary first \
             (cargo build --release -p recache)"
        ),
    }
    // The S3 tier on SeaweedFS, when scripts/s3-servers.sh runs.
    match rt.block_on(benches::s3::report(quick, &tmp)) {
        Some(s3) => {
            report.insert("s3".into(), s3);
        }
        None => eprintln!(
            "perf-report: no `s3` section: SeaweedFS is not reachable (start \
             scripts/s3-servers.sh and eval its env)"
        ),
    }
    let mut put = |k: &str, v: f64| {
        report.insert(k.to_owned(), serde_json::json!(v));
    };
    put(
        "elapsed_s",
        (started.elapsed().as_secs_f64() * 10.0).round() / 10.0,
    );
    println!("{}", serde_json::Value::Object(report));
}
