//! `recache`: run one command through the remote cache. See `recache --help`.

mod args;
mod bench;
mod bench_report;
mod cache_dir;
mod fetch;
mod job_cache;
mod job_cache_rust;
mod progress;
mod run;
mod serve;
mod staging;
mod warnings;

use clap::Parser;
use store::{LocalStore, LocalStoreOptions};

use crate::args::{Cli, Command};
use crate::cache_dir::{CacheDir, human_bytes};

/// Exit code for recache's own errors (bad flags, unusable cache directory, …), distinct from
/// any code the wrapped command returns in normal use.
const RECACHE_ERROR_EXIT: i32 = 125;

/// An error of recache itself, with a message that says what to fix.
#[derive(Debug)]
pub struct CliError(String);

impl CliError {
    /// An error with a message for the user.
    pub fn new(msg: impl Into<String>) -> CliError {
        CliError(msg.into())
    }
}

fn main() {
    // The `setup` phase of a run's record starts here (before flags are parsed).
    let started = std::time::Instant::now();
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let code = if e.use_stderr() {
                RECACHE_ERROR_EXIT
            } else {
                0
            };
            let _ = e.print();
            std::process::exit(code);
        }
    };
    let chosen_level = std::env::var("RECACHE_LOG").ok();
    let level = chosen_level.as_deref().unwrap_or("warn");
    let level = level.parse().unwrap_or(tracing::Level::WARN);
    // A run's cache trouble is one line at its end (see `warnings`), unless the user asked for
    // the log.
    if matches!(cli.command, Command::Run(_)) && chosen_level.is_none() {
        warnings::collect();
    }
    tracing_subscriber::fmt()
        .with_writer(warnings::LogWriter::default)
        .with_target(false)
        .without_time()
        .with_max_level(level)
        .init();

    // One command at a time: a current-thread runtime answers an RPC in ≈ 45 µs on loopback
    // where a multi-thread one needs ≈ 200 µs (cross-thread wake-ups). Blocking work (capture,
    // materialize, hashing large files) runs on spawn_blocking threads either way. The server
    // serves many clients at once: every core.
    // `bench` too: it measures the runner as engines embed it, with up to 64 calls in flight.
    let runtime = match &cli.command {
        Command::Serve(_) | Command::Bench(_) => tokio::runtime::Builder::new_multi_thread(),
        _ => tokio::runtime::Builder::new_current_thread(),
    }
    .enable_all()
    .build();
    let runtime = match runtime {
        Ok(r) => r,
        Err(e) => fail(CliError::new(format!(
            "cannot start the async runtime: {e}"
        ))),
    };
    let code = runtime.block_on(async {
        match cli.command {
            Command::Run(args) => run::run(*args, started).await,
            Command::Stats(a) => stats(a.cache_dir).map(|()| 0),
            Command::Gc(a) => gc(a.cache_dir.cache_dir, a.target_size).map(|()| 0),
            Command::Serve(a) => serve::serve(*a).await.map(|()| 0),
            Command::Bench(a) => bench::bench(*a).await,
            Command::Fetch(a) => fetch::fetch(*a).await,
            Command::Cache(c) => job_cache::command(c).await,
        }
    });
    // `std::process::exit` runs no destructors: whatever still holds the store (a write-behind
    // task, a blocking thread) is stopped first, so the store is closed cleanly and the next
    // open need not repair it.
    runtime.shutdown_timeout(std::time::Duration::from_secs(5));
    warnings::finish();
    match code {
        Ok(c) => std::process::exit(c),
        Err(e) => fail(e),
    }
}

fn fail(e: CliError) -> ! {
    eprintln!("recache: error: {}", e.0);
    std::process::exit(RECACHE_ERROR_EXIT);
}

fn open_store(cache: &CacheDir) -> Result<LocalStore, CliError> {
    LocalStore::open(LocalStoreOptions::new(cache.store_dir()))
        .map_err(|e| CliError::new(format!("cannot open the local store: {e}")))
}

fn stats(dir: Option<std::path::PathBuf>) -> Result<(), CliError> {
    let cache = CacheDir::resolve(dir)?;
    let usage = open_store(&cache)?.usage();
    let t = cache.totals();
    println!("cache directory   {}", cache.root().display());
    println!(
        "local store       {} blobs, {} ({} small in the database, {} large in the pool)",
        usage.total_blobs(),
        human_bytes(usage.total_bytes()),
        usage.small_blobs,
        usage.large_blobs
    );
    println!(
        "runs              {} ({} hits, {} misses, {} misses after a cache error, {} without the cache)",
        t.runs, t.hits, t.misses, t.misses_after_error, t.uncached_after_error
    );
    println!(
        "transferred       {} down, {} up",
        human_bytes(t.bytes_downloaded),
        human_bytes(t.bytes_uploaded)
    );
    println!("time saved        {:.2} s", t.time_saved_ms / 1000.0);
    Ok(())
}

fn gc(dir: Option<std::path::PathBuf>, target: u64) -> Result<(), CliError> {
    let cache = CacheDir::resolve(dir)?;
    let store = open_store(&cache)?;
    let before = store.usage().total_bytes();
    let report = store
        .gc(target)
        .map_err(|e| CliError::new(format!("garbage collection failed: {e}")))?;
    println!(
        "recache gc: {} -> {} (removed {} blobs, {}; {} kept because in use)",
        human_bytes(before),
        human_bytes(report.remaining_bytes),
        report.removed_blobs,
        human_bytes(report.removed_bytes),
        report.leased_skipped
    );
    // Partial files of the default cache's writes that were killed (never counted as entries).
    let default_cache = cache.default_cache_dir();
    if default_cache.is_dir()
        && let Ok(provider) = store::remote::local_dir::LocalDirProvider::open(&default_cache)
    {
        let removed = provider.remove_stale_temps();
        if removed > 0 {
            println!(
                "recache gc: removed {} of temp files interrupted writes left in {}",
                human_bytes(removed),
                default_cache.display()
            );
        }
    }
    Ok(())
}
