//! What a dead or hung cache costs a build: 200 quick actions, 8 at a time, against a server
//! that refuses connections and against one that never answers, with the circuit breaker off
//! and on (its defaults). Prints the wall time of each build, flush included. Then a cache that
//! hangs mid-build (as a SIGSTOPped server) with default options: 50 actions, the server stops
//! answering after 10 results, and the time `finish()` takes is printed apart.
//!
//! `cargo run --release -p recache-remote-cache --example outage`

// A measurement harness: a setup failure must stop it loudly.
#![allow(clippy::expect_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use process_execution::{CommandRunner as _, Context, LocalRunner, LocalRunnerOptions, Process};
use remote_cache::{RemoteCacheOptions, RemoteCacheRunner};
use store::remote::grpc::{GrpcOptions, GrpcProvider};
use store::{LocalStore, LocalStoreOptions, Store};
use testutil::server::{Method, TestServer};

const ACTIONS: usize = 200;
const PARALLELISM: usize = 8;

/// A machine: a runner over a fresh local store, against `address` with `grpc` options.
async fn machine(
    address: &str,
    grpc: GrpcOptions,
    options: RemoteCacheOptions,
) -> (Arc<RemoteCacheRunner>, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("tempdir");
    let provider = Arc::new(GrpcProvider::connect(address, grpc).await.expect("address"));
    let store = Store::with_remote(
        LocalStore::open(LocalStoreOptions::new(dir.path().join("store"))).expect("store"),
        provider.clone(),
    );
    let sandboxes = dir.path().join("sb");
    let runner = Arc::new(RemoteCacheRunner::wrapping(store, provider, options, |s| {
        let mut o = LocalRunnerOptions::new(sandboxes);
        o.parallelism = PARALLELISM;
        Arc::new(LocalRunner::new(s, o))
    }));
    (runner, dir)
}

async fn build(address: &str, breaker: bool, read_timeout: Duration) -> (Duration, String) {
    let (runner, _dir) = machine(
        address,
        GrpcOptions {
            request_timeout: read_timeout,
            ..Default::default()
        },
        RemoteCacheOptions {
            read_timeout,
            flush_deadline: Duration::from_secs(60),
            breaker_threshold: if breaker { 5 } else { 0 },
            ..Default::default()
        },
    )
    .await;
    let salt = uuid::Uuid::new_v4().simple().to_string();
    let started = Instant::now();
    let failed = futures::stream::iter(0..ACTIONS)
        .map(|i| {
            let runner = runner.clone();
            let p = Process::new(["/bin/sh", "-c", &format!("echo {salt} {i} > o")])
                .env("PATH", "/usr/bin:/bin")
                .output_files(["o"]);
            async move { runner.run(Context::default(), p).await.is_err() }
        })
        .buffer_unordered(PARALLELISM)
        .filter(|failed| futures::future::ready(*failed))
        .count()
        .await;
    let report = runner.finish().await;
    let took = started.elapsed();
    assert_eq!(failed, 0, "no action may fail because of the cache");
    let s = runner.stats();
    (
        took,
        format!(
            "error misses {}, breaker trips {}; {report}",
            s.error_misses, s.breaker_trips
        ),
    )
}

/// Default options throughout; the server answers nothing once 10 results were produced.
async fn hangs_midway() -> (Duration, Duration, String) {
    let server = TestServer::start().await;
    let (runner, _dir) = machine(
        &server.address(),
        GrpcOptions::default(),
        RemoteCacheOptions::default(),
    )
    .await;
    let salt = uuid::Uuid::new_v4().simple().to_string();
    let started = Instant::now();
    let done = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let server = Arc::new(server);
    futures::stream::iter(0..50)
        .map(|i| {
            let (runner, done, server) = (runner.clone(), done.clone(), server.clone());
            let p = Process::new(["/bin/sh", "-c", &format!("echo {salt} {i} > o")])
                .env("PATH", "/usr/bin:/bin")
                .output_files(["o"]);
            async move {
                let r = runner.run(Context::default(), p).await;
                assert!(r.is_ok(), "no action may fail because of the cache");
                if done.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1 == 10 {
                    for m in [
                        Method::GetActionResult,
                        Method::FindMissingBlobs,
                        Method::BatchUpdateBlobs,
                        Method::UpdateActionResult,
                        Method::Write,
                    ] {
                        server.knobs().delay.insert(m, Duration::from_secs(3600));
                    }
                }
            }
        })
        .buffer_unordered(PARALLELISM)
        .collect::<Vec<()>>()
        .await;
    let build = started.elapsed();
    let flush = Instant::now();
    let report = runner.finish().await;
    (build, flush.elapsed(), report.to_string())
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    // Dead: a port nothing listens on.
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| format!("grpc://{a}"))
        .expect("a free port");
    // Hung: answers nothing for an hour.
    let hung = TestServer::start().await;
    for m in [
        Method::GetActionResult,
        Method::FindMissingBlobs,
        Method::UpdateActionResult,
    ] {
        hung.knobs().delay.insert(m, Duration::from_secs(3600));
    }
    let timeout = Duration::from_secs(2);
    println!("{ACTIONS} actions, {PARALLELISM} at a time, read timeout {timeout:?}");
    for (name, address) in [("dead", dead.clone()), ("hung", hung.address())] {
        for breaker in [false, true] {
            let (took, what) = build(&address, breaker, timeout).await;
            println!(
                "cache {name}, breaker {}: {took:.2?} ({what})",
                if breaker { "on " } else { "off" }
            );
        }
    }
    let (build, flush, what) = hangs_midway().await;
    println!(
        "cache hangs after 10 results, default options: build {build:.2?}, finish() {flush:.2?} ({what})"
    );
}
