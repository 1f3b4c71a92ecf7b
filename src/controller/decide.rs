//! The GoldenImage decision, pure and table-tested: [`decide`] maps the validated spec
//! ([`ValidSpec`]), what the reconcile read ([`Observation`]), the image's memory
//! ([`ImageMemory`]) and the clock to a [`Plan`]: the [`Phase`], the status with its
//! conditions, the Events, the job to start, the output ConfigMap, the memory to keep and the
//! requeue. `reconcile` reads (observe), calls this, and writes what the plan says (act).
//!
//! The conditions follow from the phase and the serving template in one place,
//! [`Phase::verdict`]; the triggers are [`super::triggers::decide`]'s.

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{DateTime, NaiveDate, Utc};
use croner::Cron;
use kube::ResourceExt;
use kube::runtime::events::EventType;

use super::jobs::{
    FinishedHere, JobOutcome, JobProgress, JobView, Recorded, StatusBuild, judge_status_build,
};
use super::memory::{self, FailedBuild, ImageMemory, Retry};
use super::status::{self, Cond, FailedValidation, Verdict};
use super::triggers::{self, Attempt, REBUILD_ANNOTATION, Trigger};
use crate::api::common::ConditionStatus;
use crate::api::golden_image::{
    BuildStage, GoldenImage, GoldenImageStatus, TemplateRef, TemplateVersionStatus,
};
use crate::engine::FailureReason;
use crate::image::marker::{Marker, SourceInfo, ValidationRecord};
use crate::image::version::{TemplateVersion, ValidationStatus};

/// What only the controller can judge of the spec, parsed once per reconcile.
#[derive(Debug, Clone)]
pub struct ValidSpec {
    /// The hash the build records in its markers (compared with the newest template's).
    pub spec_hash: String,
    /// `rebuild.schedule`.
    pub schedule: Option<Cron>,
    /// `rebuild.sourceCheckInterval`.
    pub check_interval: chrono::Duration,
}

/// One template of the image (ours, role template, this owner).
#[derive(Debug, Clone)]
pub struct Version {
    pub template: TemplateVersion,
    pub attempt: Attempt,
    pub marker: Marker,
}

/// The upstream checksum list, read this reconcile.
#[derive(Debug, Clone, PartialEq)]
pub enum SourceCheck {
    Read(String),
    Failed { url: String, message: String },
}

/// Everything the reconcile read.
#[derive(Debug, Clone)]
pub struct Observation {
    /// The image's templates, newest first.
    pub versions: Vec<Version>,
    /// The image's job in this process, if any.
    pub job: Option<JobView>,
    /// Whether a job of this image could start now (`Err`: why it has to wait).
    pub slot: Result<(), String>,
    /// Validation clones of the image in the inventory (left by a crash or a failed destroy).
    pub leftovers: bool,
    /// `None`: not due ([`source_check_due`]) or not configured.
    pub source_check: Option<SourceCheck>,
}

/// The controller's timing settings that shape a plan.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    /// Requeue at steady state.
    pub requeue: Duration,
    /// Requeue while a job runs.
    pub poll: Duration,
}

/// Where the image stands. Whether a template serves (`status.latest`) is the other axis of the
/// conditions: a build can run, wait or have given up with or without one.
#[derive(Debug, Clone, PartialEq)]
pub enum Phase {
    /// The newest template matches the spec and nothing is due.
    UpToDate,
    /// A job runs (or was started now) at `stage`; `message` is the condition's.
    Building {
        id: String,
        stage: BuildStage,
        message: String,
    },
    /// A build is due, but a concurrency limit holds it back.
    WaitingForSlot { why: String },
    /// The last build failed; it is retried at `at`.
    RetryScheduled {
        at: DateTime<Utc>,
        reason: FailureReason,
        message: String,
    },
    /// The last build failed for good (retrying will not help, or the attempts of this spec
    /// ran out): until the spec changes or a rebuild is requested.
    GaveUp {
        reason: FailureReason,
        message: String,
    },
    /// The newest template failed validation and the same spec is not rebuilt.
    ValidationFailed(FailedValidation),
}

impl Phase {
    /// `Reconciling=True` (reason, message).
    fn reconciling(&self) -> Option<(String, String)> {
        match self {
            Phase::Building { message, .. } => Some(("Building".into(), message.clone())),
            Phase::WaitingForSlot { why } => Some(("WaitingForBuildSlot".into(), why.clone())),
            Phase::RetryScheduled { message, .. } => {
                Some(("RetryingBuild".into(), message.clone()))
            }
            _ => None,
        }
    }

    /// `Stalled=True` (reason, message).
    fn stalled(&self) -> Option<(String, String)> {
        match self {
            Phase::GaveUp { reason, message } => Some((reason.to_string(), message.clone())),
            Phase::ValidationFailed(f) => Some(f.stalled()),
            _ => None,
        }
    }

    /// The conditions: `Ready` from the serving template (`latest`) and the phase, `Reconciling`
    /// / `Stalled` / `UpToDate` from the phase, `Validated` as given (the newest template's).
    pub fn verdict(&self, latest: Option<&TemplateRef>, validated: Option<Cond>) -> Verdict {
        let reconciling = self.reconciling();
        let stalled = self.stalled();
        let ready = match (self, latest, &stalled) {
            (Phase::ValidationFailed(f), _, _) => f.ready(),
            (_, Some(l), _) => Cond::new(
                ConditionStatus::True,
                "TemplateAvailable",
                format!("template {} (VMID {}) on {}", l.name, l.vmid, l.node),
            ),
            (_, None, Some((r, m))) => Cond::new(ConditionStatus::False, r, m.clone()),
            (_, None, None) => Cond::new(
                ConditionStatus::False,
                "NoTemplateYet",
                "no validated template yet; the first build runs",
            ),
        };
        let up_to_date = match (&reconciling, &stalled) {
            (None, None) => Cond::new(
                ConditionStatus::True,
                "UpToDate",
                "the newest template matches the spec; no rebuild is due",
            ),
            (Some((r, m)), _) | (None, Some((r, m))) => {
                Cond::new(ConditionStatus::False, r, m.clone())
            }
        };
        Verdict {
            ready,
            reconciling,
            stalled,
            validated,
            up_to_date: Some(up_to_date),
        }
    }
}

/// What an Event is about besides the GoldenImage. Naming the build, stage or template as the
/// related object keeps one Event per thing that happened (kube's recorder folds Events with
/// the same reason and objects into one series that keeps the first note).
#[derive(Debug, Clone, PartialEq)]
pub enum About {
    Build(String),
    Stage(String, BuildStage),
    Template(u32),
}

/// One Event to publish.
#[derive(Debug, Clone, PartialEq)]
pub struct Note {
    pub type_: EventType,
    pub reason: String,
    pub action: &'static str,
    pub text: String,
    pub about: Option<About>,
}

impl Note {
    fn new(type_: EventType, reason: &str, action: &'static str, text: String) -> Self {
        Note {
            type_,
            reason: reason.to_string(),
            action,
            text,
            about: None,
        }
    }

    fn about(self, about: About) -> Self {
        Note {
            about: Some(about),
            ..self
        }
    }
}

/// A job to start.
#[derive(Debug, Clone, PartialEq)]
pub struct Start {
    pub build_id: String,
    /// Why (the `BuildStarted` note's first word): a trigger's reason or `ResumingBuild`.
    pub why: &'static str,
    pub started_at: DateTime<Utc>,
    pub today: NaiveDate,
    /// The rebuild annotation is present: remove it once the job started.
    pub remove_annotation: bool,
    /// `build_id` was made by this decision (not a build resumed from the status): no template
    /// can carry it yet ([`crate::builder::BuildRequest::fresh_id`]).
    pub fresh_id: bool,
}

/// The output ConfigMap to apply.
#[derive(Debug, Clone, PartialEq)]
pub struct OutputConfigMap {
    pub name: String,
    pub data: BTreeMap<String, String>,
}

/// What to do.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    pub phase: Phase,
    /// The whole status to write (conditions applied).
    pub status: GoldenImageStatus,
    /// Events, in order.
    pub events: Vec<Note>,
    /// The finished job's outcome as recorded: forget the job, remember its id.
    pub settle: Option<Recorded>,
    /// Stage Events of the job are published up to this many finished stages.
    pub announced: Option<usize>,
    /// The image's failed-build memory from now on.
    pub failed: Option<FailedBuild>,
    /// Destroy the image's leftover validation clones (no job of the image runs).
    pub remove_leftovers: bool,
    pub start: Option<Start>,
    pub config_map: Option<OutputConfigMap>,
    /// A cached `status.build` of a build this process already finished: corrected, not
    /// resumed (its id, for the log).
    pub not_resumed: Option<String>,
    /// Age of the latest template (the metric).
    pub latest_age_seconds: Option<i64>,
    pub requeue: Duration,
}

/// Whether the upstream checksum list is to be read now: `onSourceChange` with a
/// `checksumUrl`, at most once per `sourceCheckInterval`. Answers (checksum list URL, image URL).
pub fn source_check_due<'a>(
    gi: &'a GoldenImage,
    spec: &ValidSpec,
    now: DateTime<Utc>,
) -> Option<(&'a str, &'a str)> {
    if !gi.spec.rebuild.on_source_change {
        return None;
    }
    let ci = gi.spec.source.cloud_image.as_ref()?;
    let url = ci.checksum_url.as_deref()?;
    let due = gi
        .status
        .as_ref()
        .and_then(|s| s.last_source_check.as_ref())
        .map(|t| now - crate::api::time::from_time(t) >= spec.check_interval)
        .unwrap_or(true);
    due.then_some((url, ci.url.as_str()))
}

/// The decision.
pub fn decide(
    gi: &GoldenImage,
    spec: &ValidSpec,
    obs: &Observation,
    mem: &ImageMemory,
    now: DateTime<Utc>,
    timing: Timing,
) -> Plan {
    let mut st = gi.status.clone().unwrap_or_default();
    let mut events = Vec::new();
    let mut failed = mem.failed.clone();
    let mut finished = mem.finished.clone();
    let mut settle = None;
    let mut announced = None;

    // The job: stages finished since the last reconcile, and a finished job's outcome.
    let mut running: Option<&JobProgress> = None;
    if let Some(view) = &obs.job {
        let p = &view.progress;
        for (stage, secs) in p.stages.get(view.announced..).unwrap_or_default() {
            events.push(
                Note::new(
                    EventType::Normal,
                    "StageFinished",
                    "Build",
                    format!("build {}: stage {stage} finished in {secs:.1}s", p.id),
                )
                .about(About::Stage(p.id.clone(), *stage)),
            );
        }
        announced = Some(p.stages.len());
        match &view.outcome {
            None => running = Some(p),
            Some(outcome) => {
                record(outcome, p, spec, now, &mut st, &mut failed, &mut events);
                let recorded = Recorded {
                    id: p.id.clone(),
                    build: st.build.clone(),
                    last_validation: st.last_validation.clone(),
                };
                finished = Some(FinishedHere::with(finished.as_ref(), recorded.clone()));
                settle = Some(recorded);
            }
        }
    }

    // The upstream checksum, when it was read.
    match &obs.source_check {
        Some(SourceCheck::Read(sum)) => {
            st.source_checksum = Some(sum.clone());
            st.last_source_check = Some(crate::api::time::to_time(now));
        }
        Some(SourceCheck::Failed { url, message }) => {
            st.last_source_check = Some(crate::api::time::to_time(now));
            events.push(Note::new(
                EventType::Warning,
                "SourceCheckFailed",
                "CheckSource",
                format!("cannot read {url}: {message}; retrying after rebuild.sourceCheckInterval"),
            ));
        }
        None => {}
    }
    let checks_source = gi.spec.rebuild.on_source_change
        && gi
            .spec
            .source
            .cloud_image
            .as_ref()
            .is_some_and(|c| c.checksum_url.is_some());
    let upstream = st.source_checksum.clone().filter(|_| checks_source);

    let latest = obs
        .versions
        .iter()
        .find(|v| v.template.latest && v.template.owned);
    let newest = obs.versions.first();

    let annotation = gi.annotations().contains_key(REBUILD_ANNOTATION);
    let requested_at = gi.spec.rebuild.requested_at.as_deref();
    let trigger = triggers::decide(&triggers::Inputs {
        spec_hash: &spec.spec_hash,
        newest: newest.map(|v| &v.attempt),
        schedule: spec.schedule.as_ref(),
        now,
        requested_at,
        handled_request: st.handled_rebuild_request.as_deref(),
        annotation,
        upstream_checksum: upstream.as_deref(),
    });

    // Resume a build the previous controller process left running; a status older than this
    // process's last finish of the image (the cache lags the status write) is corrected, never
    // resumed.
    let mut not_resumed = None;
    let resume_id =
        match judge_status_build(st.build.as_ref(), running.is_some(), finished.as_ref()) {
            StatusBuild::Resume(id) => Some(id),
            StatusBuild::Stale(recorded) => {
                not_resumed = Some(recorded.id.clone());
                st.build = recorded.build;
                st.last_validation = recorded.last_validation;
                None
            }
            StatusBuild::AsIs => None,
        };

    let mut phase = Phase::UpToDate;
    let mut requeue = timing.requeue;
    let mut start = None;
    if let Some(p) = running {
        st.build = Some(p.to_status());
        let detail = p
            .message
            .as_deref()
            .map(|m| format!(": {m}"))
            .unwrap_or_default();
        phase = Phase::Building {
            id: p.id.clone(),
            stage: p.stage,
            message: format!("build {} in stage {}{detail}", p.id, p.stage),
        };
        requeue = timing.poll;
    } else {
        // A rebuild request, whichever trigger `triggers::decide` named first (with no template
        // at all, or the spec changed since the newest one, that is not `Manual`).
        let manual = trigger == Some(Trigger::Manual)
            || (trigger.is_some()
                && (annotation
                    || (requested_at.is_some()
                        && requested_at != st.handled_rebuild_request.as_deref())));
        let mut trigger = trigger;
        // An automatic retry of the same spec after a failed build: its attempt count goes on.
        let mut retrying = false;
        if let Some(f) = failed
            .as_ref()
            .filter(|f| f.spec_hash == spec.spec_hash && !manual)
        {
            retrying = f.retry_at.is_some();
            match f.retry_at {
                None => {
                    phase = Phase::GaveUp {
                        reason: f.reason,
                        message: f.message.clone(),
                    };
                    trigger = None;
                }
                Some(at) if at > now => {
                    phase = Phase::RetryScheduled {
                        at,
                        reason: f.reason,
                        message: f.message.clone(),
                    };
                    requeue = (at - now).to_std().unwrap_or_default();
                    trigger = None;
                }
                Some(_) => trigger = trigger.or(Some(Trigger::SpecChanged)),
            }
        }
        if resume_id.is_some() && trigger.is_none() && phase == Phase::UpToDate {
            trigger = Some(Trigger::SpecChanged);
        }
        if let Some(t) = trigger {
            match &obs.slot {
                Ok(()) => {
                    // Milliseconds: two builds of one image within a second (a fast failure
                    // and a manual rebuild) must not share an id, or the second would find the
                    // first's finished template by its marker and "resume" it.
                    let build_id = resume_id
                        .clone()
                        .unwrap_or_else(|| format!("b-{}", now.format("%Y%m%d%H%M%S%3f")));
                    if !retrying {
                        failed = None;
                    }
                    let why = if resume_id.is_some() {
                        "ResumingBuild"
                    } else {
                        t.reason()
                    };
                    events.push(
                        Note::new(
                            EventType::Normal,
                            "BuildStarted",
                            "Build",
                            format!(
                                "{why}: build {build_id} of {}-{} started on node {}",
                                gi.spec.os, gi.spec.type_, gi.spec.placement.node
                            ),
                        )
                        .about(About::Build(build_id.clone())),
                    );
                    st.build =
                        Some(JobProgress::new(&build_id, BuildStage::Source, now).to_status());
                    if let Some(r) = requested_at {
                        st.handled_rebuild_request = Some(r.to_string());
                    }
                    phase = Phase::Building {
                        id: build_id.clone(),
                        stage: BuildStage::Source,
                        message: format!("{why}: build {build_id} started"),
                    };
                    start = Some(Start {
                        fresh_id: resume_id.is_none(),
                        build_id,
                        why,
                        started_at: now,
                        today: now.date_naive(),
                        remove_annotation: annotation,
                    });
                    requeue = timing.poll;
                }
                Err(why) => {
                    phase = Phase::WaitingForSlot { why: why.clone() };
                    requeue = timing.poll.max(Duration::from_secs(5));
                }
            }
        }
    }

    // The newest template failed validation and nothing is building or due: the same spec is
    // deliberately not rebuilt, so the object cannot progress without a person (kstatus
    // `Stalled`, Argo CD `Degraded`). A spec change or a rebuild request starts a build, which
    // clears it.
    if phase == Phase::UpToDate
        && let Some(v) = newest.filter(|v| v.template.validation == ValidationStatus::Failed)
    {
        phase = Phase::ValidationFailed(FailedValidation {
            name: v.template.name.clone(),
            vmid: v.template.vmid,
            check: failed_check(&st, v.template.vmid, &v.marker),
            serving: latest.map(|l| (l.template.name.clone(), l.template.vmid)),
        });
    }

    // Output ConfigMap for the latest, from its marker: stable at steady state, and changed
    // only when a promotion lands.
    let config_map = match (&gi.spec.output, latest) {
        (Some(out), Some(l)) => Some(OutputConfigMap {
            name: out.config_map_name.clone(),
            data: crate::promote::config_map_data(l.template.vmid, &l.template.node, &l.marker),
        }),
        _ => None,
    };

    st.latest = latest.map(template_ref);
    st.versions = obs
        .versions
        .iter()
        .map(|v| TemplateVersionStatus {
            vmid: v.template.vmid,
            name: v.template.name.clone(),
            node: v.template.node.clone(),
            build_date: v.template.build_date.format("%Y-%m-%d").to_string(),
            build_number: v.template.build_number,
            validation: v.template.validation.into(),
            latest: v.template.latest,
        })
        .collect();
    let validated = newest.map(|v| validated(v, &st));
    let verdict = phase.verdict(st.latest.as_ref(), validated);
    status::apply(&mut st.conditions, &verdict, gi.metadata.generation, now);
    st.observed_generation = gi.metadata.generation;

    // Wake up for the next scheduled rebuild.
    if let (Some(cron), Some(v)) = (&spec.schedule, newest)
        && let Some(due) = triggers::next_due(cron, v.attempt.created)
        && let Ok(d) = (due - now).to_std()
    {
        requeue = requeue.min(d.max(Duration::from_secs(1)));
    }

    Plan {
        phase,
        status: st,
        events,
        settle,
        announced,
        failed,
        remove_leftovers: obs.leftovers && running.is_none(),
        start,
        config_map,
        not_resumed,
        latest_age_seconds: latest.map(|l| (now - l.template.created_at()).num_seconds()),
        requeue,
    }
}

/// Deletion with `deletionPolicy: Retain`: the Event; nothing on Proxmox but the leftovers.
pub fn retained() -> Note {
    Note::new(
        EventType::Normal,
        "TemplatesRetained",
        "Delete",
        "deletionPolicy Retain: the templates stay on Proxmox".to_string(),
    )
}

/// Deletion without a Proxmox connection (the Secret went first): the object is let go rather
/// than blocking its namespace forever, with this warning.
pub fn cleanup_skipped(why: &str) -> Note {
    Note::new(
        EventType::Warning,
        "CleanupSkipped",
        "Delete",
        format!("{why}; the templates and any leftover build VM stay on Proxmox"),
    )
}

/// After `deletionPolicy: Delete` ran `plan`: a Proxmox error fails the finalizer (the object
/// stays until its templates are dealt with), a refused token first as no retry fixes it;
/// otherwise the Event naming what was deleted and what stayed, with why.
pub fn deleted(
    plan: &crate::retention::Plan,
    executed: &[crate::retention::Executed],
) -> Result<Note, crate::proxmox::Error> {
    let errors: Vec<&crate::proxmox::Error> =
        executed.iter().filter_map(|e| e.error.as_ref()).collect();
    if let Some(e) = errors
        .iter()
        .find(|e| super::error::Error::Proxmox((**e).clone()).is_stalled())
        .or(errors.first())
    {
        return Err((*e).clone());
    }
    let deleted: Vec<u32> = executed
        .iter()
        .filter(|e| e.record.succeeded)
        .map(|e| e.record.vmid)
        .collect();
    let kept: Vec<String> = plan
        .decisions
        .iter()
        .filter(|d| d.action == crate::retention::Action::Keep)
        .map(|d| format!("{} ({})", d.vmid, d.reason.describe()))
        .chain(
            executed
                .iter()
                .filter(|e| !e.record.succeeded)
                .map(|e| format!("{} ({})", e.record.vmid, e.record.message)),
        )
        .collect();
    Ok(Note::new(
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
    ))
}

/// A finished job's outcome into the status, the failed-build memory and Events.
fn record(
    outcome: &JobOutcome,
    progress: &JobProgress,
    spec: &ValidSpec,
    now: DateTime<Utc>,
    st: &mut GoldenImageStatus,
    failed: &mut Option<FailedBuild>,
    events: &mut Vec<Note>,
) {
    match outcome {
        JobOutcome::Promoted {
            vmid, name, report, ..
        } => {
            st.last_validation = report.clone();
            st.build = None;
            *failed = None;
            let how = if report.is_some() {
                " after passing validation"
            } else {
                " (validation disabled)"
            };
            events.push(
                Note::new(
                    EventType::Normal,
                    "Promoted",
                    "Promote",
                    format!("template {name} (VMID {vmid}) is now the latest{how}"),
                )
                .about(About::Template(*vmid)),
            );
        }
        JobOutcome::ValidationFailed {
            vmid,
            name,
            failed_check,
            message,
            report,
        } => {
            st.last_validation = Some(report.clone());
            st.build = None;
            // The build worked: a retry series of earlier build failures ends here (left
            // behind, its due retry would rebuild the failed spec in a loop).
            *failed = None;
            events.push(Note::new(EventType::Warning, "ValidationFailed", "Validate",
                format!("template {name} (VMID {vmid}) failed check {failed_check}: {message}; it is tagged failed-validation and not promoted, the previous latest stays; change the spec or request a rebuild"))
                .about(About::Template(*vmid)));
        }
        JobOutcome::Failed {
            stage,
            reason,
            message,
            retryable,
            ..
        } => {
            let stage_text = stage.clone().unwrap_or_else(|| progress.stage.to_string());
            let mut b = progress.to_status();
            b.stage = BuildStage::Failed;
            b.message = Some(format!("{stage_text}: {message}"));
            st.build = Some(b);
            let attempt = memory::attempt_number(failed.as_ref(), &spec.spec_hash);
            let retry = memory::retry(*retryable, *reason, attempt);
            let what_now = match retry {
                Retry::Again => format!("retrying with backoff (attempt {attempt} failed)"),
                Retry::GaveUp => format!(
                    "gave up after {attempt} failed attempts of this spec: fix the spec or request a rebuild"
                ),
                Retry::Never => "fix the cause and change the spec or request a rebuild".into(),
            };
            let failure = format!("build failed in stage {stage_text}: {message}");
            *failed = Some(FailedBuild {
                spec_hash: spec.spec_hash.clone(),
                reason: *reason,
                message: if retry == Retry::GaveUp {
                    format!("{failure}\n{what_now}")
                } else {
                    failure
                },
                retry_at: (retry == Retry::Again).then(|| {
                    now + chrono::Duration::from_std(memory::backoff(attempt)).unwrap_or_default()
                }),
                attempts: attempt,
            });
            events.push(
                Note::new(
                    EventType::Warning,
                    reason.as_str(),
                    "Build",
                    format!(
                        "build {} failed in stage {stage_text}: {message}; {what_now}",
                        progress.id
                    ),
                )
                .about(About::Build(progress.id.clone())),
            );
        }
    }
}

/// `status.latest` for a template.
fn template_ref(v: &Version) -> TemplateRef {
    let m = &v.marker;
    TemplateRef {
        vmid: v.template.vmid,
        name: v.template.name.clone(),
        node: v.template.node.clone(),
        build_date: v.template.build_date.format("%Y-%m-%d").to_string(),
        build_number: v.template.build_number,
        source_checksum: match &m.metadata.source {
            Some(SourceInfo::CloudImage { checksum, .. }) => checksum.clone(),
            _ => None,
        },
        spec_hash: Some(m.metadata.spec_hash.clone()),
        validated_at: m
            .metadata
            .validation
            .validated_at()
            .map(crate::api::time::to_time),
    }
}

/// `Validated`: the newest template's validation.
fn validated(v: &Version, st: &GoldenImageStatus) -> Cond {
    let (name, vmid) = (&v.template.name, v.template.vmid);
    match v.template.validation {
        ValidationStatus::Passed => Cond::new(
            ConditionStatus::True,
            "ValidationPassed",
            format!("template {name} (VMID {vmid}) passed validation"),
        ),
        ValidationStatus::Failed => Cond::new(
            ConditionStatus::False,
            "ValidationFailed",
            format!(
                "template {name} (VMID {vmid}): {}",
                failed_check(st, vmid, &v.marker)
            ),
        ),
        ValidationStatus::Pending => Cond::new(
            ConditionStatus::Unknown,
            "ValidationPending",
            format!("template {name} (VMID {vmid}) is not validated yet"),
        ),
    }
}

/// Which check failed on template `vmid`: from `status.lastValidation` when it is that
/// template's report, else the reason its marker records (the status may be older than it).
fn failed_check(st: &GoldenImageStatus, vmid: u32, marker: &Marker) -> String {
    let from_report = st
        .last_validation
        .as_ref()
        .filter(|r| r.vmid == vmid)
        .and_then(|r| r.checks.iter().find(|c| !c.passed))
        .map(|c| format!("check {} failed: {}", c.name, c.message));
    let from_marker = || match &marker.metadata.validation {
        ValidationRecord::Failed { reason, .. } => Some(reason.clone()),
        _ => None,
    };
    from_report
        .or_else(from_marker)
        .unwrap_or_else(|| "a check failed (see status.lastValidation)".to_string())
}

#[cfg(test)]
#[path = "decide_tests.rs"]
mod tests;
