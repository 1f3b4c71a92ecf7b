//! When and how long to wait before repeating a failed call.

use std::time::Duration;

use rand::Rng;

/// Exponential backoff with jitter for repeated calls.
#[derive(Debug, Clone, PartialEq)]
pub struct RetryPolicy {
    /// Total tries, the first included; `1` disables retries.
    pub max_attempts: u32,
    /// Delay before the second try.
    pub initial_delay: Duration,
    /// Upper bound of any single delay.
    pub max_delay: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 4,
            initial_delay: Duration::from_millis(200),
            max_delay: Duration::from_secs(5),
        }
    }
}

impl RetryPolicy {
    pub fn none() -> Self {
        RetryPolicy {
            max_attempts: 1,
            ..Self::default()
        }
    }

    /// The delay ceiling before try number `retry + 2` (`retry` counts from 0): doubling from
    /// `initial_delay`, capped at `max_delay`.
    pub fn ceiling(&self, retry: u32) -> Duration {
        let factor = 2u32.saturating_pow(retry.min(20));
        self.initial_delay
            .saturating_mul(factor)
            .min(self.max_delay)
    }

    /// The actual delay: "equal jitter", half the ceiling plus a random part of the other half,
    /// so that many controllers retrying at once spread out but never retry immediately.
    pub fn delay(&self, retry: u32) -> Duration {
        let ceiling = self.ceiling(retry);
        let half = ceiling / 2;
        let jitter = rand::rng().random_range(0.0..=1.0);
        half + half.mul_f64(jitter)
    }
}

/// Whether a repeated call can do harm.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Idempotency {
    /// Reads, and writes whose repetition changes nothing (agent ping): retry any transient failure.
    Safe,
    /// Creates and other state changes: retry only failures known to have happened before
    /// the call ran (no connection, pveproxy could not reach the node, a lock that could not be taken).
    Unsafe,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_the_cap_with_bounded_jitter() {
        let p = RetryPolicy {
            max_attempts: 10,
            initial_delay: Duration::from_millis(100),
            max_delay: Duration::from_secs(1),
        };
        let ceilings: Vec<u128> = (0..6).map(|r| p.ceiling(r).as_millis()).collect();
        assert_eq!(ceilings, vec![100, 200, 400, 800, 1000, 1000]);
        for r in 0..8 {
            for _ in 0..50 {
                let d = p.delay(r);
                assert!(d >= p.ceiling(r) / 2 && d <= p.ceiling(r), "{r}: {d:?}");
            }
        }
        // No overflow for absurd retry counts.
        assert_eq!(p.ceiling(u32::MAX), Duration::from_secs(1));
    }
}
