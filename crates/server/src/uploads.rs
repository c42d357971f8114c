//! ByteStream uploads in progress, and the paused ones a client may resume.
//!
//! An upload is a blocking writer thread (hashing, compressing or not, fsyncing, committing
//! only a verified blob) fed through a 2-message channel by the `Write` handler. When the
//! client's stream breaks before `finish_write` (a reset connection, a cancelled call, a
//! stream that just ends), the upload is not thrown away: it is *paused* under its resource
//! name, writer and temp file still open, for [`PAUSE_TTL`]. `QueryWriteStatus` on that name
//! reports the bytes received so far, and a `Write` of the same name at that `write_offset`
//! carries on where the last one stopped (REAPI's resumable upload). Nothing of a paused upload
//! is visible: the blob is committed only when the whole of it arrives and verifies.
//!
//! Bounds: at most [`MAX_PAUSED`] paused uploads (the oldest is abandoned for a newer one), each
//! abandoned after [`PAUSE_TTL`]; abandoning one closes its channel, so its writer sees a short
//! blob, stores nothing and releases its temp file and reserved space. A new upload of a blob
//! abandons any paused upload of the same blob (the paused writer holds the blob's write lock,
//! which the new one would otherwise wait behind).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hashing::Digest;
use store::StoreError;

use crate::Reservation;

/// How long a paused upload waits for its client to resume it.
pub(crate) const PAUSE_TTL: Duration = Duration::from_secs(120);

/// Paused uploads kept at once (each holds a blocking thread, a temp file and its reservation).
pub(crate) const MAX_PAUSED: usize = 64;

/// One upload in progress: the sending half of its writer's input, and the writer.
#[derive(Debug)]
pub(crate) struct Upload {
    pub digest: Digest,
    /// Bytes of the stream (compressed bytes for a compressed upload) received so far.
    pub received: i64,
    pub tx: tokio::sync::mpsc::Sender<Vec<u8>>,
    pub writer: tokio::task::JoinHandle<Result<(), StoreError>>,
    /// Set by the writer when the client's bytes cannot be decoded (a client error).
    pub refused: Arc<Mutex<Option<String>>>,
    pub _room: Reservation,
    /// Its place in the S3 upload queue, when there is an S3 tier (held while paused too).
    pub admission: Option<crate::tier::Admission>,
}

#[derive(Debug)]
struct Paused {
    upload: Upload,
    since: Instant,
    id: u64,
}

/// Paused uploads by resource name.
#[derive(Debug, Default)]
pub(crate) struct PausedUploads {
    map: Mutex<HashMap<String, Paused>>,
    next_id: std::sync::atomic::AtomicU64,
}

impl PausedUploads {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Paused>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Keeps `upload` for a later `Write` of `name` to resume (replacing an older pause of it).
    pub fn pause(self: &Arc<Self>, name: String, upload: Upload) {
        let id = self
            .next_id
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        {
            let mut map = self.lock();
            // Dropping an upload only closes its channel and releases its reservation: cheap
            // enough under the lock.
            map.retain(|_, p| p.since.elapsed() < PAUSE_TTL);
            while map.len() >= MAX_PAUSED {
                let Some(oldest) = map
                    .iter()
                    .min_by_key(|(_, p)| p.since)
                    .map(|(k, _)| k.clone())
                else {
                    break;
                };
                map.remove(&oldest);
            }
            tracing::debug!(resource = %name, received = upload.received, "upload paused");
            map.insert(
                name.clone(),
                Paused {
                    upload,
                    since: Instant::now(),
                    id,
                },
            );
        }
        // The reaper: abandons this pause if no one resumed it in time.
        let me = Arc::downgrade(self);
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                tokio::time::sleep(PAUSE_TTL).await;
                if let Some(me) = me.upgrade() {
                    let mut map = me.lock();
                    if map.get(&name).is_some_and(|p| p.id == id) {
                        tracing::debug!(resource = %name, "paused upload abandoned");
                        map.remove(&name);
                    }
                }
            });
        }
    }

    /// Takes the paused upload of `name`, if any.
    pub fn take(&self, name: &str) -> Option<Upload> {
        self.lock().remove(name).map(|p| p.upload)
    }

    /// Bytes received by the paused upload of `name`, if there is one.
    pub fn received(&self, name: &str) -> Option<i64> {
        self.lock().get(name).map(|p| p.upload.received)
    }

    /// Abandons every paused upload of `digest` (a new upload of it is starting).
    pub fn abandon_digest(&self, digest: Digest) {
        self.lock().retain(|_, p| p.upload.digest != digest);
    }

    /// Abandons every paused upload (their reserved space is wanted).
    pub fn abandon_all(&self) -> usize {
        let mut map = self.lock();
        let n = map.len();
        map.clear();
        n
    }
}
