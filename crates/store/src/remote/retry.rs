//! Bounded retries with jittered exponential backoff.
//!
//! Whether an error is worth retrying is decided once, by [`StoreError::is_retryable`] (from the
//! gRPC code). The attempt count is honored exactly: `attempts = 3` means at most three calls.

use std::time::Duration;

use crate::error::StoreError;

/// Total attempts per operation, first call included. Three rides out a server restart or a
/// dropped connection without making a dead server cost a build more than a second or so.
pub const DEFAULT_ATTEMPTS: u32 = 3;
/// Delay before the first retry; doubled for each further one.
pub const DEFAULT_BASE_DELAY: Duration = Duration::from_millis(50);
/// Ceiling on a single delay, so backoff never stalls a build for long.
pub const DEFAULT_MAX_DELAY: Duration = Duration::from_secs(2);

/// How often and how patiently to retry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Total attempts including the first (at least 1).
    pub attempts: u32,
    /// Delay before the first retry.
    pub base_delay: Duration,
    /// Longest single delay.
    pub max_delay: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            attempts: DEFAULT_ATTEMPTS,
            base_delay: DEFAULT_BASE_DELAY,
            max_delay: DEFAULT_MAX_DELAY,
        }
    }
}

/// Tracks the attempts of one operation.
///
/// The loop every operation runs:
///
/// ```text
/// let mut retry = Retry::new(policy, || format!("BatchReadBlobs on {address}"));
/// loop {
///     match call().await {
///         Ok(v) => return Ok(v),
///         Err(e) => retry.backoff_or_fail(e).await?,
///     }
/// }
/// ```
pub(crate) struct Retry<W: Fn() -> String> {
    policy: RetryPolicy,
    /// Names the operation in errors and logs; only called when something failed, so the hot
    /// path formats nothing.
    what: W,
    attempt: u32,
}

impl<W: Fn() -> String> Retry<W> {
    pub(crate) fn new(policy: RetryPolicy, what: W) -> Retry<W> {
        Retry {
            policy,
            what,
            attempt: 1,
        }
    }

    /// The attempt about to run or running (1-based).
    pub(crate) fn attempt(&self) -> u32 {
        self.attempt
    }

    /// After a failed attempt: sleeps and returns `Ok` when another attempt is allowed, or
    /// returns the error (with the attempt count in its context) when it is not.
    pub(crate) async fn backoff_or_fail(&mut self, err: StoreError) -> Result<(), StoreError> {
        let attempts = self.policy.attempts.max(1);
        if !err.is_retryable() || self.attempt >= attempts {
            let note = if err.is_retryable() {
                format!("{}: gave up after {} attempts", (self.what)(), self.attempt)
            } else {
                (self.what)()
            };
            return Err(err.context(note));
        }
        let delay = self.delay();
        tracing::debug!(what = %(self.what)(), attempt = self.attempt, ?delay, error = %err, "retrying");
        tokio::time::sleep(delay).await;
        self.attempt += 1;
        Ok(())
    }

    /// base × 2^(attempt-1), capped, with ±50 % jitter so clients do not retry in lockstep.
    fn delay(&self) -> Duration {
        let exp = self
            .policy
            .base_delay
            .saturating_mul(1u32 << (self.attempt - 1).min(16));
        let capped = exp.min(self.policy.max_delay);
        let r = (uuid::Uuid::new_v4().as_u128() % 1000) as f64 / 1000.0; // [0, 1)
        capped.mul_f64(0.5 + r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorKind;

    #[tokio::test]
    async fn honors_the_attempt_count_exactly() {
        let policy = RetryPolicy {
            attempts: 4,
            base_delay: Duration::from_millis(1),
            max_delay: Duration::from_millis(2),
        };
        let mut retry = Retry::new(policy, || "op".to_owned());
        let mut calls = 0;
        let err = loop {
            calls += 1;
            let e = StoreError::new(ErrorKind::Retryable(tonic::Code::Unavailable), "down");
            if let Err(e) = retry.backoff_or_fail(e).await {
                break e;
            }
        };
        assert_eq!(calls, 4);
        assert!(
            err.to_string().contains("gave up after 4 attempts"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn does_not_retry_fatal_errors() {
        let mut retry = Retry::new(RetryPolicy::default(), || "op".to_owned());
        let e = StoreError::invalid("bad");
        assert!(retry.backoff_or_fail(e).await.is_err());
        assert_eq!(retry.attempt(), 1);
    }

    #[test]
    fn delays_grow_and_are_capped() {
        let policy = RetryPolicy {
            attempts: 10,
            base_delay: Duration::from_millis(100),
            max_delay: Duration::from_millis(400),
        };
        let mut r = Retry::new(policy, || "op".to_owned());
        let d1 = r.delay();
        assert!(d1 >= Duration::from_millis(50) && d1 < Duration::from_millis(150));
        r.attempt = 8;
        let d8 = r.delay();
        assert!(d8 >= Duration::from_millis(200) && d8 < Duration::from_millis(600));
    }
}
