//! The production pipeline, one implementation for the controller and the CLI: privileges
//! checked, then `crate::builder::run_build` (resumable from the markers), then
//! `crate::validate::validate_template` and `crate::promote::promote` (or `mark_failed`) as
//! the [`Request`] asks. The controller runs it with validation as the spec says and
//! promotion always; `sombrero build --validate --promote` with what its flags say.

use chrono::NaiveDate;

use crate::api::GoldenImageSpec;
use crate::api::golden_image::BuildStage;
use crate::api::golden_image::ProvisioningChannel;
use crate::builder::{self, BuildOutcome, BuildRequest, ErrorCategory};
use crate::image::marker::{Owner, ValidationRecord};
use crate::privileges::{self, ImageRun, PrivilegeError};
use crate::promote::{self, PromotionOutcome};
use crate::proxmox;
use crate::validate::{self, ProgressEvent, ValidationReport, ValidationRequest};

/// One run of the pipeline.
#[derive(Debug, Clone)]
pub struct Request {
    pub client: proxmox::Client,
    pub spec: GoldenImageSpec,
    pub owner: Owner,
    pub build_id: String,
    pub today: NaiveDate,
    /// See [`BuildRequest::adopt_unvalidated`]: set whenever this run validates.
    pub adopt_unvalidated: bool,
    /// See [`BuildRequest::fresh_id`].
    pub fresh_id: bool,
    /// Validate the template (with `spec.validation`'s checks) after the build.
    pub validate: bool,
    /// Make the template the image's latest: after a passed validation, or (only when
    /// `validate` is false, as the controller does with `validation.enabled: false`)
    /// unvalidated.
    pub promote: bool,
}

/// Progress of a run: the build's stages, then `Validate` and `Promote`.
pub trait Progress: builder::Progress {
    /// A step after the build (`Validate`, `Promote`).
    fn step(&self, step: BuildStage);
    /// The build finished: the template exists (validation and promotion may follow).
    fn built(&self, _built: &BuildOutcome) {}
}

/// How a run ended.
#[derive(Debug, Clone)]
pub enum Outcome {
    /// Built; neither validation nor promotion was asked.
    Built {
        built: BuildOutcome,
    },
    /// Built and validated (passed); promotion was not asked. The marker stays `pending`.
    Validated {
        built: BuildOutcome,
        report: ValidationReport,
    },
    /// The template is the image's latest (holds the channel tag).
    Promoted {
        built: BuildOutcome,
        report: Option<ValidationReport>,
        promotion: Box<PromotionOutcome>,
    },
    /// The template failed validation (now or in an earlier run, per its marker): tagged
    /// `failed-validation`, not promoted; the previous latest stays.
    ValidationFailed {
        built: BuildOutcome,
        failed_check: String,
        message: String,
        report: Option<ValidationReport>,
    },
    Failed(Failure),
}

/// What kind of failure, for the controller's reasons and the CLI's exit codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// The spec cannot be built as written.
    InvalidSpec,
    /// The token lacks privileges; nothing was touched.
    Privileges,
    /// Authentication failed, Proxmox refused or could not be reached.
    Proxmox,
    /// The work failed: a build step in the guest, a checksum, a timeout.
    Work,
}

/// Why a run failed: the controller's condition and Event reason, and with
/// [`Failure::retryable`] how the controller retries it ([`FailureReason::bounded`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FailureReason {
    InvalidSpec,
    InsufficientPrivileges,
    ProxmoxAuthFailed,
    ProxmoxUnreachable,
    ProxmoxError,
    /// A guest command failed or the guest never became reachable.
    ProvisioningFailed,
    ChecksumMismatch,
    /// The `checksumUrl` list could not be fetched.
    SourceUnavailable,
    BuildTimeout,
    /// Validation could not run (not: the template failed a check).
    ValidationError,
    /// The template failed a check, and marking it failed did not work.
    ValidationFailed,
    PromotionFailed,
}

impl FailureReason {
    /// The condition / Event reason.
    pub fn as_str(self) -> &'static str {
        match self {
            FailureReason::InvalidSpec => "InvalidSpec",
            FailureReason::InsufficientPrivileges => REASON_INSUFFICIENT_PRIVILEGES,
            FailureReason::ProxmoxAuthFailed => "ProxmoxAuthFailed",
            FailureReason::ProxmoxUnreachable => "ProxmoxUnreachable",
            FailureReason::ProxmoxError => "ProxmoxError",
            FailureReason::ProvisioningFailed => "ProvisioningFailed",
            FailureReason::ChecksumMismatch => "ChecksumMismatch",
            FailureReason::SourceUnavailable => "SourceUnavailable",
            FailureReason::BuildTimeout => "BuildTimeout",
            FailureReason::ValidationError => "ValidationError",
            FailureReason::ValidationFailed => "ValidationFailed",
            FailureReason::PromotionFailed => "PromotionFailed",
        }
    }

    /// Retryable failures that a spec can cause as well as bad luck: a guest command that
    /// fails (a mirror mid-sync, or a command that always fails) or a step that times out.
    /// Retrying them forever would rebuild from scratch every few minutes, so the controller
    /// bounds them (`controller::memory::MAX_BUILD_ATTEMPTS`). Proxmox being unreachable is
    /// not bounded: no spec change fixes an outage, and the retries are cheap.
    pub fn bounded(self) -> bool {
        matches!(
            self,
            FailureReason::ProvisioningFailed | FailureReason::BuildTimeout
        )
    }
}

impl std::fmt::Display for FailureReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone)]
pub struct Failure {
    pub stage: Option<String>,
    pub reason: FailureReason,
    pub message: String,
    pub retryable: bool,
    /// VMs this run left behind or changed (kept failed builds, the template).
    pub touched: Vec<u32>,
    pub kind: FailureKind,
}

/// Condition reason of a run refused for missing privileges.
pub const REASON_INSUFFICIENT_PRIVILEGES: &str = "InsufficientPrivileges";

/// The privileges a [`Request`] needs, for this cluster's version.
pub async fn check_privileges(req: &Request) -> Result<(), PrivilegeError> {
    let version = req
        .client
        .pve_version()
        .await
        .map_err(PrivilegeError::Proxmox)?;
    let needs = privileges::image_needs(&ImageRun {
        spec: &req.spec,
        validate: req.validate,
        promote: req.promote,
        version,
    });
    privileges::check(&req.client, &needs).await
}

fn privilege_failure(e: PrivilegeError) -> Failure {
    let kind = match &e {
        PrivilegeError::Insufficient(_) => FailureKind::Privileges,
        PrivilegeError::Proxmox(_) => FailureKind::Proxmox,
    };
    let reason = match &e {
        PrivilegeError::Insufficient(_) => FailureReason::InsufficientPrivileges,
        PrivilegeError::Proxmox(p) if matches!(p.category(), "unauthenticated" | "forbidden") => {
            FailureReason::ProxmoxAuthFailed
        }
        PrivilegeError::Proxmox(p) if p.is_retryable() => FailureReason::ProxmoxUnreachable,
        PrivilegeError::Proxmox(_) => FailureReason::ProxmoxError,
    };
    Failure {
        stage: Some("Privileges".into()),
        reason,
        retryable: e.is_retryable(),
        message: e.to_string(),
        touched: Vec::new(),
        kind,
    }
}

/// Runs the pipeline to the end the request asks for.
pub async fn run(req: &Request, progress: &dyn Progress) -> Outcome {
    progress.message("checking the API token's privileges");
    if let Err(e) = check_privileges(req).await {
        return Outcome::Failed(privilege_failure(e));
    }
    let build_req = BuildRequest {
        spec: req.spec.clone(),
        owner: req.owner.clone(),
        build_id: req.build_id.clone(),
        today: req.today,
        adopt_unvalidated: req.adopt_unvalidated,
        fresh_id: req.fresh_id,
    };
    let built = match builder::run_build(&req.client, &build_req, progress).await {
        Ok(b) => b,
        Err(e) => {
            return Outcome::Failed(Failure {
                stage: e.stage.map(|s| s.as_str().to_string()),
                reason: build_reason(&e),
                // Without "build failed in stage X": `stage` says it, and the reporters add it.
                message: e.detail(),
                retryable: e.is_retryable(),
                touched: e.kept_vmid.into_iter().collect(),
                kind: build_kind(e.category),
            });
        }
    };
    progress.built(&built);
    if !req.validate && !req.promote {
        return Outcome::Built { built };
    }
    // A template a previous run of this build finished may carry its verdict already (the
    // process died before it was reported): not validated twice.
    if let ValidationRecord::Failed { reason, .. } = &built.validation {
        return Outcome::ValidationFailed {
            failed_check: "recorded".into(),
            message: format!("its marker records a failed validation: {reason}"),
            report: None,
            built,
        };
    }
    let passed_before = built.validation.validated_at().is_some();
    let report = if req.validate && !passed_before {
        progress.step(BuildStage::Validate);
        match validate(req, &built, progress).await {
            Ok(r) => Some(r),
            Err(e) => {
                return Outcome::Failed(Failure {
                    stage: Some("Validate".into()),
                    reason: FailureReason::ValidationError,
                    message: e.to_string(),
                    retryable: e.is_retryable(),
                    touched: vec![built.vmid],
                    kind: proxmox_or_work(e.category()),
                });
            }
        }
    } else {
        None
    };
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
        if let Err(e) = promote::mark_failed(&req.client, built.vmid, &reason).await {
            tracing::warn!(error = %e, vmid = built.vmid, "cannot mark the template failed");
            // Left `pending`, it would be validated again at once (it is the build in
            // flight); a retryable failure waits for the backoff first.
            return Outcome::Failed(Failure {
                stage: Some("Validate".into()),
                reason: FailureReason::ValidationFailed,
                message: format!(
                    "template {} failed check {check}: {message}; marking it failed did not work ({e})",
                    built.name
                ),
                retryable: true,
                touched: vec![built.vmid],
                kind: FailureKind::Proxmox,
            });
        }
        return Outcome::ValidationFailed {
            built,
            failed_check: check,
            message,
            report,
        };
    }
    if !req.promote {
        return match report {
            Some(report) => Outcome::Validated { built, report },
            // Validated by an earlier run of this build: nothing new to report, still passed.
            None => Outcome::Built { built },
        };
    }
    progress.step(BuildStage::Promote);
    let evidence = match &report {
        Some(r) => promote::Evidence::Report(r),
        None if passed_before => promote::Evidence::Recorded,
        None => promote::Evidence::ValidationDisabled,
    };
    match promote::promote(&req.client, &req.owner, built.vmid, evidence).await {
        Ok(promotion) => Outcome::Promoted {
            built,
            report,
            promotion: Box::new(promotion),
        },
        Err(e) => Outcome::Failed(Failure {
            stage: Some("Promote".into()),
            reason: FailureReason::PromotionFailed,
            message: e.to_string(),
            retryable: e.is_retryable(),
            touched: vec![built.vmid],
            kind: match e {
                promote::PromoteError::Proxmox { .. } => FailureKind::Proxmox,
                _ => FailureKind::Work,
            },
        }),
    }
}

async fn validate(
    req: &Request,
    built: &BuildOutcome,
    progress: &dyn Progress,
) -> Result<ValidationReport, validate::ValidateError> {
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
    if req.spec.provisioning.via == ProvisioningChannel::GuestAgent {
        vreq.ssh_probe = validate::SshProbe::ServiceOnly;
    }
    let on_event = |ev: &ProgressEvent| {
        if let ProgressEvent::CheckFinished(c) = ev {
            let verdict = if c.passed { "passed" } else { "failed" };
            progress.message(&format!("check {} {verdict}: {}", c.check, c.message));
        }
    };
    let forward = Forward(&on_event);
    validate::validate_template(&req.client, &vreq, &forward).await
}

/// A borrowed closure as a [`validate::ValidationProgress`] (which wants `Send + Sync`).
struct Forward<'a>(&'a (dyn Fn(&ProgressEvent) + Send + Sync));

impl validate::ValidationProgress for Forward<'_> {
    fn event(&self, event: &ProgressEvent) {
        (self.0)(event)
    }
}

fn proxmox_or_work(category: &str) -> FailureKind {
    match category {
        "invalid_spec" => FailureKind::InvalidSpec,
        "not_ours" | "cleanup" => FailureKind::Work,
        _ => FailureKind::Proxmox,
    }
}

fn build_kind(c: ErrorCategory) -> FailureKind {
    match c {
        ErrorCategory::InvalidSpec => FailureKind::InvalidSpec,
        ErrorCategory::ProxmoxAuth | ErrorCategory::ProxmoxTransient | ErrorCategory::Proxmox => {
            FailureKind::Proxmox
        }
        ErrorCategory::Guest
        | ErrorCategory::Checksum
        | ErrorCategory::SourceUnavailable
        | ErrorCategory::Timeout => FailureKind::Work,
    }
}

fn build_reason(e: &builder::BuildError) -> FailureReason {
    match e.category {
        ErrorCategory::InvalidSpec => FailureReason::InvalidSpec,
        ErrorCategory::ProxmoxAuth => FailureReason::ProxmoxAuthFailed,
        ErrorCategory::ProxmoxTransient => FailureReason::ProxmoxUnreachable,
        ErrorCategory::Proxmox => FailureReason::ProxmoxError,
        ErrorCategory::Guest => FailureReason::ProvisioningFailed,
        ErrorCategory::Checksum => FailureReason::ChecksumMismatch,
        ErrorCategory::SourceUnavailable => FailureReason::SourceUnavailable,
        ErrorCategory::Timeout => FailureReason::BuildTimeout,
    }
}

impl From<builder::Stage> for BuildStage {
    fn from(s: builder::Stage) -> Self {
        match s {
            builder::Stage::Source => BuildStage::Source,
            builder::Stage::CreateVm => BuildStage::CreateVm,
            builder::Stage::Provision => BuildStage::Provision,
            builder::Stage::Shutdown => BuildStage::Shutdown,
            builder::Stage::Convert => BuildStage::Convert,
            builder::Stage::Finalize => BuildStage::Finalize,
        }
    }
}
