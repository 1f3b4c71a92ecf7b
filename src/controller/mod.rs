//! The Kubernetes controller (`sombrero controller`): kube-runtime wiring for `GoldenImage`.
//!
//! - [`reconcile`]: observe (the spec's fields only the controller judges, the Secret, the
//!   shared inventory, the image's templates, its job, leftovers, the upstream checksum) ->
//!   [`decide`] (pure: a [`decide::Plan`] with the [`decide::Phase`], the status and its
//!   conditions, Events, the job to start, the output ConfigMap, the requeue) -> act (the
//!   writes: jobs, Events, ConfigMap, server-side apply of `status` with
//!   `observedGeneration`, `Ready`/`Reconciling`/`Stalled` as kstatus reads them, `Validated`,
//!   `UpToDate`, `build`, `versions`, `latest`, `lastValidation`), and a finalizer that
//!   honours `deletionPolicy`. [`triggers`] (pure) says when a build is due.
//! - [`jobs`]: the build -> validate -> promote job runs in the background, one per image,
//!   with a global and a per-node limit; a restarted controller resumes from `status.build`.
//!   Its [`jobs::Tracker`] holds each image's memory ([`memory`]: keyed by namespace, name
//!   and uid; the job, builds finished here, the last failed build and its retry policy, the
//!   error backoff).
//! - [`inventory`]: one `cluster/resources` list per Proxmox cluster per resync interval,
//!   shared by every object of that cluster.
//! - [`connection`]: the Proxmox connection from a Secret or the controller's default; Secrets
//!   are watched (metadata only: their stores keep name and resourceVersion) and a Secret is
//!   read once per resourceVersion (the parsed connection is kept in memory until the watch
//!   shows another), so a fixed credential takes effect at once.
//! - [`leader`]: a Lease (kube-lease-manager): only the leader acts; losing the lease stops the
//!   controller and the process exits (the pod restarts as a standby).
//! - [`http`] and [`metrics`]: `/metrics`, `/healthz`, `/readyz`.
//! - [`events`]: Events with names the API server accepts whatever the object's name.
//!
//! [`run`] joins the controllers into one future; a second controller (retention) is added
//! there next to the GoldenImage one.

pub mod connection;
pub mod context;
pub mod decide;
pub mod error;
pub mod events;
pub mod http;
pub mod inventory;
pub mod jobs;
pub mod leader;
pub mod memory;
pub mod metrics;
pub mod reconcile;
pub mod report;
pub mod retention;
pub mod runner;
pub mod source;
pub mod status;
pub mod triggers;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::api::{Api, ListParams};
use kube::core::PartialObjectMeta;
use kube::runtime::reflector::{self, ObjectRef};
use kube::runtime::{Controller, WatchStreamExt, controller, watcher};
use kube::{Client, ResourceExt};

use crate::api::GoldenImage;
use connection::DefaultConnection;
use context::{Context, JobRunner, Settings};
use events::{Recorder, Reporter};
use inventory::Inventories;
use jobs::{Limits, Tracker};

/// Objects per page of a watch's initial list: the page is held whole (with the managed fields
/// the stores drop) while its objects go into the store, so a smaller page lowers the start's
/// memory peak, which the process keeps as its resident size.
const LIST_PAGE: u32 = 100;

/// Everything `run` needs.
#[derive(Clone)]
pub struct Options {
    /// Watch only these namespaces (empty: all). Each gets its own watches, so the RBAC can be
    /// Roles in exactly these namespaces (the chart's `rbac.scope: namespaced`).
    pub namespaces: Vec<String>,
    pub metrics_addr: SocketAddr,
    pub leader_election: bool,
    pub lease_name: String,
    /// Namespace of the Lease (and of the default Proxmox Secret): the controller's own.
    pub controller_namespace: String,
    /// This replica's identity in the Lease (the pod name).
    pub identity: String,
    pub limits: Limits,
    pub settings: Settings,
    /// Reconciles running at once.
    pub concurrency: u16,
}

/// Runs the controller until a shutdown signal (Ok) or lost leadership (Err: exit so the pod
/// restarts and queues up as a standby).
pub async fn run(client: Client, opts: Options, runner: Arc<dyn JobRunner>) -> Result<(), String> {
    let metrics = Arc::new(metrics::Metrics::new());
    let ready = Arc::new(AtomicBool::new(false));
    let bound = http::serve(opts.metrics_addr, metrics.clone(), ready.clone())
        .await
        .map_err(|e| format!("cannot listen on {} for /metrics: {e}", opts.metrics_addr))?;
    tracing::info!(address = %bound, "serving /metrics, /healthz, /readyz");

    // One scope (all namespaces) or one per watched namespace: nothing is listed or watched
    // cluster-wide when namespaces are given.
    let scopes: Vec<Option<String>> = if opts.namespaces.is_empty() {
        vec![None]
    } else {
        opts.namespaces.iter().cloned().map(Some).collect()
    };
    for scope in &scopes {
        let gis: Api<GoldenImage> = scoped(&client, scope.as_deref());
        gis.list(&ListParams::default().limit(1)).await.map_err(|e| {
            format!("cannot list GoldenImages{} ({e}); install the CRDs with `sombrero crd | kubectl apply -f -` and check the RBAC", in_scope(scope.as_deref()))
        })?;
    }

    let mut lost = None;
    let mut lease_task = None;
    // Ready from here on: a standby waiting for the Lease is ready too.
    ready.store(true, Ordering::Relaxed);
    if opts.leader_election {
        let (rx, task) = leader::acquire(&client, &opts).await?;
        lost = Some(leader::lost(rx));
        lease_task = Some(task);
    }

    let ctx = Arc::new(Context {
        client: client.clone(),
        recorder: Recorder::new(
            client.clone(),
            Reporter {
                controller: opts.settings.manager.clone(),
                instance: Some(opts.identity.clone()),
            },
        ),
        tracker: Tracker::new(opts.limits, metrics.builds_running.clone()),
        metrics,
        inventories: Inventories::new(opts.settings.resync),
        runner,
        settings: opts.settings.clone(),
        connections: Default::default(),
        outputs: Default::default(),
        retention_errors: Mutex::new(HashMap::new()),
    });

    let mut controllers = Vec::new();
    for scope in &scopes {
        retention::preflight(&client, scope.as_deref()).await?;
        let retention = retention::controller(
            client.clone(),
            scope.as_deref(),
            opts.concurrency,
            ctx.clone(),
        );
        let golden = golden_image_controller(client.clone(), &opts, scope.as_deref(), ctx.clone());
        controllers.push(futures::future::join(golden, retention));
    }
    let golden = futures::future::join_all(controllers);
    let result = match lost {
        Some(lost) => {
            tokio::select! {
                _ = golden => Ok(()),
                _ = lost => Err("lost the leader Lease; exiting so the pod restarts as a standby".to_string()),
            }
        }
        None => {
            golden.await;
            Ok(())
        }
    };
    if let Some(t) = lease_task {
        t.abort();
    }
    result
}

/// The GoldenImage controller as a future (ends on a shutdown signal).
fn golden_image_controller(
    client: Client,
    opts: &Options,
    namespace: Option<&str>,
    ctx: Arc<Context>,
) -> impl std::future::Future<Output = ()> {
    let gis: Api<GoldenImage> = scoped(&client, namespace);
    let cms: Api<ConfigMap> = scoped(&client, namespace);
    // `PartialObjectMeta`: Secrets are listed and watched by their metadata only.
    let secrets: Api<PartialObjectMeta<Secret>> = scoped(&client, namespace);
    // The objects are kept without their managed fields and kubectl's last-applied copy (per
    // image the larger part of the object; nothing reads them).
    let (store, writer) = reflector::store();
    let images = watcher(
        gis,
        watcher::Config::default()
            .any_semantic()
            .page_size(LIST_PAGE),
    )
    .modify(strip_image)
    .reflect(writer)
    .applied_objects();
    let controller = Controller::for_stream(images, store.clone());
    let default_secret = match &opts.settings.default_connection {
        DefaultConnection::Secret { namespace, name } => Some((namespace.clone(), name.clone())),
        _ => None,
    };
    // The default Secret may live outside the watched namespace; watch it there too.
    let default_watch = default_secret.as_ref().and_then(|(ns, _)| {
        (namespace.is_some_and(|w| w != ns))
            .then(|| Api::<PartialObjectMeta<Secret>>::namespaced(client.clone(), ns))
    });
    // Secrets are watched by their metadata only: the controller must not hold every Secret's
    // data of the namespace (or cluster) in memory just to notice that a referenced one
    // changed. Their stores keep name and resourceVersion ([`connection::strip_secret_meta`]):
    // a reconcile reuses the connection parsed from the version the store shows, and reads the
    // Secret again when it shows another.
    let mapper = move |s: PartialObjectMeta<Secret>| {
        let ns = s.namespace().unwrap_or_default();
        let name = s.name_any();
        let is_default = default_secret
            .as_ref()
            .is_some_and(|(dn, dname)| *dn == ns && *dname == name);
        store
            .state()
            .into_iter()
            .filter(|gi| match &gi.spec.proxmox {
                Some(p) => gi.namespace().as_deref() == Some(&ns) && p.secret_ref.name == name,
                None => is_default,
            })
            .map(|gi| ObjectRef::from_obj(&*gi))
            .collect::<Vec<_>>()
    };
    // The store is written before the event reaches the mapper: the reconcile it triggers sees
    // the new version.
    let secret_stream = |api: Api<PartialObjectMeta<Secret>>| {
        let (reader, writer) = reflector::store();
        ctx.connections.watch(reader);
        watcher(api, watcher::Config::default().page_size(LIST_PAGE))
            .modify(connection::strip_secret_meta)
            .reflect(writer)
            .touched_objects()
    };
    let output_label = format!(
        "{}={}",
        reconcile::OUTPUT_LABEL.0,
        reconcile::OUTPUT_LABEL.1
    );
    // The output ConfigMaps, kept (stripped to what the comparison needs) so that a reconcile
    // applies one only when it differs from what the controller would write.
    let (outputs, outputs_writer) = reflector::store();
    ctx.outputs.watch(outputs);
    let cm_stream = watcher(
        cms,
        watcher::Config::default()
            .labels(&output_label)
            .page_size(LIST_PAGE),
    )
    .modify(reconcile::strip_config_map)
    .reflect(outputs_writer)
    .touched_objects();
    let mut c = controller
        .owns_stream(cm_stream)
        .watches_stream(secret_stream(secrets), mapper.clone());
    if let Some(api) = default_watch {
        c = c.watches_stream(secret_stream(api), mapper);
    }
    // A refresh of the shared inventory that changed an image's VMs (a template deleted in the
    // PVE UI, a tag edited) reconciles that image now rather than at its requeue.
    let scope = namespace.map(str::to_owned);
    let wakes = futures::stream::unfold(ctx.inventories.subscribe(), |mut rx| async move {
        loop {
            match rx.recv().await {
                Ok(image) => return Some((image, rx)),
                // Fell behind: those images are reconciled at their requeue.
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return None,
            }
        }
    })
    .filter_map(move |(ns, name)| {
        let ours = scope.as_deref().is_none_or(|s| s == ns);
        futures::future::ready(ours.then(|| ObjectRef::<GoldenImage>::new(&name).within(&ns)))
    });
    c = c.reconcile_on(wakes);
    c.with_config(controller::Config::default().concurrency(opts.concurrency))
        .shutdown_on_signal()
        .run(reconcile::reconcile, reconcile::error_policy, ctx)
        .for_each(|r| async move {
            if let Err(e) = r {
                tracing::debug!(error = %e, "controller event");
            }
        })
}

/// What the controller's store keeps of a GoldenImage: all but the managed fields and
/// `kubectl.kubernetes.io/last-applied-configuration` (a copy of the spec).
pub fn strip_image(gi: &mut GoldenImage) {
    gi.metadata.managed_fields = None;
    if let Some(a) = gi.metadata.annotations.as_mut() {
        a.remove(LAST_APPLIED);
    }
}

const LAST_APPLIED: &str = "kubectl.kubernetes.io/last-applied-configuration";

/// `kind` in `namespace`, or in all namespaces.
fn scoped<K>(client: &Client, namespace: Option<&str>) -> Api<K>
where
    K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>,
    K::DynamicType: Default,
{
    match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

/// " in namespace X" for error messages ("" for all namespaces).
fn in_scope(namespace: Option<&str>) -> String {
    namespace
        .map(|ns| format!(" in namespace {ns}"))
        .unwrap_or_default()
}

/// Defaults for tests and the CLI.
impl Settings {
    pub fn new(default_connection: DefaultConnection) -> Self {
        Settings {
            resync: Duration::from_secs(60),
            requeue: Duration::from_secs(300),
            poll: Duration::from_secs(3),
            default_connection,
            manager: "sombrero-controller".into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_store_keeps_an_image_without_managed_fields_and_the_last_applied_copy() {
        let mut gi: GoldenImage = serde_json::from_value(serde_json::json!({
            "apiVersion": "images.sombrero.dev/v1alpha1", "kind": "GoldenImage",
            "metadata": {"name": "img", "namespace": "ns",
                "annotations": {LAST_APPLIED: "{}", triggers::REBUILD_ANNOTATION: "now"},
                "managedFields": [{"manager": "kubectl", "operation": "Apply"}]},
            "spec": {"os": "ubuntu-24.04", "type": "minimal",
                "source": {"cloudImage": {"url": "https://x/y.img"}},
                "placement": {"node": "pve1"}}
        }))
        .unwrap();
        let spec = gi.spec.clone();
        strip_image(&mut gi);
        assert!(gi.metadata.managed_fields.is_none());
        let annotations = gi.metadata.annotations.unwrap();
        assert_eq!(
            annotations.keys().collect::<Vec<_>>(),
            vec![triggers::REBUILD_ANNOTATION],
            "the rebuild request stays"
        );
        assert_eq!(gi.spec, spec);
    }
}
