//! One warning per run: however many ways the cache failed during a `recache run` (a lookup, a
//! fetch, a write, a blob another process evicted), the user sees one line about it, after the
//! command's own output, and the command's result is never in doubt.
//!
//! While a run collects ([`collect`]), the library's `WARN` events (the log writer below) and
//! recache's own warnings ([`warn`]) are kept instead of printed; [`finish`] prints the first
//! of recache's own (what it means for this run), else the first event, with a count of the
//! rest. `RECACHE_LOG=warn` (or any level) turns collecting off and prints every event as it
//! happens, for a user who wants the detail.

use std::io::Write;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

static COLLECTING: AtomicBool = AtomicBool::new(false);

/// Collected warnings (kept: the first few; counted: all).
static COLLECTED: Mutex<Collected> = Mutex::new(Collected {
    own: Vec::new(),
    events: Vec::new(),
    total: 0,
});

/// Warnings kept per kind, beyond which they are only counted.
const KEPT: usize = 8;

struct Collected {
    /// recache's own warnings: what the trouble meant for this run.
    own: Vec<String>,
    /// The libraries' log events.
    events: Vec<String>,
    total: usize,
}

fn collected() -> std::sync::MutexGuard<'static, Collected> {
    COLLECTED.lock().unwrap_or_else(|p| p.into_inner())
}

/// From now on, warnings are collected for [`finish`] instead of printed.
pub fn collect() {
    COLLECTING.store(true, Ordering::Release);
}

/// A warning of recache's own (without the `recache: warning:` prefix).
pub fn warn(message: impl Into<String>) {
    let message = message.into();
    if COLLECTING.load(Ordering::Acquire) {
        let mut c = collected();
        c.total += 1;
        if c.own.len() < KEPT {
            c.own.push(message);
        }
    } else {
        eprintln!("recache: warning: {message}");
    }
}

/// Prints what was collected as one line (nothing if nothing was), and stops collecting.
pub fn finish() {
    if !COLLECTING.swap(false, Ordering::AcqRel) {
        return;
    }
    let c = collected();
    let Some(first) = c.own.first().or(c.events.first()) else {
        return;
    };
    let more = c.total - 1;
    if more == 0 {
        eprintln!("recache: warning: {first}");
    } else {
        eprintln!(
            "recache: warning: {first} ({more} more cache warning{}; RECACHE_LOG=warn prints each)",
            if more == 1 { "" } else { "s" }
        );
    }
}

/// Where the log subscriber writes: stderr, or while collecting, the collection (one event per
/// writer, as the formatter makes one writer per event).
#[derive(Default)]
pub struct LogWriter {
    buf: Vec<u8>,
}

impl Write for LogWriter {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        if COLLECTING.load(Ordering::Acquire) {
            self.buf.extend_from_slice(data);
            Ok(data.len())
        } else {
            std::io::stderr().write(data)
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

impl Drop for LogWriter {
    fn drop(&mut self) {
        if self.buf.is_empty() {
            return;
        }
        let text = String::from_utf8_lossy(&self.buf);
        // The formatter's level column (" WARN ", "ERROR ") says nothing the summary does not.
        let text = text.trim();
        let text = text
            .strip_prefix("WARN ")
            .or_else(|| text.strip_prefix("ERROR "))
            .unwrap_or(text)
            .trim()
            .to_owned();
        let mut c = collected();
        c.total += 1;
        if c.events.len() < KEPT {
            c.events.push(text);
        }
    }
}
