//! The access log (`--access-log FILE|-`): one JSON object per line per request, written by a
//! thread of its own so a request never waits for the disk. The queue is bounded
//! ([`QUEUE`] lines); when it is full, lines are dropped and counted (`dropped` in the next
//! line that gets through), never allowed to grow memory or slow a request.
//!
//! ```text
//! {"time":"2026-12-05T12:40:01.123Z","peer":"127.0.0.1:51234","identity":"ci","protocol":"grpc",
//!  "method":"GetActionResult","resource":"/build.bazel.remote.execution.v2.ActionCache/GetActionResult",
//!  "status":"NOT_FOUND","bytes":null,"duration_ms":0.41,"invocation_id":"6c1f…"}
//! ```
//!
//! `bytes` is the body's length for HTTP (what was sent for a GET, received for a PUT); gRPC
//! calls stream, and log `null`. `invocation_id` is REAPI's `tool_invocation_id`, from the
//! `requestmetadata-bin` header every REAPI client sends (Bazel's `--invocation_id`).

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError};

/// Lines waiting for the writer thread, at most.
pub const QUEUE: usize = 10_000;

/// One request, as logged.
#[derive(Debug, Clone, Default)]
pub(crate) struct Entry {
    pub peer: Option<String>,
    pub identity: Option<String>,
    pub protocol: &'static str,
    pub method: &'static str,
    pub resource: String,
    pub status: String,
    pub bytes: Option<u64>,
    pub duration: std::time::Duration,
    pub invocation_id: Option<String>,
}

/// The log: a bounded queue to its writer thread.
#[derive(Debug)]
pub(crate) struct AccessLog {
    tx: SyncSender<String>,
    dropped: AtomicU64,
}

impl AccessLog {
    /// Opens `target` (a file, appended to, or `-` for standard output) and starts the writer.
    pub fn open(target: &std::path::Path) -> std::io::Result<AccessLog> {
        let out: Box<dyn Write + Send> = if target == std::path::Path::new("-") {
            Box::new(std::io::stdout())
        } else {
            Box::new(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(target)?,
            )
        };
        let (tx, rx) = std::sync::mpsc::sync_channel(QUEUE);
        std::thread::Builder::new()
            .name("access-log".into())
            .spawn(move || write_lines(rx, out))?;
        Ok(AccessLog {
            tx,
            dropped: AtomicU64::new(0),
        })
    }

    /// Queues `entry` (dropped, and counted, when the queue is full).
    pub fn record(&self, entry: &Entry) {
        let dropped = self.dropped.swap(0, Ordering::Relaxed);
        match self.tx.try_send(line(entry, dropped)) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                self.dropped.fetch_add(dropped + 1, Ordering::Relaxed);
            }
        }
    }
}

/// Writes lines as they come, flushing whenever the queue runs dry; ends with the last sender.
fn write_lines(rx: Receiver<String>, out: Box<dyn Write + Send>) {
    let mut out = std::io::BufWriter::new(out);
    while let Ok(first) = rx.recv() {
        let _ = out.write_all(first.as_bytes());
        while let Ok(more) = rx.try_recv() {
            let _ = out.write_all(more.as_bytes());
        }
        let _ = out.flush();
    }
}

/// `s` as a JSON string.
pub(crate) fn json(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn opt(s: &Option<String>) -> String {
    s.as_deref().map_or_else(|| "null".to_owned(), json)
}

fn line(e: &Entry, dropped: u64) -> String {
    let mut l = format!(
        "{{\"time\":{},\"peer\":{},\"identity\":{},\"protocol\":{},\"method\":{},\"resource\":{},\"status\":{},\"bytes\":{},\"duration_ms\":{:.3},\"invocation_id\":{}",
        json(&now_rfc3339()),
        opt(&e.peer),
        opt(&e.identity),
        json(e.protocol),
        json(e.method),
        json(&e.resource),
        json(&e.status),
        e.bytes.map_or_else(|| "null".to_owned(), |b| b.to_string()),
        e.duration.as_secs_f64() * 1000.0,
        opt(&e.invocation_id),
    );
    if dropped > 0 {
        l.push_str(&format!(",\"dropped\":{dropped}"));
    }
    l.push_str("}\n");
    l
}

/// The time now as RFC 3339 UTC with milliseconds.
fn now_rfc3339() -> String {
    rfc3339(std::time::SystemTime::now())
}

/// `t` as RFC 3339 UTC with milliseconds.
pub(crate) fn rfc3339(t: std::time::SystemTime) -> String {
    let now = t.duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    let secs = now.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        now.subsec_millis()
    )
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn lines_are_json_with_every_field() {
        let e = Entry {
            peer: Some("127.0.0.1:9".into()),
            identity: Some("ci".into()),
            protocol: "http",
            method: "cas_get",
            resource: "/cas/ab\"c".into(),
            status: "404".into(),
            bytes: Some(12),
            duration: std::time::Duration::from_micros(1500),
            invocation_id: None,
        };
        let l = line(&e, 2);
        assert!(l.ends_with("}\n"));
        for part in [
            "\"peer\":\"127.0.0.1:9\"",
            "\"identity\":\"ci\"",
            "\"resource\":\"/cas/ab\\\"c\"",
            "\"status\":\"404\"",
            "\"bytes\":12",
            "\"duration_ms\":1.500",
            "\"invocation_id\":null",
            "\"dropped\":2",
        ] {
            assert!(l.contains(part), "{part} in {l}");
        }
        let t = now_rfc3339();
        assert_eq!(t.len(), "2026-12-05T12:40:01.123Z".len(), "{t}");
        assert!(t.starts_with("20") && t.ends_with('Z'), "{t}");
    }
}
