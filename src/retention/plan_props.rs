//! Property tests for the retention plan's invariants.

use chrono::{DateTime, Duration, NaiveDate, Utc};
use proptest::prelude::*;

use super::plan::{Action, ArchiveMode, Plan, RetentionRules, not_ours, plan_image_deletion};
use super::target::Scope;
use crate::image::marker::Owner;
use crate::image::version::{TemplateVersion, ValidationStatus};

fn owner(namespace: &str, name: &str, uid: &str) -> Owner {
    Owner {
        namespace: namespace.into(),
        name: name.into(),
        uid: uid.into(),
    }
}

/// Mostly `platform/ubuntu` uid u-1; look-alikes: another uid, image, namespace; no marker.
fn arb_owner() -> impl Strategy<Value = Option<Owner>> {
    prop_oneof![
        12 => Just(Some(owner("platform", "ubuntu", "u-1"))),
        1 => Just(Some(owner("platform", "ubuntu", "u-2"))),
        1 => Just(Some(owner("platform", "debian", "u-3"))),
        1 => Just(Some(owner("team-b", "ubuntu", "u-1"))),
        1 => Just(None),
    ]
}

fn arb_scope() -> impl Strategy<Value = Scope> {
    prop_oneof![
        3 => Just(Scope::Image(owner("platform", "ubuntu", "u-1"))),
        1 => Just(Scope::Namespace("platform".into())),
        1 => Just(Scope::Namespace("team-b".into())),
    ]
}

fn plan(
    versions: &[TemplateVersion],
    rules: &RetentionRules,
    mode: ArchiveMode,
    now: DateTime<Utc>,
) -> Plan {
    super::plan::plan(
        versions,
        &Scope::Image(owner("platform", "ubuntu", "u-1")),
        rules,
        mode,
        now,
    )
}

fn now() -> DateTime<Utc> {
    DateTime::parse_from_rfc3339("2025-06-01T12:00:00Z")
        .map(|t| t.with_timezone(&Utc))
        .unwrap_or_default()
}

fn arb_version(vmid: u32) -> impl Strategy<Value = TemplateVersion> {
    (
        0i64..400,
        1u16..4,
        prop_oneof![
            6 => Just(ValidationStatus::Passed),
            2 => Just(ValidationStatus::Pending),
            2 => Just(ValidationStatus::Failed),
        ],
        prop::bool::weighted(0.1),
        prop::bool::weighted(0.1),
        prop::bool::weighted(0.1),
        prop::collection::vec(200u32..210, 0..3).prop_map(|mut v| {
            // Most templates have no clones.
            if v.len() < 2 {
                v.clear();
            }
            v
        }),
        prop::bool::weighted(0.85),
        arb_owner(),
    )
        .prop_map(
            move |(
                days_ago,
                build,
                validation,
                latest,
                archived,
                protected,
                in_use_by,
                owned,
                owner,
            )| {
                let date: NaiveDate = (now() - Duration::days(days_ago)).date_naive();
                let owned = owned && owner.is_some();
                TemplateVersion {
                    vmid,
                    name: format!("img-{vmid}"),
                    node: "pve1".into(),
                    build_date: date,
                    build_number: build,
                    validation,
                    latest,
                    archived,
                    protected,
                    in_use_by,
                    owned,
                    owner,
                    created: None,
                }
            },
        )
}

/// Up to 12 versions with unique VMIDs.
fn arb_versions() -> impl Strategy<Value = Vec<TemplateVersion>> {
    prop::collection::btree_set(100u32..160, 0..12)
        .prop_flat_map(|ids| ids.into_iter().map(arb_version).collect::<Vec<_>>())
}

fn arb_rules() -> impl Strategy<Value = RetentionRules> {
    (0u32..5, 0i64..200, 0u32..4).prop_map(|(keep_last, days, retain_at_least)| RetentionRules {
        keep_last,
        archive_after: Duration::days(days),
        retain_at_least,
    })
}

fn arb_mode() -> impl Strategy<Value = ArchiveMode> {
    prop_oneof![
        Just(ArchiveMode::Backup),
        Just(ArchiveMode::Tag),
        Just(ArchiveMode::Delete)
    ]
}

fn decision_of<'a>(
    p: &'a Plan,
    v: &TemplateVersion,
) -> Result<&'a super::plan::Decision, TestCaseError> {
    p.get(v.vmid)
        .ok_or_else(|| TestCaseError::fail(format!("no decision for {}", v.vmid)))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn every_template_gets_exactly_one_decision(versions in arb_versions(), rules in arb_rules(), mode in arb_mode()) {
        let p = plan(&versions, &rules, mode, now());
        prop_assert_eq!(p.decisions.len(), versions.len());
        for v in &versions {
            prop_assert_eq!(p.decisions.iter().filter(|d| d.vmid == v.vmid).count(), 1);
        }
    }

    #[test]
    fn current_latest_is_never_removed(versions in arb_versions(), rules in arb_rules(), mode in arb_mode()) {
        let p = plan(&versions, &rules, mode, now());
        for v in versions.iter().filter(|v| v.latest) {
            prop_assert!(!decision_of(&p, v)?.action.is_removal(), "{:?}", v);
        }
    }

    #[test]
    fn in_use_protected_and_unowned_are_never_touched(versions in arb_versions(), rules in arb_rules(), mode in arb_mode()) {
        let p = plan(&versions, &rules, mode, now());
        for v in &versions {
            let d = decision_of(&p, v)?;
            if !v.owned {
                prop_assert_eq!(d.action, Action::Ignore);
            }
            if v.in_use() || v.protected {
                prop_assert!(!d.action.is_removal(), "{:?} -> {:?}", v, d);
            }
        }
    }

    #[test]
    fn never_fewer_than_retain_at_least_validated(versions in arb_versions(), rules in arb_rules(), mode in arb_mode()) {
        let p = plan(&versions, &rules, mode, now());
        let scope = Scope::Image(owner("platform", "ubuntu", "u-1"));
        let counts = |v: &&TemplateVersion| not_ours(v, &scope).is_none() && !v.archived && v.validated();
        let available = versions.iter().filter(counts).count();
        let remaining = versions
            .iter()
            .filter(counts)
            .filter(|v| p.get(v.vmid).is_some_and(|d| !d.action.is_removal()))
            .count();
        let wanted = rules.retain_at_least as usize;
        prop_assert!(remaining >= wanted.min(available), "remaining {} of {}, wanted {}", remaining, available, wanted);
    }

    #[test]
    fn removals_are_old_or_failed_and_beyond_keep_last(versions in arb_versions(), rules in arb_rules(), mode in arb_mode()) {
        let p = plan(&versions, &rules, mode, now());
        let mut healthy: Vec<&TemplateVersion> = versions
            .iter()
            .filter(|v| v.owned && v.owner.as_ref().is_some_and(|o| o.uid == "u-1" && o.namespace == "platform" && o.name == "ubuntu") && !v.archived && v.validation != ValidationStatus::Failed)
            .collect();
        healthy.sort_by(|a, b| a.cmp_newest_first(b));
        let newest: Vec<u32> = healthy.iter().take(rules.keep_last as usize).map(|v| v.vmid).collect();
        for v in &versions {
            let d = decision_of(&p, v)?;
            if !d.action.is_removal() {
                continue;
            }
            let old = now() - v.created_at() > rules.archive_after;
            prop_assert!(old || v.validation == ValidationStatus::Failed, "{:?} -> {:?}", v, d);
            prop_assert!(!newest.contains(&v.vmid), "{:?} is among the last {}", v, rules.keep_last);
            let expected = if mode == ArchiveMode::Delete { Action::Delete } else { Action::Archive };
            prop_assert_eq!(d.action, expected);
        }
    }

    #[test]
    fn deterministic_whatever_the_input_order(
        versions in arb_versions(),
        rules in arb_rules(),
        mode in arb_mode(),
        seed in any::<u64>(),
    ) {
        let p = plan(&versions, &rules, mode, now());
        // A seeded shuffle (Fisher-Yates with a small LCG), so proptest can shrink the seed.
        let mut shuffled = versions.clone();
        let mut state = seed;
        for i in (1..shuffled.len()).rev() {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let j = (state >> 33) as usize % (i + 1);
            shuffled.swap(i, j);
        }
        let mut reversed = versions.clone();
        reversed.reverse();
        prop_assert_eq!(&plan(&shuffled, &rules, mode, now()), &p);
        prop_assert_eq!(&plan(&reversed, &rules, mode, now()), &p);
        // Output is newest first.
        let order: Vec<u32> = p.decisions.iter().map(|d| d.vmid).collect();
        let mut sorted = versions.clone();
        sorted.sort_by(|a, b| a.cmp_newest_first(b));
        prop_assert_eq!(order, sorted.iter().map(|v| v.vmid).collect::<Vec<_>>());
    }

    #[test]
    fn nothing_not_ours_is_ever_touched(
        versions in arb_versions(),
        scope in arb_scope(),
        rules in arb_rules(),
        mode in arb_mode(),
    ) {
        let rotation = super::plan::plan(&versions, &scope, &rules, mode, now());
        let deletion = plan_image_deletion(&versions, &scope);
        for p in [&rotation, &deletion] {
            prop_assert_eq!(&p.scope, &scope);
            for v in &versions {
                let d = decision_of(p, v)?;
                // Ignored exactly when not ours; ours by the exact owner only.
                prop_assert_eq!(d.action == Action::Ignore, not_ours(v, &scope).is_some(), "{:?} -> {:?}", v, d);
                if d.action.is_removal() {
                    let o = v.owner.as_ref();
                    prop_assert!(v.owned && o.is_some(), "{:?}", v);
                    match &scope {
                        Scope::Image(want) => prop_assert_eq!(o, Some(want)),
                        Scope::Namespace(ns) => prop_assert_eq!(o.map(|o| &o.namespace), Some(ns)),
                    }
                    prop_assert!(!v.protected && !v.in_use(), "{:?}", v);
                }
            }
        }
    }
}
