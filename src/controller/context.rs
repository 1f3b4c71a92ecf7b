//! What every reconcile shares: the Kubernetes client, the Event recorder, metrics, the Proxmox
//! inventories, the background jobs and the controller's settings.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::NaiveDate;
use futures::future::BoxFuture;

use super::connection::{ConnectionCache, DefaultConnection};
use super::events::Recorder;
use super::inventory::Inventories;
use super::jobs::{JobOutcome, ProgressHandle, Tracker};
use super::metrics::Metrics;
use kube::runtime::reflector::ObjectRef;

use crate::api::{GoldenImageSpec, TemplateRetention};
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
    /// See [`crate::builder::BuildRequest::fresh_id`].
    pub fresh_id: bool,
}

/// The engine behind the controller: build -> validate -> promote (or mark failed), and the
/// cleanup of leftover build and validation VMs. [`super::runner::EngineRunner`] is the real one
/// (`crate::builder`, `crate::validate`, `crate::promote`); the trait keeps the reconciler
/// testable without them.
pub trait JobRunner: Send + Sync + 'static {
    fn run(&self, request: JobRequest, progress: ProgressHandle) -> BoxFuture<'static, JobOutcome>;
    /// Destroys the owner's abandoned build VMs and stale validation clones; returns their VMIDs.
    /// A refused token is a stalled error (`Error::ProxmoxAuth`, `Error::Proxmox`), anything
    /// else transient.
    /// `names`: [`crate::builder::clone_names`] of the spec (a clone still carrying its base's tags).
    fn cleanup(
        &self,
        client: proxmox::Client,
        owner: Owner,
        names: Option<crate::builder::ImageNames>,
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

pub struct Context {
    pub client: kube::Client,
    pub recorder: Recorder,
    pub metrics: Arc<Metrics>,
    pub inventories: Inventories,
    pub tracker: Tracker,
    pub runner: Arc<dyn JobRunner>,
    pub settings: Settings,
    /// Connections parsed from Secrets, by the Secret watch's resourceVersion.
    pub connections: ConnectionCache,
    /// The watched output ConfigMaps (an unchanged one is not applied again).
    pub outputs: super::reconcile::OutputConfigMaps,
    /// Failed reconciles in a row per TemplateRetention, for the error backoff (the
    /// GoldenImages' is in their memory, [`Tracker`]).
    pub retention_errors: Mutex<HashMap<ObjectRef<TemplateRetention>, u32>>,
}

impl Context {
    /// Backoff after one more failed reconcile of `tr`: 5 s doubling to 5 min.
    pub fn retention_backoff(&self, tr: &TemplateRetention) -> Duration {
        let mut f = self
            .retention_errors
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let n = f.entry(ObjectRef::from_obj(tr)).or_insert(0);
        *n = n.saturating_add(1);
        super::memory::backoff(*n)
    }

    pub fn reset_retention_backoff(&self, tr: &TemplateRetention) {
        self.retention_errors
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&ObjectRef::from_obj(tr));
    }
}
