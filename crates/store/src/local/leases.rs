//! Leases: blobs a process is using, kept from every GC of the store, in this process and in
//! every other process that has the same store open.
//!
//! ```text
//! leases/lock                  GC holds it exclusively (flock) while it decides and deletes a
//!                              batch; a process recording new leases holds it shared meanwhile
//! leases/<pid>-<nonce>.holder  one per open store that has leased something: the digests it
//!                              leases, 40-byte records (hash, size little-endian); flock'd
//!                              exclusively by its process for as long as the store is open
//! leases/.tmp-<pid>-<nonce>    a holder being created (locked, then renamed to `.holder`)
//! ```
//!
//! The rule, for every process: **a blob is leased once its record is in a live holder file,
//! and a GC deletes nothing it has not checked against every live holder under the exclusive
//! lock.** So a lease recorded before a GC batch protects the blob; a lease recorded after it
//! may find the blob already gone, which is why a caller leases first and then checks that what
//! it needs is there ([`LocalStore::lease_tree`](super::LocalStore::lease_tree)), fetching or
//! re-storing what is not.
//!
//! A holder is live while its lock is held; the lock goes with its process (a crash, kill -9),
//! so a GC that can take a holder's lock removes the file: stale holders never pin anything.
//! Released leases stay in the file until it is compacted (when it has more released records
//! than live ones), so a holder over-approximates what its process uses, never the reverse.
//! A store whose directory cannot take the files (read-only, full) keeps its leases in memory,
//! with one warning: this process's GC still honours them.

use std::collections::{HashMap, HashSet};
use std::fs;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use hashing::{Digest, Fingerprint};

use crate::error::StoreError;

/// Bytes of one record: the hash, then the size (u64 little-endian).
const RECORD: usize = 40;
/// A holder file is rewritten with only its live leases once it holds more than this many
/// released records (and more released than live ones).
const COMPACT_AFTER: usize = 4096;
const HOLDER_SUFFIX: &str = ".holder";
const TEMP_PREFIX: &str = ".tmp-";

/// The leases of one open store (see the module docs).
#[derive(Debug)]
pub(crate) struct Leases {
    dir: PathBuf,
    /// `dir` is known to exist (saves a mkdir per lease).
    dir_made: std::sync::atomic::AtomicBool,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    /// Leased digests and how many leases hold each.
    counts: HashMap<Digest, usize>,
    /// This process's holder file, created by the first lease.
    holder: Option<Holder>,
    /// The holder could not be created or written: leases are this process's only.
    local_only: bool,
    /// Records in the holder file (live and released).
    records: usize,
}

#[derive(Debug)]
struct Holder {
    file: fs::File,
    path: PathBuf,
}

fn record(d: &Digest) -> [u8; RECORD] {
    let mut r = [0u8; RECORD];
    r[..32].copy_from_slice(d.hash.as_bytes());
    r[32..].copy_from_slice(&d.size_bytes.to_le_bytes());
    r
}

fn parse_records(bytes: &[u8], out: &mut HashSet<Digest>) {
    for r in bytes.chunks_exact(RECORD) {
        let mut hash = [0u8; 32];
        hash.copy_from_slice(&r[..32]);
        let mut size = [0u8; 8];
        size.copy_from_slice(&r[32..]);
        out.insert(Digest::new(Fingerprint(hash), u64::from_le_bytes(size)));
    }
}

impl Leases {
    /// The leases of the store at `root` (nothing is created until something is leased).
    pub(crate) fn new(root: &Path) -> Leases {
        Leases {
            dir: root.join("leases"),
            dir_made: std::sync::atomic::AtomicBool::new(false),
            state: Mutex::new(State::default()),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The lock GC takes exclusively, opened anew (each opening is its own flock).
    fn gate(&self) -> std::io::Result<fs::File> {
        use std::sync::atomic::Ordering;
        if !self.dir_made.load(Ordering::Relaxed) {
            fs::create_dir_all(&self.dir)?;
            self.dir_made.store(true, Ordering::Relaxed);
        }
        // flock needs no write access: another user's store can be locked read-only.
        let path = self.dir.join("lock");
        match fs::File::open(&path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => fs::File::options()
                .write(true)
                .create(true)
                .truncate(false)
                .open(&path),
            opened => opened,
        }
    }

    /// Records leases on `digests` (one more per digest) where every GC will see them.
    pub(crate) fn add(&self, digests: &[Digest]) {
        if digests.is_empty() {
            return;
        }
        // Shared while recording, so no GC batch runs between our record and our caller's
        // check. Never waited for while holding the state mutex (GC takes the mutex under the
        // exclusive lock).
        let gate = if self.state().local_only {
            None
        } else {
            match self.gate().and_then(|g| g.lock_shared().map(|()| g)) {
                Ok(g) => Some(g),
                Err(e) => {
                    self.fall_back_to_memory(&mut self.state(), &e);
                    None
                }
            }
        };
        let mut st = self.state();
        let mut new = Vec::new();
        for d in digests {
            let n = st.counts.entry(*d).or_default();
            *n += 1;
            if *n == 1 {
                new.extend_from_slice(&record(d));
            }
        }
        if gate.is_some() && !st.local_only && !new.is_empty() {
            let written = self.holder(&mut st).and_then(|h| h.file.write_all(&new));
            match written {
                Ok(()) => st.records += new.len() / RECORD,
                Err(e) => self.fall_back_to_memory(&mut st, &e),
            }
        }
        drop(st);
        drop(gate); // closing it releases the shared lock
    }

    /// Releases one lease on each of `digests`; compacts the holder file when it is mostly
    /// released records.
    pub(crate) fn release(&self, digests: &[Digest]) {
        let compact = {
            let mut st = self.state();
            for d in digests {
                if let Some(n) = st.counts.get_mut(d) {
                    *n -= 1;
                    if *n == 0 {
                        st.counts.remove(d);
                    }
                }
            }
            let released = st.records.saturating_sub(st.counts.len());
            st.holder.is_some() && released > COMPACT_AFTER && released > st.counts.len()
        };
        if compact {
            self.compact();
        }
    }

    /// Rewrites the holder file with the live leases only (under the shared lock: a GC never
    /// reads it half-written).
    fn compact(&self) {
        let Ok(gate) = self.gate().and_then(|g| g.lock_shared().map(|()| g)) else {
            return; // left as it is: over-approximating is safe
        };
        let mut st = self.state();
        let live: Vec<u8> = st.counts.keys().flat_map(record).collect();
        let Some(h) = st.holder.as_mut() else {
            return;
        };
        // Appends go to the end whatever the offset: after truncating, that is the start.
        let rewritten = h.file.set_len(0).and_then(|()| h.file.write_all(&live));
        match rewritten {
            Ok(()) => st.records = live.len() / RECORD,
            Err(e) => self.fall_back_to_memory(&mut st, &e),
        }
        drop(st);
        drop(gate);
    }

    /// This process's holder file, created (locked, then put in place) on first use.
    fn holder<'a>(&self, st: &'a mut State) -> std::io::Result<&'a mut Holder> {
        let holder = match st.holder.take() {
            Some(h) => h,
            None => self.create_holder()?,
        };
        Ok(st.holder.insert(holder))
    }

    fn create_holder(&self) -> std::io::Result<Holder> {
        let mut last = None;
        // A GC that found our temp file before we locked it removes it (it looks like a dead
        // holder's); then the rename fails and we try again.
        for _ in 0..3 {
            let name = format!("{}-{}", std::process::id(), uuid::Uuid::new_v4().simple());
            let temp = self.dir.join(format!("{TEMP_PREFIX}{name}"));
            let path = self.dir.join(format!("{name}{HOLDER_SUFFIX}"));
            let file = fs::File::options()
                .append(true)
                .read(true)
                .create_new(true)
                .open(&temp)?;
            file.lock()?;
            match fs::rename(&temp, &path) {
                Ok(()) => return Ok(Holder { file, path }),
                Err(e) => {
                    let _ = fs::remove_file(&temp);
                    last = Some(e);
                }
            }
        }
        Err(last.unwrap_or_else(|| std::io::Error::other("cannot create a lease holder")))
    }

    fn fall_back_to_memory(&self, st: &mut State, e: &std::io::Error) {
        if !st.local_only {
            tracing::warn!(
                dir = %self.dir.display(),
                error = %e,
                "cannot record leases where other processes see them; this process's leases \
                 protect its blobs from its own GC only"
            );
        }
        st.local_only = true;
    }

    /// Takes the exclusive lock GC decides under (blocking until no process is recording
    /// leases), for one batch of deletions.
    pub(crate) fn exclusive(&self) -> Result<Exclusive<'_>, StoreError> {
        let gate = match self.gate() {
            Ok(g) => g,
            // Nowhere to keep leases: nobody can have recorded any; this process's are in memory.
            Err(_) => {
                return Ok(Exclusive {
                    leases: self,
                    _gate: None,
                });
            }
        };
        gate.lock().map_err(|e| {
            StoreError::io(format!("locking {}", self.dir.join("lock").display()), e)
        })?;
        Ok(Exclusive {
            leases: self,
            _gate: Some(gate),
        })
    }
}

/// The exclusive lease lock, held by a GC batch: nothing new is leased while it is held.
pub(crate) struct Exclusive<'a> {
    leases: &'a Leases,
    _gate: Option<fs::File>,
}

impl Exclusive<'_> {
    /// Every digest leased by this process or a live holder; removes the files of holders that
    /// are gone (their lock is free).
    pub(crate) fn leased(&self) -> HashSet<Digest> {
        let own = {
            let st = self.leases.state();
            let own: HashSet<Digest> = st.counts.keys().copied().collect();
            (own, st.holder.as_ref().map(|h| h.path.clone()))
        };
        let (mut leased, own_path) = own;
        let Ok(entries) = fs::read_dir(&self.leases.dir) else {
            return leased;
        };
        for e in entries.flatten() {
            let path = e.path();
            let name = e.file_name();
            let name = name.to_string_lossy();
            let holder = name.ends_with(HOLDER_SUFFIX);
            if !(holder || name.starts_with(TEMP_PREFIX)) || Some(&path) == own_path.as_ref() {
                continue;
            }
            let Ok(mut f) = fs::File::open(&path) else {
                continue; // removed meanwhile (its process closed the store)
            };
            match f.try_lock() {
                Ok(()) => {
                    // Its process is gone: the file pins nothing.
                    let _ = fs::remove_file(&path);
                    tracing::debug!(holder = %path.display(), "removed a stale lease holder");
                }
                Err(fs::TryLockError::WouldBlock) if holder => {
                    let mut bytes = Vec::new();
                    if f.read_to_end(&mut bytes).is_ok() {
                        parse_records(&bytes, &mut leased);
                    }
                }
                Err(_) => {}
            }
        }
        leased
    }
}

impl Drop for Leases {
    /// The store is closing: its holder goes (removed before its lock is released).
    fn drop(&mut self) {
        if let Some(h) = self.state.get_mut().ok().and_then(|s| s.holder.take()) {
            let _ = fs::remove_file(&h.path);
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn digest(i: u8) -> Digest {
        Digest::of_bytes(&[i; 3])
    }

    #[test]
    fn another_holders_leases_are_seen_until_it_is_gone() {
        let dir = tempfile::tempdir().unwrap();
        let a = Leases::new(dir.path());
        let b = Leases::new(dir.path());
        a.add(&[digest(1), digest(2)]);
        a.release(&[digest(2)]);
        let seen = b.exclusive().unwrap().leased();
        // Released records may linger (over-approximation), live ones never go missing.
        assert!(seen.contains(&digest(1)));
        drop(a);
        assert!(b.exclusive().unwrap().leased().is_empty());
        let left: Vec<_> = fs::read_dir(dir.path().join("leases"))
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert_eq!(left, vec![std::ffi::OsString::from("lock")]);
    }

    #[test]
    fn a_dead_holder_is_removed_and_pins_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let leases_dir = dir.path().join("leases");
        fs::create_dir_all(&leases_dir).unwrap();
        // What a killed process leaves: a holder file nobody has locked.
        let stale = leases_dir.join(format!("999999-x{HOLDER_SUFFIX}"));
        fs::write(&stale, record(&digest(7))).unwrap();
        let gc = Leases::new(dir.path());
        assert!(gc.exclusive().unwrap().leased().is_empty());
        assert!(!stale.exists());
    }

    #[test]
    fn a_holder_is_compacted_once_mostly_released() {
        let dir = tempfile::tempdir().unwrap();
        let a = Leases::new(dir.path());
        let many: Vec<Digest> = (0..(COMPACT_AFTER + 10) as u32)
            .map(|i| Digest::of_bytes(&i.to_le_bytes()))
            .collect();
        a.add(&many);
        a.add(&[digest(1)]);
        a.release(&many);
        let path = a.state().holder.as_ref().unwrap().path.clone();
        assert_eq!(fs::metadata(&path).unwrap().len(), RECORD as u64);
        let b = Leases::new(dir.path());
        assert_eq!(b.exclusive().unwrap().leased(), HashSet::from([digest(1)]));
    }
}
