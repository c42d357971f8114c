//! Large-blob transfer through the in-process REAPI server on loopback, next to the hash-only
//! throughput of the same bytes in the same run (hashing is the floor every transfer pays).
//!
//! `cargo bench -p benches --bench large_blob` moves 1 GiB; `RECACHE_BENCH_BLOB_MIB=256` for a
//! quicker run. Also prints the download's peak memory growth, which must not scale with the
//! blob size (it streams into a pool temp file).

#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use benches::transfer::TransferFixture;
use criterion::{Criterion, Throughput};

fn main() {
    let mib = benches::blob_mib(1024);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let t = rt.block_on(TransferFixture::new(
        mib,
        std::path::Path::new(env!("CARGO_TARGET_TMPDIR")),
    ));

    // Peak memory of one download, measured before criterion allocates anything.
    let growth = rt.block_on(t.download_peak_rss_growth_mib());
    println!("large_blob: download of a {mib} MiB blob grew peak RSS by {growth:.1} MiB");

    let mut c = Criterion::default().configure_from_args();
    let mut g = c.benchmark_group("large_blob");
    g.sample_size(10)
        .measurement_time(Duration::from_secs(20))
        .throughput(Throughput::Bytes(t.size as u64));
    let data = t.bytes();
    g.bench_function(format!("hash_only/{mib}MiB"), |b| {
        b.iter_custom(|n| (0..n).map(|_| t.hash_only(&data)).sum())
    });
    drop(data);
    g.bench_function(format!("download/{mib}MiB"), |b| {
        b.iter_custom(|n| (0..n).map(|_| rt.block_on(t.download())).sum())
    });
    let (_keep, path) = rt.block_on(t.local_copy());
    g.bench_function(format!("upload/{mib}MiB"), |b| {
        b.iter_custom(|n| (0..n).map(|_| rt.block_on(t.upload(&path))).sum())
    });
    g.finish();
    c.final_summary();
}
