//! Embedding recache in a build engine, end to end, with no server: the remote cache is a
//! directory (`file://`), exactly as `recache run` uses by default. Swap the address for
//! `grpc://host:port` to use a REAPI server.
//!
//! `cargo run -p remote_cache --example embed`

use std::sync::Arc;

use process_execution::{CommandRunner as _, Context, LocalRunner, LocalRunnerOptions, Process};
use remote_cache::{CacheContentBehavior, CommandRunner, RemoteCacheOptions};
use store::remote::provider_from_address;
use store::{LocalStore, LocalStoreOptions, Store};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let work = tempfile::tempdir()?;
    let cache_address = format!("file://{}", work.path().join("shared-cache").display());

    // The engine's process: produce a file from nothing (a real engine would set input_root to
    // a directory captured with `store.local().capture_directory(…)`).
    let process = Process::new(["/bin/sh", "-c", "sleep 0.2; echo compiled > app.o"])
        .env("PATH", "/usr/bin:/bin")
        .output_files(["app.o"]);

    for machine in ["first machine", "second machine"] {
        // Each "machine" has its own local store; they share the cache.
        let remote = provider_from_address(&cache_address, Default::default()).await?;
        let local = LocalStore::open(LocalStoreOptions::new(work.path().join(machine)))?;
        let store = Store::with_remote(local, remote.bytes);
        // Fetch mode: the inner runner only ever sees the local store.
        let inner = LocalRunner::new(
            store.into_local_only(),
            LocalRunnerOptions::new(work.path().join("sandboxes")),
        );
        let runner = CommandRunner::new(
            Arc::new(inner),
            store.clone(),
            remote.action_cache,
            RemoteCacheOptions {
                cache_content_behavior: CacheContentBehavior::Fetch,
                ..Default::default()
            },
        );

        let result = runner.run(Context::default(), process.clone()).await?;
        runner.shutdown().await?; // flush the write-behind queue
        let stats = runner.stats();
        println!(
            "{machine}: {:?} in {:?} (hits {}, misses {}, written {})",
            result.metadata.source,
            result.metadata.wall_time,
            stats.hits,
            stats.true_misses,
            stats.writes
        );
        // The output is in the local store either way.
        let out = work.path().join(format!("{machine}-out"));
        store
            .local()
            .materialize_directory(result.output_root, &out, Default::default())?;
        print!("  app.o: {}", std::fs::read_to_string(out.join("app.o"))?);
    }
    Ok(())
}
