//! Prints the RSS deferred hits hold, in MiB per 10 000 hits (perf-report's
//! `defer_rss_mib_per_10k_hits`, alone): `cargo run --release -p benches --bin defer-memory
//! -- [HITS]` (default 20 000).

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let hits = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(20_000);
    let mib = benches::hit::defer_rss_mib_per_10k_hits(hits).await;
    println!(
        "{{\"defer_rss_mib_per_10k_hits\":{:.1},\"hits\":{hits}}}",
        mib
    );
}
