//! Conditions as kstatus and Argo CD read them: `Ready` always present; `Reconciling` and
//! `Stalled` present only while True; plus `Validated` and `UpToDate`. Pure, unit-tested.

use chrono::{DateTime, Utc};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;

use crate::api::common::{ConditionStatus, remove_condition, set_condition};
use crate::api::time::to_time;

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

/// The newest template of the current spec failed validation and nothing will rebuild it: the
/// controller does not retry the same spec, so only a person can move the object on.
#[derive(Debug, Clone, PartialEq)]
pub struct FailedValidation {
    pub name: String,
    pub vmid: u32,
    /// Which check failed and why, e.g. `check cloudInit failed: cloud-init status: degraded`.
    pub check: String,
    /// The latest template that still serves, if any: (name, VMID).
    pub serving: Option<(String, u32)>,
}

pub const VALIDATION_FAILED: &str = "ValidationFailed";

impl FailedValidation {
    fn serving_text(&self) -> String {
        match &self.serving {
            Some((name, vmid)) => {
                format!("the previous latest {name} (VMID {vmid}) still serves")
            }
            None => "no earlier template serves".to_string(),
        }
    }

    /// `Stalled=True` (reason, message): which template, which check, and what to do.
    pub fn stalled(&self) -> (String, String) {
        (
            VALIDATION_FAILED.to_string(),
            format!(
                "template {} (VMID {}) failed validation: {}; it is not promoted and the same spec is not rebuilt ({}): fix the image or the spec and change the spec, or request a rebuild (spec.rebuild.requestedAt or the annotation images.sombrero.dev/rebuild)",
                self.name,
                self.vmid,
                self.check,
                self.serving_text()
            ),
        )
    }

    /// `Ready`: still True while a previous latest serves (consumers keep working; `Stalled`
    /// says something needs a person), else False with the same reason.
    pub fn ready(&self) -> Cond {
        match &self.serving {
            Some((name, vmid)) => Cond::new(
                ConditionStatus::True,
                "TemplateAvailable",
                format!(
                    "template {name} (VMID {vmid}) serves; the newer template {} (VMID {}) failed validation",
                    self.name, self.vmid
                ),
            ),
            None => Cond::new(
                ConditionStatus::False,
                VALIDATION_FAILED,
                format!(
                    "template {} (VMID {}) failed validation ({}); {}",
                    self.name,
                    self.vmid,
                    self.check,
                    self.serving_text()
                ),
            ),
        }
    }
}

pub fn apply(conds: &mut Vec<Condition>, v: &Verdict, generation: Option<i64>, now: DateTime<Utc>) {
    let now = to_time(now);
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
    fn a_failed_validation_stalls_and_says_what_serves() {
        let mut f = FailedValidation {
            name: "ubuntu-002".into(),
            vmid: 8031,
            check: "check cloudInit failed: cloud-init status: degraded".into(),
            serving: None,
        };
        let (reason, message) = f.stalled();
        assert_eq!(reason, "ValidationFailed");
        for part in [
            "8031",
            "cloudInit",
            "no earlier template serves",
            "change the spec",
            "request a rebuild",
        ] {
            assert!(message.contains(part), "{part}: {message}");
        }
        let ready = f.ready();
        assert_eq!(
            (ready.status, ready.reason.as_str()),
            (ConditionStatus::False, "ValidationFailed")
        );
        assert!(ready.message.contains("no earlier template serves"));

        f.serving = Some(("ubuntu-001".into(), 8024));
        assert!(
            f.stalled()
                .1
                .contains("ubuntu-001 (VMID 8024) still serves")
        );
        let ready = f.ready();
        assert_eq!(ready.status, ConditionStatus::True);
        assert!(ready.message.contains("8024") && ready.message.contains("8031"));
    }

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
