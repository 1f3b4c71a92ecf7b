//! The TemplateRetention reconciler: check the spec (the CRD's rules, `Stalled` when broken) ->
//! resolve the target, its scope and the Proxmox connection (a `goldenImageRef` uses the image's
//! connection and acts on templates whose marker names that image's uid; a `tagSelector` its own
//! `spec.proxmox` or the controller's default, and acts on the images of its namespace only;
//! everything else is planned "not ours") -> gather the
//! templates and what protects them (`crate::retention::gather_from`, on the shared inventory)
//! -> plan -> write the plan into
//! status -> execute unless `dryRun` (an Event per archive and delete) -> status -> requeue after
//! `spec.interval`.
//!
//! Failed actions leave `Ready=False` (`ActionsFailed`) with `Reconciling=True` and are retried
//! after at most five minutes; the plan re-checks everything, so a retry never repeats a done
//! action. Cost per run: see `crate::retention::inventory` (1 + templates requests when nothing
//! is due).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use futures::StreamExt;
use k8s_openapi::api::core::v1::ObjectReference;
use kube::api::{Api, ListParams};
use kube::core::PartialObjectMeta;
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::{Controller, controller, watcher};
use kube::{Resource, ResourceExt};
use tracing::{info, warn};

use super::connection;
use super::context::Context;
use super::error::{Error, Result};
use super::report;
use super::status::{self, Cond, Verdict};
use crate::api::GoldenImage;
use crate::api::common::{ConditionStatus, find_condition};
use crate::api::template_retention::{
    ExecutedAction, PlannedAction, TemplateRetention, TemplateRetentionStatus,
};
use crate::retention::policy::SpecProblem;
use crate::retention::{self, Plan, Policy, Purpose, Target};

const KIND: &str = "TemplateRetention";
/// Retry delay after failed actions (capped by `spec.interval`).
const RETRY_FAILED: Duration = Duration::from_secs(300);

fn key_of(tr: &TemplateRetention) -> String {
    format!("{}/{}", tr.namespace().unwrap_or_default(), tr.name_any())
}

/// The TemplateRetention controller as a future (ends on a shutdown signal).
pub fn controller(
    client: kube::Client,
    namespace: Option<&str>,
    concurrency: u16,
    ctx: Arc<Context>,
) -> impl std::future::Future<Output = ()> {
    let (trs, gis): (Api<TemplateRetention>, Api<PartialObjectMeta<GoldenImage>>) = match namespace
    {
        Some(ns) => (
            Api::namespaced(client.clone(), ns),
            Api::namespaced(client, ns),
        ),
        None => (Api::all(client.clone()), Api::all(client)),
    };
    // Our own status writes wake the controller too; `not_due` turns those into a requeue.
    let controller = Controller::new(trs, watcher::Config::default().any_semantic());
    let store = controller.store();
    // A GoldenImage's templates changing (a promotion, a new build) re-plans the retentions
    // that target it at once; `not_due` lets such a run through because the image's versions
    // differ from the ones the plan was made for.
    let targets_of = move |gi: PartialObjectMeta<GoldenImage>| {
        let ns = gi.namespace();
        let name = gi.name_any();
        store
            .state()
            .into_iter()
            .filter(|tr| {
                tr.namespace() == ns
                    && tr
                        .spec
                        .target
                        .golden_image_ref
                        .as_ref()
                        .is_some_and(|r| r.name == name)
            })
            .map(|tr| ObjectRef::from_obj(&*tr))
            .collect::<Vec<_>>()
    };
    controller
        // Metadata only: the names are all the mapping needs, and the GoldenImage controller
        // holds the objects already.
        .watches(gis, watcher::Config::default().any_semantic(), targets_of)
        .with_config(controller::Config::default().concurrency(concurrency))
        .shutdown_on_signal()
        .run(reconcile, error_policy, ctx)
        .for_each(|r| async move {
            if let Err(e) = r {
                tracing::debug!(error = %e, "retention controller event");
            }
        })
}

/// Checks that TemplateRetentions can be listed (CRD installed, RBAC).
pub async fn preflight(client: &kube::Client, namespace: Option<&str>) -> Result<(), String> {
    let api: Api<TemplateRetention> = match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    api.list(&ListParams::default().limit(1))
        .await
        .map(|_| ())
        .map_err(|e| format!("cannot list TemplateRetentions ({e}); install the CRDs with `sombrero crd | kubectl apply -f -` and check the RBAC"))
}

#[tracing::instrument(skip(tr, ctx), fields(object = %key_of(&tr)))]
pub async fn reconcile(tr: Arc<TemplateRetention>, ctx: Arc<Context>) -> Result<Action> {
    let _timer = ctx.metrics.reconcile_started(KIND);
    // The store can lag behind our own last status write (a run queued while the previous one
    // ran gets the older copy): read the object fresh, so `not_due` sees what was done.
    let api: Api<TemplateRetention> =
        Api::namespaced(ctx.client.clone(), &tr.namespace().unwrap_or_default());
    let tr = match api.get_opt(&tr.name_any()).await {
        Ok(Some(fresh)) => Arc::new(fresh),
        Ok(None) => return Ok(Action::await_change()),
        Err(e) => return Err(Error::Kube(e)),
    };
    match apply(&tr, &ctx).await {
        Ok(action) => {
            ctx.reset_retention_backoff(&tr);
            Ok(action)
        }
        Err(e) => {
            report_error(&tr, &ctx, &e).await;
            Err(e)
        }
    }
}

pub fn error_policy(tr: Arc<TemplateRetention>, error: &Error, ctx: Arc<Context>) -> Action {
    ctx.metrics.reconcile_failed(KIND, error.category());
    if error.is_stalled() {
        Action::requeue(Duration::from_secs(300))
    } else {
        Action::requeue(ctx.retention_backoff(&tr))
    }
}

/// The spec's problems as one `InvalidSpec`: the first one's field, and every other problem
/// with its own field, so each names what to fix.
fn spec_error(problems: &[SpecProblem]) -> Error {
    let Some((first, rest)) = problems.split_first() else {
        return Error::invalid_spec("", "invalid spec");
    };
    let message = std::iter::once(first.message.clone())
        .chain(rest.iter().map(ToString::to_string))
        .collect::<Vec<_>>()
        .join("; ");
    Error::invalid_spec(&first.field, message)
}

async fn apply(tr: &TemplateRetention, ctx: &Context) -> Result<Action> {
    let ns = tr.namespace().unwrap_or_default();
    let policy = Policy::from_spec(&ns, &tr.spec).map_err(|p| spec_error(&p))?;
    let image = target_image(ctx, tr, &policy.target).await?;
    let versions = image.as_ref().map(image_versions).unwrap_or_default();
    if let Some(wait) = not_due(tr, &policy, &versions, Utc::now()) {
        return Ok(Action::requeue(wait));
    }
    let (conn, scope) = match &image {
        Some(gi) => (
            connection::resolve(
                &ctx.client,
                &ctx.connections,
                &ctx.settings.default_connection,
                gi,
            )
            .await?,
            policy.target.scope(&gi.uid().unwrap_or_default()),
        ),
        None => (
            connection::resolve_for(
                &ctx.client,
                &ctx.connections,
                &ctx.settings.default_connection,
                &ns,
                tr.spec.proxmox.as_ref(),
            )
            .await?,
            policy.target.scope(""),
        ),
    };
    // The cluster's shared inventory (one list per resync for every object of that cluster, and
    // the configs of our VMs): only what it lacks is read here.
    let shared = ctx.inventories.get(&conn).await?;
    let snapshot = shared.snapshot(ctx.settings.resync).await?;
    let client = shared.client().await;
    let inventory = retention::gather_from(
        &client,
        &policy.target,
        &scope,
        Purpose::Rotation,
        &snapshot.vms(),
        &snapshot.config_reads(),
    )
    .await?;
    let plan = retention::plan(
        &inventory.versions,
        &scope,
        &policy.rules,
        policy.mode,
        Utc::now(),
    );

    let mut st = tr.status.clone().unwrap_or_default();
    st.observed_generation = tr.metadata.generation;
    st.target_description = Some(policy.target.to_string());
    st.plan = planned(&plan);
    st.planned_at = Some(crate::api::time::to_time(Utc::now()));
    st.target_versions = versions;
    let summary = summary(&plan);
    let nothing_to_execute = match (plan.removals().next().is_some(), policy.dry_run) {
        (false, _) => Some(RunState::NothingToDo),
        (true, true) => Some(RunState::DryRun),
        (true, false) => None,
    };
    if let Some(run) = nothing_to_execute {
        let outcome = run.outcome(&summary, policy.interval);
        set_conditions(tr, &mut st, outcome.ready, outcome.reconciling);
        write_status(ctx, tr, &st).await?;
        return Ok(Action::requeue(outcome.requeue));
    }

    // The privileges of exactly what the plan does, before its first write: a missing one is
    // Stalled (InsufficientPrivileges) naming it and its path, and nothing is changed.
    let acting: Vec<u32> = plan.removals().map(|d| d.vmid).collect();
    let needs = crate::privileges::retention_needs(
        policy.mode,
        policy.backup_storage.as_deref(),
        Some(&acting),
    );
    crate::privileges::check(&client, &needs).await?;

    // Show the plan before the (possibly long) backups run.
    let executing = RunState::Executing.outcome(&summary, policy.interval);
    set_conditions(tr, &mut st, executing.ready, executing.reconciling);
    write_status(ctx, tr, &st).await?;

    let progress = |line: &str| info!("{line}");
    let executed = retention::execute(
        &client,
        &plan,
        policy.backup_storage.as_deref(),
        false,
        &progress,
    )
    .await;
    for r in &executed {
        publish(ctx, tr, r).await;
    }
    // The GoldenImage controller must not plan on templates that are gone or re-tagged.
    let touched: Vec<u32> = executed.iter().map(|r| r.vmid).collect();
    shared.invalidate(&touched).await;
    let outcome = RunState::Executed(&executed).outcome(&summary, policy.interval);
    st.executed = executed;
    set_conditions(tr, &mut st, outcome.ready, outcome.reconciling);
    write_status(ctx, tr, &st).await?;
    Ok(Action::requeue(outcome.requeue))
}

/// Where a retention run stands once planned.
#[derive(Debug, Clone, Copy)]
enum RunState<'a> {
    /// Nothing to archive or delete.
    NothingToDo,
    /// Something to archive or delete, but `dryRun`.
    DryRun,
    /// The plan's actions are running.
    Executing,
    /// The plan's actions ran; each one's result.
    Executed(&'a [ExecutedAction]),
}

/// The conditions and the next run that follow from a [`RunState`] (no client required).
#[derive(Debug, Clone)]
struct RunOutcome {
    ready: Cond,
    reconciling: Option<(String, String)>,
    requeue: Duration,
}

impl RunState<'_> {
    /// `summary`: the plan's counts ("5 templates: 3 keep, 2 archive"); `interval`:
    /// `spec.interval`. Failed actions are retried after at most [`RETRY_FAILED`].
    fn outcome(self, summary: &str, interval: Duration) -> RunOutcome {
        let done = |reason: &str, message: String| RunOutcome {
            ready: ready(reason, &message),
            reconciling: None,
            requeue: interval,
        };
        match self {
            RunState::NothingToDo => done("UpToDate", format!("{summary}; nothing to do")),
            RunState::DryRun => done("DryRun", format!("dry run: {summary}; nothing was changed")),
            RunState::Executing => RunOutcome {
                ready: Cond::new(ConditionStatus::False, "Executing", summary),
                reconciling: Some(("Executing".into(), format!("executing: {summary}"))),
                requeue: interval,
            },
            RunState::Executed(executed) => {
                let failed: Vec<&ExecutedAction> =
                    executed.iter().filter(|r| !r.succeeded).collect();
                if failed.is_empty() {
                    return done("Executed", format!("{summary}; all done"));
                }
                let message = format!(
                    "{} of {} actions failed: {}",
                    failed.len(),
                    executed.len(),
                    failed
                        .iter()
                        .map(|r| format!("{}: {}", r.vmid, r.message))
                        .collect::<Vec<_>>()
                        .join("; ")
                );
                RunOutcome {
                    ready: Cond::new(ConditionStatus::False, "ActionsFailed", message.clone()),
                    reconciling: Some(("RetryingFailedActions".into(), message)),
                    requeue: interval.min(RETRY_FAILED),
                }
            }
        }
    }
}

/// `Some(time left)` when this generation was planned less than `spec.interval` ago (five
/// minutes after failed actions) for the target image's current `versions`: a wake-up by our
/// own status write, not a reason to run.
fn not_due(
    tr: &TemplateRetention,
    policy: &Policy,
    versions: &[u32],
    now: chrono::DateTime<Utc>,
) -> Option<Duration> {
    let st = tr.status.as_ref()?;
    if st.observed_generation != tr.metadata.generation || tr.metadata.generation.is_none() {
        return None;
    }
    if st.target_versions != versions {
        return None;
    }
    let planned = crate::api::time::from_time(st.planned_at.as_ref()?).timestamp();
    let ready = find_condition(&st.conditions, "Ready")?;
    let period = match ready.reason.as_str() {
        // Errors are retried by the error policy; a run cut short by a restart resumes now.
        "ActionsFailed" => policy.interval.min(RETRY_FAILED),
        "Executing" => return None,
        _ if ready.status != "True" => return None,
        _ => policy.interval,
    };
    let age = u64::try_from(now.timestamp().checked_sub(planned)?).ok()?;
    let left = period.as_secs().checked_sub(age)?;
    (left > 0).then(|| Duration::from_secs(left))
}

fn ready(reason: &str, message: &str) -> Cond {
    Cond::new(ConditionStatus::True, reason, message)
}

fn set_conditions(
    tr: &TemplateRetention,
    st: &mut TemplateRetentionStatus,
    ready: Cond,
    reconciling: Option<(String, String)>,
) {
    let verdict = Verdict {
        ready,
        reconciling,
        stalled: None,
        validated: None,
        up_to_date: None,
    };
    status::apply(
        &mut st.conditions,
        &verdict,
        tr.metadata.generation,
        Utc::now(),
    );
}

/// e.g. "5 templates: 3 keep, 2 archive".
fn summary(plan: &Plan) -> String {
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    for d in &plan.decisions {
        *counts.entry(d.action.to_string()).or_default() += 1;
    }
    let parts: Vec<String> = counts.iter().map(|(a, n)| format!("{n} {a}")).collect();
    format!(
        "{} templates: {}",
        plan.decisions.len(),
        if parts.is_empty() {
            "none".to_string()
        } else {
            parts.join(", ")
        }
    )
}

fn planned(plan: &Plan) -> Vec<PlannedAction> {
    plan.decisions
        .iter()
        .map(|d| PlannedAction {
            vmid: d.vmid,
            name: d.name.clone(),
            action: d.action.to_string(),
            reason: d.reason.describe(),
        })
        .collect()
}

/// The GoldenImage a `goldenImageRef` target names, read fresh: its connection is the
/// target's, and its exact owner (namespace, name and uid) the scope (templates of a same-named
/// image of another cluster, or of a deleted one, are not this policy's). `None` for a
/// `tagSelector`: its own `spec.proxmox` or the controller's default, and the images of the
/// policy's namespace.
async fn target_image(
    ctx: &Context,
    tr: &TemplateRetention,
    target: &Target,
) -> Result<Option<GoldenImage>> {
    let Target::Image { name, .. } = target else {
        return Ok(None);
    };
    let ns = tr.namespace().unwrap_or_default();
    let gis: Api<GoldenImage> = Api::namespaced(ctx.client.clone(), &ns);
    match gis.get_opt(name).await? {
        Some(gi) => Ok(Some(gi)),
        None => Err(Error::invalid_spec(
            "target.goldenImageRef.name",
            format!("GoldenImage {ns}/{name} does not exist; create it or fix the name"),
        )),
    }
}

/// The VMIDs a GoldenImage's status lists, sorted.
fn image_versions(gi: &GoldenImage) -> Vec<u32> {
    let mut v: Vec<u32> = gi
        .status
        .as_ref()
        .map(|s| s.versions.iter().map(|v| v.vmid).collect())
        .unwrap_or_default();
    v.sort_unstable();
    v
}

/// An Event for one archive or delete.
async fn publish(ctx: &Context, tr: &TemplateRetention, r: &ExecutedAction) {
    let (type_, reason) = match (r.action.as_str(), r.succeeded) {
        ("archive", true) => (EventType::Normal, "Archived"),
        ("archive", false) => (EventType::Warning, "ArchiveFailed"),
        (_, true) => (EventType::Normal, "Deleted"),
        (_, false) => (EventType::Warning, "DeleteFailed"),
    };
    let ev = Event {
        type_,
        reason: reason.into(),
        note: Some(
            format!("template {}: {}", r.vmid, r.message)
                .chars()
                .take(1000)
                .collect(),
        ),
        action: if r.action == "archive" {
            "Archive".into()
        } else {
            "Delete".into()
        },
        // The recorder folds Events with the same reason and objects into one series: naming
        // the template as the related object keeps one Event (and its note) per template.
        secondary: Some(ObjectReference {
            kind: Some("ProxmoxTemplate".into()),
            name: Some(r.vmid.to_string()),
            ..Default::default()
        }),
    };
    if let Err(e) = ctx.recorder.publish(&ev, &tr.object_ref(&())).await {
        warn!(error = %e, reason, "cannot publish Event");
    }
}

async fn report_error(tr: &TemplateRetention, ctx: &Context, e: &Error) {
    warn!(category = e.category(), error = %e, "retention reconcile failed");
    let ev = Event {
        type_: EventType::Warning,
        reason: e.reason().into(),
        note: Some(e.message().chars().take(1000).collect()),
        action: "Reconcile".into(),
        secondary: None,
    };
    if let Err(err) = ctx.recorder.publish(&ev, &tr.object_ref(&())).await {
        warn!(error = %err, "cannot publish Event");
    }
    let mut st = tr.status.clone().unwrap_or_default();
    let verdict = report::error_verdict(&st.conditions, e);
    status::apply(
        &mut st.conditions,
        &verdict,
        tr.metadata.generation,
        Utc::now(),
    );
    st.observed_generation = tr.metadata.generation;
    if let Err(err) = write_status(ctx, tr, &st).await {
        warn!(error = %err, "cannot write status");
    }
}

async fn write_status(
    ctx: &Context,
    tr: &TemplateRetention,
    st: &TemplateRetentionStatus,
) -> Result<()> {
    Ok(report::write_status(ctx, tr, tr.status.as_ref(), st).await?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::retention::{Action as PlanAction, ArchiveMode, Decision, Reason, Scope};

    #[test]
    fn a_change_of_the_images_templates_makes_the_plan_due() {
        let mut tr: TemplateRetention = serde_json::from_value(serde_json::json!({
            "apiVersion": "images.sombrero.dev/v1alpha1",
            "kind": "TemplateRetention",
            "metadata": {"name": "img", "namespace": "ns", "generation": 1},
            "spec": {"target": {"goldenImageRef": {"name": "img"}}, "interval": "1h"},
        }))
        .unwrap();
        let now = Utc::now();
        let mut st = TemplateRetentionStatus {
            observed_generation: Some(1),
            planned_at: Some(crate::api::time::to_time(
                now - chrono::Duration::seconds(10),
            )),
            target_versions: vec![],
            ..Default::default()
        };
        crate::api::common::set_condition(
            &mut st.conditions,
            "Ready",
            ConditionStatus::True,
            "UpToDate",
            "0 templates: none; nothing to do",
            Some(1),
            crate::api::time::to_time(now),
        );
        tr.status = Some(st);
        let policy = Policy::from_spec("ns", &tr.spec).unwrap();
        // Planned 10 s ago for an image without templates: not due for almost an hour...
        assert!(not_due(&tr, &policy, &[], now).is_some_and(|d| d.as_secs() > 3500));
        // ...unless the image has a template now.
        assert_eq!(not_due(&tr, &policy, &[8024], now), None);
        // Planned for exactly these versions: not due.
        tr.status.as_mut().unwrap().target_versions = vec![8024];
        assert!(not_due(&tr, &policy, &[8024], now).is_some());
    }

    fn action(vmid: u32, succeeded: bool) -> ExecutedAction {
        ExecutedAction {
            vmid,
            action: "archive".into(),
            succeeded,
            message: if succeeded { "tagged" } else { "locked" }.into(),
            ..Default::default()
        }
    }

    #[test]
    fn each_run_gives_its_conditions_and_next_run() {
        let hour = Duration::from_secs(3600);
        let ok = [action(1, true), action(2, true)];
        let one_failed = [action(1, true), action(2, false)];
        // (run, interval, Ready status, reason, Reconciling reason, requeue)
        type Case<'a> = (
            RunState<'a>,
            Duration,
            &'a str,
            &'a str,
            Option<&'a str>,
            Duration,
        );
        let cases: [Case; 6] = [
            (RunState::NothingToDo, hour, "True", "UpToDate", None, hour),
            (RunState::DryRun, hour, "True", "DryRun", None, hour),
            (
                RunState::Executing,
                hour,
                "False",
                "Executing",
                Some("Executing"),
                hour,
            ),
            (
                RunState::Executed(&ok),
                hour,
                "True",
                "Executed",
                None,
                hour,
            ),
            (
                RunState::Executed(&one_failed),
                hour,
                "False",
                "ActionsFailed",
                Some("RetryingFailedActions"),
                RETRY_FAILED,
            ),
            // A short interval is not stretched by the retry delay.
            (
                RunState::Executed(&one_failed),
                Duration::from_secs(60),
                "False",
                "ActionsFailed",
                Some("RetryingFailedActions"),
                Duration::from_secs(60),
            ),
        ];
        for (run, interval, status, reason, reconciling, requeue) in cases {
            let o = run.outcome("2 templates: 2 archive", interval);
            assert_eq!(o.ready.status.as_str(), status, "{run:?}");
            assert_eq!(o.ready.reason, reason, "{run:?}");
            assert_eq!(
                o.reconciling.as_ref().map(|r| r.0.as_str()),
                reconciling,
                "{run:?}"
            );
            assert_eq!(o.requeue, requeue, "{run:?}");
            // The plan's counts, except where the failures are the news.
            assert_eq!(
                o.ready.message.contains("2 templates"),
                reason != "ActionsFailed",
                "{run:?}: {}",
                o.ready.message
            );
        }
        let failed = RunState::Executed(&one_failed).outcome("s", hour);
        assert_eq!(failed.ready.message, "1 of 2 actions failed: 2: locked");
    }

    #[test]
    fn spec_errors_name_the_field() {
        let e = spec_error(&[
            SpecProblem::new("keepLast", "0 must be greater than or equal to 1"),
            SpecProblem::new("archiveAfter", "bad"),
        ]);
        assert_eq!(
            e.to_string(),
            "spec.keepLast: 0 must be greater than or equal to 1; spec.archiveAfter: bad"
        );
        assert!(e.is_stalled());
    }

    #[test]
    fn plan_into_status() {
        let plan = Plan {
            mode: ArchiveMode::Tag,
            scope: Scope::Namespace("x".into()),
            purpose: Purpose::Rotation,
            decisions: vec![
                Decision {
                    vmid: 1,
                    name: "a".into(),
                    node: "pve1".into(),
                    action: PlanAction::Keep,
                    reason: Reason::CurrentLatest,
                },
                Decision {
                    vmid: 2,
                    name: "b".into(),
                    node: "pve1".into(),
                    action: PlanAction::Archive,
                    reason: Reason::Protected,
                },
            ],
        };
        assert_eq!(summary(&plan), "2 templates: 1 archive, 1 keep");
        let p = planned(&plan);
        assert_eq!(
            (p[0].action.as_str(), p[0].reason.as_str()),
            ("keep", "current latest")
        );
        assert_eq!(
            summary(&Plan {
                mode: ArchiveMode::Tag,
                scope: Scope::Namespace("x".into()),
                purpose: Purpose::Rotation,
                decisions: vec![]
            }),
            "0 templates: none"
        );
    }
}
