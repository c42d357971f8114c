//! Write-behind for the small blobs a cache hit stores.
//!
//! A fetch hit stores its outputs, and every hit the Directory messages of its output root, in
//! the LMDB database. On this project's machines that commit was the largest part of a hit's own
//! cost (≈ 48 µs when LMDB reuses freed pages, ≈ 160 µs while the file grows: ext4's buffered
//! write path at ≈ 10 µs a page, and a 4 KiB value takes two). None of it has to happen before
//! the hit returns: the bytes are verified, and the store only has to *serve* them.
//!
//! So [`LocalStore::put_small_batch`](super::LocalStore) hands a batch to this module: the blobs
//! go into an in-memory map that every read of the store consults first, and one committer
//! thread per store writes them to the database, then drops them from the map. It gathers for
//! [`GATHER_FOR`] after the first blob arrives, so one transaction carries several hits.
//!
//! The rules that keep it a store:
//! - **Readers look here first, then in the database.** A blob leaves the map only after its
//!   transaction committed, so a reader never finds it in neither place.
//! - **Bounded.** At most [`MAX_PENDING_BYTES`] wait; a batch that does not fit is committed by
//!   its caller, as before (back-pressure, never unbounded memory).
//! - **Failures keep the bytes.** A commit that fails (a full disk) leaves the blobs in the map,
//!   still served to this process, and sends later batches back to their callers' own commits,
//!   whose errors they see. The next commit that succeeds resumes the thread.
//! - **Removal wins.** [`WriteBehind::forget`] holds the commit lock while a blob is dropped from
//!   the map and then from the database, so a committer cannot write it back afterwards.
//! - **Closing drains.** The store's drop stops the thread (joining it) and commits what is left
//!   before it records access times and syncs. The thread owns no handle to the store itself,
//!   only the database, so the store always closes on the thread that drops it.
//! - Other processes sharing the store see a blob once it is committed, up to [`GATHER_FOR`]
//!   after this process could: for them it is as if the hit had happened that much later.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;

use bytes::Bytes;
use hashing::{Digest, Fingerprint};

use super::Accounting;
use super::small::{Counters, SmallDb};
use crate::error::StoreError;

/// Bytes of blobs that may wait for their commit. A hit's small outputs are at most a few MiB;
/// this lets a burst of hits run ahead of the disk without letting memory grow with it.
const MAX_PENDING_BYTES: u64 = 32 << 20;

/// How long the committer gathers blobs after the first one arrives, unless
/// [`GATHER_BYTES`] arrive sooner: one commit then carries several hits (at one hit a
/// millisecond, about five), which costs fewer pages, and fewer wake-ups, than one each.
/// Only other processes sharing the store wait for it.
const GATHER_FOR: std::time::Duration = std::time::Duration::from_millis(5);
const GATHER_BYTES: u64 = 4 << 20;

/// What the committer writes with: the database and the books a growth transaction keeps.
#[derive(Debug)]
pub(crate) struct Books {
    pub db: Arc<SmallDb>,
    pub accounting: Arc<Mutex<Accounting>>,
    pub generation: Arc<AtomicU64>,
    pub max_size: Option<u64>,
}

#[derive(Debug, Default)]
struct State {
    /// Blobs waiting for their commit, by fingerprint (the bytes give the size).
    pending: HashMap<Fingerprint, Bytes>,
    bytes: u64,
    /// The last commit failed: batches go to their callers until one succeeds.
    failed: bool,
    /// A commit took the store over its size bound: the next caller runs the GC.
    over_bound: Option<Counters>,
    stop: bool,
}

#[derive(Debug)]
struct Shared {
    books: Books,
    state: Mutex<State>,
    /// Wakes the committer: work arrived, or stop.
    wake: Condvar,
    /// Held from taking a batch until its blobs are committed and dropped from the map.
    commit: Mutex<()>,
}

/// The write-behind of one store (see the module docs).
#[derive(Debug)]
pub(crate) struct WriteBehind {
    shared: Arc<Shared>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl WriteBehind {
    pub(crate) fn new(books: Books) -> WriteBehind {
        WriteBehind {
            shared: Arc::new(Shared {
                books,
                state: Mutex::new(State::default()),
                wake: Condvar::new(),
                commit: Mutex::new(()),
            }),
            thread: Mutex::new(None),
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.shared.state()
    }

    /// Takes verified, absent blobs for a later commit. `false`: not taken (the map is full,
    /// the last commit failed, or the store is closing): the caller commits them itself.
    pub(crate) fn defer(&self, items: &[(Digest, &[u8])]) -> bool {
        let size: u64 = items.iter().map(|(d, _)| d.size_bytes).sum();
        {
            let mut st = self.state();
            if st.failed || st.stop || st.bytes + size > MAX_PENDING_BYTES {
                return false;
            }
            let was_empty = st.pending.is_empty();
            for (d, data) in items {
                if st
                    .pending
                    .insert(d.hash, Bytes::copy_from_slice(data))
                    .is_none()
                {
                    st.bytes += d.size_bytes;
                }
            }
            // The committer needs waking only for its first blob, or to stop gathering.
            if !was_empty && st.bytes < GATHER_BYTES {
                return true;
            }
        }
        self.shared.wake.notify_one();
        self.ensure_thread();
        true
    }

    /// Starts the committer on first use (a store that never defers has no thread).
    fn ensure_thread(&self) {
        let mut thread = self.thread.lock().unwrap_or_else(|p| p.into_inner());
        if thread.is_some() {
            return;
        }
        let shared = self.shared.clone();
        match std::thread::Builder::new()
            .name("recache-store-commit".into())
            .spawn(move || shared.run())
        {
            Ok(handle) => *thread = Some(handle),
            // No thread: commit here and now, as without write-behind.
            Err(e) => {
                tracing::warn!(error = %e, "could not start the store's commit thread");
                drop(thread);
                if let Err(e) = self.flush() {
                    tracing::warn!(error = %e, "could not store fetched blobs");
                }
            }
        }
    }

    /// The blob, if it waits here.
    pub(crate) fn get(&self, digest: Digest) -> Option<Bytes> {
        let st = self.state();
        st.pending
            .get(&digest.hash)
            .filter(|b| b.len() as u64 == digest.size_bytes)
            .cloned()
    }

    /// The size of the waiting blob whose SHA-256 is `hash`.
    pub(crate) fn size_of_hash(&self, hash: &Fingerprint) -> Option<u64> {
        self.state().pending.get(hash).map(|b| b.len() as u64)
    }

    /// `digests` without those waiting here (check these before the database: see the module
    /// docs).
    pub(crate) fn not_waiting(&self, digests: Vec<Digest>) -> Vec<Digest> {
        let st = self.state();
        if st.pending.is_empty() {
            return digests;
        }
        digests
            .into_iter()
            .filter(|d| {
                st.pending
                    .get(&d.hash)
                    .is_none_or(|b| b.len() as u64 != d.size_bytes)
            })
            .collect()
    }

    /// Drops `digests` from the map and returns the commit lock: hold it while removing them
    /// from the database, so no commit writes them back.
    pub(crate) fn forget(&self, digests: &[Digest]) -> MutexGuard<'_, ()> {
        let guard = self.shared.commit_lock();
        let mut st = self.state();
        for d in digests {
            if let Some(b) = st.pending.remove(&d.hash) {
                st.bytes -= b.len() as u64;
            }
        }
        guard
    }

    /// Commits everything waiting, on the caller's thread.
    pub(crate) fn flush(&self) -> Result<(), StoreError> {
        let _commit = self.shared.commit_lock();
        self.shared.commit_waiting()
    }

    /// A commit took the store over its bound since the last call: its totals.
    pub(crate) fn take_over_bound(&self) -> Option<Counters> {
        self.state().over_bound.take()
    }

    /// A commit of the caller's own succeeded: the database takes writes again.
    pub(crate) fn recovered(&self) {
        let resume = std::mem::take(&mut self.state().failed);
        if resume {
            self.shared.wake.notify_one();
        }
    }

    /// Stops and joins the committer, then commits what is left. Called by the store's drop.
    pub(crate) fn close(&self) {
        self.state().stop = true;
        self.shared.wake.notify_all();
        let handle = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(h) = handle {
            let _ = h.join();
        }
        if let Err(e) = self.flush() {
            tracing::warn!(error = %e, "could not store fetched blobs when closing the store");
        }
    }
}

impl Shared {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn commit_lock(&self) -> MutexGuard<'_, ()> {
        self.commit.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The committer: one transaction per gathering, until stopped.
    fn run(&self) {
        loop {
            {
                let mut st = self.state();
                while (st.pending.is_empty() || st.failed) && !st.stop {
                    st = self.wake.wait(st).unwrap_or_else(|p| p.into_inner());
                }
                if st.stop {
                    return; // `close` commits the rest
                }
                // Gather the next hits' blobs too: one commit for several.
                let (st, _) = self
                    .wake
                    .wait_timeout_while(st, GATHER_FOR, |st| st.bytes < GATHER_BYTES && !st.stop)
                    .unwrap_or_else(|p| p.into_inner());
                if st.stop {
                    return;
                }
            }

            let _commit = self.commit_lock();
            if let Err(e) = self.commit_waiting() {
                tracing::warn!(
                    error = %e,
                    "could not commit cache hits' blobs to the local store; this process keeps serving them from memory"
                );
            }
        }
    }

    /// Commits every waiting blob in one transaction (the caller holds the commit lock), as a
    /// growth transaction does: under the accounting lock, moving the generation.
    fn commit_waiting(&self) -> Result<(), StoreError> {
        let batch: Vec<(Digest, Bytes)> = {
            let st = self.state();
            st.pending
                .iter()
                .map(|(h, b)| (Digest::new(*h, b.len() as u64), b.clone()))
                .collect()
        };
        if batch.is_empty() {
            return Ok(());
        }
        let items: Vec<(Digest, &[u8])> = batch.iter().map(|(d, b)| (*d, &b[..])).collect();
        let Books {
            db,
            accounting,
            generation,
            max_size,
        } = &self.books;
        let committed = super::growing_in(
            accounting,
            generation,
            items.iter().map(|(d, _)| *d),
            || db.put_many(&items, super::now_millis()),
        );
        // As after any growth (`LocalStore::after_growth`).
        generation.fetch_add(1, Ordering::AcqRel);
        let mut st = self.state();
        match committed {
            Ok(totals) => {
                for (d, _) in &batch {
                    if st.pending.remove(&d.hash).is_some() {
                        st.bytes -= d.size_bytes;
                    }
                }
                if max_size.is_some_and(|m| totals.total_bytes() > m) {
                    st.over_bound = Some(totals);
                }
                Ok(())
            }
            Err(e) => {
                st.failed = true;
                Err(e)
            }
        }
    }
}
