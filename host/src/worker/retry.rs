//! Retry policy: how many attempts a delivery gets and how long to wait
//! between them (`base * 2^(attempt-1)`, with jitter, never sooner than a
//! downstream `Retry-After`).

use std::time::Duration;

/// Upper bound on a single backoff, whatever the attempt count says.
const MAX_BACKOFF: Duration = Duration::from_secs(3600);

/// Attempts and backoff for deliveries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Total attempts, including the first.
    pub max_attempts: u32,
    /// Delay before the first retry.
    pub base_delay: Duration,
}

impl RetryPolicy {
    /// The un-jittered delay after failed attempt number `attempt` (1-based).
    pub fn backoff(&self, attempt: u32) -> Duration {
        let exp = attempt.saturating_sub(1).min(31);
        self.base_delay.saturating_mul(1u32 << exp).min(MAX_BACKOFF)
    }

    /// The delay to actually wait: the backoff with "equal jitter" (half
    /// fixed, half random, so retries of many jobs spread out but never come
    /// sooner than half the schedule), and at least `retry_after`.
    pub fn delay(&self, attempt: u32, retry_after: Option<Duration>, random: f64) -> Duration {
        let backoff = self.backoff(attempt);
        let half = backoff / 2;
        let jittered = half + half.mul_f64(random.clamp(0.0, 1.0));
        match retry_after {
            Some(at_least) => jittered.max(at_least.min(MAX_BACKOFF)),
            None => jittered,
        }
    }

    /// Whether another attempt is allowed after `attempt` attempts.
    pub fn may_retry(&self, attempt: u32) -> bool {
        attempt < self.max_attempts
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> RetryPolicy {
        RetryPolicy { max_attempts: 5, base_delay: Duration::from_millis(5000) }
    }

    #[test]
    fn backoff_doubles_from_the_base() {
        let p = policy();
        let schedule: Vec<u64> = (1..=5).map(|a| p.backoff(a).as_millis() as u64).collect();
        assert_eq!(schedule, [5000, 10_000, 20_000, 40_000, 80_000]);
    }

    #[test]
    fn backoff_is_capped() {
        assert_eq!(policy().backoff(40), MAX_BACKOFF);
    }

    #[test]
    fn jitter_stays_within_half_and_full_backoff() {
        let p = policy();
        assert_eq!(p.delay(2, None, 0.0), Duration::from_millis(5000));
        assert_eq!(p.delay(2, None, 1.0), Duration::from_millis(10_000));
        let mid = p.delay(2, None, 0.5);
        assert!(mid > Duration::from_millis(5000) && mid < Duration::from_millis(10_000));
    }

    #[test]
    fn retry_after_is_a_floor() {
        let p = policy();
        assert_eq!(p.delay(1, Some(Duration::from_secs(30)), 1.0), Duration::from_secs(30));
        assert_eq!(p.delay(3, Some(Duration::from_millis(1)), 0.0), Duration::from_millis(10_000));
    }

    #[test]
    fn attempts_stop_at_the_maximum() {
        let p = policy();
        assert!(p.may_retry(4));
        assert!(!p.may_retry(5));
    }
}
