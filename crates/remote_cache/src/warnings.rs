//! How often a recurring cache error is logged.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

/// Which occurrences of a recurring cache error get a log line. Errors are told apart by a key
/// naming the operation and the error's kind (never its message, which names action digests and
/// would make every occurrence "new"), so one flaky server does not drown out a different problem
/// and the number of keys stays small.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum WarningsBehavior {
    /// Never log (the counters still count).
    Ignore,
    /// Log the first occurrence of each distinct error only.
    FirstOnly,
    /// Log the 1st, 2nd, 4th, 8th, … occurrence of each distinct error. The default.
    #[default]
    Backoff,
    /// Log every occurrence.
    Always,
}

/// Counts occurrences per distinct error and decides which to log.
#[derive(Debug, Default)]
pub struct WarningsTracker {
    behavior: WarningsBehavior,
    seen: Mutex<HashMap<String, u64>>,
    logged: AtomicU64,
}

impl WarningsTracker {
    /// A tracker with `behavior`.
    pub fn new(behavior: WarningsBehavior) -> WarningsTracker {
        WarningsTracker {
            behavior,
            ..Default::default()
        }
    }

    /// Records one occurrence of the error `key` (operation and kind, e.g.
    /// `lookup/retryable-Unavailable`); logs `message` (as a warning) if the behavior says so.
    /// Returns whether it was logged.
    pub fn warn(&self, key: &str, message: &str) -> bool {
        let n = {
            let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
            let n = match seen.get_mut(key) {
                Some(n) => n,
                None => seen.entry(key.to_owned()).or_default(),
            };
            *n += 1;
            *n
        };
        let log = match self.behavior {
            WarningsBehavior::Ignore => false,
            WarningsBehavior::FirstOnly => n == 1,
            WarningsBehavior::Backoff => n.is_power_of_two(),
            WarningsBehavior::Always => true,
        };
        if log {
            self.logged.fetch_add(1, Ordering::Relaxed);
            if n > 1 {
                tracing::warn!(occurrences = n, "remote cache: {message} (seen {n} times)");
            } else {
                tracing::warn!("remote cache: {message}");
            }
        }
        log
    }

    /// How many warnings were logged.
    pub fn logged(&self) -> u64 {
        self.logged.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Which occurrences (1-based) of one repeated error were logged.
    fn logged_occurrences(behavior: WarningsBehavior, n: u64) -> Vec<u64> {
        let t = WarningsTracker::new(behavior);
        (1..=n)
            .filter(|i| t.warn("lookup/io", &format!("error for action {i}")))
            .collect()
    }

    #[test]
    fn backoff_logs_powers_of_two_per_distinct_error() {
        assert_eq!(
            logged_occurrences(WarningsBehavior::Backoff, 20),
            vec![1, 2, 4, 8, 16]
        );
        let t = WarningsTracker::new(WarningsBehavior::Backoff);
        for _ in 0..3 {
            t.warn("lookup/retryable-Unavailable", "server unavailable");
        }
        // A different error has its own count: its first occurrence is logged.
        assert!(t.warn("lookup/invalid-data", "digest mismatch"));
        assert_eq!(t.logged(), 3); // unavailable #1, #2, and mismatch #1
    }

    #[test]
    fn other_behaviors() {
        assert!(logged_occurrences(WarningsBehavior::Ignore, 10).is_empty());
        assert_eq!(logged_occurrences(WarningsBehavior::FirstOnly, 10), vec![1]);
        assert_eq!(
            logged_occurrences(WarningsBehavior::Always, 4),
            vec![1, 2, 3, 4]
        );
    }
}
