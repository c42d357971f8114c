//! `remote_cache::RemoteCacheRunner`: see the crate docs for the flow.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use async_trait::async_trait;
use futures::StreamExt;
use hashing::Digest;
use process_execution::action::{ActionMessages, make_action};
use process_execution::{
    CacheOutcome, CacheScope, CommandRunner as CommandRunnerTrait, Context, Process, ProcessError,
    ProcessResult, ResultMetadata, ResultSource,
};
use store::remote::{ActionCacheProvider, RequestContext, with_request_context};
use store::{ErrorKind, Store, StoreError};
use tokio::sync::{Notify, mpsc};
use tracing::Instrument;

use crate::convert::{CachedOutputs, make_action_result, parse_action_result};
use crate::stats::{CacheStats, Counters};
use crate::warnings::WarningsTracker;
use crate::{CacheContentBehavior, RemoteCacheOptions};

/// Write-behind jobs uploaded at once.
const WRITE_CONCURRENCY: usize = 8;

/// A finished local run whose result is to be written to the cache.
#[derive(Debug)]
struct WriteJob {
    /// Who asked, sent with the write's calls.
    request: RequestContext,
    messages: ActionMessages,
    process: Process,
    result: ProcessResult,
    finished_at: SystemTime,
}

/// Wraps an inner runner with a remote-cache lookup, local fallback and write-behind.
///
/// Build it with [`RemoteCacheRunner::wrapping`], which hands your inner runner the store its
/// behavior needs: in `fetch` mode a local-only store (nothing below the cache ever reaches the
/// remote), in `validate` and `defer` modes the full store (outputs are fetched lazily).
///
/// ```no_run
/// # async fn f() -> Result<(), Box<dyn std::error::Error>> {
/// use std::sync::Arc;
/// use remote_cache::{RemoteCacheOptions, RemoteCacheRunner};
/// use process_execution::{CommandRunner as _, Context, LocalRunner, LocalRunnerOptions, Process};
/// use store::{LocalStore, LocalStoreOptions, Store};
///
/// let remote = store::remote::provider_from_address("grpc://127.0.0.1:8980", Default::default()).await?;
/// let store = Store::with_remote(LocalStore::open(LocalStoreOptions::new("/tmp/recache"))?, remote.bytes);
/// let runner = RemoteCacheRunner::wrapping(store, remote.action_cache, RemoteCacheOptions::default(),
///     |inner_store| Arc::new(LocalRunner::new(inner_store, LocalRunnerOptions::new("/tmp/sandboxes"))));
/// let result = runner.run(Context::default(), Process::new(["/bin/echo", "hi"])).await?;
/// println!("cache: {:?}", result.metadata.cache);        // Hit, Miss, ErrorMiss(kind), …
/// let report = runner.finish().await;                      // flush write-behind
/// println!("{report}");
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct RemoteCacheRunner {
    inner: Arc<dyn CommandRunnerTrait>,
    shared: Arc<Shared>,
    writer: Mutex<Option<(mpsc::Sender<WriteJob>, tokio::task::JoinHandle<()>)>>,
}

/// Dropped without [`finish`](RemoteCacheRunner::finish): the writer stops at once (queued
/// and running writes are abandoned, as `finish` abandons them at its deadline), so the store
/// it holds is released and can be opened again.
impl Drop for RemoteCacheRunner {
    fn drop(&mut self) {
        let taken = self.writer.get_mut().map(Option::take).unwrap_or(None);
        if let Some((tx, handle)) = taken {
            drop(tx);
            handle.abort();
        }
    }
}

/// State shared by the runner and its background writer.
#[derive(Debug)]
struct Shared {
    store: Store,
    action_cache: Arc<dyn ActionCacheProvider>,
    options: RemoteCacheOptions,
    counters: Counters,
    warnings: WarningsTracker,
    /// Write jobs queued or in progress.
    pending_writes: AtomicU64,
    writes_done: Notify,
    /// For deferred hits: which process produced each output blob, so a missing one can be
    /// re-created by re-running its producer.
    producers: Mutex<ProducerMap>,
    /// Whether the ActionCache accepts writes: unknown until the first write asks.
    update_enabled: tokio::sync::OnceCell<bool>,
    /// The cache refused a write with PERMISSION_DENIED (a read-only token): no more uploads.
    writes_refused: std::sync::atomic::AtomicBool,
    /// Stops asking a cache that keeps failing.
    breaker: Breaker,
}

/// A circuit breaker for a dead or hung cache. After `breaker_threshold` consecutive failures
/// that say "the cache is unreachable" (retryable errors and timeouts, not a missing or corrupt
/// blob), lookups and writes are skipped for `breaker_cooldown` (those actions run locally,
/// counted as error misses); then one lookup probes, and success closes the breaker.
#[derive(Debug, Default)]
struct Breaker {
    consecutive_failures: AtomicU32,
    /// Set while open: lookups are skipped until this instant.
    open_until: Mutex<Option<Instant>>,
    /// A probe is in flight (half-open): everyone else keeps skipping.
    probing: AtomicBool,
    /// Times the breaker opened.
    trips: AtomicU64,
    /// Woken when the breaker opens: writes in flight give up at once (see `Shared::write`).
    opened: Notify,
}

/// What the breaker says about one lookup.
#[derive(Debug, PartialEq, Eq)]
enum Gate {
    /// Closed: ask the cache.
    Ask,
    /// Half-open: ask, as the probe.
    Probe,
    /// Open: do not ask.
    Skip,
}

impl Breaker {
    fn gate(&self, threshold: u32) -> Gate {
        if threshold == 0 {
            return Gate::Ask;
        }
        let open_until = *self.open_until.lock().unwrap_or_else(|p| p.into_inner());
        match open_until {
            None => Gate::Ask,
            Some(t) if Instant::now() < t => Gate::Skip,
            Some(_) => {
                if self.probing.swap(true, Ordering::AcqRel) {
                    Gate::Skip
                } else {
                    Gate::Probe
                }
            }
        }
    }

    fn is_open(&self) -> bool {
        self.open_until
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some()
    }

    fn success(&self) {
        self.consecutive_failures.store(0, Ordering::Release);
        let mut open = self.open_until.lock().unwrap_or_else(|p| p.into_inner());
        if open.take().is_some() {
            tracing::warn!("remote cache: reachable again; the breaker is closed");
        }
        self.probing.store(false, Ordering::Release);
    }

    fn failure(&self, threshold: u32, cooldown: Duration) {
        if threshold == 0 {
            return;
        }
        let n = self.consecutive_failures.fetch_add(1, Ordering::AcqRel) + 1;
        let mut open = self.open_until.lock().unwrap_or_else(|p| p.into_inner());
        let probing = self.probing.swap(false, Ordering::AcqRel);
        if n >= threshold || probing {
            let opening = open.is_none();
            if opening {
                self.trips.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(
                    failures = n,
                    "remote cache: {n} failures in a row; not asking it for {cooldown:?} (actions run locally)"
                );
            }
            *open = Some(Instant::now() + cooldown);
            if opening {
                self.opened.notify_waiters();
            }
        }
    }
}

/// Whether an error says the cache itself is unreachable or overloaded (what the breaker counts),
/// rather than something about one entry.
fn is_outage(e: &StoreError) -> bool {
    matches!(e.kind(), ErrorKind::Retryable(_))
}

/// What [`RemoteCacheRunner::finish`] did with the write-behind queue.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FlushReport {
    /// Results written to the cache over the runner's life.
    pub written: u64,
    /// Writes that failed (each was warned about).
    pub failed: u64,
    /// Writes given up: still queued or running when the flush deadline passed, or when the
    /// breaker opened (a dead or hung cache).
    pub abandoned: u64,
    /// Results not written: the breaker was open (the cache kept failing), or the result came
    /// after [`RemoteCacheRunner::finish`].
    pub skipped: u64,
    /// Results not written because the cache does not take this client's writes (a read-only
    /// cache or token): by design, so they do not make the report incomplete.
    pub read_only: u64,
}

impl FlushReport {
    /// True when every result meant for the cache reached it: none failed, was abandoned or
    /// was skipped (a read-only cache's results were never meant for it).
    pub fn is_complete(&self) -> bool {
        self.failed == 0 && self.abandoned == 0 && self.skipped == 0
    }
}

impl std::fmt::Display for FlushReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "cache writes: {} written, {} failed, {} abandoned, {} skipped",
            self.written, self.failed, self.abandoned, self.skipped
        )?;
        if self.read_only > 0 {
            write!(f, ", {} not written (read-only cache)", self.read_only)?;
        }
        if !self.is_complete() {
            write!(
                f,
                " (the builds' results are fine; only the cache missed them)"
            )?;
        }
        Ok(())
    }
}

/// Output digest → producing process, bounded: past `capacity` entries the older half goes
/// (by insertion; amortized O(1) per insertion, and no second structure to keep the order).
///
/// What it keeps per deferred hit is what recovery needs to re-run the process, compactly:
/// the process without its environment, once (shared by all its outputs), and the environment
/// interned (identical environments, as an engine usually passes, are kept once). Per
/// remembered output digest one map entry (about 100 bytes).
#[derive(Debug)]
struct ProducerMap {
    by_digest: HashMap<Digest, (u64, Arc<Producer>)>,
    next: u64,
    capacity: usize,
    /// Interned environments; pruned of unused ones as the set doubles.
    envs: HashSet<Arc<std::collections::BTreeMap<String, String>>>,
    envs_pruned_at: usize,
}

/// A deferred hit's process, its environment interned.
#[derive(Debug, PartialEq, Eq)]
struct Producer {
    /// The process with an empty environment.
    bare: Process,
    env: Arc<std::collections::BTreeMap<String, String>>,
}

impl Producer {
    fn process(&self) -> Process {
        Process {
            env: (*self.env).clone(),
            ..self.bare.clone()
        }
    }
}

impl ProducerMap {
    fn with_capacity(capacity: usize) -> ProducerMap {
        ProducerMap {
            by_digest: HashMap::new(),
            next: 0,
            capacity: capacity.max(1),
            envs: HashSet::new(),
            envs_pruned_at: 16,
        }
    }

    /// The compact form of `process`, its environment interned.
    fn producer(&mut self, process: &Process) -> Arc<Producer> {
        let env = match self.envs.get(&process.env) {
            Some(e) => e.clone(),
            None => {
                let e = Arc::new(process.env.clone());
                self.envs.insert(e.clone());
                e
            }
        };
        if self.envs.len() > 2 * self.envs_pruned_at {
            self.envs.retain(|e| Arc::strong_count(e) > 1);
            self.envs_pruned_at = self.envs.len().max(16);
        }
        Arc::new(Producer {
            bare: bare(process),
            env,
        })
    }

    fn insert(&mut self, digest: Digest, producer: Arc<Producer>) {
        self.next += 1;
        self.by_digest.insert(digest, (self.next, producer));
        if self.by_digest.len() > self.capacity {
            // Keep the newest half of the capacity's worth of insertions.
            let keep_from = self.next.saturating_sub((self.capacity / 2).max(1) as u64);
            self.by_digest.retain(|_, (seq, _)| *seq > keep_from);
        }
    }

    fn get(&self, digest: &Digest) -> Option<Process> {
        self.by_digest.get(digest).map(|(_, p)| p.process())
    }

    fn forget(&mut self, process: &Process) {
        // Compared in place: rebuilding each entry's whole process would copy its environment.
        let bare = bare(process);
        self.by_digest
            .retain(|_, (_, p)| !(p.bare == bare && *p.env == process.env));
    }
}

/// `process` without its environment. Field by field: cloning the whole process would copy
/// the environment only to drop it.
fn bare(process: &Process) -> Process {
    let Process {
        argv,
        env: _,
        working_directory,
        input_root,
        output_files,
        output_directories,
        timeout,
        description,
        platform_properties,
        cache_scope,
        cache_namespace,
    } = process;
    Process {
        argv: argv.clone(),
        env: Default::default(),
        working_directory: working_directory.clone(),
        input_root: *input_root,
        output_files: output_files.clone(),
        output_directories: output_directories.clone(),
        timeout: *timeout,
        description: description.clone(),
        platform_properties: platform_properties.clone(),
        cache_scope: *cache_scope,
        cache_namespace: cache_namespace.clone(),
    }
}

/// How a cache lookup ended.
enum Lookup {
    Hit(Box<ProcessResult>),
    Miss,
}

impl RemoteCacheRunner {
    /// The safe way to build one: `make_inner` receives the store the inner runner must use for
    /// `options.cache_content_behavior` (local-only for fetch, the full store for validate and
    /// defer) and returns the inner runner. Must be called inside a tokio runtime.
    pub fn wrapping(
        store: Store,
        action_cache: Arc<dyn ActionCacheProvider>,
        options: RemoteCacheOptions,
        make_inner: impl FnOnce(Store) -> Arc<dyn CommandRunnerTrait>,
    ) -> RemoteCacheRunner {
        let inner = make_inner(Self::inner_store_for(
            &store,
            options.cache_content_behavior,
        ));
        Self::new(inner, store, action_cache, options)
    }

    /// The store an inner runner must use under `behavior`: local-only for `Fetch` (a hit has
    /// made every output local, so nothing below may reach the remote), the full store for
    /// `Validate` and `Defer` (a lazily fetched output would otherwise be missing).
    pub fn inner_store_for(store: &Store, behavior: CacheContentBehavior) -> Store {
        match behavior {
            CacheContentBehavior::Fetch => store.into_local_only(),
            CacheContentBehavior::Validate | CacheContentBehavior::Defer => store.clone(),
        }
    }

    /// Wraps `inner`, which must use [`inner_store_for`](Self::inner_store_for)`(store,
    /// behavior)`; prefer [`wrapping`](Self::wrapping), which does that for you. `store` must
    /// have the remote byte store behind it; `action_cache` is the remote ActionCache. Must be
    /// called inside a tokio runtime (it starts the writer task).
    pub fn new(
        inner: Arc<dyn CommandRunnerTrait>,
        store: Store,
        action_cache: Arc<dyn ActionCacheProvider>,
        options: RemoteCacheOptions,
    ) -> RemoteCacheRunner {
        let warnings = WarningsTracker::new(options.warnings_behavior);
        let (tx, rx) = mpsc::channel::<WriteJob>(options.write_queue_size.max(1));
        let recovery_outputs = options.recovery_outputs;
        let shared = Arc::new(Shared {
            store,
            action_cache,
            options,
            counters: Counters::default(),
            warnings,
            pending_writes: AtomicU64::new(0),
            writes_done: Notify::new(),
            producers: Mutex::new(ProducerMap::with_capacity(recovery_outputs)),
            update_enabled: tokio::sync::OnceCell::new(),
            writes_refused: Default::default(),
            breaker: Breaker::default(),
        });
        let writer_shared = shared.clone();
        let handle = tokio::spawn(async move {
            tokio_stream::wrappers::ReceiverStream::new(rx)
                .for_each_concurrent(WRITE_CONCURRENCY, |job| {
                    let shared = writer_shared.clone();
                    async move {
                        shared.write(job).await;
                        shared.pending_writes.fetch_sub(1, Ordering::AcqRel);
                        shared.writes_done.notify_waiters();
                    }
                })
                .await;
        });
        RemoteCacheRunner {
            inner,
            shared,
            writer: Mutex::new(Some((tx, handle))),
        }
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> CacheStats {
        let mut s = self.shared.counters.snapshot(self.shared.warnings.logged());
        s.breaker_trips = self.shared.breaker.trips.load(Ordering::Relaxed);
        s
    }

    /// Closes the write-behind queue, waits for it at most `flush_deadline`, and reports what
    /// reached the cache. Later results are not written. Call it once, at the end of a build.
    pub async fn finish(&self) -> FlushReport {
        let taken = self.writer.lock().unwrap_or_else(|p| p.into_inner()).take();
        let mut abandoned = 0;
        if let Some((tx, handle)) = taken {
            drop(tx); // closes the queue; the writer drains it and ends
            let deadline = self.shared.options.flush_deadline;
            let abort = handle.abort_handle();
            if tokio::time::timeout(deadline, handle).await.is_err() {
                abort.abort();
                abandoned = self.pending_writes();
            }
        }
        let s = self.stats();
        FlushReport {
            written: s.writes,
            failed: s.write_errors,
            abandoned: abandoned + s.writes_abandoned,
            skipped: s.writes_skipped,
            read_only: s.writes_read_only,
        }
    }

    /// Write-behind jobs queued or in progress.
    pub fn pending_writes(&self) -> u64 {
        self.shared.pending_writes.load(Ordering::Acquire)
    }

    /// Waits until every queued write has finished (for tests and progress reporting).
    pub async fn wait_for_writes(&self) {
        loop {
            let notified = self.shared.writes_done.notified();
            if self.pending_writes() == 0 {
                return;
            }
            notified.await;
        }
    }

    /// After a deferred hit, the process that produced `digest`, if this runner served it.
    pub fn producer_of(&self, digest: Digest) -> Option<Process> {
        self.shared
            .producers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&digest)
    }

    /// For a hit whose outputs then could not be used (a blob gone, corrupt, the cache
    /// unreachable while fetching them): counts it as an error miss instead of a hit, runs
    /// `process` locally with cache reads off, and writes the fresh result back. This is how a
    /// caller keeps the promise that the cache never fails a build.
    pub async fn run_after_failed_hit(
        &self,
        ctx: Context,
        process: Process,
        error: &StoreError,
    ) -> Result<ProcessResult, ProcessError> {
        let c = &self.shared.counters;
        let _ = c
            .hits
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |h| h.checked_sub(1));
        Counters::add(&c.error_misses, 1);
        self.shared.warnings.warn(
            &format!("outputs-after-hit/{}", error.kind().label()),
            &format!("a cache hit's outputs could not be used, running locally: {error}"),
        );
        let messages = make_action(&process);
        let action = messages.action_digest;
        let r = self.run_locally_and_write(ctx, process, messages).await?;
        Ok(tag(r, action, CacheOutcome::ErrorMiss(*error.kind())))
    }

    /// Recovers from a blob found missing after a deferred hit: re-runs the process that
    /// produced `missing` with cache reads off, and writes the fresh result back. Returns
    /// `Ok(None)` when this runner did not serve that blob (the caller must find another way).
    pub async fn recover_missing(
        &self,
        ctx: Context,
        missing: Digest,
    ) -> Result<Option<ProcessResult>, ProcessError> {
        let Some(process) = self.producer_of(missing) else {
            return Ok(None);
        };
        tracing::info!(%missing, process = %process.description, "re-running the producer of a missing blob");
        Counters::add(&self.shared.counters.recoveries, 1);
        let messages = make_action(&process);
        let action = messages.action_digest;
        let result = self
            .run_locally_and_write(ctx, process.clone(), messages)
            .await?;
        let result = tag(result, action, CacheOutcome::Recovered);
        // Its old outputs are superseded: forget them.
        self.shared
            .producers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .forget(&process);
        Ok(Some(result))
    }

    async fn run_locally_and_write(
        &self,
        ctx: Context,
        process: Process,
        messages: ActionMessages,
    ) -> Result<ProcessResult, ProcessError> {
        let result = self.inner.run(ctx, process.clone()).await?;
        self.maybe_write(messages, process, &result).await;
        Ok(result)
    }

    async fn maybe_write(
        &self,
        messages: ActionMessages,
        process: Process,
        result: &ProcessResult,
    ) {
        if !self.shared.options.cache_write || !cacheable(&process, result) {
            return;
        }
        if self.shared.update_enabled.get() == Some(&false)
            || self.shared.writes_refused.load(Ordering::Relaxed)
        {
            // A read-only cache (said once, when the first write found out).
            Counters::add(&self.shared.counters.writes_read_only, 1);
            return;
        }
        if self.shared.breaker.is_open() {
            // A cache the breaker stopped asking.
            Counters::add(&self.shared.counters.writes_skipped, 1);
            return;
        }
        let sender = {
            let writer = self.writer.lock().unwrap_or_else(|p| p.into_inner());
            writer.as_ref().map(|(tx, _)| tx.clone())
        };
        // After `finish()` (or once the writer is gone) a result is not written: counted as
        // skipped, with one warning.
        let after_finish = || {
            Counters::add(&self.shared.counters.writes_skipped, 1);
            self.shared.warnings.warn(
                "write/shut-down",
                "cache write skipped: the result came after finish()",
            );
        };
        let Some(sender) = sender else {
            after_finish();
            return;
        };
        // A full queue makes the caller wait: back-pressure, not unbounded hidden work. The
        // slot is reserved before anything is counted, so a caller cancelled while waiting
        // leaves nothing behind (`wait_for_writes` would otherwise wait forever).
        let Ok(permit) = sender.reserve().await else {
            after_finish();
            return;
        };
        self.shared.pending_writes.fetch_add(1, Ordering::AcqRel);
        permit.send(WriteJob {
            // The run's context (set around it by `run`), carried to the writer task.
            request: store::remote::current_request_context().unwrap_or_default(),
            messages,
            process,
            result: result.clone(),
            finished_at: SystemTime::now(),
        });
    }
}

/// Whether a result may be written, per its process's cache scope.
fn cacheable(process: &Process, result: &ProcessResult) -> bool {
    if result.metadata.timed_out {
        return false;
    }
    match process.cache_scope {
        CacheScope::Always => true,
        CacheScope::Successful => result.exit_code == 0,
        CacheScope::Never => false,
    }
}

impl Shared {
    /// Records an error that turned a lookup into a miss.
    fn error_miss(&self, err: &StoreError) {
        Counters::add(&self.counters.error_misses, 1);
        if is_outage(err) {
            self.breaker.failure(
                self.options.breaker_threshold,
                self.options.breaker_cooldown,
            );
        }
        self.warnings.warn(
            &format!("lookup/{}", err.kind().label()),
            &format!("cache lookup failed, running locally: {err}"),
        );
    }

    /// GetActionResult, then fetch / validate / defer. `Err` = an error miss.
    async fn lookup(
        &self,
        process: &Process,
        messages: &ActionMessages,
    ) -> Result<Lookup, StoreError> {
        let start = Instant::now();
        let action_digest = messages.action_digest;
        tracing::debug!(%action_digest, behavior = ?self.options.cache_content_behavior, "cache lookup");
        let ar = match tokio::time::timeout(
            self.options.read_timeout,
            self.action_cache.get_action_result(action_digest),
        )
        .await
        {
            Err(_) => {
                return Err(StoreError::new(
                    ErrorKind::Retryable(tonic::Code::DeadlineExceeded),
                    format!(
                        "ActionCache lookup of {action_digest} took longer than {:?}",
                        self.options.read_timeout
                    ),
                ));
            }
            Ok(r) => r?,
        };
        self.breaker.success();
        let Some(ar) = ar else {
            return Ok(Lookup::Miss);
        };
        if ar.exit_code != 0 && process.cache_scope != CacheScope::Always {
            // Cached failures only count under scope "always".
            return Ok(Lookup::Miss);
        }
        let outputs: CachedOutputs = parse_action_result(&self.store, &ar)
            .await
            .map_err(|e| e.context(format!("cached result for {action_digest}")))?;
        match self.options.cache_content_behavior {
            CacheContentBehavior::Fetch => {
                let summary = self
                    .store
                    .ensure_downloaded(outputs.files.clone(), outputs.directories.clone())
                    .await?;
                Counters::add(&self.counters.blobs_downloaded, summary.blobs);
                Counters::add(&self.counters.bytes_downloaded, summary.bytes);
            }
            CacheContentBehavior::Validate => {
                // A writer uploads each output directory as one Tree blob, not as Directory
                // messages: check the Trees and every file blob (the Directory messages are
                // local since the Trees were expanded), in one FindMissingBlobs pass.
                let mut blobs = outputs.files.clone();
                blobs.extend(&outputs.trees);
                for d in &outputs.directories {
                    blobs.extend(self.store.local().file_digests(*d)?);
                }
                self.store.exists_recursive(blobs, HashSet::new()).await?;
            }
            CacheContentBehavior::Defer => {
                // Every digest a consumer may find missing: stdout, stderr, output files, the
                // output directories' Trees and roots, and every file nested in them (their
                // Directory messages are local: the Trees were expanded).
                let mut all: Vec<Digest> = outputs.files.iter().copied().collect();
                all.extend(&outputs.trees);
                all.extend(&outputs.directories);
                all.push(outputs.output_root);
                for d in &outputs.directories {
                    all.extend(self.store.local().file_digests(*d)?);
                }
                let mut producers = self.producers.lock().unwrap_or_else(|p| p.into_inner());
                let producer = producers.producer(process);
                // An empty blob is never missing: nothing to remember for it.
                for d in all.into_iter().filter(|d| d.size_bytes > 0) {
                    producers.insert(d, producer.clone());
                }
            }
        }
        let wall_time = start.elapsed();
        if let Some(original) = outputs.original_run_time {
            let saved = original.saturating_sub(wall_time);
            Counters::add(&self.counters.time_saved_micros, saved.as_micros() as u64);
        }
        Ok(Lookup::Hit(Box::new(ProcessResult {
            stdout: outputs.stdout,
            stderr: outputs.stderr,
            exit_code: outputs.exit_code,
            output_root: outputs.output_root,
            metadata: ResultMetadata {
                source: ResultSource::RemoteCacheHit,
                wall_time,
                original_run_time: outputs.original_run_time,
                timed_out: false,
                action_digest: Some(action_digest),
                cache: CacheOutcome::Hit,
            },
        })))
    }

    /// Uploads what the remote lacks, then records the ActionResult. Failures are warnings.
    /// A write still going when the breaker opens (the cache is dead or hung) is abandoned at
    /// once, and counted so: waiting out its deadlines and retries would only delay the build's
    /// end.
    async fn write(&self, job: WriteJob) {
        let action_digest = job.messages.action_digest;
        let span = tracing::debug_span!("remote_cache.write", action = %action_digest);
        let request = job.request.clone();
        let opened = self.breaker.opened.notified();
        tokio::pin!(opened);
        opened.as_mut().enable();
        tokio::select! {
            () = with_request_context(request, self.write_inner(job).instrument(span)) => {}
            () = opened => Counters::add(&self.counters.writes_abandoned, 1),
        }
    }

    async fn write_inner(&self, job: WriteJob) {
        let action_digest = job.messages.action_digest;
        if self.writes_refused.load(Ordering::Relaxed) {
            Counters::add(&self.counters.writes_read_only, 1);
            return;
        }
        if self.breaker.is_open() {
            // Queued before the breaker opened: abandoned with the ones in flight.
            Counters::add(&self.counters.writes_abandoned, 1);
            return;
        }
        // A cache that refuses ActionCache updates (REAPI's action_cache_update_enabled = false)
        // gets no uploads at all: one warning, then every later write is skipped up front.
        let enabled = self
            .update_enabled
            .get_or_init(|| async {
                match self.action_cache.update_enabled().await {
                    Ok(true) => true,
                    Ok(false) => {
                        self.warnings.warn(
                            "write/read-only",
                            "the cache does not accept results from this client (read-only); \
                             results of local runs will not be written",
                        );
                        false
                    }
                    // Unknown: try the write; its own error is reported below.
                    Err(_) => true,
                }
            })
            .await;
        if !*enabled {
            Counters::add(&self.counters.writes_read_only, 1);
            return;
        }
        let result = async {
            let local = self.store.local().clone();
            let (process, result, finished) =
                (job.process.clone(), job.result.clone(), job.finished_at);
            let (ar, mut blobs) = tokio::task::spawn_blocking(move || {
                make_action_result(&local, &process, &result, finished)
            })
            .await
            .map_err(|e| StoreError::new(ErrorKind::Other, format!("writer task failed: {e}")))??;
            // The Action and Command go to the CAS too, as REAPI asks of clients.
            blobs.insert(self.store.store_bytes(&job.messages.action_bytes())?);
            blobs.insert(self.store.store_bytes(&job.messages.command_bytes())?);
            let up = self
                .store
                .ensure_remote_has_recursive(blobs, HashSet::new())
                .await?;
            Counters::add(&self.counters.blobs_uploaded, up.blobs);
            Counters::add(&self.counters.bytes_uploaded, up.bytes);
            self.action_cache
                .update_action_result(action_digest, ar)
                .await
        }
        .await;
        match result {
            Ok(()) => Counters::add(&self.counters.writes, 1),
            Err(e) if *e.kind() == ErrorKind::Forbidden => {
                // The cache does not let this client write (a read-only token): one warning,
                // and no further uploads in this run.
                Counters::add(&self.counters.write_errors, 1);
                self.writes_refused.store(true, Ordering::Relaxed);
                self.warnings.warn(
                    "write/read-only",
                    &format!(
                        "the cache refuses writes from this client ({e}); it is used read-only: \
                         results of local runs will not be written"
                    ),
                );
            }
            Err(e) => {
                Counters::add(&self.counters.write_errors, 1);
                if is_outage(&e) {
                    self.breaker.failure(
                        self.options.breaker_threshold,
                        self.options.breaker_cooldown,
                    );
                }
                self.warnings.warn(
                    &format!("write/{}", e.kind().label()),
                    &format!("could not write {action_digest} to the cache: {e}"),
                );
            }
        }
    }
}

impl RemoteCacheRunner {
    /// The body of `run`: the result and what the cache did.
    async fn run_cached(
        &self,
        ctx: Context,
        process: Process,
        messages: ActionMessages,
    ) -> Result<(ProcessResult, CacheOutcome), ProcessError> {
        if process.cache_scope == CacheScope::Never {
            Counters::add(&self.shared.counters.uncacheable, 1);
            return Ok((self.inner.run(ctx, process).await?, CacheOutcome::Skipped));
        }
        if !self.shared.options.cache_read {
            Counters::add(&self.shared.counters.uncacheable, 1);
            let r = self.run_locally_and_write(ctx, process, messages).await?;
            return Ok((r, CacheOutcome::Skipped));
        }
        let gate = self
            .shared
            .breaker
            .gate(self.shared.options.breaker_threshold);
        if gate == Gate::Skip {
            Counters::add(&self.shared.counters.error_misses, 1);
            let r = self.run_locally_and_write(ctx, process, messages).await?;
            return Ok((r, CacheOutcome::BreakerOpen));
        }

        let delay = self.shared.options.speculation_delay;
        let lookup = self
            .shared
            .lookup(&process, &messages)
            .instrument(tracing::debug_span!("remote_cache.lookup"));
        let outcome = if delay.is_zero() {
            lookup.await
        } else {
            // Speculation: after `delay`, start the local run too; take whichever finishes
            // first. A hit drops the local run (which kills its process group).
            let (go_tx, go_rx) = tokio::sync::oneshot::channel::<()>();
            let inner = self.inner.clone();
            let (lctx, lprocess) = (ctx.clone(), process.clone());
            let local = async move {
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = go_rx => {}
                }
                inner.run(lctx, lprocess).await
            };
            tokio::pin!(local);
            tokio::pin!(lookup);
            tokio::select! {
                r = &mut lookup => match r {
                    Ok(Lookup::Hit(hit)) => Ok(Lookup::Hit(hit)),
                    other => {
                        let outcome = match &other {
                            Ok(_) => {
                                Counters::add(&self.shared.counters.true_misses, 1);
                                CacheOutcome::Miss
                            }
                            Err(e) => {
                                self.shared.error_miss(e);
                                CacheOutcome::ErrorMiss(*e.kind())
                            }
                        };
                        // Start the local run now (if still waiting) and use it.
                        let _ = go_tx.send(());
                        let result = local.await?;
                        self.maybe_write(messages.clone(), process.clone(), &result).await;
                        return Ok((result, outcome));
                    }
                },
                r = &mut local => {
                    Counters::add(&self.shared.counters.speculation_local_wins, 1);
                    tracing::debug!("speculation: local run finished before the cache lookup");
                    let result = r?;
                    self.maybe_write(messages.clone(), process.clone(), &result).await;
                    return Ok((result, CacheOutcome::SpeculationLocalWin));
                }
            }
        };
        match outcome {
            Ok(Lookup::Hit(hit)) => {
                Counters::add(&self.shared.counters.hits, 1);
                tracing::debug!("cache hit");
                Ok((*hit, CacheOutcome::Hit))
            }
            Ok(Lookup::Miss) => {
                Counters::add(&self.shared.counters.true_misses, 1);
                tracing::debug!("cache miss");
                let r = self.run_locally_and_write(ctx, process, messages).await?;
                Ok((r, CacheOutcome::Miss))
            }
            Err(e) => {
                self.shared.error_miss(&e);
                let r = self.run_locally_and_write(ctx, process, messages).await?;
                Ok((r, CacheOutcome::ErrorMiss(*e.kind())))
            }
        }
    }
}

/// What the provider sends with this action's calls.
fn request_context(ctx: &Context, action: Digest) -> RequestContext {
    RequestContext {
        invocation_id: ctx.build_id.clone(),
        action_id: action.hash.to_hex(),
        action_mnemonic: ctx.mnemonic.clone(),
        target_id: ctx.target.clone(),
    }
}

/// Stamps a result with its action digest and what the cache did.
fn tag(mut result: ProcessResult, action: Digest, outcome: CacheOutcome) -> ProcessResult {
    result.metadata.action_digest = Some(action);
    result.metadata.cache = outcome;
    result
}

#[async_trait]
impl CommandRunnerTrait for RemoteCacheRunner {
    async fn run(&self, ctx: Context, process: Process) -> Result<ProcessResult, ProcessError> {
        let messages = make_action(&process);
        let action_digest = messages.action_digest;
        // One span per action, carrying its digest: a user can follow one action through the
        // logs (lookup, local run, write) with RECACHE_LOG=debug or any tracing subscriber.
        let span = tracing::debug_span!(
            "remote_cache.run",
            action = %action_digest,
            process = %process.description
        );
        let request = request_context(&ctx, action_digest);
        let (result, outcome) = with_request_context(
            request,
            self.run_cached(ctx, process, messages).instrument(span),
        )
        .await?;
        Ok(tag(result, action_digest, outcome))
    }

    /// [`finish`](RemoteCacheRunner::finish), then the inner runner's shutdown; an error when
    /// any result failed to reach the cache (the report says how many).
    async fn shutdown(&self) -> Result<(), String> {
        let report = self.finish().await;
        let inner = self.inner.shutdown().await;
        if !report.is_complete() {
            return Err(report.to_string());
        }
        inner
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_producer_map_is_bounded_and_keeps_the_newest() {
        let mut m = ProducerMap::with_capacity(4);
        let p = |m: &mut ProducerMap, i: u32| {
            m.producer(&Process::new(["/bin/echo".to_owned(), i.to_string()]))
        };
        let d = |i: u32| Digest::of_bytes(&i.to_le_bytes());
        for i in 0..10 {
            let q = p(&mut m, i);
            m.insert(d(i), q);
        }
        assert!(m.by_digest.len() <= 4);
        assert!(m.get(&d(5)).is_none(), "the oldest went");
        assert_eq!(m.get(&d(9)).map(|q| q.argv[1].clone()), Some("9".into()));
        // Re-inserting a digest many times keeps one entry.
        for _ in 0..100 {
            let q = p(&mut m, 9);
            m.insert(d(9), q);
        }
        assert!(m.by_digest.len() <= 4);
        assert!(m.get(&d(9)).is_some());
    }

    #[test]
    fn identical_environments_are_kept_once_and_come_back_whole() {
        let mut m = ProducerMap::with_capacity(1000);
        let env: std::collections::BTreeMap<String, String> = (0..100)
            .map(|i| (format!("VAR_{i}"), "x".repeat(80)))
            .collect();
        for i in 0..500u32 {
            let mut process = Process::new(["/bin/echo".to_owned(), i.to_string()]);
            process.env = env.clone();
            let q = m.producer(&process);
            m.insert(Digest::of_bytes(&i.to_le_bytes()), q);
        }
        assert_eq!(m.envs.len(), 1, "one environment kept for 500 processes");
        let back = m.get(&Digest::of_bytes(&7u32.to_le_bytes())).unwrap();
        assert_eq!(back.env, env);
        assert_eq!(back.argv[1], "7");
    }
}
