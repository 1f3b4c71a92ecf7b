//! A TemplateRetention spec checked and turned into what the engine needs: target, rules, mode.
//!
//! [`Policy::from_spec`] applies the same rules as the CRD's schema and CEL rules (so
//! `sombrero prune -f` refuses what `kubectl apply` would), and reports every problem with the
//! field and the fix.

use std::time::Duration as StdDuration;

use chrono::Duration;

use crate::api::template_retention::{ArchiveMode as ApiArchiveMode, TemplateRetentionSpec};

use super::plan::{ArchiveMode, RetentionRules};
use super::target::Target;
use crate::api::SpecDuration;

/// Largest `keepLast` / `retainAtLeast` the CRD accepts.
const MAX_COUNT: u32 = 1000;
/// `maxLength` of durations and of `backupStorage` in the CRD.
const MAX_DURATION_LEN: usize = 16;
const MAX_STORAGE_LEN: usize = 64;

/// One thing wrong with a TemplateRetention spec: the field under `spec` (empty: the spec as a
/// whole, e.g. two fields that contradict each other) and what is wrong, with what to write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpecProblem {
    pub field: String,
    pub message: String,
}

impl SpecProblem {
    pub fn new(field: &str, message: impl Into<String>) -> Self {
        SpecProblem {
            field: field.to_string(),
            message: message.into(),
        }
    }
}

impl std::fmt::Display for SpecProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.field.is_empty() {
            write!(f, "spec: {}", self.message)
        } else {
            write!(f, "spec.{}: {}", self.field, self.message)
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    pub target: Target,
    pub rules: RetentionRules,
    pub mode: ArchiveMode,
    pub backup_storage: Option<String>,
    pub dry_run: bool,
    pub interval: StdDuration,
}

impl From<ApiArchiveMode> for ArchiveMode {
    fn from(m: ApiArchiveMode) -> Self {
        match m {
            ApiArchiveMode::Backup => Self::Backup,
            ApiArchiveMode::Tag => Self::Tag,
            ApiArchiveMode::Delete => Self::Delete,
        }
    }
}

impl Policy {
    /// Checks `spec` (of an object in `namespace`); on failure, every problem with its field
    /// (shown as `spec.<field>: <what is wrong and what to write instead>`).
    pub fn from_spec(
        namespace: &str,
        spec: &TemplateRetentionSpec,
    ) -> Result<Self, Vec<SpecProblem>> {
        let mut problems = Vec::new();
        let target = Target::from_spec(namespace, &spec.target)
            .map_err(|e| problems.push(e))
            .ok();
        if let Some(r) = &spec.target.golden_image_ref
            && !valid_name(&r.name)
        {
            problems.push(SpecProblem::new(
                "target.goldenImageRef.name",
                format!(
                    "{:?} must be the name of a GoldenImage (lowercase letters, digits, '-' and '.')",
                    r.name
                ),
            ));
        }
        if let Some(tags) = &spec.target.tag_selector {
            if tags.len() > 16 {
                problems.push(SpecProblem::new("target.tagSelector", "at most 16 tags"));
            }
            if let Some(t) = tags.iter().find(|t| t.len() > 64) {
                problems.push(SpecProblem::new(
                    "target.tagSelector",
                    format!("{t:?} is longer than 64 characters"),
                ));
            }
        }
        if !(1..=MAX_COUNT).contains(&spec.keep_last) {
            problems.push(SpecProblem::new(
                "keepLast",
                format!(
                    "{} must be greater than or equal to 1 and at most {MAX_COUNT}",
                    spec.keep_last
                ),
            ));
        }
        if spec.retain_at_least > MAX_COUNT {
            problems.push(SpecProblem::new(
                "retainAtLeast",
                format!("{} must be at most {MAX_COUNT}", spec.retain_at_least),
            ));
        }
        if spec.retain_at_least > spec.keep_last {
            problems.push(SpecProblem::new(
                "",
                format!(
                    "retainAtLeast must not exceed keepLast (retainAtLeast {} > keepLast {})",
                    spec.retain_at_least, spec.keep_last
                ),
            ));
        }
        let archive_after = duration(
            "archiveAfter",
            &spec.archive_after,
            "archiveAfter must be a duration such as 90d, 12h or 1d12h",
            &mut problems,
        );
        let interval = duration(
            "interval",
            &spec.interval,
            "interval must be a duration such as 1h or 30m",
            &mut problems,
        );
        if let Some(i) = interval
            && i <= Duration::zero()
        {
            problems.push(SpecProblem::new(
                "interval",
                "must be longer than 0s, e.g. 1h",
            ));
        }
        let mode = ArchiveMode::from(spec.archive.mode);
        match (&spec.archive.backup_storage, mode) {
            (None, ArchiveMode::Backup) => problems.push(SpecProblem::new(
                "archive",
                "archive.backupStorage is required when archive.mode is backup (a storage with `backup` content, e.g. local)",
            )),
            (Some(s), _) if s.is_empty() || s.len() > MAX_STORAGE_LEN => problems.push(SpecProblem::new(
                "archive.backupStorage",
                format!("{s:?} must be a Proxmox storage name of 1 to {MAX_STORAGE_LEN} characters"),
            )),
            _ => {}
        }
        match (target, archive_after, interval) {
            (Some(target), Some(archive_after), Some(interval)) if problems.is_empty() => {
                Ok(Self {
                    target,
                    rules: RetentionRules {
                        keep_last: spec.keep_last,
                        archive_after,
                        retain_at_least: spec.retain_at_least,
                    },
                    mode,
                    backup_storage: spec.archive.backup_storage.clone(),
                    dry_run: spec.dry_run,
                    interval: interval.to_std().unwrap_or(StdDuration::from_secs(3600)),
                })
            }
            _ => Err(problems),
        }
    }
}

fn duration(
    field: &str,
    value: &SpecDuration,
    hint: &str,
    problems: &mut Vec<SpecProblem>,
) -> Option<Duration> {
    if value.as_str().len() > MAX_DURATION_LEN {
        problems.push(SpecProblem::new(
            field,
            format!("{value:?} is longer than {MAX_DURATION_LEN} characters; {hint}"),
        ));
        return None;
    }
    match value.parsed() {
        Ok(d) => Some(d),
        Err(e) => {
            problems.push(SpecProblem::new(field, format!("{value:?}: {e}; {hint}")));
            None
        }
    }
}

/// A Kubernetes object name (DNS subdomain), as the CRD's pattern checks it.
fn valid_name(name: &str) -> bool {
    let bytes = name.as_bytes();
    !name.is_empty()
        && name.len() <= 253
        && bytes
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-' || *b == b'.')
        && bytes[0].is_ascii_alphanumeric()
        && bytes[bytes.len() - 1].is_ascii_alphanumeric()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(yaml: &str) -> TemplateRetentionSpec {
        serde_yaml::from_str(yaml).expect("spec")
    }

    #[test]
    fn defaults_are_the_seeds_policy() {
        let p = Policy::from_spec(
            "platform",
            &spec("target: {goldenImageRef: {name: ubuntu}}"),
        )
        .unwrap();
        assert_eq!(p.rules, RetentionRules::default());
        assert_eq!(p.mode, ArchiveMode::Tag);
        assert_eq!(p.interval, StdDuration::from_secs(3600));
        assert_eq!(p.target.to_string(), "goldenimage/ubuntu");
        assert!(!p.dry_run);
    }

    #[test]
    fn every_problem_is_named() {
        let e = Policy::from_spec(
            "x",
            &spec(
                "target: {goldenImageRef: {name: Ubuntu_}, tagSelector: [a]}\nkeepLast: 0\nretainAtLeast: 2\narchiveAfter: three months\ninterval: 0s\narchive: {mode: backup}",
            ),
        )
        .unwrap_err();
        let all = e
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("\n");
        for field in [
            "spec.target",
            "spec.target.goldenImageRef.name",
            "spec.keepLast",
            "spec: retainAtLeast must not exceed keepLast",
            "archiveAfter",
            "spec.interval",
            "spec.archive: archive.backupStorage is required",
        ] {
            assert!(all.contains(field), "{field} missing in:\n{all}");
        }
    }

    #[test]
    fn backup_mode_with_storage() {
        let p = Policy::from_spec(
            "x",
            &spec("target: {tagSelector: [ubuntu, minimal]}\narchive: {mode: backup, backupStorage: pbs}\ndryRun: true\ninterval: 30m"),
        )
        .unwrap();
        assert_eq!(p.mode, ArchiveMode::Backup);
        assert_eq!(p.backup_storage.as_deref(), Some("pbs"));
        assert!(p.dry_run);
        assert_eq!(p.interval, StdDuration::from_secs(1800));
    }
}
