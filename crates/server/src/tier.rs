//! The S3 tier: the local store in front (the fast tier, bounded by `--max-size`), an
//! S3-compatible bucket behind, and the upload journal that makes sure every acknowledged blob
//! reaches the bucket, and no multipart upload is left open there.
//!
//! # Writes
//!
//! A client's blob is *admitted* before it is stored (`Tier::admit`): admission waits for room
//! in the upload queue (at most [`TierOptions::queue`] uploads outstanding; past
//! [`TierOptions::queue_wait`] the write is refused with RESOURCE_EXHAUSTED, never dropped) and
//! writes the blob's journal row (`queued`) in the local database. Then the blob is stored in
//! the fast tier and the write is acknowledged: it is readable at once, from the fast tier. When
//! the admission ends (stored or not) a job goes to the upload workers
//! ([`TierOptions::uploaders`] of them). A large blob's multipart upload starts while it
//! arrives (`PartTee`); it is completed only after the blob verified and was stored.
//!
//! # Background work
//!
//! Workers, sweep and early parts run on the tier's own thread at lower CPU priority
//! (`BACKGROUND_NICE`) with their own S3 connections, and hold back while clients' reads
//! stream (`YIELD_MAX`): uploads are never on a build's critical path, reads are.
//!
//! # The journal
//!
//! One row per blob not yet known to be in the bucket, in the store's `journal` table (a blob
//! with a row is never evicted from the fast tier). A row is in one of three states:
//!
//! - `queued`: the blob is (or is about to be) in the fast tier; nothing was asked of S3.
//! - `creating`: a `CreateMultipartUpload` is about to be sent, or was sent and its answer not
//!   recorded. Whoever works the row next first aborts every open upload of the blob's key.
//! - `multipart(upload id, part size, parts done with their ETags, verified)`: recorded as soon
//!   as S3 answers the create, and after each part. Parts sent while a write still arrives
//!   (`PartTee`) are *unverified*: they belong to that one write attempt, and become verified
//!   only when that write's blob verified and was stored. An attempt that fails verification
//!   aborts its upload and puts the row back to `queued`; an unverified row found by a worker
//!   (the attempt died with the process) is aborted and started over from the fast tier's
//!   verified copy. So only bytes of a verified blob are ever completed into an object.
//!
//! The row is deleted once the object exists in the bucket: after `CompleteMultipartUpload`,
//! after a single PUT (conditional: `If-None-Match: *`), or when a HEAD finds the object
//! already there. Every row is written before the S3 call it prepares.
//!
//! # Recovery
//!
//! At start every row is queued again. A `multipart` row resumes: a HEAD first (a crash between
//! S3's completion and the row's deletion leaves an object of the right size: the row is then
//! reconciled, deleted, and the upload id aborted if still open), else the parts not recorded
//! are uploaded and the upload completed. An upload id S3 no longer knows (aborted by a sweep)
//! sends the row back to `queued`. A row whose blob the fast tier does not hold (the write that
//! admitted it failed, or the process died before the blob was stored) is dropped: that blob was
//! never acknowledged. Then the sweep (`Tier::sweep`) lists the bucket's open multipart uploads
//! under the prefix and aborts those no row owns once older than [`TierOptions::sweep_grace`];
//! it runs again every [`TierOptions::sweep_every`].
//!
//! # Reads
//!
//! Fast tier first; a miss is fetched from the bucket into the fast tier (verified against the
//! digest while it streams; concurrent reads of one blob share one download). A blob the fast
//! tier cannot make room for streams through to the client, verified, without being kept. An
//! object that is not its blob (wrong size, wrong bytes) is deleted from the bucket and the
//! blob reported missing, so the next upload replaces it; an object that is gone drops its
//! known-in-bucket entry and reads NOT_FOUND. Existence
//! (`FindMissingBlobs`, an action result's outputs) is answered from the fast tier, then a
//! bounded cache of blobs known to be in the bucket, then a HEAD per remaining blob.
//! S3 failures the SDK's retries ([`crate::s3::S3_ATTEMPTS`]) did not cure reach the client as
//! UNAVAILABLE, which recache's client treats as a miss.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::{FutureExt, StreamExt};
use hashing::{Digest, EMPTY_DIGEST};
use store::LocalStore;
use tokio::io::AsyncWriteExt;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tonic::Status;

use crate::s3::{S3Blobs, S3Error, S3Options};

/// How the S3 tier behaves; `TierOptions::new(s3)` documents the defaults.
#[derive(Debug, Clone)]
pub struct TierOptions {
    /// The bucket.
    pub s3: S3Options,
    /// Upload workers. Default 4.
    pub uploaders: usize,
    /// Uploads outstanding at most (admitted, not yet in the bucket). Default 4096.
    pub queue: usize,
    /// How long a write waits for room in a full queue before RESOURCE_EXHAUSTED. Default 30 s.
    pub queue_wait: Duration,
    /// Parts of one multipart upload in flight at once. Default 2 (memory: this × part size;
    /// two already keep a loopback link busy on these 2-core machines).
    pub part_concurrency: usize,
    /// Open multipart uploads no journal row owns are aborted once this old. Default 24 h: it
    /// must exceed the longest upload of any server sharing the bucket.
    pub sweep_grace: Duration,
    /// How often the sweep runs (it also runs at start). Default 1 h.
    pub sweep_every: Duration,
    /// Blobs remembered as present in the bucket (saves HEADs). Default 1 M (≈ 80 MiB at most).
    pub known_capacity: usize,
    /// After a client's request to the bucket failed (past the SDK's retries), clients'
    /// requests leave the bucket alone this long: existence checks answer "missing", reads
    /// and action results UNAVAILABLE, at once instead of after another round of retries (a
    /// hung bucket would otherwise hold every request for its timeouts). The first request
    /// after it asks again. Background uploads keep their own backoff. Default
    /// [`BUCKET_COOLDOWN`].
    pub cooldown: Duration,
    /// Keep the bucket's objects while they are used (see the module docs, "Retention"): an
    /// object used when older than half of this is refreshed, and the expiry sweep deletes
    /// objects not refreshed for 1.5 × this. Default none: the bucket keeps everything.
    pub retention: Option<Duration>,
}

impl TierOptions {
    /// Defaults for the bucket `s3`.
    pub fn new(s3: S3Options) -> TierOptions {
        TierOptions {
            s3,
            uploaders: 4,
            queue: 4096,
            queue_wait: Duration::from_secs(30),
            part_concurrency: 2,
            sweep_grace: Duration::from_secs(24 * 3600),
            sweep_every: Duration::from_secs(3600),
            known_capacity: 1 << 20,
            cooldown: BUCKET_COOLDOWN,
            retention: None,
        }
    }
}

/// Default [`TierOptions::cooldown`]: long enough that a bucket that is down costs clients one
/// slow request per 10 s instead of one per request; short enough that a bucket that is back
/// serves again before a build notices.
pub const BUCKET_COOLDOWN: Duration = Duration::from_secs(10);
/// Longest wait before a failed upload is tried again.
const RETRY_MAX: Duration = Duration::from_secs(60);
/// HEADs in flight at once for one existence check.
const HEAD_CONCURRENCY: usize = 32;
/// How long a blob seen in the bucket is trusted to stay there without asking again.
const KNOWN_TTL: Duration = Duration::from_secs(3600);

/// CPU priority (nice value) of the tier's background work (uploads, the sweep): on a busy
/// machine it yields the CPU to clients' requests, on an idle one it runs at full speed.
const BACKGROUND_NICE: i32 = 10;

/// Lowers the calling thread's CPU priority to [`BACKGROUND_NICE`] (Linux: a per-thread
/// attribute). Best effort: a refusal only leaves the thread at normal priority.
fn lower_priority() {
    // SAFETY: plain syscalls on the calling thread, no memory handed over.
    #[allow(unsafe_code)]
    let r = unsafe {
        libc::setpriority(
            libc::PRIO_PROCESS,
            libc::gettid() as libc::id_t,
            BACKGROUND_NICE,
        )
    };
    if r != 0 {
        tracing::debug!(error = %std::io::Error::last_os_error(), "cannot lower the S3 uploaders' priority");
    }
}

/// The runtime the tier's background work runs on: one thread of its own (plus blocking
/// threads for fast-tier reads), all at [`BACKGROUND_NICE`], with its own S3 connections. It
/// stops when the tier is dropped.
struct Background {
    handle: tokio::runtime::Handle,
    _stop: tokio::sync::oneshot::Sender<()>,
}

impl Background {
    fn start() -> std::io::Result<Background> {
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let (handle_tx, handle_rx) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name("recache-s3-uploads".into())
            .spawn(move || {
                lower_priority();
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .thread_name("recache-s3-blocking")
                    .on_thread_start(lower_priority)
                    .build();
                match rt {
                    Ok(rt) => {
                        let _ = handle_tx.send(Ok(rt.handle().clone()));
                        // Until the tier is dropped; then its tasks are dropped with the runtime.
                        let _ = rt.block_on(stopped);
                    }
                    Err(e) => {
                        let _ = handle_tx.send(Err(e));
                    }
                }
            })?;
        let handle = handle_rx
            .recv()
            .map_err(|_| std::io::Error::other("the S3 upload thread ended at start"))??;
        Ok(Background {
            handle,
            _stop: stop,
        })
    }
}

/// Longest a background upload holds a part (or a small blob) back while clients' reads
/// stream ([`Tier::reading`]): reads are on a build's critical path, uploads are not (the
/// blob is durable in the fast tier and journaled). Bounded, so a server that is never idle
/// still uploads: at worst one part per this long per upload.
const YIELD_MAX: Duration = Duration::from_secs(1);

/// A client's read in progress (see [`Tier::reading`]).
pub(crate) struct ReadGuard(Arc<std::sync::atomic::AtomicUsize>);

impl Drop for ReadGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// A journal row (see the module docs).
#[derive(Debug, Clone, PartialEq, Eq)]
enum Row {
    Queued,
    Creating,
    Multipart {
        upload_id: String,
        part_size: u64,
        parts: Vec<(i32, String)>,
        /// The parts are bytes of a verified blob (false: early parts of a write attempt not
        /// yet verified; see the module docs).
        verified: bool,
    },
}

impl Row {
    /// `q` | `c` | `m`/`u` part_size(u64 LE) id_len(u32 LE) id { number(i32 LE) etag_len(u32
    /// LE) etag }* (`m` verified, `u` unverified parts). Versioned by the tag byte; an
    /// unreadable row decodes as `Creating` (the safe state: stray uploads of the key are
    /// aborted and the blob uploaded again).
    fn encode(&self) -> Vec<u8> {
        match self {
            Row::Queued => b"q".to_vec(),
            Row::Creating => b"c".to_vec(),
            Row::Multipart {
                upload_id,
                part_size,
                parts,
                verified,
            } => {
                let mut out = if *verified { b"m" } else { b"u" }.to_vec();
                out.extend_from_slice(&part_size.to_le_bytes());
                put_str(&mut out, upload_id);
                for (n, etag) in parts {
                    out.extend_from_slice(&n.to_le_bytes());
                    put_str(&mut out, etag);
                }
                out
            }
        }
    }

    fn decode(b: &[u8]) -> Row {
        fn parse(b: &[u8]) -> Option<Row> {
            match b.first()? {
                b'q' => Some(Row::Queued),
                b'c' => Some(Row::Creating),
                tag @ (b'm' | b'u') => {
                    let verified = *tag == b'm';
                    let part_size = u64::from_le_bytes(b.get(1..9)?.try_into().ok()?);
                    let mut rest = &b[9..];
                    let upload_id = take_str(&mut rest)?;
                    let mut parts = Vec::new();
                    while !rest.is_empty() {
                        let n = i32::from_le_bytes(rest.get(..4)?.try_into().ok()?);
                        rest = &rest[4..];
                        parts.push((n, take_str(&mut rest)?));
                    }
                    Some(Row::Multipart {
                        upload_id,
                        part_size,
                        parts,
                        verified,
                    })
                }
                _ => None,
            }
        }
        parse(b).unwrap_or(Row::Creating)
    }
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u32).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn take_str(rest: &mut &[u8]) -> Option<String> {
    let len = u32::from_le_bytes(rest.get(..4)?.try_into().ok()?) as usize;
    let s = std::str::from_utf8(rest.get(4..4 + len)?).ok()?.to_owned();
    *rest = &rest[4 + len..];
    Some(s)
}

/// One blob for the workers; holds its queue slot (if it was admitted) until it is done.
struct Job {
    digest: Digest,
    _slot: Option<OwnedSemaphorePermit>,
    attempt: u32,
}

/// A map of at most `capacity` entries; the earliest inserted goes first when it is full.
#[derive(Debug)]
struct Bounded<K, V> {
    map: HashMap<K, V>,
    order: VecDeque<K>,
    capacity: usize,
}

impl<K: std::hash::Hash + Eq + Copy, V> Bounded<K, V> {
    fn new(capacity: usize) -> Bounded<K, V> {
        Bounded {
            map: HashMap::new(),
            order: VecDeque::new(),
            capacity,
        }
    }

    fn get(&self, k: &K) -> Option<&V> {
        self.map.get(k)
    }

    /// Forgets `k`. Its place in `order` goes with age.
    fn remove(&mut self, k: &K) {
        self.map.remove(k);
    }

    fn insert(&mut self, k: K, v: V) {
        if self.map.insert(k, v).is_none() {
            self.order.push_back(k);
            while self.order.len() > self.capacity {
                if let Some(old) = self.order.pop_front() {
                    self.map.remove(&old);
                }
            }
        }
    }
}

/// Blobs recently seen in the bucket, each trusted for [`KNOWN_TTL`].
#[derive(Debug)]
struct Known(Bounded<Digest, Instant>);

impl Known {
    fn contains(&self, d: &Digest) -> bool {
        self.0.get(d).is_some_and(|t| t.elapsed() < KNOWN_TTL)
    }

    /// Forgets `d` (its object turned out gone or bad).
    fn remove(&mut self, d: &Digest) {
        self.0.remove(d);
    }

    fn insert(&mut self, d: Digest) {
        self.0.insert(d, Instant::now());
    }
}

/// Which kind of object of the bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Kind {
    /// A blob (`<prefix>cas/…`).
    Blob,
    /// An action result (`<prefix>ac/…`).
    Action,
}

/// Objects' last-modified times (unix seconds) as far as this server knows: from its uploads,
/// its HEADs and its refreshes.
type Ages = Bounded<(Kind, Digest), i64>;

/// What retention did since the server started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RetentionStats {
    /// Objects whose age was renewed because they were used.
    pub refreshed: u64,
    /// Objects the expiry sweep deleted (not used for 1.5 × the retention).
    pub expired: u64,
    /// Objects deleted because a read found they were not their blob.
    pub bad_deleted: u64,
    /// Sweep passes finished (stray multipart uploads, and the expiry with a retention): the
    /// first runs at start.
    pub sweeps: u64,
}

/// Refreshes (HEAD, copy) in flight at once.
const REFRESH_CONCURRENCY: usize = 8;

fn now_secs() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |t| t.as_secs() as i64)
}

/// A fetch from the bucket several readers may await: `Ok(false)` when the bucket lacks it.
type SharedFetch =
    futures::future::Shared<futures::future::BoxFuture<'static, Result<bool, Status>>>;

/// What the bucket has under a blob's key.
enum Object {
    Body(aws_sdk_s3::primitives::ByteStream),
    /// No object.
    Gone,
    /// An object that is not the blob (its size says so), with why.
    Bad(String),
}

/// The S3 tier of one server. See the module docs.
pub(crate) struct Tier {
    /// The bucket, for clients' requests (reads, existence, action results).
    s3: S3Blobs,
    /// The bucket again, with its own connections, for the background work on `bg`.
    s3_bg: S3Blobs,
    bg: Background,
    store: LocalStore,
    options: TierOptions,
    slots: Arc<Semaphore>,
    jobs_tx: mpsc::UnboundedSender<Job>,
    jobs_rx: tokio::sync::Mutex<mpsc::UnboundedReceiver<Job>>,
    /// Admissions in progress per blob (a row is not dropped while its blob may still arrive).
    admitting: Mutex<HashMap<Digest, usize>>,
    /// Blobs a worker is uploading (one worker per blob).
    uploading: Mutex<HashSet<Digest>>,
    /// Large blobs whose first parts go to the bucket while they arrive (see [`PartTee`]);
    /// a worker waits for this before it takes the blob over.
    early: Mutex<HashMap<Digest, futures::future::Shared<futures::future::BoxFuture<'static, ()>>>>,
    known: Mutex<Known>,
    /// Clients' ByteStream reads streaming now; uploads yield to them (see [`YIELD_MAX`]).
    reads: Arc<std::sync::atomic::AtomicUsize>,
    fetches: Mutex<HashMap<Digest, SharedFetch>>,
    /// Until when clients' requests leave the bucket alone (see [`TierOptions::cooldown`]).
    cooling: Mutex<Option<Instant>>,
    /// Retention: what this server knows of objects' ages, refreshes in flight, and counts.
    ages: Mutex<Ages>,
    refreshing: Mutex<HashSet<(Kind, Digest)>>,
    refresh_slots: Arc<Semaphore>,
    refreshed: std::sync::atomic::AtomicU64,
    expired: std::sync::atomic::AtomicU64,
    bad_deleted: std::sync::atomic::AtomicU64,
    sweeps: std::sync::atomic::AtomicU64,
    /// Uploads to the bucket that failed, and cooldowns started (for metrics).
    upload_failures: std::sync::atomic::AtomicU64,
    cooldowns: std::sync::atomic::AtomicU64,
}

impl std::fmt::Debug for Tier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tier")
            .field("s3", &self.s3)
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

/// A blob's place in the upload queue while it is being stored; when it ends (stored or not)
/// its job goes to the workers.
pub(crate) struct Admission {
    tier: Arc<Tier>,
    digest: Digest,
    slot: Option<OwnedSemaphorePermit>,
}

impl std::fmt::Debug for Admission {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Admission")
            .field("digest", &self.digest)
            .finish_non_exhaustive()
    }
}

impl Drop for Admission {
    fn drop(&mut self) {
        {
            let mut admitting = lock(&self.tier.admitting);
            if let Some(n) = admitting.get_mut(&self.digest) {
                *n -= 1;
                if *n == 0 {
                    admitting.remove(&self.digest);
                }
            }
        }
        let _ = self.tier.jobs_tx.send(Job {
            digest: self.digest,
            _slot: self.slot.take(),
            attempt: 0,
        });
    }
}

/// A part a [`PartTee`] hands to the early uploader: its number, its bytes, and its place
/// among the parts allowed in memory at once.
type EarlyPart = (i32, bytes::Bytes, OwnedSemaphorePermit);

/// Copies the parts of a large blob out of the byte stream being stored, for the bucket, as
/// they go by ([`Tier::tee`]). At most [`TierOptions::part_concurrency`] parts are in memory
/// (being filled or on their way up); a part that starts while none is free is skipped, and
/// the worker reads it from the fast tier later, so a bucket slower than the client never
/// slows the write. Nothing is completed from these bytes until the stored blob has verified.
#[derive(Debug)]
pub(crate) struct PartTee {
    size: u64,
    part_size: u64,
    /// Bytes of the blob gone by.
    seen: u64,
    current: Option<(i32, bytes::BytesMut, OwnedSemaphorePermit)>,
    permits: Arc<Semaphore>,
    tx: mpsc::UnboundedSender<EarlyPart>,
    /// Tells the early uploader how the write attempt ended; dropped unsent = failed.
    outcome: Option<tokio::sync::oneshot::Sender<bool>>,
}

impl PartTee {
    /// The write attempt these parts came from ended: `verified` when its blob verified and
    /// was stored. Only then may the parts sent become part of an object; otherwise their
    /// upload is aborted.
    pub fn settle(&mut self, verified: bool) {
        if let Some(tx) = self.outcome.take() {
            let _ = tx.send(verified);
        }
    }

    /// The next bytes of the blob, in order.
    pub fn feed(&mut self, mut data: &[u8]) {
        while !data.is_empty() && self.seen < self.size && !self.tx.is_closed() {
            let index = self.seen / self.part_size;
            let offset = self.seen % self.part_size;
            let len = self.part_size.min(self.size - index * self.part_size);
            if offset == 0 {
                self.current = self.permits.clone().try_acquire_owned().ok().map(|p| {
                    (
                        index as i32 + 1,
                        bytes::BytesMut::with_capacity(len as usize),
                        p,
                    )
                });
            }
            let take = (len - offset).min(data.len() as u64) as usize;
            if let Some((_, buf, _)) = &mut self.current {
                buf.extend_from_slice(&data[..take]);
            }
            self.seen += take as u64;
            data = &data[take..];
            if offset + take as u64 == len
                && let Some((n, buf, permit)) = self.current.take()
            {
                let _ = self.tx.send((n, buf.freeze(), permit));
            }
        }
    }
}

/// A reader that shows what it reads to a [`PartTee`] (the store's input for a large upload).
pub(crate) struct TeeReader<R> {
    pub inner: R,
    pub tee: PartTee,
}

impl<R: std::io::Read> std::io::Read for TeeReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.tee.feed(&buf[..n]);
        Ok(n)
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// An S3 failure as the client sees it: the cache is unavailable for now (a miss to recache).
pub(crate) fn unavailable(e: &S3Error) -> Status {
    Status::unavailable(format!("the cache's S3 storage failed: {e}"))
}

impl Tier {
    /// A tier over `store` (the fast tier) and the bucket in `options`. No request is made.
    pub fn new(store: LocalStore, options: TierOptions) -> Result<Arc<Tier>, S3Error> {
        let s3 = S3Blobs::new(options.s3.clone())?;
        let s3_bg = S3Blobs::new(options.s3.clone())?;
        let bg = Background::start()
            .map_err(|e| local_err(EMPTY_DIGEST, format!("starting the upload thread: {e}")))?;
        let (jobs_tx, jobs_rx) = mpsc::unbounded_channel();
        let capacity = options.known_capacity;
        Ok(Arc::new(Tier {
            s3,
            s3_bg,
            bg,
            store,
            slots: Arc::new(Semaphore::new(options.queue.max(1))),
            known: Mutex::new(Known(Bounded::new(options.known_capacity))),
            options,
            jobs_tx,
            jobs_rx: tokio::sync::Mutex::new(jobs_rx),
            admitting: Default::default(),
            uploading: Default::default(),
            early: Default::default(),
            reads: Default::default(),
            fetches: Default::default(),
            cooling: Default::default(),
            ages: Mutex::new(Ages::new(capacity)),
            refreshing: Default::default(),
            refresh_slots: Arc::new(Semaphore::new(REFRESH_CONCURRENCY)),
            refreshed: Default::default(),
            expired: Default::default(),
            bad_deleted: Default::default(),
            sweeps: Default::default(),
            upload_failures: Default::default(),
            cooldowns: Default::default(),
        }))
    }

    /// A client's request to the bucket (`call`, not sent until awaited), unless the bucket
    /// cools down after a failure (see [`TierOptions::cooldown`]): then UNAVAILABLE at once.
    /// A failure starts a cooldown, a success ends one.
    async fn ask<T>(
        &self,
        call: impl std::future::Future<Output = Result<T, S3Error>>,
    ) -> Result<T, Status> {
        if let Some(until) = *lock(&self.cooling) {
            let now = Instant::now();
            if now < until {
                return Err(Status::unavailable(format!(
                    "the cache's S3 storage failed moments ago (the server's log says how); \
                     it is asked again in {:.1} s",
                    (until - now).as_secs_f64()
                )));
            }
        }
        let result = call.await;
        let mut cooling = lock(&self.cooling);
        match &result {
            Ok(_) => *cooling = None,
            Err(e) => {
                let now = Instant::now();
                if cooling.is_none_or(|until| until <= now) {
                    self.cooldowns
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    tracing::warn!(error = %e, cooldown_s = self.options.cooldown.as_secs_f64(),
                        "the S3 bucket failed; clients' requests leave it alone for the cooldown");
                }
                // (A cooldown too large for the clock counts as a year.)
                let year = Duration::from_secs(365 * 24 * 3600);
                *cooling = Some(now + self.options.cooldown.min(year));
            }
        }
        result.map_err(|e| unavailable(&e))
    }

    /// Uploads to the bucket that failed so far (each is retried).
    pub fn upload_failures(&self) -> u64 {
        self.upload_failures
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Cooldowns started so far (the bucket failed a client's request).
    pub fn cooldowns(&self) -> u64 {
        self.cooldowns.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The bucket's state as clients' requests found it: answering, or cooling down after a
    /// failure (and for how much longer).
    pub fn bucket_state(&self) -> String {
        match *lock(&self.cooling) {
            Some(until) if until > Instant::now() => format!(
                "failing: clients' requests leave it alone for {:.1} s more (the fast tier \
                 serves; uploads stay journaled)",
                (until - Instant::now()).as_secs_f64()
            ),
            _ => format!("answering ({} uploads pending)", self.pending()),
        }
    }

    /// The bucket.
    pub fn s3(&self) -> &S3Blobs {
        &self.s3
    }

    /// Marks a client's read as streaming until the guard is dropped: background uploads hold
    /// their next part back meanwhile, for at most [`YIELD_MAX`] each.
    pub fn reading(&self) -> ReadGuard {
        self.reads
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        ReadGuard(self.reads.clone())
    }

    /// Waits while clients' reads stream, up to [`YIELD_MAX`].
    async fn yield_to_reads(&self) {
        let start = Instant::now();
        while self.reads.load(std::sync::atomic::Ordering::Relaxed) > 0
            && start.elapsed() < YIELD_MAX
        {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Starts the workers and the sweep (on the background thread, see [`BACKGROUND_NICE`]),
    /// after queueing every journal row again (recovery, see the module docs). The caller
    /// aborts the returned tasks to stop them (what they were doing stays journaled).
    pub fn start(self: &Arc<Self>) -> Vec<tokio::task::JoinHandle<()>> {
        let mut tasks = Vec::new();
        match self.store.journal_rows() {
            Ok(rows) => {
                if !rows.is_empty() {
                    tracing::info!(rows = rows.len(), "resuming journaled S3 uploads");
                }
                for (digest, _) in rows {
                    let _ = self.jobs_tx.send(Job {
                        digest,
                        _slot: None,
                        attempt: 0,
                    });
                }
            }
            Err(e) => tracing::error!(error = %e, "cannot read the S3 upload journal"),
        }
        for _ in 0..self.options.uploaders.max(1) {
            let me = self.clone();
            tasks.push(self.bg.handle.spawn(async move { me.work().await }));
        }
        let me = self.clone();
        tasks.push(self.bg.handle.spawn(async move {
            loop {
                match me.sweep().await {
                    Ok(0) => {}
                    Ok(n) => {
                        tracing::info!(aborted = n, "S3 sweep aborted stray multipart uploads")
                    }
                    Err(e) => tracing::warn!(error = %e, "S3 sweep failed"),
                }
                match me.expire().await {
                    Ok(0) => {}
                    Ok(n) => tracing::info!(deleted = n, "S3 retention deleted unused objects"),
                    Err(e) => tracing::warn!(error = %e, "S3 retention sweep failed"),
                }
                me.sweeps.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tokio::time::sleep(me.options.sweep_every).await;
            }
        }));
        tasks
    }

    /// Waits for a slot in the upload queue, then journals `d` (`queued`, unless a row is
    /// there already) before the caller stores it. RESOURCE_EXHAUSTED when the queue stays
    /// full for [`TierOptions::queue_wait`].
    pub async fn admit(self: &Arc<Self>, d: Digest) -> Result<Admission, Status> {
        let slot =
            match tokio::time::timeout(self.options.queue_wait, self.slots.clone().acquire_owned())
                .await
            {
                Ok(Ok(slot)) => slot,
                _ => {
                    return Err(Status::resource_exhausted(format!(
                        "the S3 upload queue is full ({} uploads outstanding for {:?}); nothing \
                     was stored, retry later",
                        self.options.queue, self.options.queue_wait
                    )));
                }
            };
        {
            let mut admitting = lock(&self.admitting);
            self.journal_queued(d)
                .map_err(|e| Status::internal(format!("writing the upload journal: {e}")))?;
            *admitting.entry(d).or_default() += 1;
        }
        Ok(Admission {
            tier: self.clone(),
            digest: d,
            slot: Some(slot),
        })
    }

    /// Queues `d`, already in the fast tier (a Remote Asset download), for upload: journaled
    /// first, so it is not evicted before it is in the bucket. Outside the queue's bound (the
    /// download itself was the back-pressure).
    pub fn adopt(&self, d: Digest) {
        if d == EMPTY_DIGEST {
            return;
        }
        match self.journal_queued(d) {
            Ok(()) => {
                let _ = self.jobs_tx.send(Job {
                    digest: d,
                    _slot: None,
                    attempt: 0,
                });
            }
            Err(e) => tracing::warn!(digest = %d, error = %e, "cannot journal a download for S3"),
        }
    }

    /// For a large blob about to be stored by an upload that holds its admission: a [`PartTee`]
    /// the store's input runs through, so the bucket's multipart upload starts while the blob
    /// still arrives instead of after. `None` for small blobs, blobs known to be in the bucket,
    /// or one another upload is already working on.
    pub fn tee(self: &Arc<Self>, d: Digest) -> Option<PartTee> {
        let part_size = self.s3_bg.part_size();
        if d.size_bytes < self.s3_bg.multipart_threshold() || lock(&self.known).contains(&d) {
            return None;
        }
        if !lock(&self.uploading).insert(d) {
            return None;
        }
        let permits = Arc::new(Semaphore::new(self.options.part_concurrency.max(1)));
        let (tx, rx) = mpsc::unbounded_channel();
        let (outcome_tx, outcome_rx) = tokio::sync::oneshot::channel();
        let me = self.clone();
        let task = async move {
            if let Err(e) = me.early_parts(d, rx, outcome_rx).await {
                tracing::debug!(digest = %d, error = %e,
                    "early S3 parts stopped; the upload worker carries on from the journal");
            }
            lock(&me.uploading).remove(&d);
            lock(&me.early).remove(&d);
        }
        .boxed()
        .shared();
        lock(&self.early).insert(d, task.clone());
        self.bg.handle.spawn(task);
        Some(PartTee {
            size: d.size_bytes,
            part_size,
            seen: 0,
            current: None,
            permits,
            tx,
            outcome: Some(outcome_tx),
        })
    }

    /// Starts `d`'s multipart upload and sends the parts its [`PartTee`] hands over, recording
    /// each in the journal as unverified. When the write attempt ends, its parts become
    /// verified (the blob verified and was stored) or the upload is aborted and the row goes
    /// back to `queued`. Leaves the rest (parts it skipped, the completion) to the worker that
    /// takes the row next.
    async fn early_parts(
        &self,
        d: Digest,
        rx: mpsc::UnboundedReceiver<EarlyPart>,
        outcome: tokio::sync::oneshot::Receiver<bool>,
    ) -> Result<(), S3Error> {
        // Only a fresh row: a row with progress (an earlier attempt) is the worker's to resume.
        match self.store.journal_get(d).map_err(|e| local_err(d, e))? {
            Some(r) if Row::decode(&r) == Row::Queued => {}
            _ => return Ok(()),
        }
        if self.s3_bg.contains(d).await? {
            return Ok(()); // the worker finds it there and finishes the row
        }
        let (upload_id, part_size) = self.create_upload(d).await?;
        let mut parts = Vec::new();
        let upload_id = &upload_id;
        let mut rx = rx;
        let mut uploads = futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
            .map(|(n, data, permit): EarlyPart| async move {
                self.yield_to_reads().await;
                let etag = self.s3_bg.upload_part(d, upload_id, n, data).await;
                drop(permit); // the tee may build the next part
                etag.map(|e| (n, e))
            })
            .buffer_unordered(self.options.part_concurrency.max(1));
        while let Some(part) = uploads.next().await {
            parts.push(part?);
            self.record_parts(d, upload_id, part_size, &parts, false)?;
        }
        drop(uploads);
        let verified = outcome.await.unwrap_or(false);
        let ours = |row: Option<bytes::Bytes>| {
            row.map(|r| Row::decode(&r)).is_some_and(
                |r| matches!(r, Row::Multipart { upload_id: id, .. } if id == *upload_id),
            )
        };
        let row = self.store.journal_get(d).map_err(|e| local_err(d, e))?;
        if verified {
            if ours(row) {
                self.record_parts(d, upload_id, part_size, &parts, true)?;
            }
            return Ok(());
        }
        // The attempt's bytes did not verify (or it died): they must never complete an object.
        self.s3_bg.abort(&self.s3_bg.key(d), upload_id).await?;
        if ours(self.store.journal_get(d).map_err(|e| local_err(d, e))?) {
            self.put_row(d, &Row::Queued)?;
        }
        Ok(())
    }

    /// Creates `d`'s multipart upload, journaled on both sides of the call (`creating`, then
    /// `multipart` with no parts). Returns the upload id and part size.
    async fn create_upload(&self, d: Digest) -> Result<(String, u64), S3Error> {
        self.put_row(d, &Row::Creating)?;
        let upload_id = self.s3_bg.start_multipart(d).await?;
        let part_size = self.s3_bg.part_size();
        self.record_parts(d, &upload_id, part_size, &[], false)?;
        Ok((upload_id, part_size))
    }

    /// Journals the parts of `d`'s multipart upload done so far (`verified`: read from the fast
    /// tier's verified copy, or an early attempt's that verified).
    fn record_parts(
        &self,
        d: Digest,
        upload_id: &str,
        part_size: u64,
        parts: &[(i32, String)],
        verified: bool,
    ) -> Result<(), S3Error> {
        self.put_row(
            d,
            &Row::Multipart {
                upload_id: upload_id.to_owned(),
                part_size,
                parts: parts.to_vec(),
                verified,
            },
        )
    }

    /// Aborts whatever multipart upload `row` may have open for `d`: its own upload id, or for
    /// a `creating` row (the create's answer was never recorded) every open upload of the key.
    async fn discard_upload(&self, d: Digest, row: &Row) -> Result<(), S3Error> {
        let key = self.s3_bg.key(d);
        match row {
            Row::Queued => {}
            Row::Multipart { upload_id, .. } => self.s3_bg.abort(&key, upload_id).await?,
            Row::Creating => {
                for u in self.s3_bg.open_uploads(Some(&key)).await? {
                    self.s3_bg.abort(&key, &u.upload_id).await?;
                }
            }
        }
        Ok(())
    }

    /// Gives `d` a `queued` row unless it has a row already (whose progress is kept).
    fn journal_queued(&self, d: Digest) -> Result<(), store::StoreError> {
        match self.store.journal_get(d)? {
            Some(_) => Ok(()),
            None => self.store.journal_put(d, &Row::Queued.encode()),
        }
    }

    async fn work(self: Arc<Self>) {
        loop {
            let job = {
                let mut rx = self.jobs_rx.lock().await;
                rx.recv().await
            };
            let Some(mut job) = job else { return };
            // The blob's first parts may still be going up as it arrived: take over after.
            let early = lock(&self.early).get(&job.digest).cloned();
            if let Some(early) = early {
                early.await;
            }
            if !lock(&self.uploading).insert(job.digest) {
                continue; // another worker has it; this job's slot is released here
            }
            let result = self.upload(job.digest).await;
            lock(&self.uploading).remove(&job.digest);
            match result {
                Ok(()) => {}
                Err(e) => {
                    self.upload_failures
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    job.attempt += 1;
                    let wait = Duration::from_secs(1u64 << job.attempt.min(6)).min(RETRY_MAX);
                    tracing::warn!(digest = %job.digest, attempt = job.attempt, ?wait, error = %e,
                        "S3 upload failed; it stays journaled and is tried again");
                    let tx = self.jobs_tx.clone();
                    tokio::spawn(async move {
                        tokio::time::sleep(wait).await;
                        let _ = tx.send(job);
                    });
                }
            }
        }
    }

    /// Works one journal row until the blob is in the bucket (see the module docs). `Ok` also
    /// when there is nothing to do (no row), or nothing yet (the blob is still arriving: its
    /// admission queues it again).
    async fn upload(&self, d: Digest) -> Result<(), S3Error> {
        let row = match self.store.journal_get(d) {
            Ok(Some(r)) => Row::decode(&r),
            Ok(None) => return Ok(()),
            Err(e) => return Err(local_err(d, e)),
        };
        if !self.store.contains(d) {
            if lock(&self.admitting).contains_key(&d) {
                return Ok(()); // still arriving: its admission queues it again
            }
            // Never stored (or gone by hand): nothing to upload, so nothing to keep open (a
            // `creating` row's upload may exist unrecorded: every open one of the key goes).
            self.discard_upload(d, &row).await?;
            let admitting = lock(&self.admitting);
            if !admitting.contains_key(&d) && !self.store.contains(d) {
                tracing::info!(digest = %d, "dropping the journal row of a blob that was never stored");
                self.store.journal_remove(d).map_err(|e| local_err(d, e))?;
            }
            return Ok(());
        }
        if d == EMPTY_DIGEST || lock(&self.known).contains(&d) {
            return self.finished(d);
        }
        if d.size_bytes < self.s3_bg.multipart_threshold() {
            // A row from a larger threshold (or an early attempt) may hold an upload open.
            if row != Row::Queued {
                self.discard_upload(d, &row).await?;
                self.put_row(d, &Row::Queued)?;
            }
            self.yield_to_reads().await;
            let data = self.read_range(d, 0, d.size_bytes).await?;
            self.s3_bg.put_bytes(d, data).await?;
            return self.finished(d);
        }
        let row = match row {
            Row::Multipart {
                verified: false, ..
            } => {
                // Early parts of an attempt that never settled (the process died): not known
                // to be the blob's bytes. Start over from the fast tier's verified copy.
                self.discard_upload(d, &row).await?;
                self.put_row(d, &Row::Queued)?;
                Row::Queued
            }
            row => row,
        };
        let (upload_id, part_size, mut parts) = match row {
            Row::Multipart {
                upload_id,
                part_size,
                parts,
                ..
            } => {
                if self.s3_bg.contains(d).await? {
                    // Completed before the row was updated (a crash), or by another server.
                    let _ = self.s3_bg.abort(&self.s3_bg.key(d), &upload_id).await;
                    return self.finished(d);
                }
                (upload_id, part_size, parts)
            }
            Row::Queued | Row::Creating => {
                if self.s3_bg.contains(d).await? {
                    return self.finished(d);
                }
                // A create may have reached S3 unrecorded: its upload would leak.
                self.discard_upload(d, &row).await?;
                let (upload_id, part_size) = self.create_upload(d).await?;
                (upload_id, part_size, vec![])
            }
        };
        let count = d.size_bytes.div_ceil(part_size).max(1) as i32;
        let done: HashSet<i32> = parts.iter().map(|(n, _)| *n).collect();
        let todo: Vec<i32> = (1..=count).filter(|n| !done.contains(n)).collect();
        let mut uploads = futures::stream::iter(todo)
            .map(|n| {
                let upload_id = &upload_id;
                async move {
                    let start = (n as u64 - 1) * part_size;
                    let len = part_size.min(d.size_bytes - start);
                    self.yield_to_reads().await;
                    let data = self.read_range(d, start, len).await?;
                    let etag = self.s3_bg.upload_part(d, upload_id, n, data).await?;
                    Ok::<_, S3Error>((n, etag))
                }
            })
            .buffer_unordered(self.options.part_concurrency.max(1));
        let mut failed = None;
        while let Some(part) = uploads.next().await {
            match part {
                Ok(p) => {
                    parts.push(p);
                    self.record_parts(d, &upload_id, part_size, &parts, true)?;
                }
                Err(e) => {
                    failed = Some(e);
                    break;
                }
            }
        }
        drop(uploads);
        let result = match failed {
            Some(e) => Err(e),
            None => self.s3_bg.complete(d, &upload_id, &parts).await,
        };
        match result {
            Ok(()) => self.finished(d),
            Err(e) if e.is_no_such_upload() => {
                if self.s3_bg.contains(d).await? {
                    return self.finished(d);
                }
                // Aborted under us (a sweep): start over.
                self.put_row(d, &Row::Queued)?;
                Err(e)
            }
            Err(e) => Err(e),
        }
    }

    /// The blob is in the bucket: forget its row (it becomes evictable), remember it is there.
    fn finished(&self, d: Digest) -> Result<(), S3Error> {
        self.store.journal_remove(d).map_err(|e| local_err(d, e))?;
        lock(&self.known).insert(d);
        lock(&self.ages).insert((Kind::Blob, d), now_secs());
        Ok(())
    }

    fn put_row(&self, d: Digest, row: &Row) -> Result<(), S3Error> {
        self.store
            .journal_put(d, &row.encode())
            .map_err(|e| local_err(d, e))
    }

    /// Bytes `start..start+len` of `d` from the fast tier (on a blocking thread).
    async fn read_range(&self, d: Digest, start: u64, len: u64) -> Result<bytes::Bytes, S3Error> {
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || {
            let mut reader = store
                .open_blob(d)?
                .ok_or_else(|| store::StoreError::invalid(format!("{d} left the fast tier")))?;
            reader.read_range(start, len)
        })
        .await
        .map_err(|e| local_err(d, e))?
        .map_err(|e| local_err(d, e))
    }

    /// Aborts the open multipart uploads under the prefix that no journal row owns and that
    /// are older than the grace period. Returns how many it aborted.
    pub async fn sweep(&self) -> Result<usize, S3Error> {
        let open = self.s3_bg.open_uploads(None).await?;
        if open.is_empty() {
            return Ok(0);
        }
        let owned: HashSet<String> = self
            .store
            .journal_rows()
            .map_err(|e| local_err(EMPTY_DIGEST, e))?
            .into_iter()
            .filter_map(|(_, r)| match Row::decode(&r) {
                Row::Multipart { upload_id, .. } => Some(upload_id),
                _ => None,
            })
            .collect();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |t| t.as_secs() as i64);
        let cutoff = now - self.options.sweep_grace.as_secs() as i64;
        let mut aborted = 0;
        for u in open {
            // Only keys of this server's own layout: a server on prefix `a/` must not sweep
            // the uploads of one on `a/cas/`.
            if !owned.contains(&u.upload_id)
                && u.initiated <= cutoff
                && self.s3_bg.is_own_blob_key(&u.key)
            {
                self.s3_bg.abort(&u.key, &u.upload_id).await?;
                aborted += 1;
            }
        }
        Ok(aborted)
    }

    /// Which of `digests` neither the fast tier nor the bucket holds. A failed HEAD counts as
    /// missing (the client then uploads the blob again: safe), and so does every blob not
    /// checked while the bucket cools down after a failure (this call's rest included).
    pub async fn missing(&self, digests: &[Digest]) -> Vec<Digest> {
        self.missing_as(digests, true).await
    }

    /// [`missing`](Tier::missing) for the outputs of an ActionCache hit: what the fast tier
    /// lacks is asked of the bucket (HEAD) even when it is known to be there, because a hit
    /// must never name a blob that is gone, and objects vanish behind the server's back (a
    /// lifecycle rule, another server's sweep, an operator).
    pub async fn missing_for_hit(&self, digests: &[Digest]) -> Vec<Digest> {
        self.missing_as(digests, false).await
    }

    async fn missing_as(&self, digests: &[Digest], trust_known: bool) -> Vec<Digest> {
        let local = self.store.missing(digests.iter().copied());
        let unknown: Vec<Digest> = if trust_known {
            let known = lock(&self.known);
            local.into_iter().filter(|d| !known.contains(d)).collect()
        } else {
            local
        };
        // Once one HEAD has failed (after the SDK's retries) the bucket cools down, and the
        // rest is not sent: a bucket that is down would otherwise cost every digest its retries.
        let checked: Vec<(Digest, Option<i64>)> = futures::stream::iter(unknown)
            .map(|d| async move { (d, self.ask(self.s3.stat(d)).await.ok().flatten()) })
            .buffer_unordered(HEAD_CONCURRENCY)
            .collect()
            .await;
        let mut known = lock(&self.known);
        let mut ages = lock(&self.ages);
        let mut out = Vec::new();
        for (d, modified) in checked {
            if let Some(modified) = modified {
                known.insert(d);
                ages.insert((Kind::Blob, d), modified);
            } else {
                known.remove(&d);
                out.push(d);
            }
        }
        out
    }

    /// Makes sure the fast tier holds `d`, fetching it from the bucket (verified; one download
    /// per blob however many wait). `Ok(false)`: neither has it (or the bucket's object was not
    /// the blob, and is deleted). RESOURCE_EXHAUSTED: the fast tier cannot make room for it
    /// (the caller can [`pass_through`](Tier::pass_through) instead).
    pub async fn fetch(
        self: &Arc<Self>,
        inner: &Arc<crate::Inner>,
        d: Digest,
    ) -> Result<bool, Status> {
        if self.store.contains(d) {
            return Ok(true);
        }
        let shared = {
            let mut fetches = lock(&self.fetches);
            if let Some(f) = fetches.get(&d) {
                f.clone()
            } else {
                let me = self.clone();
                let inner = inner.clone();
                let f = async move {
                    let result = me.download(&inner, d).await;
                    lock(&me.fetches).remove(&d);
                    result
                }
                .boxed()
                .shared();
                fetches.insert(d, f.clone());
                f
            }
        };
        shared.await
    }

    /// Opens `d`'s object, telling a missing object from one that is not the blob.
    async fn open_object(&self, d: Digest) -> Result<Object, Status> {
        self.ask(async {
            match self.s3.get(d).await {
                Ok(Some(body)) => Ok(Object::Body(body)),
                Ok(None) => Ok(Object::Gone),
                Err(e) if e.is_bad_object() => Ok(Object::Bad(e.to_string())),
                Err(e) => Err(e),
            }
        })
        .await
    }

    /// The bucket's object of `d` is not `d` (wrong size or bytes): deleted, so the blob reads
    /// as missing and the next upload of it replaces it, and no longer known to be there.
    async fn drop_bad_object(&self, d: Digest, why: &str) {
        tracing::warn!(digest = %d, why, "the bucket's object of a blob is not that blob; deleting it");
        lock(&self.known).remove(&d);
        match self.s3.delete(d).await {
            Ok(()) => {
                self.bad_deleted
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            Err(e) => tracing::warn!(digest = %d, error = %e, "could not delete a bad object"),
        }
    }

    /// An object found gone: no longer known to be there.
    fn forget(&self, d: Digest) {
        lock(&self.known).remove(&d);
    }

    async fn download(&self, inner: &Arc<crate::Inner>, d: Digest) -> Result<bool, Status> {
        if self.store.contains(d) {
            return Ok(true);
        }
        let _room = inner.reserve(d)?;
        let mut body = match self.open_object(d).await? {
            Object::Body(b) => b,
            Object::Gone => {
                self.forget(d);
                return Ok(false);
            }
            Object::Bad(why) => {
                self.drop_bad_object(d, &why).await;
                return Ok(false);
            }
        };
        let failed = |e: String| {
            Status::unavailable(format!("fetching {d} from the cache's S3 storage: {e}"))
        };
        let mut dest = self
            .store
            .begin_write(d)
            .await
            .map_err(|e| failed(e.to_string()))?;
        while let Some(chunk) = body
            .try_next()
            .await
            .map_err(|e| failed(format!("S3 GetObject: {e}")))?
        {
            if let Err(e) = dest.write_all(&chunk).await {
                if e.kind() == std::io::ErrorKind::InvalidData {
                    self.drop_bad_object(d, &e.to_string()).await;
                    return Ok(false);
                }
                return Err(failed(format!("storing {d}: {e}")));
            }
        }
        match dest.commit().await {
            Ok(_) => {}
            Err(e) if matches!(e.kind(), store::ErrorKind::InvalidData) => {
                self.drop_bad_object(d, &e.to_string()).await;
                return Ok(false);
            }
            Err(e) => return Err(failed(format!("storing {d}: {e}"))),
        }
        lock(&self.known).insert(d);
        Ok(true)
    }

    /// Bytes `offset..end` of `d` straight from the bucket to the reader, for a blob the fast
    /// tier cannot make room for: nothing is kept. The whole object is read and hashed (bytes
    /// outside the range are not sent), so the stream ends cleanly only if the object is the
    /// blob; else DATA_LOSS, and the object is deleted. NOT_FOUND when the bucket lacks it.
    pub async fn pass_through(
        self: &Arc<Self>,
        d: Digest,
        offset: u64,
        end: u64,
    ) -> Result<mpsc::Receiver<Result<Vec<u8>, Status>>, Status> {
        let mut body = match self.open_object(d).await? {
            Object::Body(b) => b,
            Object::Gone => {
                self.forget(d);
                return Err(Status::not_found(format!("blob {d} not found")));
            }
            Object::Bad(why) => {
                self.drop_bad_object(d, &why).await;
                return Err(Status::not_found(format!("blob {d} not found")));
            }
        };
        let (tx, rx) = mpsc::channel::<Result<Vec<u8>, Status>>(4);
        let me = self.clone();
        tokio::spawn(async move {
            let mut hasher = hashing::Hasher::new();
            let mut pos = 0u64;
            let mut pending = Vec::with_capacity(crate::READ_CHUNK_BYTES);
            let mut client = Some(tx);
            let read: Result<(), String> = async {
                while let Some(chunk) = body
                    .try_next()
                    .await
                    .map_err(|e| format!("S3 GetObject {d}: {e}"))?
                {
                    hasher.update(&chunk);
                    let (from, to) = (pos, pos + chunk.len() as u64);
                    pos = to;
                    if to > offset && from < end {
                        let a = (offset.max(from) - from) as usize;
                        let b = (end.min(to) - from) as usize;
                        pending.extend_from_slice(&chunk[a..b]);
                    }
                    if pending.len() >= crate::READ_CHUNK_BYTES {
                        let out = std::mem::take(&mut pending);
                        if let Some(c) = &client
                            && c.send(Ok(out)).await.is_err()
                        {
                            client = None; // the reader went away
                            return Ok(());
                        }
                    }
                }
                Ok(())
            }
            .await;
            let Some(c) = client else { return };
            let outcome = read.and_then(|()| {
                let actual = hasher.finish();
                if actual == d {
                    Ok(())
                } else {
                    Err(format!("the object hashes to {actual}"))
                }
            });
            match outcome {
                Ok(()) => {
                    if !pending.is_empty() || offset == end {
                        let _ = c.send(Ok(pending)).await;
                    }
                }
                Err(e) => {
                    if e.starts_with("the object hashes") {
                        me.drop_bad_object(d, &e).await;
                    }
                    let _ = c
                        .send(Err(Status::data_loss(format!(
                            "reading {d} from the cache's S3 storage failed: {e}"
                        ))))
                        .await;
                }
            }
        });
        Ok(rx)
    }

    /// A whole-blob read of `d`, which the fast tier lacks, served while it is fetched: one
    /// GetObject whose bytes go to the client and into the fast tier at once, hashed on the
    /// way. Bytes reach the client before the end is verified (as from any proxy), so a blob
    /// that does not verify ends the stream with DATA_LOSS instead of a clean finish (and its
    /// object is deleted): a client never takes wrong bytes for the blob. The last bytes and
    /// the clean end go out as soon as the whole blob verified, before the fast tier's copy is
    /// fsynced and committed. Other readers of the blob meanwhile wait for the fast tier. A
    /// blob the fast tier cannot make room for is passed through without being kept.
    /// `Ok(None)`: a fetch of it is already running (wait for it instead).
    pub async fn stream_through(
        self: &Arc<Self>,
        inner: &Arc<crate::Inner>,
        d: Digest,
    ) -> Result<Option<mpsc::Receiver<Result<Vec<u8>, Status>>>, Status> {
        let (done_tx, done_rx) = tokio::sync::oneshot::channel::<Result<bool, Status>>();
        {
            let mut fetches = lock(&self.fetches);
            if fetches.contains_key(&d) {
                return Ok(None);
            }
            let waiting = async move {
                done_rx
                    .await
                    .unwrap_or_else(|_| Err(Status::unavailable("the fetch was interrupted")))
            }
            .boxed()
            .shared();
            fetches.insert(d, waiting);
        }
        let finish =
            move |me: &Tier, result: Result<bool, Status>, tx: tokio::sync::oneshot::Sender<_>| {
                lock(&me.fetches).remove(&d);
                let _ = tx.send(result);
            };
        let room = match inner.reserve(d).map_err(Status::from) {
            Ok(r) => r,
            Err(e) if e.code() == tonic::Code::ResourceExhausted => {
                // Waiting readers retry on their own; this one streams without keeping it.
                finish(self, Err(e), done_tx);
                return self.pass_through(d, 0, d.size_bytes).await.map(Some);
            }
            Err(e) => {
                finish(self, Err(e.clone()), done_tx);
                return Err(e);
            }
        };
        let opened = async {
            let object = self.open_object(d).await?;
            let dest = self
                .store
                .begin_write(d)
                .await
                .map_err(|e| Status::internal(format!("storing {d}: {e}")))?;
            Ok::<_, Status>((object, dest))
        }
        .await;
        let (mut body, mut dest) = match opened {
            Ok((Object::Body(body), dest)) => (body, dest),
            Ok((Object::Gone, _)) => {
                self.forget(d);
                finish(self, Ok(false), done_tx);
                return Err(Status::not_found(format!("blob {d} not found")));
            }
            Ok((Object::Bad(why), _)) => {
                self.drop_bad_object(d, &why).await;
                finish(self, Ok(false), done_tx);
                return Err(Status::not_found(format!("blob {d} not found")));
            }
            Err(e) => {
                finish(self, Err(e.clone()), done_tx);
                return Err(e);
            }
        };
        let (tx, rx) = mpsc::channel::<Result<Vec<u8>, Status>>(4);
        let me = self.clone();
        tokio::spawn(async move {
            let _room = room;
            let mut pending = Vec::with_capacity(crate::READ_CHUNK_BYTES);
            let mut client = Some(tx);
            // Err((message, the object is not the blob)).
            let result: Result<(), (String, bool)> = async {
                while let Some(chunk) = body
                    .try_next()
                    .await
                    .map_err(|e| (format!("S3 GetObject {d}: {e}"), false))?
                {
                    dest.write_all(&chunk).await.map_err(|e| {
                        let bad = e.kind() == std::io::ErrorKind::InvalidData;
                        (format!("storing {d}: {e}"), bad)
                    })?;
                    pending.extend_from_slice(&chunk);
                    if pending.len() >= crate::READ_CHUNK_BYTES {
                        let out = std::mem::replace(
                            &mut pending,
                            Vec::with_capacity(crate::READ_CHUNK_BYTES),
                        );
                        // A reader that went away does not stop the fast tier's copy.
                        if let Some(c) = &client
                            && c.send(Ok(out)).await.is_err()
                        {
                            client = None;
                        }
                    }
                }
                dest.verify().map_err(|e| {
                    (
                        format!("the bucket's copy of {d} is not that blob: {e}"),
                        true,
                    )
                })?;
                // Verified: the reader gets its last bytes and its end of stream now, while
                // the fast tier's copy is made durable (the fsync of a large blob takes a
                // while, and the reader's bytes do not depend on it).
                if let Some(c) = client.take()
                    && (!pending.is_empty() || d.size_bytes == 0)
                {
                    let _ = c.send(Ok(std::mem::take(&mut pending))).await;
                }
                dest.commit()
                    .await
                    .map_err(|e| (format!("storing {d}: {e}"), false))?;
                Ok(())
            }
            .await;
            match result {
                Ok(()) => {
                    lock(&me.known).insert(d);
                    finish(&me, Ok(true), done_tx);
                }
                Err((e, bad)) => {
                    tracing::warn!(digest = %d, error = %e, "streaming a blob from S3 failed");
                    if bad {
                        me.drop_bad_object(d, &e).await;
                    }
                    if let Some(c) = &client {
                        let _ = c
                            .send(Err(Status::data_loss(format!(
                                "reading {d} from the cache's S3 storage failed midway: {e}"
                            ))))
                            .await;
                    }
                    finish(&me, Err(Status::unavailable(e)), done_tx);
                }
            }
        });
        Ok(Some(rx))
    }

    /// The action result of `action` from the bucket, if it has one.
    pub async fn get_ac(&self, action: Digest) -> Result<Option<Vec<u8>>, Status> {
        self.ask(self.s3.get_ac(action)).await
    }

    /// Stores the action result of `action` in the bucket (so every server sharing it hits).
    pub async fn put_ac(&self, action: Digest, encoded: Vec<u8>) -> Result<(), Status> {
        self.ask(self.s3.put_ac(action, encoded)).await?;
        lock(&self.ages).insert((Kind::Action, action), now_secs());
        Ok(())
    }

    /// `digests` (of `kind`) were just used: with a retention, each whose object may be older
    /// than half of it is refreshed in the background (a HEAD first when its age is unknown
    /// here, then a copy onto itself if it is old), so the expiry keeps exactly what is used.
    /// A blob whose object turns out gone while the fast tier still holds it is uploaded again.
    /// Cheap when nothing is due: one map lookup per digest.
    pub fn used(self: &Arc<Self>, kind: Kind, digests: impl IntoIterator<Item = Digest>) {
        let Some(retention) = self.options.retention else {
            return;
        };
        let half = (retention.as_secs() / 2) as i64;
        let now = now_secs();
        for d in digests {
            if d == EMPTY_DIGEST {
                continue;
            }
            let known = lock(&self.ages).get(&(kind, d)).copied();
            if known.is_some_and(|m| now - m < half) || !lock(&self.refreshing).insert((kind, d)) {
                continue;
            }
            let me = self.clone();
            self.bg.handle.spawn(async move {
                if let Ok(_slot) = me.refresh_slots.clone().acquire_owned().await {
                    me.refresh(kind, d, known, half).await;
                }
                lock(&me.refreshing).remove(&(kind, d));
            });
        }
    }

    async fn refresh(self: &Arc<Self>, kind: Kind, d: Digest, known: Option<i64>, half: i64) {
        let key = match kind {
            Kind::Blob => self.s3_bg.key(d),
            Kind::Action => self.s3_bg.ac_key(d),
        };
        let modified = match known {
            Some(m) => Some(m),
            None => match self.s3_bg.stat_key(&key).await {
                Ok(found) => found.map(|(_, m)| m),
                Err(e) => {
                    tracing::debug!(key, error = %e, "retention: cannot learn an object's age");
                    return;
                }
            },
        };
        let now = now_secs();
        match modified {
            Some(m) if now - m < half => lock(&self.ages).insert((kind, d), m),
            Some(_) => match self.s3_bg.refresh(&key).await {
                Ok(true) => {
                    lock(&self.ages).insert((kind, d), now);
                    self.refreshed
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                Ok(false) => self.vanished(kind, d),
                Err(e) => tracing::warn!(key, error = %e, "retention: refreshing an object failed"),
            },
            None => self.vanished(kind, d),
        }
    }

    /// An object used here is gone from the bucket: forgotten, and a blob the fast tier still
    /// holds goes up again.
    fn vanished(&self, kind: Kind, d: Digest) {
        if kind == Kind::Blob {
            self.forget(d);
            if self.store.contains(d) {
                tracing::info!(digest = %d, "a used blob vanished from the bucket; uploading it again");
                self.adopt(d);
            }
        }
    }

    /// The expiry sweep (with a retention): deletes the objects of this server's layout that
    /// nobody refreshed for 1.5 × the retention (objects used within the last retention were
    /// refreshed at most half a retention ago, see [`Tier::used`]), except those this server
    /// saw used and has not refreshed yet. Returns how many it deleted.
    pub async fn expire(&self) -> Result<u64, S3Error> {
        let Some(retention) = self.options.retention else {
            return Ok(0);
        };
        let limit = now_secs() - (retention.as_secs() * 3 / 2) as i64;
        let mut deleted = 0;
        for (kind, listing) in [(Kind::Blob, "cas/"), (Kind::Action, "ac/")] {
            for (key, modified) in self.s3_bg.list(listing).await? {
                let own = match kind {
                    Kind::Blob => self.s3_bg.is_own_blob_key(&key),
                    Kind::Action => self.s3_bg.is_own_ac_key(&key),
                };
                if !own || modified > limit {
                    continue;
                }
                let Some(d) = key
                    .rsplit('/')
                    .next()
                    .and_then(|name| name.replacen('-', "/", 1).parse::<Digest>().ok())
                else {
                    continue;
                };
                let seen = lock(&self.ages).get(&(kind, d)).is_some_and(|m| *m > limit);
                if seen || lock(&self.refreshing).contains(&(kind, d)) {
                    continue;
                }
                self.s3_bg.delete_key(&key).await?;
                if kind == Kind::Blob {
                    self.forget(d);
                }
                deleted += 1;
                self.expired
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        }
        Ok(deleted)
    }

    /// What retention did since the start.
    pub fn retention_stats(&self) -> RetentionStats {
        use std::sync::atomic::Ordering::Relaxed;
        RetentionStats {
            refreshed: self.refreshed.load(Relaxed),
            expired: self.expired.load(Relaxed),
            bad_deleted: self.bad_deleted.load(Relaxed),
            sweeps: self.sweeps.load(Relaxed),
        }
    }

    /// Journal rows outstanding (uploads not yet in the bucket).
    pub fn pending(&self) -> usize {
        self.store.journal_len().map_or(0, |n| n as usize)
    }
}

/// A multipart upload as a test stages it: upload id, part size, parts done (number, ETag).
#[doc(hidden)]
pub type StagedUpload<'a> = (&'a str, u64, &'a [(i32, String)]);

/// A journal row as the tier writes it, for tests that stage a crash's leftovers: `None` is
/// `creating`; `Some` a multipart upload with these parts done.
#[doc(hidden)]
pub fn encode_row_for_tests(multipart: Option<StagedUpload<'_>>) -> Vec<u8> {
    match multipart {
        None => Row::Creating.encode(),
        Some((id, part_size, parts)) => Row::Multipart {
            upload_id: id.to_owned(),
            part_size,
            parts: parts.to_vec(),
            verified: true,
        }
        .encode(),
    }
}

fn local_err(d: Digest, e: impl std::fmt::Display) -> S3Error {
    crate::s3::local_error(d, e)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn journal_rows_round_trip_and_unreadable_rows_are_treated_as_creating() {
        for row in [
            Row::Queued,
            Row::Creating,
            Row::Multipart {
                upload_id: "abc-123".into(),
                part_size: 8 << 20,
                parts: vec![(1, "\"e1\"".into()), (3, "\"e3\"".into())],
                verified: true,
            },
            Row::Multipart {
                upload_id: "early".into(),
                part_size: 8 << 20,
                parts: vec![(2, "\"e2\"".into())],
                verified: false,
            },
        ] {
            assert_eq!(Row::decode(&row.encode()), row);
        }
        assert_eq!(Row::decode(b""), Row::Creating);
        assert_eq!(Row::decode(b"m\x01"), Row::Creating);
        assert_eq!(Row::decode(b"zzz"), Row::Creating);
    }

    #[test]
    fn the_known_set_is_bounded() {
        let mut k = Known(Bounded::new(3));
        let ds: Vec<Digest> = (0..5u8).map(|i| Digest::of_bytes(&[i])).collect();
        for d in &ds {
            k.insert(*d);
        }
        assert_eq!(k.0.map.len(), 3);
        assert!(!k.contains(&ds[0]) && !k.contains(&ds[1]));
        assert!(k.contains(&ds[4]));
    }
}
