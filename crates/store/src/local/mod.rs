//! The local store: small blobs in an LMDB database, large blobs one file each in a pool.
//!
//! Layout under the store root:
//!
//! ```text
//! db/                     LMDB environment (tables `blobs`, `atime`, `pool`, `meta`)
//! large/ab/<hash>-<size>  one read-only file per blob at or above the threshold
//! large/ab/<hash>-<size>.zst  the same, stored as zstd frames (compressed pools only; the
//!                          name records the layout, see `pool::Stored`)
//! large/.tmp-<pid>-<uuid>  writes in progress, each locked (`flock`) by its writer; removed
//!                          at open once no one holds the lock
//! leases/                 what each process using the store has leased (see `leases`): GC,
//!                          in any process, never deletes a blob a live process has leased
//! ```
//!
//! Opening costs the same whatever the store holds: the usage counters live in the database
//! (updated in the transactions that change them), and only the pool's top level is listed
//! (where temp files live), never the shards.

mod leases;
pub(crate) mod pool;
mod small;
mod write_behind;
pub(crate) mod zstd_blob;

use std::collections::HashMap;
use std::fs;
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use hashing::{Digest, EMPTY_DIGEST, Fingerprint};

use crate::destination::LocalDestination;
use crate::error::StoreError;
use pool::Pool;
use small::{Counters, SmallDb};

/// Default size at and above which a blob lives in the large-file pool.
pub const DEFAULT_LARGE_THRESHOLD: u64 = 512 * 1024;

/// Default LMDB map size: address space reserved for the small-blob database, not disk.
pub const DEFAULT_DB_MAP_SIZE: usize = 64 << 30;

/// Access times gathered in memory before they are written in one transaction: bounds the map a
/// long-running engine keeps (one write per this many distinct reads).
const ACCESS_FLUSH_ENTRIES: usize = 8192;

/// When a write takes the store above its `max_size`, GC evicts down to this fraction of it, so
/// a store at its bound collects once per tenth of growth, not on every write.
const GC_LOW_WATER_PERCENT: u64 = 90;

/// Blobs GC deletes per hold of the exclusive lease lock: bounds how long a process recording
/// a lease can wait for a GC in another process (a few milliseconds of unlinks).
const GC_BATCH: usize = 256;

/// Options for [`LocalStore::open`].
#[derive(Debug, Clone)]
pub struct LocalStoreOptions {
    /// Directory holding the store (created if missing).
    pub root: PathBuf,
    /// Blobs of at least this many bytes go to the large-file pool. Default 512 KiB.
    pub large_threshold: u64,
    /// Maximum size of the small-blob database. Default 64 GiB (reserved address space only).
    pub db_map_size: usize,
    /// How pool files are kept. Default `None` (plain files, hardlinked into workspaces);
    /// `Zstd` compresses them at rest (a server's choice: reads decode, nothing is linked).
    pub pool_compression: PoolCompression,
    /// Bound on the bytes of blob content the store keeps. A write that takes it above runs an
    /// LRU GC (leases respected) down to 90 % of the bound. `None` (the default for the library):
    /// unbounded; the `recache` CLI sets 10 GiB.
    pub max_size: Option<u64>,
    /// Commit the small blobs a cache hit stores (fetched outputs, an output root's Directory
    /// messages) on a background thread, serving them from memory until then, so the hit does
    /// not wait for the database. Default `true`; a server turns it off (its writes are the
    /// clients' uploads, which must be committed before they are acknowledged). Bounded memory,
    /// and committed before the store closes: see [`LocalStore`]'s notes on write-behind.
    pub write_behind: bool,
}

impl LocalStoreOptions {
    /// Defaults for a store at `root`.
    pub fn new(root: impl Into<PathBuf>) -> LocalStoreOptions {
        LocalStoreOptions {
            root: root.into(),
            large_threshold: DEFAULT_LARGE_THRESHOLD,
            db_map_size: DEFAULT_DB_MAP_SIZE,
            pool_compression: PoolCompression::None,
            max_size: None,
            write_behind: true,
        }
    }
}

/// How pool files (blobs at or above the threshold) are kept on disk.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum PoolCompression {
    /// Plain files: materialized by read-only hardlink, streamed as they are.
    #[default]
    None,
    /// zstd at rest, 1 MiB independent frames with a seek table in a skippable frame: a valid
    /// `.zst` file; a read at any offset decodes only the frames it touches. `load_file` gives
    /// no path (there is no plain file to link); readers use `load_bytes` / `read_range`.
    /// Small blobs in the database are compressed too, each on its own, when that saves at
    /// least an eighth. A store keeps the format it was created with (opening it the other way
    /// is an error naming it).
    Zstd,
}

/// How much the store holds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StoreUsage {
    /// Blobs in the database.
    pub small_blobs: u64,
    /// Bytes of blobs in the database.
    pub small_bytes: u64,
    /// Blobs in the pool.
    pub large_blobs: u64,
    /// Bytes of blobs in the pool.
    pub large_bytes: u64,
}

impl StoreUsage {
    /// Total bytes of blob content.
    pub fn total_bytes(&self) -> u64 {
        self.small_bytes + self.large_bytes
    }
    /// Total number of blobs.
    pub fn total_blobs(&self) -> u64 {
        self.small_blobs + self.large_blobs
    }
}

/// What [`LocalStore::repair`] found.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RepairReport {
    /// Blobs the store holds.
    pub blobs: u64,
    /// Their logical bytes.
    pub bytes: u64,
    /// Index rows of pool files that were gone (an eviction cut short).
    pub dropped_rows: u64,
    /// Committed pool files that had no index row (a write cut short after its rename).
    pub adopted_files: u64,
}

/// A process that stored something syncs the database when it closes the store, unless some
/// process did in the last this many milliseconds.
const EXIT_SYNC_INTERVAL_MS: u64 = 5_000;

/// `meta` flag set once the pool's file names record how each blob is laid out (`.zst` for
/// zstd frames); a store without it is migrated once at open ([`Pool::name_legacy_frames`]).
const LAYOUT_NAMED_KEY: &[u8] = b"pool-layout-named";

/// `meta` flag set while the store is open and cleared by the last process to close it: found
/// set by the first opener, it means a crash.
const DIRTY_KEY: &[u8] = b"open-dirty";

/// Opens (creating) the store's `open.lock`.
fn open_lock(root: &Path) -> Result<fs::File, StoreError> {
    let path = root.join("open.lock");
    fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| StoreError::io(format!("opening {}", path.display()), e))
}

/// What [`LocalStore::gc`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GcReport {
    /// Blobs removed.
    pub removed_blobs: u64,
    /// Bytes removed.
    pub removed_bytes: u64,
    /// Blobs kept because a lease protects them.
    pub leased_skipped: u64,
    /// Bytes in the store afterwards.
    pub remaining_bytes: u64,
    /// Named records ([`LocalStore::put_ref`]) removed: those not used since the newest blob
    /// this GC evicted.
    pub removed_refs: u64,
}

/// The local blob store. Cheap to clone; clones share everything.
///
/// Operations are blocking but fast for small blobs (an LMDB transaction, microseconds); calls
/// that stream large files (`store_file`, `capture_directory`, `materialize_directory`) belong in
/// `spawn_blocking` when called from async code.
///
/// **Write-behind** ([`LocalStoreOptions::write_behind`], on by default): the small blobs a
/// cache hit stores (fetched outputs, output roots' Directory messages) are served from memory
/// at once and committed to the database by a background thread, so the hit does not wait for
/// the commit. At most 32 MiB wait; what does not fit is committed by the caller. Other
/// processes sharing the store see the blobs once committed; [`flush_writes`](Self::flush_writes)
/// commits them now, and dropping the last handle commits them before the store closes. A
/// commit that fails (a full disk) keeps the blobs in memory for this process, and the next
/// store call that commits reports the error.
///
/// ```
/// let dir = tempfile::tempdir().unwrap();
/// let store = store::LocalStore::open(store::LocalStoreOptions::new(dir.path())).unwrap();
/// let d = store.store_bytes(b"hello").unwrap();
/// assert!(store.contains(d));
/// assert_eq!(store.load_bytes(d).unwrap().unwrap(), &b"hello"[..]);
/// ```
#[derive(Debug, Clone)]
pub struct LocalStore {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    root: PathBuf,
    /// Held shared while the store is open (see [`LocalStore::open`]).
    open_lock: fs::File,
    threshold: u64,
    /// Shared with the write-behind's committer (as are `generation` and `accounting`).
    db: Arc<SmallDb>,
    pool: Pool,
    /// Small blobs of cache hits waiting for their commit; `None` when the options turn it off.
    write_behind: Option<write_behind::WriteBehind>,
    max_size: Option<u64>,
    /// A size-bound GC is running (one at a time per process).
    gc_running: AtomicBool,
    /// One GC at a time in this process: two at once would each re-derive the counters from a
    /// listing the other was changing.
    gc_lock: Mutex<()>,
    /// Bumped by every write that can grow the store; GC re-derives the counters from its
    /// listing only when no write happened meanwhile (else it subtracts what it removed).
    generation: Arc<AtomicU64>,
    /// Reads since the last flush: fingerprint → unix milliseconds. Flushed in one transaction by
    /// `flush_access_times`, `gc` and drop, so a read never pays for a write transaction.
    recent_access: Mutex<HashMap<Fingerprint, u64>>,
    /// The same for named records (`get_ref`), by record key.
    recent_ref_access: Mutex<HashMap<[u8; 40], u64>>,
    /// Leased digests, shared with every process that has the store open.
    leases: leases::Leases,
    /// Bytes streamed into destinations so far (for progress reporting).
    received: AtomicU64,
    /// Blobs and bytes GC removed since the store was opened (by this process).
    evicted_blobs: AtomicU64,
    evicted_bytes: AtomicU64,
    /// Room promised to writes in progress ([`LocalStore::try_reserve`]). Every transaction
    /// that raises the usage counters runs under this lock and turns the reservation of the
    /// blob it stores into stored bytes at the same moment, so `stored + reserved` read under
    /// it never counts a blob twice (or not at all).
    accounting: Arc<Mutex<Accounting>>,
}

/// Reservations held; see `Inner::accounting`.
#[derive(Debug, Default)]
struct Accounting {
    /// Sum of `open`'s byte counts.
    reserved: u64,
    /// Reservation id → (blob it is for, bytes it still holds).
    open: HashMap<u64, (Digest, u64)>,
    next_id: u64,
}

impl Accounting {
    /// Turns one reservation of each of `digests`, just stored, into stored bytes.
    fn settle(&mut self, digests: impl IntoIterator<Item = Digest>) {
        if self.open.is_empty() {
            return;
        }
        for d in digests {
            let held = self
                .open
                .values_mut()
                .find(|(rd, bytes)| *rd == d && *bytes > 0)
                .map(|(_, bytes)| std::mem::take(bytes));
            if let Some(bytes) = held {
                self.reserved -= bytes;
            }
        }
    }
}

/// What the store holds and has promised, when a reservation did not fit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Room {
    /// Bytes of stored blobs.
    pub stored: u64,
    /// Bytes reserved by writes in progress.
    pub reserved: u64,
}

/// Room held in the store for one write in progress ([`LocalStore::try_reserve`]). When the
/// blob it is for is stored, its bytes move from reserved to stored in one step; dropping it
/// releases whatever it still holds (a write that failed or found the blob already there).
#[derive(Debug)]
pub struct Reservation {
    store: LocalStore,
    id: u64,
}

impl Drop for Reservation {
    fn drop(&mut self) {
        let mut acc = self.store.accounting();
        if let Some((_, bytes)) = acc.open.remove(&self.id) {
            acc.reserved -= bytes;
        }
    }
}

/// A blob opened for reading ranges ([`LocalStore::open_blob`]). A compressed pool file
/// decodes only the 1 MiB frames a range touches.
#[derive(Debug)]
pub struct BlobReader {
    digest: Digest,
    source: BlobSource,
}

#[derive(Debug)]
enum BlobSource {
    Memory(Bytes),
    File {
        file: fs::File,
        layout: zstd_blob::Layout,
        path: PathBuf,
    },
}

impl BlobReader {
    /// Bytes `offset .. offset + len`, clipped to the blob.
    pub fn read_range(&mut self, offset: u64, len: u64) -> Result<Bytes, StoreError> {
        match &mut self.source {
            BlobSource::Memory(b) => {
                let start = usize::try_from(offset).unwrap_or(usize::MAX).min(b.len());
                let end = usize::try_from(offset.saturating_add(len))
                    .unwrap_or(usize::MAX)
                    .min(b.len());
                Ok(b.slice(start..end))
            }
            BlobSource::File { file, layout, path } => layout
                .read_range(file, self.digest.size_bytes, offset, len)
                .map(Bytes::from)
                .map_err(|e| blob_read_error(path, e)),
        }
    }
}

/// A reader that fails (`InvalidData`) rather than yield more than `left` bytes.
struct Capped<'a> {
    inner: &'a mut dyn Read,
    left: u64,
    /// Set when the source had more.
    exceeded: &'a std::cell::Cell<bool>,
}

impl Read for Capped<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        // One byte past the cap is asked for, so a source that has more is noticed.
        let want = buf
            .len()
            .min(usize::try_from(self.left.saturating_add(1)).unwrap_or(usize::MAX));
        let n = self.inner.read(&mut buf[..want])?;
        if n as u64 > self.left {
            self.exceeded.set(true);
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "more bytes than allowed",
            ));
        }
        self.left -= n as u64;
        Ok(n)
    }
}

/// A read error of a pool file: undecodable content is `InvalidData`, the rest I/O.
fn blob_read_error(path: &Path, e: std::io::Error) -> StoreError {
    match e.kind() {
        std::io::ErrorKind::InvalidData => {
            StoreError::invalid(format!("stored blob {}: {e}", path.display()))
        }
        _ => StoreError::io(format!("reading {}", path.display()), e),
    }
}

/// The `refs` key of `digest`: hash and size, so two digests never share a record.
fn ref_key(digest: Digest) -> [u8; 40] {
    let mut key = [0u8; 40];
    key[..32].copy_from_slice(digest.hash.as_bytes());
    key[32..].copy_from_slice(&digest.size_bytes.to_le_bytes());
    key
}

/// The digest a 40-byte key (see [`ref_key`]) names.
fn digest_of_key(key: &[u8]) -> Option<Digest> {
    let hash: [u8; 32] = key.get(..32)?.try_into().ok()?;
    let size: [u8; 8] = key.get(32..40)?.try_into().ok()?;
    Some(Digest::new(Fingerprint(hash), u64::from_le_bytes(size)))
}

/// A file's modification time in nanoseconds since the epoch (0 if unknown).
fn mtime_nanos(meta: &fs::Metadata) -> u64 {
    meta.modified()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos() as u64)
}

/// Access times are unix milliseconds: seconds would make LRU order a coin toss within a busy
/// second.
/// [`LocalStore::growing`] on the books themselves, for the write-behind's committer, which
/// holds them but not the store.
fn growing_in<T>(
    accounting: &Mutex<Accounting>,
    generation: &AtomicU64,
    digests: impl IntoIterator<Item = Digest>,
    txn: impl FnOnce() -> Result<T, StoreError>,
) -> Result<T, StoreError> {
    let mut acc = accounting.lock().unwrap_or_else(|p| p.into_inner());
    // Before the transaction, under the lock GC takes to reset the counters: a GC that listed
    // the pool before this blob's rename sees the generation move and subtracts instead of
    // overwriting this increment.
    generation.fetch_add(1, Ordering::AcqRel);
    let out = txn()?;
    acc.settle(digests);
    Ok(out)
}

fn now_millis() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl LocalStore {
    /// Opens (creating if needed) the store described by `options`. Removes temp files left by
    /// an interrupted write; reads no blob content, and costs the same however much the store
    /// holds (except once, for a store written before the usage counters were persisted).
    ///
    /// A store this process already has open (the same directory, still held by anything:
    /// a runner being dropped, a background task finishing) is returned as it is, with the
    /// options it was first opened with, instead of failing: the database can be open once
    /// per process.
    pub fn open(options: LocalStoreOptions) -> Result<LocalStore, StoreError> {
        static OPEN: Mutex<Option<HashMap<PathBuf, std::sync::Weak<Inner>>>> = Mutex::new(None);
        let _ = fs::create_dir_all(&options.root);
        let key = fs::canonicalize(&options.root).unwrap_or_else(|_| options.root.clone());
        let mut open = OPEN.lock().unwrap_or_else(|p| p.into_inner());
        let open = open.get_or_insert_with(HashMap::new);
        open.retain(|_, w| w.strong_count() > 0);
        if let Some(inner) = open.get(&key).and_then(std::sync::Weak::upgrade) {
            return Ok(LocalStore { inner });
        }
        let store = Self::open_new(options)?;
        open.insert(key, Arc::downgrade(&store.inner));
        Ok(store)
    }

    fn open_new(options: LocalStoreOptions) -> Result<LocalStore, StoreError> {
        let LocalStoreOptions {
            root,
            large_threshold,
            db_map_size,
            pool_compression,
            max_size,
            write_behind,
        } = options;
        let shown = root.clone();
        let ctx = move || format!("opening local store {}", shown.display());
        let db = SmallDb::open(
            &root.join("db"),
            db_map_size,
            pool_compression == PoolCompression::Zstd,
        )
        .map_err(|e| e.context(ctx()))?;
        let pool = Pool::open(
            &root.join("large"),
            pool_compression == PoolCompression::Zstd,
        )
        .map_err(|e| e.context(ctx()))?;
        // Who else has this store open: a shared lock on `open.lock` for as long as it is
        // open. The first opener (an exclusive lock is free) checks whether the last one shut
        // down cleanly; if not (a crash, kill -9), the index is repaired from a listing before
        // anything is served from it.
        let open_lock = open_lock(&root).map_err(|e| e.context(ctx()))?;
        let first = match open_lock.try_lock() {
            Ok(()) => true,
            Err(fs::TryLockError::WouldBlock) => false,
            Err(fs::TryLockError::Error(e)) => {
                return Err(StoreError::io(format!("{}: locking open.lock", ctx()), e));
            }
        };
        let crashed = first && db.flag(DIRTY_KEY).map_err(|e| e.context(ctx()))?;
        if first && !crashed {
            db.set_flag(DIRTY_KEY, true).map_err(|e| e.context(ctx()))?;
        }
        if !first || !crashed {
            // Shared from here on (a conversion when we held it exclusively).
            open_lock
                .lock_shared()
                .map_err(|e| StoreError::io(format!("{}: locking open.lock", ctx()), e))?;
        }
        if first && !db.flag(LAYOUT_NAMED_KEY).map_err(|e| e.context(ctx()))? {
            // Once per store: name the frame files of a compressed pool written before layouts
            // were recorded in names (free for a new or uncompressed store).
            let renamed = pool.name_legacy_frames().map_err(|e| e.context(ctx()))?;
            if renamed > 0 {
                tracing::info!(renamed, store = %root.display(), "pool files renamed to record their zstd layout");
            }
            db.set_flag(LAYOUT_NAMED_KEY, true)
                .map_err(|e| e.context(ctx()))?;
        }
        if db.counters().map_err(|e| e.context(ctx()))?.is_none() {
            // First open of this store (or of one from before the counters): count once.
            let mut c = Counters::default();
            for e in db.list().map_err(|e| e.context(ctx()))? {
                c.small_blobs += 1;
                c.small_bytes += e.digest.size_bytes;
            }
            for d in pool.list().map_err(|e| e.context(ctx()))? {
                c.large_blobs += 1;
                c.large_bytes += d.size_bytes;
            }
            db.set_counters(c).map_err(|e| e.context(ctx()))?;
        }
        let db = Arc::new(db);
        let generation = Arc::new(AtomicU64::new(0));
        let accounting = Arc::new(Mutex::new(Accounting::default()));
        let write_behind = write_behind.then(|| {
            write_behind::WriteBehind::new(write_behind::Books {
                db: db.clone(),
                accounting: accounting.clone(),
                generation: generation.clone(),
                max_size,
            })
        });
        let store = LocalStore {
            inner: Arc::new(Inner {
                open_lock,
                threshold: large_threshold.max(1),
                db,
                pool,
                write_behind,
                max_size,
                gc_running: AtomicBool::new(false),
                gc_lock: Mutex::new(()),
                generation,
                recent_access: Mutex::new(HashMap::new()),
                recent_ref_access: Mutex::new(HashMap::new()),
                leases: leases::Leases::new(&root),
                received: AtomicU64::new(0),
                evicted_blobs: AtomicU64::new(0),
                evicted_bytes: AtomicU64::new(0),
                accounting,
                root,
            }),
        };
        if crashed {
            let report = store.repair().map_err(|e| e.context(ctx()))?;
            tracing::warn!(
                ?report,
                store = %store.root().display(),
                "the store was not closed cleanly (a crash?): its index was repaired from a listing"
            );
            store
                .inner
                .open_lock
                .lock_shared()
                .map_err(|e| StoreError::io(format!("{}: locking open.lock", ctx()), e))?;
        }
        Ok(store)
    }

    /// Rebuilds the index from what is on disk: usage counters from a listing of the database
    /// and the pool, rows of pool files that are gone dropped, committed pool files that have
    /// no row (a crash between the rename and the record) adopted. Run at open when the last
    /// process using the store did not close it (a crash); costs a listing of every pool shard.
    pub fn repair(&self) -> Result<RepairReport, StoreError> {
        let _one = self.inner.gc_lock.lock().unwrap_or_else(|p| p.into_inner());
        let mut c = Counters::default();
        for e in self.inner.db.list()? {
            c.small_blobs += 1;
            c.small_bytes += e.digest.size_bytes;
        }
        let files = self.inner.pool.list()?;
        let rows: std::collections::HashSet<Fingerprint> =
            self.inner.db.pool_rows()?.into_iter().collect();
        let on_disk: std::collections::HashSet<Fingerprint> =
            files.iter().map(|d| d.hash).collect();
        let mut adopt = Vec::new();
        for d in &files {
            c.large_blobs += 1;
            c.large_bytes += d.size_bytes;
            if !rows.contains(&d.hash)
                && let Some((_, _, meta)) = self.inner.pool.locate(d)
            {
                adopt.push((d.hash, mtime_nanos(&meta)));
            }
        }
        let drop_rows: Vec<Fingerprint> = rows.difference(&on_disk).copied().collect();
        self.inner.db.repair(c, &drop_rows, &adopt, now_millis())?;
        self.inner.db.sync()?;
        Ok(RepairReport {
            blobs: c.small_blobs + c.large_blobs,
            bytes: c.small_bytes + c.large_bytes,
            dropped_rows: drop_rows.len() as u64,
            adopted_files: adopt.len() as u64,
        })
    }

    /// The store's root directory.
    pub fn root(&self) -> &Path {
        &self.inner.root
    }

    /// True when a blob of `size` bytes belongs in the database rather than the pool.
    pub fn is_small(&self, size: u64) -> bool {
        size < self.inner.threshold
    }

    pub(crate) fn pool(&self) -> &Pool {
        &self.inner.pool
    }

    /// Bytes received into [`LocalDestination`]s so far (downloads in progress included): a
    /// cheap counter for progress bars.
    pub fn bytes_received(&self) -> u64 {
        self.inner.received.load(Ordering::Relaxed)
    }

    pub(crate) fn note_received(&self, n: u64) {
        self.inner.received.fetch_add(n, Ordering::Relaxed);
    }

    fn touch(&self, digest: Digest) {
        self.touch_all([digest]);
    }

    fn accounting(&self) -> std::sync::MutexGuard<'_, Accounting> {
        self.inner
            .accounting
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// Reserves room for a write of `digest` when the blobs stored, the room already reserved
    /// and this blob fit in `max` bytes together; otherwise says how much is stored and
    /// reserved, so the caller can evict (see [`LocalStore::gc`]) and ask again. Reservations
    /// are this process's; other processes' writes count once they are stored.
    ///
    /// ```
    /// # let dir = tempfile::tempdir().unwrap();
    /// let store = store::LocalStore::open(store::LocalStoreOptions::new(dir.path())).unwrap();
    /// let blob = vec![7u8; 1000];
    /// let d = hashing::Digest::of_bytes(&blob);
    /// let room = store.try_reserve(d, 1500).unwrap();
    /// assert!(store.try_reserve(d, 1500).is_err(), "1000 + 1000 > 1500");
    /// store.store_verified(d, &mut &blob[..]).unwrap();
    /// // Stored: its bytes moved from reserved to stored, counted once.
    /// assert_eq!(store.room(), store::Room { stored: 1000, reserved: 0 });
    /// drop(room);
    /// ```
    pub fn try_reserve(&self, digest: Digest, max: u64) -> Result<Reservation, Room> {
        let mut acc = self.accounting();
        let stored = self.usage().total_bytes();
        let room = Room {
            stored,
            reserved: acc.reserved,
        };
        if stored
            .saturating_add(acc.reserved)
            .saturating_add(digest.size_bytes)
            > max
        {
            return Err(room);
        }
        let id = acc.next_id;
        acc.next_id += 1;
        acc.open.insert(id, (digest, digest.size_bytes));
        acc.reserved += digest.size_bytes;
        Ok(Reservation {
            store: self.clone(),
            id,
        })
    }

    /// Bytes stored and reserved, read together.
    pub fn room(&self) -> Room {
        let acc = self.accounting();
        Room {
            stored: self.usage().total_bytes(),
            reserved: acc.reserved,
        }
    }

    /// Runs `txn`, a transaction that stores `digests` and raises the counters, under the
    /// accounting lock, and turns one reservation of each stored digest into stored bytes.
    /// (LMDB runs one write transaction at a time anyway: the lock costs no concurrency.)
    fn growing<T>(
        &self,
        digests: impl IntoIterator<Item = Digest>,
        txn: impl FnOnce() -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        growing_in(&self.inner.accounting, &self.inner.generation, digests, txn)
    }

    /// Records uses in memory (`note` fills the maps); flushes them once they grow large.
    fn note_uses(
        &self,
        note: impl FnOnce(&mut HashMap<Fingerprint, u64>, &mut HashMap<[u8; 40], u64>, u64),
    ) {
        let full = {
            let mut blobs = self
                .inner
                .recent_access
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            let mut refs = self
                .inner
                .recent_ref_access
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            note(&mut blobs, &mut refs, now_millis());
            blobs.len() >= ACCESS_FLUSH_ENTRIES || refs.len() >= ACCESS_FLUSH_ENTRIES
        };
        if full && let Err(e) = self.write_access_times() {
            tracing::warn!(error = %e, "could not record access times");
        }
    }

    /// Called with the totals after every write that can grow the store: enforces `max_size`.
    fn after_growth(&self, totals: Counters) {
        self.inner.generation.fetch_add(1, Ordering::AcqRel);
        let Some(max) = self.inner.max_size else {
            return;
        };
        if totals.total_bytes() <= max || self.inner.gc_running.swap(true, Ordering::AcqRel) {
            return;
        }
        let target = max / 100 * GC_LOW_WATER_PERCENT;
        match self.gc(target) {
            Ok(report) => tracing::info!(
                removed_bytes = report.removed_bytes,
                max,
                "local store reached its size bound; evicted least-recently-used blobs"
            ),
            Err(e) => {
                tracing::warn!(error = %e, "local store is over its size bound and GC failed")
            }
        }
        self.inner.gc_running.store(false, Ordering::Release);
    }

    /// Stores `bytes`, returning their digest.
    pub fn store_bytes(&self, bytes: &[u8]) -> Result<Digest, StoreError> {
        if bytes.is_empty() {
            return Ok(EMPTY_DIGEST);
        }
        if self.is_small(bytes.len() as u64) {
            let digest = Digest::of_bytes(bytes);
            self.put_small(digest, bytes)?;
            Ok(digest)
        } else {
            let (digest, new) = self.inner.pool.write_from(&mut &bytes[..], None)?;
            self.note_pool_added(digest, new)?;
            Ok(digest)
        }
    }

    /// Stores what `src` yields, whose digest is not known in advance (an archive's entries),
    /// and returns its digest. At most `limit` bytes are taken: a source with more is
    /// `InvalidData` and stores nothing. Memory stays bounded whatever the source holds: up to
    /// the pool threshold is read into memory (a small blob), anything longer streams into the
    /// pool, hashed on the way.
    pub fn store_stream(&self, src: &mut dyn Read, limit: u64) -> Result<Digest, StoreError> {
        self.store_stream_checked(src, limit, None)
    }

    /// [`store_stream`](Self::store_stream) for a blob named by its hash alone (its size is
    /// not known in advance): nothing is stored unless the content hashes to `hash`
    /// (`InvalidData` otherwise).
    pub fn store_stream_hashed(
        &self,
        src: &mut dyn Read,
        limit: u64,
        hash: Fingerprint,
    ) -> Result<Digest, StoreError> {
        self.store_stream_checked(src, limit, Some(hash))
    }

    fn store_stream_checked(
        &self,
        src: &mut dyn Read,
        limit: u64,
        hash: Option<Fingerprint>,
    ) -> Result<Digest, StoreError> {
        let exceeded = std::cell::Cell::new(false);
        let mut capped = Capped {
            inner: src,
            left: limit,
            exceeded: &exceeded,
        };
        // Whatever failed, a source past the cap is the caller's `InvalidData`.
        let too_long = |e: StoreError| {
            if exceeded.get() {
                StoreError::invalid(format!("the stream holds more than {limit} bytes"))
            } else {
                e
            }
        };
        let mut head = Vec::new();
        (&mut capped)
            .take(self.inner.threshold)
            .read_to_end(&mut head)
            .map_err(|e| too_long(StoreError::io("reading a stream to store", e)))?;
        if (head.len() as u64) < self.inner.threshold {
            if let Some(hash) = hash {
                let digest = Digest::of_bytes(&head);
                if digest.hash != hash {
                    return Err(StoreError::invalid(format!(
                        "content hashes to {}, not {}",
                        digest.hash.to_hex(),
                        hash.to_hex()
                    )));
                }
            }
            return self.store_bytes(&head);
        }
        let mut whole = (&head[..]).chain(capped);
        let written = match hash {
            Some(hash) => self.inner.pool.write_from_hash(&mut whole, hash),
            None => self.inner.pool.write_from(&mut whole, None),
        };
        let (digest, new) = written.map_err(too_long)?;
        self.note_pool_added(digest, new)?;
        Ok(digest)
    }

    /// Stores an already verified small blob.
    pub(crate) fn put_small(&self, digest: Digest, bytes: &[u8]) -> Result<(), StoreError> {
        if digest == EMPTY_DIGEST {
            return Ok(());
        }
        // Already stored (an input captured again, an output fetched again): a read, not a
        // write transaction, and nothing for the exit to sync.
        if self.waiting(digest).is_some() || self.inner.db.contains(digest).unwrap_or(false) {
            self.touch(digest);
            return Ok(());
        }
        let totals = self.growing([digest], || self.inner.db.put(digest, bytes, now_millis()))?;
        self.after_growth(totals);
        Ok(())
    }

    /// Stores several verified small blobs in one transaction. Every digest must be correct
    /// for its bytes (callers verified them) and below the pool threshold.
    pub(crate) fn put_small_batch(&self, items: &[(Digest, &[u8])]) -> Result<(), StoreError> {
        let items: Vec<(Digest, &[u8])> = items
            .iter()
            .filter(|(d, _)| *d != EMPTY_DIGEST)
            .copied()
            .collect();
        if items.is_empty() {
            return Ok(());
        }
        // Most hits on a machine that built before find their Directory messages (and often
        // their outputs) already stored: then no write transaction at all, only an access
        // record in memory, as for a read.
        let digests: Vec<Digest> = items.iter().map(|(d, _)| *d).collect();
        let digests = self.not_waiting(digests);
        let absent: std::collections::HashSet<Digest> =
            self.inner.db.missing(&digests)?.into_iter().collect();
        let missing: Vec<(Digest, &[u8])> = items
            .iter()
            .filter(|(d, _)| absent.contains(d))
            .copied()
            .collect();
        for (d, _) in &items {
            self.touch(*d);
        }
        if missing.is_empty() {
            return Ok(());
        }
        if let Some(wb) = &self.inner.write_behind
            && wb.defer(&missing)
        {
            if let Some(totals) = wb.take_over_bound() {
                self.after_growth(totals);
            }
            return Ok(());
        }
        let totals = self.growing(missing.iter().map(|(d, _)| *d), || {
            self.inner.db.put_many(&missing, now_millis())
        })?;
        if let Some(wb) = &self.inner.write_behind {
            wb.recovered();
        }
        self.after_growth(totals);
        Ok(())
    }

    /// The small blob `digest` if it waits for its commit (see [`LocalStoreOptions::write_behind`]).
    fn waiting(&self, digest: Digest) -> Option<Bytes> {
        self.inner.write_behind.as_ref()?.get(digest)
    }

    /// `digests` without the small blobs waiting for their commit. Check these first, then
    /// the database: a blob leaves the first only once it is in the second.
    fn not_waiting(&self, digests: Vec<Digest>) -> Vec<Digest> {
        match &self.inner.write_behind {
            Some(wb) => wb.not_waiting(digests),
            None => digests,
        }
    }

    /// Commits the small blobs waiting for their commit, on this thread (see
    /// [`LocalStoreOptions::write_behind`]): afterwards other processes sharing the store see
    /// them. Closing the store does it too.
    pub fn flush_writes(&self) -> Result<(), StoreError> {
        match &self.inner.write_behind {
            Some(wb) => wb.flush(),
            None => Ok(()),
        }
    }

    /// Records a pool blob just committed by this process (`new`: the rename created it): its
    /// modification time for the integrity check, and the counters.
    pub(crate) fn note_pool_added(&self, digest: Digest, new: bool) -> Result<(), StoreError> {
        if !new {
            self.touch(digest);
            return Ok(());
        }
        let Some((_, _, meta)) = self.inner.pool.locate(&digest) else {
            // Evicted in the instant after its rename (a concurrent GC of an unleased write):
            // nothing to record, and the counters were never raised for it.
            return Ok(());
        };
        let totals = self.growing([digest], || {
            self.inner
                .db
                .pool_added(digest, mtime_nanos(&meta), new, now_millis())
        })?;
        self.after_growth(totals);
        Ok(())
    }

    /// Whether the pool file of `digest` still holds what was committed. Pool files are handed
    /// out as read-only hardlinks; a user who makes one writable (`chmod u+w`) and edits it in
    /// place edits the stored blob. Cheap check first: the file must still be read-only for
    /// everyone, of the right size, with the modification time recorded at commit. If any of that
    /// changed, the content is hashed: intact → the file is made read-only again and the new time
    /// recorded; changed → the blob is evicted (a later hit fetches or rebuilds it).
    fn pool_file_intact(&self, digest: Digest) -> bool {
        let Some((path, stored, meta)) = self.inner.pool.locate(&digest) else {
            return false;
        };
        let recorded = self.inner.db.pool_mtime(digest).ok().flatten();
        let read_only = std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o222 == 0;
        // A framed file's length is not the blob's; its seek table is checked on read.
        let right_size = stored == pool::Stored::Frames || meta.len() == digest.size_bytes;
        if right_size && read_only && recorded.is_none_or(|t| t == mtime_nanos(&meta)) {
            return true;
        }
        let intact = right_size
            && fs::File::open(&path)
                .ok()
                .and_then(|mut f| {
                    let mut h = hashing::WriterHasher::new(std::io::sink());
                    zstd_blob::decode_into(&mut f, digest.size_bytes, stored, &mut h).ok()?;
                    Some(h.finish().0 == digest)
                })
                .unwrap_or(false);
        if intact {
            let _ = fs::set_permissions(&path, fs::Permissions::from_mode(pool::POOL_FILE_MODE));
            if let Ok(meta) = fs::metadata(&path) {
                let _ = self
                    .inner
                    .db
                    .pool_added(digest, mtime_nanos(&meta), false, now_millis());
            }
            tracing::info!(%digest, "pool file was made writable but is intact; read-only again");
            return true;
        }
        tracing::warn!(
            %digest,
            path = %path.display(),
            "a stored blob was modified in place (through a hardlinked output?); evicting it"
        );
        if self.inner.pool.remove(&digest).unwrap_or(false) {
            let _ = self.inner.db.pool_removed(&[digest]);
        }
        false
    }

    /// Stores the file at `path`, streaming it (a large file is never held in memory; a
    /// pool-sized one is hashed and copied in one pass).
    ///
    /// `immutable` is the caller's promise that the file will never be modified again (e.g. a
    /// sandbox output about to be deleted): a pool-sized file is then hardlinked into the pool
    /// after hashing instead of copied, and made read-only.
    pub fn store_file(&self, path: &Path, immutable: bool) -> Result<Digest, StoreError> {
        let io_err = |what: &str, e| StoreError::io(format!("{what} {}", path.display()), e);
        let mut file = fs::File::open(path).map_err(|e| io_err("opening", e))?;
        let size = file.metadata().map_err(|e| io_err("inspecting", e))?.len();
        if self.is_small(size) {
            let mut buf = Vec::with_capacity(size as usize);
            file.read_to_end(&mut buf)
                .map_err(|e| io_err("reading", e))?;
            return self.store_bytes(&buf);
        }
        let (digest, new) = if immutable {
            drop(file);
            self.inner.pool.adopt_immutable(path)?
        } else {
            self.inner.pool.write_from(&mut file, None)?
        };
        self.note_pool_added(digest, new)?;
        Ok(digest)
    }

    /// A destination a download can stream into; see [`LocalDestination`]. Waits while another
    /// writer of the same pool blob is in progress.
    pub async fn begin_write(&self, expected: Digest) -> Result<LocalDestination, StoreError> {
        LocalDestination::new(self.clone(), expected).await
    }

    /// Streams `src` into the store, verifying it against `expected`; nothing is committed on a
    /// mismatch.
    pub fn store_verified(&self, expected: Digest, src: &mut dyn Read) -> Result<(), StoreError> {
        if self.is_small(expected.size_bytes) {
            let mut buf = Vec::new();
            hashing::copy_verified(src, &mut buf, expected)?;
            self.put_small(expected, &buf)
        } else {
            // Leased while it becomes visible: see LocalDestination::commit.
            let _lease = self.lease([expected]);
            let (_, new) = self.inner.pool.write_from(src, Some(expected))?;
            self.note_pool_added(expected, new)
        }
    }

    /// Which of `digests` the store does not hold: small ones checked in one database read
    /// transaction, pool ones by file. The empty blob is always held.
    pub fn missing(&self, digests: impl IntoIterator<Item = Digest>) -> Vec<Digest> {
        let (small, large): (Vec<Digest>, Vec<Digest>) = digests
            .into_iter()
            .filter(|d| *d != EMPTY_DIGEST)
            .partition(|d| self.is_small(d.size_bytes));
        // A database error reads as "missing": the caller then fetches or rebuilds the blob.
        let small = self.not_waiting(small);
        let mut out = self.inner.db.missing(&small).unwrap_or(small);
        out.extend(large.into_iter().filter(|d| !self.pool_file_intact(*d)));
        out
    }

    /// True when the store holds `digest`.
    pub fn contains(&self, digest: Digest) -> bool {
        if digest == EMPTY_DIGEST {
            return true;
        }
        if self.is_small(digest.size_bytes) {
            self.waiting(digest).is_some() || self.inner.db.contains(digest).unwrap_or(false)
        } else {
            self.pool_file_intact(digest)
        }
    }

    /// The blob's bytes, or `None` when absent. A pool blob is read whole: prefer
    /// [`load_file`](LocalStore::load_file) for those.
    pub fn load_bytes(&self, digest: Digest) -> Result<Option<Bytes>, StoreError> {
        if digest == EMPTY_DIGEST {
            return Ok(Some(Bytes::new()));
        }
        let found = if self.is_small(digest.size_bytes) {
            match self.waiting(digest) {
                Some(b) => Some(b),
                None => self.inner.db.get(digest)?,
            }
        } else if let Some((path, stored, _)) = self.inner.pool.locate(&digest) {
            match fs::File::open(&path) {
                Ok(mut f) => {
                    let mut out = Vec::with_capacity(
                        usize::try_from(digest.size_bytes.min(1 << 30)).unwrap_or(0),
                    );
                    zstd_blob::decode_into(&mut f, digest.size_bytes, stored, &mut out)
                        .map_err(|e| blob_read_error(&path, e))?;
                    Some(Bytes::from(out))
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
                Err(e) => return Err(StoreError::io(format!("reading {}", path.display()), e)),
            }
        } else {
            None
        };
        if found.is_some() {
            self.touch(digest);
        }
        Ok(found)
    }

    /// The path of a pool blob (read-only; hardlink or open it, never write it), or `None` when
    /// `digest` is not a pool blob in this store.
    pub fn load_file(&self, digest: Digest) -> Result<Option<PathBuf>, StoreError> {
        if self.is_small(digest.size_bytes) || self.inner.pool.compressed() {
            return Ok(None);
        }
        if self.pool_file_intact(digest) {
            self.touch(digest);
            Ok(Some(self.inner.pool.path_as(&digest, pool::Stored::Plain)))
        } else {
            Ok(None)
        }
    }

    /// Removes blobs (an administrator's or a test's "this blob is lost"); absent ones are fine.
    /// Returns how many were removed.
    pub fn remove(&self, digests: &[Digest]) -> Result<u64, StoreError> {
        let (small, large): (Vec<Digest>, Vec<Digest>) =
            digests.iter().partition(|d| self.is_small(d.size_bytes));
        // Those waiting for their commit are dropped first; the commit lock held until the
        // database is done keeps a commit from writing them back.
        let _no_commit = self.inner.write_behind.as_ref().map(|wb| wb.forget(&small));
        // One read transaction says which small ones are there.
        let absent: std::collections::HashSet<Digest> =
            self.inner.db.missing(&small)?.into_iter().collect();
        let present: Vec<Digest> = small.into_iter().filter(|d| !absent.contains(d)).collect();
        let hashes: Vec<Fingerprint> = present.iter().map(|d| d.hash).collect();
        self.inner.db.remove(&hashes, &[])?;
        self.inner.db.subtract_counters(Counters {
            small_blobs: present.len() as u64,
            small_bytes: present.iter().map(|d| d.size_bytes).sum(),
            ..Counters::default()
        })?;
        let mut removed_large = Vec::new();
        for d in large {
            if self.inner.pool.remove(&d)? {
                removed_large.push(d);
            }
        }
        // Uncounts them too.
        self.inner.db.pool_removed(&removed_large)?;
        Ok((present.len() + removed_large.len()) as u64)
    }

    /// Records a small value under `key` (e.g. an encoded ActionResult under its action digest):
    /// a named record beside the content-addressed blobs, replaced by a later `put_ref` of the
    /// same key. Records are not counted as blobs; they live as long as the blobs of their time:
    /// a GC that evicts blobs also drops every record not written or read since the newest blob
    /// it evicted (so a record never outlives, by much, the outputs it names).
    pub fn put_ref(&self, key: Digest, value: &[u8]) -> Result<(), StoreError> {
        self.inner.db.put_ref(&ref_key(key), value, now_millis())
    }

    /// The value recorded under `key`, if any (and a use of it, for GC).
    pub fn get_ref(&self, key: Digest) -> Result<Option<Bytes>, StoreError> {
        let k = ref_key(key);
        let found = self.inner.db.get_ref(&k)?;
        if found.is_some() {
            self.note_uses(|_, refs, now| {
                refs.insert(k, now);
            });
        }
        Ok(found)
    }

    /// Forgets the value recorded under `key` (absent is fine).
    pub fn remove_ref(&self, key: Digest) -> Result<(), StoreError> {
        self.inner.db.remove_ref(&ref_key(key))
    }

    /// Writes (or replaces) the journal row of `digest`: a row the store's owner keeps about
    /// one blob (the server's S3 tier records an upload's progress there). While a blob has a
    /// row, GC never evicts it; the row may be written before the blob arrives.
    pub fn journal_put(&self, digest: Digest, value: &[u8]) -> Result<(), StoreError> {
        self.inner.db.journal_put(&ref_key(digest), value)
    }

    /// The journal row of `digest`, if any.
    pub fn journal_get(&self, digest: Digest) -> Result<Option<Bytes>, StoreError> {
        self.inner.db.journal_get(&ref_key(digest))
    }

    /// Deletes the journal row of `digest` (absent is fine); the blob becomes evictable.
    pub fn journal_remove(&self, digest: Digest) -> Result<(), StoreError> {
        self.inner.db.journal_remove(&ref_key(digest))
    }

    /// How many journal rows there are (one read transaction, no copies).
    pub fn journal_len(&self) -> Result<u64, StoreError> {
        self.inner.db.journal_len()
    }

    /// Every journal row, by blob.
    pub fn journal_rows(&self) -> Result<Vec<(Digest, Bytes)>, StoreError> {
        Ok(self
            .inner
            .db
            .journal_rows()?
            .into_iter()
            .filter_map(|(k, v)| Some((digest_of_key(&k)?, v)))
            .collect())
    }

    /// How many named records the store holds.
    pub fn ref_count(&self) -> Result<u64, StoreError> {
        self.inner.db.ref_count()
    }

    /// Records a use of each of `digests` the store holds (for LRU), without reading them: a
    /// server calls it for blobs a client was told exist (FindMissingBlobs, an action result's
    /// outputs), which the client may fetch later, or never.
    pub fn touch_all(&self, digests: impl IntoIterator<Item = Digest>) {
        self.note_uses(|blobs, _, now| {
            for d in digests {
                if d != EMPTY_DIGEST {
                    blobs.insert(d.hash, now);
                }
            }
        });
    }

    /// Opens a blob for reading ranges of it, or `None` when absent: a small blob is loaded
    /// once; a pool file is opened once and, compressed, its seek table read once, so a reader
    /// streaming the blob in pieces pays for neither again.
    pub fn open_blob(&self, digest: Digest) -> Result<Option<BlobReader>, StoreError> {
        if digest == EMPTY_DIGEST || self.is_small(digest.size_bytes) {
            return Ok(self.load_bytes(digest)?.map(|b| BlobReader {
                digest,
                source: BlobSource::Memory(b),
            }));
        }
        let Some((path, stored, _)) = self.inner.pool.locate(&digest) else {
            return Ok(None);
        };
        let mut file = match fs::File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(StoreError::io(format!("opening {}", path.display()), e)),
        };
        self.touch(digest);
        // The file must be what its name says: a plain one exactly the blob's length, a framed
        // one a seek table of the blob's size (each frame is checked as it is decoded).
        let layout = zstd_blob::Layout::open(&mut file, digest.size_bytes, stored)
            .map_err(|e| blob_read_error(&path, e))?;
        Ok(Some(BlobReader {
            digest,
            source: BlobSource::File { file, layout, path },
        }))
    }

    /// The stored blob whose SHA-256 is `hash`, whatever its size (for a checksum that names
    /// content without a size, such as a Remote Asset `checksum.sri`).
    pub fn find_by_hash(&self, hash: Fingerprint) -> Option<Digest> {
        if hash == hashing::EMPTY_FINGERPRINT {
            return Some(EMPTY_DIGEST);
        }
        let waiting = self
            .inner
            .write_behind
            .as_ref()
            .and_then(|wb| wb.size_of_hash(&hash));
        if let Some(size) = waiting.or_else(|| self.inner.db.size_of_hash(&hash).ok().flatten()) {
            let d = Digest::new(hash, size);
            if self.contains(d) {
                return Some(d);
            }
        }
        self.inner
            .pool
            .find_by_hash(&hash)
            .filter(|d| self.contains(*d))
    }

    /// Bytes `offset .. offset + len` of a blob (clipped to its size), or `None` when absent.
    /// To read a blob in pieces, [`open_blob`](Self::open_blob) once instead.
    pub fn read_range(
        &self,
        digest: Digest,
        offset: u64,
        len: u64,
    ) -> Result<Option<Bytes>, StoreError> {
        match self.open_blob(digest)? {
            Some(mut r) => r.read_range(offset, len).map(Some),
            None => Ok(None),
        }
    }

    /// The path of a blob stored zstd-compressed at rest (a valid `.zst` stream of it), for
    /// serving a compressed read without recompressing; `None` for small or plain blobs.
    pub fn compressed_file(&self, digest: Digest) -> Option<PathBuf> {
        if !self.inner.pool.compressed() || self.is_small(digest.size_bytes) {
            return None;
        }
        // A blob that did not compress is stored plain: not a zstd stream. A framed file whose
        // table does not describe the blob is not handed out either (`open_blob` then reports
        // it as the damaged blob it is).
        match self.inner.pool.locate(&digest)? {
            (path, pool::Stored::Frames, _) => {
                let mut f = fs::File::open(&path).ok()?;
                zstd_blob::Table::read(&mut f, digest.size_bytes).ok()?;
                self.touch(digest);
                Some(path)
            }
            (_, pool::Stored::Plain, _) => None,
        }
    }

    /// Blobs and bytes GC has evicted since this process opened the store.
    pub fn evictions(&self) -> (u64, u64) {
        (
            self.inner.evicted_blobs.load(Ordering::Relaxed),
            self.inner.evicted_bytes.load(Ordering::Relaxed),
        )
    }

    /// How much the store holds (the persistent counters: one read transaction, shared by every
    /// process using the store).
    pub fn usage(&self) -> StoreUsage {
        let c = self.inner.db.counters().ok().flatten().unwrap_or_default();
        StoreUsage {
            small_blobs: c.small_blobs,
            small_bytes: c.small_bytes,
            large_blobs: c.large_blobs,
            large_bytes: c.large_bytes,
        }
    }

    /// Protects `digests` from GC until the returned lease is dropped: this process's GC and
    /// every other process's that has this store open (the lease is recorded under the store's
    /// `leases/` directory before this returns). A blob evicted before the lease was taken is
    /// not brought back: lease first, then check that what you need is there (or use
    /// [`lease_tree`](LocalStore::lease_tree), which does both).
    pub fn lease(&self, digests: impl IntoIterator<Item = Digest>) -> Lease {
        let digests: Vec<Digest> = digests.into_iter().collect();
        self.inner.leases.add(&digests);
        Lease {
            store: self.clone(),
            digests,
        }
    }

    /// Leases every blob of the trees under `roots` (their Directory messages and files) and
    /// `blobs`, then checks that all of them are stored. `Some(lease)` when they are: from then
    /// on no GC, in this process or another, removes any of them. `None` when something is
    /// missing (never stored, or evicted before the lease): fetch or re-store it and ask again.
    ///
    /// ```
    /// # let dir = tempfile::tempdir().unwrap();
    /// let store = store::LocalStore::open(store::LocalStoreOptions::new(dir.path())).unwrap();
    /// let out = store.store_bytes(b"stdout").unwrap();
    /// let held = store.lease_tree(&[], &[out]).unwrap().expect("stored");
    /// assert_eq!(store.gc(0).unwrap().leased_skipped, 1);
    /// assert!(store.contains(out));
    /// drop(held);
    /// ```
    pub fn lease_tree(
        &self,
        roots: &[Digest],
        blobs: &[Digest],
    ) -> Result<Option<Lease>, StoreError> {
        let mut lease = self.lease(roots.iter().chain(blobs).copied());
        let mut files = Vec::new();
        for root in roots {
            match self.tree_digests(*root)? {
                Some(digests) => files.extend(digests),
                None => return Ok(None),
            }
        }
        let mut more = self.lease(files);
        // Checked after the lease: anything still here now stays.
        let all = more.digests.iter().chain(blobs);
        if !self.missing(all.copied()).is_empty() {
            return Ok(None);
        }
        lease.digests.append(&mut more.digests);
        Ok(Some(lease))
    }

    /// Writes the access times gathered since the last flush in one transaction, and syncs the
    /// database to disk.
    pub fn flush_access_times(&self) -> Result<(), StoreError> {
        self.write_access_times()?;
        self.inner.db.sync()
    }

    /// Writes the gathered access times in one transaction (no sync).
    fn write_access_times(&self) -> Result<(), StoreError> {
        let pending: Vec<(Fingerprint, u64)> = {
            let mut recent = self
                .inner
                .recent_access
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            recent.drain().collect()
        };
        let refs: Vec<([u8; 40], u64)> = {
            let mut recent = self
                .inner
                .recent_ref_access
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            recent.drain().collect()
        };
        self.inner.db.set_atimes(&pending)?;
        self.inner.db.set_ref_atimes(&refs)
    }

    /// Evicts least-recently-used blobs until the store holds at most `target_bytes`. Leased
    /// blobs are kept. Safe to interrupt: each small-blob batch is one transaction, and a pool
    /// blob is removed before its access record, so a stale record is the worst case (dropped by
    /// the next GC).
    pub fn gc(&self, target_bytes: u64) -> Result<GcReport, StoreError> {
        let _one = self.inner.gc_lock.lock().unwrap_or_else(|p| p.into_inner());
        // Blobs waiting for their commit are counted and listed like the others.
        if let Err(e) = self.flush_writes() {
            tracing::warn!(error = %e, "GC: blobs waiting for their commit stay in memory");
        }
        let generation = self.inner.generation.load(Ordering::Acquire);
        self.flush_access_times()?;
        let atimes: HashMap<Fingerprint, u64> = self.inner.db.atimes()?.into_iter().collect();
        // (atime, digest, is_small)
        let mut entries: Vec<(u64, Digest, bool)> = Vec::new();
        for e in self.inner.db.list()? {
            entries.push((e.atime, e.digest, true));
        }
        // A listing only: temp files of writes in progress (here or in another process) stay.
        for d in self.inner.pool.list()? {
            let atime = match atimes.get(&d.hash) {
                Some(t) => *t,
                None => self
                    .inner
                    .pool
                    .locate(&d)
                    .and_then(|(_, _, meta)| meta.modified().ok())
                    .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
                    .map_or(0, |t| t.as_millis() as u64),
            };
            entries.push((atime, d, false));
        }
        // Access-time rows for blobs that no longer exist (an interrupted GC) are dropped.
        let live: std::collections::HashSet<Fingerprint> =
            entries.iter().map(|(_, d, _)| d.hash).collect();
        let stale: Vec<Fingerprint> = atimes
            .keys()
            .filter(|h| !live.contains(h))
            .copied()
            .collect();
        entries.sort_by_key(|(t, d, _)| (*t, *d));
        let listed = entries.clone();
        let mut total: u64 = entries.iter().map(|(_, d, _)| d.size_bytes).sum();
        // A blob with a journal row (e.g. not yet uploaded to a slow tier) is kept like a leased
        // one.
        let journal: std::collections::HashSet<Digest> =
            self.journal_rows()?.into_iter().map(|(d, _)| d).collect();
        let mut report = GcReport::default();
        let mut small_victims = Vec::new();
        let mut removed_large = Vec::new();
        // The newest access time among the victims: records older than it go too.
        let mut cutoff: Option<u64> = None;
        let mut candidates = entries.into_iter().peekable();
        // In batches, each decided and deleted under the exclusive lease lock against the
        // leases recorded by then (this process's and every live holder's): a process that
        // leases a blob waits for the batch, and then finds it gone or kept, never half-way.
        while total > target_bytes && candidates.peek().is_some() {
            let gate = self.inner.leases.exclusive()?;
            let leased = gate.leased();
            let mut small = Vec::new();
            let mut large = Vec::new();
            while total > target_bytes && small.len() + large.len() < GC_BATCH {
                let Some((atime, d, is_small)) = candidates.next() else {
                    break;
                };
                if leased.contains(&d) || journal.contains(&d) {
                    report.leased_skipped += 1;
                    continue;
                }
                if is_small {
                    small.push(d);
                } else {
                    large.push(d);
                }
                total -= d.size_bytes;
                cutoff = Some(cutoff.map_or(atime, |c| c.max(atime)));
            }
            // Pool files first (each unlink is atomic), then one transaction for the records.
            let mut large_gone = Vec::new();
            for d in &large {
                if self.inner.pool.remove(d)? {
                    large_gone.push(*d);
                }
            }
            let small_hashes: Vec<Fingerprint> = small.iter().map(|d| d.hash).collect();
            let atime_only: Vec<Fingerprint> = large_gone.iter().map(|d| d.hash).collect();
            self.inner.db.remove(&small_hashes, &atime_only)?;
            drop(gate);
            let gone = small.len() + large_gone.len();
            let bytes: u64 = small.iter().chain(&large_gone).map(|d| d.size_bytes).sum();
            self.inner
                .evicted_blobs
                .fetch_add(gone as u64, Ordering::Relaxed);
            self.inner.evicted_bytes.fetch_add(bytes, Ordering::Relaxed);
            small_victims.extend(small);
            removed_large.extend(large_gone);
        }
        self.inner.db.remove(&[], &stale)?;
        if let Some(cutoff) = cutoff {
            report.removed_refs = self.inner.db.evict_refs(cutoff)?;
        }
        self.inner.db.sync()?;

        // Reset the counters to what the listing found, minus what was removed: this also
        // corrects any drift (e.g. a pool file deleted by hand). If a write landed meanwhile the
        // listing may have missed it: then only subtract what this GC removed.
        let small_removed: u64 = small_victims.iter().map(|d| d.size_bytes).sum();
        let large_removed: u64 = removed_large.iter().map(|d| d.size_bytes).sum();
        // Decided and written under the accounting lock, so no growth transaction runs between
        // the check and the write (it would be overwritten by a listing that missed it).
        let _books = self.accounting();
        if self.inner.generation.load(Ordering::Acquire) != generation {
            self.inner.db.subtract_counters(Counters {
                small_blobs: small_victims.len() as u64,
                small_bytes: small_removed,
                large_blobs: removed_large.len() as u64,
                large_bytes: large_removed,
            })?;
            report.removed_blobs = (small_victims.len() + removed_large.len()) as u64;
            report.removed_bytes = small_removed + large_removed;
            report.remaining_bytes = self.usage().total_bytes();
            tracing::info!(?report, target_bytes, "local store GC");
            return Ok(report);
        }
        let mut c = Counters::default();
        for (_, d, is_small) in &listed {
            if *is_small {
                c.small_blobs += 1;
                c.small_bytes += d.size_bytes;
            } else {
                c.large_blobs += 1;
                c.large_bytes += d.size_bytes;
            }
        }
        c.small_blobs -= small_victims.len() as u64;
        c.small_bytes -= small_removed;
        c.large_blobs -= removed_large.len() as u64;
        c.large_bytes -= large_removed;
        self.inner.db.set_counters(c)?;
        report.removed_blobs = (small_victims.len() + removed_large.len()) as u64;
        report.removed_bytes = small_victims
            .iter()
            .chain(removed_large.iter())
            .map(|d| d.size_bytes)
            .sum();
        report.remaining_bytes = self.usage().total_bytes();
        tracing::info!(?report, target_bytes, "local store GC");
        Ok(report)
    }
}

impl Drop for Inner {
    /// Records the gathered access times, marks the store clean if this is the last process
    /// using it, and syncs the database to disk only when this process stored something and no
    /// process synced it in the last [`EXIT_SYNC_INTERVAL_MS`]: an fsync per process was most of
    /// a `recache run` hit's fixed cost, and many short processes in a row now share one. What a
    /// power cut can take is bounded the same way (and is only cache: re-fetched or re-built);
    /// losing access times or the clean mark is harmless (an unmarked store is repaired at the
    /// next open).
    fn drop(&mut self) {
        // Blobs of hits still waiting for their commit go in first (the thread is joined).
        if let Some(wb) = &self.write_behind {
            wb.close();
        }
        let pending: Vec<(Fingerprint, u64)> = self
            .recent_access
            .get_mut()
            .map(|m| m.drain().collect())
            .unwrap_or_default();
        let refs: Vec<([u8; 40], u64)> = self
            .recent_ref_access
            .get_mut()
            .map(|m| m.drain().collect())
            .unwrap_or_default();
        if let Err(e) = self
            .db
            .set_atimes(&pending)
            .and_then(|()| self.db.set_ref_atimes(&refs))
        {
            tracing::warn!(error = %e, "could not record access times when closing the store");
            return; // not cleanly closed: the next opener repairs
        }
        // The last one out (no one else holds the lock) marks the store clean.
        if self.open_lock.try_lock().is_ok()
            && let Err(e) = self.db.set_flag(DIRTY_KEY, false)
        {
            tracing::warn!(error = %e, "could not mark the store closed");
        }
        if self.generation.load(Ordering::Acquire) > 0
            && !self.db.synced_within(EXIT_SYNC_INTERVAL_MS)
            && let Err(e) = self.db.sync()
        {
            tracing::warn!(error = %e, "could not sync the store when closing it");
        }
    }
}

/// Keeps digests safe from [`LocalStore::gc`] while alive.
#[derive(Debug)]
pub struct Lease {
    store: LocalStore,
    digests: Vec<Digest>,
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.store.inner.leases.release(&self.digests);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// Blobs of `n` × `size` bytes, distinct per `seed`.
    fn blobs(seed: u8, n: usize, size: usize) -> Vec<(Digest, Vec<u8>)> {
        (0..n)
            .map(|i| {
                let mut b = vec![seed; size];
                b[..8].copy_from_slice(&(i as u64).to_le_bytes());
                (Digest::of_bytes(&b), b)
            })
            .collect()
    }

    fn items(blobs: &[(Digest, Vec<u8>)]) -> Vec<(Digest, &[u8])> {
        blobs.iter().map(|(d, b)| (*d, &b[..])).collect()
    }

    #[test]
    fn a_hits_blobs_are_served_before_their_commit_and_committed_at_close() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::open(LocalStoreOptions::new(dir.path())).unwrap();
        let wb = store.inner.write_behind.as_ref().unwrap();
        let kept = blobs(1, 10, 4096);
        let removed = blobs(2, 1, 4096);
        {
            // Holding the commit lock keeps the committer from writing anything yet.
            let _hold = wb.forget(&[]);
            store.put_small_batch(&items(&kept)).unwrap();
            store.put_small_batch(&items(&removed)).unwrap();
            for (d, b) in kept.iter().chain(&removed) {
                assert!(!store.inner.db.contains(*d).unwrap(), "not committed yet");
                assert!(store.contains(*d));
                assert_eq!(store.load_bytes(*d).unwrap().unwrap(), &b[..]);
                assert_eq!(store.find_by_hash(d.hash), Some(*d));
            }
            assert!(store.missing(kept.iter().map(|(d, _)| *d)).is_empty());
        }
        // Removed while (perhaps) still waiting: no commit brings it back.
        assert_eq!(store.remove(&[removed[0].0]).unwrap(), 0);
        store.flush_writes().unwrap();
        assert!(!store.contains(removed[0].0));
        assert!(!store.inner.db.contains(removed[0].0).unwrap());
        drop(store);
        let store = LocalStore::open(LocalStoreOptions::new(dir.path())).unwrap();
        for (d, b) in &kept {
            assert_eq!(
                store.load_bytes(*d).unwrap().unwrap(),
                &b[..],
                "committed at close"
            );
        }
        assert_eq!(store.usage().small_blobs, kept.len() as u64);
        assert_eq!(store.usage().small_bytes, 10 * 4096);
    }

    #[test]
    fn a_failed_commit_keeps_the_blobs_and_later_writes_see_the_error() {
        let dir = tempfile::tempdir().unwrap();
        let mut options = LocalStoreOptions::new(dir.path());
        // Room for the tables and little else: the batch below cannot be committed.
        options.db_map_size = 512 << 10;
        let store = LocalStore::open(options).unwrap();
        let big = blobs(3, 12, 100 << 10);
        store.put_small_batch(&items(&big)).unwrap();
        let err = store.flush_writes().unwrap_err();
        assert_eq!(*err.kind(), crate::ErrorKind::StorageFull, "{err}");
        // Still served to this process.
        for (d, b) in &big {
            assert_eq!(store.load_bytes(*d).unwrap().unwrap(), &b[..]);
        }
        // A later batch is committed by its caller, which sees the error.
        let more = blobs(4, 12, 100 << 10);
        let err = store.put_small_batch(&items(&more)).unwrap_err();
        assert_eq!(*err.kind(), crate::ErrorKind::StorageFull, "{err}");
        assert!(!store.contains(more[0].0));
    }

    #[test]
    fn access_times_are_flushed_before_the_map_grows_large() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::open(LocalStoreOptions::new(dir.path())).unwrap();
        let digests: Vec<Digest> = (0..ACCESS_FLUSH_ENTRIES + 100)
            .map(|i| store.store_bytes(format!("blob {i}").as_bytes()).unwrap())
            .collect();
        for d in &digests {
            store.load_bytes(*d).unwrap();
        }
        let pending = store.inner.recent_access.lock().unwrap().len();
        assert!(
            pending < ACCESS_FLUSH_ENTRIES,
            "{pending} access records held in memory"
        );
        // What was flushed is on disk: GC sees recorded times, not zero.
        let recorded = store.inner.db.atimes().unwrap().len();
        assert!(recorded >= ACCESS_FLUSH_ENTRIES, "{recorded}");
    }
}
