//! Which embedded database should hold small blobs? LMDB (heed) vs redb vs one file per blob.
//!
//! `cargo bench -p benches --bench small_blob_db` prints, for each candidate, the median of
//! 3 runs (fresh database each run) of:
//!
//! - `write 100k x 1 KiB, 1 txn each`: how a stream of downloads lands (each blob committed alone),
//!   in each engine's fastest crash-consistent mode (LMDB `NO_SYNC`, redb `Durability::None`,
//!   files renamed into place without fsync);
//! - `write 100k x 1 KiB, txns of 1000, durable`: how a directory capture lands, fsync per commit;
//! - `random read 100k`: point lookups, one read transaction each, as on a cache hit;
//! - `2 concurrent writers`: two threads each committing 50k single-blob transactions.
//!
//! This is a one-shot comparison (100k operations per measurement), so it uses a plain harness
//! rather than criterion's many-iteration model. The figures are recorded in ARCHITECTURE.md.

#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used, unsafe_code)]

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

const N: usize = 100_000;
const BLOB: usize = 1024;
const REPS: usize = 3;

fn key(i: usize) -> [u8; 32] {
    // Keys are SHA-256 fingerprints in real use: spread them uniformly like hashes are.
    *hashing::Digest::of_bytes(&(i as u64).to_le_bytes())
        .hash
        .as_bytes()
}

fn value(i: usize) -> Vec<u8> {
    benches::pseudo_random_bytes(BLOB, i as u64)
}

trait Candidate: Send + Sync {
    fn put_one(&self, k: &[u8; 32], v: &[u8]);
    fn put_batch_durable(&self, items: &[([u8; 32], Vec<u8>)]);
    fn get(&self, k: &[u8; 32]) -> Option<usize>;
}

// ---- LMDB through heed ----
struct Lmdb {
    env: heed::Env<heed::WithoutTls>,
    db: heed::Database<heed::types::Bytes, heed::types::Bytes>,
}

impl Lmdb {
    fn open(dir: &Path) -> Lmdb {
        let mut opts = heed::EnvOpenOptions::new().read_txn_without_tls();
        opts.map_size(4 << 30).max_dbs(1);
        // SAFETY: the directory is fresh and opened once; NO_SYNC keeps LMDB consistent after a
        // process crash (the OS still has the pages), which is what the "fast" rows measure.
        let env = unsafe { opts.open(dir) }.unwrap();
        let mut wtxn = env.write_txn().unwrap();
        let db = env.create_database(&mut wtxn, None).unwrap();
        wtxn.commit().unwrap();
        Lmdb { env, db }
    }
    fn set_sync(&self, sync: bool) {
        let mode = if sync {
            heed::FlagSetMode::Disable
        } else {
            heed::FlagSetMode::Enable
        };
        // SAFETY: toggled while no transaction is open.
        unsafe { self.env.set_flags(heed::EnvFlags::NO_SYNC, mode) }.unwrap();
    }
}

impl Candidate for Lmdb {
    fn put_one(&self, k: &[u8; 32], v: &[u8]) {
        let mut w = self.env.write_txn().unwrap();
        self.db.put(&mut w, k, v).unwrap();
        w.commit().unwrap();
    }
    fn put_batch_durable(&self, items: &[([u8; 32], Vec<u8>)]) {
        let mut w = self.env.write_txn().unwrap();
        for (k, v) in items {
            self.db.put(&mut w, k, v).unwrap();
        }
        w.commit().unwrap();
    }
    fn get(&self, k: &[u8; 32]) -> Option<usize> {
        let r = self.env.read_txn().unwrap();
        self.db.get(&r, k).unwrap().map(|v| v.len())
    }
}

// ---- redb ----
const TABLE: redb::TableDefinition<&[u8], &[u8]> = redb::TableDefinition::new("blobs");

struct Redb {
    db: redb::Database,
}

impl Redb {
    fn open(dir: &Path) -> Redb {
        let db = redb::Database::create(dir.join("blobs.redb")).unwrap();
        let w = db.begin_write().unwrap();
        w.open_table(TABLE).unwrap();
        w.commit().unwrap();
        Redb { db }
    }
    fn put(&self, items: &mut dyn Iterator<Item = (&[u8; 32], &[u8])>, durable: bool) {
        let mut w = self.db.begin_write().unwrap();
        if !durable {
            w.set_durability(redb::Durability::None).unwrap();
        }
        {
            let mut t = w.open_table(TABLE).unwrap();
            for (k, v) in items {
                t.insert(&k[..], v).unwrap();
            }
        }
        w.commit().unwrap();
    }
}

impl Candidate for Redb {
    fn put_one(&self, k: &[u8; 32], v: &[u8]) {
        self.put(&mut std::iter::once((k, v)), false);
    }
    fn put_batch_durable(&self, items: &[([u8; 32], Vec<u8>)]) {
        self.put(&mut items.iter().map(|(k, v)| (k, &v[..])), true);
    }
    fn get(&self, k: &[u8; 32]) -> Option<usize> {
        use redb::ReadableDatabase;
        let r = self.db.begin_read().unwrap();
        let t = r.open_table(TABLE).unwrap();
        t.get(&k[..]).unwrap().map(|v| v.value().len())
    }
}

// ---- one file per blob ----
struct Files {
    dir: std::path::PathBuf,
}

impl Files {
    fn path(&self, k: &[u8; 32]) -> std::path::PathBuf {
        let h = hex::encode(k);
        self.dir.join(&h[..2]).join(h)
    }
    fn write(&self, k: &[u8; 32], v: &[u8], sync: bool) {
        use std::io::Write;
        let p = self.path(k);
        let tmp = p.with_extension("tmp");
        let mut f = std::fs::File::create(&tmp)
            .or_else(|_| {
                std::fs::create_dir_all(p.parent().unwrap())?;
                std::fs::File::create(&tmp)
            })
            .unwrap();
        f.write_all(v).unwrap();
        if sync {
            f.sync_data().unwrap();
        }
        std::fs::rename(&tmp, &p).unwrap();
    }
}

impl Candidate for Files {
    fn put_one(&self, k: &[u8; 32], v: &[u8]) {
        self.write(k, v, false);
    }
    fn put_batch_durable(&self, items: &[([u8; 32], Vec<u8>)]) {
        for (k, v) in items {
            self.write(k, v, true);
        }
    }
    fn get(&self, k: &[u8; 32]) -> Option<usize> {
        std::fs::read(self.path(k)).ok().map(|v| v.len())
    }
}

fn open(name: &str, dir: &Path) -> Arc<dyn Candidate> {
    match name {
        "lmdb (heed)" => {
            let l = Lmdb::open(dir);
            l.set_sync(false);
            Arc::new(l)
        }
        "redb" => Arc::new(Redb::open(dir)),
        _ => Arc::new(Files {
            dir: dir.to_path_buf(),
        }),
    }
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` runs this too: keep that quick.
    let quick = !std::env::args().any(|a| a == "--bench");
    let n = if quick { 1000 } else { N };
    let items: Vec<([u8; 32], Vec<u8>)> = (0..n).map(|i| (key(i), value(i))).collect();
    let mut order: Vec<usize> = (0..n).collect();
    // Deterministic shuffle for the random reads.
    let mut x = 0x2545_f491_4f6c_dd1du64;
    for i in (1..order.len()).rev() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        order.swap(i, (x % (i as u64 + 1)) as usize);
    }

    println!("small-blob database comparison: {n} x {BLOB} B, median of {REPS} runs");
    println!(
        "{:<14} {:>22} {:>26} {:>18} {:>22}",
        "candidate",
        "write, 1 txn each",
        "write, txns of 1000, fsync",
        "random read",
        "2 concurrent writers"
    );
    for name in ["lmdb (heed)", "redb", "file per blob"] {
        let (mut w1, mut wb, mut rd, mut cw) = (vec![], vec![], vec![], vec![]);
        for _ in 0..REPS {
            // Single-blob commits, fast mode.
            let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
            let db = open(name, dir.path());
            let t = Instant::now();
            for (k, v) in &items {
                db.put_one(k, v);
            }
            w1.push(t.elapsed());

            // Random point reads over what was just written.
            let t = Instant::now();
            for &i in &order {
                assert_eq!(db.get(&items[i].0), Some(BLOB));
            }
            rd.push(t.elapsed());
            drop(db);

            // Batched durable commits.
            let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
            let db: Arc<dyn Candidate> = if name == "lmdb (heed)" {
                let l = Lmdb::open(dir.path());
                l.set_sync(true);
                Arc::new(l)
            } else {
                open(name, dir.path())
            };
            let t = Instant::now();
            for chunk in items.chunks(1000) {
                db.put_batch_durable(chunk);
            }
            wb.push(t.elapsed());
            drop(db);

            // Two writers at once, fast mode.
            let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
            let db = open(name, dir.path());
            let items = Arc::new(items.clone());
            let t = Instant::now();
            let handles: Vec<_> = (0..2)
                .map(|w| {
                    let db = db.clone();
                    let items = items.clone();
                    std::thread::spawn(move || {
                        for (k, v) in items.iter().skip(w).step_by(2) {
                            db.put_one(k, v);
                        }
                    })
                })
                .collect();
            for h in handles {
                h.join().unwrap();
            }
            cw.push(t.elapsed());
        }
        let per_op = |d: Duration| format!("{:.1} µs/op", d.as_secs_f64() * 1e6 / n as f64);
        println!(
            "{:<14} {:>22} {:>26} {:>18} {:>22}",
            name,
            per_op(median(w1)),
            per_op(median(wb)),
            per_op(median(rd)),
            per_op(median(cw)),
        );
    }
}
