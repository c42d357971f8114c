//! One cache hit through `remote_cache::RemoteCacheRunner`, and its floor: the bare RPCs that hit
//! has to make, issued with plain tonic clients against the same in-process server.
//!
//! The action has 10 output files of 4 KiB. Floors: `defer` = GetActionResult;
//! `validate` = + FindMissingBlobs of the 10 outputs; `fetch` = + BatchReadBlobs of them.

use std::sync::Arc;
use std::time::{Duration, Instant};

use hashing::Digest;
use process_execution::{
    CommandRunner as _, Context, LocalRunner, LocalRunnerOptions, Process, ResultSource,
};
use reapi::build::bazel::remote::execution::v2::{
    self as remexec, action_cache_client::ActionCacheClient,
    content_addressable_storage_client::ContentAddressableStorageClient,
};
use remote_cache::{CacheContentBehavior, RemoteCacheOptions, RemoteCacheRunner};
use store::remote::grpc::{GrpcOptions, GrpcProvider};
use store::{LocalStore, LocalStoreOptions, Store};
use testutil::server::TestServer;
use tonic::transport::Channel;

/// Number of output files of the benchmarked action.
pub const OUTPUTS: usize = 10;
/// Size of each output file.
pub const OUTPUT_BYTES: usize = 4 * 1024;

/// A server holding one cached action, plus what is needed to hit it.
pub struct HitFixture {
    /// The in-process server.
    pub server: TestServer,
    /// The process whose result is cached.
    pub process: Process,
    /// Its action digest.
    pub action: Digest,
    /// The output blobs.
    pub outputs: Vec<Digest>,
    provider: Arc<GrpcProvider>,
    channel: Channel,
    dir: tempfile::TempDir,
}

/// A machine: a runner over its own local store, opened once and kept warm, as a build engine
/// keeps its store open for a whole build.
pub struct Machine {
    /// The runner.
    pub runner: RemoteCacheRunner,
    store: Store,
    _dir: tempfile::TempDir,
}

impl Machine {
    /// Empties the local store (outside any timing), so the next fetch hit really downloads.
    pub fn forget_outputs(&self) {
        self.store.local().gc(0).expect("gc");
    }
}

impl HitFixture {
    /// Starts the server and caches the action on it.
    pub async fn new() -> HitFixture {
        let (server, process, action, outputs) =
            crate::scale::server_with_outputs(OUTPUTS, OUTPUT_BYTES).await;
        let provider = Arc::new(
            GrpcProvider::connect(&server.address(), GrpcOptions::default())
                .await
                .expect("connect"),
        );
        let channel =
            tonic::transport::Endpoint::from_shared(format!("http://{}", server.socket_addr()))
                .expect("endpoint")
                .tcp_nodelay(true)
                .connect()
                .await
                .expect("connect");
        HitFixture {
            server,
            process,
            action,
            outputs,
            provider,
            channel,
            dir: tempfile::tempdir().expect("tempdir"),
        }
    }

    /// A runner on a new, empty local store.
    pub fn machine(&self, behavior: CacheContentBehavior) -> Machine {
        let dir = tempfile::tempdir_in(self.dir.path()).expect("tempdir");
        let local =
            LocalStore::open(LocalStoreOptions::new(dir.path().join("store"))).expect("store");
        let store = Store::with_remote(local, self.provider.clone());
        let inner_store = match behavior {
            CacheContentBehavior::Fetch => store.into_local_only(),
            _ => store.clone(),
        };
        let inner = LocalRunner::new(inner_store, LocalRunnerOptions::new(dir.path().join("sb")));
        let runner = RemoteCacheRunner::new(
            Arc::new(inner),
            store.clone(),
            self.provider.clone(),
            RemoteCacheOptions {
                cache_content_behavior: behavior,
                cache_write: false,
                ..Default::default()
            },
        );
        Machine {
            runner,
            store,
            _dir: dir,
        }
    }

    /// One hit through the runner; panics if it is not a hit.
    pub async fn hit(&self, machine: &Machine) -> Duration {
        let start = Instant::now();
        let r = machine
            .runner
            .run(Context::default(), self.process.clone())
            .await
            .expect("hit");
        let took = start.elapsed();
        assert_eq!(
            r.metadata.source,
            ResultSource::RemoteCacheHit,
            "benchmark expects a hit"
        );
        took
    }

    /// The bare RPCs a hit of `behavior` must make, with plain tonic clients.
    pub async fn floor(&self, behavior: CacheContentBehavior) -> Duration {
        let start = Instant::now();
        let mut ac = ActionCacheClient::new(self.channel.clone());
        let ar = ac
            .get_action_result(remexec::GetActionResultRequest {
                action_digest: Some(self.action.into()),
                ..Default::default()
            })
            .await
            .expect("GetActionResult")
            .into_inner();
        let digests: Vec<remexec::Digest> = ar
            .output_files
            .iter()
            .filter_map(|f| f.digest.clone())
            .collect();
        let mut cas = ContentAddressableStorageClient::new(self.channel.clone());
        match behavior {
            CacheContentBehavior::Defer => {}
            CacheContentBehavior::Validate => {
                cas.find_missing_blobs(remexec::FindMissingBlobsRequest {
                    blob_digests: digests,
                    ..Default::default()
                })
                .await
                .expect("FindMissingBlobs");
            }
            CacheContentBehavior::Fetch => {
                cas.batch_read_blobs(remexec::BatchReadBlobsRequest {
                    digests,
                    ..Default::default()
                })
                .await
                .expect("BatchReadBlobs");
            }
        }
        start.elapsed()
    }
}

/// Median of `samples` (sorted in place).
pub fn median(samples: &mut [Duration]) -> Duration {
    samples.sort();
    samples.get(samples.len() / 2).copied().unwrap_or_default()
}

/// Memory a long build's deferred hits hold (issue 26 item 2): RSS growth, in MiB per 10 000
/// defer hits, of a runner serving `hits` distinct actions (each with the same 8 KiB
/// environment, as an engine passes, and one output file of its own) from an in-process server, measured
/// from after the first 500 hits (allocator and runtime warm) to the last.
pub async fn defer_rss_mib_per_10k_hits(hits: usize) -> f64 {
    let server = TestServer::start().await;
    // The server shares this process: its log of every call's metadata would count too.
    server.forget_request_metadata();
    let env: std::collections::BTreeMap<String, String> = (0..100)
        .map(|i| (format!("BUILD_VAR_{i:03}"), format!("{i:03}").repeat(26)))
        .collect();
    // Processes are made as they run (as an engine makes them): one made up front for every
    // action would be freed as they run and hide what the runner keeps.
    let make = |i: usize| {
        let mut p = Process::new(["/bin/true".to_owned(), format!("action-{i}")]);
        p.env = env.clone();
        p.output_files = vec!["out".into()];
        p
    };
    for i in 0..hits {
        // Each action's own output, as real actions have.
        let out = server.put_blob(format!("the output of action {i}").as_bytes());
        let ar = remexec::ActionResult {
            output_files: vec![remexec::OutputFile {
                path: "out".into(),
                digest: Some(out.into()),
                ..Default::default()
            }],
            ..Default::default()
        };
        server.put_action_result(
            process_execution::action::make_action(&make(i)).action_digest,
            ar,
        );
    }
    let provider = Arc::new(
        GrpcProvider::connect(&server.address(), GrpcOptions::default())
            .await
            .expect("connect"),
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let local = LocalStore::open(LocalStoreOptions::new(dir.path().join("store"))).expect("store");
    let store = Store::with_remote(local, provider.clone());
    let inner = LocalRunner::new(
        store.clone(),
        LocalRunnerOptions::new(dir.path().join("sb")),
    );
    let runner = RemoteCacheRunner::new(
        Arc::new(inner),
        store,
        provider,
        RemoteCacheOptions {
            cache_content_behavior: CacheContentBehavior::Defer,
            cache_write: false,
            ..Default::default()
        },
    );
    let warm = 500.min(hits / 10);
    let mut base = 0.0;
    for i in 0..hits {
        if i == warm {
            base = crate::rss_mib();
        }
        let r = runner.run(Context::default(), make(i)).await.expect("hit");
        assert_eq!(r.metadata.source, ResultSource::RemoteCacheHit);
    }
    let grown = (crate::rss_mib() - base).max(0.0);
    drop(runner);
    grown * 10_000.0 / (hits - warm) as f64
}
