//! The large-file pool: one read-only file per blob at `large/<2 hex>/<hash>-<size>`, or
//! `large/<2 hex>/<hash>-<size>.zst` in a compressed pool for a blob stored as zstd frames
//! ([`Stored`]: how a blob is laid out at rest is recorded in its name when it is committed, and
//! never guessed from its content).
//!
//! Writes go to a `.tmp-*` file at the pool's top level (same filesystem), are hashed while
//! written, fsynced, made read-only and renamed into place only when the digest verifies; the
//! shard directory is fsynced after the rename, so a committed blob survives a power cut. A
//! rename is atomic, so a reader sees either no file or the whole verified file, also after a
//! `kill -9` mid-write.
//!
//! Every temp file is locked (`flock`, exclusive) by its writer until it is committed or removed.
//! Opening the pool lists its top level only and removes the temp files no one holds a lock on
//! (a crashed writer's locks died with it); this works across processes, containers sharing a
//! volume, and systems without `/proc`. To close the instant between a writer creating its file
//! and locking it, an unlocked temp file is removed only when its writer's PID (in the name) is
//! gone from this machine or the file is older than [`STALE_TEMP_AGE`].

use std::borrow::Borrow;
use std::collections::HashMap;
use std::fs;
use std::io::{self, Read};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use hashing::{Digest, Fingerprint, WriterHasher};

use crate::error::StoreError;

/// Prefix of in-progress files; anything with it is garbage when the pool is opened.
pub(crate) const TEMP_PREFIX: &str = ".tmp-";
/// Mode of committed pool files: read-only for everyone, so hardlinked outputs cannot be edited
/// in place (which would corrupt every other link to the blob).
pub(crate) const POOL_FILE_MODE: u32 = 0o444;

/// An unlocked temp file whose writer PID still runs here is left alone this young (see the
/// module docs).
const STALE_TEMP_AGE: std::time::Duration = std::time::Duration::from_secs(10);

/// Buffer for streaming copies into the pool.
const COPY_BUFFER_BYTES: usize = 1024 * 1024;

/// How a committed pool file holds its blob, as its name records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Stored {
    /// Exactly the blob's bytes: `<hash>-<size>`.
    Plain,
    /// zstd frames and a seek table (compressed pools only): `<hash>-<size>.zst`, a valid `.zst`
    /// file.
    Frames,
}

/// Name suffix of a file stored as frames.
const FRAMES_SUFFIX: &str = ".zst";

#[derive(Debug)]
pub(crate) struct Pool {
    dir: PathBuf,
    inflight: InFlight,
    /// Files are zstd-compressed at rest (see `zstd_blob`).
    compressed: bool,
}

/// What a write into the pool must match before it is committed.
#[derive(Debug, Clone, Copy)]
enum Expect {
    /// Anything: the content names itself.
    Nothing,
    /// This digest (hash and size).
    Digest(Digest),
    /// This hash, whatever the size.
    Hash(hashing::Fingerprint),
}

impl Pool {
    /// Opens (creating if needed) the pool under `dir`, removing temp files whose writer is gone
    /// (a crash). Lists the top level only: the cost does not grow with the blobs held.
    pub(crate) fn open(dir: &Path, compressed: bool) -> Result<Pool, StoreError> {
        fs::create_dir_all(dir)
            .map_err(|e| StoreError::io(format!("creating pool directory {}", dir.display()), e))?;
        clean_temps(dir)?;
        Ok(Pool {
            dir: dir.to_path_buf(),
            inflight: InFlight::default(),
            compressed,
        })
    }

    /// Whether pool files are zstd-compressed at rest.
    pub(crate) fn compressed(&self) -> bool {
        self.compressed
    }

    /// The digests the pool holds, read from file names; removes nothing.
    pub(crate) fn list(&self) -> Result<Vec<Digest>, StoreError> {
        scan(&self.dir)
    }

    /// The committed blob whose SHA-256 is `hash`, whatever its size (one shard listed).
    pub(crate) fn find_by_hash(&self, hash: &Fingerprint) -> Option<Digest> {
        let hex = hash.to_hex();
        fs::read_dir(self.dir.join(&hex[..2]))
            .ok()?
            .flatten()
            .find_map(|e| parse_pool_name(e.file_name().to_str()?).filter(|d| d.hash == *hash))
    }

    /// The ways this pool stores blobs, the likelier first.
    fn kinds(&self) -> &'static [Stored] {
        if self.compressed {
            &[Stored::Frames, Stored::Plain]
        } else {
            &[Stored::Plain]
        }
    }

    /// Where `digest` lives when stored as `stored` (whether or not it is there).
    pub(crate) fn path_as(&self, digest: &Digest, stored: Stored) -> PathBuf {
        let hex = digest.hash.to_hex();
        let suffix = match stored {
            Stored::Plain => "",
            Stored::Frames => FRAMES_SUFFIX,
        };
        self.dir
            .join(&hex[..2])
            .join(format!("{hex}-{}{suffix}", digest.size_bytes))
    }

    /// The committed file of `digest`, how it is stored and its metadata (the one stat callers
    /// need), or `None` when the pool lacks it. A compressed pool looks for frames first (most
    /// blobs compress), then a plain file; an uncompressed pool costs one stat, as before
    /// layouts were named.
    pub(crate) fn locate(&self, digest: &Digest) -> Option<(PathBuf, Stored, fs::Metadata)> {
        self.kinds().iter().find_map(|k| {
            let path = self.path_as(digest, *k);
            let meta = fs::metadata(&path).ok().filter(fs::Metadata::is_file)?;
            Some((path, *k, meta))
        })
    }

    pub(crate) fn contains(&self, digest: &Digest) -> bool {
        self.locate(digest).is_some()
    }

    /// A fresh temp path inside the pool (same filesystem as the final place, so rename works).
    fn temp_path(&self) -> PathBuf {
        self.dir.join(format!(
            "{TEMP_PREFIX}{}-{}",
            std::process::id(),
            uuid::Uuid::new_v4().simple()
        ))
    }

    /// Creates a temp file and locks it for as long as the returned file stays open: the lock
    /// is what tells another process opening the pool that this write is alive.
    pub(crate) fn create_temp(&self) -> Result<(PathBuf, fs::File), StoreError> {
        let temp = self.temp_path();
        let file = fs::File::create(&temp)
            .map_err(|e| StoreError::io(format!("creating {}", temp.display()), e))?;
        if let Err(e) = file.lock() {
            let _ = fs::remove_file(&temp);
            return Err(StoreError::io(format!("locking {}", temp.display()), e));
        }
        Ok((temp, file))
    }

    /// Waits until no one else is writing `digest`; the returned guard must be held while writing.
    pub(crate) fn lock_blocking(&self, digest: Digest) -> InFlightGuard {
        self.inflight.lock_blocking(digest)
    }

    /// Async twin of [`Pool::lock_blocking`].
    pub(crate) async fn lock(&self, digest: Digest) -> InFlightGuard {
        self.inflight.lock(digest).await
    }

    /// Makes a fully written and fsynced temp file read-only and renames it into place, under
    /// the name that records how it is `stored`. Returns false when the blob was already there
    /// (the temp file is removed).
    pub(crate) fn commit_temp(
        &self,
        temp: &Path,
        digest: &Digest,
        stored: Stored,
    ) -> Result<bool, StoreError> {
        if stored == Stored::Frames && !self.compressed {
            let _ = fs::remove_file(temp);
            return Err(StoreError::invalid(
                "zstd frames offered to a pool that stores blobs plain",
            ));
        }
        if self.contains(digest) {
            let _ = fs::remove_file(temp);
            return Ok(false);
        }
        let dest = self.path_as(digest, stored);
        fs::set_permissions(temp, fs::Permissions::from_mode(POOL_FILE_MODE))
            .map_err(|e| StoreError::io(format!("making {} read-only", temp.display()), e))?;
        if let Some(parent) = dest.parent() {
            fs::create_dir_all(parent)
                .map_err(|e| StoreError::io(format!("creating {}", parent.display()), e))?;
        }
        fs::rename(temp, &dest).map_err(|e| {
            let _ = fs::remove_file(temp);
            StoreError::io(format!("renaming into {}", dest.display()), e)
        })?;
        // The rename is durable only once the directory holding the new name is on disk.
        if let Some(parent) = dest.parent() {
            fsync_dir(parent)?;
        }
        Ok(true)
    }

    /// Streams `src` into the pool, hashing on the way. With `expected`, the content must match
    /// it or nothing is committed. Returns the digest and whether the blob is new.
    pub(crate) fn write_from(
        &self,
        src: &mut dyn Read,
        expected: Option<Digest>,
    ) -> Result<(Digest, bool), StoreError> {
        self.write_checked(src, expected.map_or(Expect::Nothing, Expect::Digest))
    }

    /// Streams `src` into the pool like [`write_from`](Self::write_from) without an expected
    /// size: the content is committed only if it hashes to `hash` (a client that names a blob
    /// by hash alone). Returns the digest and whether the blob is new.
    pub(crate) fn write_from_hash(
        &self,
        src: &mut dyn Read,
        hash: hashing::Fingerprint,
    ) -> Result<(Digest, bool), StoreError> {
        self.write_checked(src, Expect::Hash(hash))
    }

    fn write_checked(
        &self,
        src: &mut dyn Read,
        expect: Expect,
    ) -> Result<(Digest, bool), StoreError> {
        let expected = match expect {
            Expect::Digest(d) => Some(d),
            Expect::Hash(_) | Expect::Nothing => None,
        };
        let _guard = expected.map(|d| self.lock_blocking(d));
        if let Some(d) = expected
            && self.contains(&d)
        {
            return Ok((d, false));
        }
        let (temp, file) = self.create_temp()?;
        // The file (and its lock) stays open until the rename is done.
        let result = self
            .write_temp(&temp, &file, src, expected)
            .and_then(|(digest, stored)| {
                if let Expect::Hash(hash) = expect
                    && digest.hash != hash
                {
                    return Err(StoreError::invalid(format!(
                        "content hashes to {}, not {}",
                        digest.hash.to_hex(),
                        hash.to_hex()
                    )));
                }
                let new = self.commit_temp(&temp, &digest, stored)?;
                Ok((digest, new))
            });
        if result.is_err() {
            let _ = fs::remove_file(&temp);
        }
        drop(file);
        result
    }

    /// Copies `src` into `temp` hashing on the way (verifying against `expected` when given),
    /// and fsyncs it. One pass over the data; a compressed pool hashes the logical bytes, then
    /// compresses them. Returns the digest and how the file holds it.
    fn write_temp(
        &self,
        temp: &Path,
        file: &fs::File,
        src: &mut dyn Read,
        expected: Option<Digest>,
    ) -> Result<(Digest, Stored), StoreError> {
        let io_err = |what: &str, e| StoreError::io(format!("{what} {}", temp.display()), e);
        let buffered = io::BufWriter::with_capacity(COPY_BUFFER_BYTES, WritingBack::new(file));
        let (digest, buffered, stored) = if self.compressed {
            let mut out = super::zstd_blob::Writer::new(buffered);
            let digest = copy_hashing(src, &mut out, expected, temp)?;
            let (buffered, stored) = out.finish().map_err(|e| io_err("writing", e))?;
            (digest, buffered, stored)
        } else {
            let mut out = buffered;
            let digest = copy_hashing(src, &mut out, expected, temp)?;
            (digest, out, Stored::Plain)
        };
        let file = buffered
            .into_inner()
            .map_err(|e| io_err("writing", e.into_error()))?
            .into_file();
        file.sync_all().map_err(|e| io_err("fsync", e))?;
        Ok((digest, stored))
    }

    /// Hashes an existing file the caller promises never to modify again and hardlinks it into
    /// the pool: one read pass, no copy. Falls back to a copy across filesystems.
    pub(crate) fn adopt_immutable(&self, src: &Path) -> Result<(Digest, bool), StoreError> {
        let mut f = fs::File::open(src)
            .map_err(|e| StoreError::io(format!("opening {}", src.display()), e))?;
        if self.compressed {
            // A compressed pool cannot adopt a plain file: copy it in, compressing.
            return self.write_from(&mut f, None);
        }
        let mut hasher = hashing::Hasher::new();
        let mut buf = vec![0u8; COPY_BUFFER_BYTES];
        loop {
            let n = f
                .read(&mut buf)
                .map_err(|e| StoreError::io(format!("reading {}", src.display()), e))?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
        }
        let digest = hasher.finish();
        let _guard = self.lock_blocking(digest);
        if self.contains(&digest) {
            return Ok((digest, false));
        }
        let temp = self.temp_path();
        if fs::hard_link(src, &temp).is_err() {
            // Different filesystem (or links not allowed): copy, verifying against what we hashed.
            let mut f = fs::File::open(src)
                .map_err(|e| StoreError::io(format!("opening {}", src.display()), e))?;
            drop(_guard);
            return self.write_from(&mut f, Some(digest));
        }
        // Lock the linked temp like any other, and make its data durable before it becomes
        // visible (the writer of `src` never fsynced it).
        let result = fs::File::open(&temp)
            .and_then(|f| {
                f.lock()?;
                f.sync_all()?;
                Ok(f)
            })
            .map_err(|e| StoreError::io(format!("syncing {}", temp.display()), e))
            .and_then(|f| {
                let new = self.commit_temp(&temp, &digest, Stored::Plain)?;
                drop(f);
                Ok(new)
            });
        if result.is_err() {
            let _ = fs::remove_file(&temp);
        }
        Ok((digest, result?))
    }

    /// Removes `digest`'s file (whichever way it is stored). Missing is fine (someone else
    /// removed it).
    pub(crate) fn remove(&self, digest: &Digest) -> Result<bool, StoreError> {
        let mut removed = false;
        for stored in self.kinds() {
            match fs::remove_file(self.path_as(digest, *stored)) {
                Ok(()) => removed = true,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(StoreError::io(format!("removing pool blob {digest}"), e)),
            }
        }
        Ok(removed)
    }

    /// Gives the frame files of a compressed pool written before layouts were recorded in
    /// names (every file was `<hash>-<size>`, its layout guessed from its last bytes) their
    /// `.zst` name. A file with a seek table of its blob's size is frames unless it is exactly
    /// the blob's length and hashes to it as it is (a plain blob that merely ends like a table).
    /// Walks every shard once; returns how many files were renamed.
    pub(crate) fn name_legacy_frames(&self) -> Result<u64, StoreError> {
        if !self.compressed {
            return Ok(0);
        }
        let mut renamed = 0;
        for digest in self.list()? {
            let plain = self.path_as(&digest, Stored::Plain);
            let Ok(mut file) = fs::File::open(&plain) else {
                continue; // stored as frames already (or gone)
            };
            if super::zstd_blob::Table::read(&mut file, digest.size_bytes).is_err() {
                continue;
            }
            let len = file.metadata().map(|m| m.len()).unwrap_or(0);
            if len == digest.size_bytes {
                let mut hasher = WriterHasher::new(io::sink());
                let as_is = io::Seek::rewind(&mut file)
                    .and_then(|()| io::copy(&mut file, &mut hasher))
                    .is_ok()
                    && hasher.finish().0 == digest;
                if as_is {
                    continue;
                }
            }
            let framed = self.path_as(&digest, Stored::Frames);
            fs::rename(&plain, &framed)
                .map_err(|e| StoreError::io(format!("renaming {}", plain.display()), e))?;
            renamed += 1;
        }
        if renamed > 0
            && let Ok(shards) = fs::read_dir(&self.dir)
        {
            for shard in shards.flatten() {
                if shard.file_type().is_ok_and(|t| t.is_dir()) {
                    fsync_dir(&shard.path())?;
                }
            }
        }
        Ok(renamed)
    }
}

/// Copies `src` into `out`, hashing what was written: verified against `expected` when given.
fn copy_hashing(
    src: &mut dyn Read,
    out: &mut dyn io::Write,
    expected: Option<Digest>,
    temp: &Path,
) -> Result<Digest, StoreError> {
    match expected {
        Some(d) => Ok(hashing::copy_verified(src, out, d)?),
        None => {
            let mut hashing_out = WriterHasher::new(out);
            io::copy(src, &mut hashing_out)
                .map_err(|e| StoreError::io(format!("writing {}", temp.display()), e))?;
            Ok(hashing_out.finish().0)
        }
    }
}

fn read_dir(dir: &Path) -> Result<fs::ReadDir, StoreError> {
    fs::read_dir(dir).map_err(|e| StoreError::io(format!("listing {}", dir.display()), e))
}

/// Lists the pool's blobs from file names (the shards); removes nothing.
fn scan(dir: &Path) -> Result<Vec<Digest>, StoreError> {
    let mut digests = Vec::new();
    for shard in read_dir(dir)? {
        let shard = shard.map_err(|e| StoreError::io(format!("listing {}", dir.display()), e))?;
        if !shard.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        for entry in read_dir(&shard.path())? {
            let entry =
                entry.map_err(|e| StoreError::io(format!("listing {}", dir.display()), e))?;
            if let Some(d) = parse_pool_name(&entry.file_name().to_string_lossy()) {
                digests.push(d);
            }
        }
    }
    Ok(digests)
}

/// Removes the temp files at the pool's top level whose writer is gone: no one holds their lock
/// (and, to close the creation race, their writer PID is not running here or they are stale).
fn clean_temps(dir: &Path) -> Result<(), StoreError> {
    let mut cleaned = 0usize;
    for entry in read_dir(dir)? {
        let entry = entry.map_err(|e| StoreError::io(format!("listing {}", dir.display()), e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.starts_with(TEMP_PREFIX) {
            continue;
        }
        let path = entry.path();
        let Ok(file) = fs::File::open(&path) else {
            continue; // already gone
        };
        match file.try_lock() {
            Ok(()) => {}
            Err(fs::TryLockError::WouldBlock) => continue, // a live writer holds it
            Err(fs::TryLockError::Error(e)) => {
                tracing::warn!(path = %path.display(), error = %e, "cannot lock temp file; leaving it");
                continue;
            }
        }
        let young = file
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age < STALE_TEMP_AGE);
        if young && !writer_pid_is_gone(&name) {
            continue; // its writer runs and may be about to lock it
        }
        match fs::remove_file(&path) {
            Ok(()) => cleaned += 1,
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "could not remove leftover temp file")
            }
        }
    }
    if cleaned > 0 {
        tracing::info!(cleaned, pool = %dir.display(), "removed leftover temp files from an interrupted write");
    }
    Ok(())
}

/// Whether the PID in temp file `name` (`.tmp-<pid>-<uuid>`) is known not to run on this
/// machine. A name without a PID is not one of ours: gone. Without `/proc` nothing is known:
/// false (the age decides).
fn writer_pid_is_gone(name: &str) -> bool {
    let pid = name
        .strip_prefix(TEMP_PREFIX)
        .and_then(|rest| rest.split_once('-'))
        .and_then(|(pid, _)| pid.parse::<u32>().ok());
    match pid {
        None => true,
        Some(pid) if Path::new("/proc/self").exists() => {
            pid != std::process::id() && !Path::new("/proc").join(pid.to_string()).exists()
        }
        Some(_) => false,
    }
}

/// fsyncs a directory, so the renames in it are durable.
pub(crate) fn fsync_dir(dir: &Path) -> Result<(), StoreError> {
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| StoreError::io(format!("syncing directory {}", dir.display()), e))
}

/// Parses `<64 hex>-<size>` or `<64 hex>-<size>.zst`; anything else in the pool is ignored.
fn parse_pool_name(name: &str) -> Option<Digest> {
    let name = name.strip_suffix(FRAMES_SUFFIX).unwrap_or(name);
    let (hash, size) = name.split_once('-')?;
    Some(Digest::new(
        Fingerprint::from_hex(hash).ok()?,
        size.parse().ok()?,
    ))
}

/// Per-digest write locks: concurrent writers of one digest are single-flighted, and the second
/// finds the blob already committed.
#[derive(Debug, Default)]
pub(crate) struct InFlight {
    locks: Arc<Mutex<HashMap<Digest, Arc<tokio::sync::Mutex<()>>>>>,
}

/// Holds a digest's write lock; dropping it releases the lock and forgets the digest when no one
/// else is waiting.
#[derive(Debug)]
pub(crate) struct InFlightGuard {
    digest: Digest,
    locks: Arc<Mutex<HashMap<Digest, Arc<tokio::sync::Mutex<()>>>>>,
    guard: Option<tokio::sync::OwnedMutexGuard<()>>,
}

impl InFlight {
    fn entry(&self, digest: Digest) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = self.locks.lock().unwrap_or_else(|p| p.into_inner());
        locks.entry(digest).or_default().clone()
    }

    fn guard(&self, digest: Digest, guard: tokio::sync::OwnedMutexGuard<()>) -> InFlightGuard {
        InFlightGuard {
            digest,
            locks: self.locks.clone(),
            guard: Some(guard),
        }
    }

    /// Blocks the calling thread until the lock is free. Unlike tokio's `blocking_lock` this
    /// does not panic inside a runtime; it does block that runtime thread, as any blocking store
    /// call does (use `spawn_blocking`).
    fn lock_blocking(&self, digest: Digest) -> InFlightGuard {
        let guard = futures::executor::block_on(self.entry(digest).lock_owned());
        self.guard(digest, guard)
    }

    async fn lock(&self, digest: Digest) -> InFlightGuard {
        let guard = self.entry(digest).lock_owned().await;
        self.guard(digest, guard)
    }
}

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        let mut locks = self.locks.lock().unwrap_or_else(|p| p.into_inner());
        self.guard.take();
        // One reference in the map; any more means another writer is queued on it.
        if locks
            .get(&self.digest)
            .is_some_and(|l| Arc::strong_count(l) == 1)
        {
            locks.remove(&self.digest);
        }
    }
}

/// Bytes written between two writeback kicks (see [`WritingBack`]).
const WRITEBACK_STEP_BYTES: u64 = 8 * 1024 * 1024;

/// A file being written whose dirty pages are handed to the disk as it goes: every
/// [`WRITEBACK_STEP_BYTES`] it asks the kernel to start writing the range just written
/// (`sync_file_range(SYNC_FILE_RANGE_WRITE)`, which does not wait). The fsync before commit then
/// finds most of the blob already on disk, instead of flushing all of it at the end while the
/// client waits: writeback overlaps the receive. A hint only; the fsync is what guarantees.
///
/// `F` is the file or a borrow of it (`&fs::File`), for writers that own it or not.
#[derive(Debug)]
pub(crate) struct WritingBack<F: Borrow<fs::File>> {
    file: F,
    written: u64,
    kicked: u64,
}

impl<F: Borrow<fs::File>> WritingBack<F> {
    pub(crate) fn new(file: F) -> WritingBack<F> {
        WritingBack {
            file,
            written: 0,
            kicked: 0,
        }
    }

    /// The file back, for the fsync.
    pub(crate) fn into_file(self) -> F {
        self.file
    }

    #[cfg(target_os = "linux")]
    fn kick(&mut self) {
        use std::os::fd::AsRawFd;
        let (Ok(from), Ok(len)) = (
            i64::try_from(self.kicked),
            i64::try_from(self.written - self.kicked),
        ) else {
            return;
        };
        // SAFETY: sync_file_range only reads its integer arguments; the descriptor is valid for
        // as long as `self.file` is held. Failure is harmless (the fsync still runs).
        #[allow(unsafe_code)]
        let _ = unsafe {
            libc::sync_file_range(
                self.file.borrow().as_raw_fd(),
                from,
                len,
                libc::SYNC_FILE_RANGE_WRITE,
            )
        };
        self.kicked = self.written;
    }

    #[cfg(not(target_os = "linux"))]
    fn kick(&mut self) {}
}

impl<F: Borrow<fs::File>> io::Write for WritingBack<F> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = (&mut self.file.borrow()).write(buf)?;
        self.written += n as u64;
        if self.written - self.kicked >= WRITEBACK_STEP_BYTES {
            self.kick();
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// A compressed pool from before layouts were named: every file `<hash>-<size>`. The
    /// migration gives frame files their `.zst` name and leaves plain ones (even one that ends
    /// like a seek table) as they are.
    #[test]
    fn legacy_frame_files_get_their_zst_name_and_plain_ones_stay() {
        let dir = tempfile::tempdir().unwrap();
        let pool = Pool::open(dir.path(), true).unwrap();
        let text: Vec<u8> = (0..3_000_000u32)
            .flat_map(|i| format!("{i} ").into_bytes())
            .take(3 << 20)
            .collect();
        let forged = testutil::data::forged_framed_blob(1 << 20);
        let random = testutil::data::pseudo_random(1 << 20, 9);
        let mut digests = Vec::new();
        for content in [&text, &forged, &random] {
            let (d, new) = pool.write_from(&mut &content[..], None).unwrap();
            assert!(new);
            digests.push(d);
        }
        let (framed, _, _) = pool.locate(&digests[0]).unwrap();
        assert!(framed.to_string_lossy().ends_with(".zst"));
        for d in &digests[1..] {
            assert_eq!(pool.locate(d).unwrap().1, Stored::Plain);
        }
        // Back to the old naming.
        fs::rename(&framed, pool.path_as(&digests[0], Stored::Plain)).unwrap();
        assert_eq!(pool.locate(&digests[0]).unwrap().1, Stored::Plain);

        assert_eq!(pool.name_legacy_frames().unwrap(), 1);
        assert_eq!(pool.locate(&digests[0]).unwrap().1, Stored::Frames);
        assert_eq!(pool.locate(&digests[1]).unwrap().1, Stored::Plain);
        assert_eq!(pool.locate(&digests[2]).unwrap().1, Stored::Plain);
        assert_eq!(pool.list().unwrap().len(), 3);
        assert_eq!(pool.name_legacy_frames().unwrap(), 0, "idempotent");
    }
}
