//! Types shared by both resources: the Proxmox connection, condition helpers, patterns.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::KubeSchema;
use serde::{Deserialize, Serialize};

/// How to reach a Proxmox VE cluster. Only a reference: secret values never live in a spec.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct ProxmoxConnection {
    /// Secret (in the object's namespace) with keys `url`, `tokenId`, `tokenSecret`, and optionally
    /// `caCert` (PEM bundle) or `fingerprint` (SHA-256 of the server certificate).
    /// When `proxmox` is omitted, the controller's default connection is used.
    pub secret_ref: SecretReference,
    /// Skip TLS verification of the Proxmox API. Insecure: only for throwaway labs.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub insecure_skip_tls_verify: bool,
}

/// A reference to a Secret in the same namespace as the referring object.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretReference {
    /// Name of the Secret.
    #[x_kube(validation = Rule::new("self.matches('^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$') && size(self) <= 253").message("must be the name of a Secret (lowercase letters, digits, '-' and '.')"))]
    #[schemars(length(max = 253))]
    pub name: String,
}

/// `status` value of a condition.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConditionStatus {
    True,
    False,
    Unknown,
}

impl ConditionStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            ConditionStatus::True => "True",
            ConditionStatus::False => "False",
            ConditionStatus::Unknown => "Unknown",
        }
    }
}

/// Sets (or replaces) the condition of `type_` in `conditions`, keeping `lastTransitionTime` when
/// the status did not change, so watchers see real transitions only.
pub fn set_condition(
    conditions: &mut Vec<Condition>,
    type_: &str,
    status: ConditionStatus,
    reason: &str,
    message: &str,
    observed_generation: Option<i64>,
    now: Time,
) {
    let status = status.as_str().to_string();
    if let Some(existing) = conditions.iter_mut().find(|c| c.type_ == type_) {
        if existing.status != status {
            existing.last_transition_time = now;
        }
        existing.status = status;
        existing.reason = reason.to_string();
        existing.message = message.to_string();
        existing.observed_generation = observed_generation;
    } else {
        conditions.push(Condition {
            type_: type_.to_string(),
            status,
            reason: reason.to_string(),
            message: message.to_string(),
            observed_generation,
            last_transition_time: now,
        });
    }
}

/// Removes the condition of `type_` (kstatus wants `Reconciling`/`Stalled` present only when True).
pub fn remove_condition(conditions: &mut Vec<Condition>, type_: &str) {
    conditions.retain(|c| c.type_ != type_);
}

/// Finds the condition of `type_`.
pub fn find_condition<'a>(conditions: &'a [Condition], type_: &str) -> Option<&'a Condition> {
    conditions.iter().find(|c| c.type_ == type_)
}

#[cfg(test)]
mod tests {
    use super::*;
    fn t(secs: i64) -> Time {
        crate::api::time::to_time(chrono::DateTime::from_timestamp(secs, 0).unwrap())
    }

    #[test]
    fn transition_time_moves_only_when_status_changes() {
        let mut c = Vec::new();
        set_condition(
            &mut c,
            "Ready",
            ConditionStatus::False,
            "Building",
            "a",
            Some(1),
            t(10),
        );
        set_condition(
            &mut c,
            "Ready",
            ConditionStatus::False,
            "Validating",
            "b",
            Some(2),
            t(20),
        );
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].last_transition_time, t(10));
        assert_eq!(c[0].reason, "Validating");
        assert_eq!(c[0].observed_generation, Some(2));
        set_condition(
            &mut c,
            "Ready",
            ConditionStatus::True,
            "Promoted",
            "c",
            Some(2),
            t(30),
        );
        assert_eq!(c[0].last_transition_time, t(30));
        assert_eq!(find_condition(&c, "Ready").unwrap().status, "True");
        remove_condition(&mut c, "Ready");
        assert!(c.is_empty());
    }
}
