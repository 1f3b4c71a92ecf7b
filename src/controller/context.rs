//! What every reconcile shares: the Kubernetes client, the Event recorder, metrics, the Proxmox
//! inventories, the background jobs and the controller's settings.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::NaiveDate;
use futures::future::BoxFuture;

use super::builds::{JobOutcome, ProgressHandle, Tracker};
use super::connection::DefaultConnection;
use super::events::Recorder;
use super::inventory::Inventories;
use super::metrics::Metrics;
use crate::api::GoldenImageSpec;
use crate::image::marker::Owner;
use crate::proxmox;

/// One job for the background pipeline.
#[derive(Clone)]
pub struct JobRequest {
    pub client: proxmox::Client,
    pub spec: GoldenImageSpec,
    pub owner: Owner,
    pub build_id: String,
    pub today: NaiveDate,
}

/// The engine behind the controller: build -> validate -> promote (or mark failed), and the
/// cleanup of leftover build and validation VMs. [`super::engine::Engine`] is the real one
/// (`crate::build`, `crate::validate`, `crate::promote`); the trait keeps the reconciler
/// testable without them.
pub trait Pipeline: Send + Sync + 'static {
    fn run(&self, request: JobRequest, progress: ProgressHandle) -> BoxFuture<'static, JobOutcome>;
    /// Destroys the owner's abandoned build VMs and stale validation clones; returns their VMIDs.
    /// A refused token is a stalled error (`Error::ProxmoxAuth`, `Error::Proxmox`), anything
    /// else transient.
    fn cleanup(
        &self,
        client: proxmox::Client,
        owner: Owner,
    ) -> BoxFuture<'static, Result<Vec<u32>, super::error::Error>>;
}

/// Settings from the command line.
#[derive(Clone, Debug)]
pub struct Settings {
    /// How old the shared inventory may be (one list per cluster per interval).
    pub resync: Duration,
    /// Requeue of a GoldenImage at steady state.
    pub requeue: Duration,
    /// Requeue while a job runs (progress into status).
    pub poll: Duration,
    pub default_connection: DefaultConnection,
    /// Field manager and Event reporter name.
    pub manager: String,
}

/// A build failure kept in memory, so the same spec is not rebuilt in a loop.
#[derive(Clone, Debug)]
pub struct FailedBuild {
    pub spec_hash: String,
    pub reason: &'static str,
    pub message: String,
    /// `None`: permanent, wait for a new trigger. `Some`: retry after this instant.
    pub retry_at: Option<std::time::Instant>,
    /// Failed attempts of this spec hash in a row (kept across the automatic retries; a spec
    /// change, a manual rebuild or a success starts over).
    pub attempts: u32,
}

/// Attempts of one spec before a failure the spec itself may cause stops being retried.
pub const MAX_BUILD_ATTEMPTS: u32 = 3;

/// Retryable failures that a spec can cause as well as bad luck: a guest command that fails
/// (a mirror mid-sync, or a command that always fails) or a step that times out. Retrying
/// them forever would rebuild from scratch every few minutes, so they are bounded. Proxmox
/// being unreachable is not: no spec change fixes an outage, and the retries are cheap.
pub fn is_bounded(reason: &str) -> bool {
    matches!(reason, "ProvisioningFailed" | "BuildTimeout")
}

/// The number of the attempt that just failed: one more than the previous failure's when that
/// was of the same spec, else 1.
pub fn attempt_number(previous: Option<&FailedBuild>, spec_hash: &str) -> u32 {
    previous
        .filter(|f| f.spec_hash == spec_hash)
        .map_or(0, |f| f.attempts)
        .saturating_add(1)
}

/// Whether a failure with `reason` at attempt `attempt` is retried.
pub fn retry_again(retryable: bool, reason: &str, attempt: u32) -> bool {
    retryable && !(is_bounded(reason) && attempt >= MAX_BUILD_ATTEMPTS)
}

pub struct Context {
    pub client: kube::Client,
    pub recorder: Recorder,
    pub metrics: Arc<Metrics>,
    pub inventories: Inventories,
    pub tracker: Tracker,
    pub pipeline: Arc<dyn Pipeline>,
    pub settings: Settings,
    pub failed: Mutex<HashMap<String, FailedBuild>>,
    /// Consecutive failures per object, for the error backoff.
    pub failures: Mutex<HashMap<String, u32>>,
}

impl Context {
    /// Backoff after the `n`-th consecutive failure: 5 s doubling to 5 min.
    pub fn backoff(&self, key: &str) -> Duration {
        let mut f = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        let n = f.entry(key.to_string()).or_insert(0);
        *n = n.saturating_add(1);
        backoff(*n)
    }

    pub fn reset_backoff(&self, key: &str) {
        self.failures
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(key);
    }
}

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
            reason: "ProvisioningFailed",
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
            retried.push(retry_again(true, "ProvisioningFailed", n));
            prev = Some(failed("h1", n));
        }
        assert_eq!(retried, [true, true, false]);
        // Another spec starts over.
        assert_eq!(attempt_number(prev.as_ref(), "h2"), 1);
        // Timeouts are bounded too; an unreachable Proxmox is retried without end, and a
        // permanent failure never.
        assert!(!retry_again(true, "BuildTimeout", 3));
        assert!(retry_again(true, "ProxmoxUnreachable", 50));
        assert!(!retry_again(false, "ChecksumMismatch", 1));
    }

    #[test]
    fn backoff_doubles_to_five_minutes() {
        let s: Vec<u64> = (1..=9).map(|n| super::backoff(n).as_secs()).collect();
        assert_eq!(s, vec![5, 10, 20, 40, 80, 160, 300, 300, 300]);
    }
}
