//! Prints ONE JSON object comparing `recache serve --http-listen` with nginx, and our HTTP path
//! with our gRPC path (the rows and ratios `perf-report` prints as its `http` section; see
//! `benches::http`), for running that section alone:
//!
//! ```sh
//! scripts/nginx.sh start && eval "$(scripts/nginx.sh env)"
//! cargo run --release -p benches --bin http-report -- [--quick]
//! scripts/nginx.sh stop
//! ```

#![allow(clippy::expect_used)]

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let dir = tempfile::tempdir().expect("a temporary directory");
    match benches::http::report(quick, dir.path()).await {
        Some(report) => println!("{report}"),
        None => {
            eprintln!(
                "http-report: nginx is not running (RECACHE_TEST_NGINX); start it with \
                 scripts/nginx.sh start and eval \"$(scripts/nginx.sh env)\""
            );
            std::process::exit(2);
        }
    }
}
