//! The local cache directory and the per-run records `recache stats` reads.
//!
//! ```text
//! <cache dir>/store/       the local store (LMDB + large-file pool)
//! <cache dir>/cache/       the embedded default remote (cas/, ac/), when no --remote is given
//! <cache dir>/sandboxes/   process sandboxes while they run
//! <cache dir>/runs.jsonl   one JSON line per `recache run` (appended; safe for concurrent runs;
//!                          rotated to runs.jsonl.1 at 4 MiB)
//! <cache dir>/totals.json  running totals over every run, updated under a file lock: what
//!                          `recache stats` reads, so it never reads the whole history
//! ```

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use hashing::Digest;
use process_execution::ProcessResult;
use remote_cache::{CacheContentBehavior, CacheStats};

use crate::CliError;

/// The resolved cache directory.
#[derive(Debug, Clone)]
pub struct CacheDir {
    root: PathBuf,
}

impl CacheDir {
    /// `--cache-dir`, else `$XDG_CACHE_HOME/recache`, else `~/.cache/recache`, created if
    /// missing.
    pub fn resolve(flag: Option<PathBuf>) -> Result<CacheDir, CliError> {
        CacheDir::create(CacheDir::locate(flag)?).map_err(CliError::new)
    }

    /// Where the cache directory is (not touching the disk). An error only when there is no
    /// way to tell: that is the user's to fix.
    pub fn locate(flag: Option<PathBuf>) -> Result<PathBuf, CliError> {
        match flag {
            Some(p) => Ok(p),
            None => match std::env::var_os("XDG_CACHE_HOME").filter(|v| !v.is_empty()) {
                Some(x) => Ok(PathBuf::from(x).join("recache")),
                None => match std::env::var_os("HOME").filter(|v| !v.is_empty()) {
                    Some(h) => Ok(PathBuf::from(h).join(".cache").join("recache")),
                    None => Err(CliError::new(
                        "cannot find a cache directory: set --cache-dir, RECACHE_CACHE_DIR, XDG_CACHE_HOME or HOME",
                    )),
                },
            },
        }
    }

    /// Creates (if needed) the cache directory at `root`. An error here is the disk's (full,
    /// read-only, no permission), and `recache run` then runs without the cache.
    pub fn create(root: PathBuf) -> Result<CacheDir, String> {
        std::fs::create_dir_all(&root)
            .map_err(|e| format!("cannot create the cache directory {}: {e}", root.display()))?;
        let root = root
            .canonicalize()
            .map_err(|e| format!("cache directory {}: {e}", root.display()))?;
        Ok(CacheDir { root })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }
    pub fn store_dir(&self) -> PathBuf {
        self.root.join("store")
    }
    /// Where the capabilities of the server at `address` (instance `instance`) are remembered
    /// between runs, so each `recache run` does not ask again.
    pub fn capabilities_file(&self, address: &str, instance: &str) -> PathBuf {
        let key = hashing::Digest::of_bytes(format!("{address}\0{instance}").as_bytes());
        self.root
            .join("capabilities")
            .join(&key.hash.to_hex()[..32])
    }

    pub fn default_cache_dir(&self) -> PathBuf {
        self.root.join("cache")
    }
    pub fn sandbox_dir(&self) -> PathBuf {
        self.root.join("sandboxes")
    }
    fn runs_file(&self) -> PathBuf {
        self.root.join("runs.jsonl")
    }
    fn totals_file(&self) -> PathBuf {
        self.root.join("totals.json")
    }

    /// Appends one run's record and adds it to the running totals. A failure to record is a
    /// warning, never an error.
    pub fn append_record(&self, record: &RunRecord) {
        if let Err(e) = self.try_append(record) {
            tracing::warn!("could not record this run in {}: {e}", self.root.display());
        }
    }

    fn try_append(&self, record: &RunRecord) -> std::io::Result<()> {
        use std::io::{Read, Seek};
        // The totals file is the lock: read, add, write back while holding it.
        let mut totals_file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(self.totals_file())?;
        totals_file.lock()?;
        let mut text = String::new();
        totals_file.read_to_string(&mut text)?;
        let mut totals: Totals = serde_json::from_str(&text).unwrap_or_default();
        totals.add(record);
        let json = serde_json::to_string(&totals).map_err(std::io::Error::other)?;
        totals_file.set_len(0)?;
        totals_file.seek(std::io::SeekFrom::Start(0))?;
        totals_file.write_all(json.as_bytes())?;

        let runs = self.runs_file();
        if std::fs::metadata(&runs).is_ok_and(|m| m.len() > RUNS_FILE_ROTATE_BYTES) {
            std::fs::rename(&runs, self.root.join("runs.jsonl.1"))?;
        }
        let line = format!("{}\n", record.to_json());
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(runs)?
            .write_all(line.as_bytes())
    }

    /// The running totals over every recorded run.
    pub fn totals(&self) -> Totals {
        std::fs::read_to_string(self.totals_file())
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok())
            .unwrap_or_default()
    }
}

/// `runs.jsonl` is rotated (to `runs.jsonl.1`, replacing the previous one) past this size; the
/// totals keep counting.
const RUNS_FILE_ROTATE_BYTES: u64 = 4 * 1024 * 1024;

/// Sums over every `recache run`, kept in `totals.json`.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct Totals {
    pub runs: u64,
    pub hits: u64,
    pub misses: u64,
    pub misses_after_error: u64,
    pub uncached_after_error: u64,
    pub bytes_downloaded: u64,
    pub bytes_uploaded: u64,
    pub time_saved_ms: f64,
}

impl Totals {
    fn add(&mut self, r: &RunRecord) {
        self.runs += 1;
        match r.cache {
            "hit" => self.hits += 1,
            "miss-after-error" => self.misses_after_error += 1,
            "uncached-after-error" => self.uncached_after_error += 1,
            _ => self.misses += 1,
        }
        self.bytes_downloaded += r.bytes_downloaded;
        self.bytes_uploaded += r.bytes_uploaded;
        self.time_saved_ms += r.time_saved_ms;
    }
}

/// What one `recache run` did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RunRecord {
    /// "hit", "miss", "miss-after-error" (the cache failed and the command ran locally), or
    /// "uncached-after-error" (the cache could not be used at all; the command ran without it).
    pub cache: &'static str,
    pub behavior: &'static str,
    pub action_digest: String,
    pub exit_code: i32,
    pub timed_out: bool,
    pub wall_time_ms: f64,
    pub original_run_time_ms: Option<f64>,
    pub time_saved_ms: f64,
    pub bytes_downloaded: u64,
    pub bytes_uploaded: u64,
    pub blobs_downloaded: u64,
    pub blobs_uploaded: u64,
    pub cache_written: bool,
    pub warnings: u64,
    /// Where the wall time went, in order (milliseconds): `setup` (flags, cache directory),
    /// `open_store`, `connect` (the cache's providers), `capture` (inputs into the store),
    /// `lookup` (the cache lookup and, on a hit, fetching what must be local; on a miss, the
    /// command itself), `restore` (outputs into the workspace, stdout and stderr replayed),
    /// `flush` (write-behind of a miss). Empty when the cache was not used.
    #[serde(serialize_with = "phases_as_map")]
    pub phases_ms: Vec<(&'static str, f64)>,
}

/// The phases as a JSON object, in order.
fn phases_as_map<S: serde::Serializer>(
    phases: &[(&'static str, f64)],
    s: S,
) -> Result<S::Ok, S::Error> {
    use serde::ser::SerializeMap;
    let mut map = s.serialize_map(Some(phases.len()))?;
    for (k, v) in phases {
        map.serialize_entry(k, v)?;
    }
    map.end()
}

/// Marks the end of each phase of a run (see [`RunRecord::phases_ms`]).
#[derive(Debug)]
pub struct Phases {
    last: std::time::Instant,
    done: Vec<(&'static str, f64)>,
}

impl Phases {
    /// Starts timing; the first phase began at `since`.
    pub fn since(since: std::time::Instant) -> Phases {
        Phases {
            last: since,
            done: Vec::new(),
        }
    }

    /// Ends the phase `name` now.
    pub fn mark(&mut self, name: &'static str) {
        let now = std::time::Instant::now();
        self.done.push((name, ms(now - self.last)));
        self.last = now;
    }

    /// The phases ended so far.
    pub fn into_inner(self) -> Vec<(&'static str, f64)> {
        self.done
    }
}

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

impl RunRecord {
    pub fn new(
        result: &ProcessResult,
        stats: &CacheStats,
        action_digest: Digest,
        behavior: CacheContentBehavior,
        wall: Duration,
    ) -> RunRecord {
        let cache = if crate::run::was_hit(result) {
            "hit"
        } else if stats.error_misses > 0 {
            "miss-after-error"
        } else {
            "miss"
        };
        RunRecord {
            cache,
            behavior: match behavior {
                CacheContentBehavior::Fetch => "fetch",
                CacheContentBehavior::Validate => "validate",
                CacheContentBehavior::Defer => "defer",
            },
            action_digest: action_digest.to_string(),
            exit_code: result.exit_code,
            timed_out: result.metadata.timed_out,
            wall_time_ms: ms(wall),
            original_run_time_ms: result.metadata.original_run_time.map(ms),
            time_saved_ms: ms(stats.time_saved),
            bytes_downloaded: stats.bytes_downloaded,
            bytes_uploaded: stats.bytes_uploaded,
            blobs_downloaded: stats.blobs_downloaded,
            blobs_uploaded: stats.blobs_uploaded,
            cache_written: stats.writes > 0,
            warnings: stats.warnings_logged,
            phases_ms: Vec::new(),
        }
    }

    /// A run that could not use the cache at all (see `run::run`).
    pub fn uncached(
        result: &ProcessResult,
        behavior: CacheContentBehavior,
        wall: Duration,
    ) -> RunRecord {
        let mut r = RunRecord::new(
            result,
            &CacheStats::default(),
            hashing::EMPTY_DIGEST,
            behavior,
            wall,
        );
        r.cache = "uncached-after-error";
        r.action_digest = String::new();
        r
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
    }

    /// The one-line human summary.
    pub fn summary(&self) -> String {
        let mut s = match self.cache {
            "hit" => format!("recache: hit ({})", self.behavior),
            "miss-after-error" => format!(
                "recache: miss ({}; the cache failed, ran locally)",
                self.behavior
            ),
            "uncached-after-error" => "recache: ran without the cache (it failed)".to_owned(),
            _ => format!("recache: miss ({})", self.behavior),
        };
        s += &format!(", exit {}", self.exit_code);
        if self.timed_out {
            s += " (timed out)";
        }
        s += &format!(", {}", human_ms(self.wall_time_ms));
        if self.cache == "hit" {
            if self.time_saved_ms > 0.0 {
                s += &format!(", saved {}", human_ms(self.time_saved_ms));
            }
            s += &format!(", {} down", human_bytes(self.bytes_downloaded));
        } else if self.cache == "uncached-after-error" {
        } else if self.cache_written {
            s += &format!(", cached ({} up)", human_bytes(self.bytes_uploaded));
        } else {
            s += ", not cached";
        }
        match self.action_digest.get(..12) {
            Some(short) => s + &format!(", action {short}"),
            None => s,
        }
    }
}

pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

fn human_ms(ms: f64) -> String {
    if ms >= 1000.0 {
        format!("{:.2} s", ms / 1000.0)
    } else {
        format!("{ms:.1} ms")
    }
}
