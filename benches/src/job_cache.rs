//! The `job_cache` section of `perf-report` (issue 23): `recache cache save|restore` against
//! what actions/cache and Buildomat do (tar + `zstd -T0` of the same paths into one blob,
//! uploaded by ByteStream; downloaded and extracted), side by side in one run, on one generated
//! tree shaped like a cargo `target/debug` (a flat `deps/` of many files, most small, some large,
//! and a `.fingerprint/` of small directories): 20 000 files and 1 GiB (`--quick`: 4 000 files,
//! 128 MiB), half its bytes random and half repetitive, as build outputs compress.
//!
//! It drives the release `recache` binary (as a CI job does: build it first with
//! `cargo build --release -p recache`), against `recache serve` (started from the same binary)
//! and a `file://` directory. Per backend, rows `<backend>_<row>`:
//! - `full_save_s`, `baseline_save_s`: the whole tree, nothing in the cache yet;
//! - `cold_restore_s`, `baseline_restore_s`, `cold_over_baseline` (goal ≤ 1.0): into an empty
//!   local store and an empty destination;
//! - `warm_restore_s`, `warm_over_baseline` (goal ≤ 0.2): the local store already holding the
//!   blobs; `warm_floor_copy_s`, `warm_floor_over_baseline`, `warm_over_floor`: `cp -a` of the
//!   same tree from the page cache, the least any restore that writes the files costs;
//! - `incremental_save_s`, `incremental_over_baseline_save` (goal ≤ 0.25) and
//!   `incremental_upload_fraction` (goal ≤ 0.03): a save after 1 % of the files changed;
//! - `peak_anon_mib` (goal ≤ 128 growth): the largest anonymous memory of any of our
//!   commands (sampled; the kernel's peak RSS would also count the store's memory-mapped
//!   database pages, which are page cache).

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use hashing::Digest;

/// The tree's shape.
struct Shape {
    files: usize,
    bytes: u64,
}

/// A deterministic generator (xorshift64*).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

/// Writes the tree under `root/target`: 90 % of the files small (1–16 KiB), the rest sharing
/// what is left of `shape.bytes`. Returns the paths of the files (relative to `root`).
fn generate(root: &Path, shape: &Shape) -> Vec<PathBuf> {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    // A source buffer: half random, half a repeated phrase; files are slices of it.
    let mut source = vec![0u8; 64 << 20];
    for (i, chunk) in source.chunks_mut(4096).enumerate() {
        if i % 2 == 0 {
            for b in chunk.iter_mut() {
                *b = rng.next() as u8;
            }
        } else {
            for (j, b) in chunk.iter_mut().enumerate() {
                *b = b"fn main() { println!(\"hello\"); } // build output "[j % 48];
            }
        }
    }
    let small = shape.files * 9 / 10;
    let small_bytes: u64 = (0..small)
        .map(|i| 1024 + (i as u64 * 7919) % (15 * 1024))
        .sum();
    let large = shape.files - small;
    let large_each = (shape.bytes.saturating_sub(small_bytes) / large.max(1) as u64).max(1);
    let deps = root.join("target/debug/deps");
    let fingerprint = root.join("target/debug/.fingerprint");
    std::fs::create_dir_all(&deps).expect("deps dir");
    std::fs::create_dir_all(&fingerprint).expect("fingerprint dir");
    let mut out = Vec::with_capacity(shape.files);
    for i in 0..shape.files {
        let size = if i < small {
            (1024 + (i as u64 * 7919) % (15 * 1024)) as usize
        } else {
            large_each.min(source.len() as u64 / 2) as usize
        };
        let rel = if i < small && i % 3 == 0 {
            let d = fingerprint.join(format!("crate{}-{:016x}", i / 3, rng.next()));
            std::fs::create_dir_all(&d).expect("fingerprint entry");
            d.strip_prefix(root).expect("under root").join("lib-crate")
        } else {
            PathBuf::from(format!("target/debug/deps/lib{i}-{:016x}.rlib", rng.next()))
        };
        let start = (rng.next() as usize) % (source.len() - size);
        let mut bytes = source[start..start + size].to_vec();
        // Distinct content per file.
        bytes[..8].copy_from_slice(&(i as u64).to_le_bytes());
        std::fs::write(root.join(&rel), &bytes).expect("writing a file");
        out.push(rel);
    }
    out
}

/// Runs a child to the end; its wall time, peak anonymous memory (MiB, sampled by
/// [`crate::AnonPeak`]: the kernel's peak RSS also counts the store's memory-mapped database
/// pages, which are page cache, not memory the process holds) and stdout, failing loudly if it
/// fails.
fn timed(cmd: &mut Command) -> (f64, f64, Vec<u8>) {
    let started = Instant::now();
    let child = cmd
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("starting a child");
    let anon = crate::AnonPeak::of_pid(child.id());
    let out = child.wait_with_output().expect("waiting for a child");
    let secs = started.elapsed().as_secs_f64();
    let anon_mib = anon.peak();
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    (secs, anon_mib, out.stdout)
}

/// Times a shell pipeline.
fn timed_sh(script: &str) -> f64 {
    timed(Command::new("sh").args(["-ec", script])).0
}

fn round(v: f64) -> f64 {
    (v * 1000.0).round() / 1000.0
}

/// The baseline's save: tar + `zstd -T0` of `target` into one file, stored locally and
/// uploaded to `address` (ByteStream for a server). Returns (seconds, blob).
async fn baseline_save(root: &Path, work: &Path, address: &str) -> (f64, Digest) {
    let started = Instant::now();
    let tarball = work.join("target.tar.zst");
    timed_sh(&format!(
        "tar -C '{}' -cf - target | zstd -T0 -q -o '{}'",
        root.display(),
        tarball.display()
    ));
    let store = client_store(&work.join("baseline-save-store"), address).await;
    let d = store
        .local()
        .store_file(&tarball, false)
        .expect("storing the tarball");
    store
        .ensure_remote_has_recursive(HashSet::from([d]), HashSet::new())
        .await
        .expect("uploading the tarball");
    (started.elapsed().as_secs_f64(), d)
}

/// The baseline's restore: the blob downloaded (streamed, verified) into a fresh local store,
/// then `zstd -d | tar -x` into `dest`.
async fn baseline_restore(blob: Digest, work: &Path, address: &str, dest: &Path) -> f64 {
    let started = Instant::now();
    let store = client_store(&work.join("baseline-restore-store"), address).await;
    store
        .ensure_downloaded(HashSet::from([blob]), HashSet::new())
        .await
        .expect("downloading the tarball");
    let file = match store.local().load_file(blob).expect("the tarball") {
        Some(p) => p,
        None => {
            let p = work.join("downloaded.tar.zst");
            let bytes = store
                .local()
                .load_bytes(blob)
                .expect("the tarball")
                .expect("present");
            std::fs::write(&p, bytes).expect("writing the tarball");
            p
        }
    };
    std::fs::create_dir_all(dest).expect("destination");
    timed_sh(&format!(
        "zstd -d -q -c '{}' | tar -C '{}' -xf -",
        file.display(),
        dest.display()
    ));
    started.elapsed().as_secs_f64()
}

async fn client_store(dir: &Path, address: &str) -> store::Store {
    let local = store::LocalStore::open(store::LocalStoreOptions::new(dir)).expect("a store");
    let providers =
        store::remote::provider_from_address(address, store::remote::grpc::GrpcOptions::default())
            .await
            .expect("the cache");
    store::Store::with_remote(local, providers.bytes)
}

/// `recache cache ARGS` with `cache` as the cache directory, in `root`.
fn recache(bin: &Path, root: &Path, cache: &Path, address: &str, args: &[&str]) -> (f64, f64, u64) {
    let (secs, rss, stdout) = timed(
        Command::new(bin)
            .current_dir(root)
            .env("RECACHE_CACHE_DIR", cache)
            .arg("cache")
            .args(args)
            .args(["--json", "--remote", address]),
    );
    let v: serde_json::Value = serde_json::from_slice(&stdout).unwrap_or_default();
    (secs, rss, v["bytes_transferred"].as_u64().unwrap_or(0))
}

/// The section, or `None` when the release `recache` binary is not built.
pub async fn report(quick: bool, dir: &Path) -> Option<serde_json::Value> {
    let bin = std::env::current_exe().ok()?.parent()?.join("recache");
    if !bin.exists() {
        return None;
    }
    let shape = if quick {
        Shape {
            files: 4_000,
            bytes: 128 << 20,
        }
    } else {
        Shape {
            files: 20_000,
            bytes: 1 << 30,
        }
    };
    let mut rows = serde_json::Map::new();
    let base = dir.join("job-cache");
    let _ = std::fs::remove_dir_all(&base);
    let root = base.join("ws");
    let files = generate(&root, &shape);
    rows.insert("tree_files".into(), serde_json::json!(shape.files));
    rows.insert("tree_mib".into(), serde_json::json!(shape.bytes >> 20));

    // recache serve from the same binary; a file:// directory.
    let serve_dir = base.join("server");
    let mut serve = Command::new(&bin);
    serve
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--max-size",
            "40G",
            "--storage",
        ])
        .arg(&serve_dir);
    let (mut server, grpc) = testutil::real_servers::spawn_serve(serve);
    let file_remote = format!("file://{}", base.join("shared").display());
    for (name, address) in [("serve", grpc.as_str()), ("file", file_remote.as_str())] {
        let work = base.join(format!("work-{name}"));
        std::fs::create_dir_all(&work).ok()?;
        let key = format!("bench-{name}");
        let mut peak: f64 = 0.0;
        let mut row = |k: &str, v: f64| {
            rows.insert(format!("{name}_{k}"), serde_json::json!(round(v)));
        };
        // Full save (ours, then the baseline's).
        let saver = work.join("saver");
        let (full_s, rss, full_up) =
            recache(&bin, &root, &saver, address, &["save", &key, "target"]);
        peak = peak.max(rss);
        let (base_save_s, blob) = baseline_save(&root, &work, address).await;
        row("full_save_s", full_s);
        row("baseline_save_s", base_save_s);
        // Cold restore, then the baseline's, each into an empty destination.
        let restore_root = work.join("restored");
        std::fs::create_dir_all(&restore_root).ok()?;
        let restorer = work.join("restorer");
        let (cold_s, rss, _) = recache(&bin, &restore_root, &restorer, address, &["restore", &key]);
        peak = peak.max(rss);
        let base_restore_s =
            baseline_restore(blob, &work, address, &work.join("baseline-restored")).await;
        row("cold_restore_s", cold_s);
        row("baseline_restore_s", base_restore_s);
        row("cold_over_baseline", cold_s / base_restore_s);
        // Warm restore: the local store holds every blob; the destination is empty again.
        std::fs::remove_dir_all(restore_root.join("target")).ok()?;
        let (warm_s, rss, _) = recache(&bin, &restore_root, &restorer, address, &["restore", &key]);
        peak = peak.max(rss);
        row("warm_restore_s", warm_s);
        row("warm_over_baseline", warm_s / base_restore_s);
        // The floor of any restore that writes the files: `cp -a` of the same tree, its source
        // in the page cache (copy_file_range, no hashing, no store), into an empty directory.
        let floor_dest = work.join("floor-copy");
        let start = Instant::now();
        let copied = Command::new("cp")
            .arg("-a")
            .arg(root.join("target"))
            .arg(&floor_dest)
            .status()
            .is_ok_and(|s| s.success());
        if copied {
            let floor_s = start.elapsed().as_secs_f64();
            row("warm_floor_copy_s", floor_s);
            row("warm_floor_over_baseline", floor_s / base_restore_s);
            row("warm_over_floor", warm_s / floor_s);
        }
        let _ = std::fs::remove_dir_all(&floor_dest);
        // 1 % of the files changed, saved again.
        for (i, rel) in files.iter().enumerate().filter(|(i, _)| i % 100 == 7) {
            let p = root.join(rel);
            let mut bytes = std::fs::read(&p).ok()?;
            bytes[..8].copy_from_slice(&(u64::MAX - i as u64).to_le_bytes());
            std::fs::write(&p, bytes).ok()?;
        }
        let (inc_s, rss, inc_up) = recache(
            &bin,
            &root,
            &saver,
            address,
            &["save", &format!("{key}-2"), "target"],
        );
        peak = peak.max(rss);
        row("incremental_save_s", inc_s);
        row("incremental_over_baseline_save", inc_s / base_save_s);
        row(
            "incremental_upload_fraction",
            inc_up as f64 / full_up.max(1) as f64,
        );
        row("peak_anon_mib", peak);
        let _ = std::fs::remove_dir_all(&work);
    }
    let _ = server.kill();
    let _ = server.wait();
    let _ = std::fs::remove_dir_all(&base);
    Some(serde_json::Value::Object(rows))
}
