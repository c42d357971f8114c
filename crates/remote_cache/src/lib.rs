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
//!    caller wait). [`shutdown`](process_execution::CommandRunner::shutdown) flushes it.
//!
//! ```no_run
//! # async fn f() -> Result<(), Box<dyn std::error::Error>> {
//! use std::sync::Arc;
//! use process_execution::{LocalRunner, LocalRunnerOptions};
//! use remote_cache::{RemoteCacheRunner, RemoteCacheOptions};
//! use store::{LocalStore, LocalStoreOptions, Store};
//!
//! let remote = store::remote::provider_from_address("grpc://127.0.0.1:8980", Default::default()).await?;
//! let store = Store::with_remote(LocalStore::open(LocalStoreOptions::new("/tmp/recache"))?, remote.bytes);
//! // Fetch mode: the inner runner never sees the remote.
//! let local = LocalRunner::new(store.into_local_only(), LocalRunnerOptions::new("/tmp/sandboxes"));
//! let runner = RemoteCacheRunner::new(Arc::new(local), store, remote.action_cache, RemoteCacheOptions::default());
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
