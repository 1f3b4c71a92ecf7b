//! The real pipeline behind the controller: [`crate::engine::run`] (privileges, the build,
//! validation when `spec.validation.enabled`, promotion or `mark_failed`; the same engine
//! `sombrero build --validate --promote` runs), its outcome mapped to a [`JobOutcome`].
//! Cleanup: `cleanup_abandoned_builds` + `cleanup_stale_validation_vms`.

use futures::FutureExt;
use futures::future::BoxFuture;

use super::context::{JobRequest, JobRunner};
use super::error::Error;
use super::jobs::{JobOutcome, ProgressHandle};
use crate::api::golden_image::{BuildStage, ValidationReport};
use crate::builder;
use crate::engine::Outcome;
use crate::image::marker::Owner;
use crate::proxmox;
use crate::validate;

/// The engine of `crate::builder`, `crate::validate` and promotion.
pub struct EngineRunner;

impl builder::Progress for ProgressHandle {
    fn stage(&self, stage: builder::Stage) {
        ProgressHandle::stage(self, stage.into());
    }
    fn message(&self, text: &str) {
        ProgressHandle::message(self, text);
    }
    fn percent(&self, p: f32) {
        ProgressHandle::percent(self, p);
    }
}

impl crate::engine::Progress for ProgressHandle {
    fn step(&self, step: BuildStage) {
        ProgressHandle::stage(self, step);
    }
    fn built(&self, built: &builder::BuildOutcome) {
        self.vmid(built.vmid);
    }
}

/// The controller's run: validation as `spec.validation.enabled` says, promotion always.
async fn run(req: JobRequest, progress: ProgressHandle) -> JobOutcome {
    let request = crate::engine::Request {
        validate: req.spec.validation.enabled,
        promote: true,
        adopt_unvalidated: true,
        // A build resumed from the status keeps its id: its finished template is looked for.
        fresh_id: req.fresh_id,
        client: req.client,
        spec: req.spec,
        owner: req.owner,
        build_id: req.build_id,
        today: req.today,
    };
    job_outcome(crate::engine::run(&request, &progress).await)
}

fn job_outcome(outcome: Outcome) -> JobOutcome {
    match outcome {
        Outcome::Promoted {
            built,
            report,
            promotion,
        } => JobOutcome::Promoted {
            vmid: built.vmid,
            name: built.name,
            report: report.as_ref().map(ValidationReport::from),
            touched: promotion.previous,
        },
        Outcome::ValidationFailed {
            built,
            failed_check,
            message,
            report,
        } => JobOutcome::ValidationFailed {
            vmid: built.vmid,
            name: built.name,
            failed_check,
            message,
            report: report
                .as_ref()
                .map(ValidationReport::from)
                .unwrap_or_default(),
        },
        Outcome::Failed(f) => JobOutcome::Failed {
            stage: f.stage,
            reason: f.reason,
            message: f.message,
            retryable: f.retryable,
            touched: f.touched,
        },
        // Promotion is always asked for here; these cannot come back.
        Outcome::Built { built } | Outcome::Validated { built, .. } => JobOutcome::Failed {
            stage: Some("Promote".into()),
            reason: crate::engine::FailureReason::PromotionFailed,
            message: format!("template {} was not promoted", built.name),
            retryable: true,
            touched: vec![built.vmid],
        },
    }
}

impl JobRunner for EngineRunner {
    fn run(&self, request: JobRequest, progress: ProgressHandle) -> BoxFuture<'static, JobOutcome> {
        run(request, progress).boxed()
    }

    fn cleanup(
        &self,
        client: proxmox::Client,
        owner: Owner,
        names: Option<builder::ImageNames>,
    ) -> BoxFuture<'static, Result<Vec<u32>, Error>> {
        async move {
            // A revoked token or a missing privilege must stall the deletion with the hint, not
            // be retried as if Proxmox were busy.
            let mut removed = builder::cleanup_abandoned_builds(&client, &owner, names.as_ref())
                .await
                .map_err(|e| match e.category {
                    builder::ErrorCategory::ProxmoxAuth => Error::ProxmoxAuth(e.to_string()),
                    _ => Error::Transient(e.to_string()),
                })?;
            removed.extend(
                validate::cleanup_stale_validation_vms(&client, &owner)
                    .await
                    .map_err(|e| match e {
                        validate::ValidateError::Proxmox { source, .. }
                            if Error::Proxmox(source.clone()).is_stalled() =>
                        {
                            Error::Proxmox(source)
                        }
                        e => Error::Transient(e.to_string()),
                    })?,
            );
            Ok(removed)
        }
        .boxed()
    }
}
