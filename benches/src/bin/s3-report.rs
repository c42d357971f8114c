//! Prints ONE JSON object: `perf-report`'s `s3` section alone (see `benches::s3`): recache serve
//! with its S3 tier on SeaweedFS against a plain multipart copy, and against BuildGrid on S3.
//!
//! ```sh
//! scripts/reapi-servers.sh install && scripts/s3-servers.sh start && eval "$(scripts/s3-servers.sh env)"
//! cargo run --release -p benches --bin s3-report -- [--quick]
//! ```

#![allow(clippy::unwrap_used)] // a benchmark: a broken environment ends it

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let dir = tempfile::tempdir().unwrap();
    match benches::s3::report(quick, dir.path()).await {
        Some(report) => println!("{report}"),
        None => {
            eprintln!(
                "s3-report: SeaweedFS is not reachable (RECACHE_TEST_S3_SEAWEED); start it with \
                 scripts/s3-servers.sh start and eval its env"
            );
            std::process::exit(2);
        }
    }
}
