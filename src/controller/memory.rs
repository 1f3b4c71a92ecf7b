//! What this process remembers of each GoldenImage between reconciles, keyed by the object
//! itself ([`ImageKey`]: namespace, name and uid, so a re-created object of the same name
//! starts afresh): its job (in [`super::jobs::Tracker`]), the builds it finished, its last
//! failed build and the error streak. Lost on restart by design: a restarted controller tries
//! once more. The retry policy of failed builds lives here, next to the memory it reads.

use std::fmt;
use std::time::Duration;

use chrono::{DateTime, Utc};
use kube::ResourceExt;

use super::jobs::FinishedHere;
use crate::api::GoldenImage;
use crate::engine::FailureReason;

/// One GoldenImage: namespace, name and uid.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ImageKey {
    pub namespace: String,
    pub name: String,
    pub uid: String,
}

impl ImageKey {
    pub fn of(gi: &GoldenImage) -> Self {
        ImageKey {
            namespace: gi.namespace().unwrap_or_default(),
            name: gi.name_any(),
            uid: gi.uid().unwrap_or_default(),
        }
    }
}

/// `namespace/name`, as logs show it.
impl fmt::Display for ImageKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// A build failure kept in memory, so the same spec is not rebuilt in a loop.
#[derive(Clone, Debug, PartialEq)]
pub struct FailedBuild {
    pub spec_hash: String,
    pub reason: FailureReason,
    pub message: String,
    /// `None`: not retried, wait for a new trigger. `Some`: retry from then on.
    pub retry_at: Option<DateTime<Utc>>,
    /// Failed attempts of this spec hash in a row (kept across the automatic retries; a spec
    /// change, a manual rebuild or a success starts over). Also the backoff's exponent.
    pub attempts: u32,
}

/// What one image's memory holds for [`super::decide::decide`].
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ImageMemory {
    pub failed: Option<FailedBuild>,
    pub finished: Option<FinishedHere>,
}

/// Attempts of one spec before a failure the spec itself may cause
/// ([`FailureReason::bounded`]) stops being retried.
pub const MAX_BUILD_ATTEMPTS: u32 = 3;

/// The number of the attempt that just failed: one more than the previous failure's when that
/// was of the same spec, else 1.
pub fn attempt_number(previous: Option<&FailedBuild>, spec_hash: &str) -> u32 {
    previous
        .filter(|f| f.spec_hash == spec_hash)
        .map_or(0, |f| f.attempts)
        .saturating_add(1)
}

/// How a failed build goes on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retry {
    /// Retried after the backoff.
    Again,
    /// Retryable, but the bound of attempts of this spec is reached.
    GaveUp,
    /// Retrying will not help: wait for a spec change or a rebuild request.
    Never,
}

/// Whether a failure with `reason` at attempt `attempt` is retried.
pub fn retry(retryable: bool, reason: FailureReason, attempt: u32) -> Retry {
    if !retryable {
        Retry::Never
    } else if reason.bounded() && attempt >= MAX_BUILD_ATTEMPTS {
        Retry::GaveUp
    } else {
        Retry::Again
    }
}

/// Backoff after the `n`-th consecutive failure: 5 s doubling to 5 min.
pub fn backoff(n: u32) -> Duration {
    let secs = 5u64.saturating_mul(1u64 << n.saturating_sub(1).min(10));
    Duration::from_secs(secs.min(300))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn failed(spec_hash: &str, attempts: u32) -> FailedBuild {
        FailedBuild {
            spec_hash: spec_hash.into(),
            reason: FailureReason::ProvisioningFailed,
            message: String::new(),
            retry_at: None,
            attempts,
        }
    }

    #[test]
    fn guest_failures_of_one_spec_are_retried_twice_then_stop() {
        let mut prev: Option<FailedBuild> = None;
        let mut retried = Vec::new();
        for _ in 0..3 {
            let n = attempt_number(prev.as_ref(), "h1");
            retried.push(retry(true, FailureReason::ProvisioningFailed, n));
            prev = Some(failed("h1", n));
        }
        assert_eq!(retried, [Retry::Again, Retry::Again, Retry::GaveUp]);
        // Another spec starts over.
        assert_eq!(attempt_number(prev.as_ref(), "h2"), 1);
        // Timeouts are bounded too; an unreachable Proxmox is retried without end, and a
        // permanent failure never.
        assert_eq!(retry(true, FailureReason::BuildTimeout, 3), Retry::GaveUp);
        assert_eq!(
            retry(true, FailureReason::ProxmoxUnreachable, 50),
            Retry::Again
        );
        assert_eq!(
            retry(false, FailureReason::ChecksumMismatch, 1),
            Retry::Never
        );
    }

    #[test]
    fn backoff_doubles_to_five_minutes() {
        let s: Vec<u64> = (1..=9).map(|n| backoff(n).as_secs()).collect();
        assert_eq!(s, vec![5, 10, 20, 40, 80, 160, 300, 300, 300]);
    }
}
