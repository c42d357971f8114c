//! Small blobs in LMDB (through heed): one `blobs` table keyed by the 32-byte fingerprint, and an
//! `atime` table (fingerprint → last access, unix milliseconds) used by garbage collection.
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
    StoreError::new(ErrorKind::Io, format!("small-blob database: {what}: {e}"))
}

#[derive(Debug)]
pub(crate) struct SmallDb {
    env: Env<WithoutTls>,
    blobs: Database<Raw, Raw>,
    atime: Database<Raw, Atime>,
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
    pub(crate) fn open(dir: &Path, map_size: usize) -> Result<SmallDb, StoreError> {
        std::fs::create_dir_all(dir)
            .map_err(|e| StoreError::io(format!("creating {}", dir.display()), e))?;
        let mut opts = EnvOpenOptions::new().read_txn_without_tls();
        opts.map_size(map_size).max_dbs(2).max_readers(1024);
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
        w.commit().map_err(|e| db_err("commit", e))?;
        Ok(SmallDb { env, blobs, atime })
    }

    /// Stores a verified blob. Returns true when it was not there before.
    pub(crate) fn put(&self, digest: Digest, bytes: &[u8], now: u64) -> Result<bool, StoreError> {
        let key = digest.hash.as_bytes();
        let mut w = self.env.write_txn().map_err(|e| db_err("begin", e))?;
        let existed = self
            .blobs
            .get(&w, key)
            .map_err(|e| db_err("get", e))?
            .is_some_and(|v| v.len() as u64 == digest.size_bytes);
        if !existed {
            self.blobs
                .put(&mut w, key, bytes)
                .map_err(|e| db_err("put", e))?;
        }
        self.atime
            .put(&mut w, key, &now)
            .map_err(|e| db_err("put atime", e))?;
        w.commit().map_err(|e| db_err("commit", e))?;
        Ok(!existed)
    }

    /// Stores several verified blobs in one transaction (one commit instead of one per blob:
    /// on a cache hit with many small outputs this is most of the local cost). Returns how many
    /// were new, with their total size.
    pub(crate) fn put_many(
        &self,
        items: &[(Digest, &[u8])],
        now: u64,
    ) -> Result<(u64, u64), StoreError> {
        let mut w = self.env.write_txn().map_err(|e| db_err("begin", e))?;
        let (mut count, mut bytes) = (0u64, 0u64);
        for (digest, data) in items {
            let key = digest.hash.as_bytes();
            let existed = self
                .blobs
                .get(&w, key)
                .map_err(|e| db_err("get", e))?
                .is_some_and(|v| v.len() as u64 == digest.size_bytes);
            if !existed {
                self.blobs
                    .put(&mut w, key, data)
                    .map_err(|e| db_err("put", e))?;
                count += 1;
                bytes += digest.size_bytes;
            }
            self.atime
                .put(&mut w, key, &now)
                .map_err(|e| db_err("put atime", e))?;
        }
        w.commit().map_err(|e| db_err("commit", e))?;
        Ok((count, bytes))
    }

    /// The blob, copied out of the map. A stored value whose length does not match the digest is
    /// treated as absent.
    pub(crate) fn get(&self, digest: Digest) -> Result<Option<Bytes>, StoreError> {
        let r = self.env.read_txn().map_err(|e| db_err("begin read", e))?;
        let v = self
            .blobs
            .get(&r, digest.hash.as_bytes())
            .map_err(|e| db_err("get", e))?;
        Ok(v.filter(|v| v.len() as u64 == digest.size_bytes)
            .map(Bytes::copy_from_slice))
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
                .is_some_and(|v| v.len() as u64 == d.size_bytes);
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
            out.push(SmallEntry {
                digest: Digest::new(hash, v.len() as u64),
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
    /// access rows (for pool blobs, whose data lives in files).
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
        w.commit().map_err(|e| db_err("commit", e))
    }

    /// Forces committed data to disk.
    pub(crate) fn sync(&self) -> Result<(), StoreError> {
        self.env.force_sync().map_err(|e| db_err("sync", e))
    }
}

fn fingerprint(k: &[u8]) -> Option<Fingerprint> {
    <[u8; FINGERPRINT_SIZE]>::try_from(k).ok().map(Fingerprint)
}
