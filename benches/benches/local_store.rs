//! The local store's own speed: the floor under every cache hit.
//!
//! `cargo bench -p benches --bench local_store`:
//! - `small/write_1k`, `small/read_1k`: one 1 KiB blob into / out of the database;
//! - `store_file/200MiB`: stream a 200 MiB file into the pool (hash + copy + fsync, one pass);
//! - `capture/10k_x_100B`, `materialize/10k_x_100B`: a directory of 10 000 small files;
//! - `capture/1_x_200MiB`, `materialize/1_x_200MiB`: one large file (materialize = hardlink).

#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;
use std::path::Path;
use std::time::Duration;

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use store::{LocalStore, LocalStoreOptions, MaterializeOptions};

fn tmp() -> tempfile::TempDir {
    tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap()
}

fn open(dir: &Path) -> LocalStore {
    LocalStore::open(LocalStoreOptions::new(dir)).unwrap()
}

/// Materializes into a fresh directory per iteration and returns it, so criterion removes it
/// outside the timed part. (Keeping them would pile up hardlinks to one pool file until the
/// filesystem's per-inode link limit, ≈ 65 000 on ext4, forces copies.)
fn materialize(b: &mut criterion::Bencher<'_>, store: &LocalStore, digest: hashing::Digest) {
    b.iter_batched(
        tmp,
        |dir| {
            store
                .materialize_directory(digest, &dir.path().join("m"), MaterializeOptions::default())
                .unwrap();
            dir
        },
        BatchSize::PerIteration,
    )
}

fn small(c: &mut Criterion) {
    let dir = tmp();
    let store = open(dir.path());
    let mut g = c.benchmark_group("small");
    g.throughput(Throughput::Bytes(1024));
    let mut i = 0u64;
    g.bench_function("write_1k", |b| {
        b.iter(|| {
            i += 1;
            let data = benches::pseudo_random_bytes(1024, i);
            black_box(store.store_bytes(&data).unwrap())
        })
    });
    let digests: Vec<_> = (0..10_000u64)
        .map(|i| {
            store
                .store_bytes(&benches::pseudo_random_bytes(1024, i + (1 << 32)))
                .unwrap()
        })
        .collect();
    let mut j = 0usize;
    g.bench_function("read_1k", |b| {
        b.iter(|| {
            j = (j + 7919) % digests.len();
            black_box(store.load_bytes(digests[j]).unwrap().unwrap())
        })
    });
    g.finish();
}

fn large(c: &mut Criterion) {
    const SIZE: usize = 200 * 1024 * 1024;
    let dir = tmp();
    let store = open(dir.path());
    let src = tmp();
    let big = src.path().join("big.bin");
    std::fs::write(&big, benches::pseudo_random_bytes(SIZE, 5)).unwrap();
    let tree = src.path().join("tree");
    std::fs::create_dir_all(&tree).unwrap();
    std::fs::hard_link(&big, tree.join("big.bin")).unwrap();

    let mut g = c.benchmark_group("large");
    g.sample_size(10).measurement_time(Duration::from_secs(10));
    g.throughput(Throughput::Bytes(SIZE as u64));
    g.bench_function("store_file/200MiB", |b| {
        b.iter(|| black_box(store.store_file(&big, false).unwrap()))
    });
    g.bench_function("capture/1_x_200MiB", |b| {
        b.iter(|| black_box(store.capture_directory(&tree).unwrap()))
    });
    let digest = store.capture_directory(&tree).unwrap();
    g.bench_function("materialize/1_x_200MiB", |b| materialize(b, &store, digest));
    g.finish();
}

fn many_small_files(c: &mut Criterion) {
    let dir = tmp();
    let store = open(dir.path());
    let src = tmp();
    for d in 0..100 {
        let sub = src.path().join(format!("d{d:03}"));
        std::fs::create_dir_all(&sub).unwrap();
        for f in 0..100 {
            let data = benches::pseudo_random_bytes(100, (d * 100 + f) as u64);
            std::fs::write(sub.join(format!("f{f:03}")), data).unwrap();
        }
    }
    let mut g = c.benchmark_group("10k_files");
    g.sample_size(10).measurement_time(Duration::from_secs(10));
    g.throughput(Throughput::Elements(10_000));
    g.bench_function("capture/10k_x_100B", |b| {
        b.iter(|| black_box(store.capture_directory(src.path()).unwrap()))
    });
    let digest = store.capture_directory(src.path()).unwrap();
    g.bench_function("materialize/10k_x_100B", |b| materialize(b, &store, digest));
    g.finish();
}

criterion_group!(benches, small, large, many_small_files);
criterion_main!(benches);
