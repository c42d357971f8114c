//! Costs that must not grow with what the cache holds or with how many outputs a hit has.
//!
//! - [`many_outputs_fetch_memory`]: peak memory growth of one fetch hit whose action has `n`
//!   small outputs (20 000 × 4 KiB in `perf-report`). Memory must stay flat in `n`: outputs are
//!   fetched and committed in bounded groups.
//! - [`cli_path_hit`]: what a `recache run` hit pays inside the process, on a current-thread
//!   runtime: open the local store, build the runner, one fetch hit whose outputs are already
//!   local, shut the runner down. Measured on an empty store and on one holding 200 000 blobs: opening must not read
//!   the whole store.

use std::sync::Arc;
use std::time::{Duration, Instant};

use process_execution::action::make_action;
use process_execution::{
    CommandRunner as _, Context, LocalRunner, LocalRunnerOptions, Process, ResultSource,
};
use reapi::build::bazel::remote::execution::v2 as remexec;
use remote_cache::{CacheContentBehavior, RemoteCacheOptions, RemoteCacheRunner};
use store::remote::grpc::{GrpcOptions, GrpcProvider};
use store::{LocalStore, LocalStoreOptions, Store};
use testutil::server::TestServer;

/// A server with one cached action of `n` output files (`out/<i>.bin`) of `size` bytes each:
/// the server, the process, its action digest and the output digests.
pub async fn server_with_outputs(
    n: usize,
    size: usize,
) -> (TestServer, Process, hashing::Digest, Vec<hashing::Digest>) {
    let server = TestServer::start().await;
    let process = Process::new(["/bin/true"]).output_files((0..n).map(|i| format!("out/{i}.bin")));
    let action = make_action(&process).action_digest;
    let mut output_files = Vec::with_capacity(n);
    let mut outputs = Vec::with_capacity(n);
    for i in 0..n {
        let d = server.put_blob(&crate::pseudo_random_bytes(size, i as u64 + 1));
        outputs.push(d);
        output_files.push(remexec::OutputFile {
            path: format!("out/{i}.bin"),
            digest: Some(d.into()),
            ..Default::default()
        });
    }
    server.put_action_result(
        action,
        remexec::ActionResult {
            output_files,
            ..Default::default()
        },
    );
    (server, process, action, outputs)
}

fn runner(
    store: &Store,
    provider: Arc<GrpcProvider>,
    sandboxes: &std::path::Path,
) -> RemoteCacheRunner {
    let inner = LocalRunner::new(store.into_local_only(), LocalRunnerOptions::new(sandboxes));
    RemoteCacheRunner::new(
        Arc::new(inner),
        store.clone(),
        provider,
        RemoteCacheOptions {
            cache_content_behavior: CacheContentBehavior::Fetch,
            cache_write: false,
            ..Default::default()
        },
    )
}

/// Memory growth of one fetch hit with many outputs: the kernel's peak RSS, and the peak of
/// anonymous memory alone.
pub struct HitMemory {
    /// Peak RSS growth, MiB. Includes clean pages of the LMDB file mapped into the process: the
    /// kernel maps up to 16 cached neighbours of every page a B-tree lookup touches
    /// ("fault-around"), so blobs just written show up here though nothing holds them and the
    /// kernel can drop them at any time.
    pub rss_mib: f64,
    /// Peak growth of anonymous memory (heap, buffers), MiB: what the hit really holds.
    pub anon_mib: f64,
}

/// Memory growth of one fetch hit of an action with `n` outputs of `size` bytes, on a fresh
/// local store. The server runs in this process too, so its side of the transfer counts.
pub async fn many_outputs_fetch_memory(n: usize, size: usize) -> HitMemory {
    let (server, process, _, _) = server_with_outputs(n, size).await;
    let dir = tempfile::tempdir().unwrap();
    let provider = Arc::new(
        GrpcProvider::connect(&server.address(), GrpcOptions::default())
            .await
            .unwrap(),
    );
    let store = Store::with_remote(
        LocalStore::open(LocalStoreOptions::new(dir.path().join("store"))).unwrap(),
        provider.clone(),
    );
    let r = runner(&store, provider, &dir.path().join("sb"));
    crate::reset_peak_rss().expect("clear_refs");
    let (before, anon_before) = (crate::rss_mib(), crate::rss_anon_mib());
    let sampler = crate::AnonPeak::start();
    let result = r.run(Context::default(), process).await.unwrap();
    let anon_peak = sampler.peak();
    let rss_mib = (crate::peak_rss_mib() - before).max(0.0);
    assert_eq!(result.metadata.source, ResultSource::RemoteCacheHit);
    HitMemory {
        rss_mib,
        anon_mib: (anon_peak - anon_before).max(0.0),
    }
}

/// Fills the store at `root` with `blobs` distinct small blobs (`compressed`: as `recache serve`
/// keeps its store).
pub fn fill_store(root: &std::path::Path, blobs: usize, compressed: bool) {
    let mut options = LocalStoreOptions::new(root);
    if compressed {
        options.pool_compression = store::PoolCompression::Zstd;
    }
    let local = LocalStore::open(options).unwrap();
    for i in 0..blobs {
        local
            .store_bytes(format!("filler blob {i:012}").as_bytes())
            .unwrap();
    }
    local.flush_access_times().unwrap();
}

/// Median time of the CLI's in-process hit path (open the store at `root`, build the runner,
/// one fetch hit with the outputs already local) over `reps`, on a current-thread runtime.
pub fn cli_path_hit(
    rt: &tokio::runtime::Runtime,
    server: &TestServer,
    process: &Process,
    root: &std::path::Path,
    reps: usize,
) -> Duration {
    let _entered = rt.enter();
    let provider = Arc::new(
        rt.block_on(GrpcProvider::connect(
            &server.address(),
            GrpcOptions::default(),
        ))
        .unwrap(),
    );
    let sandboxes = root.join("sb");
    let mut samples = Vec::with_capacity(reps);
    for i in 0..reps + 5 {
        let start = Instant::now();
        let local = LocalStore::open(LocalStoreOptions::new(root)).unwrap();
        let store = Store::with_remote(local, provider.clone());
        let r = runner(&store, provider.clone(), &sandboxes);
        let result = rt
            .block_on(r.run(Context::default(), process.clone()))
            .unwrap();
        // As the CLI does; this also ends the writer task, which holds the store open.
        rt.block_on(r.shutdown()).unwrap();
        let took = start.elapsed();
        assert_eq!(result.metadata.source, ResultSource::RemoteCacheHit);
        drop(r);
        drop(store);
        if i >= 5 {
            samples.push(took);
        }
    }
    crate::hit::median(&mut samples)
}

/// Time from starting `recache serve`'s server on a store holding `blobs` small blobs (filled
/// beforehand, untimed) to its first answered RPC: open the storage, bind, serve, answer
/// `GetCapabilities` and a `FindMissingBlobs`. A persisted index (the store's counters), not a
/// walk of the blobs, is what keeps this flat.
pub async fn server_restart(storage: &std::path::Path) -> Duration {
    use reapi::build::bazel::remote::execution::v2::{
        capabilities_client::CapabilitiesClient,
        content_addressable_storage_client::ContentAddressableStorageClient,
    };
    let started = Instant::now();
    let server = server::CacheServer::open(server::ServerOptions::new(storage)).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let handle = tokio::spawn(server.serve(listener, async {
        let _ = rx.await;
    }));
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    CapabilitiesClient::new(channel.clone())
        .get_capabilities(remexec::GetCapabilitiesRequest::default())
        .await
        .unwrap();
    ContentAddressableStorageClient::new(channel)
        .find_missing_blobs(remexec::FindMissingBlobsRequest {
            blob_digests: vec![hashing::Digest::of_bytes(b"filler blob 000000000007").into()],
            ..Default::default()
        })
        .await
        .unwrap();
    let took = started.elapsed();
    let _ = tx.send(());
    let _ = handle.await;
    took
}

/// Bytes a directory tree takes on disk (allocated blocks, so sparse LMDB space is not counted).
pub fn disk_bytes(dir: &std::path::Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let Ok(m) = e.metadata() else { continue };
            if m.is_dir() {
                stack.push(e.path());
            } else {
                total += m.blocks() * 512;
            }
        }
    }
    total
}

/// Stores up to `max_bytes` of `.rs` files found under `corpus` in a store kept as
/// `recache serve` keeps it (compressed at rest) and returns (logical bytes, bytes on disk).
/// Duplicate files are stored once, as in any CAS: the logical figure counts distinct blobs.
pub fn storage_at_rest(corpus: &std::path::Path, max_bytes: u64) -> (u64, u64) {
    let dir = tempfile::tempdir().unwrap();
    let mut options = LocalStoreOptions::new(dir.path());
    options.pool_compression = store::PoolCompression::Zstd;
    let local = LocalStore::open(options).unwrap();
    let mut seen = std::collections::HashSet::new();
    let mut logical = 0u64;
    let mut stack = vec![corpus.to_path_buf()];
    'walk: while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "rs")
                && let Ok(data) = std::fs::read(&p)
            {
                let d = local.store_bytes(&data).unwrap();
                if seen.insert(d) {
                    logical += d.size_bytes;
                }
                if logical >= max_bytes {
                    break 'walk;
                }
            }
        }
    }
    local.flush_access_times().unwrap();
    drop(local);
    (logical, disk_bytes(dir.path()))
}
