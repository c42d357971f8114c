//! Compares the SHA-256 backends behind the hashing crate's API on incompressible data.
//!
//! `cargo bench -p benches --bench hashing`: throughput per backend, for a typical small blob
//! (4 KiB), a pool-sized blob (1 MiB) and a large streamed blob (64 MiB fed in 1 MiB chunks).

#![allow(missing_docs)]

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use hashing::Hasher;
use hashing::backends::Sha2Hasher;
use std::hint::black_box;

fn sha256_backends(c: &mut Criterion) {
    let mut group = c.benchmark_group("sha256");
    for size in [4 * 1024, 1024 * 1024, 64 * 1024 * 1024] {
        let data = benches::pseudo_random_bytes(size, 42);
        group.throughput(Throughput::Bytes(size as u64));
        if size >= 64 * 1024 * 1024 {
            group.sample_size(10);
        }
        group.bench_with_input(BenchmarkId::new("ring", size), &data, |b, data| {
            b.iter(|| {
                let mut h = Hasher::new();
                for chunk in data.chunks(1024 * 1024) {
                    h.update(chunk);
                }
                black_box(h.finish())
            })
        });
        group.bench_with_input(BenchmarkId::new("sha2", size), &data, |b, data| {
            b.iter(|| {
                let mut h = Sha2Hasher::new();
                for chunk in data.chunks(1024 * 1024) {
                    h.update(chunk);
                }
                black_box(h.finish())
            })
        });
    }
    group.finish();
}

criterion_group!(benches, sha256_backends);
criterion_main!(benches);
