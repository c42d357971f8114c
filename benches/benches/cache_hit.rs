//! One cache hit end to end through `remote_cache::RemoteCacheRunner` for each behavior, next to its
//! floor in the same run: the bare RPCs that hit must make, issued with plain tonic clients.
//!
//! `cargo bench -p benches --bench cache_hit`

#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use benches::hit::HitFixture;
use criterion::{Criterion, criterion_group, criterion_main};
use remote_cache::CacheContentBehavior;

fn cache_hit(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    // Runners start their write-behind task on construction: keep the runtime entered.
    let _entered = rt.enter();
    let fixture = rt.block_on(HitFixture::new());
    let mut g = c.benchmark_group("cache_hit");
    for (behavior, name) in [
        (CacheContentBehavior::Fetch, "fetch"),
        (CacheContentBehavior::Validate, "validate"),
        (CacheContentBehavior::Defer, "defer"),
    ] {
        let machine = fixture.machine(behavior);
        g.bench_function(format!("hit/{name}"), |b| {
            b.iter_custom(|n| {
                (0..n)
                    .map(|_| {
                        if behavior == CacheContentBehavior::Fetch {
                            machine.forget_outputs(); // untimed: the next hit must download
                        }
                        rt.block_on(fixture.hit(&machine))
                    })
                    .sum()
            })
        });
        g.bench_function(format!("floor/{name}"), |b| {
            b.iter(|| rt.block_on(fixture.floor(behavior)))
        });
    }
    g.finish();
}

criterion_group!(benches, cache_hit);
criterion_main!(benches);
