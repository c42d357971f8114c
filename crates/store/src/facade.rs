//! [`Store`]: the local store with an optional remote behind it. This is what a build engine holds.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures::future::{BoxFuture, FutureExt, Shared, WeakShared};
use futures::{StreamExt, TryStreamExt};
use hashing::Digest;
use prost::Message;
use reapi::build::bazel::remote::execution::v2 as remexec;

use crate::blocking;
use crate::error::{ErrorKind, StoreError};
use crate::local::LocalStore;
use crate::remote::ByteStoreProvider;

/// Large downloads or uploads in flight at once for one `ensure_*` call.
const TRANSFER_CONCURRENCY: usize = 16;

/// Small blobs are fetched and committed in groups of at most this many bytes (one batch
/// message at the common 4 MiB cap): memory stays flat in the number of outputs. A hit with
/// 20 000 × 4 KiB outputs grows anonymous memory by ≈ 55 MiB (client and in-process server
/// together) with 4 MiB × 2; 8 MiB × 4 gave ≈ 93 MiB, and fetching everything at once
/// (the first version) far more (`perf-report`, `fetch_20k_outputs_*`).
const SMALL_GROUP_BYTES: u64 = 4 * 1024 * 1024;

/// Groups of small blobs fetched at once (each is one or more batch RPCs, then one commit).
const SMALL_GROUP_CONCURRENCY: usize = 2;

/// Local store first, remote provider behind it. Cheap to clone.
///
/// Reads look locally, then fetch from the remote into the local store (large blobs stream
/// straight into a pool temp file and commit only once verified). Concurrent loads of one digest
/// share one download. [`into_local_only`](Store::into_local_only) hands lower layers a store
/// that can never reach the remote.
#[derive(Debug, Clone)]
pub struct Store {
    local: LocalStore,
    remote: Option<Arc<Remote>>,
}

type DownloadFuture = BoxFuture<'static, Result<bool, StoreError>>;

#[derive(Debug)]
struct Remote {
    provider: Arc<dyn ByteStoreProvider>,
    /// Downloads in progress, held *weakly*: a download lives only as long as someone awaits
    /// it. When every waiter is gone (a lost speculation race, an engine cancelling a run), the
    /// download future is dropped at once, and with it the pool lock and the temp file of its
    /// destination; a later write of the same digest never waits on an orphan.
    inflight: Mutex<HashMap<Digest, WeakShared<DownloadFuture>>>,
    /// Bytes uploaded so far (for progress).
    sent: std::sync::atomic::AtomicU64,
}

/// Forgets a download's map entry when its future is dropped unfinished (cancelled).
struct ForgetOnDrop {
    remote: Arc<Remote>,
    digest: Digest,
}

impl Drop for ForgetOnDrop {
    fn drop(&mut self) {
        let mut inflight = self
            .remote
            .inflight
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if inflight
            .get(&self.digest)
            .is_some_and(|w| w.upgrade().is_none())
        {
            inflight.remove(&self.digest);
        }
    }
}

/// What an `ensure_*` call moved.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TransferSummary {
    /// Blobs transferred.
    pub blobs: u64,
    /// Bytes transferred (uncompressed).
    pub bytes: u64,
}

impl TransferSummary {
    fn add(&mut self, d: Digest) {
        self.blobs += 1;
        self.bytes += d.size_bytes;
    }
}

impl Store {
    /// A store with no remote.
    pub fn local_only(local: LocalStore) -> Store {
        Store {
            local,
            remote: None,
        }
    }

    /// A store backed by `provider`.
    pub fn with_remote(local: LocalStore, provider: Arc<dyn ByteStoreProvider>) -> Store {
        Store {
            local,
            remote: Some(Arc::new(Remote {
                provider,
                inflight: Mutex::new(HashMap::new()),
                sent: Default::default(),
            })),
        }
    }

    /// The same local store without the remote: what the inner runner gets in `fetch` mode, so
    /// no code below the cache layer can trip over a missing remote blob.
    pub fn into_local_only(&self) -> Store {
        Store::local_only(self.local.clone())
    }

    /// The local half.
    pub fn local(&self) -> &LocalStore {
        &self.local
    }

    /// Blob bytes this store has uploaded to its remote so far (for progress reports).
    pub fn bytes_sent(&self) -> u64 {
        self.remote
            .as_ref()
            .map_or(0, |r| r.sent.load(std::sync::atomic::Ordering::Relaxed))
    }

    /// Whether a remote is attached.
    pub fn has_remote(&self) -> bool {
        self.remote.is_some()
    }

    /// Stores bytes locally. **Blocks** the calling thread while it hashes and writes them
    /// (measured ≈ 300 ms for 64 MiB; a database write of a few µs for small blobs): from async
    /// code, store large buffers with [`store`](Self::store).
    pub fn store_bytes(&self, bytes: &[u8]) -> Result<Digest, StoreError> {
        self.local.store_bytes(bytes)
    }

    /// Stores bytes locally, on a blocking thread when they are pool-sized (so the runtime's
    /// thread never waits for hashing and disk writes); small ones inline.
    pub async fn store(&self, bytes: Bytes) -> Result<Digest, StoreError> {
        if self.local.is_small(bytes.len() as u64) {
            return self.local.store_bytes(&bytes);
        }
        let local = self.local.clone();
        blocking(move || local.store_bytes(&bytes)).await
    }

    /// The blob's bytes, fetching it from the remote if needed; `None` if it is nowhere. A
    /// pool-sized blob is read on a blocking thread (never on the runtime's); for large blobs
    /// prefer [`open_blob`](Self::open_blob), which streams.
    pub async fn load_bytes(&self, digest: Digest) -> Result<Option<Bytes>, StoreError> {
        if let Some(b) = self.load_local(digest).await? {
            return Ok(Some(b));
        }
        if self.download(digest).await? {
            return self.load_local(digest).await;
        }
        Ok(None)
    }

    /// The local copy's bytes: small blobs inline (a database read), pool blobs on a blocking
    /// thread.
    async fn load_local(&self, digest: Digest) -> Result<Option<Bytes>, StoreError> {
        if self.local.is_small(digest.size_bytes) {
            return self.local.load_bytes(digest);
        }
        let local = self.local.clone();
        blocking(move || local.load_bytes(digest)).await
    }

    /// The blob as a stream, fetched from the remote first if it is not local (verified, and
    /// kept in the local store); `MissingDigest` when it is nowhere. A pool blob is read from
    /// its file as the reader asks, in bounded memory; a small one from memory.
    ///
    /// ```no_run
    /// # async fn f(store: store::Store, digest: hashing::Digest) -> Result<(), Box<dyn std::error::Error>> {
    /// use tokio::io::AsyncReadExt as _;
    /// let mut reader = store.open_blob(digest).await?;
    /// let mut first = [0u8; 4096];
    /// let n = reader.read(&mut first).await?;
    /// # Ok(()) }
    /// ```
    pub async fn open_blob(
        &self,
        digest: Digest,
    ) -> Result<Box<dyn tokio::io::AsyncRead + Send + Unpin>, StoreError> {
        self.ensure_local(digest).await?;
        if let Some(path) = self.local.load_file(digest)? {
            let file = tokio::fs::File::open(&path)
                .await
                .map_err(|e| StoreError::io(format!("opening {}", path.display()), e))?;
            return Ok(Box::new(file));
        }
        // Small, or kept compressed: whole, read off the runtime's thread.
        let bytes = self
            .load_local(digest)
            .await?
            .ok_or_else(|| StoreError::missing(digest))?;
        Ok(Box::new(std::io::Cursor::new(bytes)))
    }

    /// Makes sure `digest` is in the local store; a `MissingDigest` error when it is nowhere.
    pub async fn ensure_local(&self, digest: Digest) -> Result<(), StoreError> {
        if self.local.contains(digest) || self.download(digest).await? {
            Ok(())
        } else {
            Err(StoreError::missing(digest))
        }
    }

    /// Downloads `digest` into the local store; `Ok(false)` if the remote lacks it (or there is
    /// no remote). Concurrent calls for one digest share one download.
    async fn download(&self, digest: Digest) -> Result<bool, StoreError> {
        let Some(remote) = &self.remote else {
            return Ok(false);
        };
        let fut: Shared<DownloadFuture> = {
            let mut inflight = remote.inflight.lock().unwrap_or_else(|p| p.into_inner());
            match inflight.get(&digest).and_then(WeakShared::upgrade) {
                Some(running) => running,
                None => {
                    let local = self.local.clone();
                    let remote = remote.clone();
                    let fut: DownloadFuture = async move {
                        let forget = ForgetOnDrop {
                            remote: remote.clone(),
                            digest,
                        };
                        let result = async {
                            let mut dest = local.begin_write(digest).await?;
                            if !remote.provider.load(digest, &mut dest).await? {
                                return Ok(false);
                            }
                            dest.commit().await?;
                            Ok(true)
                        }
                        .await;
                        remote
                            .inflight
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .remove(&digest);
                        drop(forget);
                        result
                    }
                    .boxed();
                    let shared = fut.shared();
                    if let Some(weak) = shared.downgrade() {
                        inflight.insert(digest, weak);
                    }
                    shared
                }
            }
        };
        fut.await
    }

    /// Loads a Directory message (locally or from the remote) and validates it.
    pub async fn load_directory(&self, digest: Digest) -> Result<remexec::Directory, StoreError> {
        self.ensure_local(digest)
            .await
            .map_err(|e| e.context("loading a directory"))?;
        self.local.load_directory(digest)
    }

    /// Walks the directories `roots` (fetching Directory messages as needed, never file
    /// content) and returns every directory digest and every file digest in them.
    pub async fn expand_directories(
        &self,
        roots: impl IntoIterator<Item = Digest>,
    ) -> Result<(HashSet<Digest>, HashSet<Digest>), StoreError> {
        let mut dirs = HashSet::new();
        let mut files = HashSet::new();
        let mut queue: VecDeque<Digest> = roots.into_iter().collect();
        while let Some(d) = queue.pop_front() {
            if !dirs.insert(d) {
                continue;
            }
            let dir = self.load_directory(d).await?;
            for f in &dir.files {
                files.insert(node_digest(f.digest.as_ref())?);
            }
            for sub in &dir.directories {
                queue.push_back(node_digest(sub.digest.as_ref())?);
            }
        }
        Ok((dirs, files))
    }

    /// The file at `path` (`/`-separated, relative) below the directory `root`: its digest and
    /// executable bit, or `None` when there is no file there. Directory messages are fetched
    /// from the remote as needed (a deferred hit's output root, for instance); file content is
    /// not.
    pub async fn file_at(
        &self,
        root: Digest,
        path: &str,
    ) -> Result<Option<(Digest, bool)>, StoreError> {
        let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
        let Some((name, dirs)) = parts.split_last() else {
            return Ok(None);
        };
        let mut current = root;
        for part in dirs {
            let dir = self.load_directory(current).await?;
            match dir.directories.iter().find(|d| d.name == *part) {
                Some(sub) => current = node_digest(sub.digest.as_ref())?,
                None => return Ok(None),
            }
        }
        let dir = self.load_directory(current).await?;
        match dir.files.iter().find(|f| f.name == *name) {
            Some(f) => Ok(Some((node_digest(f.digest.as_ref())?, f.is_executable))),
            None => Ok(None),
        }
    }

    /// The content of the file at `path` below the directory `root`, fetched from the remote if
    /// it is not local (verified, and kept in the local store). `MissingDigest` when the path
    /// names no file or the blob is nowhere. Reads the file whole (a large one on a blocking
    /// thread): to stream a large output, [`file_at`](Self::file_at) then
    /// [`open_blob`](Self::open_blob), or [`materialize`](Self::materialize).
    ///
    /// ```no_run
    /// # async fn f(store: store::Store, output_root: hashing::Digest) -> Result<(), store::StoreError> {
    /// // After a deferred hit: the output is fetched now, verified, and kept locally.
    /// let bytes = store.read_file(output_root, "gen/sub/n.txt").await?;
    /// # Ok(()) }
    /// ```
    pub async fn read_file(&self, root: Digest, path: &str) -> Result<Bytes, StoreError> {
        let (digest, _) = self.file_at(root, path).await?.ok_or_else(|| {
            StoreError::new(
                ErrorKind::MissingDigest(root),
                format!("no file {path:?} in directory {root}"),
            )
        })?;
        self.load_bytes(digest)
            .await?
            .ok_or_else(|| StoreError::missing(digest).context(format!("reading {path:?}")))
    }

    /// Writes the directory `root` to `dest` (which must not exist or be empty), fetching
    /// whatever is not local first (small blobs batched, large ones streamed), then
    /// materializing on a blocking thread (pool files as read-only hardlinks unless
    /// `options.mutable`).
    pub async fn materialize(
        &self,
        root: Digest,
        dest: &std::path::Path,
        options: crate::MaterializeOptions,
    ) -> Result<(), StoreError> {
        self.ensure_downloaded(HashSet::new(), HashSet::from([root]))
            .await?;
        let local = self.local.clone();
        let dest = dest.to_path_buf();
        blocking(move || local.materialize_directory(root, &dest, options)).await
    }

    /// Fetches a REAPI `Tree` blob, validates it, stores its directories locally and returns the
    /// root directory's digest. File content is not fetched.
    pub async fn load_tree(&self, tree_digest: Digest) -> Result<Digest, StoreError> {
        let bytes = self
            .load_bytes(tree_digest)
            .await?
            .ok_or_else(|| StoreError::missing(tree_digest).context("loading an output Tree"))?;
        let tree = remexec::Tree::decode(&bytes[..])
            .map_err(|e| StoreError::invalid(format!("undecodable Tree {tree_digest}: {e}")))?;
        self.local
            .expand_tree(&tree)
            .map_err(|e| e.context(format!("Tree {tree_digest}")))
    }

    /// Makes every file in `files` and every file under the directories `dirs` local: small
    /// blobs in batches, large ones streamed, a bounded number at once. Fails with
    /// `MissingDigest` (naming one missing blob) if the remote lacks any.
    pub async fn ensure_downloaded(
        &self,
        files: HashSet<Digest>,
        dirs: HashSet<Digest>,
    ) -> Result<TransferSummary, StoreError> {
        let (_, dir_files) = self.expand_directories(dirs).await?;
        let all: HashSet<Digest> = files.into_iter().chain(dir_files).collect();
        let wanted = self.local.missing(all);
        let mut summary = TransferSummary::default();
        if wanted.is_empty() {
            return Ok(summary);
        }
        let Some(remote) = &self.remote else {
            return Err(StoreError::missing(wanted[0]));
        };
        let batch_max = remote.provider.max_batch_blob_size();
        let (small, large): (Vec<Digest>, Vec<Digest>) = wanted
            .into_iter()
            .partition(|d| d.size_bytes <= batch_max && self.local.is_small(d.size_bytes));
        // Small blobs: groups of ≤ SMALL_GROUP_BYTES, a few at once, each committed in one
        // transaction as it arrives.
        let groups = crate::group_by_size(small, SMALL_GROUP_BYTES, 0);
        let committed: Vec<TransferSummary> = futures::stream::iter(groups)
            .map(|group| async move {
                let got = remote.provider.load_batch(group.clone()).await?;
                let mut items = Vec::with_capacity(group.len());
                let mut part = TransferSummary::default();
                for d in &group {
                    let bytes = got.get(d).ok_or_else(|| {
                        StoreError::missing(*d).context("the remote cache lost it")
                    })?;
                    items.push((*d, &bytes[..]));
                    part.add(*d);
                }
                // Providers verify every blob of a batch; one local transaction per group
                // (inline: an LMDB commit without fsync costs less than a thread hand-off).
                self.local.put_small_batch(&items)?;
                Ok::<_, StoreError>(part)
            })
            .buffer_unordered(SMALL_GROUP_CONCURRENCY)
            .try_collect()
            .await?;
        for part in committed {
            summary.blobs += part.blobs;
            summary.bytes += part.bytes;
        }
        let fetched: Vec<Digest> = futures::stream::iter(large)
            .map(|d| async move {
                match self.download(d).await? {
                    true => Ok(d),
                    false => Err(StoreError::missing(d).context("the remote cache lost it")),
                }
            })
            .buffer_unordered(TRANSFER_CONCURRENCY)
            .try_collect()
            .await?;
        for d in fetched {
            summary.add(d);
        }
        Ok(summary)
    }

    /// Proves that the remote holds every file in `files` and everything under the directories
    /// `dirs` (whose Directory messages are fetched if needed; file content never is), with as
    /// few `FindMissingBlobs` calls as the message cap allows. `MissingDigest` names a missing one.
    pub async fn exists_recursive(
        &self,
        files: HashSet<Digest>,
        dirs: HashSet<Digest>,
    ) -> Result<(), StoreError> {
        let Some(remote) = &self.remote else {
            return Err(StoreError::new(
                ErrorKind::Other,
                "no remote store to validate against",
            ));
        };
        let expanded = self.expand_directories(dirs).await?;
        let missing = missing_remotely(remote, files, expanded).await?;
        match missing.into_iter().min() {
            None => Ok(()),
            Some(d) => Err(StoreError::missing(d).context("the remote cache does not have it")),
        }
    }

    /// Uploads whatever the remote lacks among `files` and everything under the local
    /// directories `dirs`: `FindMissingBlobs` first, then small blobs from the database and large
    /// ones streamed from the pool.
    pub async fn ensure_remote_has_recursive(
        &self,
        files: HashSet<Digest>,
        dirs: HashSet<Digest>,
    ) -> Result<TransferSummary, StoreError> {
        let Some(remote) = &self.remote else {
            return Err(StoreError::new(
                ErrorKind::Other,
                "no remote store to upload to",
            ));
        };
        // Only local directories can be uploaded: walk them without the remote.
        let expanded = self.into_local_only().expand_directories(dirs).await?;
        let missing = missing_remotely(remote, files, expanded).await?;
        // Small blobs go up in batches (as many per request as the server allows), large
        // ones streamed from the pool, a bounded number at once.
        let batch_max = remote.provider.max_batch_blob_size();
        let (small, large): (Vec<Digest>, Vec<Digest>) = missing
            .into_iter()
            .partition(|d| d.size_bytes <= batch_max && self.local.is_small(d.size_bytes));
        let mut summary = TransferSummary::default();
        for group in crate::group_by_size(small, SMALL_GROUP_BYTES, 0) {
            let mut blobs = Vec::with_capacity(group.len());
            for d in group {
                let bytes = self
                    .local
                    .load_bytes(d)?
                    .ok_or_else(|| StoreError::missing(d).context("uploading to the remote"))?;
                blobs.push((d, bytes));
            }
            let moved: Vec<Digest> = blobs.iter().map(|(d, _)| *d).collect();
            remote.provider.store_batch(blobs).await?;
            for d in moved {
                summary.add(d);
                remote
                    .sent
                    .fetch_add(d.size_bytes, std::sync::atomic::Ordering::Relaxed);
            }
        }
        let uploaded: Vec<Digest> = futures::stream::iter(large)
            .map(|d| async move {
                match self.local.load_file(d)? {
                    Some(path) => {
                        let file = tokio::fs::File::open(&path).await.map_err(|e| {
                            StoreError::io(format!("opening {}", path.display()), e)
                        })?;
                        remote.provider.store_file(d, file).await?;
                    }
                    // A pool compressed at rest has no plain file to stream: decompressed
                    // on a blocking thread, never on the runtime's.
                    None => {
                        let bytes = self.load_local(d).await?.ok_or_else(|| {
                            StoreError::missing(d).context("uploading to the remote")
                        })?;
                        remote.provider.store_bytes(d, bytes).await?;
                    }
                }
                remote
                    .sent
                    .fetch_add(d.size_bytes, std::sync::atomic::Ordering::Relaxed);
                Ok::<_, StoreError>(d)
            })
            .buffer_unordered(TRANSFER_CONCURRENCY)
            .try_collect()
            .await?;
        for d in uploaded {
            summary.add(d);
        }
        Ok(summary)
    }
}

/// Which of `files` and of the expanded directories (their Directory messages and files) the
/// remote lacks, in as few `FindMissingBlobs` calls as the message cap allows.
async fn missing_remotely(
    remote: &Remote,
    mut files: HashSet<Digest>,
    (dirs, dir_files): (HashSet<Digest>, HashSet<Digest>),
) -> Result<HashSet<Digest>, StoreError> {
    files.extend(dir_files);
    files.extend(dirs);
    remote
        .provider
        .list_missing_digests(&mut files.into_iter())
        .await
}

fn node_digest(d: Option<&remexec::Digest>) -> Result<Digest, StoreError> {
    hashing::reapi::require_digest("digest", d).map_err(|e| StoreError::invalid(e.to_string()))
}
