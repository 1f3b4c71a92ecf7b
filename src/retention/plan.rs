//! The retention plan: for every template of an image, keep / archive / delete / ignore, with
//! the reason. Pure; executing it is someone else's job.
//!
//! Rules, in order of strength:
//! 1. Not ours: no marker written for that VMID as a template's, or a marker whose owner is not
//!    the policy's exactly ([`Scope`]: namespace always, uid too for a GoldenImage target):
//!    ignored, listed with why, never touched.
//! 2. The current latest, protected (`protection=1`) and in-use (linked clones) templates are
//!    kept, whatever the other rules say.
//! 3. `retainAtLeast`: if removals would leave fewer validated templates than that, the newest
//!    validated candidates are kept instead (retain wins over `keepLast` and `archiveAfter`).
//! 4. Of the healthy templates (validated or still pending validation, not archived), newest
//!    first by (build date, build number): the first `keepLast` are kept; the rest are removed
//!    when older than `archiveAfter`, kept otherwise.
//!
//! Failed-validation templates never count toward `keepLast` or `retainAtLeast`: they cannot be
//! promoted, so they only take space. The newest build of the image is kept when it failed (so
//! people can inspect it) until a newer build exists or it is older than `archiveAfter`; every
//! other failed template is removed.
//!
//! Archived templates (the `archived` tag, from `tag` mode) are out of rotation and do not count
//! either. In `tag` mode they stay; in `backup`/`delete` mode they are removed once older than
//! `archiveAfter` (e.g. after switching a policy from `tag` to `delete`).
//!
//! "Removed" means [`Action::Archive`] in `backup` and `tag` mode and [`Action::Delete`] in
//! `delete` mode. The plan is deterministic: entries come newest first, whatever the input order
//! (VMIDs are expected to be unique).
//!
//! [`plan_image_deletion`] is the plan of a GoldenImage deleted with `deletionPolicy: Delete`:
//! every template of it goes, the latest too, except the protected and the in-use ones; it is
//! executed by the same code, with the same re-checks.

use std::fmt;

use chrono::{DateTime, Duration, Utc};
use serde::{Deserialize, Serialize};

use super::target::{NotOurs, Scope};
use crate::api::duration::format_duration;
use crate::image::version::{TemplateVersion, ValidationStatus};

/// The seed's policy: keep the last 3, archive what is older than 90 days.
pub const DEFAULT_KEEP_LAST: u32 = 3;
pub const DEFAULT_ARCHIVE_AFTER_DAYS: i64 = 90;
pub const DEFAULT_RETAIN_AT_LEAST: u32 = 1;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetentionRules {
    pub keep_last: u32,
    pub archive_after: Duration,
    pub retain_at_least: u32,
}

impl Default for RetentionRules {
    fn default() -> Self {
        Self {
            keep_last: DEFAULT_KEEP_LAST,
            archive_after: Duration::days(DEFAULT_ARCHIVE_AFTER_DAYS),
            retain_at_least: DEFAULT_RETAIN_AT_LEAST,
        }
    }
}

/// How a template leaves rotation.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum ArchiveMode {
    /// vzdump to a backup storage, check the backup, then delete.
    #[default]
    Backup,
    /// Drop the channel tag, add `archived`, keep the template.
    Tag,
    /// Delete (purge).
    Delete,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Action {
    Keep,
    /// Not ours: left alone, listed so people see why.
    Ignore,
    /// Archive per the mode (`backup` or `tag`).
    Archive,
    Delete,
}

impl Action {
    /// Whether executing this changes the template.
    pub fn is_removal(self) -> bool {
        matches!(self, Self::Archive | Self::Delete)
    }

    fn verb(self) -> &'static str {
        match self {
            Self::Keep => "kept",
            Self::Ignore => "ignored",
            Self::Archive => "archived",
            Self::Delete => "deleted",
        }
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Keep => "keep",
            Self::Ignore => "ignore",
            Self::Archive => "archive",
            Self::Delete => "delete",
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reason {
    NotOurs(NotOurs),
    /// The GoldenImage was deleted with `deletionPolicy: Delete`.
    ImageDeleted,
    CurrentLatest,
    Protected,
    InUse {
        by: Vec<u32>,
    },
    AmongLastN {
        keep_last: u32,
    },
    NotOldEnough {
        archive_after: Duration,
    },
    RetainAtLeast {
        retain_at_least: u32,
    },
    NewestFailed,
    AlreadyArchived,
    Expired {
        archive_after: Duration,
        keep_last: u32,
    },
    FailedValidation {
        superseded: bool,
        archive_after: Duration,
    },
    ArchivedExpired {
        archive_after: Duration,
    },
}

impl Reason {
    /// A stable CamelCase code for status fields and metrics.
    pub fn code(&self) -> &'static str {
        match self {
            Self::NotOurs(_) => "NotOurs",
            Self::ImageDeleted => "ImageDeleted",
            Self::CurrentLatest => "CurrentLatest",
            Self::Protected => "Protected",
            Self::InUse { .. } => "InUse",
            Self::AmongLastN { .. } => "AmongLastN",
            Self::NotOldEnough { .. } => "NotOldEnough",
            Self::RetainAtLeast { .. } => "RetainAtLeast",
            Self::NewestFailed => "NewestFailed",
            Self::AlreadyArchived => "AlreadyArchived",
            Self::Expired { .. } => "Expired",
            Self::FailedValidation { .. } => "FailedValidation",
            Self::ArchivedExpired { .. } => "ArchivedExpired",
        }
    }

    /// The reason in words, e.g. "older than 90d and not among the last 3".
    pub fn describe(&self) -> String {
        match self {
            Self::NotOurs(why) => format!("not ours: {why}"),
            Self::ImageDeleted => "the GoldenImage was deleted (deletionPolicy Delete)".into(),
            Self::CurrentLatest => "current latest".into(),
            Self::Protected => "protected (protection=1)".into(),
            Self::InUse { by } => {
                let ids: Vec<String> = by.iter().map(u32::to_string).collect();
                format!("in use by linked clones {}", ids.join(", "))
            }
            Self::AmongLastN { keep_last } => format!("among the last {keep_last}"),
            Self::NotOldEnough { archive_after } => {
                format!("not older than {}", format_duration(*archive_after))
            }
            Self::RetainAtLeast { retain_at_least: 1 } => {
                "retainAtLeast=1 needs a validated template".into()
            }
            Self::RetainAtLeast { retain_at_least } => {
                format!("retainAtLeast={retain_at_least} needs {retain_at_least} validated templates")
            }
            Self::NewestFailed => {
                "failed validation, but it is the newest build (kept for inspection until a newer build exists)".into()
            }
            Self::AlreadyArchived => "already archived".into(),
            Self::Expired {
                archive_after,
                keep_last: 0,
            } => format!("older than {}", format_duration(*archive_after)),
            Self::Expired {
                archive_after,
                keep_last,
            } => format!(
                "older than {} and not among the last {keep_last}",
                format_duration(*archive_after)
            ),
            Self::FailedValidation {
                superseded: true, ..
            } => "failed validation and a newer build exists".into(),
            Self::FailedValidation {
                superseded: false,
                archive_after,
            } => format!(
                "failed validation and older than {}",
                format_duration(*archive_after)
            ),
            Self::ArchivedExpired { archive_after } => {
                format!("archived and older than {}", format_duration(*archive_after))
            }
        }
    }
}

/// The decision for one template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub vmid: u32,
    pub name: String,
    pub node: String,
    pub action: Action,
    pub reason: Reason,
}

impl Decision {
    /// e.g. "kept: current latest", "archived: older than 90d and not among the last 3".
    pub fn message(&self) -> String {
        format!("{}: {}", self.action.verb(), self.reason.describe())
    }
}

impl fmt::Display for Decision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}: {}", self.vmid, self.name, self.message())
    }
}

/// What a plan is for; the re-check before each destructive call follows from it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Purpose {
    /// A retention run: the current latest is never removed.
    #[default]
    Rotation,
    /// The GoldenImage is gone (`deletionPolicy: Delete`): its latest goes too.
    ImageDeleted,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub mode: ArchiveMode,
    /// Whose templates it may change; execution re-checks every removal against it.
    pub scope: Scope,
    pub purpose: Purpose,
    /// Newest first.
    pub decisions: Vec<Decision>,
}

impl Plan {
    pub fn get(&self, vmid: u32) -> Option<&Decision> {
        self.decisions.iter().find(|d| d.vmid == vmid)
    }

    /// The decisions that change something on Proxmox.
    pub fn removals(&self) -> impl Iterator<Item = &Decision> {
        self.decisions.iter().filter(|d| d.action.is_removal())
    }
}

/// Why `v` is not `scope`'s to change, if it is not.
pub fn not_ours(v: &TemplateVersion, scope: &Scope) -> Option<NotOurs> {
    let Some(owner) = &v.owner else {
        return Some(NotOurs::NoMarker);
    };
    if !v.owned {
        return Some(NotOurs::NotThisVm);
    }
    scope.check(owner).err()
}

/// Computes the plan. `now` is passed in so the result depends on the inputs only.
pub fn plan(
    versions: &[TemplateVersion],
    scope: &Scope,
    rules: &RetentionRules,
    mode: ArchiveMode,
    now: DateTime<Utc>,
) -> Plan {
    let removal = match mode {
        ArchiveMode::Backup | ArchiveMode::Tag => Action::Archive,
        ArchiveMode::Delete => Action::Delete,
    };
    let mut sorted: Vec<&TemplateVersion> = versions.iter().collect();
    sorted.sort_by(|a, b| a.cmp_newest_first(b));
    let foreign: Vec<Option<NotOurs>> = sorted.iter().map(|v| not_ours(v, scope)).collect();
    let ours = |i: usize| foreign[i].is_none();

    let newest_build = (0..sorted.len()).find(|&i| ours(i) && !sorted[i].archived);
    let mut healthy_rank: u32 = 0;
    let mut decisions: Vec<Decision> = Vec::with_capacity(sorted.len());
    for (index, v) in sorted.iter().enumerate() {
        let expired = now.signed_duration_since(v.created_at()) > rules.archive_after;
        let (action, reason) = if let Some(why) = &foreign[index] {
            (Action::Ignore, Reason::NotOurs(why.clone()))
        } else if v.archived {
            if mode == ArchiveMode::Tag || !expired {
                (Action::Keep, Reason::AlreadyArchived)
            } else {
                (
                    removal,
                    Reason::ArchivedExpired {
                        archive_after: rules.archive_after,
                    },
                )
            }
        } else if v.validation == ValidationStatus::Failed {
            let superseded = newest_build != Some(index);
            if superseded || expired {
                (
                    removal,
                    Reason::FailedValidation {
                        superseded,
                        archive_after: rules.archive_after,
                    },
                )
            } else {
                (Action::Keep, Reason::NewestFailed)
            }
        } else {
            let rank = healthy_rank;
            healthy_rank = healthy_rank.saturating_add(1);
            if rank < rules.keep_last {
                (
                    Action::Keep,
                    Reason::AmongLastN {
                        keep_last: rules.keep_last,
                    },
                )
            } else if expired {
                (
                    removal,
                    Reason::Expired {
                        archive_after: rules.archive_after,
                        keep_last: rules.keep_last,
                    },
                )
            } else {
                (
                    Action::Keep,
                    Reason::NotOldEnough {
                        archive_after: rules.archive_after,
                    },
                )
            }
        };
        // The guards beat every rule; the strongest reason is shown.
        let (action, reason) = if action == Action::Ignore {
            (action, reason)
        } else if v.latest {
            (Action::Keep, Reason::CurrentLatest)
        } else if v.protected {
            (Action::Keep, Reason::Protected)
        } else if v.in_use() {
            let mut by = v.in_use_by.clone();
            by.sort_unstable();
            by.dedup();
            (Action::Keep, Reason::InUse { by })
        } else {
            (action, reason)
        };
        decisions.push(Decision {
            vmid: v.vmid,
            name: v.name.clone(),
            node: v.node.clone(),
            action,
            reason,
        });
    }

    // retainAtLeast: put back the newest validated candidates until enough remain.
    let counts = |i: usize| ours(i) && !sorted[i].archived && sorted[i].validated();
    let mut remaining = (0..sorted.len())
        .filter(|&i| counts(i) && !decisions[i].action.is_removal())
        .count();
    let wanted = usize::try_from(rules.retain_at_least).unwrap_or(usize::MAX);
    for (i, d) in decisions.iter_mut().enumerate() {
        if remaining >= wanted {
            break;
        }
        if counts(i) && d.action.is_removal() {
            d.action = Action::Keep;
            d.reason = Reason::RetainAtLeast {
                retain_at_least: rules.retain_at_least,
            };
            remaining += 1;
        }
    }

    Plan {
        mode,
        scope: scope.clone(),
        purpose: Purpose::Rotation,
        decisions,
    }
}

/// The plan for a GoldenImage deleted with `deletionPolicy: Delete`: every template in `scope`
/// is deleted (the latest too) unless protected or in use; the rest is not ours and ignored.
pub fn plan_image_deletion(versions: &[TemplateVersion], scope: &Scope) -> Plan {
    let mut sorted: Vec<&TemplateVersion> = versions.iter().collect();
    sorted.sort_by(|a, b| a.cmp_newest_first(b));
    let decisions = sorted
        .into_iter()
        .map(|v| {
            let (action, reason) = match not_ours(v, scope) {
                Some(why) => (Action::Ignore, Reason::NotOurs(why)),
                None if v.protected => (Action::Keep, Reason::Protected),
                None if v.in_use() => {
                    let mut by = v.in_use_by.clone();
                    by.sort_unstable();
                    by.dedup();
                    (Action::Keep, Reason::InUse { by })
                }
                None => (Action::Delete, Reason::ImageDeleted),
            };
            Decision {
                vmid: v.vmid,
                name: v.name.clone(),
                node: v.node.clone(),
                action,
                reason,
            }
        })
        .collect();
    Plan {
        mode: ArchiveMode::Delete,
        scope: scope.clone(),
        purpose: Purpose::ImageDeleted,
        decisions,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::NaiveDate;

    use crate::image::marker::Owner;

    fn owner() -> Owner {
        Owner {
            namespace: "platform".into(),
            name: "ubuntu".into(),
            uid: "u-1".into(),
        }
    }

    fn scope() -> Scope {
        Scope::Image(owner())
    }

    /// The plan for the image `platform/ubuntu` (uid `u-1`).
    fn plan(
        versions: &[TemplateVersion],
        rules: &RetentionRules,
        mode: ArchiveMode,
        now: DateTime<Utc>,
    ) -> Plan {
        super::plan(versions, &scope(), rules, mode, now)
    }

    pub(super) fn now() -> DateTime<Utc> {
        DateTime::parse_from_rfc3339("2025-06-01T12:00:00Z")
            .expect("time")
            .with_timezone(&Utc)
    }

    /// A validated, owned template built `days_ago` days before `now()`.
    fn t(vmid: u32, days_ago: i64) -> TemplateVersion {
        let date: NaiveDate = (now() - Duration::days(days_ago)).date_naive();
        TemplateVersion {
            vmid,
            name: format!("ubuntu-24.04-minimal-{}-001", date.format("%Y%m%d")),
            node: "pve1".into(),
            build_date: date,
            build_number: 1,
            validation: ValidationStatus::Passed,
            latest: false,
            archived: false,
            protected: false,
            in_use_by: vec![],
            owned: true,
            owner: Some(owner()),
            created: None,
        }
    }

    fn actions(p: &Plan) -> Vec<(u32, Action)> {
        p.decisions.iter().map(|d| (d.vmid, d.action)).collect()
    }

    #[test]
    fn keep_last_3_with_5_versions() {
        let mut versions = vec![
            t(101, 200),
            t(102, 150),
            t(103, 100),
            t(104, 50),
            t(105, 10),
        ];
        versions[4].latest = true;
        let p = plan(
            &versions,
            &RetentionRules::default(),
            ArchiveMode::Backup,
            now(),
        );
        assert_eq!(
            actions(&p),
            [
                (105, Action::Keep),
                (104, Action::Keep),
                (103, Action::Keep),
                (102, Action::Archive),
                (101, Action::Archive),
            ]
        );
        assert_eq!(p.get(105).unwrap().message(), "kept: current latest");
        assert_eq!(p.get(104).unwrap().message(), "kept: among the last 3");
        assert_eq!(
            p.get(102).unwrap().message(),
            "archived: older than 90d and not among the last 3"
        );
        assert_eq!(p.removals().count(), 2);
        let deleted = plan(
            &versions,
            &RetentionRules::default(),
            ArchiveMode::Delete,
            now(),
        );
        assert_eq!(
            deleted.get(101).unwrap().message(),
            "deleted: older than 90d and not among the last 3"
        );
    }

    #[test]
    fn age_rule_keeps_young_templates_beyond_keep_last() {
        let versions = vec![t(1, 1), t(2, 2), t(3, 3), t(4, 89), t(5, 91)];
        let p = plan(
            &versions,
            &RetentionRules::default(),
            ArchiveMode::Delete,
            now(),
        );
        assert_eq!(p.get(4).unwrap().action, Action::Keep);
        assert_eq!(p.get(4).unwrap().message(), "kept: not older than 90d");
        assert_eq!(p.get(5).unwrap().action, Action::Delete);
        // `created` is more precise than the build day.
        let mut exact = t(6, 95);
        exact.created = Some(now() - Duration::days(90) + Duration::hours(1));
        let p = plan(
            &[t(1, 1), t(2, 2), t(3, 3), exact],
            &RetentionRules::default(),
            ArchiveMode::Delete,
            now(),
        );
        assert_eq!(p.get(6).unwrap().action, Action::Keep);
    }

    #[test]
    fn retain_at_least_wins_over_both_rules() {
        // keepLast 0 and everything old: only retainAtLeast keeps templates.
        let rules = RetentionRules {
            keep_last: 0,
            archive_after: Duration::days(30),
            retain_at_least: 2,
        };
        let versions = vec![t(1, 300), t(2, 200), t(3, 100)];
        let p = plan(&versions, &rules, ArchiveMode::Delete, now());
        assert_eq!(
            actions(&p),
            [(3, Action::Keep), (2, Action::Keep), (1, Action::Delete)]
        );
        assert_eq!(
            p.get(3).unwrap().message(),
            "kept: retainAtLeast=2 needs 2 validated templates"
        );
        // Failed templates do not satisfy retainAtLeast: the older validated one stays.
        let mut failed = t(4, 50);
        failed.validation = ValidationStatus::Failed;
        let mut newest = t(5, 40);
        newest.validation = ValidationStatus::Pending;
        let rules = RetentionRules {
            retain_at_least: 1,
            ..rules
        };
        let p = plan(
            &[t(1, 300), failed, newest],
            &rules,
            ArchiveMode::Tag,
            now(),
        );
        assert_eq!(
            p.get(1).unwrap().message(),
            "kept: retainAtLeast=1 needs a validated template"
        );
        assert_eq!(p.get(4).unwrap().action, Action::Archive);
    }

    #[test]
    fn guards_are_never_touched() {
        let rules = RetentionRules {
            keep_last: 0,
            archive_after: Duration::days(1),
            retain_at_least: 0,
        };
        let mut latest = t(1, 100);
        latest.latest = true;
        let mut protected = t(2, 100);
        protected.protected = true;
        let mut in_use = t(3, 100);
        in_use.in_use_by = vec![202, 201, 202];
        let mut foreign = t(4, 100);
        foreign.owned = false;
        let p = plan(
            &[latest, protected, in_use, foreign, t(5, 100)],
            &rules,
            ArchiveMode::Delete,
            now(),
        );
        assert_eq!(p.get(1).unwrap().message(), "kept: current latest");
        assert_eq!(
            p.get(2).unwrap().message(),
            "kept: protected (protection=1)"
        );
        assert_eq!(
            p.get(3).unwrap().message(),
            "kept: in use by linked clones 201, 202"
        );
        assert_eq!(
            p.get(4).unwrap().message(),
            "ignored: not ours: its marker was not written for this template (a copy in a clone, or an unfinished build)"
        );
        assert_eq!(p.get(4).unwrap().action, Action::Ignore);
        assert_eq!(p.get(5).unwrap().action, Action::Delete);
        assert_eq!(p.get(5).unwrap().message(), "deleted: older than 1d");
    }

    #[test]
    fn failed_templates() {
        let mut newest_failed = t(3, 1);
        newest_failed.validation = ValidationStatus::Failed;
        let mut old_failed = t(2, 5);
        old_failed.validation = ValidationStatus::Failed;
        let p = plan(
            &[t(1, 10), old_failed.clone(), newest_failed.clone()],
            &RetentionRules::default(),
            ArchiveMode::Delete,
            now(),
        );
        assert_eq!(p.get(3).unwrap().action, Action::Keep);
        assert_eq!(p.get(3).unwrap().reason, Reason::NewestFailed);
        assert_eq!(
            p.get(2).unwrap().message(),
            "deleted: failed validation and a newer build exists"
        );
        // Failed ones do not use up keepLast slots: 1 is kept as one of the last 3 healthy.
        assert_eq!(p.get(1).unwrap().message(), "kept: among the last 3");
        // The newest failed build goes once it is older than archiveAfter.
        let mut stale_failed = t(9, 120);
        stale_failed.validation = ValidationStatus::Failed;
        let p = plan(
            &[t(1, 130), stale_failed],
            &RetentionRules::default(),
            ArchiveMode::Delete,
            now(),
        );
        assert_eq!(
            p.get(9).unwrap().message(),
            "deleted: failed validation and older than 90d"
        );
    }

    #[test]
    fn archived_templates() {
        let mut archived = t(1, 200);
        archived.archived = true;
        let mut young_archived = t(2, 10);
        young_archived.archived = true;
        let input = [archived, young_archived, t(3, 5)];
        let tag = plan(&input, &RetentionRules::default(), ArchiveMode::Tag, now());
        assert_eq!(tag.get(1).unwrap().message(), "kept: already archived");
        let del = plan(
            &input,
            &RetentionRules::default(),
            ArchiveMode::Delete,
            now(),
        );
        assert_eq!(
            del.get(1).unwrap().message(),
            "deleted: archived and older than 90d"
        );
        assert_eq!(del.get(2).unwrap().message(), "kept: already archived");
        assert_eq!(del.get(3).unwrap().message(), "kept: among the last 3");
    }

    #[test]
    fn same_day_builds_order_by_build_number() {
        let mut a = t(10, 100);
        a.build_number = 2;
        let b = t(20, 100);
        let rules = RetentionRules {
            keep_last: 1,
            retain_at_least: 0,
            ..RetentionRules::default()
        };
        let p = plan(&[b, a], &rules, ArchiveMode::Delete, now());
        assert_eq!(actions(&p), [(10, Action::Keep), (20, Action::Delete)]);
    }

    /// Look-alikes of `platform/ubuntu` (uid u-1), all old enough to go and not guarded: only
    /// the exact owner's are removed; each other one is listed with why it is not ours.
    #[test]
    fn only_the_exact_owner_is_touched() {
        let rules = RetentionRules {
            keep_last: 0,
            archive_after: Duration::days(1),
            retain_at_least: 0,
        };
        let with_owner = |vmid: u32, ns: &str, name: &str, uid: &str| {
            let mut v = t(vmid, 100);
            v.owner = Some(Owner {
                namespace: ns.into(),
                name: name.into(),
                uid: uid.into(),
            });
            v
        };
        let mut copied = t(5, 100);
        copied.owned = false;
        let tags = crate::image::tags::TagSet::parse("sombrero;sombrero.platform.ubuntu");
        let versions = vec![
            t(1, 100),
            with_owner(2, "platform", "ubuntu", "u-2"),
            with_owner(3, "team-b", "ubuntu", "u-1"),
            with_owner(4, "platform", "debian", "u-3"),
            copied,
            TemplateVersion::unmarked(6, "pve1", "ubuntu-lookalike", &tags, false),
        ];
        let image = super::plan(&versions, &scope(), &rules, ArchiveMode::Delete, now());
        let table: Vec<(u32, Action, String)> = image
            .decisions
            .iter()
            .map(|d| (d.vmid, d.action, d.message()))
            .collect();
        let not_ours = |why: &str| format!("ignored: not ours: {why}");
        let copy = "its marker was not written for this template (a copy in a clone, or an unfinished build)";
        assert_eq!(
            table,
            [
                (5, Action::Ignore, not_ours(copy)),
                (
                    4,
                    Action::Ignore,
                    not_ours("owned by GoldenImage platform/debian")
                ),
                (
                    3,
                    Action::Ignore,
                    not_ours("owned by team-b/ubuntu in another namespace")
                ),
                (
                    2,
                    Action::Ignore,
                    not_ours("owned by another GoldenImage platform/ubuntu (uid u-2)")
                ),
                (1, Action::Delete, "deleted: older than 1d".into()),
                (6, Action::Ignore, not_ours("it has no sombrero marker")),
            ]
        );
        assert_eq!(image.get(2).unwrap().reason.code(), "NotOurs");
        // A tagSelector policy in `platform` takes every image of the namespace, nothing else.
        let ns = super::plan(
            &versions,
            &Scope::Namespace("platform".into()),
            &rules,
            ArchiveMode::Delete,
            now(),
        );
        let removed: Vec<u32> = ns.removals().map(|d| d.vmid).collect();
        assert_eq!(removed, [4, 2, 1]);
        // In team-b, only team-b's.
        let other = super::plan(
            &versions,
            &Scope::Namespace("team-b".into()),
            &rules,
            ArchiveMode::Tag,
            now(),
        );
        let removed: Vec<u32> = other.removals().map(|d| d.vmid).collect();
        assert_eq!(removed, [3]);
        // Not-ours templates do not count for keepLast, retainAtLeast or "newest build".
        let rules = RetentionRules {
            keep_last: 1,
            archive_after: Duration::days(1),
            retain_at_least: 1,
        };
        let p = super::plan(
            &[
                with_owner(7, "platform", "ubuntu", "u-2"),
                t(8, 200),
                t(9, 300),
            ],
            &scope(),
            &rules,
            ArchiveMode::Delete,
            now(),
        );
        assert_eq!(p.get(8).unwrap().message(), "kept: among the last 1");
        assert_eq!(p.get(9).unwrap().action, Action::Delete);
    }

    #[test]
    fn image_deletion_takes_the_latest_but_not_guards_or_foreign() {
        let mut latest = t(1, 1);
        latest.latest = true;
        let mut protected = t(2, 2);
        protected.protected = true;
        let mut in_use = t(3, 3);
        in_use.in_use_by = vec![9, 8, 9];
        let mut foreign = t(4, 4);
        foreign.owner = Some(Owner {
            uid: "u-2".into(),
            ..owner()
        });
        let p = plan_image_deletion(&[t(5, 5), foreign, in_use, protected, latest], &scope());
        assert_eq!(p.purpose, Purpose::ImageDeleted);
        assert_eq!(p.mode, ArchiveMode::Delete);
        let table: Vec<(u32, String)> = p.decisions.iter().map(|d| (d.vmid, d.message())).collect();
        assert_eq!(
            table,
            [
                (
                    1,
                    "deleted: the GoldenImage was deleted (deletionPolicy Delete)".into()
                ),
                (2, "kept: protected (protection=1)".into()),
                (3, "kept: in use by linked clones 8, 9".into()),
                (
                    4,
                    "ignored: not ours: owned by another GoldenImage platform/ubuntu (uid u-2)"
                        .into()
                ),
                (
                    5,
                    "deleted: the GoldenImage was deleted (deletionPolicy Delete)".into()
                ),
            ]
        );
    }

    #[test]
    fn empty_input_and_codes() {
        let p = plan(&[], &RetentionRules::default(), ArchiveMode::Backup, now());
        assert!(p.decisions.is_empty());
        assert_eq!(p.purpose, Purpose::Rotation);
        assert_eq!(p.scope, scope());
        assert_eq!(Reason::InUse { by: vec![1] }.code(), "InUse");
        assert_eq!(Action::Archive.to_string(), "archive");
        let d = Decision {
            vmid: 8024,
            name: "x".into(),
            node: "pve1".into(),
            action: Action::Keep,
            reason: Reason::CurrentLatest,
        };
        assert_eq!(d.to_string(), "8024 x: kept: current latest");
    }
}
