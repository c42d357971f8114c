//! `remote_cache::RemoteCacheRunner`: wraps any [`process_execution::CommandRunner`] with a REAPI
//! ActionCache lookup, so that a cached process costs one round trip.
//!
//! The flow of one process:
//!
//! 1. Build the REAPI `Command`/`Action`; the action digest is the cache key.
//! 2. `GetActionResult` (bounded by `read_timeout`). A result is untrusted: every digest and
//!    path is validated before anything is accepted (see `convert.rs`). A cached non-zero exit
//!    counts only under cache scope `Always`.
//! 3. On a hit, by [`CacheContentBehavior`]: `Fetch` downloads every output into the local store
//!    now; `Validate` proves with `FindMissingBlobs` that the remote has them all; `Defer` trusts
//!    the entry, and remembers which process produced each output so that a blob found missing
//!    later can be re-created ([`RemoteCacheRunner::recover_missing`]).
//! 4. Any error on that path (RPC failure, timeout, missing or corrupt blob, unsafe path) is a
//!    miss plus a warning: the process runs locally and the build goes on.
//! 5. After a local run whose result is cacheable, a write-behind job uploads what the remote
//!    lacks and then calls `UpdateActionResult`, through a bounded queue (a full queue makes the
//!    caller wait). [`RemoteCacheRunner::finish`] flushes it (within `flush_deadline`) and
//!    reports what reached the cache; call it once, at the end of a build.
//!
//! One dependency is enough: this crate re-exports what an engine needs ([`Process`],
//! [`Context`], [`LocalRunner`], [`Store`], [`LocalStore`], [`Digest`], the providers), and the
//! crates themselves ([`store`], [`process_execution`], [`hashing`]).
//!
//! A whole engine, miss then hit, against a cache in a directory (`file://`; a REAPI server is
//! `grpc://host:port`):
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use std::sync::Arc;
//! use remote_cache::{
//!     CacheOutcome, CommandRunner as _, Context, LocalRunner, LocalRunnerOptions, LocalStore,
//!     LocalStoreOptions, Process, RemoteCacheOptions, RemoteCacheRunner, Store,
//!     provider_from_address,
//! };
//!
//! let dir = tempfile::tempdir()?;
//! let cache = format!("file://{}", dir.path().join("cache").display());
//! let remote = provider_from_address(&cache, Default::default()).await?;
//! for expected in [CacheOutcome::Miss, CacheOutcome::Hit] {
//!     // A fresh machine each time: its own local store.
//!     let machine = tempfile::tempdir()?;
//!     let store = Store::with_remote(
//!         LocalStore::open(LocalStoreOptions::new(machine.path().join("store")))?,
//!         remote.bytes.clone(),
//!     );
//!     let sandboxes = machine.path().join("sandboxes");
//!     let runner = RemoteCacheRunner::wrapping(
//!         store.clone(),
//!         remote.action_cache.clone(),
//!         RemoteCacheOptions::default(),
//!         // The inner runner gets the store its behavior needs (local-only for fetch).
//!         |inner_store| Arc::new(LocalRunner::new(inner_store, LocalRunnerOptions::new(sandboxes))),
//!     );
//!     let process = Process::new(["/bin/sh", "-c", "echo hello > greeting.txt"])
//!         .output_files(["greeting.txt"]);
//!     let result = runner.run(Context::default(), process).await?;
//!     assert_eq!(result.metadata.cache, expected);
//!     assert_eq!(store.read_file(result.output_root, "greeting.txt").await?.as_ref(), b"hello\n");
//!     let report = runner.finish().await; // the miss's result goes to the cache here
//!     assert!(report.is_complete(), "{report}");
//! }
//! # Ok(()) }
//! ```

mod convert;
mod runner;
mod stats;
mod warnings;

use std::time::Duration;

pub use runner::{FlushReport, RemoteCacheRunner};
pub use stats::CacheStats;
pub use warnings::{WarningsBehavior, WarningsTracker};

// What an engine needs, so that this crate is its one dependency.
pub use hashing::{self, Digest};
pub use process_execution::{
    self, CacheOutcome, CacheScope, CommandRunner, Context, LocalRunner, LocalRunnerOptions,
    Process, ProcessError, ProcessResult, ResultSource,
};
/// The REAPI messages and client stubs (an `ActionResult` a provider returns, a `Digest` proto).
pub use reapi;
pub use store::remote::grpc::GrpcOptions;
pub use store::remote::{
    ActionCacheProvider, ByteStoreProvider, RemoteProviders, provider_from_address,
};
pub use store::{self, LocalStore, LocalStoreOptions, MaterializeOptions, Store, StoreError};

/// What a cache hit does with the outputs it names.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum CacheContentBehavior {
    /// Download every output into the local store before returning the hit. The default: the
    /// layers below never touch the remote.
    #[default]
    Fetch,
    /// Prove with `FindMissingBlobs` that the remote holds every output; download nothing.
    Validate,
    /// Trust the entry; outputs are fetched lazily, and a missing one surfaces later as
    /// `ProcessError::MissingDigest`.
    Defer,
}

impl std::str::FromStr for CacheContentBehavior {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "fetch" => Ok(CacheContentBehavior::Fetch),
            "validate" => Ok(CacheContentBehavior::Validate),
            "defer" => Ok(CacheContentBehavior::Defer),
            other => Err(format!(
                "unknown cache content behavior {other:?}: use fetch, validate or defer"
            )),
        }
    }
}

/// Options for [`RemoteCacheRunner::new`]. `RemoteCacheOptions::default()` documents the defaults.
#[derive(Debug, Clone)]
pub struct RemoteCacheOptions {
    /// Look results up in the cache. Default true.
    pub cache_read: bool,
    /// Write results of local runs to the cache. Default true.
    pub cache_write: bool,
    /// What a hit does with its outputs. Default `Fetch`.
    pub cache_content_behavior: CacheContentBehavior,
    /// Which occurrences of a recurring error are logged. Default `Backoff`.
    pub warnings_behavior: WarningsBehavior,
    /// After this long without an answer from the cache, also start the local run and take
    /// whichever finishes first. Zero (the default) turns speculation off.
    pub speculation_delay: Duration,
    /// Longest wait for `GetActionResult` before treating the lookup as a miss. Default 10 s.
    pub read_timeout: Duration,
    /// Write-behind jobs that may wait in the queue; when full, callers wait. Default 64.
    pub write_queue_size: usize,
    /// Longest wait at shutdown for queued writes. Default 60 s.
    pub flush_deadline: Duration,
    /// Consecutive "cache unreachable" failures (retryable errors, timeouts) after which the
    /// cache is left alone for `breaker_cooldown`: those actions run locally without asking.
    /// Default 5; 0 turns the breaker off.
    pub breaker_threshold: u32,
    /// How long the breaker stays open before one lookup probes the cache again. Default 30 s.
    pub breaker_cooldown: Duration,
    /// Output digests of deferred hits remembered, with their producing process, so that a
    /// blob found missing later can be re-created ([`RemoteCacheRunner::recover_missing`]).
    /// The oldest go first past it; a forgotten one only means a consumer's own
    /// miss-and-rerun recovers instead. Memory: about 150 bytes per digest, plus each
    /// deferred hit's process once without its environment, and each distinct environment
    /// once. Default 200 000 (measured: perf-report's `defer_rss_mib_per_10k_hits`).
    pub recovery_outputs: usize,
}

impl Default for RemoteCacheOptions {
    fn default() -> Self {
        RemoteCacheOptions {
            cache_read: true,
            cache_write: true,
            cache_content_behavior: CacheContentBehavior::Fetch,
            warnings_behavior: WarningsBehavior::Backoff,
            speculation_delay: Duration::ZERO,
            read_timeout: Duration::from_secs(10),
            write_queue_size: 64,
            flush_deadline: Duration::from_secs(60),
            breaker_threshold: 5,
            breaker_cooldown: Duration::from_secs(30),
            recovery_outputs: 200_000,
        }
    }
}
