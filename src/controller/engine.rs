//! The real pipeline behind the controller: `crate::build::run_build` (resumable from the
//! markers), then `crate::validate::validate_template` when `spec.validation.enabled`, then
//! `crate::promote::promote` (or `mark_failed`). Cleanup: `cleanup_abandoned_builds` + `cleanup_stale_validation_vms`.

use futures::FutureExt;
use futures::future::BoxFuture;

use super::builds::{JobOutcome, ProgressHandle};
use super::context::{JobRequest, Pipeline};
use super::error::Error;
use crate::build::{self, BuildRequest};
use crate::image::marker::{Owner, ValidationRecord};
use crate::proxmox;
use crate::validate::{self, ProgressEvent, ValidationRequest};

/// The engine of `crate::build`, `crate::validate` and promotion.
pub struct Engine;

impl build::Progress for ProgressHandle {
    fn stage(&self, stage: build::Stage) {
        ProgressHandle::stage(self, stage.as_str());
    }
    fn message(&self, text: &str) {
        ProgressHandle::message(self, text);
    }
    fn percent(&self, p: f32) {
        ProgressHandle::percent(self, p);
    }
}

async fn run(req: JobRequest, progress: ProgressHandle) -> JobOutcome {
    let build_req = BuildRequest {
        spec: req.spec.clone(),
        owner: req.owner.clone(),
        build_id: req.build_id.clone(),
        today: req.today,
        adopt_unvalidated: true,
    };
    let built = match build::run_build(&req.client, &build_req, &progress).await {
        Ok(b) => b,
        Err(e) => {
            return JobOutcome::Failed {
                stage: e.stage.map(|s| s.as_str().to_string()),
                reason: build_reason(&e),
                // The reconciler says "build failed in stage X" itself.
                message: e.detail(),
                retryable: e.is_retryable(),
                touched: e.kept_vmid.into_iter().collect(),
            };
        }
    };
    progress.vmid(built.vmid);
    // A template a previous run of this build finished may carry its verdict already (the
    // process died before the status was written): not validated twice.
    if let ValidationRecord::Failed { reason, .. } = &built.validation {
        return JobOutcome::ValidationFailed {
            vmid: built.vmid,
            name: built.name.clone(),
            failed_check: "recorded".into(),
            message: format!("its marker records a failed validation: {reason}"),
            report: Default::default(),
        };
    }
    let passed_before = built.validation.validated_at().is_some();
    let report = if req.spec.validation.enabled && !passed_before {
        progress.stage("Validate");
        let mut vreq = ValidationRequest::new(
            built.vmid,
            built.node.clone(),
            req.owner.clone(),
            req.spec.validation.clone(),
        );
        vreq.ssh = req.spec.provisioning.ssh.clone();
        // Decoded from the template's marker when the build was answered from it.
        vreq.baseline_packages = built.package_manifest.clone();
        vreq.storage = req.spec.placement.storage.clone();
        vreq.bridge = req.spec.placement.bridge.clone();
        vreq.vlan = req.spec.placement.vlan;
        vreq.pool = req.spec.placement.pool.clone();
        if req.spec.provisioning.via == crate::api::golden_image::ProvisioningChannel::GuestAgent {
            vreq.ssh_probe = validate::SshProbe::ServiceOnly;
        }
        let p = progress.clone();
        let on_event = move |ev: &ProgressEvent| {
            if let ProgressEvent::CheckFinished(c) = ev {
                p.message(&format!("check {} passed: {}", c.check, c.passed));
            }
        };
        match validate::validate_template(&req.client, &vreq, &on_event).await {
            Ok(r) => Some(r),
            Err(e) => {
                return JobOutcome::Failed {
                    stage: Some("Validate".into()),
                    reason: "ValidationError",
                    message: e.to_string(),
                    retryable: e.is_retryable(),
                    touched: vec![built.vmid],
                };
            }
        }
    } else {
        None
    };
    let status_report = report
        .as_ref()
        .map(crate::api::golden_image::ValidationReport::from);
    if let Some(r) = &report
        && !r.passed
    {
        let reason = r
            .failure_reason()
            .unwrap_or_else(|| "validation failed".into());
        let (check, message) = r
            .first_failure()
            .map(|c| (c.check.as_str().to_string(), c.message.clone()))
            .unwrap_or_else(|| ("unknown".into(), reason.clone()));
        if let Err(e) = crate::promote::mark_failed(&req.client, built.vmid, &reason).await {
            tracing::warn!(error = %e, vmid = built.vmid, "cannot mark the template failed");
            // Left `pending`, it would be validated again at once (it is the build in
            // flight); a retryable failure waits for the backoff first.
            return JobOutcome::Failed {
                stage: Some("Validate".into()),
                reason: "ValidationFailed",
                message: format!(
                    "template {} failed check {check}: {message}; marking it failed did not work ({e})",
                    built.name
                ),
                retryable: true,
                touched: vec![built.vmid],
            };
        }
        return JobOutcome::ValidationFailed {
            vmid: built.vmid,
            name: built.name,
            failed_check: check,
            message,
            report: status_report.unwrap_or_default(),
        };
    }
    progress.stage("Promote");
    let evidence = match &report {
        Some(r) => crate::promote::Evidence::Report(r),
        None if passed_before => crate::promote::Evidence::Recorded,
        None => crate::promote::Evidence::ValidationDisabled,
    };
    match crate::promote::promote(&req.client, &req.owner, built.vmid, evidence).await {
        Ok(p) => JobOutcome::Promoted {
            vmid: built.vmid,
            name: built.name,
            report: status_report,
            touched: p.previous,
        },
        Err(e) => JobOutcome::Failed {
            stage: Some("Promote".into()),
            reason: "PromotionFailed",
            message: e.to_string(),
            retryable: e.is_retryable(),
            touched: vec![built.vmid],
        },
    }
}

fn build_reason(e: &build::BuildError) -> &'static str {
    match e.category {
        build::ErrorCategory::InvalidSpec => "InvalidSpec",
        build::ErrorCategory::ProxmoxAuth => "ProxmoxAuthFailed",
        build::ErrorCategory::ProxmoxTransient => "ProxmoxUnreachable",
        build::ErrorCategory::Proxmox => "ProxmoxError",
        build::ErrorCategory::Guest => "ProvisioningFailed",
        build::ErrorCategory::Checksum => "ChecksumMismatch",
        build::ErrorCategory::SourceUnavailable => "SourceUnavailable",
        build::ErrorCategory::Timeout => "BuildTimeout",
    }
}

impl Pipeline for Engine {
    fn run(&self, request: JobRequest, progress: ProgressHandle) -> BoxFuture<'static, JobOutcome> {
        run(request, progress).boxed()
    }

    fn cleanup(
        &self,
        client: proxmox::Client,
        owner: Owner,
    ) -> BoxFuture<'static, Result<Vec<u32>, Error>> {
        async move {
            // A revoked token or a missing privilege must stall the deletion with the hint, not
            // be retried as if Proxmox were busy.
            let mut removed = build::cleanup_abandoned_builds(&client, &owner)
                .await
                .map_err(|e| match e.category {
                    build::ErrorCategory::ProxmoxAuth => Error::ProxmoxAuth(e.to_string()),
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
