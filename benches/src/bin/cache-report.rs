//! Prints ONE JSON object: `recache cache save|restore` against tar + zstd through the same
//! caches (the rows and ratios `perf-report` prints as its `job_cache` section; see
//! `benches::job_cache`), for running that section alone:
//!
//! ```sh
//! cargo build --release -p recache -p benches
//! target/release/cache-report [--quick]
//! ```

#![allow(clippy::expect_used)]

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let dir = tempfile::tempdir().expect("a temporary directory");
    match benches::job_cache::report(quick, dir.path()).await {
        Some(report) => println!("{report}"),
        None => {
            eprintln!(
                "cache-report: no release recache binary next to this one: run \
                 cargo build --release -p recache first"
            );
            std::process::exit(2);
        }
    }
}
