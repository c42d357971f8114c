//! Counters of what the cache did, and the snapshot an embedding engine (or the CLI) reads.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Live counters, shared by the runner and its background writer.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub hits: AtomicU64,
    pub true_misses: AtomicU64,
    pub error_misses: AtomicU64,
    pub uncacheable: AtomicU64,
    pub speculation_local_wins: AtomicU64,
    pub blobs_downloaded: AtomicU64,
    pub bytes_downloaded: AtomicU64,
    pub blobs_uploaded: AtomicU64,
    pub bytes_uploaded: AtomicU64,
    pub writes: AtomicU64,
    pub write_errors: AtomicU64,
    pub writes_skipped: AtomicU64,
    pub writes_read_only: AtomicU64,
    pub writes_abandoned: AtomicU64,
    pub recoveries: AtomicU64,
    pub time_saved_micros: AtomicU64,
}

impl Counters {
    pub(crate) fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    pub(crate) fn snapshot(&self, warnings_logged: u64) -> CacheStats {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        CacheStats {
            hits: get(&self.hits),
            true_misses: get(&self.true_misses),
            error_misses: get(&self.error_misses),
            uncacheable: get(&self.uncacheable),
            speculation_local_wins: get(&self.speculation_local_wins),
            blobs_downloaded: get(&self.blobs_downloaded),
            bytes_downloaded: get(&self.bytes_downloaded),
            blobs_uploaded: get(&self.blobs_uploaded),
            bytes_uploaded: get(&self.bytes_uploaded),
            writes: get(&self.writes),
            write_errors: get(&self.write_errors),
            writes_skipped: get(&self.writes_skipped),
            writes_read_only: get(&self.writes_read_only),
            writes_abandoned: get(&self.writes_abandoned),
            breaker_trips: 0,
            recoveries: get(&self.recoveries),
            time_saved: Duration::from_micros(get(&self.time_saved_micros)),
            warnings_logged,
        }
    }
}

/// A snapshot of the cache's counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct CacheStats {
    /// Results served from the cache.
    pub hits: u64,
    /// Lookups that found nothing (or a result not usable under the cache scope).
    pub true_misses: u64,
    /// Lookups that failed (RPC error, timeout, missing or corrupt blob, unsafe result) and
    /// fell back to running locally.
    pub error_misses: u64,
    /// Processes that bypassed the cache (cache scope "never", or reads disabled).
    pub uncacheable: u64,
    /// Speculation: the local run finished before the cache lookup.
    pub speculation_local_wins: u64,
    /// Blobs fetched from the remote on hits.
    pub blobs_downloaded: u64,
    /// Bytes fetched from the remote on hits.
    pub bytes_downloaded: u64,
    /// Blobs uploaded by write-behind.
    pub blobs_uploaded: u64,
    /// Bytes uploaded by write-behind.
    pub bytes_uploaded: u64,
    /// Action results written.
    pub writes: u64,
    /// Write-behind jobs that failed.
    pub write_errors: u64,
    /// Results not written because the breaker was open, or because they came after
    /// `finish()`: lost to the cache.
    pub writes_skipped: u64,
    /// Results not written because the cache does not take this client's writes
    /// (`action_cache_update_enabled` off, or PERMISSION_DENIED on a write): by design.
    pub writes_read_only: u64,
    /// Writes queued or in flight when the breaker opened (a dead or hung cache), given up at
    /// once.
    pub writes_abandoned: u64,
    /// Times the circuit breaker opened (the cache kept failing and was left alone a while).
    pub breaker_trips: u64,
    /// Processes re-run to recover a blob missing after a deferred hit.
    pub recoveries: u64,
    /// Sum over hits of (original run time − time the hit took).
    #[serde(serialize_with = "as_millis")]
    pub time_saved: Duration,
    /// Warnings logged (after the warnings behavior's filtering).
    pub warnings_logged: u64,
}

fn as_millis<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_secs_f64() * 1000.0)
}
