//! What a validation found: one outcome per check, in run order, and its conversion into the
//! status type `status.lastValidation`. Pure.

use std::time::Duration;

use chrono::{DateTime, Utc};

use super::check::Check;
use super::drift::PackageDrift;
use crate::api::golden_image as api;

/// Longest message kept per check: status fields are read by people, not archived logs.
pub const MAX_MESSAGE_LEN: usize = 1024;

/// The result of one check.
#[derive(Debug, Clone, PartialEq)]
pub struct CheckOutcome {
    pub check: Check,
    pub passed: bool,
    pub duration: Duration,
    /// What was seen, or why it failed (never a secret).
    pub message: String,
}

impl CheckOutcome {
    pub fn pass(check: Check, duration: Duration, message: impl Into<String>) -> Self {
        Self::new(check, true, duration, message)
    }

    pub fn fail(check: Check, duration: Duration, message: impl Into<String>) -> Self {
        Self::new(check, false, duration, message)
    }

    fn new(check: Check, passed: bool, duration: Duration, message: impl Into<String>) -> Self {
        CheckOutcome {
            check,
            passed,
            duration,
            message: truncate(message.into(), MAX_MESSAGE_LEN),
        }
    }
}

/// A validation run's result. `passed` is true only when every check that ran passed.
#[derive(Debug, Clone, PartialEq)]
pub struct ValidationReport {
    /// The template that was validated.
    pub template_vmid: u32,
    /// The throwaway clone, once one was created.
    pub clone_vmid: Option<u32>,
    pub passed: bool,
    pub started_at: DateTime<Utc>,
    pub finished_at: DateTime<Utc>,
    /// In run order; only the checks the spec asked for.
    pub checks: Vec<CheckOutcome>,
    /// The package comparison, when `packageDrift` got as far as reading the package list.
    pub drift: Option<PackageDrift>,
}

impl ValidationReport {
    /// Builds a report; `passed` is derived from the checks (an empty list does not pass).
    pub fn new(
        template_vmid: u32,
        clone_vmid: Option<u32>,
        started_at: DateTime<Utc>,
        finished_at: DateTime<Utc>,
        checks: Vec<CheckOutcome>,
        drift: Option<PackageDrift>,
    ) -> Self {
        let passed = !checks.is_empty() && checks.iter().all(|c| c.passed);
        ValidationReport {
            template_vmid,
            clone_vmid,
            passed,
            started_at,
            finished_at,
            checks,
            drift,
        }
    }

    /// The first failed check: what a `Validated=False` condition names.
    pub fn first_failure(&self) -> Option<&CheckOutcome> {
        self.checks.iter().find(|c| !c.passed)
    }

    pub fn check(&self, check: Check) -> Option<&CheckOutcome> {
        self.checks.iter().find(|c| c.check == check)
    }

    /// One line for a condition message or an event: `all 5 checks passed` or
    /// `cloudInit failed: ...`.
    pub fn summary(&self) -> String {
        match self.first_failure() {
            None => format!("all {} checks passed", self.checks.len()),
            Some(f) => format!("{} failed: {}", f.check, f.message),
        }
    }

    /// A short reason for the template's marker (it shares 8 KiB with the user's notes).
    pub fn failure_reason(&self) -> Option<String> {
        self.first_failure()
            .map(|f| truncate(format!("{} failed: {}", f.check, f.message), 200))
    }
}

/// Seconds with millisecond precision: enough for people, stable in the status.
fn seconds(d: Duration) -> f64 {
    (d.as_millis() as f64) / 1000.0
}

impl From<&ValidationReport> for api::ValidationReport {
    fn from(r: &ValidationReport) -> Self {
        api::ValidationReport {
            vmid: r.template_vmid,
            passed: r.passed,
            finished_at: Some(crate::api::time::to_time(r.finished_at)),
            checks: r
                .checks
                .iter()
                .map(|c| api::CheckResult {
                    name: c.check.as_str().to_string(),
                    passed: c.passed,
                    seconds: seconds(c.duration),
                    message: c.message.clone(),
                })
                .collect(),
        }
    }
}

impl From<ValidationReport> for api::ValidationReport {
    fn from(r: ValidationReport) -> Self {
        (&r).into()
    }
}

/// Cuts `s` to at most `max` bytes on a char boundary, marking the cut with `…`.
pub(crate) fn truncate(s: String, max: usize) -> String {
    if s.len() <= max {
        return s;
    }
    let mut end = max.saturating_sub('…'.len_utf8());
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    #[test]
    fn converts_into_the_status_type() {
        let r = ValidationReport::new(
            8024,
            Some(8100),
            at("2025-01-18T10:00:00Z"),
            at("2025-01-18T10:01:30Z"),
            vec![
                CheckOutcome::pass(Check::Boot, Duration::from_millis(1234), "running"),
                CheckOutcome::fail(
                    Check::CloudInit,
                    Duration::from_secs(30),
                    "cloud-init status: error",
                ),
            ],
            None,
        );
        assert!(!r.passed);
        assert_eq!(r.summary(), "cloudInit failed: cloud-init status: error");
        assert_eq!(
            r.failure_reason().unwrap(),
            "cloudInit failed: cloud-init status: error"
        );
        let status: api::ValidationReport = (&r).into();
        assert_eq!(status.vmid, 8024);
        assert!(!status.passed);
        assert_eq!(
            status.finished_at,
            Some(crate::api::time::to_time(at("2025-01-18T10:01:30Z")))
        );
        assert_eq!(status.checks.len(), 2);
        assert_eq!(status.checks[0].name, "boot");
        assert_eq!(status.checks[0].seconds, 1.234);
        assert!(status.checks[0].passed);
        assert_eq!(status.checks[1].name, "cloudInit");
        assert!(!status.checks[1].passed);
        let json = serde_json::to_value(&status).unwrap();
        assert_eq!(json["checks"][1]["message"], "cloud-init status: error");
        assert_eq!(json["finishedAt"], "2025-01-18T10:01:30Z");
    }

    #[test]
    fn passes_only_with_checks_all_passed() {
        let t = at("2025-01-18T10:00:00Z");
        let ok = ValidationReport::new(
            1,
            None,
            t,
            t,
            vec![CheckOutcome::pass(Check::Boot, Duration::ZERO, "")],
            None,
        );
        assert!(ok.passed && ok.first_failure().is_none());
        assert_eq!(ok.summary(), "all 1 checks passed");
        assert!(!ValidationReport::new(1, None, t, t, vec![], None).passed);
    }

    #[test]
    fn long_messages_are_cut_on_a_char_boundary() {
        let c = CheckOutcome::fail(Check::Ssh, Duration::ZERO, "é".repeat(2000));
        assert!(c.message.len() <= MAX_MESSAGE_LEN && c.message.ends_with('…'));
        assert_eq!(truncate("abc".into(), 3), "abc");
    }
}
