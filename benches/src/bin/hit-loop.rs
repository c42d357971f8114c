//! Runs one kind of cache hit in a loop, for a profiler to watch (`perf record -g`):
//!
//! ```sh
//! cargo build --release -p benches --bin hit-loop
//! perf record -F 2000 -g target/release/hit-loop defer ct 10
//! ```
//!
//! Arguments: `fetch|validate|defer`, `ct|mt` (current-thread or multi-thread runtime), seconds,
//! and optionally `--floor`: then each hit alternates with its floor (the bare RPCs, as
//! perf-report measures them) and the medians and their ratio are printed — a quick way to try
//! a change to the hit path without the whole perf-report.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use benches::hit::{HitFixture, median};
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
    let with_floor = args.iter().any(|a| a == "--floor");
    let _entered = rt.enter();
    let fixture = rt.block_on(HitFixture::new());
    let machine = fixture.machine(behavior);
    let until = Instant::now() + Duration::from_secs(seconds);
    let mut n = 0u64;
    let mut total = Duration::ZERO;
    let (mut hits, mut floors) = (vec![], vec![]);
    while Instant::now() < until {
        if behavior == CacheContentBehavior::Fetch {
            machine.forget_outputs();
        }
        let hit = rt.block_on(fixture.hit(&machine));
        total += hit;
        hits.push(hit);
        if with_floor {
            floors.push(rt.block_on(fixture.floor(behavior)));
        }
        n += 1;
    }
    println!(
        "{n} hits, mean {:.1} µs",
        total.as_secs_f64() * 1e6 / n as f64
    );
    if with_floor {
        let (h, f) = (median(&mut hits), median(&mut floors));
        println!(
            "median hit {:.1} µs, floor {:.1} µs, hit/floor {:.2}",
            h.as_secs_f64() * 1e6,
            f.as_secs_f64() * 1e6,
            h.as_secs_f64() / f.as_secs_f64()
        );
    }
}
