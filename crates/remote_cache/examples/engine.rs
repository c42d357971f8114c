//! A small build engine on top of recache: 50 processes, 8 at a time, each producing a small
//! output file, an output directory with nested subdirectories, and (every 10th) a 1 MiB file.
//!
//! For each cache behavior it builds twice, each time on a fresh local store (a fresh
//! machine): the first build runs (or hits, on a warm cache), the second must be all hits. Then
//! it reads every output back through the store API and checks the bytes.
//!
//! ```sh
//! cargo run -p recache-remote-cache --example engine                           # a file:// cache in a temp dir
//! cargo run -p recache-remote-cache --example engine -- grpc://127.0.0.1:8980 main   # a REAPI server, instance "main"
//! ```
//!
//! Exits non-zero (with the reason) if any second-build action was not a hit or any output
//! read back wrong. `crates/remote_cache/tests/engine.rs` runs it against `file://` and the
//! real servers.

use std::sync::Arc;

use futures::StreamExt;
// One dependency: remote_cache re-exports what an engine needs.
use remote_cache::{
    CacheContentBehavior, CacheOutcome, CommandRunner as _, Context, GrpcOptions, LocalRunner,
    LocalRunnerOptions, LocalStore, LocalStoreOptions, Process, ProcessResult, RemoteCacheOptions,
    RemoteCacheRunner, Store, provider_from_address,
};

const PROCESSES: usize = 50;
const PARALLELISM: usize = 8;
const LARGE_BYTES: usize = 1024 * 1024;

/// The engine's process `i`, and what each of its outputs must contain.
fn process(i: usize, salt: &str) -> (Process, Vec<(String, Vec<u8>)>) {
    let small = format!("small output {i} {salt}\n");
    let nested = format!("nested output {i} {salt}\n");
    let mut script = format!(
        "printf '%s' '{small}' > out_{i}.txt; mkdir -p gen_{i}/sub/deeper; \
         printf '%s' '{nested}' > gen_{i}/sub/deeper/n.txt; echo top > gen_{i}/top.txt"
    );
    let mut expected = vec![
        (format!("out_{i}.txt"), small.into_bytes()),
        (format!("gen_{i}/sub/deeper/n.txt"), nested.into_bytes()),
        (format!("gen_{i}/top.txt"), b"top\n".to_vec()),
    ];
    let mut outputs = vec![format!("out_{i}.txt")];
    if i.is_multiple_of(10) {
        // A pool-sized output: streamed, never batched.
        script += &format!("; yes '{salt} {i}' | head -c {LARGE_BYTES} > big_{i}.bin");
        let line = format!("{salt} {i}\n");
        let big: Vec<u8> = line.bytes().cycle().take(LARGE_BYTES).collect();
        expected.push((format!("big_{i}.bin"), big));
        outputs.push(format!("big_{i}.bin"));
    }
    let p = Process::new(["/bin/sh", "-c", &script])
        .env("PATH", "/usr/bin:/bin")
        .output_files(outputs)
        .output_directories([format!("gen_{i}")]);
    (p, expected)
}

/// One build on a fresh machine; returns (hits, results).
async fn build(
    address: &str,
    instance: &str,
    behavior: CacheContentBehavior,
    machine: &std::path::Path,
    salt: &str,
) -> Result<(usize, Vec<(ProcessResult, Vec<(String, Vec<u8>)>)>, Store), String> {
    let options = GrpcOptions {
        instance_name: instance.to_owned(),
        ..Default::default()
    };
    let remote = provider_from_address(address, options)
        .await
        .map_err(|e| e.to_string())?;
    let local = LocalStore::open(LocalStoreOptions::new(machine.join("store")))
        .map_err(|e| e.to_string())?;
    let store = Store::with_remote(local, remote.bytes);
    let sandboxes = machine.join("sandboxes");
    let runner = Arc::new(RemoteCacheRunner::wrapping(
        store.clone(),
        remote.action_cache,
        RemoteCacheOptions {
            cache_content_behavior: behavior,
            ..Default::default()
        },
        |inner_store| {
            let mut o = LocalRunnerOptions::new(sandboxes);
            o.parallelism = PARALLELISM;
            Arc::new(LocalRunner::new(inner_store, o))
        },
    ));
    let results: Vec<_> = futures::stream::iter(0..PROCESSES)
        .map(|i| {
            let runner = runner.clone();
            let (p, expected) = process(i, salt);
            async move { (runner.run(Context::default(), p).await, expected) }
        })
        .buffer_unordered(PARALLELISM)
        .collect()
        .await;
    let report = runner.finish().await;
    if !report.is_complete() {
        return Err(format!("{report}"));
    }
    let mut out = Vec::new();
    let mut hits = 0;
    for (r, expected) in results {
        let r = r.map_err(|e| e.to_string())?;
        if r.exit_code != 0 {
            return Err(format!("a process failed with exit code {}", r.exit_code));
        }
        if r.metadata.cache == CacheOutcome::Hit {
            hits += 1;
        }
        out.push((r, expected));
    }
    Ok((hits, out, store))
}

async fn engine(address: &str, instance: &str) -> Result<(), String> {
    let work = tempfile::tempdir().map_err(|e| e.to_string())?;
    for behavior in [
        CacheContentBehavior::Fetch,
        CacheContentBehavior::Validate,
        CacheContentBehavior::Defer,
    ] {
        // Fresh keys for every behavior, so a warm cache cannot make the first build hit.
        let salt = uuid::Uuid::new_v4().simple().to_string();
        let (first_hits, _, _) = build(
            address,
            instance,
            behavior,
            &work.path().join(format!("{behavior:?}-a")),
            &salt,
        )
        .await?;
        let started = std::time::Instant::now();
        let (hits, results, store) = build(
            address,
            instance,
            behavior,
            &work.path().join(format!("{behavior:?}-b")),
            &salt,
        )
        .await?;
        let took = started.elapsed();
        // Read every output back through the store API (a deferred hit fetches here).
        let mut checked = 0;
        for (r, expected) in &results {
            for (path, bytes) in expected {
                let got = store
                    .read_file(r.output_root, path)
                    .await
                    .map_err(|e| format!("{behavior:?}: reading {path}: {e}"))?;
                if got[..] != bytes[..] {
                    return Err(format!("{behavior:?}: {path} read back wrong"));
                }
                checked += 1;
            }
        }
        println!(
            "{behavior:?}: first build {first_hits}/{PROCESSES} hits; second build from a fresh store {hits}/{PROCESSES} hits in {took:?}; {checked} outputs read back correctly"
        );
        if hits != PROCESSES {
            return Err(format!(
                "{behavior:?}: only {hits} of {PROCESSES} actions hit on the second build"
            ));
        }
    }
    Ok(())
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let scratch = tempfile::tempdir().ok();
    let address = match args.first() {
        Some(a) => a.clone(),
        None => match &scratch {
            Some(d) => format!("file://{}", d.path().join("cache").display()),
            None => {
                eprintln!("engine: cannot create a temporary directory");
                std::process::exit(1);
            }
        },
    };
    let instance = args.get(1).cloned().unwrap_or_default();
    println!("engine: {PROCESSES} processes, {PARALLELISM} at a time, against {address}");
    if let Err(e) = engine(&address, &instance).await {
        eprintln!("engine: FAILED: {e}");
        std::process::exit(1);
    }
}
