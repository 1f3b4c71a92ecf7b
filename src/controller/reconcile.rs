//! The GoldenImage reconciler: dereference (Secret, inventory) -> validate (what only the
//! controller can judge) -> decide (triggers, jobs) -> apply (start jobs, output ConfigMap)
//! -> status. Errors are categorised: bad spec or credentials give `Stalled=True`, transient
//! Proxmox trouble `Reconciling=True` and a backoff requeue; never a crash loop.

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
use kube::{Resource, ResourceExt};
use serde_json::json;
use tracing::{info, warn};

use super::builds::{JobOutcome, JobView, Recorded, StatusBuild, judge_status_build};
use super::connection;
use super::context::{Context, FailedBuild, JobRequest, attempt_number, retry_again};
use super::error::{Error, Result};
use super::inventory::Snapshot;
use super::status::{self, Cond, FailedValidation, Verdict};
use super::triggers::{self, Attempt, REBUILD_ANNOTATION, Trigger};
use crate::api::common::ConditionStatus;
use crate::api::golden_image::{
    DeletionPolicy, GoldenImage, GoldenImageStatus, TemplateRef, TemplateVersionStatus,
};
use crate::image::marker::{
    Marker, Owner, Ownership, Role, SourceInfo, ValidationRecord, ownership,
};
use crate::image::version::{TemplateVersion, VmFacts};
use crate::proxmox;
use crate::retention::{self, Purpose, Scope, Target};

pub const FINALIZER: &str = "images.sombrero.dev/cleanup";
const KIND: &str = "GoldenImage";

/// `namespace/name`.
pub fn key_of(gi: &GoldenImage) -> String {
    format!("{}/{}", gi.namespace().unwrap_or_default(), gi.name_any())
}

fn owner_of(gi: &GoldenImage) -> Owner {
    Owner {
        namespace: gi.namespace().unwrap_or_default(),
        name: gi.name_any(),
        uid: gi.uid().unwrap_or_default(),
    }
}

/// Entry point for kube-runtime: metrics, finalizer dispatch, and the error's status.
#[tracing::instrument(skip(gi, ctx), fields(object = %key_of(&gi)))]
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
            ctx.reset_backoff(&key_of(&gi));
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
        ctx.backoff(&key_of(&gi))
    };
    Action::requeue(delay)
}

async fn event(
    ctx: &Context,
    gi: &GoldenImage,
    type_: EventType,
    reason: &str,
    action: &str,
    note: String,
) {
    event_about(ctx, gi, type_, reason, action, note, None).await
}

/// What an Event is about besides the GoldenImage: a build or a Proxmox template.
enum About<'a> {
    Build(&'a str),
    Stage(&'a str, &'a str),
    Template(u32),
}

/// kube's Recorder folds Events with the same type, reason, action and objects into one series
/// that keeps the first note, so a second build's `BuildStarted` would show the first one's
/// text. Naming the build (or template) as the related object keeps one Event per thing that
/// happened; a repeated error (same reason, no related object) still folds into a series.
async fn event_about(
    ctx: &Context,
    gi: &GoldenImage,
    type_: EventType,
    reason: &str,
    action: &str,
    note: String,
    about: Option<About<'_>>,
) {
    let related = about.map(|a| {
        let (kind, name) = match a {
            About::Build(id) => ("SombreroBuild", id.to_string()),
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
        type_,
        reason: reason.to_string(),
        note: Some(note.chars().take(1000).collect()),
        action: action.to_string(),
        secondary: related,
    };
    if let Err(e) = ctx.recorder.publish(&ev, &gi.object_ref(&())).await {
        warn!(error = %e, reason, "cannot publish Event");
    }
}

/// One Event per build stage that finished since the last reconcile (with its duration).
async fn announce_stages(ctx: &Context, gi: &GoldenImage, key: &str, build_id: &str) {
    for (stage, secs) in ctx.tracker.take_finished_stages(key) {
        event_about(
            ctx,
            gi,
            EventType::Normal,
            "StageFinished",
            "Build",
            format!("build {build_id}: stage {stage} finished in {secs:.1}s"),
            Some(About::Stage(build_id, &stage)),
        )
        .await;
    }
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

async fn write_status(ctx: &Context, gi: &GoldenImage, st: &GoldenImageStatus) -> Result<()> {
    super::report::write_status(ctx, gi, gi.status.as_ref(), st).await
}

/// The spec hash the build records in its markers (compared with the newest template's).
pub fn current_spec_hash(gi: &GoldenImage) -> Result<String> {
    crate::image::spec_hash::spec_hash(&gi.spec)
        .map_err(|e| Error::invalid_spec("", format!("cannot hash the spec: {e}")))
}

/// Templates of this image (ours, role template, this owner), newest first.
fn versions(snap: &Snapshot, uid: &str) -> Vec<(TemplateVersion, Attempt)> {
    let mut out: Vec<(TemplateVersion, Attempt)> = snap
        .of_owner(uid)
        .filter(|v| v.vm.template)
        .filter_map(|v| {
            let m = v.marker.as_ref()?;
            if ownership(Some(m), v.vm.vmid)
                != crate::image::marker::Ownership::Ours(Role::Template)
            {
                return None;
            }
            let tv = TemplateVersion::from_vm(VmFacts {
                vmid: v.vm.vmid,
                node: &v.vm.node,
                name: v
                    .vm
                    .name
                    .as_deref()
                    .or(v.config.name.as_deref())
                    .unwrap_or(""),
                tags: &v.tags,
                marker: Some(m),
                protected: v.config.protection,
                in_use_by: &[],
            })?;
            let source_checksum = match &m.metadata.source {
                Some(SourceInfo::CloudImage { checksum, .. }) => checksum.clone(),
                _ => None,
            };
            let attempt = Attempt {
                spec_hash: m.metadata.spec_hash.clone(),
                created: tv.created_at(),
                source_checksum,
                awaiting_validation: tv.validation
                    == crate::image::version::ValidationStatus::Pending
                    && !tv.latest
                    && !tv.archived,
            };
            Some((tv, attempt))
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp_newest_first(&b.0));
    out
}

fn template_ref(v: &TemplateVersion, snap: &Snapshot) -> TemplateRef {
    let marker = marker_of(snap, v.vmid);
    TemplateRef {
        vmid: v.vmid,
        name: v.name.clone(),
        node: v.node.clone(),
        build_date: v.build_date.format("%Y-%m-%d").to_string(),
        build_number: v.build_number,
        source_checksum: marker.and_then(|m| match &m.metadata.source {
            Some(SourceInfo::CloudImage { checksum, .. }) => checksum.clone(),
            _ => None,
        }),
        spec_hash: marker.map(|m| m.metadata.spec_hash.clone()),
        validated_at: marker
            .and_then(|m| m.metadata.validation.validated_at())
            .map(status::time),
    }
}

async fn apply(gi: &GoldenImage, ctx: &Context) -> Result<Action> {
    let key = key_of(gi);
    let owner = owner_of(gi);
    let now = Utc::now();

    // Validate what the schema cannot.
    let schedule = gi
        .spec
        .rebuild
        .schedule
        .as_deref()
        .map(triggers::parse_schedule)
        .transpose()?;
    let check_interval =
        crate::retention::duration::parse_duration(&gi.spec.rebuild.source_check_interval)
            .map_err(|e| Error::invalid_spec("rebuild.sourceCheckInterval", e.to_string()))?;
    let spec_hash = current_spec_hash(gi)?;

    // Dereference: connection and the shared inventory.
    let conn = connection::resolve(&ctx.client, &ctx.settings.default_connection, gi).await?;
    let inv = ctx.inventories.get(&conn).await?;
    let client = inv.client().await;
    let mut snap = inv.snapshot(ctx.settings.resync).await?;

    let mut st = gi.status.clone().unwrap_or_default();
    let mut requeue = ctx.settings.requeue;
    let mut reconciling: Option<(String, String)> = None;
    let mut stalled: Option<(String, String)> = None;

    // A finished job: record its outcome.
    if let Some(JobView::Finished(progress, outcome)) = ctx.tracker.view(&key) {
        announce_stages(ctx, gi, &key, &progress.id).await;
        for (stage, secs) in &progress.stages {
            ctx.metrics
                .build_stage_duration
                .get_or_create(&super::metrics::StageLabels {
                    stage: stage.clone(),
                })
                .observe(*secs);
        }
        let checks = match &outcome {
            JobOutcome::Promoted { report, .. } => report.as_ref(),
            JobOutcome::ValidationFailed { report, .. } => Some(report),
            JobOutcome::Failed { .. } => None,
        };
        for c in checks.map(|r| r.checks.as_slice()).unwrap_or_default() {
            ctx.metrics
                .validation_check_duration
                .get_or_create(&super::metrics::StageLabels {
                    stage: c.name.clone(),
                })
                .observe(c.seconds);
        }
        let mut touched = Vec::new();
        match &outcome {
            JobOutcome::Promoted {
                vmid,
                name,
                report,
                touched: t,
            } => {
                touched.extend(t.iter().copied());
                touched.push(*vmid);
                st.last_validation = report.clone();
                st.build = None;
                ctx.failed
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(&key);
                info!(vmid, name, "template promoted");
                event_about(
                    ctx,
                    gi,
                    EventType::Normal,
                    "Promoted",
                    "Promote",
                    format!(
                        "template {name} (VMID {vmid}) is now the latest{}",
                        if report.is_some() {
                            " after passing validation"
                        } else {
                            " (validation disabled)"
                        }
                    ),
                    Some(About::Template(*vmid)),
                )
                .await;
            }
            JobOutcome::ValidationFailed {
                vmid,
                name,
                failed_check,
                message,
                report,
            } => {
                touched.push(*vmid);
                st.last_validation = Some(report.clone());
                st.build = None;
                // The build worked: a retry series of earlier build failures ends here (left
                // behind, its due retry would rebuild the failed spec in a loop).
                ctx.failed
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(&key);
                warn!(vmid, name, failed_check, "validation failed");
                event_about(ctx, gi, EventType::Warning, "ValidationFailed", "Validate",
                    format!("template {name} (VMID {vmid}) failed check {failed_check}: {message}; it is tagged failed-validation and not promoted, the previous latest stays; change the spec or request a rebuild"),
                    Some(About::Template(*vmid))).await;
            }
            JobOutcome::Failed {
                stage,
                reason,
                message,
                retryable,
                touched: t,
            } => {
                touched.extend(t.iter().copied());
                let stage_text = stage.clone().unwrap_or_else(|| progress.stage.clone());
                let mut b = progress.to_status();
                b.stage = "Failed".into();
                b.message = Some(format!("{stage_text}: {message}"));
                st.build = Some(b);
                let attempt = {
                    let failed = ctx.failed.lock().unwrap_or_else(|e| e.into_inner());
                    attempt_number(failed.get(&key), &spec_hash)
                };
                let again = retry_again(*retryable, reason, attempt);
                let gave_up = *retryable && !again;
                let what_now = if again {
                    format!("retrying with backoff (attempt {attempt} failed)")
                } else if gave_up {
                    format!(
                        "gave up after {attempt} failed attempts of this spec: fix the spec or request a rebuild"
                    )
                } else {
                    "fix the cause and change the spec or request a rebuild".to_string()
                };
                ctx.failed.lock().unwrap_or_else(|e| e.into_inner()).insert(
                    key.clone(),
                    FailedBuild {
                        spec_hash: spec_hash.clone(),
                        reason,
                        message: if gave_up {
                            format!("build failed in stage {stage_text}: {message}\n{what_now}")
                        } else {
                            format!("build failed in stage {stage_text}: {message}")
                        },
                        retry_at: again.then(|| {
                            std::time::Instant::now() + ctx.backoff(&format!("build:{key}"))
                        }),
                        attempts: attempt,
                    },
                );
                if !again {
                    ctx.reset_backoff(&format!("build:{key}"));
                }
                warn!(stage = %stage_text, reason, attempt, error = %message, "build failed");
                event_about(
                    ctx,
                    gi,
                    EventType::Warning,
                    reason,
                    "Build",
                    format!(
                        "build {} failed in stage {stage_text}: {message}; {what_now}",
                        progress.id,
                    ),
                    Some(About::Build(&progress.id)),
                )
                .await;
            }
        }
        ctx.tracker.remove_finished(
            &key,
            Recorded {
                id: progress.id.clone(),
                build: st.build.clone(),
                last_validation: st.last_validation.clone(),
            },
        );
        inv.invalidate(&touched).await;
        snap = inv.snapshot(ctx.settings.resync).await?;
    }

    // A validation clone of this image left by a crash or a failed destroy goes on the next
    // reconcile, found by its marker in the shared inventory (no request when there is none).
    // Only while no job of the image runs here: a job's own clone is its business.
    let leftover = |v: &&super::inventory::OurVm| {
        ownership(v.marker.as_ref(), v.vm.vmid) == Ownership::Ours(Role::Validation)
    };
    if !ctx.tracker.is_tracked(&key) && snap.of_owner(&owner.uid).any(|v| leftover(&v)) {
        match crate::validate::cleanup_stale_validation_vms(&client, &owner).await {
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
                inv.invalidate(&removed).await;
                snap = inv.snapshot(ctx.settings.resync).await?;
            }
            Ok(_) => {}
            // Retried on the next reconcile; it does not block the image.
            Err(e) => warn!(error = %e, "cannot destroy a leftover validation clone"),
        }
    }

    let versions = versions(&snap, &owner.uid);
    let latest = versions.iter().find(|(v, _)| v.latest && v.owned);
    let newest = versions.first();

    // Upstream checksum, at most once per interval.
    let mut upstream: Option<String> = None;
    if gi.spec.rebuild.on_source_change
        && let Some(ci) = &gi.spec.source.cloud_image
        && let Some(url) = &ci.checksum_url
    {
        let due = st
            .last_source_check
            .as_ref()
            .map(|t| {
                let last = DateTime::<Utc>::from_timestamp(t.0.as_second(), 0).unwrap_or_default();
                now - last >= check_interval
            })
            .unwrap_or(true);
        if due {
            match super::source::upstream_checksum(url, &ci.url).await {
                Ok(sum) => {
                    st.source_checksum = Some(sum);
                    st.last_source_check = Some(status::time(now));
                }
                Err(msg) => {
                    st.last_source_check = Some(status::time(now));
                    event(
                        ctx,
                        gi,
                        EventType::Warning,
                        "SourceCheckFailed",
                        "CheckSource",
                        format!(
                            "cannot read {url}: {msg}; retrying after rebuild.sourceCheckInterval"
                        ),
                    )
                    .await;
                }
            }
        }
        upstream = st.source_checksum.clone();
    }

    // Decide.
    let annotation = gi.annotations().contains_key(REBUILD_ANNOTATION);
    let inputs = triggers::Inputs {
        spec_hash: &spec_hash,
        newest: newest.map(|(_, a)| a),
        schedule: schedule.as_ref(),
        now,
        requested_at: gi.spec.rebuild.requested_at.as_deref(),
        handled_request: st.handled_rebuild_request.as_deref(),
        annotation,
        upstream_checksum: upstream.as_deref(),
    };
    let mut trigger = triggers::decide(&inputs);
    // Resume a build the previous controller process left running; a status older than this
    // process's last finish of the image (the cache lags the status write) is corrected, never
    // resumed.
    let resume_id = match judge_status_build(
        st.build.as_ref(),
        ctx.tracker.is_tracked(&key),
        ctx.tracker.finished(&key).as_ref(),
    ) {
        StatusBuild::Resume(id) => Some(id),
        StatusBuild::Stale(recorded) => {
            info!(build_id = %recorded.id, "the cached status predates this build's outcome; not resuming it");
            st.build = recorded.build;
            st.last_validation = recorded.last_validation;
            None
        }
        StatusBuild::AsIs => None,
    };

    // An automatic retry of the same spec after a failed build: its attempt count goes on.
    let mut retrying = false;
    match ctx.tracker.view(&key) {
        Some(JobView::Running(p)) => {
            announce_stages(ctx, gi, &key, &p.id).await;
            st.build = Some(p.to_status());
            let msg = format!(
                "build {} in stage {}{}",
                p.id,
                p.stage,
                p.message
                    .as_deref()
                    .map(|m| format!(": {m}"))
                    .unwrap_or_default()
            );
            reconciling = Some(("Building".into(), msg));
            requeue = ctx.settings.poll;
            trigger = None;
        }
        _ => {
            let failed = ctx
                .failed
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get(&key)
                .cloned();
            // A rebuild request, whichever trigger `decide` named first (with no template at all,
            // or the spec changed since the newest one, that is not `Manual`).
            let manual = trigger == Some(Trigger::Manual)
                || (trigger.is_some()
                    && (annotation
                        || (gi.spec.rebuild.requested_at.is_some()
                            && gi.spec.rebuild.requested_at != st.handled_rebuild_request)));
            if let Some(f) = failed.filter(|f| f.spec_hash == spec_hash && !manual) {
                retrying = f.retry_at.is_some();
                match f.retry_at {
                    None => {
                        stalled = Some((f.reason.to_string(), f.message.clone()));
                        trigger = None;
                    }
                    Some(at) if at > std::time::Instant::now() => {
                        reconciling = Some(("RetryingBuild".into(), f.message.clone()));
                        requeue = at - std::time::Instant::now();
                        trigger = None;
                    }
                    Some(_) => {
                        trigger = trigger.or(Some(Trigger::SpecChanged));
                    }
                }
            }
            if resume_id.is_some()
                && trigger.is_none()
                && stalled.is_none()
                && reconciling.is_none()
            {
                trigger = Some(Trigger::SpecChanged);
            }
        }
    }

    if let Some(t) = trigger {
        let build_id = resume_id
            .clone()
            // Milliseconds: two builds of one image within a second (a fast failure and a
            // manual rebuild) must not share an id, or the second would find the first's
            // finished template by its marker and "resume" it.
            .unwrap_or_else(|| format!("b-{}", now.format("%Y%m%d%H%M%S%3f")));
        let request = JobRequest {
            client: client.clone(),
            spec: gi.spec.clone(),
            owner: owner.clone(),
            build_id: build_id.clone(),
            today: now.date_naive(),
        };
        let pipeline = ctx.pipeline.clone();
        match ctx.tracker.try_start(
            &key,
            &gi.spec.placement.node,
            &build_id,
            "Source",
            move |p| pipeline.run(request, p),
        ) {
            Ok(()) => {
                if !retrying {
                    ctx.failed
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .remove(&key);
                }
                let why = if resume_id.is_some() {
                    "ResumingBuild"
                } else {
                    t.reason()
                };
                info!(build_id, trigger = why, "build started");
                event_about(
                    ctx,
                    gi,
                    EventType::Normal,
                    "BuildStarted",
                    "Build",
                    format!(
                        "{why}: build {build_id} of {}-{} started on node {}",
                        gi.spec.os, gi.spec.type_, gi.spec.placement.node
                    ),
                    Some(About::Build(&build_id)),
                )
                .await;
                if let Some(v) = ctx.tracker.view(&key)
                    && let JobView::Running(p) = v
                {
                    st.build = Some(p.to_status());
                }
                if let Some(r) = &gi.spec.rebuild.requested_at {
                    st.handled_rebuild_request = Some(r.clone());
                }
                if annotation {
                    remove_rebuild_annotation(ctx, gi).await?;
                }
                reconciling = Some((
                    "Building".into(),
                    format!("{why}: build {build_id} started"),
                ));
                requeue = ctx.settings.poll;
            }
            Err(wait) => {
                reconciling = Some(("WaitingForBuildSlot".into(), wait));
                requeue = ctx.settings.poll.max(Duration::from_secs(5));
            }
        }
    }

    // The newest template failed validation and nothing is building or due: the same spec is
    // deliberately not rebuilt, so the object cannot progress without a person (kstatus
    // `Stalled`, Argo CD `Degraded`). A spec change or a rebuild request starts a build, which
    // clears it.
    let failed_validation = match newest {
        Some((v, _))
            if v.validation == crate::image::version::ValidationStatus::Failed
                && reconciling.is_none()
                && stalled.is_none() =>
        {
            Some(FailedValidation {
                name: &v.name,
                vmid: v.vmid,
                check: failed_check(&st, v.vmid, marker_of(&snap, v.vmid)),
                serving: latest.map(|(l, _)| (l.name.as_str(), l.vmid)),
            })
        }
        _ => None,
    };
    if let Some(f) = &failed_validation {
        stalled = Some(f.stalled());
    }

    // Output ConfigMap for the latest, from its marker: stable at steady state, and changed
    // only when a promotion lands.
    if let (Some(out), Some((l, _))) = (&gi.spec.output, latest)
        && let Some(marker) = marker_of(&snap, l.vmid)
    {
        write_config_map(ctx, gi, &out.config_map_name, l, marker).await?;
    }

    // Status.
    st.latest = latest.map(|(v, _)| template_ref(v, &snap));
    st.versions = versions
        .iter()
        .map(|(v, _)| TemplateVersionStatus {
            vmid: v.vmid,
            name: v.name.clone(),
            node: v.node.clone(),
            build_date: v.build_date.format("%Y-%m-%d").to_string(),
            build_number: v.build_number,
            validation: format!("{:?}", v.validation),
            latest: v.latest,
        })
        .collect();
    let image = super::metrics::ImageLabels {
        namespace: owner.namespace.clone(),
        name: owner.name.clone(),
    };
    ctx.metrics
        .templates
        .get_or_create(&image)
        .set(versions.len() as i64);
    if let Some((l, _)) = latest {
        ctx.metrics
            .latest_age_seconds
            .get_or_create(&image)
            .set((now - l.created_at()).num_seconds());
    }

    let ready = match (&st.latest, &stalled) {
        _ if let Some(f) = &failed_validation => f.ready(),
        (Some(l), _) => Cond::new(
            ConditionStatus::True,
            "TemplateAvailable",
            format!("template {} (VMID {}) on {}", l.name, l.vmid, l.node),
        ),
        (None, Some((r, m))) => Cond::new(ConditionStatus::False, r, m.clone()),
        (None, None) => Cond::new(
            ConditionStatus::False,
            "NoTemplateYet",
            "no validated template yet; the first build runs",
        ),
    };
    let validated = newest.map(|(v, _)| match v.validation {
        crate::image::version::ValidationStatus::Passed => Cond::new(
            ConditionStatus::True,
            "ValidationPassed",
            format!("template {} (VMID {}) passed validation", v.name, v.vmid),
        ),
        crate::image::version::ValidationStatus::Failed => {
            let check = failed_check(&st, v.vmid, marker_of(&snap, v.vmid));
            Cond::new(
                ConditionStatus::False,
                "ValidationFailed",
                format!("template {} (VMID {}): {check}", v.name, v.vmid),
            )
        }
        crate::image::version::ValidationStatus::Pending => Cond::new(
            ConditionStatus::Unknown,
            "ValidationPending",
            format!("template {} (VMID {}) is not validated yet", v.name, v.vmid),
        ),
    });
    let up_to_date = match (&reconciling, &stalled) {
        (None, None) => Cond::new(
            ConditionStatus::True,
            "UpToDate",
            "the newest template matches the spec; no rebuild is due",
        ),
        (Some((r, m)), _) | (None, Some((r, m))) => Cond::new(ConditionStatus::False, r, m.clone()),
    };
    let verdict = Verdict {
        ready,
        reconciling,
        stalled,
        validated,
        up_to_date: Some(up_to_date),
    };
    status::apply(&mut st.conditions, &verdict, gi.metadata.generation, now);
    st.observed_generation = gi.metadata.generation;
    write_status(ctx, gi, &st).await?;

    // Wake up for the next scheduled rebuild.
    if let (Some(cron), Some((_, a))) = (&schedule, newest)
        && let Some(due) = triggers::next_due(cron, a.created)
        && let Ok(d) = (due - now).to_std()
    {
        requeue = requeue.min(d.max(Duration::from_secs(1)));
    }
    Ok(Action::requeue(requeue))
}

async fn remove_rebuild_annotation(ctx: &Context, gi: &GoldenImage) -> Result<()> {
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

/// Our marker of the VM `vmid` in the inventory.
fn marker_of(snap: &Snapshot, vmid: u32) -> Option<&Marker> {
    snap.ours
        .iter()
        .find(|o| o.vm.vmid == vmid)
        .and_then(|o| o.marker.as_ref())
}

/// Which check failed on template `vmid`: from `status.lastValidation` when it is that
/// template's report, else the reason its marker records (the status may be older than it).
fn failed_check(st: &GoldenImageStatus, vmid: u32, marker: Option<&Marker>) -> String {
    let from_report = st
        .last_validation
        .as_ref()
        .filter(|r| r.vmid == vmid)
        .and_then(|r| r.checks.iter().find(|c| !c.passed))
        .map(|c| format!("check {} failed: {}", c.name, c.message));
    let from_marker = || match marker.map(|m| &m.metadata.validation) {
        Some(ValidationRecord::Failed { reason, .. }) => Some(reason.clone()),
        _ => None,
    };
    from_report
        .or_else(from_marker)
        .unwrap_or_else(|| "a check failed (see status.lastValidation)".to_string())
}

/// The Terraform hand-off, `promote::config_map_data` of the latest template's marker:
/// `template_id`, `template_name`, `node`, and a Packer-compatible `manifest.json` whose run
/// uuid derives from the template's build id. Owned by the GoldenImage (garbage-collected with
/// it).
/// Label on the output ConfigMaps: the controller watches only ConfigMaps carrying it, instead
/// of caching every ConfigMap of the cluster.
pub const OUTPUT_LABEL: (&str, &str) = ("app.kubernetes.io/managed-by", "sombrero");

async fn write_config_map(
    ctx: &Context,
    gi: &GoldenImage,
    name: &str,
    latest: &TemplateVersion,
    marker: &Marker,
) -> Result<()> {
    let data = crate::promote::config_map_data(latest.vmid, &latest.node, marker);
    let owner_ref: Option<OwnerReference> = gi.controller_owner_ref(&());
    let cm = ConfigMap {
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
    };
    let api: Api<ConfigMap> =
        Api::namespaced(ctx.client.clone(), &gi.namespace().unwrap_or_default());
    let mut value = serde_json::to_value(&cm).map_err(|e| Error::Transient(e.to_string()))?;
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
    let key = key_of(gi);
    let owner = owner_of(gi);
    ctx.tracker.abort(&key);
    ctx.metrics.forget_image(&owner.namespace, &owner.name);
    ctx.failed
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .remove(&key);
    let conn = match connection::resolve(&ctx.client, &ctx.settings.default_connection, gi).await {
        Ok(c) => c,
        Err(e) if e.is_stalled() => {
            // Without a connection nothing can be cleaned; do not block the deletion forever.
            event(
                ctx,
                gi,
                EventType::Warning,
                "CleanupSkipped",
                "Delete",
                format!(
                    "{}; the templates and any leftover build VM stay on Proxmox",
                    e.message()
                ),
            )
            .await;
            return Ok(Action::await_change());
        }
        Err(e) => return Err(e),
    };
    let inv = ctx.inventories.get(&conn).await?;
    let client = inv.client().await;
    let removed = ctx.pipeline.cleanup(client.clone(), owner.clone()).await?;
    inv.invalidate(&removed).await;
    if gi.spec.deletion_policy != DeletionPolicy::Delete {
        event(
            ctx,
            gi,
            EventType::Normal,
            "TemplatesRetained",
            "Delete",
            "deletionPolicy Retain: the templates stay on Proxmox".to_string(),
        )
        .await;
        return Ok(Action::await_change());
    }
    let snap = inv.snapshot(Duration::ZERO).await?;
    let configs: BTreeMap<u32, &proxmox::VmConfig> = snap
        .ours
        .iter()
        .map(|o| (o.vm.vmid, o.config.as_ref()))
        .collect();
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
        &snap.vms,
        &configs,
    )
    .await?;
    let plan = retention::plan_image_deletion(&found.versions, &scope);
    let progress = |line: &str| info!("{line}");
    let executed = retention::execute_detailed(&client, &plan, None, false, &progress).await;
    inv.invalidate(&executed.iter().map(|e| e.record.vmid).collect::<Vec<_>>())
        .await;
    // A Proxmox error fails the finalizer: the object stays until its templates are dealt with.
    // A refused token first, as no retry fixes it.
    let errors: Vec<&proxmox::Error> = executed.iter().filter_map(|e| e.error.as_ref()).collect();
    if let Some(e) = errors
        .iter()
        .find(|e| Error::Proxmox((**e).clone()).is_stalled())
        .or(errors.first())
    {
        return Err(Error::Proxmox((*e).clone()));
    }
    let deleted: Vec<u32> = executed
        .iter()
        .filter(|e| e.record.succeeded)
        .map(|e| e.record.vmid)
        .collect();
    let kept: Vec<String> = plan
        .decisions
        .iter()
        .filter(|d| d.action == retention::Action::Keep)
        .map(|d| format!("{} ({})", d.vmid, d.reason.describe()))
        .chain(
            executed
                .iter()
                .filter(|e| !e.record.succeeded)
                .map(|e| format!("{} ({})", e.record.vmid, e.record.message)),
        )
        .collect();
    event(
        ctx,
        gi,
        EventType::Normal,
        "TemplatesDeleted",
        "Delete",
        format!(
            "deletionPolicy Delete: deleted templates {deleted:?}{}",
            if kept.is_empty() {
                String::new()
            } else {
                format!("; kept {}", kept.join(", "))
            }
        ),
    )
    .await;
    Ok(Action::await_change())
}
