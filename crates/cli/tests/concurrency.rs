//! Issue 29: many `recache run` processes on one cache directory, with `recache gc` and
//! `--max-size` eviction racing them. The promise: every run exits with its command's status,
//! runs the command at most once, prints its stdout once, and leaves the right bytes.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

/// Runs in all, per variant.
const RUNS: usize = 320;
/// Runs at once (`-P 16`).
const PARALLEL: usize = 16;
/// Distinct commands: runs of one key hit each other's entries (when GC leaves them).
const KEYS: usize = 8;

fn is_root() -> bool {
    Command::new("id").arg("-u").output().unwrap().stdout == b"0\n"
}

/// `recache` as this user, or as `nobody` (uid 65534) when `nobody` is set and we are root.
fn recache(nobody: bool) -> Command {
    if nobody && is_root() {
        let mut c = Command::new("setpriv");
        c.args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
            .arg(env!("CARGO_BIN_EXE_recache"));
        c
    } else {
        Command::new(env!("CARGO_BIN_EXE_recache"))
    }
}

/// What went wrong across the runs (all zero is the promise).
#[derive(Debug, Default)]
struct Counts {
    runs: usize,
    bad_exit: usize,
    ran_twice: usize,
    stdout_wrong: usize,
    outputs_wrong: usize,
    hits: usize,
    /// Runs that printed a cache warning (the promise holds; the cache had trouble).
    warned: usize,
    /// Runs that printed more than one warning (a cache failure is one warning).
    many_warnings: usize,
    /// The distinct warnings (digests and paths blanked), for the report.
    warnings: std::collections::BTreeSet<String>,
    /// Files left behind once every run is over (sandboxes, lease holders, temp files).
    left_behind: Vec<String>,
    first_failures: Vec<String>,
}

/// The big output of key `k`: large enough for the pool (hardlinked read-only for a non-root
/// user), different per key.
fn big_output(k: usize) -> Vec<u8> {
    format!("key-{k} ").repeat(700_000 / 6).into_bytes()
}

fn concurrent_runs(nobody: bool) -> Counts {
    let base = tempfile::tempdir().unwrap();
    let cache = base.path().join("cache");
    let log = base.path().join("executions.log");
    std::fs::write(&log, "").unwrap();
    let workspaces: Vec<PathBuf> = (0..PARALLEL)
        .map(|w| {
            let ws = base.path().join(format!("ws{w}"));
            std::fs::create_dir_all(ws.join("src")).unwrap();
            std::fs::write(ws.join("src/in.txt"), "input\n").unwrap();
            ws
        })
        .collect();
    std::fs::create_dir_all(&cache).unwrap();
    if nobody && is_root() {
        let ok = Command::new("chown")
            .args(["-R", "65534:65534"])
            .arg(base.path())
            .status()
            .unwrap();
        assert!(ok.success());
    }
    let next = AtomicUsize::new(0);
    let done = AtomicBool::new(false);
    let counts = Mutex::new(Counts::default());
    let run_one = |ws: &Path, i: usize| -> (Output, u32, usize) {
        let k = i % KEYS;
        // `$PPID` is recache's PID: each execution of the command logs the run it belongs to.
        let script = format!(
            "echo $PPID >> {log}; yes 'key-{k} ' | tr -d '\\n' | head -c {size} > big.bin; \
             echo small-{k} > small.txt; echo stdout-{k}",
            log = log.display(),
            size = big_output(k).len(),
        );
        let child = recache(nobody)
            .current_dir(ws)
            .env_remove("RECACHE_REMOTE")
            .env("RECACHE_CACHE_DIR", &cache)
            .env("HOME", base.path())
            .args([
                "run",
                "--json",
                "--max-size",
                "3M",
                "--output",
                "big.bin",
                "--output",
                "small.txt",
                "--",
                "sh",
                "-c",
                &script,
            ])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let pid = child.id();
        (child.wait_with_output().unwrap(), pid, k)
    };
    std::thread::scope(|s| {
        // The GC loop: another process emptying the store as fast as it can.
        s.spawn(|| {
            while !done.load(Ordering::Acquire) {
                let _ = recache(nobody)
                    .env("RECACHE_CACHE_DIR", &cache)
                    .env("HOME", base.path())
                    .args(["gc", "--target-size", "0"])
                    .output();
            }
        });
        let workers: Vec<_> = workspaces
            .iter()
            .map(|ws| {
                s.spawn(|| {
                    loop {
                        let i = next.fetch_add(1, Ordering::AcqRel);
                        if i >= RUNS {
                            break;
                        }
                        let (out, pid, k) = run_one(ws, i);
                        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
                        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
                        let executions = std::fs::read_to_string(&log)
                            .unwrap()
                            .lines()
                            .filter(|l| l.trim() == pid.to_string())
                            .count();
                        let big = std::fs::read(ws.join("big.bin")).unwrap_or_default();
                        let small =
                            std::fs::read_to_string(ws.join("small.txt")).unwrap_or_default();
                        let mut c = counts.lock().unwrap();
                        c.runs += 1;
                        let mut failed = Vec::new();
                        if out.status.code() != Some(0) {
                            c.bad_exit += 1;
                            failed.push(format!("exit {:?}", out.status.code()));
                        }
                        if executions > 1 {
                            c.ran_twice += 1;
                            failed.push(format!("ran {executions} times"));
                        }
                        if stdout != format!("stdout-{k}\n") {
                            c.stdout_wrong += 1;
                            failed.push(format!("stdout {stdout:?}"));
                        }
                        if big != big_output(k) || small != format!("small-{k}\n") {
                            c.outputs_wrong += 1;
                            failed.push(format!("outputs wrong ({} bytes)", big.len()));
                        }
                        if stderr.contains("\"cache\":\"hit\"") {
                            c.hits += 1;
                        }
                        if stderr.contains("recache: warning") {
                            c.warned += 1;
                        }
                        let warning_lines = stderr
                            .lines()
                            .filter(|l| l.starts_with("recache: warning") || l.contains(" WARN "))
                            .count();
                        if warning_lines > 1 {
                            c.many_warnings += 1;
                            failed.push(format!("{warning_lines} warnings"));
                        }
                        for line in stderr
                            .lines()
                            .filter(|l| l.starts_with("recache: warning") || l.contains(" WARN "))
                        {
                            let shape: String = line
                                .split(' ')
                                .map(|w| {
                                    if w.len() > 40 || w.contains('/') {
                                        "…"
                                    } else {
                                        w
                                    }
                                })
                                .collect::<Vec<_>>()
                                .join(" ");
                            c.warnings.insert(shape);
                        }
                        if !failed.is_empty() && c.first_failures.len() < 5 {
                            c.first_failures
                                .push(format!("run {i}: {}\n{stderr}", failed.join(", ")));
                        }
                    }
                })
            })
            .collect();
        for w in workers {
            w.join().unwrap();
        }
        done.store(true, Ordering::Release);
    });
    let mut counts = counts.into_inner().unwrap();
    for (dir, allowed) in [
        (cache.join("sandboxes"), &[][..]),
        (cache.join("store/leases"), &["lock"][..]),
        (cache.join("cache/tmp"), &[][..]),
    ] {
        for e in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if !allowed.contains(&name.as_str()) {
                counts.left_behind.push(e.path().display().to_string());
            }
        }
    }
    counts
}

fn check(variant: &str, nobody: bool) {
    let c = concurrent_runs(nobody);
    eprintln!(
        "{variant}: {} runs, {} hits, {} with a cache warning; exit != 0: {}, ran twice: {}, \
         stdout wrong: {}, outputs wrong: {}, files left behind: {}, more than one warning: {}",
        c.runs,
        c.hits,
        c.warned,
        c.bad_exit,
        c.ran_twice,
        c.stdout_wrong,
        c.outputs_wrong,
        c.left_behind.len(),
        c.many_warnings
    );
    for w in &c.warnings {
        eprintln!("  {w}");
    }
    assert_eq!(c.runs, RUNS);
    assert!(
        c.bad_exit
            + c.ran_twice
            + c.stdout_wrong
            + c.outputs_wrong
            + c.left_behind.len()
            + c.many_warnings
            == 0,
        "{variant}: {c:?}\n{}",
        c.first_failures.join("\n---\n")
    );
}

#[test]
fn concurrent_runs_racing_gc_as_root() {
    if !is_root() {
        assert!(
            std::env::var("CI").is_err(),
            "the root variant needs root and CI=true is set"
        );
        eprintln!("SKIPPED: the root variant of the concurrency test needs root");
        return;
    }
    check("root", false);
}

#[test]
fn concurrent_runs_racing_gc_unprivileged() {
    check("unprivileged", true);
}
