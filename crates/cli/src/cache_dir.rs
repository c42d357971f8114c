//! The local cache directory and the per-run records `recache stats` reads.
//!
//! ```text
//! <cache dir>/store/       the local store (LMDB + large-file pool)
//! <cache dir>/cache/       the embedded default remote (cas/, ac/), when no --remote is given
//! <cache dir>/sandboxes/   process sandboxes while they run
//! <cache dir>/runs.jsonl   one JSON line per `recache run` (appended; safe for concurrent runs)
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
    /// `--cache-dir`, else `$XDG_CACHE_HOME/recache`, else `~/.cache/recache`.
    pub fn resolve(flag: Option<PathBuf>) -> Result<CacheDir, CliError> {
        let root = match flag {
            Some(p) => p,
            None => match std::env::var_os("XDG_CACHE_HOME").filter(|v| !v.is_empty()) {
                Some(x) => PathBuf::from(x).join("recache"),
                None => match std::env::var_os("HOME").filter(|v| !v.is_empty()) {
                    Some(h) => PathBuf::from(h).join(".cache").join("recache"),
                    None => {
                        return Err(CliError::new(
                            "cannot find a cache directory: set --cache-dir, RECACHE_CACHE_DIR, XDG_CACHE_HOME or HOME",
                        ));
                    }
                },
            },
        };
        std::fs::create_dir_all(&root).map_err(|e| {
            CliError::new(format!(
                "cannot create the cache directory {}: {e}",
                root.display()
            ))
        })?;
        let root = root
            .canonicalize()
            .map_err(|e| CliError::new(format!("cache directory {}: {e}", root.display())))?;
        Ok(CacheDir { root })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }
    pub fn store_dir(&self) -> PathBuf {
        self.root.join("store")
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

    /// Appends one run's record. A failure to record is a warning, never an error.
    pub fn append_record(&self, record: &RunRecord) {
        let line = format!("{}\n", record.to_json());
        let result = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.runs_file())
            .and_then(|mut f| f.write_all(line.as_bytes()));
        if let Err(e) = result {
            tracing::warn!(
                "could not record this run in {}: {e}",
                self.runs_file().display()
            );
        }
    }

    /// Every recorded run (unreadable lines are skipped).
    pub fn records(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(self.runs_file())
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }
}

/// What one `recache run` did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RunRecord {
    /// "hit", "miss", or "miss-after-error" (the cache failed and the command ran locally).
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
        }
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
        } else if self.cache_written {
            s += &format!(", cached ({} up)", human_bytes(self.bytes_uploaded));
        } else {
            s += ", not cached";
        }
        s + &format!(", action {}", &self.action_digest[..12])
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
