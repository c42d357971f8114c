//! Runs one kind of cache hit in a loop, for a profiler to watch (`perf record -g`):
//!
//! ```sh
//! cargo build --release -p benches --bin hit-loop
//! perf record -F 2000 -g target/release/hit-loop defer ct 10
//! ```
//!
//! Arguments: `fetch|validate|defer`, `ct|mt` (current-thread or multi-thread runtime), seconds.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use benches::hit::HitFixture;
use remote_cache::CacheContentBehavior;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let behavior: CacheContentBehavior =
        args.get(1).map_or("defer", String::as_str).parse().unwrap();
    let rt = match args.get(2).map_or("ct", String::as_str) {
        "mt" => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build(),
        _ => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build(),
    }
    .unwrap();
    let seconds: u64 = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(10);
    let _entered = rt.enter();
    let fixture = rt.block_on(HitFixture::new());
    let machine = fixture.machine(behavior);
    let until = Instant::now() + Duration::from_secs(seconds);
    let mut n = 0u64;
    let mut total = Duration::ZERO;
    while Instant::now() < until {
        if behavior == CacheContentBehavior::Fetch {
            machine.forget_outputs();
        }
        total += rt.block_on(fixture.hit(&machine));
        n += 1;
    }
    println!(
        "{n} hits, mean {:.1} µs",
        total.as_secs_f64() * 1e6 / n as f64
    );
}
