//! `remote_cache::CommandRunner`: see the crate docs for the flow.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime};

use async_trait::async_trait;
use futures::StreamExt;
use hashing::Digest;
use process_execution::action::{ActionMessages, make_action};
use process_execution::{
    CacheScope, CommandRunner as CommandRunnerTrait, Context, Process, ProcessError, ProcessResult,
    ResultMetadata, ResultSource,
};
use store::remote::ActionCacheProvider;
use store::{ErrorKind, Store, StoreError};
use tokio::sync::{Notify, mpsc};

use crate::convert::{CachedOutputs, make_action_result, parse_action_result};
use crate::stats::{CacheStats, Counters};
use crate::warnings::WarningsTracker;
use crate::{CacheContentBehavior, RemoteCacheOptions};

/// Write-behind jobs uploaded at once.
const WRITE_CONCURRENCY: usize = 8;

/// Output digests of deferred hits remembered for recovery (see [`ProducerMap`]). An engine that
/// serves more keeps the most recent; a digest whose producer was forgotten just means that a
/// missing blob is recovered by the consumer's own miss-and-rerun instead.
const MAX_REMEMBERED_OUTPUTS: usize = 200_000;

/// A finished local run whose result is to be written to the cache.
#[derive(Debug)]
struct WriteJob {
    messages: ActionMessages,
    process: Process,
    result: ProcessResult,
    finished_at: SystemTime,
}

/// Wraps an inner runner with a remote-cache lookup, local fallback and write-behind.
///
/// In `fetch` mode the inner runner must have been built with `store.into_local_only()`; in
/// `validate` and `defer` modes it needs the full store, since outputs are fetched lazily.
#[derive(Debug)]
pub struct CommandRunner {
    inner: Arc<dyn CommandRunnerTrait>,
    shared: Arc<Shared>,
    writer: Mutex<Option<(mpsc::Sender<WriteJob>, tokio::task::JoinHandle<()>)>>,
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
}

/// Output digest → producing process, bounded: the oldest entries go first (FIFO by insertion).
#[derive(Debug)]
struct ProducerMap {
    by_digest: HashMap<Digest, (u64, Arc<Process>)>,
    order: std::collections::VecDeque<(Digest, u64)>,
    next: u64,
    capacity: usize,
}

impl Default for ProducerMap {
    fn default() -> Self {
        ProducerMap::with_capacity(MAX_REMEMBERED_OUTPUTS)
    }
}

impl ProducerMap {
    fn with_capacity(capacity: usize) -> ProducerMap {
        ProducerMap {
            by_digest: HashMap::new(),
            order: std::collections::VecDeque::new(),
            next: 0,
            capacity: capacity.max(1),
        }
    }

    fn insert(&mut self, digest: Digest, producer: Arc<Process>) {
        self.next += 1;
        self.by_digest.insert(digest, (self.next, producer));
        self.order.push_back((digest, self.next));
        while self.by_digest.len() > self.capacity {
            let Some((d, seq)) = self.order.pop_front() else {
                break;
            };
            // Only the entry's latest insertion removes it.
            if self.by_digest.get(&d).is_some_and(|(s, _)| *s == seq) {
                self.by_digest.remove(&d);
            }
        }
        if self.order.len() > 2 * self.capacity {
            // Re-inserted digests left stale positions behind: drop them (amortized O(1)).
            let live = &self.by_digest;
            self.order
                .retain(|(d, seq)| live.get(d).is_some_and(|(s, _)| s == seq));
        }
    }

    fn get(&self, digest: &Digest) -> Option<Arc<Process>> {
        self.by_digest.get(digest).map(|(_, p)| p.clone())
    }

    fn forget(&mut self, process: &Process) {
        self.by_digest.retain(|_, (_, p)| **p != *process);
    }

    fn len(&self) -> usize {
        self.by_digest.len()
    }
}

/// How a cache lookup ended.
enum Lookup {
    Hit(ProcessResult),
    Miss,
}

impl CommandRunner {
    /// Wraps `inner`. `store` must have the remote byte store behind it; `action_cache` is the
    /// remote ActionCache. Must be called inside a tokio runtime (it starts the writer task).
    pub fn new(
        inner: Arc<dyn CommandRunnerTrait>,
        store: Store,
        action_cache: Arc<dyn ActionCacheProvider>,
        options: RemoteCacheOptions,
    ) -> CommandRunner {
        let warnings = WarningsTracker::new(options.warnings_behavior);
        let (tx, rx) = mpsc::channel::<WriteJob>(options.write_queue_size.max(1));
        let shared = Arc::new(Shared {
            store,
            action_cache,
            options,
            counters: Counters::default(),
            warnings,
            pending_writes: AtomicU64::new(0),
            writes_done: Notify::new(),
            producers: Mutex::new(ProducerMap::default()),
            update_enabled: tokio::sync::OnceCell::new(),
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
        CommandRunner {
            inner,
            shared,
            writer: Mutex::new(Some((tx, handle))),
        }
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> CacheStats {
        self.shared.counters.snapshot(self.shared.warnings.logged())
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
            .map(|p| Process::clone(&p))
    }

    /// How many output digests this runner remembers producers for (bounded).
    pub fn remembered_outputs(&self) -> usize {
        self.shared
            .producers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .len()
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
        self.run_locally_and_write(ctx, process, messages).await
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
        let result = self
            .run_locally_and_write(ctx, process.clone(), messages)
            .await?;
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
        if self.shared.update_enabled.get() == Some(&false) {
            // A read-only cache: said once, when the first write found out.
            Counters::add(&self.shared.counters.writes_skipped, 1);
            return;
        }
        let sender = {
            let writer = self.writer.lock().unwrap_or_else(|p| p.into_inner());
            writer.as_ref().map(|(tx, _)| tx.clone())
        };
        let Some(sender) = sender else {
            self.shared.warnings.warn(
                "write/shut-down",
                "cache write skipped: the runner is shut down",
            );
            return;
        };
        self.shared.pending_writes.fetch_add(1, Ordering::AcqRel);
        let job = WriteJob {
            messages,
            process,
            result: result.clone(),
            finished_at: SystemTime::now(),
        };
        // A full queue makes the caller wait: back-pressure, not unbounded hidden work.
        if sender.send(job).await.is_err() {
            self.shared.pending_writes.fetch_sub(1, Ordering::AcqRel);
        }
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
                let producer = Arc::new(process.clone());
                let mut producers = self.producers.lock().unwrap_or_else(|p| p.into_inner());
                for d in all {
                    producers.insert(d, producer.clone());
                }
            }
        }
        let wall_time = start.elapsed();
        if let Some(original) = outputs.original_run_time {
            let saved = original.saturating_sub(wall_time);
            Counters::add(&self.counters.time_saved_micros, saved.as_micros() as u64);
        }
        Ok(Lookup::Hit(ProcessResult {
            stdout: outputs.stdout,
            stderr: outputs.stderr,
            exit_code: outputs.exit_code,
            output_root: outputs.output_root,
            metadata: ResultMetadata {
                source: ResultSource::RemoteCacheHit,
                wall_time,
                original_run_time: outputs.original_run_time,
                timed_out: false,
            },
        }))
    }

    /// Uploads what the remote lacks, then records the ActionResult. Failures are warnings.
    async fn write(&self, job: WriteJob) {
        let action_digest = job.messages.action_digest;
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
            Counters::add(&self.counters.writes_skipped, 1);
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
            Err(e) => {
                Counters::add(&self.counters.write_errors, 1);
                self.warnings.warn(
                    &format!("write/{}", e.kind().label()),
                    &format!("could not write {action_digest} to the cache: {e}"),
                );
            }
        }
    }
}

#[async_trait]
impl CommandRunnerTrait for CommandRunner {
    async fn run(&self, ctx: Context, process: Process) -> Result<ProcessResult, ProcessError> {
        let messages = make_action(&process);
        let action_digest = messages.action_digest;
        if process.cache_scope == CacheScope::Never || !self.shared.options.cache_read {
            if process.cache_scope == CacheScope::Never {
                Counters::add(&self.shared.counters.uncacheable, 1);
                return self.inner.run(ctx, process).await;
            }
            return self.run_locally_and_write(ctx, process, messages).await;
        }

        let delay = self.shared.options.speculation_delay;
        let lookup = self.shared.lookup(&process, &messages);
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
                        match &other {
                            Ok(_) => Counters::add(&self.shared.counters.true_misses, 1),
                            Err(e) => self.shared.error_miss(e),
                        }
                        // Start the local run now (if still waiting) and use it.
                        let _ = go_tx.send(());
                        let result = local.await?;
                        self.maybe_write(messages.clone(), process.clone(), &result).await;
                        return Ok(result);
                    }
                },
                r = &mut local => {
                    Counters::add(&self.shared.counters.speculation_local_wins, 1);
                    tracing::debug!(%action_digest, "speculation: local run finished before the cache lookup");
                    let result = r?;
                    self.maybe_write(messages.clone(), process.clone(), &result).await;
                    return Ok(result);
                }
            }
        };
        match outcome {
            Ok(Lookup::Hit(hit)) => {
                Counters::add(&self.shared.counters.hits, 1);
                tracing::debug!(%action_digest, "cache hit");
                Ok(hit)
            }
            Ok(Lookup::Miss) => {
                Counters::add(&self.shared.counters.true_misses, 1);
                self.run_locally_and_write(ctx, process, messages).await
            }
            Err(e) => {
                self.shared.error_miss(&e);
                self.run_locally_and_write(ctx, process, messages).await
            }
        }
    }

    /// Flushes the write-behind queue, waiting at most `flush_deadline`, and reports what could
    /// not be written.
    async fn shutdown(&self) -> Result<(), String> {
        let taken = self.writer.lock().unwrap_or_else(|p| p.into_inner()).take();
        let Some((tx, handle)) = taken else {
            return Ok(());
        };
        drop(tx); // closes the queue; the writer drains it and ends
        let deadline = self.shared.options.flush_deadline;
        let abort = handle.abort_handle();
        let flushed = tokio::time::timeout(deadline, handle).await;
        let inner = self.inner.shutdown().await;
        if flushed.is_err() {
            abort.abort();
            let lost = self.pending_writes();
            return Err(format!(
                "{lost} cache write(s) did not finish within {deadline:?} and were abandoned \
                 (the builds' results are fine; only the cache missed them)"
            ));
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
        let p = |i: u32| Arc::new(Process::new(["/bin/echo".to_owned(), i.to_string()]));
        let d = |i: u32| Digest::of_bytes(&i.to_le_bytes());
        for i in 0..10 {
            m.insert(d(i), p(i));
        }
        assert_eq!(m.len(), 4);
        assert!(m.get(&d(5)).is_none(), "the oldest went");
        assert_eq!(m.get(&d(9)).map(|q| q.argv[1].clone()), Some("9".into()));
        // Re-inserting a digest many times does not grow the order queue without bound.
        for _ in 0..100 {
            m.insert(d(9), p(9));
        }
        assert!(m.order.len() <= 8);
        assert_eq!(m.len(), 4);
    }
}
