//! Why a validation could not be carried out. A failed *check* is not an error: it is a report
//! with `passed: false`. These are for infrastructure trouble and requests that cannot run.

use super::report::ValidationReport;
use crate::proxmox;

#[derive(Debug, Clone, thiserror::Error)]
pub enum ValidateError {
    /// A Proxmox call failed (unreachable, auth, locked, a task failed, ...).
    #[error("validation: {during}: {source}")]
    Proxmox {
        /// What the validation was doing, e.g. `cloning template 8024`.
        during: String,
        #[source]
        source: proxmox::Error,
    },
    /// The request cannot run as given (bad timeout, unknown check): fix the spec.
    #[error("validation: invalid {field}: {message}")]
    InvalidRequest { field: String, message: String },
    /// The template does not carry our marker written for its VMID: we do not touch it.
    #[error("validation: VM {vmid} is not a template of ours: {reason}")]
    NotOurs { vmid: u32, reason: String },
    /// The checks ran, but the clone could not be destroyed. The report is kept; the clone
    /// carries our marker, so [`super::cleanup_stale_validation_vms`] removes it later.
    #[error("validation of {} finished ({}), but destroying clone {vmid} failed: {source}", .report.template_vmid, .report.summary())]
    Cleanup {
        vmid: u32,
        #[source]
        source: proxmox::Error,
        report: Box<ValidationReport>,
    },
}

impl ValidateError {
    pub(crate) fn proxmox(during: impl Into<String>, source: proxmox::Error) -> Self {
        ValidateError::Proxmox {
            during: during.into(),
            source,
        }
    }

    /// Whether trying again later (with no change to the spec) may succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            ValidateError::Proxmox { source, .. } => {
                // A failed task (e.g. clone storage full) or a vanished VM may clear up too;
                // only auth, permissions, bad parameters and config are for a person to fix.
                source.is_retryable()
                    || matches!(
                        source,
                        proxmox::Error::TaskFailed { .. }
                            | proxmox::Error::NotFound { .. }
                            | proxmox::Error::AlreadyExists { .. }
                            | proxmox::Error::Api { .. }
                            | proxmox::Error::Decode { .. }
                    )
            }
            ValidateError::Cleanup { .. } => true,
            ValidateError::InvalidRequest { .. } | ValidateError::NotOurs { .. } => false,
        }
    }

    /// A short, stable label for metrics and conditions.
    pub fn category(&self) -> &'static str {
        match self {
            ValidateError::Proxmox { source, .. } => source.category(),
            ValidateError::InvalidRequest { .. } => "invalid_spec",
            ValidateError::NotOurs { .. } => "not_ours",
            ValidateError::Cleanup { .. } => "cleanup",
        }
    }
}
