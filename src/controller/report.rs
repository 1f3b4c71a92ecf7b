//! What both reconcilers (GoldenImage, TemplateRetention) write back the same way: the status
//! subresource (server-side apply, skipped when unchanged) and the conditions after an error.

use kube::api::{Api, Patch, PatchParams};
use kube::{Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::json;

use k8s_openapi::NamespaceResourceScope;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;

use super::context::Context;
use super::error::{Error, Result};
use super::status::{Cond, Verdict};
use crate::api::common::{ConditionStatus, find_condition};

/// Writes `status` on `object` (whose status is `current`) with server-side apply as the
/// controller's field manager; no request when nothing changed.
pub async fn write_status<K, S>(
    ctx: &Context,
    object: &K,
    current: Option<&S>,
    status: &S,
) -> Result<(), kube::Error>
where
    K: Resource<DynamicType = (), Scope = NamespaceResourceScope>
        + Clone
        + DeserializeOwned
        + std::fmt::Debug,
    S: Serialize + PartialEq,
{
    if current == Some(status) {
        return Ok(());
    }
    let api: Api<K> = Api::namespaced(ctx.client.clone(), &object.namespace().unwrap_or_default());
    let patch = json!({
        "apiVersion": K::api_version(&()),
        "kind": K::kind(&()),
        "status": status,
    });
    api.patch_status(
        &object.name_any(),
        &PatchParams::apply(&ctx.settings.manager).force(),
        &Patch::Apply(patch),
    )
    .await?;
    Ok(())
}

/// The conditions after a failed reconcile: a transient error keeps the last `Ready` verdict and
/// says `Reconciling`; a stalled one sets `Ready=False` and `Stalled` with why it cannot proceed.
pub fn error_verdict(conditions: &[Condition], e: &Error) -> Verdict {
    let ready = match find_condition(conditions, "Ready") {
        Some(c) if !e.is_stalled() => Cond {
            status: if c.status == "True" {
                ConditionStatus::True
            } else {
                ConditionStatus::False
            },
            reason: c.reason.clone(),
            message: c.message.clone(),
        },
        _ => Cond::new(ConditionStatus::False, e.reason(), e.message()),
    };
    let pair = Some((e.reason().to_string(), e.message()));
    Verdict {
        ready,
        reconciling: if e.is_stalled() { None } else { pair.clone() },
        stalled: if e.is_stalled() { pair } else { None },
        validated: None,
        up_to_date: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::common::set_condition;

    fn ready(status: ConditionStatus) -> Vec<Condition> {
        let mut conds = Vec::new();
        set_condition(
            &mut conds,
            "Ready",
            status,
            "Promoted",
            "template t serves",
            Some(1),
            crate::api::time::to_time(chrono::Utc::now()),
        );
        conds
    }

    #[test]
    fn a_transient_error_keeps_ready_and_reconciles() {
        let e = Error::Transient("Proxmox answered 503".into());
        let v = error_verdict(&ready(ConditionStatus::True), &e);
        assert_eq!(
            v.ready,
            Cond::new(ConditionStatus::True, "Promoted", "template t serves")
        );
        assert_eq!(
            v.reconciling.as_ref().map(|r| r.0.as_str()),
            Some(e.reason())
        );
        assert!(v.stalled.is_none());
    }

    #[test]
    fn a_stalled_error_drops_ready_and_says_why() {
        let e = Error::invalid_spec("spec.keepLast", "must be at least 1");
        let v = error_verdict(&ready(ConditionStatus::True), &e);
        assert_eq!(
            v.ready,
            Cond::new(ConditionStatus::False, e.reason(), e.message())
        );
        assert_eq!(v.stalled, Some((e.reason().to_string(), e.message())));
        assert!(v.reconciling.is_none());
        // No Ready yet: a transient error says so in Ready=False.
        let t = Error::Transient("x".into());
        assert_eq!(error_verdict(&[], &t).ready.status, ConditionStatus::False);
    }

    /// The finalizer's deletion refused by Proxmox (a revoked token, a missing privilege, or the
    /// build-VM cleanup refused): Stalled with the hint for the Secret or the token's
    /// privileges, never "retrying" as if Proxmox were busy.
    #[test]
    fn a_refused_token_while_deleting_stalls_with_the_credential_hint() {
        use crate::proxmox;
        let cases = [
            (
                Error::Proxmox(proxmox::Error::Unauthenticated {
                    request: "DELETE /nodes/pve1/qemu/8024".into(),
                    message: "invalid token value".into(),
                }),
                "ProxmoxAuthFailed",
                "update tokenId/tokenSecret in the Secret",
            ),
            (
                Error::Proxmox(proxmox::Error::Forbidden {
                    request: "DELETE /nodes/pve1/qemu/8024".into(),
                    message: "Permission check failed (/vms/8024, VM.Allocate)".into(),
                }),
                "ProxmoxForbidden",
                "grant the token the privileges",
            ),
            (
                Error::ProxmoxAuth("list VMs: authentication failed".into()),
                "ProxmoxAuthFailed",
                "tokenId/tokenSecret",
            ),
        ];
        for (e, reason, hint) in cases {
            let v = error_verdict(&ready(ConditionStatus::True), &e);
            assert_eq!(v.ready.status, ConditionStatus::False, "{e}");
            let (r, m) = v.stalled.clone().expect("stalled");
            assert_eq!(r, reason);
            assert!(m.contains(hint), "{m}");
            assert!(!m.contains("retrying"), "{m}");
            assert!(v.reconciling.is_none());
        }
        // A busy Proxmox during the deletion is retried, not stalled.
        let busy = Error::Proxmox(proxmox::Error::Transient {
            request: "DELETE /nodes/pve1/qemu/8024".into(),
            message: "503".into(),
        });
        assert!(error_verdict(&[], &busy).stalled.is_none());
    }
}
