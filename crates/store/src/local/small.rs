//! Small blobs in LMDB (through heed): one `blobs` table keyed by the 32-byte fingerprint, an
//! `atime` table (fingerprint → last access, unix milliseconds) used by garbage collection, a
//! `pool` table (fingerprint → modification time of the committed pool file, for the integrity
//! check before a pool file is linked again), and a `meta` table holding the usage counters.
//!
//! The counters are updated in the same transaction as the change they count, so opening a store
//! reads four numbers instead of walking every row and every pool file; GC re-derives them from
//! a full listing (which also corrects drift, e.g. pool files deleted by hand).
//!
//! LMDB was chosen over redb and file-per-blob by `cargo bench -p benches --bench small_blob_db`
//! (figures in ARCHITECTURE.md): faster single-blob commits, reads and concurrent writers, and it
//! lets several processes share one store.
//!
//! Commits use `NO_SYNC`: a crashed *process* loses nothing (the pages are in the OS cache); a
//! crashed *machine* may lose the most recent commits. For a cache that is the right trade: every
//! lost blob is re-fetched or re-built. `sync()` forces the data to disk (GC and shutdown call it).

use std::path::Path;

use bytes::Bytes;
use hashing::{Digest, FINGERPRINT_SIZE, Fingerprint};
use heed::types::{Bytes as Raw, U64};
use heed::{Database, Env, EnvFlags, EnvOpenOptions, WithoutTls};

use crate::error::{ErrorKind, StoreError};

type Atime = U64<heed::byteorder::LittleEndian>;

fn db_err(what: &str, e: heed::Error) -> StoreError {
    let kind = match &e {
        heed::Error::Io(io) => crate::error::io_kind(io),
        heed::Error::Mdb(heed::MdbError::MapFull) => ErrorKind::StorageFull,
        _ => ErrorKind::Io,
    };
    StoreError::new(kind, format!("small-blob database: {what}: {e}"))
}

#[derive(Debug)]
pub(crate) struct SmallDb {
    env: Env<WithoutTls>,
    blobs: Database<Raw, Raw>,
    atime: Database<Raw, Atime>,
    pool: Database<Raw, Atime>,
    meta: Database<Raw, Raw>,
    refs: Database<Raw, Raw>,
    /// Ref key → last write or read (unix milliseconds), for evicting records with the blobs.
    ref_atime: Database<Raw, Atime>,
    /// Blob key (hash + size) → a row its owner keeps about the blob (the server's S3 upload
    /// journal). A blob with a row is never evicted.
    journal: Database<Raw, Raw>,
    /// Values are `[tag][logical size u64 LE][payload]`, tag 1 = zstd (see `encode`).
    compressed: bool,
}

/// `meta` key marking a database whose values are compressed (set at creation, checked at
/// every open: the two formats cannot be mixed).
const FORMAT_KEY: &[u8] = b"format";
const FORMAT_ZSTD: &[u8] = b"zstd-values-v1";
/// `meta` key: when the database was last forced to disk (unix milliseconds, u64 LE).
const LAST_SYNC_KEY: &[u8] = b"last-sync";
/// Tag byte + logical size.
const VALUE_HEADER: usize = 9;
/// zstd level for small values (small inputs compress better a little harder, still fast).
const VALUE_LEVEL: i32 = 3;

/// Key of the usage counters in `meta`: four little-endian u64 (small blobs, small bytes, large
/// blobs, large bytes).
const USAGE_KEY: &[u8] = b"usage";

/// The persistent usage counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Counters {
    pub small_blobs: u64,
    pub small_bytes: u64,
    pub large_blobs: u64,
    pub large_bytes: u64,
}

impl Counters {
    fn encode(&self) -> [u8; 32] {
        let mut out = [0u8; 32];
        for (i, v) in [
            self.small_blobs,
            self.small_bytes,
            self.large_blobs,
            self.large_bytes,
        ]
        .iter()
        .enumerate()
        {
            out[i * 8..i * 8 + 8].copy_from_slice(&v.to_le_bytes());
        }
        out
    }

    fn decode(b: &[u8]) -> Option<Counters> {
        let n = |i: usize| -> Option<u64> {
            Some(u64::from_le_bytes(
                b.get(i * 8..i * 8 + 8)?.try_into().ok()?,
            ))
        };
        Some(Counters {
            small_blobs: n(0)?,
            small_bytes: n(1)?,
            large_blobs: n(2)?,
            large_bytes: n(3)?,
        })
    }

    pub(crate) fn total_bytes(&self) -> u64 {
        self.small_bytes + self.large_bytes
    }
}

/// A small blob as listed for accounting and GC.
#[derive(Debug, Clone, Copy)]
pub(crate) struct SmallEntry {
    pub digest: Digest,
    pub atime: u64,
}

impl SmallDb {
    /// Opens (creating if needed) the database in `dir`; `map_size` is the maximum size of the
    /// database (address space, not disk: LMDB grows the file as needed).
    pub(crate) fn open(
        dir: &Path,
        map_size: usize,
        compressed: bool,
    ) -> Result<SmallDb, StoreError> {
        std::fs::create_dir_all(dir)
            .map_err(|e| StoreError::io(format!("creating {}", dir.display()), e))?;
        preallocate_lock_file(dir)?;
        let mut opts = EnvOpenOptions::new().read_txn_without_tls();
        opts.map_size(map_size).max_dbs(8).max_readers(1024);
        // SAFETY: heed's open is unsafe because LMDB must not be opened twice by one process
        // with different options, and the file must not be modified other than through LMDB.
        // heed itself de-duplicates environments opened twice in one process, every LocalStore
        // uses the same options, and nothing else writes inside the store's `db/` directory.
        // NO_SYNC is sound for LMDB's integrity after a process crash (see the module docs).
        #[allow(unsafe_code)]
        let env = unsafe {
            opts.flags(EnvFlags::NO_SYNC);
            opts.open(dir)
        }
        .map_err(|e| db_err(&format!("opening {}", dir.display()), e))?;
        let mut w = env.write_txn().map_err(|e| db_err("begin", e))?;
        let blobs = env
            .create_database(&mut w, Some("blobs"))
            .map_err(|e| db_err("creating table blobs", e))?;
        let atime = env
            .create_database(&mut w, Some("atime"))
            .map_err(|e| db_err("creating table atime", e))?;
        let pool = env
            .create_database(&mut w, Some("pool"))
            .map_err(|e| db_err("creating table pool", e))?;
        let meta = env
            .create_database(&mut w, Some("meta"))
            .map_err(|e| db_err("creating table meta", e))?;
        let refs = env
            .create_database(&mut w, Some("refs"))
            .map_err(|e| db_err("creating table refs", e))?;
        let ref_atime = env
            .create_database(&mut w, Some("ref_atime"))
            .map_err(|e| db_err("creating table ref_atime", e))?;
        let journal = env
            .create_database(&mut w, Some("journal"))
            .map_err(|e| db_err("creating table journal", e))?;
        let marked = meta
            .get(&w, FORMAT_KEY)
            .map_err(|e| db_err("get format", e))?
            .is_some_and(|f| f == FORMAT_ZSTD);
        let empty = blobs.is_empty(&w).map_err(|e| db_err("count", e))?;
        match (compressed, marked) {
            (true, false) if empty => meta
                .put(&mut w, FORMAT_KEY, FORMAT_ZSTD)
                .map_err(|e| db_err("put format", e))?,
            (true, false) => {
                return Err(StoreError::invalid(format!(
                    "{} holds uncompressed small blobs; open it without compression",
                    dir.display()
                )));
            }
            (false, true) => {
                return Err(StoreError::invalid(format!(
                    "{} was created with compression at rest (a server's store); open it with PoolCompression::Zstd",
                    dir.display()
                )));
            }
            _ => {}
        }
        w.commit().map_err(|e| db_err("commit", e))?;
        Ok(SmallDb {
            env,
            blobs,
            atime,
            pool,
            meta,
            refs,
            ref_atime,
            journal,
            compressed,
        })
    }

    /// The stored form of `data`: itself, or (compressed databases) a header and, when that
    /// saves at least an eighth, a zstd frame.
    fn encode<'a>(&self, data: &'a [u8]) -> std::borrow::Cow<'a, [u8]> {
        if !self.compressed {
            return std::borrow::Cow::Borrowed(data);
        }
        let packed = (data.len() >= 64)
            .then(|| zstd::bulk::compress(data, VALUE_LEVEL).ok())
            .flatten()
            .filter(|z| z.len() < data.len() / 8 * 7);
        let mut out =
            Vec::with_capacity(VALUE_HEADER + packed.as_ref().map_or(data.len(), Vec::len));
        out.push(u8::from(packed.is_some()));
        out.extend_from_slice(&(data.len() as u64).to_le_bytes());
        out.extend_from_slice(packed.as_deref().unwrap_or(data));
        std::borrow::Cow::Owned(out)
    }

    /// The logical size a stored value says it holds.
    fn logical_size(&self, v: &[u8]) -> Option<u64> {
        if !self.compressed {
            return Some(v.len() as u64);
        }
        let size: [u8; 8] = v.get(1..VALUE_HEADER)?.try_into().ok()?;
        Some(u64::from_le_bytes(size))
    }

    /// The blob from its stored form (`None` when it does not decode to `size` bytes).
    fn decode(&self, v: &[u8], size: u64) -> Option<Bytes> {
        if self.logical_size(v)? != size {
            return None;
        }
        if !self.compressed {
            return Some(Bytes::copy_from_slice(v));
        }
        let payload = &v[VALUE_HEADER..];
        let data = match v[0] {
            0 => payload.to_vec(),
            1 => zstd::bulk::decompress(payload, usize::try_from(size).ok()?).ok()?,
            _ => return None,
        };
        (data.len() as u64 == size).then(|| Bytes::from(data))
    }

    fn counters_in(
        &self,
        txn: &heed::RoTxn<'_, WithoutTls>,
    ) -> Result<Option<Counters>, StoreError> {
        Ok(self
            .meta
            .get(txn, USAGE_KEY)
            .map_err(|e| db_err("get usage", e))?
            .and_then(Counters::decode))
    }

    /// Adds to the counters inside `w` (a missing record counts from zero; `open` derives it
    /// first). Returns the new totals.
    fn bump(
        &self,
        w: &mut heed::RwTxn<'_>,
        f: impl FnOnce(&mut Counters),
    ) -> Result<Counters, StoreError> {
        let mut c = self.counters_in(w)?.unwrap_or_default();
        f(&mut c);
        self.meta
            .put(w, USAGE_KEY, &c.encode())
            .map_err(|e| db_err("put usage", e))?;
        Ok(c)
    }

    /// The persistent counters, or `None` for a store written before they existed.
    pub(crate) fn counters(&self) -> Result<Option<Counters>, StoreError> {
        let r = self.env.read_txn().map_err(|e| db_err("begin read", e))?;
        self.counters_in(&r)
    }

    /// Subtracts `removed` from the counters (saturating), in one transaction.
    pub(crate) fn subtract_counters(&self, removed: Counters) -> Result<(), StoreError> {
        let mut w = self.env.write_txn().map_err(|e| db_err("begin", e))?;
        self.bump(&mut w, |c| {
            c.small_blobs = c.small_blobs.saturating_sub(removed.small_blobs);
            c.small_bytes = c.small_bytes.saturating_sub(removed.small_bytes);
            c.large_blobs = c.large_blobs.saturating_sub(removed.large_blobs);
            c.large_bytes = c.large_bytes.saturating_sub(removed.large_bytes);
        })?;
        w.commit().map_err(|e| db_err("commit", e))
    }

    /// Replaces the counters (after a full listing: at first open of an old store, and by GC).
    pub(crate) fn set_counters(&self, c: Counters) -> Result<(), StoreError> {
        let mut w = self.env.write_txn().map_err(|e| db_err("begin", e))?;
        self.meta
            .put(&mut w, USAGE_KEY, &c.encode())
            .map_err(|e| db_err("put usage", e))?;
        w.commit().map_err(|e| db_err("commit", e))
    }

    /// Records a pool blob that was just committed (its file's modification time, for the
    /// integrity check) and counts it if `new`. Returns the new totals.
    pub(crate) fn pool_added(
        &self,
        digest: Digest,
        mtime_nanos: u64,
        new: bool,
        now: u64,
    ) -> Result<Counters, StoreError> {
        let key = digest.hash.as_bytes();
        let mut w = self.env.write_txn().map_err(|e| db_err("begin", e))?;
        self.pool
            .put(&mut w, key, &mtime_nanos)
            .map_err(|e| db_err("put pool", e))?;
        self.atime
            .put(&mut w, key, &now)
            .map_err(|e| db_err("put atime", e))?;
        let c = self.bump(&mut w, |c| {
            if new {
                c.large_blobs += 1;
                c.large_bytes += digest.size_bytes;
            }
        })?;
        w.commit().map_err(|e| db_err("commit", e))?;
        Ok(c)
    }

    /// The modification time recorded when pool blob `digest` was committed.
    pub(crate) fn pool_mtime(&self, digest: Digest) -> Result<Option<u64>, StoreError> {
        let r = self.env.read_txn().map_err(|e| db_err("begin read", e))?;
        self.pool
            .get(&r, digest.hash.as_bytes())
            .map_err(|e| db_err("get pool", e))
    }

    /// Forgets pool blobs that were removed (GC, or evicted as corrupt) and uncounts them.
    pub(crate) fn pool_removed(&self, digests: &[Digest]) -> Result<(), StoreError> {
        if digests.is_empty() {
            return Ok(());
        }
        let mut w = self.env.write_txn().map_err(|e| db_err("begin", e))?;
        for d in digests {
            self.pool
                .delete(&mut w, d.hash.as_bytes())
                .map_err(|e| db_err("delete pool", e))?;
            self.atime
                .delete(&mut w, d.hash.as_bytes())
                .map_err(|e| db_err("delete atime", e))?;
        }
        self.bump(&mut w, |c| {
            c.large_blobs = c.large_blobs.saturating_sub(digests.len() as u64);
            c.large_bytes = c
                .large_bytes
                .saturating_sub(digests.iter().map(|d| d.size_bytes).sum());
        })?;
        w.commit().map_err(|e| db_err("commit", e))
    }

    /// Stores a verified blob. Returns the new totals.
    pub(crate) fn put(
        &self,
        digest: Digest,
        bytes: &[u8],
        now: u64,
    ) -> Result<Counters, StoreError> {
        let key = digest.hash.as_bytes();
        let mut w = self.env.write_txn().map_err(|e| db_err("begin", e))?;
        let existed = self
            .blobs
            .get(&w, key)
            .map_err(|e| db_err("get", e))?
            .is_some_and(|v| self.logical_size(v) == Some(digest.size_bytes));
        if !existed {
            self.blobs
                .put(&mut w, key, &self.encode(bytes))
                .map_err(|e| db_err("put", e))?;
        }
        self.atime
            .put(&mut w, key, &now)
            .map_err(|e| db_err("put atime", e))?;
        let c = self.bump(&mut w, |c| {
            if !existed {
                c.small_blobs += 1;
                c.small_bytes += digest.size_bytes;
            }
        })?;
        w.commit().map_err(|e| db_err("commit", e))?;
        Ok(c)
    }

    /// Stores several verified blobs in one transaction (one commit instead of one per blob:
    /// on a cache hit with many small outputs this is most of the local cost). Returns the new
    /// totals.
    pub(crate) fn put_many(
        &self,
        items: &[(Digest, &[u8])],
        now: u64,
    ) -> Result<Counters, StoreError> {
        let mut w = self.env.write_txn().map_err(|e| db_err("begin", e))?;
        let (mut count, mut bytes) = (0u64, 0u64);
        for (digest, data) in items {
            let key = digest.hash.as_bytes();
            let existed = self
                .blobs
                .get(&w, key)
                .map_err(|e| db_err("get", e))?
                .is_some_and(|v| self.logical_size(v) == Some(digest.size_bytes));
            if !existed {
                self.blobs
                    .put(&mut w, key, &self.encode(data))
                    .map_err(|e| db_err("put", e))?;
                count += 1;
                bytes += digest.size_bytes;
            }
            self.atime
                .put(&mut w, key, &now)
                .map_err(|e| db_err("put atime", e))?;
        }
        let c = self.bump(&mut w, |c| {
            c.small_blobs += count;
            c.small_bytes += bytes;
        })?;
        w.commit().map_err(|e| db_err("commit", e))?;
        Ok(c)
    }

    /// The logical size of the small blob whose SHA-256 is `hash`, if one is stored.
    pub(crate) fn size_of_hash(&self, hash: &Fingerprint) -> Result<Option<u64>, StoreError> {
        let r = self.env.read_txn().map_err(|e| db_err("begin read", e))?;
        Ok(self
            .blobs
            .get(&r, hash.as_bytes())
            .map_err(|e| db_err("get", e))?
            .and_then(|v| self.logical_size(v)))
    }

    /// The blob, copied out of the map. A stored value whose length does not match the digest is
    /// treated as absent.
    pub(crate) fn get(&self, digest: Digest) -> Result<Option<Bytes>, StoreError> {
        let r = self.env.read_txn().map_err(|e| db_err("begin read", e))?;
        let v = self
            .blobs
            .get(&r, digest.hash.as_bytes())
            .map_err(|e| db_err("get", e))?;
        Ok(v.and_then(|v| self.decode(v, digest.size_bytes)))
    }

    pub(crate) fn contains(&self, digest: Digest) -> Result<bool, StoreError> {
        Ok(self.missing(&[digest])?.is_empty())
    }

    /// Which of `digests` are not stored, in one read transaction (a cache hit checks all its
    /// outputs at once).
    pub(crate) fn missing(&self, digests: &[Digest]) -> Result<Vec<Digest>, StoreError> {
        let r = self.env.read_txn().map_err(|e| db_err("begin read", e))?;
        let mut out = Vec::new();
        for d in digests {
            let present = self
                .blobs
                .get(&r, d.hash.as_bytes())
                .map_err(|e| db_err("get", e))?
                .is_some_and(|v| self.logical_size(v) == Some(d.size_bytes));
            if !present {
                out.push(*d);
            }
        }
        Ok(out)
    }

    /// Every small blob with its last recorded access (0 when never recorded).
    pub(crate) fn list(&self) -> Result<Vec<SmallEntry>, StoreError> {
        let r = self.env.read_txn().map_err(|e| db_err("begin read", e))?;
        let mut out = Vec::new();
        for item in self.blobs.iter(&r).map_err(|e| db_err("iterate", e))? {
            let (k, v) = item.map_err(|e| db_err("iterate", e))?;
            let Some(hash) = fingerprint(k) else { continue };
            let atime = self
                .atime
                .get(&r, k)
                .map_err(|e| db_err("get atime", e))?
                .unwrap_or(0);
            let Some(size) = self.logical_size(v) else {
                continue;
            };
            out.push(SmallEntry {
                digest: Digest::new(hash, size),
                atime,
            });
        }
        Ok(out)
    }

    /// Recorded access times, for blobs of any size.
    pub(crate) fn atimes(&self) -> Result<Vec<(Fingerprint, u64)>, StoreError> {
        let r = self.env.read_txn().map_err(|e| db_err("begin read", e))?;
        let mut out = Vec::new();
        for item in self.atime.iter(&r).map_err(|e| db_err("iterate", e))? {
            let (k, t) = item.map_err(|e| db_err("iterate", e))?;
            if let Some(hash) = fingerprint(k) {
                out.push((hash, t));
            }
        }
        Ok(out)
    }

    /// Records many access times in one transaction (never one per read).
    pub(crate) fn set_atimes(&self, times: &[(Fingerprint, u64)]) -> Result<(), StoreError> {
        if times.is_empty() {
            return Ok(());
        }
        let mut w = self.env.write_txn().map_err(|e| db_err("begin", e))?;
        for (hash, t) in times {
            self.atime
                .put(&mut w, hash.as_bytes(), t)
                .map_err(|e| db_err("put atime", e))?;
        }
        w.commit().map_err(|e| db_err("commit", e))
    }

    /// Removes blobs and their access times in one transaction; `atime_only` drops just the
    /// access and pool rows (for pool blobs, whose data lives in files). Counters are left to the
    /// caller (GC re-derives them).
    pub(crate) fn remove(
        &self,
        blobs: &[Fingerprint],
        atime_only: &[Fingerprint],
    ) -> Result<(), StoreError> {
        let mut w = self.env.write_txn().map_err(|e| db_err("begin", e))?;
        for hash in blobs {
            self.blobs
                .delete(&mut w, hash.as_bytes())
                .map_err(|e| db_err("delete", e))?;
        }
        for hash in blobs.iter().chain(atime_only) {
            self.atime
                .delete(&mut w, hash.as_bytes())
                .map_err(|e| db_err("delete atime", e))?;
        }
        for hash in atime_only {
            self.pool
                .delete(&mut w, hash.as_bytes())
                .map_err(|e| db_err("delete pool", e))?;
        }
        w.commit().map_err(|e| db_err("commit", e))
    }

    /// Records `value` under `key` in the `refs` table (replacing any earlier value), used at
    /// `now` (unix milliseconds).
    pub(crate) fn put_ref(&self, key: &[u8], value: &[u8], now: u64) -> Result<(), StoreError> {
        let mut w = self.env.write_txn().map_err(|e| db_err("begin", e))?;
        self.refs
            .put(&mut w, key, value)
            .map_err(|e| db_err("put ref", e))?;
        self.ref_atime
            .put(&mut w, key, &now)
            .map_err(|e| db_err("put ref atime", e))?;
        w.commit().map_err(|e| db_err("commit", e))
    }

    /// The value recorded under `key`, copied out.
    pub(crate) fn get_ref(&self, key: &[u8]) -> Result<Option<Bytes>, StoreError> {
        let r = self.env.read_txn().map_err(|e| db_err("begin read", e))?;
        Ok(self
            .refs
            .get(&r, key)
            .map_err(|e| db_err("get ref", e))?
            .map(Bytes::copy_from_slice))
    }

    /// Forgets `key`.
    pub(crate) fn remove_ref(&self, key: &[u8]) -> Result<(), StoreError> {
        let mut w = self.env.write_txn().map_err(|e| db_err("begin", e))?;
        self.refs
            .delete(&mut w, key)
            .map_err(|e| db_err("delete ref", e))?;
        self.ref_atime
            .delete(&mut w, key)
            .map_err(|e| db_err("delete ref atime", e))?;
        w.commit().map_err(|e| db_err("commit", e))
    }

    /// Records when refs were last read (only those still present).
    pub(crate) fn set_ref_atimes(&self, times: &[([u8; 40], u64)]) -> Result<(), StoreError> {
        if times.is_empty() {
            return Ok(());
        }
        let mut w = self.env.write_txn().map_err(|e| db_err("begin", e))?;
        for (key, t) in times {
            let present = self
                .refs
                .get(&w, key)
                .map_err(|e| db_err("get ref", e))?
                .is_some();
            if present {
                self.ref_atime
                    .put(&mut w, key, t)
                    .map_err(|e| db_err("put ref atime", e))?;
            }
        }
        w.commit().map_err(|e| db_err("commit", e))
    }

    /// Removes every ref not used after `cutoff` (unix milliseconds; a ref with no recorded
    /// time counts as never used) in one transaction. Returns how many went.
    pub(crate) fn evict_refs(&self, cutoff: u64) -> Result<u64, StoreError> {
        let mut w = self.env.write_txn().map_err(|e| db_err("begin", e))?;
        let mut old = Vec::new();
        for item in self.refs.iter(&w).map_err(|e| db_err("list refs", e))? {
            let (key, _) = item.map_err(|e| db_err("list refs", e))?;
            let used = self
                .ref_atime
                .get(&w, key)
                .map_err(|e| db_err("get ref atime", e))?
                .unwrap_or(0);
            if used <= cutoff {
                old.push(key.to_vec());
            }
        }
        for key in &old {
            self.refs
                .delete(&mut w, key)
                .map_err(|e| db_err("delete ref", e))?;
            self.ref_atime
                .delete(&mut w, key)
                .map_err(|e| db_err("delete ref atime", e))?;
        }
        w.commit().map_err(|e| db_err("commit", e))?;
        Ok(old.len() as u64)
    }

    /// How many refs are recorded.
    pub(crate) fn ref_count(&self) -> Result<u64, StoreError> {
        let r = self.env.read_txn().map_err(|e| db_err("begin read", e))?;
        self.refs.len(&r).map_err(|e| db_err("count refs", e))
    }

    /// Writes (or replaces) the journal row `key`.
    pub(crate) fn journal_put(&self, key: &[u8], value: &[u8]) -> Result<(), StoreError> {
        let mut w = self.env.write_txn().map_err(|e| db_err("begin", e))?;
        self.journal
            .put(&mut w, key, value)
            .map_err(|e| db_err("put journal row", e))?;
        w.commit().map_err(|e| db_err("commit", e))
    }

    /// The journal row `key`, copied out.
    pub(crate) fn journal_get(&self, key: &[u8]) -> Result<Option<Bytes>, StoreError> {
        let r = self.env.read_txn().map_err(|e| db_err("begin read", e))?;
        Ok(self
            .journal
            .get(&r, key)
            .map_err(|e| db_err("get journal row", e))?
            .map(Bytes::copy_from_slice))
    }

    /// Deletes the journal row `key` (absent is fine).
    pub(crate) fn journal_remove(&self, key: &[u8]) -> Result<(), StoreError> {
        let mut w = self.env.write_txn().map_err(|e| db_err("begin", e))?;
        self.journal
            .delete(&mut w, key)
            .map_err(|e| db_err("delete journal row", e))?;
        w.commit().map_err(|e| db_err("commit", e))
    }

    /// How many journal rows there are.
    pub(crate) fn journal_len(&self) -> Result<u64, StoreError> {
        let r = self.env.read_txn().map_err(|e| db_err("begin read", e))?;
        self.journal.len(&r).map_err(|e| db_err("count journal", e))
    }

    /// Every journal row.
    pub(crate) fn journal_rows(&self) -> Result<Vec<(Vec<u8>, Bytes)>, StoreError> {
        let r = self.env.read_txn().map_err(|e| db_err("begin read", e))?;
        let mut out = Vec::new();
        for item in self
            .journal
            .iter(&r)
            .map_err(|e| db_err("list journal", e))?
        {
            let (k, v) = item.map_err(|e| db_err("list journal", e))?;
            out.push((k.to_vec(), Bytes::copy_from_slice(v)));
        }
        Ok(out)
    }

    /// Whether the `meta` flag `key` is set.
    pub(crate) fn flag(&self, key: &[u8]) -> Result<bool, StoreError> {
        let r = self.env.read_txn().map_err(|e| db_err("begin read", e))?;
        Ok(self
            .meta
            .get(&r, key)
            .map_err(|e| db_err("get flag", e))?
            .is_some_and(|v| v == [1u8]))
    }

    /// Sets or clears the `meta` flag `key`.
    pub(crate) fn set_flag(&self, key: &[u8], on: bool) -> Result<(), StoreError> {
        let mut w = self.env.write_txn().map_err(|e| db_err("begin", e))?;
        self.meta
            .put(&mut w, key, &[u8::from(on)])
            .map_err(|e| db_err("put flag", e))?;
        w.commit().map_err(|e| db_err("commit", e))
    }

    /// The fingerprints the `pool` table has a row for.
    pub(crate) fn pool_rows(&self) -> Result<Vec<Fingerprint>, StoreError> {
        let r = self.env.read_txn().map_err(|e| db_err("begin read", e))?;
        let mut out = Vec::new();
        for item in self.pool.iter(&r).map_err(|e| db_err("list pool", e))? {
            let (key, _) = item.map_err(|e| db_err("list pool", e))?;
            if let Some(hash) = fingerprint(key) {
                out.push(hash);
            }
        }
        Ok(out)
    }

    /// The repair after a crash, in one transaction: counters from a listing, rows of pool
    /// files that are gone dropped, committed files without a row adopted.
    pub(crate) fn repair(
        &self,
        counters: Counters,
        drop_rows: &[Fingerprint],
        adopt: &[(Fingerprint, u64)],
        now: u64,
    ) -> Result<(), StoreError> {
        let mut w = self.env.write_txn().map_err(|e| db_err("begin", e))?;
        for hash in drop_rows {
            self.pool
                .delete(&mut w, hash.as_bytes())
                .map_err(|e| db_err("delete pool", e))?;
            self.atime
                .delete(&mut w, hash.as_bytes())
                .map_err(|e| db_err("delete atime", e))?;
        }
        for (hash, mtime) in adopt {
            self.pool
                .put(&mut w, hash.as_bytes(), mtime)
                .map_err(|e| db_err("put pool", e))?;
            self.atime
                .put(&mut w, hash.as_bytes(), &now)
                .map_err(|e| db_err("put atime", e))?;
        }
        self.meta
            .put(&mut w, USAGE_KEY, &counters.encode())
            .map_err(|e| db_err("put usage", e))?;
        w.commit().map_err(|e| db_err("commit", e))
    }

    /// Forces committed data to disk, and records when (see [`synced_within`](Self::synced_within)).
    pub(crate) fn sync(&self) -> Result<(), StoreError> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let mut w = self.env.write_txn().map_err(|e| db_err("begin", e))?;
        self.meta
            .put(&mut w, LAST_SYNC_KEY, &now.to_le_bytes())
            .map_err(|e| db_err("put last sync", e))?;
        w.commit().map_err(|e| db_err("commit", e))?;
        self.env.force_sync().map_err(|e| db_err("sync", e))
    }

    /// Whether some process synced the database less than `ms` milliseconds ago.
    pub(crate) fn synced_within(&self, ms: u64) -> bool {
        let Ok(r) = self.env.read_txn() else {
            return false;
        };
        let last = self
            .meta
            .get(&r, LAST_SYNC_KEY)
            .ok()
            .flatten()
            .and_then(|v| <[u8; 8]>::try_from(v).ok())
            .map_or(0, u64::from_le_bytes);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        now.saturating_sub(last) < ms
    }
}

/// Bytes of real (not sparse) zeros a new `lock.mdb` gets before LMDB opens it; LMDB needs
/// ≈ 64 KiB for 1024 readers and adopts a larger file as room for more readers.
const LOCK_FILE_BYTES: usize = 256 * 1024;

/// LMDB sizes its lock file with `ftruncate` and then writes it through a memory map. On a full
/// disk the truncate succeeds (the file is sparse) and the first write through the map kills the
/// process with SIGBUS: no error to handle, a crashed build. So a new lock file is written out
/// with real zeros first; on a full disk that write fails with ENOSPC, which is an error the
/// caller can degrade on. An existing lock file (already backed by LMDB) is left alone.
fn preallocate_lock_file(dir: &Path) -> Result<(), StoreError> {
    use std::io::Write;
    let path = dir.join("lock.mdb");
    if path.exists() {
        return Ok(());
    }
    // Written under a private name and linked into place (a link never replaces an existing
    // file), so two processes creating one store at once never see a half-written lock file.
    let temp = dir.join(format!("lock.mdb.{}", uuid::Uuid::new_v4().simple()));
    let written = std::fs::File::create(&temp).and_then(|mut f| {
        f.write_all(&vec![0u8; LOCK_FILE_BYTES])?;
        f.sync_all()
    });
    let linked = written.and_then(|()| match std::fs::hard_link(&temp, &path) {
        Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => Err(e),
        _ => Ok(()),
    });
    let _ = std::fs::remove_file(&temp);
    linked.map_err(|e| StoreError::io(format!("preparing {}", path.display()), e))
}

fn fingerprint(k: &[u8]) -> Option<Fingerprint> {
    <[u8; FINGERPRINT_SIZE]>::try_from(k).ok().map(Fingerprint)
}
