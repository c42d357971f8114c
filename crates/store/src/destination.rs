//! Where a download streams to: an object-safe sink that commits only verified content.

use std::io;
use std::path::PathBuf;
use std::pin::Pin;
use std::task::{Context, Poll};

use async_trait::async_trait;
use hashing::{Digest, Hasher};
use tokio::io::{AsyncSeekExt, AsyncWrite, AsyncWriteExt};

use crate::error::StoreError;
use crate::local::LocalStore;
use crate::local::pool::{InFlightGuard, WritingBack};

/// A sink a provider streams a blob into. Object-safe, so providers take
/// `&mut dyn LoadDestination` and live behind `Arc<dyn …>`.
///
/// A provider that retries a download calls [`reset`](LoadDestination::reset) first, so the
/// destination never holds a mix of two attempts.
#[async_trait]
pub trait LoadDestination: AsyncWrite + Send + Unpin {
    /// Discards everything written so far.
    async fn reset(&mut self) -> io::Result<()>;
}

/// A [`LoadDestination`] into the local store, made by [`LocalStore::begin_write`].
///
/// Small blobs are buffered in memory and land in the database; pool-sized blobs stream into a
/// temp file in the pool, hashed as they are written. Nothing is visible in the store until
/// [`commit`](LocalDestination::commit) has verified the digest; dropping the destination without
/// committing discards it.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// use tokio::io::AsyncWriteExt;
/// let dir = tempfile::tempdir().unwrap();
/// let store = store::LocalStore::open(store::LocalStoreOptions::new(dir.path())).unwrap();
/// let digest = hashing::Digest::of_bytes(b"downloaded");
///
/// let mut dest = store.begin_write(digest).await.unwrap();
/// dest.write_all(b"downloaded").await.unwrap();
/// dest.commit().await.unwrap();
/// assert_eq!(store.load_bytes(digest).unwrap().unwrap(), &b"downloaded"[..]);
/// # }
/// ```
#[derive(Debug)]
pub struct LocalDestination {
    store: LocalStore,
    expected: Digest,
    written: u64,
    sink: Sink,
}

#[derive(Debug)]
enum Sink {
    Memory(Vec<u8>),
    Pool(Box<PoolSink>),
    Compressed(Box<CompressedSink>),
}

/// A pool temp file compressed at rest (`PoolCompression::Zstd`): logical bytes are hashed, then
/// compressed into 1 MiB frames as they arrive (synchronously: a frame at a time, ≈ 3 ms). The
/// file's pages are handed to the disk as they are written ([`WritingBack`]), so the fsync at
/// commit does not flush the whole blob at once.
#[derive(Debug)]
struct CompressedSink {
    writer: Option<CompressedWriter>,
    temp: PathBuf,
    hasher: Hasher,
    committed: bool,
    _guard: InFlightGuard,
}

type CompressedWriter =
    crate::local::zstd_blob::Writer<std::io::BufWriter<WritingBack<std::fs::File>>>;

impl CompressedSink {
    fn writer(&mut self) -> io::Result<&mut CompressedWriter> {
        self.writer
            .as_mut()
            .ok_or_else(|| io::Error::other("the compressed destination is closed"))
    }
}

#[derive(Debug)]
struct PoolSink {
    file: tokio::fs::File,
    temp: PathBuf,
    hasher: Hasher,
    committed: bool,
    _guard: InFlightGuard,
}

impl LocalDestination {
    pub(crate) async fn new(
        store: LocalStore,
        expected: Digest,
    ) -> Result<LocalDestination, StoreError> {
        let sink = if store.is_small(expected.size_bytes) {
            // Capacity is a hint from untrusted input: cap it.
            Sink::Memory(Vec::with_capacity(
                expected.size_bytes.min(64 * 1024) as usize
            ))
        } else if store.pool().compressed() {
            let guard = store.pool().lock(expected).await;
            let (temp, file) = store.pool().create_temp()?;
            Sink::Compressed(Box::new(CompressedSink {
                writer: Some(crate::local::zstd_blob::Writer::new(
                    std::io::BufWriter::with_capacity(1 << 20, WritingBack::new(file)),
                )),
                temp,
                hasher: Hasher::new(),
                committed: false,
                _guard: guard,
            }))
        } else {
            let guard = store.pool().lock(expected).await;
            // Locked (flock) until this destination is committed or dropped.
            let (temp, file) = store.pool().create_temp()?;
            let file = tokio::fs::File::from_std(file);
            Sink::Pool(Box::new(PoolSink {
                file,
                temp,
                hasher: Hasher::new(),
                committed: false,
                _guard: guard,
            }))
        };
        Ok(LocalDestination {
            store,
            expected,
            written: 0,
            sink,
        })
    }

    /// The digest this destination will accept.
    pub fn expected(&self) -> Digest {
        self.expected
    }

    /// Whether what was written so far is the whole expected blob, without committing it: a
    /// proxy can hand the last bytes on to its reader once they verify, and make them durable
    /// afterwards. [`commit`](LocalDestination::commit) checks again (an error here is the one
    /// commit would give).
    pub fn verify(&self) -> Result<(), StoreError> {
        let actual = match &self.sink {
            Sink::Memory(buf) => Digest::of_bytes(buf),
            Sink::Pool(sink) => sink.hasher.clone().finish(),
            Sink::Compressed(sink) => sink.hasher.clone().finish(),
        };
        check(self.expected, actual)
    }

    /// Verifies what was written against the expected digest and commits it to the store.
    /// On a mismatch nothing is committed and the error kind is `InvalidData`.
    pub async fn commit(mut self) -> Result<Digest, StoreError> {
        let expected = self.expected;
        match &mut self.sink {
            Sink::Memory(buf) => {
                let actual = Digest::of_bytes(buf);
                check(expected, actual)?;
                self.store.put_small(expected, buf)?;
            }
            Sink::Pool(sink) => {
                let PoolSink {
                    file,
                    temp,
                    hasher,
                    committed,
                    ..
                } = sink.as_mut();
                let io_err =
                    |what: &str, e| StoreError::io(format!("{what} {}", temp.display()), e);
                file.flush().await.map_err(|e| io_err("writing", e))?;
                file.sync_all().await.map_err(|e| io_err("fsync", e))?;
                let actual = std::mem::take(hasher).finish();
                check(expected, actual)?;
                // Leased from the rename until it is recorded: a GC running meanwhile (another
                // write's size bound) must not evict a blob in the instant it becomes visible.
                let _lease = self.store.lease([expected]);
                let is_new = self.store.pool().commit_temp(
                    temp,
                    &expected,
                    crate::local::pool::Stored::Plain,
                )?;
                *committed = true;
                self.store.note_pool_added(expected, is_new)?;
            }
            Sink::Compressed(sink) => {
                let temp = sink.temp.clone();
                let io_err =
                    |what: &str, e| StoreError::io(format!("{what} {}", temp.display()), e);
                let actual = std::mem::take(&mut sink.hasher).finish();
                check(expected, actual)?;
                let writer = sink
                    .writer
                    .take()
                    .ok_or_else(|| StoreError::invalid("destination already closed"))?;
                let (buffered, stored) = writer.finish().map_err(|e| io_err("writing", e))?;
                let file = buffered
                    .into_inner()
                    .map_err(|e| io_err("writing", e.into_error()))?
                    .into_file();
                file.sync_all().map_err(|e| io_err("fsync", e))?;
                let _lease = self.store.lease([expected]);
                let is_new = self.store.pool().commit_temp(&temp, &expected, stored)?;
                sink.committed = true;
                drop(file);
                self.store.note_pool_added(expected, is_new)?;
            }
        }
        Ok(expected)
    }
}

fn check(expected: Digest, actual: Digest) -> Result<(), StoreError> {
    if actual == expected {
        Ok(())
    } else if actual.size_bytes != expected.size_bytes {
        Err(StoreError::invalid(format!(
            "blob {expected} is truncated: received {} bytes",
            actual.size_bytes
        )))
    } else {
        Err(StoreError::invalid(format!(
            "blob {expected} is corrupt: received content hashes to {}",
            actual.hash
        )))
    }
}

impl Drop for LocalDestination {
    fn drop(&mut self) {
        match &self.sink {
            Sink::Pool(sink) if !sink.committed => {
                let _ = std::fs::remove_file(&sink.temp);
            }
            Sink::Compressed(sink) if !sink.committed => {
                let _ = std::fs::remove_file(&sink.temp);
            }
            _ => {}
        }
    }
}

impl AsyncWrite for LocalDestination {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.written + buf.len() as u64 > this.expected.size_bytes {
            // Refuse before writing: an oversized stream must not fill the disk.
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "blob {} is too long: received more than {} bytes",
                    this.expected, this.expected.size_bytes
                ),
            )));
        }
        let n = match &mut this.sink {
            Sink::Memory(v) => {
                v.extend_from_slice(buf);
                buf.len()
            }
            Sink::Pool(sink) => match Pin::new(&mut sink.file).poll_write(cx, buf) {
                Poll::Ready(Ok(n)) => {
                    sink.hasher.update(&buf[..n]);
                    n
                }
                other => return other,
            },
            Sink::Compressed(sink) => {
                use std::io::Write;
                sink.writer()?.write_all(buf)?;
                sink.hasher.update(buf);
                buf.len()
            }
        };
        this.written += n as u64;
        this.store.note_received(n as u64);
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().sink {
            Sink::Memory(_) | Sink::Compressed(_) => Poll::Ready(Ok(())),
            Sink::Pool(sink) => Pin::new(&mut sink.file).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().sink {
            Sink::Memory(_) | Sink::Compressed(_) => Poll::Ready(Ok(())),
            Sink::Pool(sink) => Pin::new(&mut sink.file).poll_shutdown(cx),
        }
    }
}

#[async_trait]
impl LoadDestination for LocalDestination {
    async fn reset(&mut self) -> io::Result<()> {
        self.written = 0;
        match &mut self.sink {
            Sink::Memory(v) => v.clear(),
            Sink::Pool(sink) => {
                sink.file.flush().await?;
                sink.file.set_len(0).await?;
                sink.file.seek(io::SeekFrom::Start(0)).await?;
                sink.hasher = Hasher::new();
            }
            Sink::Compressed(sink) => {
                use std::io::Seek;
                // Start the temp file over: truncate it and begin a fresh frame sequence.
                let writer = sink
                    .writer
                    .take()
                    .ok_or_else(|| io::Error::other("the compressed destination is closed"))?;
                let mut file = writer
                    .finish()?
                    .0
                    .into_inner()
                    .map_err(|e| e.into_error())?
                    .into_file();
                file.set_len(0)?;
                file.seek(io::SeekFrom::Start(0))?;
                sink.writer = Some(crate::local::zstd_blob::Writer::new(
                    std::io::BufWriter::with_capacity(1 << 20, WritingBack::new(file)),
                ));
                sink.hasher = Hasher::new();
            }
        }
        Ok(())
    }
}
