//! What `recache serve` counts, and `GET /metrics` in Prometheus's text format. Every label set
//! is bounded: protocol, method or route (fixed names), status code (the protocol's own),
//! direction, compression, source: never a digest, an instance or an invocation id.
//!
//! Where each is counted: requests and latencies by the front ends (`grpc.rs` per method,
//! `http.rs` per route); ActionCache hits and misses, FindMissingBlobs asked and missing,
//! uploads in flight by the core; reservations refused by `Inner::reserve`; evictions by the
//! store (`LocalStore::evictions`); Remote Asset fetches by `asset.rs`; the S3 tier's queue,
//! journal, failures and cooldowns by `tier.rs`; store size and paused uploads are read when
//! scraped.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

/// Upper bounds of the latency histograms' buckets, in seconds.
const BUCKETS: [f64; 16] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0,
];

#[derive(Debug, Default, Clone)]
struct Histogram {
    counts: [u64; BUCKETS.len()],
    count: u64,
    sum: f64,
}

impl Histogram {
    fn observe(&mut self, seconds: f64) {
        for (i, le) in BUCKETS.iter().enumerate() {
            if seconds <= *le {
                self.counts[i] += 1;
            }
        }
        self.count += 1;
        self.sum += seconds;
    }
}

/// The canonical name of a gRPC status code (the `code` and `status` labels).
pub(crate) fn grpc_code_label(code: i32) -> &'static str {
    const NAMES: [&str; 17] = [
        "OK",
        "CANCELLED",
        "UNKNOWN",
        "INVALID_ARGUMENT",
        "DEADLINE_EXCEEDED",
        "NOT_FOUND",
        "ALREADY_EXISTS",
        "PERMISSION_DENIED",
        "RESOURCE_EXHAUSTED",
        "FAILED_PRECONDITION",
        "ABORTED",
        "OUT_OF_RANGE",
        "UNIMPLEMENTED",
        "INTERNAL",
        "UNAVAILABLE",
        "DATA_LOSS",
        "UNAUTHENTICATED",
    ];
    usize::try_from(code)
        .ok()
        .and_then(|i| NAMES.get(i))
        .copied()
        .unwrap_or("UNKNOWN")
}

/// A request's labels: protocol, method or route, status code.
type CallKey = (&'static str, &'static str, String);

/// The server's counters (see the module docs).
#[derive(Debug, Default)]
pub(crate) struct Metrics {
    requests: Mutex<BTreeMap<CallKey, u64>>,
    latency: Mutex<BTreeMap<(&'static str, &'static str), Histogram>>,
    /// (protocol, direction, compression) → bytes on the wire.
    bytes: Mutex<BTreeMap<(&'static str, &'static str, &'static str), u64>>,
    /// (source, status) → Remote Asset fetches.
    asset_fetches: Mutex<BTreeMap<(&'static str, &'static str), u64>>,
    pub ac_hits: AtomicU64,
    pub ac_misses: AtomicU64,
    pub ac_misses_outputs_gone: AtomicU64,
    pub find_missing_asked: AtomicU64,
    pub find_missing_missing: AtomicU64,
    pub reservations_refused: AtomicU64,
    pub uploads_in_flight: AtomicI64,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Metrics {
    /// One request of `protocol` to `method`, answered with `code`, in `took`.
    pub fn request(
        &self,
        protocol: &'static str,
        method: &'static str,
        code: &str,
        took: Duration,
    ) {
        *lock(&self.requests)
            .entry((protocol, method, code.to_owned()))
            .or_default() += 1;
        lock(&self.latency)
            .entry((protocol, method))
            .or_default()
            .observe(took.as_secs_f64());
    }

    /// `n` bytes of blob content on the wire.
    pub fn bytes(&self, protocol: &'static str, direction: &'static str, zstd: bool, n: u64) {
        let compression = if zstd { "zstd" } else { "identity" };
        *lock(&self.bytes)
            .entry((protocol, direction, compression))
            .or_default() += n;
    }

    /// A Remote Asset fetch answered from `source` (`index`, `cas`, `origin`) with `status`.
    pub fn asset_fetch(&self, source: &'static str, status: &'static str) {
        *lock(&self.asset_fetches)
            .entry((source, status))
            .or_default() += 1;
    }

    /// A guard counting one upload in flight while it lives.
    pub fn upload(self: &std::sync::Arc<Self>) -> InFlight {
        self.uploads_in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(self.clone())
    }
}

/// One upload in flight (see [`Metrics::upload`]).
#[derive(Debug)]
pub(crate) struct InFlight(std::sync::Arc<Metrics>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.uploads_in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Values read when scraped.
pub(crate) struct Gauges {
    pub stored_bytes: u64,
    pub stored_blobs: u64,
    pub max_bytes: u64,
    pub evicted_blobs: u64,
    pub evicted_bytes: u64,
    pub paused_uploads: usize,
    /// With an S3 tier: queue depth, journal rows, upload failures, cooldowns started.
    pub s3: Option<S3Gauges>,
}

pub(crate) struct S3Gauges {
    pub queue: u64,
    pub journal_rows: u64,
    pub upload_failures: u64,
    pub cooldowns: u64,
}

/// Appends one metric family: its HELP and TYPE lines, then its samples.
fn family(out: &mut String, name: &str, kind: &str, help: &str, samples: &[(String, String)]) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
    for (labels, value) in samples {
        if labels.is_empty() {
            let _ = writeln!(out, "{name} {value}");
        } else {
            let _ = writeln!(out, "{name}{{{labels}}} {value}");
        }
    }
}

impl Metrics {
    /// The text exposition format (version 0.0.4).
    pub fn render(&self, g: &Gauges) -> String {
        let mut out = String::new();
        let requests: Vec<(String, String)> = lock(&self.requests)
            .iter()
            .map(|((p, m, c), n)| {
                (
                    format!("protocol=\"{p}\",method=\"{m}\",code=\"{c}\""),
                    n.to_string(),
                )
            })
            .collect();
        family(
            &mut out,
            "recache_requests_total",
            "counter",
            "Requests by protocol, gRPC method or HTTP route, and status code.",
            &requests,
        );
        let _ = writeln!(
            out,
            "# HELP recache_request_duration_seconds Time to answer a request (to the first byte of a streamed answer)."
        );
        let _ = writeln!(out, "# TYPE recache_request_duration_seconds histogram");
        for ((p, m), h) in lock(&self.latency).iter() {
            for (le, n) in BUCKETS.iter().zip(h.counts) {
                let _ = writeln!(
                    out,
                    "recache_request_duration_seconds_bucket{{protocol=\"{p}\",method=\"{m}\",le=\"{le}\"}} {n}"
                );
            }
            let _ = writeln!(
                out,
                "recache_request_duration_seconds_bucket{{protocol=\"{p}\",method=\"{m}\",le=\"+Inf\"}} {}",
                h.count
            );
            let _ = writeln!(
                out,
                "recache_request_duration_seconds_sum{{protocol=\"{p}\",method=\"{m}\"}} {}",
                h.sum
            );
            let _ = writeln!(
                out,
                "recache_request_duration_seconds_count{{protocol=\"{p}\",method=\"{m}\"}} {}",
                h.count
            );
        }
        let bytes: Vec<(String, String)> = lock(&self.bytes)
            .iter()
            .map(|((p, d, c), n)| {
                (
                    format!("protocol=\"{p}\",direction=\"{d}\",compression=\"{c}\""),
                    n.to_string(),
                )
            })
            .collect();
        family(
            &mut out,
            "recache_blob_bytes_total",
            "counter",
            "Blob bytes on the wire, by protocol, direction (in: uploads, out: downloads) and compression.",
            &bytes,
        );
        let n = |a: &AtomicU64| a.load(Ordering::Relaxed).to_string();
        family(
            &mut out,
            "recache_action_cache_requests_total",
            "counter",
            "ActionCache lookups by result: hit, miss, or miss because the entry's outputs were gone.",
            &[
                ("result=\"hit\"".into(), n(&self.ac_hits)),
                ("result=\"miss\"".into(), n(&self.ac_misses)),
                (
                    "result=\"miss_outputs_gone\"".into(),
                    n(&self.ac_misses_outputs_gone),
                ),
            ],
        );
        family(
            &mut out,
            "recache_find_missing_digests_total",
            "counter",
            "Digests asked about by FindMissingBlobs, and those reported missing.",
            &[
                ("result=\"asked\"".into(), n(&self.find_missing_asked)),
                ("result=\"missing\"".into(), n(&self.find_missing_missing)),
            ],
        );
        family(
            &mut out,
            "recache_store_bytes",
            "gauge",
            "Bytes of blobs stored.",
            &[(String::new(), g.stored_bytes.to_string())],
        );
        family(
            &mut out,
            "recache_store_max_bytes",
            "gauge",
            "The bound on stored bytes (--max-size).",
            &[(String::new(), g.max_bytes.to_string())],
        );
        family(
            &mut out,
            "recache_store_blobs",
            "gauge",
            "Blobs stored.",
            &[(String::new(), g.stored_blobs.to_string())],
        );
        family(
            &mut out,
            "recache_evicted_blobs_total",
            "counter",
            "Blobs evicted (least recently used first).",
            &[(String::new(), g.evicted_blobs.to_string())],
        );
        family(
            &mut out,
            "recache_evicted_bytes_total",
            "counter",
            "Bytes of blobs evicted.",
            &[(String::new(), g.evicted_bytes.to_string())],
        );
        family(
            &mut out,
            "recache_reservations_refused_total",
            "counter",
            "Uploads refused because the cache (or its disk) had no room for them.",
            &[(String::new(), n(&self.reservations_refused))],
        );
        family(
            &mut out,
            "recache_uploads",
            "gauge",
            "Uploads in progress, and paused ones a client may resume.",
            &[
                (
                    "state=\"in_flight\"".into(),
                    self.uploads_in_flight.load(Ordering::Relaxed).to_string(),
                ),
                ("state=\"paused\"".into(), g.paused_uploads.to_string()),
            ],
        );
        let assets: Vec<(String, String)> = lock(&self.asset_fetches)
            .iter()
            .map(|((s, st), n)| (format!("source=\"{s}\",status=\"{st}\""), n.to_string()))
            .collect();
        family(
            &mut out,
            "recache_asset_fetches_total",
            "counter",
            "Remote Asset fetches by where the answer came from (index, cas, origin) and status.",
            &assets,
        );
        if let Some(s3) = &g.s3 {
            family(
                &mut out,
                "recache_s3_queue",
                "gauge",
                "Uploads to the S3 bucket not done yet.",
                &[(String::new(), s3.queue.to_string())],
            );
            family(
                &mut out,
                "recache_s3_journal_rows",
                "gauge",
                "Rows in the S3 upload journal (blobs kept until they are in the bucket).",
                &[(String::new(), s3.journal_rows.to_string())],
            );
            family(
                &mut out,
                "recache_s3_upload_failures_total",
                "counter",
                "Uploads to the S3 bucket that failed (and will be retried).",
                &[(String::new(), s3.upload_failures.to_string())],
            );
            family(
                &mut out,
                "recache_s3_cooldowns_total",
                "counter",
                "Times the S3 bucket failed a client's request and was left alone for the cooldown.",
                &[(String::new(), s3.cooldowns.to_string())],
            );
        }
        out
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn the_text_format_is_what_prometheus_reads() {
        let m = Metrics::default();
        m.request("grpc", "FindMissingBlobs", "OK", Duration::from_millis(3));
        m.request("grpc", "FindMissingBlobs", "OK", Duration::from_millis(30));
        m.bytes("http", "out", false, 4096);
        let text = m.render(&Gauges {
            stored_bytes: 10,
            stored_blobs: 1,
            max_bytes: 100,
            evicted_blobs: 0,
            evicted_bytes: 0,
            paused_uploads: 0,
            s3: None,
        });
        assert!(text.contains(
            "recache_requests_total{protocol=\"grpc\",method=\"FindMissingBlobs\",code=\"OK\"} 2"
        ));
        assert!(text.contains(
            "recache_request_duration_seconds_bucket{protocol=\"grpc\",method=\"FindMissingBlobs\",le=\"0.005\"} 1"
        ));
        assert!(text.contains(
            "recache_request_duration_seconds_count{protocol=\"grpc\",method=\"FindMissingBlobs\"} 2"
        ));
        assert!(text.contains(
            "recache_blob_bytes_total{protocol=\"http\",direction=\"out\",compression=\"identity\"} 4096"
        ));
        assert!(!text.contains("recache_s3_"));
    }
}
