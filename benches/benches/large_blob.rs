//! Large-blob transfer through the in-process REAPI server on loopback, next to the hash-only
//! throughput of the same bytes in the same run (hashing is the floor every transfer pays).
//!
//! `cargo bench -p benches --bench large_blob` moves 1 GiB; `RECACHE_BENCH_BLOB_MIB=256` for a
//! quicker run. Also prints the download's peak memory growth, which must not scale with the
//! blob size (it streams into a pool temp file).

#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use criterion::{BatchSize, Criterion, Throughput};
use hashing::{Digest, Hasher};
use store::remote::ByteStoreProvider;
use store::remote::grpc::{GrpcOptions, GrpcProvider};
use store::{LocalStore, LocalStoreOptions, Store};
use testutil::server::TestServer;

fn tmp() -> tempfile::TempDir {
    tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap()
}

fn main() {
    let mib = benches::blob_mib(1024);
    let size = mib * 1024 * 1024;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let (server, provider, digest) = rt.block_on(async {
        let server = TestServer::start().await;
        let digest = {
            let data = benches::pseudo_random_bytes(size, 7);
            server.put_blob(&data)
        };
        let provider = Arc::new(
            GrpcProvider::connect(&server.address(), GrpcOptions::default())
                .await
                .unwrap(),
        );
        (server, provider, digest)
    });

    // Peak memory of one download, measured before criterion allocates anything.
    let growth = rt.block_on(async {
        let dir = tmp();
        let store = Store::with_remote(
            LocalStore::open(LocalStoreOptions::new(dir.path())).unwrap(),
            provider.clone(),
        );
        benches::reset_peak_rss().unwrap();
        let before = benches::rss_mib();
        store.ensure_local(digest).await.unwrap();
        benches::peak_rss_mib() - before
    });
    println!("large_blob: download of a {mib} MiB blob grew peak RSS by {growth:.1} MiB");

    let mut c = Criterion::default().configure_from_args();
    let mut g = c.benchmark_group("large_blob");
    g.sample_size(10)
        .measurement_time(Duration::from_secs(20))
        .throughput(Throughput::Bytes(size as u64));

    // The same bytes the server holds, hashed in 1 MiB chunks.
    let data = benches::pseudo_random_bytes(size, 7);
    assert_eq!(Digest::of_bytes(&data), digest);
    g.bench_function(format!("hash_only/{mib}MiB"), |b| {
        b.iter(|| {
            let mut h = Hasher::new();
            for c in data.chunks(1024 * 1024) {
                h.update(c);
            }
            h.finish()
        })
    });
    drop(data);

    g.bench_function(format!("download/{mib}MiB"), |b| {
        b.iter_batched(
            || {
                let dir = tmp();
                let store = Store::with_remote(
                    LocalStore::open(LocalStoreOptions::new(dir.path())).unwrap(),
                    provider.clone(),
                );
                (dir, store)
            },
            |(dir, store)| {
                rt.block_on(store.ensure_local(digest)).unwrap();
                dir
            },
            BatchSize::PerIteration,
        )
    });

    // Upload from a pool file; the server forgets the blob before each iteration.
    let src = tmp();
    let local = LocalStore::open(LocalStoreOptions::new(src.path())).unwrap();
    rt.block_on(Store::with_remote(local.clone(), provider.clone()).ensure_local(digest))
        .unwrap();
    let pool_path = local.load_file(digest).unwrap().unwrap();
    g.bench_function(format!("upload/{mib}MiB"), |b| {
        b.iter_batched(
            || server.remove_blob(digest),
            |()| {
                rt.block_on(async {
                    let f = tokio::fs::File::open(&pool_path).await.unwrap();
                    provider.store_file(digest, f).await.unwrap();
                })
            },
            BatchSize::PerIteration,
        )
    });
    assert!(server.has_blob(digest));
    g.finish();
    c.final_summary();
}
