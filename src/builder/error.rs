//! Build errors: which stage, what Proxmox or the guest said, what to do, and a category for
//! metrics and for the controller's retry decision.

use std::fmt;

use super::Stage;
use crate::proxmox;

/// Broad kind of a build failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCategory {
    /// The spec cannot be built as written (bad name template, missing base template, ...).
    InvalidSpec,
    /// The API token was refused (401/403).
    ProxmoxAuth,
    /// Proxmox was unreachable, busy or locked: retry later.
    ProxmoxTransient,
    /// Proxmox refused or a task failed.
    Proxmox,
    /// A command in the guest failed or the guest never became reachable.
    Guest,
    /// The downloaded image does not match the expected checksum.
    Checksum,
    /// A source outside Proxmox (the `checksumUrl` list) could not be fetched: unreachable,
    /// timed out or a server error. Retried: nothing was built yet, and a mirror comes back.
    SourceUnavailable,
    /// A stage took longer than allowed.
    Timeout,
}

impl ErrorCategory {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCategory::InvalidSpec => "invalid_spec",
            ErrorCategory::ProxmoxAuth => "proxmox_auth",
            ErrorCategory::ProxmoxTransient => "proxmox_transient",
            ErrorCategory::Proxmox => "proxmox",
            ErrorCategory::Guest => "guest",
            ErrorCategory::Checksum => "checksum",
            ErrorCategory::SourceUnavailable => "source_unavailable",
            ErrorCategory::Timeout => "timeout",
        }
    }
}

impl fmt::Display for ErrorCategory {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A failed build. `Display` gives one readable paragraph: stage, step, message, details, hint.
/// Never contains a secret (token secrets are not in Proxmox errors; the build key is not logged).
#[derive(Debug, Clone, PartialEq)]
pub struct BuildError {
    /// Stage that failed (`None`: before any stage, e.g. the inventory listing).
    pub stage: Option<Stage>,
    pub category: ErrorCategory,
    /// What failed, e.g. `apt-get upgrade -y exited with 100` or PVE's message.
    pub message: String,
    /// The step within the stage (`apt-get update`, `download-url`), when there is one.
    pub step: Option<String>,
    /// The guest's stderr tail or the task log tail.
    pub details: Vec<String>,
    /// What to do about it.
    pub hint: String,
    /// VMID of the build VM kept for debugging (`keepFailedBuild`), if any.
    pub kept_vmid: Option<u32>,
}

impl BuildError {
    pub fn new(
        category: ErrorCategory,
        message: impl Into<String>,
        hint: impl Into<String>,
    ) -> Self {
        BuildError {
            stage: None,
            category,
            message: message.into(),
            step: None,
            details: Vec::new(),
            hint: hint.into(),
            kept_vmid: None,
        }
    }

    pub fn invalid_spec(message: impl Into<String>, hint: impl Into<String>) -> Self {
        Self::new(ErrorCategory::InvalidSpec, message, hint)
    }

    pub fn guest(
        step: &str,
        message: impl Into<String>,
        details: Vec<String>,
        hint: impl Into<String>,
    ) -> Self {
        let mut e = Self::new(ErrorCategory::Guest, message, hint);
        e.step = Some(step.to_string());
        e.details = details;
        e
    }

    /// A Proxmox error during `step`, classified.
    pub fn proxmox(step: &str, err: &proxmox::Error) -> Self {
        use proxmox::Error as E;
        let (category, hint) = match err {
            E::Unauthenticated { .. } | E::Forbidden { .. } => (
                ErrorCategory::ProxmoxAuth,
                "check the API token and its privileges (see the privilege table in sombrero::proxmox)",
            ),
            E::Timeout { .. } => (
                ErrorCategory::Timeout,
                "Proxmox did not finish in time; the next run resumes where this one stopped",
            ),
            e if e.is_retryable() => (
                ErrorCategory::ProxmoxTransient,
                "Proxmox is unreachable, busy or the VM is locked; the next run retries and resumes",
            ),
            E::TaskFailed { exitstatus, .. } if is_checksum_failure(exitstatus) => (
                ErrorCategory::Checksum,
                "the downloaded image does not match the expected checksum: check source.cloudImage.checksum / checksumUrl, or wait for the mirror to settle",
            ),
            E::Config { .. } | E::Unsupported { .. } => (
                ErrorCategory::InvalidSpec,
                "this Proxmox VE cannot do what the spec asks (download-url of disk images needs PVE 8.4+; use source.template otherwise)",
            ),
            _ => (
                ErrorCategory::Proxmox,
                "see Proxmox's message; the task log on the node has the details",
            ),
        };
        let mut e = Self::new(category, err.to_string(), hint);
        e.step = Some(step.to_string());
        if let E::TaskFailed { log_tail, .. } = err {
            e.details = log_tail.clone();
        }
        e
    }

    pub fn timeout(step: &str, message: impl Into<String>, hint: impl Into<String>) -> Self {
        let mut e = Self::new(ErrorCategory::Timeout, message, hint);
        e.step = Some(step.to_string());
        e
    }

    pub(crate) fn at(mut self, stage: Stage) -> Self {
        self.stage.get_or_insert(stage);
        self
    }

    pub fn category(&self) -> &'static str {
        self.category.as_str()
    }

    /// Whether running the build again later may succeed without a spec change. A failed guest
    /// command counts (a mirror mid-sync, a network hiccup), though the same failure may also
    /// come from the spec (a command that always fails); the controller tells them apart by
    /// bounding the retries of one spec (`controller::context::MAX_BUILD_ATTEMPTS`), then
    /// reports `Stalled`.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self.category,
            ErrorCategory::ProxmoxTransient
                | ErrorCategory::Timeout
                | ErrorCategory::Guest
                | ErrorCategory::SourceUnavailable
        )
    }
}

fn is_checksum_failure(exitstatus: &str) -> bool {
    let s = exitstatus.to_ascii_lowercase();
    s.contains("checksum mismatch") || s.contains("checksum verification failed")
}

impl BuildError {
    /// What failed, without the "build failed in stage X" that [`fmt::Display`] starts with:
    /// for a caller that names the stage itself (the controller's conditions and Events), so
    /// the prefix is not said twice.
    pub fn detail(&self) -> String {
        let mut out = String::new();
        if let Some(step) = &self.step {
            out.push_str(&format!("step {step:?}: "));
        }
        out.push_str(&self.message);
        let mut rest = String::new();
        // Infallible: writing into a String.
        let _ = self.write_tail(&mut rest);
        out + &rest
    }

    /// Details, the kept VM and the hint: the lines after the message.
    fn write_tail(&self, f: &mut impl fmt::Write) -> fmt::Result {
        if !self.details.is_empty() {
            write!(f, "\n  output (tail):")?;
            for line in &self.details {
                write!(f, "\n    {line}")?;
            }
        }
        if let Some(vmid) = self.kept_vmid {
            write!(
                f,
                "\n  the build VM {vmid} was kept for debugging (keepFailedBuild); delete it when done"
            )?;
        }
        write!(f, "\n  hint: {}", self.hint)
    }
}

impl fmt::Display for BuildError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.stage {
            Some(stage) => write!(f, "build failed in stage {stage}")?,
            None => write!(f, "build failed")?,
        }
        if let Some(step) = &self.step {
            write!(f, " at step {step:?}")?;
        }
        write!(f, ": {}", self.message)?;
        self.write_tail(f)
    }
}

impl std::error::Error for BuildError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn categories_and_display() {
        let e = BuildError::proxmox(
            "download-url",
            &proxmox::Error::TaskFailed {
                upid: "UPID:x".into(),
                exitstatus: "checksum mismatch: got 'a' != expect 'b'".into(),
                log_tail: vec!["downloading".into()],
            },
        )
        .at(Stage::Source);
        assert_eq!(e.category(), "checksum");
        assert!(!e.is_retryable());
        let text = e.to_string();
        assert!(
            text.contains("stage Source")
                && text.contains("download-url")
                && text.contains("hint:"),
            "{text}"
        );
        let t = BuildError::proxmox(
            "create",
            &proxmox::Error::Locked {
                request: "r".into(),
                message: "locked".into(),
            },
        );
        assert_eq!(t.category(), "proxmox_transient");
        assert!(t.is_retryable());
        let a = BuildError::proxmox(
            "create",
            &proxmox::Error::Forbidden {
                request: "r".into(),
                message: "no".into(),
            },
        );
        assert_eq!(a.category(), "proxmox_auth");
        let g = BuildError::guest(
            "apt-get update",
            "exited with 100",
            vec!["E: boom".into()],
            "h",
        )
        .at(Stage::Provision);
        assert!(g.to_string().contains("E: boom"));
        assert_eq!(g.category(), "guest");
        // The detail leaves the stage to the caller, who names it once.
        let detail = g.detail();
        assert!(
            detail.starts_with("step \"apt-get update\": exited with 100"),
            "{detail}"
        );
        assert!(!detail.contains("build failed"), "{detail}");
        assert!(
            detail.contains("E: boom") && detail.contains("hint: h"),
            "{detail}"
        );
        assert_eq!(
            g.to_string(),
            format!(
                "build failed in stage Provision at step \"apt-get update\": {}",
                detail.trim_start_matches("step \"apt-get update\": ")
            )
        );
    }
}
