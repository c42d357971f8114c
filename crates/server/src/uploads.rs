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
//! What `committed_size` means: the bytes the writer thread has taken (they are in its channel
//! or past it), never more. A message is counted only once its send to the writer completed;
//! a call cancelled while that send waits drops the message uncounted, so a resume at the
//! reported offset sends it again.
//!
//! The writer's input ends only with an explicit [`Piece::End`], sent after the message that
//! carried `finish_write`. A channel that closes without it (an abandoned upload) is an error
//! for the writer, so an abandoned upload never commits, even one whose every byte arrived:
//! what a client is told ("nothing was stored yet") is what happens.
//!
//! Bounds: at most [`MAX_PAUSED`] paused uploads (the oldest is abandoned for a newer one), each
//! abandoned after [`PAUSE_TTL`]; abandoning one closes its channel, so its writer stores
//! nothing and releases its temp file and reserved space. A paused writer holds its blob's
//! write lock, so a paused upload never stands in the way of an active upload of the same blob:
//! a fresh upload abandons the paused ones of its blob, and an upload whose call ends while
//! another upload of the same blob is active is abandoned instead of paused (decided under one
//! lock, so neither order of the two events leaves a complete upload waiting).

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

/// What the `Write` handler sends its writer thread.
#[derive(Debug)]
pub(crate) enum Piece {
    /// The next bytes of the stream.
    Bytes(bytes::Bytes),
    /// The client finished the write (`finish_write`): the input ends here. A channel that
    /// closes without this was abandoned.
    End,
}

/// One upload in progress: the sending half of its writer's input, and the writer.
#[derive(Debug)]
pub(crate) struct Upload {
    pub digest: Digest,
    /// Bytes of the stream (compressed bytes for a compressed upload) handed to the writer so
    /// far: what `QueryWriteStatus` reports and where a resume starts.
    pub received: i64,
    pub tx: tokio::sync::mpsc::Sender<Piece>,
    pub writer: tokio::task::JoinHandle<Result<(), StoreError>>,
    /// Set by the writer when the client's bytes cannot be decoded (a client error).
    pub refused: Arc<Mutex<Option<String>>>,
    pub _room: Reservation,
    /// Its place in the S3 upload queue, when there is an S3 tier (held while paused too).
    pub admission: Option<crate::tier::Admission>,
    /// Counted as an upload in flight while it lives.
    pub _in_flight: crate::metrics::InFlight,
}

#[derive(Debug)]
struct Paused {
    upload: Upload,
    since: Instant,
    id: u64,
}

/// Paused uploads by resource name, and how many `Write` calls are feeding an upload of each
/// blob right now.
#[derive(Debug, Default)]
pub(crate) struct PausedUploads {
    state: Mutex<State>,
    next_id: std::sync::atomic::AtomicU64,
}

#[derive(Debug, Default)]
struct State {
    map: HashMap<String, Paused>,
    active: HashMap<Digest, usize>,
}

/// A `Write` call feeding an upload of `digest`; counted until dropped.
#[derive(Debug)]
pub(crate) struct Active {
    digest: Digest,
    uploads: Arc<PausedUploads>,
}

impl Drop for Active {
    fn drop(&mut self) {
        let mut state = self.uploads.lock();
        if let Some(n) = state.active.get_mut(&self.digest) {
            *n -= 1;
            if *n == 0 {
                state.active.remove(&self.digest);
            }
        }
    }
}

impl PausedUploads {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A fresh upload of `digest` begins: paused uploads of it are abandoned (their writers
    /// hold the blob's write lock), and it counts as active until the token is dropped.
    pub fn begin(self: &Arc<Self>, digest: Digest) -> Active {
        let abandoned: Vec<Paused> = {
            let mut state = self.lock();
            *state.active.entry(digest).or_default() += 1;
            let names: Vec<String> = state
                .map
                .iter()
                .filter(|(_, p)| p.upload.digest == digest)
                .map(|(k, _)| k.clone())
                .collect();
            names
                .into_iter()
                .filter_map(|k| state.map.remove(&k))
                .collect()
        };
        drop(abandoned); // outside the lock
        Active {
            digest,
            uploads: self.clone(),
        }
    }

    /// Resumes the paused upload of `name`, if any: it is active again from here.
    pub fn resume(self: &Arc<Self>, name: &str) -> Option<(Upload, Active)> {
        let mut state = self.lock();
        let paused = state.map.remove(name)?;
        let digest = paused.upload.digest;
        *state.active.entry(digest).or_default() += 1;
        Some((
            paused.upload,
            Active {
                digest,
                uploads: self.clone(),
            },
        ))
    }

    /// The call feeding `upload` (counted by `me`) ended before it finished: keeps the upload
    /// for a later `Write` of `name` to resume, unless another upload of the same blob is
    /// active (then this one is abandoned: its writer must not hold the blob's write lock
    /// against a client that is sending the whole blob).
    pub fn pause_or_abandon(self: &Arc<Self>, name: String, upload: Upload, me: &Active) {
        self.pause_unless(name, upload, Some(me));
    }

    /// Keeps `upload` for a later `Write` of `name` to resume (replacing an older pause of it).
    pub fn pause(self: &Arc<Self>, name: String, upload: Upload) {
        self.pause_unless(name, upload, None);
    }

    fn pause_unless(self: &Arc<Self>, name: String, upload: Upload, me: Option<&Active>) {
        let id = self
            .next_id
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        {
            let mut state = self.lock();
            // Checked under the same lock `begin` takes: a fresh upload either sees this pause
            // (and abandons it) or is seen here.
            if let Some(me) = me
                && state.active.get(&me.digest).copied().unwrap_or(0) > 1
            {
                drop(state);
                tracing::debug!(resource = %name, "upload abandoned: another upload of its blob is active");
                drop(upload);
                return;
            }
            let map = &mut state.map;
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
                    let mut state = me.lock();
                    if state.map.get(&name).is_some_and(|p| p.id == id) {
                        tracing::debug!(resource = %name, "paused upload abandoned");
                        state.map.remove(&name);
                    }
                }
            });
        }
    }

    /// Paused uploads held now.
    pub fn len(&self) -> usize {
        self.lock().map.len()
    }

    /// Bytes received by the paused upload of `name`, if there is one.
    pub fn received(&self, name: &str) -> Option<i64> {
        self.lock().map.get(name).map(|p| p.upload.received)
    }

    /// Abandons every paused upload of `digest` (it is stored: nothing to resume).
    pub fn abandon_digest(&self, digest: Digest) {
        self.lock().map.retain(|_, p| p.upload.digest != digest);
    }

    /// Abandons every paused upload (their reserved space is wanted).
    pub fn abandon_all(&self) -> usize {
        let mut state = self.lock();
        let n = state.map.len();
        state.map.clear();
        n
    }
}
