//! A CAS and ActionCache in a plain directory (`file:///path`), like Bazel's `--disk_cache`.
//!
//! ```text
//! <root>/cas/ab/<hash>-<size>       blob content
//! <root>/ac/ab/<hash>-<size>        encoded ActionResult for that action digest
//! <root>/tmp/<pid>-<uuid>           writes in progress, each locked (`flock`) by its writer;
//!                                   removed at open and by GC once no one holds the lock (a
//!                                   killed writer's)
//! <root>/usage                      bytes held (approximate; re-derived by GC), 8 bytes LE
//! ```
//!
//! Every write goes to `tmp/`, is fsynced and renamed into place (and the directory fsynced), so
//! several processes (or machines on a shared filesystem) can use one directory: a reader sees a
//! whole file or none, also after a power cut. A file counts as present only with the right
//! length; every read is verified against the digest, and a file that fails is removed, so a
//! damaged entry is repaired by the next write instead of being trusted or kept forever.
//!
//! With a size bound ([`LocalDirProvider::with_max_size`]) a write that takes the directory above
//! it evicts least-recently-used entries (reads refresh a file's modification time) down to 90 %.

use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::path::{Path, PathBuf};

use async_trait::async_trait;
use bytes::Bytes;
use hashing::Digest;
use prost::Message;
use reapi::build::bazel::remote::execution::v2 as remexec;
use tokio::io::AsyncWriteExt;

use super::{ActionCacheProvider, ByteStoreProvider};
use crate::destination::LoadDestination;
use crate::error::StoreError;

/// A temp file must be at least this old, as well as unlocked, to be removed as stale.
const TEMP_GRACE: std::time::Duration = std::time::Duration::from_secs(10);

/// Blobs up to this size are read in one go by `load_batch`.
const BATCH_BLOB_MAX: u64 = 1024 * 1024;

/// See the module docs.
#[derive(Debug, Clone)]
pub struct LocalDirProvider {
    root: PathBuf,
    max_size: Option<u64>,
}

impl LocalDirProvider {
    /// Uses (creating if needed) the directory `root`.
    pub fn open(root: &Path) -> Result<LocalDirProvider, StoreError> {
        for sub in ["cas", "ac", "tmp"] {
            let p = root.join(sub);
            std::fs::create_dir_all(&p).map_err(|e| {
                StoreError::io(format!("creating cache directory {}", p.display()), e)
            })?;
        }
        let provider = LocalDirProvider {
            root: root.to_path_buf(),
            max_size: None,
        };
        provider.remove_stale_temps();
        Ok(provider)
    }

    /// Removes the temp files of writes that no process is doing any more (their writer was
    /// killed or crashed: the lock went with it). Returns the bytes removed. Best effort.
    pub fn remove_stale_temps(&self) -> u64 {
        let Ok(entries) = std::fs::read_dir(self.root.join("tmp")) else {
            return 0;
        };
        let mut removed = 0;
        for e in entries.flatten() {
            let Ok(f) = std::fs::File::open(e.path()) else {
                continue;
            };
            // A writer holds its temp file's lock from creation to rename; a file younger than
            // TEMP_GRACE may be one whose writer has created it and not locked it yet.
            let old = e
                .metadata()
                .and_then(|m| m.modified())
                .is_ok_and(|t| t.elapsed().is_ok_and(|age| age >= TEMP_GRACE));
            if old && f.try_lock().is_ok() {
                let len = f.metadata().map_or(0, |m| m.len());
                if std::fs::remove_file(e.path()).is_ok() {
                    removed += len;
                    tracing::info!(file = %e.path().display(), bytes = len, "removed a temp file an interrupted write left");
                }
            }
        }
        removed
    }

    /// Bounds the directory to `max_bytes` of entries (LRU eviction on write).
    pub fn with_max_size(mut self, max_bytes: u64) -> LocalDirProvider {
        self.max_size = Some(max_bytes);
        self
    }

    /// Whether the entry at `path` is present whole (right length). A shorter file (a torn
    /// write on a filesystem without atomic renames, a disk error) is as good as absent.
    fn present(path: &Path, size: u64) -> bool {
        std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.len() == size)
    }

    /// Removes a file that failed verification, so the next write repairs it.
    fn discard_corrupt(path: &Path, why: &str) -> StoreError {
        let _ = std::fs::remove_file(path);
        tracing::warn!(path = %path.display(), "removed a damaged cache entry: {why}");
        StoreError::invalid(format!("{}: {why} (removed)", path.display()))
    }

    /// Marks an entry as just used (LRU order for GC). Best effort.
    fn refresh(path: &Path) {
        if let Ok(f) = std::fs::File::options().append(true).open(path) {
            let _ = f.set_modified(std::time::SystemTime::now());
        }
    }

    /// Adds `delta` bytes to the usage counter and returns the new value.
    fn add_usage(&self, delta: i64) -> std::io::Result<u64> {
        self.update_usage(|current| current.saturating_add_signed(delta))
    }

    /// Replaces the usage counter with `f(current)` under a file lock (shared by every process)
    /// and returns the new value.
    fn update_usage(&self, update: impl FnOnce(u64) -> u64) -> std::io::Result<u64> {
        use std::io::{Read, Seek};
        let mut f = std::fs::File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(self.root.join("usage"))?;
        f.lock()?;
        let mut buf = [0u8; 8];
        let current = match f.read_exact(&mut buf) {
            Ok(()) => u64::from_le_bytes(buf),
            Err(_) => 0,
        };
        let next = update(current);
        f.seek(std::io::SeekFrom::Start(0))?;
        f.write_all(&next.to_le_bytes())?;
        Ok(next)
    }

    /// Bytes held, as counted (re-derived exactly by [`gc`](Self::gc)).
    pub fn approximate_size(&self) -> u64 {
        self.add_usage(0).unwrap_or(0)
    }

    /// Evicts least-recently-used entries (oldest modification time first) until at most
    /// `target_bytes` remain. Returns the bytes removed.
    pub fn gc(&self, target_bytes: u64) -> Result<u64, StoreError> {
        self.remove_stale_temps();
        let mut entries: Vec<(std::time::SystemTime, PathBuf, u64)> = Vec::new();
        for kind in ["cas", "ac"] {
            let dir = self.root.join(kind);
            for shard in read_dir(&dir)? {
                for entry in read_dir(&shard.path())? {
                    if let Ok(m) = entry.metadata() {
                        let t = m.modified().unwrap_or(std::time::UNIX_EPOCH);
                        entries.push((t, entry.path(), m.len()));
                    }
                }
            }
        }
        entries.sort();
        let mut total: u64 = entries.iter().map(|e| e.2).sum();
        let mut removed = 0u64;
        for (_, path, len) in entries {
            if total <= target_bytes {
                break;
            }
            if std::fs::remove_file(&path).is_ok() {
                total -= len;
                removed += len;
            }
        }
        let _ = self.update_usage(|_| total);
        Ok(removed)
    }

    /// After a write of `bytes`: count it and enforce the bound.
    fn grew(&self, bytes: u64) {
        let Ok(size) = self.add_usage(bytes as i64) else {
            return;
        };
        if let Some(max) = self.max_size
            && size > max
        {
            match self.gc(max / 100 * 90) {
                Ok(removed) => tracing::info!(
                    removed,
                    max,
                    "cache directory reached its size bound; evicted least-recently-used entries"
                ),
                Err(e) => {
                    tracing::warn!(error = %e, "cache directory is over its size bound and GC failed")
                }
            }
        }
    }

    /// The directory this provider uses.
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn path(&self, kind: &str, d: &Digest) -> PathBuf {
        let hex = d.hash.to_hex();
        self.root
            .join(kind)
            .join(&hex[..2])
            .join(format!("{hex}-{}", d.size_bytes))
    }

    /// Writes `data` atomically to `dest` via a temp file and rename.
    fn write_atomic(
        &self,
        dest: &Path,
        write: impl FnOnce(&mut std::fs::File) -> std::io::Result<()>,
    ) -> Result<(), StoreError> {
        let tmp = self.temp_path();
        let result = (|| {
            let mut f = std::fs::File::create_new(&tmp)?;
            // Held until the file is renamed and closed: a cleaner never takes a live write.
            f.lock()?;
            write(&mut f)?;
            f.flush()?;
            f.sync_all()?;
            let len = f.metadata()?.len();
            let parent = dest.parent().unwrap_or(&self.root);
            std::fs::create_dir_all(parent)?;
            std::fs::rename(&tmp, dest)?;
            std::fs::File::open(parent)?.sync_all()?;
            Ok(len)
        })();
        match result {
            Ok(len) => {
                self.grew(len);
                Ok(())
            }
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                Err(StoreError::io(format!("writing {}", dest.display()), e))
            }
        }
    }

    /// The temp file a write goes through (in `tmp/`, named by pid and a random id).
    fn temp_path(&self) -> PathBuf {
        self.root.join("tmp").join(format!(
            "{}-{}",
            std::process::id(),
            uuid::Uuid::new_v4().simple()
        ))
    }

    /// Writes many small blobs with two flushes to disk per [`BATCH_FILES`] instead of two per
    /// blob: each blob goes to a temp file (locked, as in [`write_atomic`](Self::write_atomic)),
    /// one `syncfs` makes them all durable, each is renamed into place, and a second `syncfs`
    /// makes the renames durable. A job cache saving thousands of small files into a `file://`
    /// cache spent most of its time in the per-blob fsyncs. On an error, the temp files not yet
    /// renamed are removed; every blob already renamed is whole.
    fn write_batch(&self, blobs: Vec<(Digest, Bytes)>) -> Result<(), StoreError> {
        let wanted: Vec<(PathBuf, Bytes)> = blobs
            .into_iter()
            .map(|(d, b)| (self.path("cas", &d), b))
            .filter(|(dest, b)| !Self::present(dest, b.len() as u64))
            .collect();
        for chunk in wanted.chunks(BATCH_FILES) {
            // (temp path, open and locked file, destination, length)
            let mut written: Vec<(PathBuf, std::fs::File, &Path, u64)> = Vec::new();
            let result = (|| {
                for (dest, bytes) in chunk {
                    let tmp = self.temp_path();
                    let mut f = std::fs::File::create_new(&tmp)
                        .map_err(|e| StoreError::io(format!("creating {}", tmp.display()), e))?;
                    let step = (|| {
                        f.lock()?;
                        f.write_all(bytes)?;
                        f.flush()
                    })();
                    written.push((tmp, f, dest.as_path(), bytes.len() as u64));
                    step.map_err(|e| StoreError::io(format!("writing {}", dest.display()), e))?;
                }
                sync_filesystem(&self.root)?;
                for (tmp, _, dest, len) in &written {
                    let parent = dest.parent().unwrap_or(&self.root);
                    std::fs::create_dir_all(parent)
                        .and_then(|()| std::fs::rename(tmp, dest))
                        .map_err(|e| StoreError::io(format!("writing {}", dest.display()), e))?;
                    self.grew(*len);
                }
                sync_filesystem(&self.root)
            })();
            if let Err(e) = result {
                for (tmp, _, _, _) in &written {
                    // Already renamed ones are gone from tmp/; the rest are removed.
                    let _ = std::fs::remove_file(tmp);
                }
                return Err(e);
            }
        }
        Ok(())
    }
}

/// Blobs per flush in [`LocalDirProvider::write_batch`]: bounds the files held open at once.
const BATCH_FILES: usize = 256;

/// Flushes everything written to the filesystem holding `dir` (`syncfs(2)`): one journal
/// commit for a whole batch of new files, where an fsync per file costs one each.
fn sync_filesystem(dir: &Path) -> Result<(), StoreError> {
    use std::os::fd::AsRawFd;
    let d = std::fs::File::open(dir)
        .map_err(|e| StoreError::io(format!("opening {}", dir.display()), e))?;
    // SAFETY: syncfs takes a valid open descriptor, which `d` holds for the call's duration.
    #[allow(unsafe_code)]
    let rc = unsafe { libc::syncfs(d.as_raw_fd()) };
    if rc == 0 {
        Ok(())
    } else {
        Err(StoreError::io(
            format!("syncing the filesystem of {}", dir.display()),
            std::io::Error::last_os_error(),
        ))
    }
}

fn read_dir(dir: &Path) -> Result<Vec<std::fs::DirEntry>, StoreError> {
    let io = |e| StoreError::io(format!("listing {}", dir.display()), e);
    std::fs::read_dir(dir)
        .map_err(io)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(io)
}

#[async_trait]
impl ByteStoreProvider for LocalDirProvider {
    async fn store_bytes(&self, digest: Digest, bytes: Bytes) -> Result<(), StoreError> {
        let this = self.clone();
        crate::blocking(move || {
            let dest = this.path("cas", &digest);
            if Self::present(&dest, digest.size_bytes) {
                return Ok(());
            }
            this.write_atomic(&dest, |f| f.write_all(&bytes))
        })
        .await
    }

    async fn store_batch(&self, blobs: Vec<(Digest, Bytes)>) -> Result<(), StoreError> {
        let this = self.clone();
        crate::blocking(move || this.write_batch(blobs)).await
    }

    async fn store_file(&self, digest: Digest, file: tokio::fs::File) -> Result<(), StoreError> {
        let this = self.clone();
        let mut file = file.into_std().await;
        crate::blocking(move || {
            let dest = this.path("cas", &digest);
            if Self::present(&dest, digest.size_bytes) {
                return Ok(());
            }
            this.write_atomic(&dest, |f| {
                use std::io::Seek;
                file.seek(std::io::SeekFrom::Start(0))?;
                std::io::copy(&mut file, f).map(|_| ())
            })
        })
        .await
    }

    async fn load(
        &self,
        digest: Digest,
        dest: &mut dyn LoadDestination,
    ) -> Result<bool, StoreError> {
        use tokio::io::AsyncReadExt;
        let path = self.path("cas", &digest);
        let mut file = match tokio::fs::File::open(&path).await {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(StoreError::io(format!("opening {}", path.display()), e)),
        };
        // Verified here as well as by the destination: a damaged file must be removed, not
        // just refused, or it would be refused forever.
        let mut hasher = hashing::Hasher::new();
        let mut buf = vec![0u8; 256 * 1024];
        loop {
            let n = file
                .read(&mut buf)
                .await
                .map_err(|e| StoreError::io(format!("reading {}", path.display()), e))?;
            if n == 0 {
                break;
            }
            if hasher.size_bytes() + n as u64 > digest.size_bytes {
                return Err(Self::discard_corrupt(&path, "longer than its digest says"));
            }
            hasher.update(&buf[..n]);
            match dest.write_all(&buf[..n]).await {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::InvalidData => {
                    return Err(Self::discard_corrupt(&path, &e.to_string()));
                }
                Err(e) => return Err(StoreError::io("writing to the local store", e)),
            }
        }
        if hasher.finish() != digest {
            return Err(Self::discard_corrupt(
                &path,
                "content does not match its digest",
            ));
        }
        dest.flush()
            .await
            .map_err(|e| StoreError::io("writing to the local store", e))?;
        Self::refresh(&path);
        Ok(true)
    }

    async fn load_batch(&self, digests: Vec<Digest>) -> Result<HashMap<Digest, Bytes>, StoreError> {
        let this = self.clone();
        crate::blocking(move || {
            let mut out = HashMap::new();
            for d in digests {
                let path = this.path("cas", &d);
                match std::fs::read(&path) {
                    Ok(data) => {
                        if Digest::of_bytes(&data) != d {
                            // Removed, and reported absent: the caller fetches or rebuilds it.
                            Self::discard_corrupt(&path, "content does not match its digest");
                            continue;
                        }
                        Self::refresh(&path);
                        out.insert(d, Bytes::from(data));
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(StoreError::io(format!("reading {}", path.display()), e)),
                }
            }
            Ok(out)
        })
        .await
    }

    async fn list_missing_digests(
        &self,
        digests: &mut (dyn Iterator<Item = Digest> + Send),
    ) -> Result<HashSet<Digest>, StoreError> {
        Ok(digests
            .filter(|d| {
                *d != hashing::EMPTY_DIGEST && !Self::present(&self.path("cas", d), d.size_bytes)
            })
            .collect())
    }

    fn max_batch_blob_size(&self) -> u64 {
        BATCH_BLOB_MAX
    }
}

#[async_trait]
impl ActionCacheProvider for LocalDirProvider {
    async fn get_action_result(
        &self,
        action_digest: Digest,
    ) -> Result<Option<remexec::ActionResult>, StoreError> {
        let path = self.path("ac", &action_digest);
        match tokio::fs::read(&path).await {
            Ok(bytes) => match remexec::ActionResult::decode(&bytes[..]) {
                Ok(ar) => {
                    Self::refresh(&path);
                    Ok(Some(ar))
                }
                Err(e) => Err(Self::discard_corrupt(
                    &path,
                    &format!("undecodable ActionResult: {e}"),
                )),
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(StoreError::io(format!("reading {}", path.display()), e)),
        }
    }

    async fn update_action_result(
        &self,
        action_digest: Digest,
        result: remexec::ActionResult,
    ) -> Result<(), StoreError> {
        let this = self.clone();
        crate::blocking(move || {
            let dest = this.path("ac", &action_digest);
            let bytes = result.encode_to_vec();
            this.write_atomic(&dest, |f| f.write_all(&bytes))
        })
        .await
    }
}
