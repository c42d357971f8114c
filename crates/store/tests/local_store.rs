//! The local store as a user of it sees it: round trips, corruption refused, concurrency,
//! crash safety, and garbage collection.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::io::{self, Read};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use hashing::Digest;
use store::{ErrorKind, LocalStore, LocalStoreOptions};
use tokio::io::AsyncWriteExt;

const THRESHOLD: u64 = 512 * 1024;

fn open(dir: &Path) -> LocalStore {
    LocalStore::open(LocalStoreOptions::new(dir)).unwrap()
}

fn bytes(len: usize, seed: u64) -> Vec<u8> {
    testutil::data::pseudo_random(len, seed)
}

fn pool_files(root: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for shard in std::fs::read_dir(root.join("large")).unwrap() {
        let shard = shard.unwrap().path();
        if shard.is_dir() {
            for f in std::fs::read_dir(&shard).unwrap() {
                out.push(f.unwrap().path());
            }
        } else {
            out.push(shard);
        }
    }
    out
}

#[test]
fn round_trips_on_both_sides_of_the_threshold() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    for len in [
        0,
        1,
        4096,
        THRESHOLD as usize - 1,
        THRESHOLD as usize,
        3 * 1024 * 1024 + 7,
    ] {
        let data = bytes(len, len as u64);
        let d = store.store_bytes(&data).unwrap();
        assert_eq!(d, Digest::of_bytes(&data));
        assert!(store.contains(d));
        assert_eq!(
            store.load_bytes(d).unwrap().unwrap(),
            &data[..],
            "len {len}"
        );
        let in_pool = store.load_file(d).unwrap();
        assert_eq!(in_pool.is_some(), len as u64 >= THRESHOLD, "len {len}");
    }
    let usage = store.usage();
    assert_eq!(usage.small_blobs, 3); // 1, 4096, threshold-1 (the empty blob is implicit)
    assert_eq!(usage.large_blobs, 2);

    // Everything survives a reopen, including the accounting.
    drop(store);
    let store = open(dir.path());
    assert_eq!(store.usage(), usage);
    let data = bytes(3 * 1024 * 1024 + 7, 3 * 1024 * 1024 + 7);
    assert_eq!(
        store.load_bytes(Digest::of_bytes(&data)).unwrap().unwrap(),
        &data[..]
    );
}

#[test]
fn absent_blobs_are_none_not_errors() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    for len in [10, THRESHOLD as usize] {
        let d = Digest::of_bytes(&bytes(len, 1));
        assert!(!store.contains(d));
        assert!(store.load_bytes(d).unwrap().is_none());
        assert!(store.load_file(d).unwrap().is_none());
    }
}

#[test]
fn pool_files_are_read_only_and_sharded() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let d = store.store_bytes(&bytes(THRESHOLD as usize, 9)).unwrap();
    let path = store.load_file(d).unwrap().unwrap();
    let hex = d.hash.to_hex();
    assert!(path.ends_with(format!("large/{}/{hex}-{}", &hex[..2], d.size_bytes)));
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o444);
}

#[test]
fn store_file_streams_small_and_large_files() {
    let dir = tempfile::tempdir().unwrap();
    let src = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    for (i, len) in [100usize, 2 * 1024 * 1024].into_iter().enumerate() {
        let data = bytes(len, i as u64 + 100);
        let p = src.path().join(format!("f{i}"));
        std::fs::write(&p, &data).unwrap();
        let d = store.store_file(&p, false).unwrap();
        assert_eq!(d, Digest::of_bytes(&data));
        assert_eq!(store.load_bytes(d).unwrap().unwrap(), &data[..]);
        // The source is untouched (still writable: it was copied, not adopted).
        assert!(!std::fs::metadata(&p).unwrap().permissions().readonly());
    }
    // An immutable file is adopted into the pool by hardlink: same inode, no copy.
    let data = bytes(1024 * 1024, 77);
    let p = src.path().join("immutable");
    std::fs::write(&p, &data).unwrap();
    let d = store.store_file(&p, true).unwrap();
    let pool = store.load_file(d).unwrap().unwrap();
    use std::os::unix::fs::MetadataExt;
    assert_eq!(
        std::fs::metadata(&p).unwrap().ino(),
        std::fs::metadata(&pool).unwrap().ino()
    );
}

#[tokio::test]
async fn corruption_detected_on_write_is_never_committed() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    for len in [1000usize, 2 * 1024 * 1024] {
        let good = bytes(len, 5);
        let mut bad = good.clone();
        bad[len / 2] ^= 0x40;
        let expected = Digest::of_bytes(&good);

        // Streaming destination (what a download uses).
        let mut dest = store.begin_write(expected).await.unwrap();
        dest.write_all(&bad).await.unwrap();
        let err = dest.commit().await.unwrap_err();
        assert_eq!(err.kind(), &ErrorKind::InvalidData, "{err}");
        assert!(err.to_string().contains("corrupt"), "{err}");
        assert!(!store.contains(expected));

        // Truncated.
        let mut dest = store.begin_write(expected).await.unwrap();
        dest.write_all(&good[..len - 1]).await.unwrap();
        let err = dest.commit().await.unwrap_err();
        assert!(err.to_string().contains("truncated"), "{err}");
        assert!(!store.contains(expected));

        // Too long: refused before the extra byte is written.
        let mut dest = store.begin_write(expected).await.unwrap();
        let mut longer = good.clone();
        longer.push(0);
        let err = dest.write_all(&longer).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        drop(dest);
        assert!(!store.contains(expected));

        // Blocking verified write.
        let err = store.store_verified(expected, &mut &bad[..]).unwrap_err();
        assert_eq!(err.kind(), &ErrorKind::InvalidData);
        assert!(!store.contains(expected));
    }
    // No temp files remain from any of the failed pool writes.
    assert!(
        pool_files(dir.path()).is_empty(),
        "{:?}",
        pool_files(dir.path())
    );
    assert_eq!(store.usage().total_blobs(), 0);
}

/// A proxy hands the last bytes on once `verify` passes, before the commit's fsync: `verify`
/// must refuse exactly what `commit` would, in every kind of sink (memory, plain pool file,
/// compressed pool file), and leave the destination committable.
#[tokio::test]
async fn verify_answers_what_commit_would_without_committing() {
    for compressed in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let mut options = LocalStoreOptions::new(dir.path());
        if compressed {
            options.pool_compression = store::PoolCompression::Zstd;
        }
        let store = LocalStore::open(options).unwrap();
        for len in [1000usize, 3 * 1024 * 1024 + 7] {
            let good = bytes(len, 31);
            let d = Digest::of_bytes(&good);
            let mut dest = store.begin_write(d).await.unwrap();
            dest.write_all(&good[..len - 1]).await.unwrap();
            let err = dest.verify().unwrap_err();
            assert!(err.to_string().contains("truncated"), "{err}");
            let mut last = good[len - 1..].to_vec();
            last[0] ^= 1;
            dest.write_all(&last).await.unwrap();
            let err = dest.verify().unwrap_err();
            assert!(err.to_string().contains("corrupt"), "{err}");
            assert!(!store.contains(d), "verify never commits");
            drop(dest); // a pool destination holds the digest's write lock

            let mut dest = store.begin_write(d).await.unwrap();
            dest.write_all(&good).await.unwrap();
            dest.verify().unwrap();
            assert!(!store.contains(d), "verify never commits");
            dest.commit().await.unwrap();
            assert_eq!(store.load_bytes(d).unwrap().unwrap(), &good[..]);
        }
    }
}

#[tokio::test]
async fn reset_discards_a_partial_attempt() {
    use store::LoadDestination;
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    for len in [1000usize, 1024 * 1024] {
        let data = bytes(len, 11);
        let d = Digest::of_bytes(&data);
        let mut dest = store.begin_write(d).await.unwrap();
        dest.write_all(&data[..len / 3]).await.unwrap();
        dest.write_all(b"garbage from a failed attempt")
            .await
            .unwrap();
        dest.reset().await.unwrap();
        dest.write_all(&data).await.unwrap();
        dest.commit().await.unwrap();
        assert_eq!(store.load_bytes(d).unwrap().unwrap(), &data[..]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_writers_of_one_digest() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let data = Arc::new(bytes(3 * 1024 * 1024, 21));
    let d = Digest::of_bytes(&data);
    let mut tasks = Vec::new();
    for i in 0..8 {
        let store = store.clone();
        let data = data.clone();
        tasks.push(tokio::spawn(async move {
            if i % 2 == 0 {
                let mut dest = store.begin_write(d).await.unwrap();
                for c in data.chunks(100_000) {
                    dest.write_all(c).await.unwrap();
                }
                dest.commit().await.unwrap();
            } else {
                tokio::task::spawn_blocking(move || store.store_verified(d, &mut &data[..]))
                    .await
                    .unwrap()
                    .unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(store.load_bytes(d).unwrap().unwrap(), &data[..]);
    let files = pool_files(dir.path());
    assert_eq!(
        files.len(),
        1,
        "exactly one pool file, no temp leftovers: {files:?}"
    );
    assert_eq!(store.usage().large_blobs, 1, "counted once");
}

#[test]
fn leftover_temp_files_are_cleaned_at_open() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let kept = store.store_bytes(&bytes(THRESHOLD as usize, 3)).unwrap();
    drop(store);
    // Simulate crashes mid-write: unlocked temp files (one without a PID, one whose PID is not
    // running on this machine).
    std::fs::write(dir.path().join("large/.tmp-crashed1"), b"partial").unwrap();
    std::fs::write(dir.path().join("large/.tmp-999999999-abc"), b"partial").unwrap();
    let store = open(dir.path());
    let files = pool_files(dir.path());
    assert_eq!(files.len(), 1, "{files:?}");
    assert!(store.contains(kept));
    assert_eq!(store.usage().large_blobs, 1);
}

#[test]
fn a_write_in_progress_in_another_process_survives_open_and_gc() {
    let dir = tempfile::tempdir().unwrap();
    drop(open(dir.path()));
    // Another recache process (another container, another PID namespace: its PID means nothing
    // here) mid-download holds the lock on its temp file. The lock is what must count.
    let busy = dir.path().join("large/.tmp-999999999-0123456789abcdef");
    std::fs::write(&busy, b"partial, still being written").unwrap();
    let writer = std::fs::File::open(&busy).unwrap();
    writer.lock().unwrap();
    let lock_holder = std::thread::spawn(move || {
        // flock locks belong to the open file description: hold it from this thread.
        std::thread::sleep(Duration::from_millis(500));
        drop(writer);
    });
    let store = open(dir.path());
    assert!(
        busy.exists(),
        "opening the store must not delete a live writer's temp file"
    );
    store.gc(0).unwrap();
    assert!(busy.exists(), "nor may GC");
    lock_holder.join().unwrap();
    // Once the writer is gone (lock released), the next open cleans it.
    drop(store);
    drop(open(dir.path()));
    assert!(!busy.exists(), "an abandoned temp file is removed");
}

#[test]
fn writes_through_a_hardlinked_output_do_not_corrupt_later_hits() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let original = bytes(1024 * 1024, 10);
    let d = store.store_bytes(&original).unwrap();
    // A hit restores the output as a read-only hardlink of the pool file.
    let ws = tempfile::tempdir().unwrap();
    let out = ws.path().join("out.bin");
    store
        .materialize_file(d, &out, false, store::MaterializeOptions::default())
        .unwrap();
    // The user makes it writable and patches it in place (no new inode: the pool's blob).
    std::fs::set_permissions(&out, std::fs::Permissions::from_mode(0o644)).unwrap();
    {
        use std::io::{Seek, Write};
        let mut f = std::fs::OpenOptions::new().write(true).open(&out).unwrap();
        f.seek(io::SeekFrom::Start(1000)).unwrap();
        f.write_all(b"PATCHED").unwrap();
    }
    // The store notices before handing the blob out again, and evicts it.
    assert!(
        !store.contains(d),
        "a modified pool blob must not count as present"
    );
    assert_eq!(store.load_file(d).unwrap(), None);
    let again = ws.path().join("again.bin");
    let err = store
        .materialize_file(d, &again, false, store::MaterializeOptions::default())
        .unwrap_err();
    assert_eq!(err.missing_digest(), Some(d), "{err}");
    // Storing it again (a re-fetch) gives the original content back.
    store.store_bytes(&original).unwrap();
    store
        .materialize_file(d, &again, false, store::MaterializeOptions::default())
        .unwrap();
    assert_eq!(std::fs::read(&again).unwrap(), original);

    // Only made writable, not changed: kept, and read-only again.
    let d2 = store.store_bytes(&bytes(1024 * 1024, 11)).unwrap();
    let out2 = ws.path().join("out2.bin");
    store
        .materialize_file(d2, &out2, false, store::MaterializeOptions::default())
        .unwrap();
    std::fs::set_permissions(&out2, std::fs::Permissions::from_mode(0o644)).unwrap();
    assert!(store.contains(d2));
    let mode = std::fs::metadata(&out2).unwrap().permissions().mode();
    assert_eq!(mode & 0o222, 0, "made read-only again");
}

#[test]
fn usage_counters_persist_without_a_walk() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    store.store_bytes(&bytes(1000, 1)).unwrap();
    store.store_bytes(&bytes(1000, 1)).unwrap(); // the same blob: counted once
    store.store_bytes(&bytes(2000, 2)).unwrap();
    store
        .store_bytes(&bytes(THRESHOLD as usize + 5, 3))
        .unwrap();
    let usage = store.usage();
    assert_eq!((usage.small_blobs, usage.small_bytes), (2, 3000));
    assert_eq!((usage.large_blobs, usage.large_bytes), (1, THRESHOLD + 5));
    drop(store);
    // Reopening reads the counters; a pool file deleted behind the store's back is not seen
    // until GC re-derives them (the proof that open no longer walks the pool).
    let victim = pool_files(dir.path())
        .into_iter()
        .find(|p| !p.file_name().unwrap().to_string_lossy().starts_with('.'))
        .unwrap();
    std::fs::remove_file(victim).unwrap();
    let store = open(dir.path());
    assert_eq!(store.usage(), usage);
    store.gc(u64::MAX).unwrap();
    assert_eq!(store.usage().large_blobs, 0);
    assert_eq!(store.usage().small_blobs, 2);
}

#[test]
fn a_size_bound_holds_by_itself_and_respects_leases() {
    let dir = tempfile::tempdir().unwrap();
    let mut options = LocalStoreOptions::new(dir.path());
    options.max_size = Some(4 * 1024 * 1024);
    let store = LocalStore::open(options).unwrap();
    let first = store.store_bytes(&bytes(1024 * 1024, 100)).unwrap();
    let _lease = store.lease([first]);
    let mut later = Vec::new();
    for i in 0..12 {
        std::thread::sleep(Duration::from_millis(2));
        later.push(store.store_bytes(&bytes(1024 * 1024, 200 + i)).unwrap());
        assert!(
            store.usage().total_bytes() <= 4 * 1024 * 1024,
            "bound exceeded after write {i}: {:?}",
            store.usage()
        );
    }
    assert!(store.contains(first), "a leased blob is never evicted");
    assert!(
        store.contains(*later.last().unwrap()),
        "the newest blob stays"
    );
    assert!(!store.contains(later[0]), "the oldest unleased blob went");
}

/// A reader that yields `len` bytes and then blocks forever, so the writer is mid-write when
/// the parent test kills the process.
struct StallingReader {
    data: Vec<u8>,
    pos: usize,
}

impl Read for StallingReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.pos >= self.data.len() {
            std::thread::sleep(Duration::from_secs(3600));
        }
        let n = buf.len().min(self.data.len() - self.pos).min(64 * 1024);
        buf[..n].copy_from_slice(&self.data[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

const CRASH_CHILD_ENV: &str = "RECACHE_TEST_CRASH_CHILD_STORE";

/// Runs as the child of `kill_9_mid_write_leaves_no_visible_blob`: starts writing a 4 MiB blob
/// and stalls half way.
#[test]
fn crash_child_writer() {
    let Ok(dir) = std::env::var(CRASH_CHILD_ENV) else {
        return; // Only meaningful as the child process of the test below.
    };
    let store = open(Path::new(&dir));
    let full = bytes(4 * 1024 * 1024, 42);
    let expected = Digest::of_bytes(&full);
    let mut reader = StallingReader {
        data: full[..2 * 1024 * 1024].to_vec(),
        pos: 0,
    };
    let _ = store.store_verified(expected, &mut reader);
}

#[test]
fn kill_9_mid_write_leaves_no_visible_blob() {
    let dir = tempfile::tempdir().unwrap();
    drop(open(dir.path()));
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "crash_child_writer",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CRASH_CHILD_ENV, dir.path())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Wait until the child has written at least 1 MiB into a temp file.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let partial = pool_files(dir.path()).into_iter().any(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with(".tmp-")
                && std::fs::metadata(&p).map(|m| m.len()).unwrap_or(0) >= 1024 * 1024
        });
        if partial {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "child never started writing"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();

    let expected = Digest::of_bytes(&bytes(4 * 1024 * 1024, 42));
    let store = open(dir.path());
    assert!(
        !store.contains(expected),
        "a partial blob must never be visible"
    );
    assert!(store.load_bytes(expected).unwrap().is_none());
    assert!(
        pool_files(dir.path()).is_empty(),
        "temp file cleaned at open"
    );
}

#[test]
fn gc_evicts_least_recently_used_and_honors_leases() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let small: Vec<Digest> = (0..4)
        .map(|i| {
            std::thread::sleep(Duration::from_millis(3));
            store.store_bytes(&bytes(100_000, i)).unwrap()
        })
        .collect();
    std::thread::sleep(Duration::from_millis(3));
    let large = store.store_bytes(&bytes(600_000, 99)).unwrap();
    std::thread::sleep(Duration::from_millis(3));
    // Reading small[0] makes it the most recently used.
    store.load_bytes(small[0]).unwrap().unwrap();
    let lease = store.lease([small[1]]);

    // Order by last use: small[1] (leased), small[2], small[3], large, small[0].
    // Target leaves room for ~2 of the 100 kB blobs plus the leased one: evicts small[2],
    // small[3] and the large blob, keeps small[0] (recent) and small[1] (leased).
    let report = store.gc(350_000).unwrap();
    assert_eq!(report.leased_skipped, 1);
    assert!(store.contains(small[0]), "recently read blob kept");
    assert!(store.contains(small[1]), "leased blob kept");
    assert!(!store.contains(small[2]));
    assert!(!store.contains(small[3]));
    assert!(!store.contains(large));
    assert_eq!(report.removed_blobs, 3);
    assert_eq!(report.removed_bytes, 200_000 + 600_000);
    assert_eq!(store.usage().total_bytes(), 200_000);
    assert!(report.remaining_bytes <= 350_000);

    // Once the lease is gone, the blob is fair game.
    drop(lease);
    store.gc(0).unwrap();
    assert!(!store.contains(small[1]));
    assert!(!store.contains(small[0]));
    assert_eq!(store.usage().total_blobs(), 0);

    // The accounting is consistent with what is on disk after a reopen.
    drop(store);
    assert_eq!(open(dir.path()).usage().total_blobs(), 0);
}

#[test]
fn a_journal_row_keeps_its_blob_through_gc_and_reopen() {
    // The server's S3 tier journals a blob until it is uploaded: GC must not evict it, even
    // after a restart, and it becomes evictable once the row goes.
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let pending = store.store_bytes(&bytes(100_000, 1)).unwrap();
    let large = store.store_bytes(&bytes(600_000, 2)).unwrap();
    let other = store.store_bytes(&bytes(100_000, 3)).unwrap();
    store.journal_put(pending, b"queued").unwrap();
    store.journal_put(large, b"multipart").unwrap();
    drop(store);
    let store = open(dir.path());
    assert_eq!(store.journal_rows().unwrap().len(), 2);
    assert_eq!(
        store.journal_get(large).unwrap().as_deref(),
        Some(&b"multipart"[..])
    );
    let report = store.gc(0).unwrap();
    assert_eq!(report.leased_skipped, 2);
    assert!(store.contains(pending) && store.contains(large));
    assert!(!store.contains(other));
    store.journal_remove(pending).unwrap();
    store.journal_remove(large).unwrap();
    assert!(store.journal_get(large).unwrap().is_none());
    store.gc(0).unwrap();
    assert!(!store.contains(pending) && !store.contains(large));
}

#[test]
fn gc_survives_a_pool_file_removed_behind_its_back() {
    // An interrupted GC can leave an access record without its pool file: the next GC copes.
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let d = store.store_bytes(&bytes(THRESHOLD as usize, 1)).unwrap();
    store.flush_access_times().unwrap();
    let path = store.load_file(d).unwrap().unwrap();
    std::fs::remove_file(path).unwrap();
    let report = store.gc(0).unwrap();
    assert_eq!(report.remaining_bytes, 0);
    assert!(!store.contains(d));
}

#[test]
fn a_compressed_store_keeps_source_small_and_its_format() {
    let dir = tempfile::tempdir().unwrap();
    let mut options = LocalStoreOptions::new(dir.path());
    options.pool_compression = store::PoolCompression::Zstd;
    let store = LocalStore::open(options.clone()).unwrap();
    // Source-like text: small files (the database) and a large one (the pool).
    let source = |i: usize, len: usize| -> Vec<u8> {
        let mut v = Vec::new();
        let mut n = 0;
        while v.len() < len {
            v.extend_from_slice(
                format!("pub fn f{i}_{n}(x: u64) -> u64 {{ x * {n} + {i} }}\n").as_bytes(),
            );
            n += 1;
        }
        v.truncate(len);
        v
    };
    let mut logical = 0u64;
    let mut digests = Vec::new();
    for i in 0..400 {
        let data = source(i, 4000 + i * 37);
        logical += data.len() as u64;
        digests.push((store.store_bytes(&data).unwrap(), data));
    }
    let big = source(9999, 3 * 1024 * 1024);
    logical += big.len() as u64;
    digests.push((store.store_bytes(&big).unwrap(), big));
    for (d, data) in &digests {
        assert_eq!(store.load_bytes(*d).unwrap().unwrap(), &data[..]);
    }
    assert_eq!(
        store.usage().total_bytes(),
        logical,
        "counters count logical bytes"
    );
    store.flush_access_times().unwrap();
    drop(store);
    let on_disk = {
        use std::os::unix::fs::MetadataExt;
        let mut total = 0;
        let mut stack = vec![dir.path().to_path_buf()];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d).unwrap().flatten() {
                let m = e.metadata().unwrap();
                if m.is_dir() {
                    stack.push(e.path());
                } else if e.file_name() != "lock.mdb" {
                    total += m.blocks() * 512;
                }
            }
        }
        total
    };
    assert!(
        on_disk * 2 < logical,
        "{on_disk} bytes on disk for {logical} logical"
    );
    // The format is the store's: opening it the other way is a clear error.
    let err = LocalStore::open(LocalStoreOptions::new(dir.path())).unwrap_err();
    assert!(err.to_string().contains("compression"), "{err}");
    let store = LocalStore::open(options).unwrap();
    assert!(store.contains(digests[0].0));
}

#[test]
fn gc_drops_records_older_than_what_it_evicts_and_keeps_used_ones() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let key = |i: u8| Digest::of_bytes(&[i]);
    store
        .put_ref(key(1), b"written long ago, never read")
        .unwrap();
    store
        .put_ref(key(2), b"written long ago, read lately")
        .unwrap();
    std::thread::sleep(Duration::from_millis(3));
    let blobs: Vec<Digest> = (0..6)
        .map(|i| {
            std::thread::sleep(Duration::from_millis(3));
            store.store_bytes(&bytes(10_000, 300 + i)).unwrap()
        })
        .collect();
    std::thread::sleep(Duration::from_millis(3));
    assert!(store.get_ref(key(2)).unwrap().is_some());
    store.put_ref(key(3), b"written lately").unwrap();

    // Nothing evicted: every record stays, however old.
    assert_eq!(store.gc(u64::MAX).unwrap().removed_refs, 0);
    assert_eq!(store.ref_count().unwrap(), 3);

    // Evicting the three oldest blobs takes the record older than them with it.
    let report = store.gc(30_000).unwrap();
    assert_eq!(report.removed_blobs, 3);
    assert!(!store.contains(blobs[2]) && store.contains(blobs[3]));
    assert_eq!(report.removed_refs, 1);
    assert!(store.get_ref(key(1)).unwrap().is_none());
    assert!(
        store.get_ref(key(2)).unwrap().is_some(),
        "a record read lately stays"
    );
    assert!(store.get_ref(key(3)).unwrap().is_some());

    // Reopened, the read is remembered; emptying the store empties the records.
    drop(store);
    let store = open(dir.path());
    assert_eq!(store.ref_count().unwrap(), 2);
    std::thread::sleep(Duration::from_millis(3));
    store.store_bytes(b"newest").unwrap();
    store.gc(0).unwrap();
    assert_eq!(store.ref_count().unwrap(), 0);
}

const CRASH_GC_CHILD_ENV: &str = "RECACHE_TEST_CRASH_GC_CHILD_STORE";

/// Runs as the child of `kill_9_mid_eviction_then_open_repairs_the_index`: with the store
/// open, does what an eviction and a write do on disk before they record it (unlinks pool files;
/// commits a verified pool file by rename), then waits to be killed.
#[test]
fn crash_child_evictor() {
    let Ok(dir) = std::env::var(CRASH_GC_CHILD_ENV) else {
        return; // Only meaningful as the child process of the test below.
    };
    let store = open(Path::new(&dir));
    let mut files: Vec<_> = pool_files(Path::new(&dir));
    files.sort();
    for f in files.iter().take(3) {
        std::fs::remove_file(f).unwrap();
    }
    let late = bytes(THRESHOLD as usize + 10, 77);
    let d = Digest::of_bytes(&late);
    let shard = Path::new(&dir).join("large").join(&d.hash.to_hex()[..2]);
    std::fs::create_dir_all(&shard).unwrap();
    let tmp = Path::new(&dir).join("large").join(".tmp-late");
    std::fs::write(&tmp, &late).unwrap();
    std::fs::rename(
        &tmp,
        shard.join(format!("{}-{}", d.hash.to_hex(), d.size_bytes)),
    )
    .unwrap();
    println!("ready");
    std::thread::sleep(Duration::from_secs(3600));
    drop(store);
}

#[test]
fn kill_9_mid_eviction_then_open_repairs_the_index() {
    use std::io::BufRead;
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let blobs: Vec<Digest> = (0..8)
        .map(|i| {
            store
                .store_bytes(&bytes(THRESHOLD as usize + i, 600 + i as u64))
                .unwrap()
        })
        .collect();
    let small = store.store_bytes(b"a small one").unwrap();
    drop(store);

    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "crash_child_evictor",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CRASH_GC_CHILD_ENV, dir.path())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = io::BufReader::new(child.stdout.take().unwrap()).lines();
    assert!(
        lines.any(|l| l.unwrap().contains("ready")),
        "the child never got ready"
    );
    child.kill().unwrap(); // SIGKILL: no destructor runs, the store is left open
    child.wait().unwrap();

    // The next open repairs: the index agrees with the disk.
    let store = open(dir.path());
    let on_disk: Vec<_> = pool_files(dir.path());
    let disk_bytes: u64 = on_disk
        .iter()
        .map(|p| {
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            name.rsplit('-').next().unwrap().parse::<u64>().unwrap()
        })
        .sum();
    let usage = store.usage();
    assert_eq!(usage.total_blobs(), on_disk.len() as u64 + 1, "{usage:?}");
    assert_eq!(usage.total_bytes(), disk_bytes + small.size_bytes);
    let present = blobs.iter().filter(|d| store.contains(**d)).count();
    assert_eq!(present, 5, "three pool files were unlinked");
    for d in blobs.iter().filter(|d| store.contains(**d)) {
        assert_eq!(
            store.load_bytes(*d).unwrap().unwrap().len() as u64,
            d.size_bytes
        );
    }
    let late = Digest::of_bytes(&bytes(THRESHOLD as usize + 10, 77));
    assert!(
        store.contains(late),
        "a committed file without its record is adopted"
    );
    assert!(store.contains(small));
    drop(store);

    // A clean close: the next open trusts the index and walks nothing (a file removed by hand
    // meanwhile is still counted until a GC re-derives the counters).
    let victim = pool_files(dir.path()).pop().unwrap();
    std::fs::remove_file(victim).unwrap();
    let store = open(dir.path());
    assert_eq!(store.usage().total_blobs(), on_disk.len() as u64 + 1);
    store.gc(u64::MAX).unwrap();
    assert_eq!(store.usage().total_blobs(), on_disk.len() as u64);
}
