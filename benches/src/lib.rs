//! Benchmarks for recache live in `benches/`; this library holds what they and the
//! `perf-report` binary share.

// A measurement harness: a setup failure must stop the run loudly, not be worked around.
#![allow(clippy::expect_used, clippy::unwrap_used)]

pub mod hit;
pub mod transfer;

/// Deterministic pseudo-random bytes, so benchmarks need no fixtures and hash realistic,
/// incompressible data.
pub use testutil::data::pseudo_random as pseudo_random_bytes;

/// Resets the kernel's peak-RSS mark for this process (Linux ≥ 4.0), so a following
/// [`peak_rss_mib`] reports the peak of what runs in between.
pub fn reset_peak_rss() -> std::io::Result<()> {
    std::fs::write("/proc/self/clear_refs", "5")
}

fn status_kib(field: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Current resident set size, MiB.
pub fn rss_mib() -> f64 {
    status_kib("VmRSS:").unwrap_or(0) as f64 / 1024.0
}

/// Peak resident set size since the last [`reset_peak_rss`], MiB.
pub fn peak_rss_mib() -> f64 {
    status_kib("VmHWM:").unwrap_or(0) as f64 / 1024.0
}

/// Size of the large blob the benches move, from `RECACHE_BENCH_BLOB_MIB` (default `default`).
pub fn blob_mib(default: usize) -> usize {
    std::env::var("RECACHE_BENCH_BLOB_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}
