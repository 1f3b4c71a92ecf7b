//! When to build a new version: pure decisions, unit-tested.
//!
//! Triggers, in order: no template yet; the spec changed (its hash differs from the newest
//! attempt's); a manual request (`spec.rebuild.requestedAt` differs from
//! `status.handledRebuildRequest`, or the `images.sombrero.dev/rebuild` annotation is present);
//! the cron `rebuild.schedule` fired since the newest attempt; the upstream checksum changed
//! (`onSourceChange`). The newest *attempt* (a failed one included) is the reference, so a
//! build whose validation failed is not repeated in a loop: only a new trigger starts another.
//!
//! Not a rebuild but the rest of one: when the newest template is of the current spec and
//! still awaits validation (`pending`, not promoted) while no job runs, a job is started that
//! only validates and promotes it (`crate::builder::run_build` answers that template instead of
//! building). It covers a process that died after `Finalize` and lost `status.build` too. It
//! comes after a manual request, which such a job then answers.

use std::str::FromStr;

use chrono::{DateTime, Utc};
use croner::Cron;

use super::error::SpecError;

/// Annotation that requests one rebuild; the controller removes it once the build started.
pub const REBUILD_ANNOTATION: &str = "images.sombrero.dev/rebuild";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    Initial,
    SpecChanged,
    Manual,
    Schedule,
    SourceChanged,
    /// The newest template of the current spec was built but never validated or promoted.
    Unvalidated,
}

impl Trigger {
    /// Event reason and log text.
    pub fn reason(self) -> &'static str {
        match self {
            Trigger::Initial => "NoTemplateYet",
            Trigger::SpecChanged => "SpecChanged",
            Trigger::Manual => "RebuildRequested",
            Trigger::Schedule => "ScheduledRebuild",
            Trigger::SourceChanged => "SourceChanged",
            Trigger::Unvalidated => "ValidationPending",
        }
    }
}

/// The newest template of the image (validated or not).
#[derive(Debug, Clone)]
pub struct Attempt {
    pub spec_hash: String,
    pub created: DateTime<Utc>,
    pub source_checksum: Option<String>,
    /// Validation `pending` and not promoted (no channel tag), not archived.
    pub awaiting_validation: bool,
}

#[derive(Debug, Clone, Default)]
pub struct Inputs<'a> {
    pub spec_hash: &'a str,
    pub newest: Option<&'a Attempt>,
    pub schedule: Option<&'a Cron>,
    pub now: DateTime<Utc>,
    pub requested_at: Option<&'a str>,
    pub handled_request: Option<&'a str>,
    pub annotation: bool,
    /// Upstream checksum seen by the latest source check, when `onSourceChange` is on.
    pub upstream_checksum: Option<&'a str>,
}

pub fn decide(i: &Inputs<'_>) -> Option<Trigger> {
    let Some(newest) = i.newest else {
        return Some(Trigger::Initial);
    };
    if newest.spec_hash != i.spec_hash {
        return Some(Trigger::SpecChanged);
    }
    if i.annotation || (i.requested_at.is_some() && i.requested_at != i.handled_request) {
        return Some(Trigger::Manual);
    }
    if newest.awaiting_validation {
        return Some(Trigger::Unvalidated);
    }
    if let Some(cron) = i.schedule
        && let Ok(next) = cron.find_next_occurrence(&newest.created, false)
        && next <= i.now
    {
        return Some(Trigger::Schedule);
    }
    if let (Some(up), Some(have)) = (i.upstream_checksum, newest.source_checksum.as_deref())
        && !same_checksum(up, have)
    {
        return Some(Trigger::SourceChanged);
    }
    None
}

/// `sha256:abc` and `abc` are the same checksum.
fn same_checksum(a: &str, b: &str) -> bool {
    let strip = |s: &str| {
        s.rsplit_once(':')
            .map(|(_, h)| h)
            .unwrap_or(s)
            .to_ascii_lowercase()
    };
    strip(a) == strip(b)
}

/// Parses `rebuild.schedule` (5 fields, UTC, or `@monthly` ...).
pub fn parse_schedule(schedule: &str) -> Result<Cron, SpecError> {
    Cron::from_str(schedule.trim()).map_err(|e| {
        SpecError::new(
            "rebuild.schedule",
            format!("{schedule:?} is not a valid cron schedule ({e}); use 5 fields (minute hour day-of-month month day-of-week, UTC) or @monthly"),
        )
    })
}

/// When the next scheduled rebuild is due after `after`.
pub fn next_due(cron: &Cron, after: DateTime<Utc>) -> Option<DateTime<Utc>> {
    cron.find_next_occurrence(&after, false).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controller::error::Error;
    use chrono::TimeZone;

    fn at(y: i32, m: u32, d: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(y, m, d, 12, 0, 0).unwrap()
    }

    fn attempt(hash: &str, created: DateTime<Utc>) -> Attempt {
        Attempt {
            spec_hash: hash.into(),
            created,
            source_checksum: Some("sha256:aa".into()),
            awaiting_validation: false,
        }
    }

    #[test]
    fn an_unvalidated_template_of_the_spec_is_finished_not_left_pending() {
        let now = at(2025, 1, 18);
        let cron = parse_schedule("@monthly").unwrap();
        let a = Attempt {
            awaiting_validation: true,
            ..attempt("h1", now)
        };
        let base = Inputs {
            spec_hash: "h1",
            newest: Some(&a),
            schedule: Some(&cron),
            now,
            ..Default::default()
        };
        assert_eq!(decide(&base), Some(Trigger::Unvalidated));
        assert_eq!(Trigger::Unvalidated.reason(), "ValidationPending");
        // Before a due schedule or a source change too (either would first answer it).
        let later = Inputs {
            now: at(2025, 2, 2),
            upstream_checksum: Some("sha256:bb"),
            ..base.clone()
        };
        assert_eq!(decide(&later), Some(Trigger::Unvalidated));
        // Another spec builds anew; a manual request keeps its reason.
        assert_eq!(
            decide(&Inputs {
                spec_hash: "h2",
                ..base.clone()
            }),
            Some(Trigger::SpecChanged)
        );
        assert_eq!(
            decide(&Inputs {
                annotation: true,
                ..base.clone()
            }),
            Some(Trigger::Manual)
        );
        // Validated or promoted: nothing to do.
        let done = attempt("h1", now);
        assert_eq!(
            decide(&Inputs {
                newest: Some(&done),
                ..base
            }),
            None
        );
    }

    #[test]
    fn first_build_and_spec_change() {
        let now = at(2025, 1, 18);
        assert_eq!(
            decide(&Inputs {
                spec_hash: "h1",
                now,
                ..Default::default()
            }),
            Some(Trigger::Initial)
        );
        let a = attempt("h1", now);
        let base = Inputs {
            spec_hash: "h1",
            newest: Some(&a),
            now,
            ..Default::default()
        };
        assert_eq!(decide(&base), None);
        assert_eq!(
            decide(&Inputs {
                spec_hash: "h2",
                ..base.clone()
            }),
            Some(Trigger::SpecChanged)
        );
    }

    #[test]
    fn manual_requests_fire_once() {
        let now = at(2025, 1, 18);
        let a = attempt("h1", now);
        let base = Inputs {
            spec_hash: "h1",
            newest: Some(&a),
            now,
            requested_at: Some("2025-01-18T10:00:00Z"),
            ..Default::default()
        };
        assert_eq!(decide(&base), Some(Trigger::Manual));
        let handled = Inputs {
            handled_request: Some("2025-01-18T10:00:00Z"),
            ..base.clone()
        };
        assert_eq!(decide(&handled), None);
        assert_eq!(
            decide(&Inputs {
                annotation: true,
                ..handled
            }),
            Some(Trigger::Manual)
        );
    }

    #[test]
    fn monthly_schedule_fires_after_the_first_of_the_month() {
        let cron = parse_schedule("@monthly").unwrap();
        let a = attempt("h1", at(2025, 1, 18));
        let mut i = Inputs {
            spec_hash: "h1",
            newest: Some(&a),
            schedule: Some(&cron),
            now: at(2025, 1, 31),
            ..Default::default()
        };
        assert_eq!(decide(&i), None);
        i.now = at(2025, 2, 1);
        assert_eq!(decide(&i), Some(Trigger::Schedule));
        assert_eq!(
            next_due(&cron, at(2025, 1, 18)).unwrap(),
            Utc.with_ymd_and_hms(2025, 2, 1, 0, 0, 0).unwrap()
        );
    }

    #[test]
    fn upstream_checksum_change() {
        let a = attempt("h1", at(2025, 1, 18));
        let i = Inputs {
            spec_hash: "h1",
            newest: Some(&a),
            now: at(2025, 1, 19),
            upstream_checksum: Some("AA"),
            ..Default::default()
        };
        assert_eq!(decide(&i), None);
        assert_eq!(
            decide(&Inputs {
                upstream_checksum: Some("sha256:bb"),
                ..i
            }),
            Some(Trigger::SourceChanged)
        );
    }

    #[test]
    fn a_bad_schedule_names_the_field() {
        let e = parse_schedule("every month").unwrap_err();
        assert_eq!(e.field, "rebuild.schedule");
        assert!(e.to_string().starts_with("spec.rebuild.schedule:"), "{e}");
        assert!(Error::from(e).is_stalled());
    }
}
