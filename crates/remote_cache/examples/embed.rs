//! Embedding recache in a build engine, end to end, with no server: the remote cache is a
//! directory (`file://`), exactly as `recache run` uses by default. Swap the address for
//! `grpc://host:port` to use a REAPI server.
//!
//! `cargo run -p recache-remote-cache --example embed`

use std::sync::Arc;

use process_execution::{CommandRunner as _, Context, LocalRunner, LocalRunnerOptions, Process};
use remote_cache::{CacheContentBehavior, RemoteCacheOptions, RemoteCacheRunner};
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
        // The runner hands the inner runner the store its behavior needs (here, fetch: a
        // local-only store, so nothing below the cache ever reaches the remote).
        let sandboxes = work.path().join("sandboxes");
        let runner = RemoteCacheRunner::wrapping(
            store.clone(),
            remote.action_cache,
            RemoteCacheOptions {
                cache_content_behavior: CacheContentBehavior::Fetch,
                ..Default::default()
            },
            |inner_store| {
                Arc::new(LocalRunner::new(
                    inner_store,
                    LocalRunnerOptions::new(sandboxes),
                ))
            },
        );

        let result = runner.run(Context::default(), process.clone()).await?;
        let report = runner.finish().await; // flush the write-behind queue
        let stats = runner.stats();
        println!(
            "{machine}: cache {:?} in {:?} (action {}; {report})",
            result.metadata.cache,
            result.metadata.wall_time,
            result
                .metadata
                .action_digest
                .map(|d| d.to_string())
                .unwrap_or_default(),
        );
        assert_eq!(stats.hits + stats.true_misses, 1);
        // Read the output back through the store (fetched now if it were not local).
        let app_o = store.read_file(result.output_root, "app.o").await?;
        print!("  app.o: {}", String::from_utf8_lossy(&app_o));
    }
    Ok(())
}
