//! Prints ONE JSON object comparing `recache serve` with buildbox-casd and BuildGrid (the rows
//! and ratios `perf-report` prints as its `server` section; see `benches::peers`), for running
//! that section alone:
//!
//! ```sh
//! cargo build --release -p recache && RECACHE_BIN=target/release/recache scripts/reapi-servers.sh start
//! eval "$(scripts/reapi-servers.sh env)"
//! cargo run --release -p benches --bin server-report -- [--quick] [--mib N]
//! ```

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let quick = args.iter().any(|a| a == "--quick");
    let mib = args
        .iter()
        .position(|a| a == "--mib")
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(if quick { 64 } else { 256 });
    match benches::peers::report(quick, mib).await {
        Some(report) => println!("{report}"),
        None => {
            eprintln!(
                "server-report: recache serve is not reachable (RECACHE_TEST_RECACHE); start the \
                 servers with scripts/reapi-servers.sh start and eval its env"
            );
            std::process::exit(2);
        }
    }
}
