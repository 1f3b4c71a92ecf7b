//! The GoldenImage reconciler in three steps: [`observe`] (every read: the spec's fields only
//! the controller can judge, the Proxmox connection, the shared inventory's snapshot, the
//! image's templates, its job, leftover validation clones, the upstream checksum),
//! [`decide::decide`] (pure: the plan) and [`act`] (every write: the job, Events, leftovers,
//! the output ConfigMap, the status). Errors are categorised: bad spec or credentials give
//! `Stalled=True`, transient Proxmox trouble `Reconciling=True` and a backoff requeue; never a
//! crash loop. Deletion runs the finalizer ([`cleanup`]).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::{Api, ObjectMeta, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType};
use kube::runtime::finalizer::{Event as Finalizer, finalizer};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Resource, ResourceExt};
use serde_json::json;
use tracing::{info, warn};

use super::connection;
use super::context::{Context, JobRequest};
use super::decide::{
    self, About, Note, Observation, Plan, SourceCheck, Timing, ValidSpec, Version,
};
use super::error::{ActError, Error, ObserveError, Result, SpecError};
use super::inventory::{ClusterInventory, Snapshot};
use super::jobs::{JobOutcome, JobView};
use super::memory::ImageKey;
use super::status;
use super::triggers::{self, Attempt, REBUILD_ANNOTATION};
use crate::api::golden_image::{DeletionPolicy, GoldenImage, GoldenImageStatus};
use crate::image::marker::{Owner, Ownership, Role, SourceInfo, ownership};
use crate::image::version::{TemplateVersion, ValidationStatus, VmFacts};
use crate::proxmox;
use crate::retention::{self, Purpose, Scope, Target};

pub const FINALIZER: &str = "images.sombrero.dev/cleanup";
const KIND: &str = "GoldenImage";

fn owner_of(gi: &GoldenImage) -> Owner {
    Owner {
        namespace: gi.namespace().unwrap_or_default(),
        name: gi.name_any(),
        uid: gi.uid().unwrap_or_default(),
    }
}

/// Entry point for kube-runtime: metrics, finalizer dispatch, and the error's status.
#[tracing::instrument(skip(gi, ctx), fields(object = %ImageKey::of(&gi)))]
pub async fn reconcile(gi: Arc<GoldenImage>, ctx: Arc<Context>) -> Result<Action> {
    let _timer = ctx.metrics.reconcile_started(KIND);
    let ns = gi.namespace().unwrap_or_default();
    let api: Api<GoldenImage> = Api::namespaced(ctx.client.clone(), &ns);
    let result = finalizer(&api, FINALIZER, gi.clone(), |event| async {
        match event {
            Finalizer::Apply(gi) => apply(&gi, &ctx).await,
            Finalizer::Cleanup(gi) => cleanup(&gi, &ctx).await,
        }
    })
    .await;
    match result {
        Ok(action) => {
            ctx.tracker.reset_errors(&ImageKey::of(&gi));
            Ok(action)
        }
        Err(kube::runtime::finalizer::Error::ApplyFailed(e))
        | Err(kube::runtime::finalizer::Error::CleanupFailed(e)) => {
            report_error(&gi, &ctx, &e).await;
            Err(e)
        }
        Err(kube::runtime::finalizer::Error::AddFinalizer(e))
        | Err(kube::runtime::finalizer::Error::RemoveFinalizer(e)) => Err(Error::Kube(e)),
        Err(e) => Err(Error::Transient(e.to_string())),
    }
}

/// After a failed reconcile: count it; requeue with backoff (a Stalled object is retried
/// slowly too, but a change of the object or its Secret triggers a reconcile at once).
pub fn error_policy(gi: Arc<GoldenImage>, error: &Error, ctx: Arc<Context>) -> Action {
    ctx.metrics.reconcile_failed(KIND, error.category());
    let delay = if error.is_stalled() {
        Duration::from_secs(300)
    } else {
        ctx.tracker.error_backoff(&ImageKey::of(&gi))
    };
    Action::requeue(delay)
}

/// Publishes one Event about `gi`.
async fn publish(ctx: &Context, gi: &GoldenImage, note: &Note) {
    let related = note.about.as_ref().map(|a| {
        let (kind, name) = match a {
            About::Build(id) => ("SombreroBuild", id.clone()),
            About::Stage(id, stage) => ("SombreroBuildStage", format!("{id}.{stage}")),
            About::Template(vmid) => ("ProxmoxTemplate", vmid.to_string()),
        };
        k8s_openapi::api::core::v1::ObjectReference {
            kind: Some(kind.into()),
            name: Some(name),
            ..Default::default()
        }
    });
    let ev = Event {
        type_: note.type_,
        reason: note.reason.clone(),
        note: Some(note.text.chars().take(1000).collect()),
        action: note.action.to_string(),
        secondary: related,
    };
    if let Err(e) = ctx.recorder.publish(&ev, &gi.object_ref(&())).await {
        warn!(error = %e, reason = note.reason, "cannot publish Event");
    }
}

async fn event(
    ctx: &Context,
    gi: &GoldenImage,
    type_: EventType,
    reason: &str,
    action: &'static str,
    text: String,
) {
    let note = Note {
        type_,
        reason: reason.to_string(),
        action,
        text,
        about: None,
    };
    publish(ctx, gi, &note).await
}

/// Writes the error into the conditions and an Event.
async fn report_error(gi: &GoldenImage, ctx: &Context, e: &Error) {
    warn!(category = e.category(), error = %e, "reconcile failed");
    event(
        ctx,
        gi,
        EventType::Warning,
        e.reason(),
        "Reconcile",
        e.message(),
    )
    .await;
    let mut st = gi.status.clone().unwrap_or_default();
    let verdict = super::report::error_verdict(&st.conditions, e);
    status::apply(
        &mut st.conditions,
        &verdict,
        gi.metadata.generation,
        Utc::now(),
    );
    st.observed_generation = gi.metadata.generation;
    if let Err(err) = write_status(ctx, gi, &st).await {
        warn!(error = %err, "cannot write status");
    }
}

async fn write_status(
    ctx: &Context,
    gi: &GoldenImage,
    st: &GoldenImageStatus,
) -> Result<(), kube::Error> {
    super::report::write_status(ctx, gi, gi.status.as_ref(), st).await
}

/// The spec hash the build records in its markers (compared with the newest template's).
pub fn current_spec_hash(gi: &GoldenImage) -> Result<String, SpecError> {
    crate::image::spec_hash::spec_hash(&gi.spec)
        .map_err(|e| SpecError::new("", format!("cannot hash the spec: {e}")))
}

/// What the schema cannot judge: the cron schedule, the check interval, the spec hash.
pub fn validate_spec(gi: &GoldenImage) -> Result<ValidSpec, SpecError> {
    let schedule = gi
        .spec
        .rebuild
        .schedule
        .as_deref()
        .map(triggers::parse_schedule)
        .transpose()?;
    let check_interval = gi
        .spec
        .rebuild
        .source_check_interval
        .parsed()
        .map_err(|e| SpecError::new("rebuild.sourceCheckInterval", e.to_string()))?;
    Ok(ValidSpec {
        spec_hash: current_spec_hash(gi)?,
        schedule,
        check_interval,
    })
}

/// Templates of this image (ours, role template, this owner), newest first.
fn versions(snap: &Snapshot, uid: &str) -> Vec<Version> {
    let mut out: Vec<Version> = snap
        .of_owner(uid)
        .filter(|v| v.vm.template)
        .filter_map(|v| {
            let m = v.read.marker.as_deref()?;
            if ownership(Some(m), v.vm.vmid) != Ownership::Ours(Role::Template) {
                return None;
            }
            let template = TemplateVersion::from_vm(VmFacts {
                vmid: v.vm.vmid,
                node: &v.vm.node,
                name: v
                    .vm
                    .name
                    .as_deref()
                    .or(v.read.config.name.as_deref())
                    .unwrap_or(""),
                tags: &v.tags,
                marker: Some(m),
                protected: v.read.config.protection,
                in_use_by: &[],
            })?;
            let source_checksum = match &m.metadata.source {
                Some(SourceInfo::CloudImage { checksum, .. }) => checksum.clone(),
                _ => None,
            };
            let attempt = Attempt {
                spec_hash: m.metadata.spec_hash.clone(),
                created: template.created_at(),
                source_checksum,
                awaiting_validation: template.validation == ValidationStatus::Pending
                    && !template.latest
                    && !template.archived,
            };
            Some(Version {
                template,
                attempt,
                marker: m.clone(),
            })
        })
        .collect();
    out.sort_by(|a, b| a.template.cmp_newest_first(&b.template));
    out
}

/// The Proxmox side of one reconcile: the cluster's shared inventory and a client.
struct Proxmox {
    inv: Arc<ClusterInventory>,
    client: proxmox::Client,
}

/// Every read of a reconcile: the connection, the inventory snapshot (fresh for VMs a job
/// that finished just touched), the image's templates, its job, leftover validation clones,
/// and the upstream checksum when a check is due.
async fn observe(
    gi: &GoldenImage,
    ctx: &Context,
    key: &ImageKey,
    spec: &ValidSpec,
    now: DateTime<Utc>,
) -> Result<(Proxmox, Observation), ObserveError> {
    let conn = connection::resolve(
        &ctx.client,
        &ctx.connections,
        &ctx.settings.default_connection,
        gi,
    )
    .await?;
    let inv = ctx.inventories.get(&conn).await?;
    let client = inv.client().await;
    let job = ctx.tracker.view(key);
    // A finished job changed VMs (the new template, the previous latest): read them again, and
    // wait for that snapshot; otherwise the latest one, without waiting for a refresh.
    let snap = match job.as_ref().and_then(|j| j.outcome.as_ref()) {
        Some(outcome) => {
            let touched: Vec<u32> = match outcome {
                JobOutcome::Promoted { vmid, touched, .. } => {
                    touched.iter().copied().chain([*vmid]).collect()
                }
                JobOutcome::ValidationFailed { vmid, .. } => vec![*vmid],
                JobOutcome::Failed { touched, .. } => touched.clone(),
            };
            inv.refresh(&touched).await?
        }
        None => inv.snapshot(ctx.settings.resync).await?,
    };
    let leftovers = snap.of_owner(&key.uid).any(|v| {
        ownership(v.read.marker.as_deref(), v.vm.vmid) == Ownership::Ours(Role::Validation)
    });
    let source_check = match decide::source_check_due(gi, spec, now) {
        Some((url, image_url)) => Some(
            match super::source::upstream_checksum(url, image_url).await {
                Ok(sum) => SourceCheck::Read(sum),
                Err(message) => SourceCheck::Failed {
                    url: url.to_string(),
                    message,
                },
            },
        ),
        None => None,
    };
    let obs = Observation {
        versions: versions(&snap, &key.uid),
        slot: ctx.tracker.slot(key, &gi.spec.placement.node),
        job,
        leftovers,
        source_check,
    };
    Ok((Proxmox { inv, client }, obs))
}

async fn apply(gi: &GoldenImage, ctx: &Context) -> Result<Action> {
    let key = ImageKey::of(gi);
    let now = Utc::now();
    let spec = validate_spec(gi)?;
    let (pve, mut obs) = observe(gi, ctx, &key, &spec, now).await?;
    let timing = Timing {
        requeue: ctx.settings.requeue,
        poll: ctx.settings.poll,
    };
    let memory = ctx.tracker.memory(&key);
    let plan = decide::decide(gi, &spec, &obs, &memory, now, timing);
    let job = obs.job.clone();
    let action = act(gi, ctx, &key, &pve, job.as_ref(), plan, |why| {
        // Another reconcile took the last slot since `observe`: the same decision, waiting.
        obs.slot = Err(why);
        decide::decide(gi, &spec, &obs, &memory, now, timing)
    })
    .await?;
    Ok(action)
}

/// Every write of a reconcile, in this order: the finished job (`job`, as observed) settled
/// into the memory and its durations into the metrics, leftover validation clones destroyed,
/// the job started (when the last slot went meanwhile, `replan` gives the plan without it),
/// the failed-build memory, Events, the rebuild annotation removed, the output ConfigMap, the
/// status.
async fn act(
    gi: &GoldenImage,
    ctx: &Context,
    key: &ImageKey,
    pve: &Proxmox,
    job: Option<&JobView>,
    mut plan: Plan,
    replan: impl FnOnce(String) -> Plan,
) -> Result<Action, ActError> {
    let owner = owner_of(gi);
    if let Some(view) = job {
        observe_metrics(ctx, view);
    }
    if let Some(n) = plan.announced {
        ctx.tracker.mark_announced(key, n);
    }
    if let Some(recorded) = plan.settle.clone() {
        ctx.tracker.settle(key, recorded);
    }
    if let Some(id) = &plan.not_resumed {
        info!(build_id = %id, "the cached status predates this build's outcome; not resuming it");
    }

    // A validation clone of this image left by a crash or a failed destroy goes on the next
    // reconcile, found by its marker in the shared inventory (no request when there is none).
    // Only while no job of the image runs here: a job's own clone is its business.
    if plan.remove_leftovers {
        match crate::validate::cleanup_stale_validation_vms(&pve.client, &owner).await {
            Ok(removed) if !removed.is_empty() => {
                info!(?removed, "destroyed leftover validation clones");
                event(
                    ctx,
                    gi,
                    EventType::Normal,
                    "LeftoverRemoved",
                    "Cleanup",
                    format!("destroyed leftover validation clones {removed:?}"),
                )
                .await;
                pve.inv.invalidate(&removed).await;
            }
            Ok(_) => {}
            // Retried on the next reconcile; it does not block the image.
            Err(e) => warn!(error = %e, "cannot destroy a leftover validation clone"),
        }
    }

    let mut remove_annotation = false;
    if let Some(start) = plan.start.clone() {
        let request = JobRequest {
            client: pve.client.clone(),
            spec: gi.spec.clone(),
            owner: owner.clone(),
            build_id: start.build_id.clone(),
            today: start.today,
            fresh_id: start.fresh_id,
        };
        let runner = ctx.runner.clone();
        match ctx.tracker.try_start(
            key,
            &gi.spec.placement.node,
            &start.build_id,
            start.started_at,
            move |p| runner.run(request, p),
        ) {
            Ok(()) => {
                info!(
                    build_id = start.build_id,
                    trigger = start.why,
                    "build started"
                );
                remove_annotation = start.remove_annotation;
            }
            Err(why) => plan = replan(why),
        }
    }
    ctx.tracker.set_failed(key, plan.failed.clone());

    for note in &plan.events {
        match note.type_ {
            EventType::Warning => warn!(reason = note.reason, "{}", note.text),
            EventType::Normal => info!(reason = note.reason, "{}", note.text),
        }
        publish(ctx, gi, note).await;
    }
    if remove_annotation {
        remove_rebuild_annotation(ctx, gi).await?;
    }

    let image = super::metrics::ImageLabels {
        namespace: owner.namespace.clone(),
        name: owner.name.clone(),
    };
    ctx.metrics
        .templates
        .get_or_create(&image)
        .set(plan.status.versions.len() as i64);
    if let Some(age) = plan.latest_age_seconds {
        ctx.metrics
            .latest_age_seconds
            .get_or_create(&image)
            .set(age);
    }

    if let Some(cm) = &plan.config_map {
        write_config_map(ctx, gi, &cm.name, cm.data.clone()).await?;
    }
    write_status(ctx, gi, &plan.status).await?;
    Ok(Action::requeue(plan.requeue))
}

/// A finished job's stage and check durations into the histograms.
fn observe_metrics(ctx: &Context, view: &JobView) {
    let Some(outcome) = &view.outcome else {
        return;
    };
    for (stage, secs) in &view.progress.stages {
        ctx.metrics
            .build_stage_duration
            .get_or_create(&super::metrics::StageLabels {
                stage: stage.to_string(),
            })
            .observe(*secs);
    }
    let report = match outcome {
        JobOutcome::Promoted { report, .. } => report.as_ref(),
        JobOutcome::ValidationFailed { report, .. } => Some(report),
        JobOutcome::Failed { .. } => None,
    };
    for c in report.map(|r| r.checks.as_slice()).unwrap_or_default() {
        ctx.metrics
            .validation_check_duration
            .get_or_create(&super::metrics::StageLabels {
                stage: c.name.clone(),
            })
            .observe(c.seconds);
    }
}

async fn remove_rebuild_annotation(ctx: &Context, gi: &GoldenImage) -> Result<(), kube::Error> {
    let api: Api<GoldenImage> =
        Api::namespaced(ctx.client.clone(), &gi.namespace().unwrap_or_default());
    let patch = json!({"metadata": {"annotations": {REBUILD_ANNOTATION: null}}});
    api.patch(
        &gi.name_any(),
        &PatchParams::default(),
        &Patch::Merge(patch),
    )
    .await?;
    Ok(())
}

/// Label on the output ConfigMaps: the controller watches only ConfigMaps carrying it, instead
/// of caching every ConfigMap of the cluster.
pub const OUTPUT_LABEL: (&str, &str) = ("app.kubernetes.io/managed-by", "sombrero");

/// The Terraform hand-off, `promote::config_map_data` of the latest template's marker:
/// `template_id`, `template_name`, `node`, and a Packer-compatible `manifest.json` whose run
/// uuid derives from the template's build id. Owned by the GoldenImage (garbage-collected with
/// it) and labelled [`OUTPUT_LABEL`].
pub fn desired_config_map(
    gi: &GoldenImage,
    name: &str,
    data: BTreeMap<String, String>,
) -> ConfigMap {
    let owner_ref: Option<OwnerReference> = gi.controller_owner_ref(&());
    ConfigMap {
        metadata: ObjectMeta {
            name: Some(name.to_string()),
            namespace: gi.namespace(),
            owner_references: owner_ref.map(|o| vec![o]),
            labels: Some(BTreeMap::from([(
                OUTPUT_LABEL.0.to_string(),
                OUTPUT_LABEL.1.to_string(),
            )])),
            ..Default::default()
        },
        data: Some(data),
        ..Default::default()
    }
}

/// Whether the output ConfigMap as the watch shows it (`existing`; None: none) already has
/// everything an apply of `desired` would set (pure): each of our data keys with our value, our
/// label, our controller owner reference. Keys, labels and owner references others added are
/// left alone, as the apply leaves them. Not up to date: missing, edited, relabelled.
pub fn config_map_up_to_date(existing: Option<&ConfigMap>, desired: &ConfigMap) -> bool {
    let Some(cm) = existing else {
        return false;
    };
    let data = cm.data.as_ref();
    let data_ok = desired
        .data
        .iter()
        .flatten()
        .all(|(k, v)| data.and_then(|d| d.get(k)) == Some(v));
    let labels = cm.metadata.labels.as_ref();
    let labels_ok = desired
        .metadata
        .labels
        .iter()
        .flatten()
        .all(|(k, v)| labels.and_then(|l| l.get(k)) == Some(v));
    let owners = cm.metadata.owner_references.as_deref().unwrap_or_default();
    let owner_ok = desired
        .metadata
        .owner_references
        .iter()
        .flatten()
        .all(|o| owners.contains(o));
    data_ok && labels_ok && owner_ok
}

/// The output ConfigMaps' watch objects as the store keeps them: what
/// [`config_map_up_to_date`] compares (data, labels, owner references) and the names; managed
/// fields, annotations and binary data are dropped before the store.
pub fn strip_config_map(cm: &mut ConfigMap) {
    let m = &mut cm.metadata;
    *m = ObjectMeta {
        name: m.name.take(),
        namespace: m.namespace.take(),
        resource_version: m.resource_version.take(),
        uid: m.uid.take(),
        labels: m.labels.take(),
        owner_references: m.owner_references.take(),
        ..Default::default()
    };
    cm.binary_data = None;
}

/// The watched output ConfigMaps (the reflector stores of the labelled ConfigMaps' watch, one
/// per watched scope).
#[derive(Default)]
pub struct OutputConfigMaps {
    stores: std::sync::Mutex<Vec<Store<ConfigMap>>>,
}

impl OutputConfigMaps {
    pub fn watch(&self, store: Store<ConfigMap>) {
        self.stores
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(store);
    }

    /// The ConfigMap as last watched (None: not there, or not listed yet).
    pub fn get(&self, namespace: &str, name: &str) -> Option<Arc<ConfigMap>> {
        let key = ObjectRef::new(name).within(namespace);
        self.stores
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .find_map(|s| s.get(&key))
    }
}

/// Applies the output ConfigMap unless the watched one is up to date already: a reconcile
/// where nothing changed writes nothing; an edited or deleted ConfigMap's watch event
/// reconciles the image, whose apply restores it.
async fn write_config_map(
    ctx: &Context,
    gi: &GoldenImage,
    name: &str,
    data: BTreeMap<String, String>,
) -> Result<(), ActError> {
    let cm = desired_config_map(gi, name, data);
    let ns = gi.namespace().unwrap_or_default();
    if config_map_up_to_date(ctx.outputs.get(&ns, name).as_deref(), &cm) {
        return Ok(());
    }
    let api: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), &ns);
    let mut value = serde_json::to_value(&cm)?;
    value["apiVersion"] = json!("v1");
    value["kind"] = json!("ConfigMap");
    api.patch(
        name,
        &PatchParams::apply(&ctx.settings.manager).force(),
        &Patch::Apply(value),
    )
    .await?;
    Ok(())
}

/// Deletion: stop the job, remove leftover build and validation VMs, and with
/// `deletionPolicy: Delete` the image's templates, through retention's delete path
/// ([`retention::plan_image_deletion`], [`retention::execute_detailed`]): only templates whose
/// marker names this very object (namespace, name, uid), each re-checked right before its
/// delete (ours, a template, not protected, not locked, not in use). A refused token (401/403)
/// stalls the deletion with the credential hint; other Proxmox errors are retried; templates
/// that are protected, locked or in use stay, and the Event names them.
async fn cleanup(gi: &GoldenImage, ctx: &Context) -> Result<Action> {
    let owner = owner_of(gi);
    ctx.tracker.forget(&ImageKey::of(gi));
    ctx.metrics.forget_image(&owner.namespace, &owner.name);
    let conn = match connection::resolve(
        &ctx.client,
        &ctx.connections,
        &ctx.settings.default_connection,
        gi,
    )
    .await
    .map_err(Error::from)
    {
        Ok(c) => c,
        Err(e) if e.is_stalled() => {
            // Without a connection nothing can be cleaned; do not block the deletion forever.
            publish(ctx, gi, &decide::cleanup_skipped(&e.message())).await;
            return Ok(Action::await_change());
        }
        Err(e) => return Err(e),
    };
    let inv = ctx.inventories.get(&conn).await?;
    let client = inv.client().await;
    // Before the first write, the privileges of what this deletion will remove: a missing one
    // stalls it (InsufficientPrivileges, naming privilege and path) with nothing changed.
    let snap = inv.snapshot(Duration::ZERO).await?;
    let leftovers: Vec<u32> = snap
        .ours
        .iter()
        .filter(|o| {
            o.read.marker.as_ref().is_some_and(|m| {
                m.vmid == o.vm.vmid
                    && matches!(m.role, Role::Build | Role::Validation)
                    && m.owner.namespace == owner.namespace
                    && m.owner.name == owner.name
            })
        })
        .map(|o| o.vm.vmid)
        .collect();
    if !leftovers.is_empty() {
        crate::privileges::check(&client, &crate::privileges::cleanup_needs(&leftovers)).await?;
    }
    let removed = ctx
        .runner
        .cleanup(
            client.clone(),
            owner.clone(),
            crate::builder::clone_names(&gi.spec),
        )
        .await?;
    inv.invalidate(&removed).await;
    if gi.spec.deletion_policy != DeletionPolicy::Delete {
        publish(ctx, gi, &decide::retained()).await;
        return Ok(Action::await_change());
    }
    let snap = inv.snapshot(Duration::ZERO).await?;
    let target = Target::Image {
        namespace: owner.namespace.clone(),
        name: owner.name.clone(),
    };
    let scope = Scope::Image(owner.clone());
    let found = retention::gather_from(
        &client,
        &target,
        &scope,
        Purpose::ImageDeleted,
        &snap.vms(),
        &snap.config_reads(),
    )
    .await?;
    let plan = retention::plan_image_deletion(&found.versions, &scope);
    let acting: Vec<u32> = plan.removals().map(|d| d.vmid).collect();
    if !acting.is_empty() {
        let needs =
            crate::privileges::retention_needs(retention::ArchiveMode::Delete, None, Some(&acting));
        crate::privileges::check(&client, &needs).await?;
    }
    let progress = |line: &str| info!("{line}");
    let executed = retention::execute_detailed(&client, &plan, None, false, &progress).await;
    inv.invalidate(&executed.iter().map(|e| e.record.vmid).collect::<Vec<_>>())
        .await;
    let note = decide::deleted(&plan, &executed).map_err(Error::Proxmox)?;
    publish(ctx, gi, &note).await;
    Ok(Action::await_change())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image() -> GoldenImage {
        serde_json::from_value(json!({
            "apiVersion": "images.sombrero.dev/v1alpha1", "kind": "GoldenImage",
            "metadata": {"name": "img", "namespace": "ns", "uid": "u-1"},
            "spec": {"os": "ubuntu-24.04", "type": "minimal",
                "source": {"cloudImage": {"url": "https://x/y.img"}},
                "placement": {"node": "pve1"}}
        }))
        .unwrap()
    }

    fn data(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn only_a_config_map_differing_in_what_we_set_is_applied_again() {
        let gi = image();
        let ours = data(&[("template_id", "9001"), ("node", "pve1")]);
        let desired = desired_config_map(&gi, "img-template", ours.clone());
        let same = desired.clone();
        let edit = |f: &dyn Fn(&mut ConfigMap)| {
            let mut cm = desired.clone();
            f(&mut cm);
            cm
        };
        let cases: Vec<(&str, Option<ConfigMap>, bool)> = vec![
            ("as applied", Some(same), true),
            ("deleted (or not listed yet)", None, false),
            (
                "a value edited",
                Some(edit(&|cm| {
                    cm.data
                        .as_mut()
                        .unwrap()
                        .insert("template_id".into(), "1".into());
                })),
                false,
            ),
            (
                "a key removed",
                Some(edit(&|cm| {
                    cm.data.as_mut().unwrap().remove("node");
                })),
                false,
            ),
            ("the data gone", Some(edit(&|cm| cm.data = None)), false),
            (
                "our label changed",
                Some(edit(&|cm| {
                    cm.metadata
                        .labels
                        .as_mut()
                        .unwrap()
                        .insert(OUTPUT_LABEL.0.into(), "x".into());
                })),
                false,
            ),
            (
                "our owner reference gone",
                Some(edit(&|cm| cm.metadata.owner_references = None)),
                false,
            ),
            (
                "owned by an earlier object of the same name",
                Some(edit(&|cm| {
                    cm.metadata.owner_references.as_mut().unwrap()[0].uid = "u-0".into();
                })),
                false,
            ),
            // What others added stays after an apply too: nothing to write for it.
            (
                "another key, label and owner added",
                Some(edit(&|cm| {
                    cm.data.as_mut().unwrap().insert("extra".into(), "v".into());
                    cm.metadata
                        .labels
                        .as_mut()
                        .unwrap()
                        .insert("team".into(), "a".into());
                    let mut other = cm.metadata.owner_references.as_ref().unwrap()[0].clone();
                    other.uid = "u-other".into();
                    other.controller = None;
                    cm.metadata.owner_references.as_mut().unwrap().push(other);
                })),
                true,
            ),
        ];
        for (what, existing, up_to_date) in cases {
            assert_eq!(
                config_map_up_to_date(existing.as_ref(), &desired),
                up_to_date,
                "{what}"
            );
        }
        // A promotion: the desired data differs from the watched one.
        let next = desired_config_map(
            &gi,
            "img-template",
            data(&[("template_id", "9002"), ("node", "pve1")]),
        );
        assert!(!config_map_up_to_date(Some(&desired), &next));
    }

    #[test]
    fn the_store_keeps_what_the_comparison_needs() {
        let gi = image();
        let mut cm = desired_config_map(&gi, "img-template", data(&[("template_id", "9001")]));
        cm.metadata.annotations = Some(data(&[("big", "x")]));
        cm.metadata.managed_fields = Some(vec![Default::default()]);
        let desired = cm.clone();
        strip_config_map(&mut cm);
        assert!(cm.metadata.annotations.is_none() && cm.metadata.managed_fields.is_none());
        assert!(config_map_up_to_date(Some(&cm), &desired));
    }
}
