//! Benchmarks for recache live in `benches/`; this library holds what they and the
//! `perf-report` binary share.

// A measurement harness: a setup failure must stop the run loudly, not be worked around.
#![allow(clippy::expect_used, clippy::unwrap_used)]

pub mod asset;
pub mod hit;
pub mod http;
pub mod job_cache;
pub mod peers;
pub mod s3;
pub mod scale;
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
    status_kib_of("self", field)
}

/// A `/proc/<pid>/status` field in KiB (`pid` may be `self`).
fn status_kib_of(pid: &str, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
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

/// CPU time (user + system, all threads) process `pid` has used so far, seconds; `"self"` for
/// this process. From `/proc/<pid>/stat`, whose times are in USER_HZ (100 on Linux, fixed by
/// its ABI). `None` when the process is gone or not Linux.
pub fn cpu_secs(pid: &str) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces: count fields after its closing parenthesis.
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace().skip(11); // field 3 is the first after ')'
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some((utime + stime) as f64 / 100.0)
}

/// Writes every dirty page back (`sync`) before a timed section, so the disk is not still busy
/// with an earlier section's bytes (a 1 GiB transfer leaves gigabytes of writeback behind it,
/// which would land on whichever side is timed next). Best effort: a missing `sync` only warns.
pub fn settle_disk() {
    if let Err(e) = std::process::Command::new("sync").status() {
        eprintln!("bench: could not run sync: {e}");
    }
}

/// Size of the large blob the benches move, from `RECACHE_BENCH_BLOB_MIB` (default `default`).
pub fn blob_mib(default: usize) -> usize {
    std::env::var("RECACHE_BENCH_BLOB_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Current anonymous resident memory (heap, stacks; not file-backed pages), MiB.
pub fn rss_anon_mib() -> f64 {
    status_kib("RssAnon:").unwrap_or(0) as f64 / 1024.0
}

/// Samples [`rss_anon_mib`] every millisecond on a thread of its own while alive; `peak()`
/// stops it and returns the highest sample. The kernel keeps no peak of anonymous memory, so a
/// sampler is the way to see it apart from clean file pages mapped into the process.
pub struct AnonPeak {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    handle: std::thread::JoinHandle<f64>,
}

impl AnonPeak {
    /// Starts sampling this process.
    pub fn start() -> AnonPeak {
        Self::of("self".to_owned())
    }

    /// Starts sampling process `pid` (a child whose memory is measured); a process gone reads
    /// as nothing.
    pub fn of_pid(pid: u32) -> AnonPeak {
        Self::of(pid.to_string())
    }

    fn of(pid: String) -> AnonPeak {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let handle = std::thread::spawn(move || {
            let anon = || status_kib_of(&pid, "RssAnon:").unwrap_or(0) as f64 / 1024.0;
            let mut peak = anon();
            while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                peak = peak.max(anon());
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            peak.max(anon())
        });
        AnonPeak { stop, handle }
    }

    /// Stops sampling; the highest anonymous RSS seen, MiB.
    pub fn peak(self) -> f64 {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.handle.join().unwrap_or(0.0)
    }
}
