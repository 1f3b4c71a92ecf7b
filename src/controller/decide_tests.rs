//! Table tests of [`decide`]: every state the end-to-end tests (tests/integration/controller*.rs)
//! drive the controller through, decided from fixtures (`mk`).

use super::*;
use crate::api::golden_image::{CheckResult, TemplateValidation, ValidationReport};
use crate::api::template_retention::ExecutedAction;
use crate::controller::jobs::JobView;
use crate::retention::{self, Executed, Scope};
use chrono::TimeZone;

/// Fixtures: an image, its templates, jobs and memory, built small.
mod mk {
    use super::*;
    use crate::image::marker::{Owner, Role, TemplateMetadata};

    pub const UID: &str = "u-1";
    pub const HASH: &str = "h1";

    pub fn at(y: i32, m: u32, d: u32, h: u32, min: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(y, m, d, h, min, 0).unwrap()
    }

    /// The clock of most cases.
    pub fn now() -> DateTime<Utc> {
        at(2025, 1, 20, 12, 0)
    }

    pub fn timing() -> Timing {
        Timing {
            requeue: Duration::from_secs(300),
            poll: Duration::from_secs(3),
        }
    }

    /// A GoldenImage `platform/ubuntu` (generation 2) with `spec` merged into a minimal one.
    pub fn image_with(spec: serde_json::Value) -> GoldenImage {
        let mut base = serde_json::json!({
            "os": "ubuntu-24.04",
            "type": "minimal",
            "source": {"cloudImage": {"url": "https://mirror/noble.img", "checksum": format!("sha256:{}", "a".repeat(64))}},
            "placement": {"node": "pve1"},
            "output": {"configMapName": "ubuntu-template"},
        });
        merge(&mut base, &spec);
        let mut gi = GoldenImage::new("ubuntu", serde_json::from_value(base).unwrap());
        gi.metadata.namespace = Some("platform".into());
        gi.metadata.uid = Some(UID.into());
        gi.metadata.generation = Some(2);
        gi
    }

    fn merge(a: &mut serde_json::Value, b: &serde_json::Value) {
        match (a, b) {
            (serde_json::Value::Object(a), serde_json::Value::Object(b)) => {
                for (k, v) in b {
                    merge(a.entry(k.clone()).or_insert(serde_json::Value::Null), v);
                }
            }
            (a, b) => *a = b.clone(),
        }
    }

    pub fn image() -> GoldenImage {
        image_with(serde_json::json!({}))
    }

    pub fn with_status(mut gi: GoldenImage, st: GoldenImageStatus) -> GoldenImage {
        gi.status = Some(st);
        gi
    }

    pub fn spec() -> ValidSpec {
        ValidSpec {
            spec_hash: HASH.into(),
            schedule: None,
            check_interval: chrono::Duration::hours(24),
        }
    }

    /// A template of the image: VMID, the spec hash it was built from, its validation, whether
    /// it holds the channel tag, and when it was made.
    pub fn version(
        vmid: u32,
        hash: &str,
        validation: ValidationRecord,
        latest: bool,
        created: DateTime<Utc>,
    ) -> Version {
        let name = format!(
            "ubuntu-24.04-minimal-{}-{:03}",
            created.format("%Y%m%d"),
            vmid % 100
        );
        let status = ValidationStatus::from(&validation);
        let marker = Marker {
            schema: crate::image::marker::MARKER_SCHEMA_VERSION,
            owner: Owner {
                namespace: "platform".into(),
                name: "ubuntu".into(),
                uid: UID.into(),
            },
            build_id: format!("b-{vmid}"),
            role: Role::Template,
            vmid,
            metadata: TemplateMetadata {
                name: name.clone(),
                os: "ubuntu-24.04".into(),
                image_type: "minimal".into(),
                builder: "sombrero".into(),
                builder_version: "0.1.0".into(),
                build_date: created.date_naive(),
                build_number: (vmid % 100) as u16,
                source: Some(SourceInfo::CloudImage {
                    url: "https://mirror/noble.img".into(),
                    checksum: Some("sha256:aa".into()),
                }),
                spec_hash: hash.into(),
                package_manifest_digest: None,
                validation,
                created_at: Some(created),
            },
            build: None,
        };
        let template = TemplateVersion {
            vmid,
            name,
            node: "pve1".into(),
            build_date: created.date_naive(),
            build_number: (vmid % 100) as u16,
            validation: status,
            latest,
            archived: false,
            protected: false,
            in_use_by: vec![],
            owned: true,
            owner: Some(marker.owner.clone()),
            created: Some(created),
        };
        let attempt = Attempt {
            spec_hash: hash.into(),
            created,
            source_checksum: Some("sha256:aa".into()),
            awaiting_validation: status == ValidationStatus::Pending && !latest,
        };
        Version {
            template,
            attempt,
            marker,
        }
    }

    pub fn passed() -> ValidationRecord {
        ValidationRecord::Passed {
            at: at(2025, 1, 18, 10, 0),
        }
    }

    pub fn failed_validation() -> ValidationRecord {
        ValidationRecord::Failed {
            at: at(2025, 1, 19, 10, 0),
            reason: "check cloudInit failed: cloud-init status: degraded".into(),
        }
    }

    /// The promoted, validated template 8001 of the current spec, made on 2025-01-18.
    pub fn serving() -> Version {
        version(8001, HASH, passed(), true, at(2025, 1, 18, 9, 0))
    }

    pub fn obs(versions: Vec<Version>) -> Observation {
        Observation {
            versions,
            job: None,
            slot: Ok(()),
            leftovers: false,
            source_check: None,
        }
    }

    pub fn progress(id: &str, stage: BuildStage, done: &[BuildStage]) -> JobProgress {
        let mut p = JobProgress::new(id, stage, at(2025, 1, 20, 11, 50));
        p.stages = done.iter().map(|s| (*s, 12.34)).collect();
        p
    }

    pub fn running(id: &str, stage: BuildStage, done: &[BuildStage], announced: usize) -> JobView {
        JobView {
            progress: progress(id, stage, done),
            announced,
            outcome: None,
        }
    }

    pub fn finished(id: &str, stage: BuildStage, outcome: JobOutcome) -> JobView {
        JobView {
            progress: progress(id, stage, &[]),
            announced: 0,
            outcome: Some(outcome),
        }
    }

    pub fn failure(reason: FailureReason, retryable: bool) -> JobOutcome {
        JobOutcome::Failed {
            stage: Some("Provision".into()),
            reason,
            message: "step \"echo provision-step\": exit 1: E: mirror sync in progress".into(),
            retryable,
            touched: vec![],
        }
    }

    pub fn report(vmid: u32, passed: bool) -> ValidationReport {
        ValidationReport {
            vmid,
            passed,
            finished_at: None,
            checks: vec![CheckResult {
                name: "cloudInit".into(),
                passed,
                seconds: 1.0,
                message: if passed {
                    "done"
                } else {
                    "cloud-init status: degraded"
                }
                .into(),
            }],
        }
    }

    pub fn failed_build(attempts: u32, retry_at: Option<DateTime<Utc>>) -> FailedBuild {
        FailedBuild {
            spec_hash: HASH.into(),
            reason: FailureReason::ProvisioningFailed,
            message: "build failed in stage Provision: exit 1".into(),
            retry_at,
            attempts,
        }
    }

    pub fn memory(failed: Option<FailedBuild>) -> ImageMemory {
        ImageMemory {
            failed,
            finished: None,
        }
    }
}

use mk::*;

fn run(gi: &GoldenImage, obs: &Observation, mem: &ImageMemory) -> Plan {
    decide(gi, &spec(), obs, mem, now(), timing())
}

/// (status, reason) of condition `type_`, `None` when absent.
fn cond(plan: &Plan, type_: &str) -> Option<(String, String)> {
    plan.status
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
        .map(|c| (c.status.clone(), c.reason.clone()))
}

fn message(plan: &Plan, type_: &str) -> String {
    plan.status
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
        .map(|c| c.message.clone())
        .unwrap_or_default()
}

fn reasons(plan: &Plan) -> Vec<&str> {
    plan.events.iter().map(|e| e.reason.as_str()).collect()
}

fn t(status: &str, reason: &str) -> Option<(String, String)> {
    Some((status.into(), reason.into()))
}

/// The conditions of a plan: Ready, Reconciling, Stalled, UpToDate.
type Conds = [Option<(String, String)>; 4];

fn conds(plan: &Plan) -> Conds {
    [
        cond(plan, "Ready"),
        cond(plan, "Reconciling"),
        cond(plan, "Stalled"),
        cond(plan, "UpToDate"),
    ]
}

#[test]
fn the_phase_decides_the_conditions() {
    let latest = TemplateRef {
        vmid: 8001,
        name: "ubuntu-001".into(),
        node: "pve1".into(),
        ..Default::default()
    };
    let failed = |serving: Option<(String, u32)>| {
        Phase::ValidationFailed(FailedValidation {
            name: "ubuntu-002".into(),
            vmid: 8002,
            check: "check cloudInit failed: degraded".into(),
            serving,
        })
    };
    let building = Phase::Building {
        id: "b1".into(),
        stage: BuildStage::Provision,
        message: "build b1 in stage Provision".into(),
    };
    let gave_up = Phase::GaveUp {
        reason: FailureReason::ChecksumMismatch,
        message: "m".into(),
    };
    let retry = Phase::RetryScheduled {
        at: now(),
        reason: FailureReason::SourceUnavailable,
        message: "m".into(),
    };
    let waiting = Phase::WaitingForSlot { why: "w".into() };
    let s = |c: ConditionStatus, r: &str| Some((c, r.to_string()));
    use ConditionStatus::{False, True};
    // (phase, serving?, Ready, Reconciling, Stalled, UpToDate)
    let cases = [
        (
            Phase::UpToDate,
            true,
            s(True, "TemplateAvailable"),
            None,
            None,
            s(True, "UpToDate"),
        ),
        (
            Phase::UpToDate,
            false,
            s(False, "NoTemplateYet"),
            None,
            None,
            s(True, "UpToDate"),
        ),
        (
            building.clone(),
            true,
            s(True, "TemplateAvailable"),
            Some("Building"),
            None,
            s(False, "Building"),
        ),
        (
            building,
            false,
            s(False, "NoTemplateYet"),
            Some("Building"),
            None,
            s(False, "Building"),
        ),
        (
            waiting,
            false,
            s(False, "NoTemplateYet"),
            Some("WaitingForBuildSlot"),
            None,
            s(False, "WaitingForBuildSlot"),
        ),
        (
            retry,
            false,
            s(False, "NoTemplateYet"),
            Some("RetryingBuild"),
            None,
            s(False, "RetryingBuild"),
        ),
        (
            gave_up.clone(),
            true,
            s(True, "TemplateAvailable"),
            None,
            Some("ChecksumMismatch"),
            s(False, "ChecksumMismatch"),
        ),
        (
            gave_up,
            false,
            s(False, "ChecksumMismatch"),
            None,
            Some("ChecksumMismatch"),
            s(False, "ChecksumMismatch"),
        ),
        (
            failed(Some(("ubuntu-001".into(), 8001))),
            true,
            s(True, "TemplateAvailable"),
            None,
            Some("ValidationFailed"),
            s(False, "ValidationFailed"),
        ),
        (
            failed(None),
            false,
            s(False, "ValidationFailed"),
            None,
            Some("ValidationFailed"),
            s(False, "ValidationFailed"),
        ),
    ];
    for (phase, serving, ready, reconciling, stalled, up_to_date) in cases {
        let v = phase.verdict(serving.then_some(&latest), None);
        let got = (
            Some((v.ready.status, v.ready.reason.clone())),
            v.reconciling.as_ref().map(|r| r.0.as_str()),
            v.stalled.as_ref().map(|r| r.0.as_str()),
            v.up_to_date.as_ref().map(|c| (c.status, c.reason.clone())),
        );
        assert_eq!(
            got,
            (ready, reconciling, stalled, up_to_date),
            "{phase:?}, serving {serving}"
        );
    }
}

#[test]
fn no_template_starts_the_first_build() {
    let plan = run(&image(), &obs(vec![]), &ImageMemory::default());
    let start = plan.start.clone().expect("a job");
    assert_eq!(start.build_id, "b-20250120120000000");
    assert_eq!(start.why, "NoTemplateYet");
    assert_eq!(start.today, now().date_naive());
    assert!(!start.remove_annotation);
    assert_eq!(reasons(&plan), ["BuildStarted"]);
    assert_eq!(
        plan.events[0].text,
        "NoTemplateYet: build b-20250120120000000 of ubuntu-24.04-minimal started on node pve1"
    );
    assert_eq!(
        plan.events[0].about,
        Some(About::Build(start.build_id.clone()))
    );
    let b = plan.status.build.clone().unwrap();
    assert_eq!(
        (b.id.as_str(), b.stage),
        (start.build_id.as_str(), BuildStage::Source)
    );
    assert!(matches!(
        plan.phase,
        Phase::Building {
            stage: BuildStage::Source,
            ..
        }
    ));
    assert_eq!(
        conds(&plan),
        [
            t("False", "NoTemplateYet"),
            t("True", "Building"),
            None,
            t("False", "Building")
        ]
    );
    assert!(
        cond(&plan, "Validated").is_none(),
        "no template to validate"
    );
    assert_eq!(plan.requeue, Duration::from_secs(3));
    assert_eq!(plan.config_map, None);
    assert_eq!(plan.status.observed_generation, Some(2));
    assert!(plan.status.latest.is_none() && plan.status.versions.is_empty());
}

#[test]
fn a_build_due_waits_for_a_slot() {
    let mut o = obs(vec![]);
    o.slot = Err(
        "waiting for a build slot on node pve1: 2 builds run there (--max-builds-per-node 2)"
            .into(),
    );
    let plan = run(&image(), &o, &ImageMemory::default());
    assert_eq!(plan.start, None);
    assert!(plan.events.is_empty(), "no BuildStarted: {:?}", plan.events);
    assert!(plan.status.build.is_none());
    assert!(
        matches!(&plan.phase, Phase::WaitingForSlot { why } if why.contains("--max-builds-per-node"))
    );
    assert_eq!(cond(&plan, "Reconciling"), t("True", "WaitingForBuildSlot"));
    assert!(message(&plan, "Reconciling").contains("node pve1"));
    assert_eq!(
        plan.requeue,
        Duration::from_secs(5),
        "at least 5 s while waiting"
    );
}

#[test]
fn a_running_job_shows_its_stage_and_announces_each_finished_stage_once() {
    let mut o = obs(vec![serving()]);
    o.job = Some(running(
        "b-2",
        BuildStage::Provision,
        &[BuildStage::Source, BuildStage::CreateVm],
        1,
    ));
    // Even with a trigger due (the spec changed), a running job is not joined by another.
    let spec = ValidSpec {
        spec_hash: "h2".into(),
        ..mk::spec()
    };
    let plan = decide(
        &image(),
        &spec,
        &o,
        &ImageMemory::default(),
        now(),
        timing(),
    );
    assert_eq!(plan.start, None);
    assert_eq!(reasons(&plan), ["StageFinished"]);
    assert_eq!(
        plan.events[0].text,
        "build b-2: stage CreateVm finished in 12.3s"
    );
    assert_eq!(
        plan.events[0].about,
        Some(About::Stage("b-2".into(), BuildStage::CreateVm))
    );
    assert_eq!(plan.announced, Some(2));
    assert_eq!(plan.settle, None);
    let b = plan.status.build.clone().unwrap();
    assert_eq!((b.stage, b.stages.len()), (BuildStage::Provision, 2));
    assert_eq!(
        conds(&plan),
        [
            t("True", "TemplateAvailable"),
            t("True", "Building"),
            None,
            t("False", "Building")
        ]
    );
    assert_eq!(
        message(&plan, "Reconciling"),
        "build b-2 in stage Provision"
    );
    assert!(!plan.remove_leftovers || !o.leftovers);
    assert_eq!(plan.requeue, Duration::from_secs(3));
}

#[test]
fn a_promotion_is_recorded_and_the_image_is_up_to_date() {
    let mut o = obs(vec![
        version(8002, HASH, passed(), true, at(2025, 1, 20, 11, 58)),
        version(8001, HASH, passed(), false, at(2025, 1, 18, 9, 0)),
    ]);
    o.job = Some(finished(
        "b-2",
        BuildStage::Promote,
        JobOutcome::Promoted {
            vmid: 8002,
            name: "ubuntu-002".into(),
            report: Some(report(8002, true)),
            touched: vec![8001],
        },
    ));
    let mem = memory(Some(failed_build(1, Some(now()))));
    let gi = with_status(
        image(),
        GoldenImageStatus {
            build: Some(mk::progress("b-2", BuildStage::Promote, &[]).to_status()),
            ..Default::default()
        },
    );
    let plan = run(&gi, &o, &mem);
    assert_eq!(reasons(&plan), ["Promoted"]);
    assert_eq!(
        plan.events[0].text,
        "template ubuntu-002 (VMID 8002) is now the latest after passing validation"
    );
    assert_eq!(plan.failed, None, "a success ends a retry series");
    assert_eq!(
        plan.settle,
        Some(Recorded {
            id: "b-2".into(),
            build: None,
            last_validation: Some(report(8002, true)),
        })
    );
    assert_eq!(plan.start, None, "the recorded build is not resumed");
    assert!(plan.status.build.is_none());
    assert_eq!(plan.status.latest.as_ref().map(|l| l.vmid), Some(8002));
    assert_eq!(
        plan.status
            .versions
            .iter()
            .map(|v| (v.vmid, v.validation, v.latest))
            .collect::<Vec<_>>(),
        [
            (8002, TemplateValidation::Passed, true),
            (8001, TemplateValidation::Passed, false)
        ]
    );
    assert_eq!(plan.phase, Phase::UpToDate);
    assert_eq!(
        conds(&plan),
        [
            t("True", "TemplateAvailable"),
            None,
            None,
            t("True", "UpToDate")
        ]
    );
    assert_eq!(cond(&plan, "Validated"), t("True", "ValidationPassed"));
    let cm = plan.config_map.clone().unwrap();
    assert_eq!(cm.name, "ubuntu-template");
    assert_eq!(cm.data["template_id"], "8002");
    assert_eq!(plan.requeue, Duration::from_secs(300));
    assert_eq!(plan.latest_age_seconds, Some(120));
}

#[test]
fn validation_disabled_promotes_without_a_report() {
    let mut o = obs(vec![version(
        8002,
        HASH,
        ValidationRecord::Pending,
        true,
        now(),
    )]);
    o.job = Some(finished(
        "b-2",
        BuildStage::Promote,
        JobOutcome::Promoted {
            vmid: 8002,
            name: "ubuntu-002".into(),
            report: None,
            touched: vec![],
        },
    ));
    let plan = run(
        &image_with(serde_json::json!({"validation": {"enabled": false}})),
        &o,
        &ImageMemory::default(),
    );
    assert!(
        plan.events[0]
            .text
            .ends_with("is now the latest (validation disabled)")
    );
    assert_eq!(cond(&plan, "Ready"), t("True", "TemplateAvailable"));
    assert_eq!(cond(&plan, "Validated"), t("Unknown", "ValidationPending"));
    assert_eq!(
        plan.start, None,
        "a promoted pending template is not validated again"
    );
}

/// tests/integration/controller_states.rs: a_guest_command_that_keeps_failing_stalls_after_three_attempts.
#[test]
fn a_guest_command_failing_is_retried_twice_then_stalls() {
    let gi = image();
    let mut mem = ImageMemory::default();
    let mut clock = now();
    let mut texts = Vec::new();
    for attempt in 1..=3u32 {
        let mut o = obs(vec![]);
        o.job = Some(finished(
            &format!("b-{attempt}"),
            BuildStage::Provision,
            failure(FailureReason::ProvisioningFailed, true),
        ));
        let plan = decide(&gi, &spec(), &o, &mem, clock, timing());
        let f = plan.failed.clone().expect("remembered");
        assert_eq!(
            (f.attempts, f.reason),
            (attempt, FailureReason::ProvisioningFailed)
        );
        let b = plan.status.build.clone().unwrap();
        assert_eq!(b.stage, BuildStage::Failed);
        assert!(
            b.message
                .unwrap()
                .starts_with("Provision: step \"echo provision-step\"")
        );
        texts.push(plan.events[0].text.clone());
        assert_eq!(plan.start, None);
        if attempt < 3 {
            let delay = Duration::from_secs(5 << (attempt - 1));
            assert_eq!(
                f.retry_at,
                Some(clock + chrono::Duration::from_std(delay).unwrap())
            );
            assert!(matches!(plan.phase, Phase::RetryScheduled { .. }));
            assert_eq!(
                conds(&plan),
                [
                    t("False", "NoTemplateYet"),
                    t("True", "RetryingBuild"),
                    None,
                    t("False", "RetryingBuild")
                ]
            );
            assert_eq!(plan.requeue, delay);
            // Not before the backoff ...
            let mut idle = obs(vec![]);
            idle.slot = Ok(());
            mem.failed = plan.failed.clone();
            let early = decide(
                &gi,
                &spec(),
                &idle,
                &mem,
                clock + chrono::Duration::seconds(1),
                timing(),
            );
            assert_eq!(early.start, None);
            // ... then the same spec again, its attempts counting on.
            clock += chrono::Duration::from_std(delay).unwrap();
            let again = decide(&gi, &spec(), &idle, &mem, clock, timing());
            // (No template yet: the trigger keeps its reason.)
            assert_eq!(again.start.as_ref().map(|s| s.why), Some("NoTemplateYet"));
            assert_eq!(again.failed, mem.failed, "a retry keeps the count");
        } else {
            assert_eq!(f.retry_at, None);
            assert!(matches!(
                plan.phase,
                Phase::GaveUp {
                    reason: FailureReason::ProvisioningFailed,
                    ..
                }
            ));
            assert_eq!(
                conds(&plan),
                [
                    t("False", "ProvisioningFailed"),
                    None,
                    t("True", "ProvisioningFailed"),
                    t("False", "ProvisioningFailed")
                ]
            );
            let m = message(&plan, "Stalled");
            for part in [
                "Provision",
                "echo provision-step",
                "E: mirror sync in progress",
                "3 failed attempts",
                "fix the spec or request a rebuild",
            ] {
                assert!(m.contains(part), "{part:?} in {m}");
            }
            mem.failed = plan.failed.clone();
        }
    }
    assert_eq!(
        texts
            .iter()
            .filter(|t| t.contains("retrying with backoff"))
            .count(),
        2,
        "{texts:#?}"
    );
    assert!(
        texts[2].contains("gave up after 3 failed attempts"),
        "{}",
        texts[2]
    );
    // No fourth attempt, however long after.
    let later = decide(
        &gi,
        &spec(),
        &obs(vec![]),
        &mem,
        clock + chrono::Duration::days(2),
        timing(),
    );
    assert_eq!(later.start, None);
    assert_eq!(cond(&later, "Stalled"), t("True", "ProvisioningFailed"));
    // A rebuild request builds again and starts the count over.
    let mut req = image();
    req.metadata.annotations = Some([(REBUILD_ANNOTATION.to_string(), "1".to_string())].into());
    let plan = decide(&req, &spec(), &obs(vec![]), &mem, clock, timing());
    let start = plan.start.clone().unwrap();
    assert!(start.remove_annotation);
    assert_eq!(plan.failed, None);
    assert!(cond(&plan, "Stalled").is_none());
}

#[test]
fn which_failures_are_retried() {
    // (reason, retryable, previous attempts) -> retried (Some(delay)) or stalled (None)
    let cases = [
        (FailureReason::ProvisioningFailed, true, 0, Some(5)),
        (FailureReason::BuildTimeout, true, 2, None),
        (FailureReason::ProxmoxUnreachable, true, 2, Some(20)),
        (FailureReason::ProxmoxUnreachable, true, 9, Some(300)),
        (FailureReason::SourceUnavailable, true, 5, Some(160)),
        (FailureReason::ValidationError, true, 0, Some(5)),
        (FailureReason::ValidationError, false, 0, None),
        (FailureReason::ChecksumMismatch, false, 0, None),
        (FailureReason::InsufficientPrivileges, false, 0, None),
        (FailureReason::InvalidSpec, false, 0, None),
    ];
    for (reason, retryable, previous, delay) in cases {
        let mut o = obs(vec![]);
        o.job = Some(finished(
            "b-9",
            BuildStage::Source,
            failure(reason, retryable),
        ));
        let mut prev = failed_build(previous, Some(now()));
        prev.reason = reason;
        let mem = memory((previous > 0).then_some(prev));
        let plan = run(&image(), &o, &mem);
        let f = plan.failed.clone().unwrap();
        let got = f.retry_at.map(|at| (at - now()).num_seconds());
        assert_eq!(
            got, delay,
            "{reason:?} retryable {retryable} after {previous}"
        );
        let stalled = cond(&plan, "Stalled").map(|c| c.1);
        assert_eq!(stalled.is_some(), delay.is_none(), "{reason:?}");
        if let Some(r) = stalled {
            assert_eq!(r, reason.as_str());
        }
        assert_eq!(plan.events[0].reason, reason.as_str());
    }
}

/// tests/integration/controller_states.rs: an_unreachable_checksum_url_is_retried_not_stalled.
#[test]
fn an_unreachable_checksum_url_is_retried_naming_the_stage_once() {
    let mut o = obs(vec![]);
    o.job = Some(finished(
        "b-1",
        BuildStage::Source,
        JobOutcome::Failed {
            stage: Some("Source".into()),
            reason: FailureReason::SourceUnavailable,
            message: "step \"checksumUrl\": cannot fetch http://127.0.0.1:9/SHA256SUMS".into(),
            retryable: true,
            touched: vec![],
        },
    ));
    let plan = run(&image(), &o, &ImageMemory::default());
    assert_eq!(cond(&plan, "Reconciling"), t("True", "RetryingBuild"));
    assert!(cond(&plan, "Stalled").is_none());
    let m = message(&plan, "Reconciling");
    assert!(
        m.contains("checksumUrl") && m.contains("http://127.0.0.1:9/SHA256SUMS"),
        "{m}"
    );
    assert_eq!(m.matches("failed in stage").count(), 1, "{m}");
    assert_eq!(plan.events[0].text.matches("failed in stage").count(), 1);
    assert!(plan.events[0].text.contains("retrying with backoff"));
}

#[test]
fn a_failure_that_retrying_will_not_fix_stalls_until_the_spec_changes_or_a_rebuild_is_requested() {
    let mut o = obs(vec![serving()]);
    o.job = Some(finished(
        "b-2",
        BuildStage::Source,
        failure(FailureReason::ChecksumMismatch, false),
    ));
    let plan = run(&image(), &o, &ImageMemory::default());
    assert!(matches!(
        plan.phase,
        Phase::GaveUp {
            reason: FailureReason::ChecksumMismatch,
            ..
        }
    ));
    assert!(
        plan.events[0]
            .text
            .ends_with("fix the cause and change the spec or request a rebuild")
    );
    // The serving template still serves.
    assert_eq!(
        conds(&plan),
        [
            t("True", "TemplateAvailable"),
            None,
            t("True", "ChecksumMismatch"),
            t("False", "ChecksumMismatch")
        ]
    );
    let mem = memory(plan.failed.clone());
    let gi = with_status(image(), plan.status.clone());
    // It stays so.
    let again = run(&gi, &obs(vec![serving()]), &mem);
    assert_eq!(again.start, None);
    assert_eq!(cond(&again, "Stalled"), t("True", "ChecksumMismatch"));
    // A spec change builds and forgets the failure.
    let changed = ValidSpec {
        spec_hash: "h2".into(),
        ..spec()
    };
    let plan = decide(&gi, &changed, &obs(vec![serving()]), &mem, now(), timing());
    assert_eq!(plan.start.as_ref().map(|s| s.why), Some("SpecChanged"));
    assert_eq!(plan.failed, None);
    assert!(cond(&plan, "Stalled").is_none());
    // So does a rebuild request (spec.rebuild.requestedAt), handled once.
    let mut req = gi.clone();
    req.spec.rebuild.requested_at = Some("2025-01-20T11:00:00Z".into());
    let plan = run(&req, &obs(vec![serving()]), &mem);
    assert_eq!(plan.start.as_ref().map(|s| s.why), Some("RebuildRequested"));
    assert_eq!(
        plan.status.handled_rebuild_request.as_deref(),
        Some("2025-01-20T11:00:00Z")
    );
    // (The job it started is done: no build in flight.)
    let handled = with_status(
        req,
        GoldenImageStatus {
            build: None,
            ..plan.status.clone()
        },
    );
    let mem = memory(None);
    assert_eq!(
        run(&handled, &obs(vec![serving()]), &mem).start,
        None,
        "handled once"
    );
}

/// tests/integration/controller_states.rs: a_first_template_failing_validation_stalls_until_a_passing_spec_change.
#[test]
fn a_failed_first_validation_stalls_until_the_spec_changes() {
    let failed = version(
        8002,
        HASH,
        failed_validation(),
        false,
        at(2025, 1, 20, 11, 0),
    );
    let mut o = obs(vec![failed.clone()]);
    o.job = Some(finished(
        "b-2",
        BuildStage::Validate,
        JobOutcome::ValidationFailed {
            vmid: 8002,
            name: failed.template.name.clone(),
            failed_check: "cloudInit".into(),
            message: "cloud-init status: degraded".into(),
            report: report(8002, false),
        },
    ));
    let plan = run(&image(), &o, &memory(Some(failed_build(1, Some(now())))));
    assert_eq!(reasons(&plan), ["ValidationFailed"]);
    assert_eq!(plan.events[0].type_, EventType::Warning);
    assert_eq!(plan.failed, None, "the build worked: no retry series");
    assert_eq!(plan.status.last_validation, Some(report(8002, false)));
    assert!(matches!(&plan.phase, Phase::ValidationFailed(f) if f.serving.is_none()));
    assert_eq!(
        conds(&plan),
        [
            t("False", "ValidationFailed"),
            None,
            t("True", "ValidationFailed"),
            t("False", "ValidationFailed")
        ]
    );
    assert_eq!(cond(&plan, "Validated"), t("False", "ValidationFailed"));
    let m = message(&plan, "Stalled");
    for part in [
        failed.template.name.as_str(),
        "8002",
        "cloudInit",
        "degraded",
        "no earlier template serves",
        "change the spec",
        "request a rebuild",
    ] {
        assert!(m.contains(part), "{part:?} in {m}");
    }
    assert!(message(&plan, "Ready").contains("no earlier template serves"));
    assert!(plan.status.latest.is_none() && plan.config_map.is_none());
    assert_eq!(plan.start, None);
    // Nothing rebuilds the same spec; the check comes from the marker once the report is gone.
    let idle = run(
        &image(),
        &obs(vec![failed.clone()]),
        &ImageMemory::default(),
    );
    assert_eq!(idle.start, None);
    assert_eq!(cond(&idle, "Stalled"), t("True", "ValidationFailed"));
    assert!(
        message(&idle, "Validated").contains("check cloudInit failed: cloud-init status: degraded")
    );
    // A spec change starts a build, which clears it.
    let changed = ValidSpec {
        spec_hash: "h2".into(),
        ..spec()
    };
    let plan = decide(
        &image(),
        &changed,
        &obs(vec![failed]),
        &ImageMemory::default(),
        now(),
        timing(),
    );
    assert_eq!(plan.start.as_ref().map(|s| s.why), Some("SpecChanged"));
    assert!(cond(&plan, "Stalled").is_none());
    assert_eq!(cond(&plan, "Reconciling"), t("True", "Building"));
}

/// tests/integration/controller.rs: a_failed_validation_keeps_the_previous_latest_and_does_not_loop.
#[test]
fn a_failed_validation_keeps_the_previous_latest_serving() {
    let o = obs(vec![
        version(
            8002,
            "h2",
            failed_validation(),
            false,
            at(2025, 1, 20, 11, 0),
        ),
        serving(),
    ]);
    let spec = ValidSpec {
        spec_hash: "h2".into(),
        ..spec()
    };
    let plan = decide(
        &image(),
        &spec,
        &o,
        &ImageMemory::default(),
        now(),
        timing(),
    );
    assert_eq!(plan.start, None, "no loop");
    assert_eq!(
        conds(&plan),
        [
            t("True", "TemplateAvailable"),
            None,
            t("True", "ValidationFailed"),
            t("False", "ValidationFailed")
        ]
    );
    let ready = message(&plan, "Ready");
    assert!(ready.contains("8001") && ready.contains("8002"), "{ready}");
    assert!(message(&plan, "Stalled").contains("(VMID 8001) still serves"));
    assert_eq!(plan.status.latest.as_ref().map(|l| l.vmid), Some(8001));
    assert_eq!(
        plan.config_map
            .as_ref()
            .map(|c| c.data["template_id"].as_str()),
        Some("8001")
    );
}

/// tests/integration/controller.rs: a_controller_killed_mid_build_resumes_without_leaks.
#[test]
fn a_build_a_previous_process_left_running_is_resumed_with_its_id() {
    let gi = with_status(
        image(),
        GoldenImageStatus {
            build: Some(
                mk::progress("b-7", BuildStage::Provision, &[BuildStage::Source]).to_status(),
            ),
            ..Default::default()
        },
    );
    // Up to date otherwise: resumed all the same.
    let plan = run(&gi, &obs(vec![serving()]), &ImageMemory::default());
    let start = plan.start.clone().expect("resumed");
    assert_eq!(
        (start.build_id.as_str(), start.why),
        ("b-7", "ResumingBuild")
    );
    assert!(
        plan.events[0]
            .text
            .starts_with("ResumingBuild: build b-7 of")
    );
    // Not while waiting for a slot, and not a failed one.
    let mut busy = obs(vec![serving()]);
    busy.slot = Err("waiting".into());
    assert_eq!(run(&gi, &busy, &ImageMemory::default()).start, None);
    let mut failed = gi.clone();
    failed
        .status
        .as_mut()
        .unwrap()
        .build
        .as_mut()
        .unwrap()
        .stage = BuildStage::Failed;
    assert_eq!(
        run(&failed, &obs(vec![serving()]), &ImageMemory::default()).start,
        None
    );
}

/// tests/integration/controller_resume.rs: a_template_finished_before_a_crash_is_validated_and_promoted_not_rebuilt.
#[test]
fn a_template_never_validated_after_a_lost_status_build_is_validated_not_rebuilt() {
    let pending = version(
        8002,
        HASH,
        ValidationRecord::Pending,
        false,
        at(2025, 1, 20, 11, 0),
    );
    let plan = run(
        &image(),
        &obs(vec![pending, serving()]),
        &ImageMemory::default(),
    );
    let start = plan.start.clone().unwrap();
    assert_eq!(start.why, "ValidationPending");
    assert_eq!(cond(&plan, "Validated"), t("Unknown", "ValidationPending"));
    assert_eq!(cond(&plan, "Ready"), t("True", "TemplateAvailable"));
}

/// tests/integration/controller_states.rs: a_promoted_build_is_never_resumed_from_the_cached_status.
#[test]
fn a_cached_status_of_a_build_promoted_here_is_corrected_not_resumed() {
    let gi = with_status(
        image(),
        GoldenImageStatus {
            build: Some(mk::progress("b-2", BuildStage::Promote, &[]).to_status()),
            ..Default::default()
        },
    );
    let mem = ImageMemory {
        failed: None,
        finished: Some(FinishedHere::with(
            None,
            Recorded {
                id: "b-2".into(),
                build: None,
                last_validation: Some(report(8001, true)),
            },
        )),
    };
    let plan = run(&gi, &obs(vec![serving()]), &mem);
    assert_eq!(plan.start, None);
    assert_eq!(plan.not_resumed.as_deref(), Some("b-2"));
    assert!(plan.status.build.is_none());
    assert_eq!(plan.status.last_validation, Some(report(8001, true)));
    assert!(plan.events.is_empty(), "{:?}", plan.events);
    assert_eq!(plan.phase, Phase::UpToDate);
}

/// tests/integration/controller.rs: a_spec_change_promotes_a_new_version_and_keeps_the_old.
#[test]
fn a_spec_change_builds_while_the_latest_serves() {
    let spec = ValidSpec {
        spec_hash: "h2".into(),
        ..spec()
    };
    let plan = decide(
        &image(),
        &spec,
        &obs(vec![serving()]),
        &ImageMemory::default(),
        now(),
        timing(),
    );
    assert_eq!(plan.start.as_ref().map(|s| s.why), Some("SpecChanged"));
    assert_eq!(
        conds(&plan),
        [
            t("True", "TemplateAvailable"),
            t("True", "Building"),
            None,
            t("False", "Building")
        ]
    );
    // The ConfigMap keeps describing the serving template while the build runs.
    assert_eq!(
        plan.config_map
            .as_ref()
            .map(|c| c.data["template_id"].as_str()),
        Some("8001")
    );
    assert_eq!(
        plan.status.latest.as_ref().map(|l| l.spec_hash.as_deref()),
        Some(Some(HASH))
    );
}

#[test]
fn steady_state_changes_nothing() {
    let gi = image();
    let first = run(&gi, &obs(vec![serving()]), &ImageMemory::default());
    assert_eq!(first.phase, Phase::UpToDate);
    assert_eq!((first.start.clone(), first.events.len()), (None, 0));
    // The written status decided again: the same status, so no write.
    let gi = with_status(gi, first.status.clone());
    let later = decide(
        &gi,
        &spec(),
        &obs(vec![serving()]),
        &ImageMemory::default(),
        now() + chrono::Duration::minutes(5),
        timing(),
    );
    assert_eq!(later.status, first.status);
    assert_eq!(later.config_map, first.config_map);
}

#[test]
fn a_schedule_rebuilds_when_due_and_wakes_up_for_it() {
    let spec = ValidSpec {
        schedule: Some(triggers::parse_schedule("@monthly").unwrap()),
        ..spec()
    };
    let o = obs(vec![serving()]);
    // Two minutes before Feb 1: nothing yet, but back then.
    let before = decide(
        &image(),
        &spec,
        &o,
        &ImageMemory::default(),
        at(2025, 1, 31, 23, 58),
        timing(),
    );
    assert_eq!(before.start, None);
    assert_eq!(before.requeue, Duration::from_secs(120));
    let after = decide(
        &image(),
        &spec,
        &o,
        &ImageMemory::default(),
        at(2025, 2, 1, 0, 1),
        timing(),
    );
    assert_eq!(
        after.start.as_ref().map(|s| s.why),
        Some("ScheduledRebuild")
    );
    // Far from due: the usual requeue.
    assert_eq!(
        run(&image(), &o, &ImageMemory::default()).requeue,
        Duration::from_secs(300)
    );
}

/// tests/integration/controller.rs: a_fedora_style_checksum_list_drives_the_source_check.
#[test]
fn an_upstream_checksum_change_rebuilds_and_a_failed_check_warns() {
    let gi = image_with(serde_json::json!({
        "source": {"cloudImage": {"checksum": null, "checksumUrl": "https://mirror/SHA256SUMS"}},
        "rebuild": {"onSourceChange": true},
    }));
    // Due on the first reconcile, then once per interval.
    assert_eq!(
        source_check_due(&gi, &spec(), now()),
        Some(("https://mirror/SHA256SUMS", "https://mirror/noble.img"))
    );
    let checked = with_status(
        gi.clone(),
        GoldenImageStatus {
            last_source_check: Some(crate::api::time::to_time(
                now() - chrono::Duration::hours(23),
            )),
            ..Default::default()
        },
    );
    assert_eq!(source_check_due(&checked, &spec(), now()), None);
    assert!(source_check_due(&checked, &spec(), now() + chrono::Duration::hours(1)).is_some());
    assert_eq!(
        source_check_due(&image(), &spec(), now()),
        None,
        "no checksumUrl"
    );

    let mut o = obs(vec![serving()]);
    o.source_check = Some(SourceCheck::Read("sha256:aa".into()));
    let same = run(&gi, &o, &ImageMemory::default());
    assert_eq!(same.start, None);
    assert_eq!(same.status.source_checksum.as_deref(), Some("sha256:aa"));
    assert_eq!(
        same.status.last_source_check,
        Some(crate::api::time::to_time(now()))
    );
    o.source_check = Some(SourceCheck::Read("sha256:bb".into()));
    let changed = run(&gi, &o, &ImageMemory::default());
    assert_eq!(changed.start.as_ref().map(|s| s.why), Some("SourceChanged"));
    // onSourceChange off: read (by an earlier spec) but never a trigger.
    let off = image_with(serde_json::json!({
        "source": {"cloudImage": {"checksum": null, "checksumUrl": "https://mirror/SHA256SUMS"}},
        "rebuild": {"onSourceChange": false},
    }));
    assert_eq!(source_check_due(&off, &spec(), now()), None);
    let off = with_status(
        off,
        GoldenImageStatus {
            build: None,
            ..changed.status.clone()
        },
    );
    assert_eq!(
        run(&off, &obs(vec![serving()]), &ImageMemory::default()).start,
        None
    );

    o.source_check = Some(SourceCheck::Failed {
        url: "https://mirror/SHA256SUMS".into(),
        message: "HTTP 503".into(),
    });
    let failed = run(&gi, &o, &ImageMemory::default());
    assert_eq!(reasons(&failed), ["SourceCheckFailed"]);
    assert_eq!(
        failed.events[0].text,
        "cannot read https://mirror/SHA256SUMS: HTTP 503; retrying after rebuild.sourceCheckInterval"
    );
    assert_eq!(
        failed.status.last_source_check,
        Some(crate::api::time::to_time(now()))
    );
    assert_eq!(failed.start, None);
}

/// tests/integration/controller.rs: a_leftover_validation_clone_goes_on_the_next_reconcile.
#[test]
fn leftover_validation_clones_go_only_while_no_job_runs() {
    let mut o = obs(vec![serving()]);
    o.leftovers = true;
    assert!(run(&image(), &o, &ImageMemory::default()).remove_leftovers);
    o.job = Some(running("b-2", BuildStage::Validate, &[], 0));
    assert!(
        !run(&image(), &o, &ImageMemory::default()).remove_leftovers,
        "the job's own clone"
    );
    o.job = Some(finished(
        "b-2",
        BuildStage::Validate,
        failure(FailureReason::ValidationError, true),
    ));
    assert!(
        run(&image(), &o, &ImageMemory::default()).remove_leftovers,
        "the job just ended"
    );
    o.leftovers = false;
    o.job = None;
    assert!(!run(&image(), &o, &ImageMemory::default()).remove_leftovers);
}

#[test]
fn no_output_configmap_without_a_name_or_a_latest() {
    let mut gi = image();
    gi.spec.output = None;
    assert_eq!(
        run(&gi, &obs(vec![serving()]), &ImageMemory::default()).config_map,
        None
    );
    let unpromoted = version(8001, HASH, passed(), false, at(2025, 1, 18, 9, 0));
    assert_eq!(
        run(&image(), &obs(vec![unpromoted]), &ImageMemory::default()).config_map,
        None
    );
}

fn executed(vmid: u32, succeeded: bool, error: Option<crate::proxmox::Error>) -> Executed {
    Executed {
        record: ExecutedAction {
            vmid,
            action: "delete".into(),
            succeeded,
            message: if succeeded {
                String::new()
            } else {
                "refused".into()
            },
            at: None,
        },
        error,
    }
}

/// tests/integration/controller.rs: deleting_with_retain_leaves_the_templates,
/// deleting_with_delete_removes_unused_templates_and_keeps_a_cloned_one.
#[test]
fn deletion_retains_or_reports_what_went_and_what_stayed() {
    let retain = retained();
    assert_eq!(
        (retain.reason.as_str(), retain.type_),
        ("TemplatesRetained", EventType::Normal)
    );
    let skipped = cleanup_skipped("Secret platform/pve not found");
    assert_eq!(
        (skipped.reason.as_str(), skipped.type_),
        ("CleanupSkipped", EventType::Warning)
    );
    assert!(
        skipped
            .text
            .ends_with("the templates and any leftover build VM stay on Proxmox")
    );

    let owner = crate::image::marker::Owner {
        namespace: "platform".into(),
        name: "ubuntu".into(),
        uid: UID.into(),
    };
    let mut cloned = serving().template;
    cloned.in_use_by = vec![700];
    let unused = version(8002, HASH, passed(), false, at(2025, 1, 19, 9, 0)).template;
    let plan = retention::plan_image_deletion(&[cloned, unused], &Scope::Image(owner));
    let note = deleted(&plan, &[executed(8002, true, None)]).unwrap();
    assert_eq!(note.reason, "TemplatesDeleted");
    assert_eq!(
        note.text,
        "deletionPolicy Delete: deleted templates [8002]; kept 8001 (in use by linked clones 700)"
    );
    // A refused token wins over a busy Proxmox: the deletion stalls with the credential hint.
    let busy = crate::proxmox::Error::Transient {
        request: "DELETE /nodes/pve1/qemu/8002".into(),
        message: "503".into(),
    };
    let refused = crate::proxmox::Error::Forbidden {
        request: "DELETE /nodes/pve1/qemu/8003".into(),
        message: "Permission check failed".into(),
    };
    let err = deleted(
        &plan,
        &[
            executed(8002, false, Some(busy.clone())),
            executed(8003, false, Some(refused)),
        ],
    )
    .unwrap_err();
    assert!(
        matches!(err, crate::proxmox::Error::Forbidden { .. }),
        "{err}"
    );
    let err = deleted(&plan, &[executed(8002, false, Some(busy))]).unwrap_err();
    assert!(
        matches!(err, crate::proxmox::Error::Transient { .. }),
        "{err}"
    );
}
