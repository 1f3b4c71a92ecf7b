//! Conditions as kstatus and Argo CD read them: `Ready` always present; `Reconciling` and
//! `Stalled` present only while True; plus `Validated` and `UpToDate`. Pure, unit-tested.

use chrono::{DateTime, Utc};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

use crate::api::common::{ConditionStatus, remove_condition, set_condition};

pub fn to_timestamp(t: DateTime<Utc>) -> k8s_openapi::jiff::Timestamp {
    k8s_openapi::jiff::Timestamp::from_second(t.timestamp())
        .unwrap_or(k8s_openapi::jiff::Timestamp::UNIX_EPOCH)
}

pub fn time(t: DateTime<Utc>) -> Time {
    Time(to_timestamp(t))
}

/// One condition's content.
#[derive(Debug, Clone, PartialEq)]
pub struct Cond {
    pub status: ConditionStatus,
    pub reason: String,
    pub message: String,
}

impl Cond {
    pub fn new(status: ConditionStatus, reason: &str, message: impl Into<String>) -> Self {
        Cond {
            status,
            reason: reason.to_string(),
            message: message.into(),
        }
    }
}

/// What the reconcile concluded.
#[derive(Debug, Clone)]
pub struct Verdict {
    pub ready: Cond,
    /// `Some` = Reconciling=True.
    pub reconciling: Option<(String, String)>,
    /// `Some` = Stalled=True.
    pub stalled: Option<(String, String)>,
    pub validated: Option<Cond>,
    pub up_to_date: Option<Cond>,
}

pub fn apply(conds: &mut Vec<Condition>, v: &Verdict, generation: Option<i64>, now: DateTime<Utc>) {
    let now = time(now);
    let mut set = |type_: &str, c: &Cond| {
        set_condition(
            conds,
            type_,
            c.status,
            &c.reason,
            &c.message,
            generation,
            now.clone(),
        )
    };
    set("Ready", &v.ready);
    if let Some(c) = &v.validated {
        set("Validated", c);
    }
    if let Some(c) = &v.up_to_date {
        set("UpToDate", c);
    }
    for (type_, value) in [("Reconciling", &v.reconciling), ("Stalled", &v.stalled)] {
        match value {
            Some((reason, message)) => set_condition(
                conds,
                type_,
                ConditionStatus::True,
                reason,
                message,
                generation,
                now.clone(),
            ),
            None => remove_condition(conds, type_),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::common::find_condition;

    #[test]
    fn reconciling_and_stalled_exist_only_while_true() {
        let mut c = Vec::new();
        let now = Utc::now();
        let mut v = Verdict {
            ready: Cond::new(ConditionStatus::False, "Building", "stage Provision"),
            reconciling: Some(("Building".into(), "stage Provision".into())),
            stalled: None,
            validated: None,
            up_to_date: Some(Cond::new(ConditionStatus::False, "Building", "x")),
        };
        apply(&mut c, &v, Some(2), now);
        assert_eq!(find_condition(&c, "Reconciling").unwrap().status, "True");
        assert!(find_condition(&c, "Stalled").is_none());
        v.reconciling = None;
        v.stalled = Some(("InvalidSpec".into(), "spec.rebuild.schedule: bad".into()));
        apply(&mut c, &v, Some(3), now);
        assert!(find_condition(&c, "Reconciling").is_none());
        let s = find_condition(&c, "Stalled").unwrap();
        assert_eq!(
            (s.status.as_str(), s.reason.as_str()),
            ("True", "InvalidSpec")
        );
        assert_eq!(
            find_condition(&c, "Ready").unwrap().observed_generation,
            Some(3)
        );
    }
}
