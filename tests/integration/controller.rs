//! End-to-end tests of `sombrero controller`: the controller runs in-process (as a tokio task)
//! against a real kube-apiserver (tests/support/kube.rs) and the fake Proxmox
//! (tests/support/fakepve.rs).

use crate::support;

use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, DeleteParams};
use kube::{Client, ResourceExt};
use serde_json::json;
use sombrero::api::GoldenImage;
use sombrero::image::marker::{Ownership, Role, ownership, parse_description, render_description};
use sombrero::image::tags::{FAILED_VALIDATION_TAG, OWNER_TAG, TagSet};
use sombrero::proxmox;
use support::controller::{
    change_spec, condition, controller_client, create_image_with, events, is_ready, observed,
    options, put_secret, pve_client, start, wait_for,
};
use support::fakepve::{Failure, FakePve, GuestSettings, Image, Options as PveOptions};
use support::kube::control_plane;

async fn create_image(
    client: &Client,
    ns: &str,
    name: &str,
    pve: &FakePve,
    secret: &str,
) -> GoldenImage {
    create_image_with(client, ns, name, pve, secret, json!({})).await
}

/// A VM carrying our owner tag, as the fake holds it.
#[derive(Debug)]
struct TaggedVm {
    vmid: u32,
    tags: TagSet,
    ownership: Ownership,
    owner_uid: Option<String>,
}

async fn tagged_vms(c: &proxmox::Client) -> Vec<TaggedVm> {
    let mut out = Vec::new();
    for vm in c.cluster_vms().await.unwrap() {
        let tags = TagSet::parse(vm.tags.as_deref().unwrap_or(""));
        if !vm.is_qemu() || !tags.contains(OWNER_TAG) {
            continue;
        }
        let config = c.vm_config(&vm.node, vm.vmid).await.unwrap();
        let marker = config
            .description
            .as_deref()
            .and_then(|d| parse_description(d).ok().flatten());
        out.push(TaggedVm {
            vmid: vm.vmid,
            tags,
            ownership: ownership(marker.as_ref(), vm.vmid),
            owner_uid: marker.map(|m| m.owner.uid),
        });
    }
    out.sort_by_key(|v| v.vmid);
    out
}

fn of_image<'a>(
    vms: &'a [TaggedVm],
    uid: &'a str,
    role: Role,
) -> impl Iterator<Item = &'a TaggedVm> {
    vms.iter().filter(move |v| {
        v.ownership == Ownership::Ours(role) && v.owner_uid.as_deref() == Some(uid)
    })
}

/// The image's templates (ours, written for their own VMID), ascending.
fn templates(vms: &[TaggedVm], uid: &str) -> Vec<u32> {
    of_image(vms, uid, Role::Template).map(|v| v.vmid).collect()
}

/// Templates of the image carrying the channel tag.
fn holders(vms: &[TaggedVm], uid: &str) -> Vec<u32> {
    of_image(vms, uid, Role::Template)
        .filter(|v| v.tags.is_latest())
        .map(|v| v.vmid)
        .collect()
}

/// Build VMs and validation clones of the image (none may be left once it is Ready).
fn leftovers(vms: &[TaggedVm], uid: &str) -> Vec<u32> {
    of_image(vms, uid, Role::Build)
        .chain(of_image(vms, uid, Role::Validation))
        .map(|v| v.vmid)
        .collect()
}

/// Waits for an Event of `reason` whose message contains `text`; panics listing the Events.
async fn wait_event(
    client: &Client,
    ns: &str,
    name: &str,
    reason: &str,
    text: &str,
) -> (String, String, String) {
    let start = Instant::now();
    loop {
        let evs = events(client, ns, name).await;
        if let Some(e) = evs.iter().find(|e| e.1 == reason && e.2.contains(text)) {
            return e.clone();
        }
        if start.elapsed() > Duration::from_secs(30) {
            panic!("no Event {reason} containing {text:?}; Events: {evs:#?}");
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

fn latest_vmid(gi: &GoldenImage) -> Option<u32> {
    gi.status.as_ref()?.latest.as_ref().map(|l| l.vmid)
}

/// Deletes the GoldenImage and waits until the finalizer let it go.
async fn delete_and_wait(client: &Client, ns: &str, name: &str) {
    let api: Api<GoldenImage> = Api::namespaced(client.clone(), ns);
    api.delete(name, &DeleteParams::default())
        .await
        .expect("delete GoldenImage");
    let start = Instant::now();
    loop {
        match api.get_opt(name).await.expect("get GoldenImage") {
            None => return,
            Some(gi) if start.elapsed() > Duration::from_secs(120) => {
                panic!(
                    "the GoldenImage was not released; finalizers {:?}, status: {:#?}",
                    gi.metadata.finalizers, gi.status
                )
            }
            Some(_) => tokio::time::sleep(Duration::from_millis(300)).await,
        }
    }
}

#[tokio::test]
async fn a_wrong_token_stalls_and_a_fixed_secret_recovers() {
    let cp = control_plane();
    cp.install_crds();
    let client = cp.client().await;
    let ns = cp.namespace(&client, "ctl-token").await;
    let (rbac, sa) = controller_client(cp, &ns).await;
    let pve = FakePve::start().await;
    put_secret(
        &client,
        &ns,
        "pve",
        &pve,
        "00000000-0000-0000-0000-000000000000",
    )
    .await;
    create_image(&client, &ns, "img", &pve, "pve").await;
    let ctl = start(&sa, options(&rbac, "a", false));

    let gi = wait_for(
        &client,
        &ns,
        "img",
        "Stalled=True",
        Duration::from_secs(60),
        |gi| condition(gi, "Stalled").is_some_and(|c| c.0 == "True"),
    )
    .await;
    let (_, reason, message) = condition(&gi, "Stalled").unwrap();
    assert_eq!(reason, "ProxmoxAuthFailed", "{message}");
    assert!(
        message.contains("tokenSecret"),
        "actionable message: {message}"
    );
    assert!(!message.contains(&pve.token_secret));
    let ev = wait_event(&client, &ns, "img", "ProxmoxAuthFailed", "tokenSecret").await;
    assert_eq!(ev.0, "Warning");
    assert!(!ev.2.contains(&pve.token_secret));
    assert_eq!(condition(&gi, "Ready").unwrap().0, "False");
    assert!(
        condition(&gi, "Reconciling").is_none(),
        "kstatus: Reconciling only while True"
    );
    assert_eq!(
        gi.status.as_ref().unwrap().observed_generation,
        gi.metadata.generation
    );

    // Fixing the Secret takes effect without touching the GoldenImage (the Secret is watched).
    put_secret(&client, &ns, "pve", &pve, &pve.token_secret).await;
    let gi = wait_for(
        &client,
        &ns,
        "img",
        "Stalled gone",
        Duration::from_secs(30),
        |gi| {
            condition(gi, "Stalled").is_none()
                && gi
                    .status
                    .as_ref()
                    .is_some_and(|s| s.build.is_some() || s.latest.is_some())
        },
    )
    .await;
    assert!(
        condition(&gi, "Reconciling").is_some() || condition(&gi, "Ready").unwrap().0 == "True"
    );
    ctl.abort();
    rbac.assert_nothing_denied();
}

#[tokio::test]
async fn a_token_without_a_privilege_stalls_insufficient_privileges_before_any_write() {
    let cp = control_plane();
    cp.install_crds();
    let client = cp.client().await;
    let ns = cp.namespace(&client, "ctl-privs").await;
    let (rbac, sa) = controller_client(cp, &ns).await;
    let pve = FakePve::start().await;
    // The README's role without VM.Audit: the token could create a build VM, then not see it.
    let role =
        sombrero::privileges::table::role_privileges(proxmox::PveVersion { major: 9, minor: 0 });
    let privs: Vec<&str> = role.into_iter().filter(|p| *p != "VM.Audit").collect();
    let (token_id, token_secret) = pve.add_token(&privs).await;
    put_secret(&client, &ns, "pve", &pve, &token_secret).await;
    // put_secret names the fake's full token; this Secret names the restricted one.
    let secrets: Api<k8s_openapi::api::core::v1::Secret> = Api::namespaced(client.clone(), &ns);
    secrets
        .patch(
            "pve",
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(json!({"stringData": {"tokenId": token_id}})),
        )
        .await
        .unwrap();
    create_image(&client, &ns, "img", &pve, "pve").await;
    let ctl = start(&sa, options(&rbac, "a", false));

    let gi = wait_for(
        &client,
        &ns,
        "img",
        "Stalled=True",
        Duration::from_secs(60),
        |gi| condition(gi, "Stalled").is_some_and(|c| c.0 == "True"),
    )
    .await;
    let (_, reason, message) = condition(&gi, "Stalled").unwrap();
    assert_eq!(reason, "InsufficientPrivileges", "{message}");
    assert!(message.contains("  VM.Audit on /vms: to "), "{message}");
    assert!(
        message.contains(&format!(
            "pveum acl modify /vms -token '{token_id}' -role Sombrero"
        )),
        "{message}"
    );
    assert!(!message.contains(&token_secret));
    let writes: Vec<_> = pve
        .requests()
        .await
        .into_iter()
        .filter(|r| r.token_id.as_deref() == Some(token_id.as_str()) && r.method != "GET")
        .collect();
    assert!(writes.is_empty(), "{writes:?}");
    assert!(pve_client(&pve).cluster_vms().await.unwrap().is_empty());
    ctl.abort();
    rbac.assert_nothing_denied();
}

#[tokio::test]
async fn proxmox_unreachable_is_reconciling_then_recovers() {
    let cp = control_plane();
    cp.install_crds();
    let client = cp.client().await;
    let ns = cp.namespace(&client, "ctl-down").await;
    let (rbac, sa) = controller_client(cp, &ns).await;
    let pve = FakePve::start().await;
    pve.fail(Failure::status(
        "GET",
        "/cluster/resources",
        503,
        "service unavailable",
    ))
    .await;
    put_secret(&client, &ns, "pve", &pve, &pve.token_secret).await;
    create_image(&client, &ns, "img", &pve, "pve").await;
    let ctl = start(&sa, options(&rbac, "a", false));

    let gi = wait_for(
        &client,
        &ns,
        "img",
        "Reconciling=True",
        Duration::from_secs(60),
        |gi| condition(gi, "Reconciling").is_some_and(|c| c.1 == "ProxmoxUnreachable"),
    )
    .await;
    assert!(
        condition(&gi, "Stalled").is_none(),
        "transient trouble is not Stalled"
    );
    let ev = wait_event(
        &client,
        &ns,
        "img",
        "ProxmoxUnreachable",
        "retrying with backoff",
    )
    .await;
    assert_eq!(ev.0, "Warning");

    pve.clear_failures().await;
    wait_for(
        &client,
        &ns,
        "img",
        "recovery",
        Duration::from_secs(60),
        |gi| {
            condition(gi, "Reconciling").is_none_or(|c| c.1 != "ProxmoxUnreachable")
                && gi
                    .status
                    .as_ref()
                    .is_some_and(|s| s.build.is_some() || s.latest.is_some())
        },
    )
    .await;
    ctl.abort();
    rbac.assert_nothing_denied();
}

#[tokio::test]
async fn two_replicas_elect_one_leader() {
    let cp = control_plane();
    cp.install_crds();
    let client = cp.client().await;
    let ns = cp.namespace(&client, "ctl-lease").await;
    let (rbac, sa) = controller_client(cp, &ns).await;
    let a = start(&sa, options(&rbac, "replica-a", true));
    let leases: Api<Lease> = Api::namespaced(client.clone(), &ns);
    let holder = |l: &Lease| l.spec.as_ref().and_then(|s| s.holder_identity.clone());
    let start_t = Instant::now();
    let first = loop {
        if let Ok(l) = leases.get(&rbac.lease_name).await
            && let Some(h) = holder(&l)
        {
            break h;
        }
        assert!(
            start_t.elapsed() < Duration::from_secs(30),
            "no leader elected"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(first, "replica-a");
    let b = start(&sa, options(&rbac, "replica-b", true));
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        holder(&leases.get(&rbac.lease_name).await.unwrap()).as_deref(),
        Some("replica-a")
    );
    assert!(!b.is_finished(), "the standby waits");

    // The leader goes away: the standby takes over once the Lease expires.
    a.abort();
    let start_t = Instant::now();
    loop {
        if holder(&leases.get(&rbac.lease_name).await.unwrap()).as_deref() == Some("replica-b") {
            break;
        }
        assert!(
            start_t.elapsed() < Duration::from_secs(60),
            "the standby never took over"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    b.abort();
    rbac.assert_nothing_denied();
}

#[tokio::test]
async fn apply_builds_validates_and_promotes() {
    let cp = control_plane();
    cp.install_crds();
    let client = cp.client().await;
    let ns = cp.namespace(&client, "ctl-flow").await;
    let (rbac, sa) = controller_client(cp, &ns).await;
    let pve = FakePve::start().await;
    put_secret(&client, &ns, "pve", &pve, &pve.token_secret).await;
    create_image(&client, &ns, "img", &pve, "pve").await;
    let ctl = start(&sa, options(&rbac, "a", false));
    let gi = wait_for(
        &client,
        &ns,
        "img",
        "Ready=True",
        Duration::from_secs(300),
        |gi| condition(gi, "Ready").is_some_and(|c| c.0 == "True"),
    )
    .await;
    let latest = gi.status.as_ref().unwrap().latest.clone().unwrap();
    let cm = Api::<ConfigMap>::namespaced(client.clone(), &ns)
        .get("img-template")
        .await
        .unwrap();
    assert_eq!(
        cm.metadata.labels.unwrap_or_default()["app.kubernetes.io/managed-by"],
        "sombrero",
        "the controller watches only ConfigMaps with its label"
    );
    assert_eq!(cm.data.unwrap()["template_id"], latest.vmid.to_string());

    // The controller applies the ConfigMap only when the watched one differs from what it
    // would write: an edited or deleted one is restored on the reconcile its watch event
    // triggers (well before the 300 s requeue).
    let cms = Api::<ConfigMap>::namespaced(client.clone(), &ns);
    let restored = |what: &'static str| {
        let cms = cms.clone();
        let want = latest.vmid.to_string();
        async move {
            let t = Instant::now();
            loop {
                let cm = cms.get_opt("img-template").await.unwrap();
                if cm
                    .as_ref()
                    .and_then(|c| c.data.as_ref())
                    .is_some_and(|d| d.get("template_id") == Some(&want))
                {
                    return;
                }
                assert!(
                    t.elapsed() < Duration::from_secs(30),
                    "ConfigMap not restored after {what}: {cm:?}"
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    };
    cms.patch(
        "img-template",
        &kube::api::PatchParams::default(),
        &kube::api::Patch::Merge(json!({"data": {"template_id": "1"}})),
    )
    .await
    .unwrap();
    restored("an edit").await;
    cms.delete("img-template", &DeleteParams::default())
        .await
        .unwrap();
    restored("a delete").await;

    // The parsed connection is reused while the Secret's version stays: a changed Secret takes
    // effect at once (a revoked token stalls), and so does the fix.
    put_secret(
        &client,
        &ns,
        "pve",
        &pve,
        "00000000-0000-0000-0000-000000000000",
    )
    .await;
    wait_for(
        &client,
        &ns,
        "img",
        "Stalled after the token changed",
        Duration::from_secs(30),
        |gi| condition(gi, "Stalled").is_some_and(|c| c.1 == "ProxmoxAuthFailed"),
    )
    .await;
    put_secret(&client, &ns, "pve", &pve, &pve.token_secret).await;
    wait_for(
        &client,
        &ns,
        "img",
        "Ready again after the fix",
        Duration::from_secs(30),
        |gi| {
            condition(gi, "Stalled").is_none()
                && condition(gi, "Ready").is_some_and(|c| c.0 == "True")
        },
    )
    .await;
    ctl.abort();
    rbac.assert_nothing_denied();
}

#[tokio::test]
async fn a_spec_change_promotes_a_new_version_and_keeps_the_old() {
    let cp = control_plane();
    cp.install_crds();
    let client = cp.client().await;
    let ns = cp.namespace(&client, "ctl-change").await;
    let (rbac, sa) = controller_client(cp, &ns).await;
    let pve = FakePve::start().await;
    put_secret(&client, &ns, "pve", &pve, &pve.token_secret).await;
    let uid = create_image(&client, &ns, "img", &pve, "pve")
        .await
        .uid()
        .unwrap();
    let ctl = start(&sa, options(&rbac, "a", false));
    let gi = wait_for(
        &client,
        &ns,
        "img",
        "Ready=True",
        Duration::from_secs(300),
        is_ready,
    )
    .await;
    let first = gi.status.as_ref().unwrap().latest.clone().unwrap();

    change_spec(&client, &ns, "img", 4).await;
    let gi = wait_for(
        &client,
        &ns,
        "img",
        "a second version promoted",
        Duration::from_secs(300),
        |gi| {
            observed(gi)
                && is_ready(gi)
                && latest_vmid(gi).is_some_and(|v| v != first.vmid)
                && condition(gi, "Reconciling").is_none()
        },
    )
    .await;
    let st = gi.status.clone().unwrap();
    let second = st.latest.clone().unwrap();
    assert_ne!(second.name, first.name);
    if second.build_date == first.build_date {
        assert_eq!(second.build_number, first.build_number + 1, "{st:#?}");
    }
    assert_ne!(second.spec_hash, first.spec_hash);
    assert!(second.validated_at.is_some(), "{second:?}");
    assert_eq!(condition(&gi, "Validated").unwrap().0, "True");
    assert_eq!(condition(&gi, "UpToDate").unwrap().0, "True");
    let listed: Vec<(u32, bool)> = st.versions.iter().map(|v| (v.vmid, v.latest)).collect();
    assert_eq!(listed, vec![(second.vmid, true), (first.vmid, false)]);

    // On Proxmox: both templates stay, only the new one carries the channel tag, nothing leaked.
    let vms = tagged_vms(&pve_client(&pve)).await;
    let mut both = vec![first.vmid, second.vmid];
    both.sort();
    assert_eq!(templates(&vms, &uid), both, "{vms:#?}");
    assert_eq!(holders(&vms, &uid), vec![second.vmid], "{vms:#?}");
    assert!(leftovers(&vms, &uid).is_empty(), "{vms:#?}");

    // The Terraform hand-off follows.
    let cm = Api::<ConfigMap>::namespaced(client.clone(), &ns)
        .get("img-template")
        .await
        .unwrap();
    let data = cm.data.unwrap();
    assert_eq!(data["template_id"], second.vmid.to_string());
    assert_eq!(data["template_name"], second.name);

    // `kubectl get gi` shows the new latest.
    let out = cp
        .kubectl()
        .args(["get", "gi", "img", "-n", &ns])
        .output()
        .expect("run kubectl");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().unwrap().split_whitespace().collect();
    assert_eq!(
        header,
        [
            "NAME",
            "OS",
            "LATEST",
            "VMID",
            "READY",
            "VALIDATED",
            "REASON",
            "STAGE",
            "AGE"
        ],
        "{text}"
    );
    let row: Vec<&str> = lines.next().unwrap().split_whitespace().collect();
    let vmid = second.vmid.to_string();
    assert_eq!(
        &row[..6],
        [
            "img",
            "ubuntu-24.04",
            second.name.as_str(),
            vmid.as_str(),
            "True",
            "True"
        ],
        "{text}"
    );

    // Events: why the build started, each stage, the promotion.
    wait_event(&client, &ns, "img", "BuildStarted", "SpecChanged").await;
    for stage in ["Source", "CreateVm", "Provision", "Convert", "Validate"] {
        wait_event(
            &client,
            &ns,
            "img",
            "StageFinished",
            &format!("stage {stage} finished"),
        )
        .await;
    }
    let promoted = wait_event(&client, &ns, "img", "Promoted", &vmid).await;
    assert_eq!(promoted.0, "Normal");
    ctl.abort();
    rbac.assert_nothing_denied();
}

#[tokio::test]
async fn a_failed_validation_keeps_the_previous_latest_and_does_not_loop() {
    let cp = control_plane();
    cp.install_crds();
    let client = cp.client().await;
    let ns = cp.namespace(&client, "ctl-vfail").await;
    let (rbac, sa) = controller_client(cp, &ns).await;
    let pve = FakePve::start().await;
    put_secret(&client, &ns, "pve", &pve, &pve.token_secret).await;
    let uid = create_image(&client, &ns, "img", &pve, "pve")
        .await
        .uid()
        .unwrap();
    let ctl = start(&sa, options(&rbac, "a", false));
    let gi = wait_for(
        &client,
        &ns,
        "img",
        "Ready=True",
        Duration::from_secs(300),
        is_ready,
    )
    .await;
    let first = latest_vmid(&gi).unwrap();

    // From now on cloud-init ends `degraded` in every new guest: the build accepts that (like
    // the seed, its `cloud-init status --wait` takes exit 2 in a fresh cloud image), the
    // validation does not (it wants `done`).
    pve.set_guest(
        None,
        GuestSettings {
            cloud_init: Some("degraded".into()),
            ..Default::default()
        },
    )
    .await;
    change_spec(&client, &ns, "img", 4).await;
    let gi = wait_for(
        &client,
        &ns,
        "img",
        "Validated=False",
        Duration::from_secs(300),
        |gi| {
            observed(gi)
                && condition(gi, "Validated").is_some_and(|c| c.0 == "False")
                && gi.status.as_ref().is_some_and(|s| s.build.is_none())
        },
    )
    .await;
    let (_, reason, message) = condition(&gi, "Validated").unwrap();
    assert_eq!(reason, "ValidationFailed");
    assert!(
        message.contains("cloudInit") && message.contains("degraded"),
        "the failing check is named: {message}"
    );
    assert_eq!(latest_vmid(&gi), Some(first), "the previous latest stays");
    assert!(is_ready(&gi), "the image still has a validated template");
    let st = gi.status.clone().unwrap();
    let report = st.last_validation.clone().unwrap();
    assert!(!report.passed);
    assert!(
        report
            .checks
            .iter()
            .any(|c| c.name == "cloudInit" && !c.passed),
        "{report:?}"
    );

    let vms = tagged_vms(&pve_client(&pve)).await;
    let all = templates(&vms, &uid);
    assert_eq!(all.len(), 2, "{vms:#?}");
    let failed = *all.iter().find(|v| **v != first).unwrap();
    assert_eq!(holders(&vms, &uid), vec![first], "{vms:#?}");
    let failed_vm = vms.iter().find(|v| v.vmid == failed).unwrap();
    assert!(
        failed_vm.tags.contains(FAILED_VALIDATION_TAG),
        "{failed_vm:?}"
    );
    assert!(leftovers(&vms, &uid).is_empty(), "{vms:#?}");
    let ev = wait_event(&client, &ns, "img", "ValidationFailed", "cloudInit").await;
    assert_eq!(ev.0, "Warning");

    // The same spec is not rebuilt: several requeues (5 s) and resyncs (2 s) later, still two
    // templates and two builds.
    tokio::time::sleep(Duration::from_secs(12)).await;
    let gi = Api::<GoldenImage>::namespaced(client.clone(), &ns)
        .get("img")
        .await
        .unwrap();
    assert!(
        gi.status.as_ref().unwrap().build.is_none(),
        "{:#?}",
        gi.status
    );
    let vms = tagged_vms(&pve_client(&pve)).await;
    assert_eq!(templates(&vms, &uid).len(), 2, "{vms:#?}");
    let started = events(&client, &ns, "img")
        .await
        .into_iter()
        .filter(|e| e.1 == "BuildStarted")
        .count();
    assert_eq!(started, 2, "{:#?}", events(&client, &ns, "img").await);
    ctl.abort();
    rbac.assert_nothing_denied();
}

#[tokio::test]
async fn a_controller_killed_mid_build_resumes_without_leaks() {
    let cp = control_plane();
    cp.install_crds();
    let client = cp.client().await;
    let ns = cp.namespace(&client, "ctl-kill").await;
    let (rbac, sa) = controller_client(cp, &ns).await;
    // Slow enough (1 PVE second = 50 ms) that a build is caught in flight.
    let pve = FakePve::start_with(PveOptions {
        time_scale: 0.05,
        ..Default::default()
    })
    .await;
    put_secret(&client, &ns, "pve", &pve, &pve.token_secret).await;
    let uid = create_image(&client, &ns, "img", &pve, "pve")
        .await
        .uid()
        .unwrap();
    let ctl = start(&sa, options(&rbac, "a", false));
    let gi = wait_for(
        &client,
        &ns,
        "img",
        "a build stage in flight",
        Duration::from_secs(120),
        |gi| {
            gi.status
                .as_ref()
                .and_then(|s| s.build.as_ref())
                .is_some_and(|b| ["CreateVm", "Provision", "Shutdown"].contains(&b.stage.as_str()))
        },
    )
    .await;
    let build = gi.status.unwrap().build.unwrap();
    ctl.abort();
    assert!(ctl.await.unwrap_err().is_cancelled());

    // Its build stopped with it: once a request in flight is answered, Proxmox hears nothing.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let seq = pve.requests().await.last().map(|r| r.seq).unwrap_or(0);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let after = pve.requests_since(seq).await;
    assert!(
        after.is_empty(),
        "the stopped controller's build still talks to Proxmox: {after:#?}"
    );

    let ctl = start(&sa, options(&rbac, "b", false));
    let gi = wait_for(
        &client,
        &ns,
        "img",
        "Ready=True after the restart",
        Duration::from_secs(300),
        |gi| is_ready(gi) && gi.status.as_ref().is_some_and(|s| s.build.is_none()),
    )
    .await;
    let latest = gi.status.as_ref().unwrap().latest.clone().unwrap();
    assert_eq!(gi.status.as_ref().unwrap().versions.len(), 1);
    let vms = tagged_vms(&pve_client(&pve)).await;
    assert_eq!(templates(&vms, &uid), vec![latest.vmid], "{vms:#?}");
    assert_eq!(holders(&vms, &uid), vec![latest.vmid], "{vms:#?}");
    assert!(leftovers(&vms, &uid).is_empty(), "leaked: {vms:#?}");
    assert_eq!(vms.len(), 1, "no other VM of ours: {vms:#?}");
    wait_event(
        &client,
        &ns,
        "img",
        "BuildStarted",
        &format!("ResumingBuild: build {}", build.id),
    )
    .await;
    ctl.abort();
    rbac.assert_nothing_denied();
}

/// An HTTP server answering every request with the current `body` (a checksum list that a
/// test changes, as a mirror publishing a new image does).
async fn serve_list(body: std::sync::Arc<std::sync::Mutex<String>>) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let text = body.lock().unwrap().clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf).await;
                let rsp = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{text}",
                    text.len()
                );
                let _ = s.write_all(rsp.as_bytes()).await;
            });
        }
    });
    format!("http://{addr}/Fedora-Cloud-41-1.4-x86_64-CHECKSUM")
}

/// A Fedora-style `CHECKSUM` list (PGP clear-signed, `#` size comments, BSD `SHA256 (file) =`
/// lines) for `file` with `hex`, next to another file's line.
fn fedora_list(file: &str, hex: &str) -> String {
    format!(
        "-----BEGIN PGP SIGNED MESSAGE-----\nHash: SHA256\n\n# Fedora-Cloud-Base-AmazonEC2.raw.xz: 398315764 bytes\nSHA256 (Fedora-Cloud-Base-AmazonEC2.raw.xz) = {}\n# {file}: 491716608 bytes\nSHA256 ({file}) = {hex}\n-----BEGIN PGP SIGNATURE-----\n\niQIzBAEBCAAdFiEEliQCCdEgFHiAGdjvBjJvQz2nPuMFAmcXbSAACgkQBjJvQz2n\n=abcd\n-----END PGP SIGNATURE-----\n",
        "0".repeat(64)
    )
}

/// The upstream-change check reads the list with the build's parser: a Fedora-style list is
/// understood (the status shows its checksum, no `SourceCheckFailed`), and a new checksum in
/// it starts a `SourceChanged` rebuild.
#[tokio::test]
async fn a_fedora_style_checksum_list_drives_the_source_check() {
    let cp = control_plane();
    cp.install_crds();
    let client = cp.client().await;
    let ns = cp.namespace(&client, "ctl-source").await;
    let (rbac, sa) = controller_client(cp, &ns).await;
    let pve = FakePve::start().await;
    put_secret(&client, &ns, "pve", &pve, &pve.token_secret).await;
    let img = pve
        .add_image(Image::new("Fedora-Cloud-Base-Generic-41-1.4.x86_64.qcow2").agent())
        .await;
    let hex = img.checksums["sha256"].clone();
    let list = std::sync::Arc::new(std::sync::Mutex::new(fedora_list(&img.filename, &hex)));
    let list_url = serve_list(list.clone()).await;
    create_image_with(
        &client,
        &ns,
        "img",
        &pve,
        "pve",
        json!({
            "source": {"cloudImage": {"url": img.url, "checksum": null, "checksumUrl": list_url}},
            "rebuild": {"onSourceChange": true, "sourceCheckInterval": "1s"},
        }),
    )
    .await;
    let ctl = start(&sa, options(&rbac, "a", false));
    let gi = wait_for(
        &client,
        &ns,
        "img",
        "Ready=True",
        Duration::from_secs(300),
        is_ready,
    )
    .await;
    let st = gi.status.clone().unwrap();
    let want = format!("sha256:{hex}");
    assert_eq!(
        st.source_checksum.as_deref(),
        Some(want.as_str()),
        "{st:#?}"
    );
    assert_eq!(
        st.latest
            .as_ref()
            .and_then(|l| l.source_checksum.as_deref()),
        Some(want.as_str())
    );
    // Same checksum upstream: no rebuild, no failed check.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let evs = events(&client, &ns, "img").await;
    assert!(!evs.iter().any(|e| e.1 == "SourceCheckFailed"), "{evs:#?}");
    assert_eq!(
        evs.iter().filter(|e| e.1 == "BuildStarted").count(),
        1,
        "{evs:#?}"
    );
    // The mirror publishes a new image: the next check sees it and rebuilds.
    *list.lock().unwrap() = fedora_list(&img.filename, &"a".repeat(64));
    wait_event(&client, &ns, "img", "BuildStarted", "SourceChanged").await;
    ctl.abort();
    rbac.assert_nothing_denied();
}

#[tokio::test]
async fn deleting_with_retain_leaves_the_templates() {
    let cp = control_plane();
    cp.install_crds();
    let client = cp.client().await;
    let ns = cp.namespace(&client, "ctl-retain").await;
    let (rbac, sa) = controller_client(cp, &ns).await;
    let pve = FakePve::start().await;
    put_secret(&client, &ns, "pve", &pve, &pve.token_secret).await;
    let uid = create_image(&client, &ns, "img", &pve, "pve")
        .await
        .uid()
        .unwrap();
    let ctl = start(&sa, options(&rbac, "a", false));
    let gi = wait_for(
        &client,
        &ns,
        "img",
        "Ready=True",
        Duration::from_secs(300),
        is_ready,
    )
    .await;
    let vmid = latest_vmid(&gi).unwrap();
    delete_and_wait(&client, &ns, "img").await;
    let vms = tagged_vms(&pve_client(&pve)).await;
    assert_eq!(templates(&vms, &uid), vec![vmid], "{vms:#?}");
    assert_eq!(
        holders(&vms, &uid),
        vec![vmid],
        "the template is left as it was"
    );
    wait_event(&client, &ns, "img", "TemplatesRetained", "Retain").await;
    ctl.abort();
    rbac.assert_nothing_denied();
}

#[tokio::test]
async fn deleting_with_delete_removes_unused_templates_and_keeps_a_cloned_one() {
    let cp = control_plane();
    cp.install_crds();
    let client = cp.client().await;
    let ns = cp.namespace(&client, "ctl-delete").await;
    let (rbac, sa) = controller_client(cp, &ns).await;
    let pve = FakePve::start().await;
    put_secret(&client, &ns, "pve", &pve, &pve.token_secret).await;
    let uid = create_image_with(
        &client,
        &ns,
        "img",
        &pve,
        "pve",
        json!({"deletionPolicy": "Delete"}),
    )
    .await
    .uid()
    .unwrap();
    let ctl = start(&sa, options(&rbac, "a", false));
    let gi = wait_for(
        &client,
        &ns,
        "img",
        "Ready=True",
        Duration::from_secs(300),
        is_ready,
    )
    .await;
    let first = latest_vmid(&gi).unwrap();
    change_spec(&client, &ns, "img", 4).await;
    let gi = wait_for(
        &client,
        &ns,
        "img",
        "a second version promoted",
        Duration::from_secs(300),
        |gi| is_ready(gi) && latest_vmid(gi).is_some_and(|v| v != first),
    )
    .await;
    let second = latest_vmid(&gi).unwrap();

    // A consumer's linked clone of the older template on LVM-thin (local-lvm): its disk is
    // `vm-N-disk-0`, naming no base; only the marker it copied tells where it comes from.
    let c = pve_client(&pve);
    let clone = 700;
    let upid = c
        .clone_vm(
            &pve.node,
            first,
            &proxmox::CloneRequest {
                full: Some(false),
                name: Some("consumer".into()),
                ..proxmox::CloneRequest::new(clone)
            },
        )
        .await
        .unwrap();
    c.wait_task(&upid, Duration::from_secs(60)).await.unwrap();

    let mut both = vec![first, second];
    both.sort_unstable();
    // A token that may not delete VMs (403 on the delete): the deletion is Stalled with the
    // privilege hint, not retried as transient; the object and its templates stay.
    pve.fail(Failure::status(
        "DELETE",
        "/nodes/{node}/qemu/{vmid}",
        403,
        "Permission check failed (/vms/0, VM.Allocate)",
    ))
    .await;
    let api: Api<GoldenImage> = Api::namespaced(client.clone(), &ns);
    api.delete("img", &DeleteParams::default())
        .await
        .expect("delete GoldenImage");
    let stalled_with = |reason: &'static str, hint: &'static str| {
        move |gi: &GoldenImage| {
            condition(gi, "Stalled")
                .is_some_and(|(s, r, m)| s == "True" && r == reason && m.contains(hint))
        }
    };
    wait_for(
        &client,
        &ns,
        "img",
        "Stalled on the refused delete",
        Duration::from_secs(60),
        stalled_with("ProxmoxForbidden", "grant the token the privileges"),
    )
    .await;
    assert_eq!(templates(&tagged_vms(&c).await, &uid), both);
    // A revoked token (401) while deleting: Stalled with the credential hint too. (The 403 stays
    // injected until the token is wrong, so no reconcile in between can finish the deletion.)
    put_secret(&client, &ns, "pve", &pve, "wrong-secret").await;
    wait_for(
        &client,
        &ns,
        "img",
        "Stalled on the refused token",
        Duration::from_secs(60),
        stalled_with("ProxmoxAuthFailed", "tokenId/tokenSecret"),
    )
    .await;
    assert_eq!(templates(&tagged_vms(&c).await, &uid), both);
    pve.clear_failures().await;
    // The fixed Secret lets the deletion finish.
    put_secret(&client, &ns, "pve", &pve, &pve.token_secret).await;
    let start = Instant::now();
    while api.get_opt("img").await.expect("get").is_some() {
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "not released after the Secret was fixed"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let vms = tagged_vms(&c).await;
    assert_eq!(templates(&vms, &uid), vec![first], "{vms:#?}");
    assert!(
        vms.iter()
            .any(|v| v.vmid == clone && v.ownership == Ownership::Foreign),
        "the consumer's clone is untouched: {vms:#?}"
    );
    assert!(!vms.iter().any(|v| v.vmid == second), "{vms:#?}");
    let ev = wait_event(
        &client,
        &ns,
        "img",
        "TemplatesDeleted",
        &format!("[{second}]"),
    )
    .await;
    assert!(
        ev.2.contains(&format!("{first} (in use by linked clones {clone})")),
        "{ev:?}"
    );
    ctl.abort();
    rbac.assert_nothing_denied();
}

#[tokio::test]
async fn a_leftover_validation_clone_goes_on_the_next_reconcile() {
    let cp = control_plane();
    cp.install_crds();
    let client = cp.client().await;
    let ns = cp.namespace(&client, "ctl-leftover").await;
    let (rbac, sa) = controller_client(cp, &ns).await;
    let pve = FakePve::start().await;
    put_secret(&client, &ns, "pve", &pve, &pve.token_secret).await;
    let uid = create_image(&client, &ns, "img", &pve, "pve")
        .await
        .uid()
        .unwrap();
    let ctl = start(&sa, options(&rbac, "a", false));
    let gi = wait_for(
        &client,
        &ns,
        "img",
        "Ready=True",
        Duration::from_secs(300),
        is_ready,
    )
    .await;
    let latest = latest_vmid(&gi).unwrap();

    // A validation clone a crashed run left (as validation makes them: our marker with role
    // validation written for 900, the validation tag), and a consumer's full clone of it (the
    // marker and tags copied: it names 900, not 901).
    let c = pve_client(&pve);
    let config = c.vm_config(&pve.node, latest).await.unwrap();
    let marker = parse_description(config.description.as_deref().unwrap())
        .unwrap()
        .unwrap()
        .retarget(Role::Validation, 900);
    let description = render_description("", &marker).unwrap();
    let tags = format!(
        "{OWNER_TAG};{};sombrero.{ns}.img",
        sombrero::validate::VALIDATION_TAG
    );
    for (vmid, name) in [(900, "sombrero-validate-100"), (901, "consumer")] {
        pve.add_vm(json!({
            "vmid": vmid, "name": name, "node": pve.node, "status": "running",
            "config": {"tags": tags, "description": description},
        }))
        .await;
    }
    assert_eq!(leftovers(&tagged_vms(&c).await, &uid), vec![900]);
    let start_t = Instant::now();
    loop {
        let vms = tagged_vms(&c).await;
        if leftovers(&vms, &uid).is_empty() {
            assert!(
                vms.iter()
                    .any(|v| v.vmid == 901 && v.ownership == Ownership::Foreign),
                "the consumer's clone stays: {vms:#?}"
            );
            assert_eq!(templates(&vms, &uid), vec![latest], "{vms:#?}");
            break;
        }
        assert!(
            start_t.elapsed() < Duration::from_secs(60),
            "the leftover validation clone is still there: {vms:#?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    wait_event(&client, &ns, "img", "LeftoverRemoved", "[900]").await;
    ctl.abort();
    rbac.assert_nothing_denied();
}

/// The finalizer checks the token's privileges before its first write: a token without
/// `VM.Allocate` cannot remove a leftover build VM nor (deletionPolicy Delete) a template, so the
/// deletion is Stalled (InsufficientPrivileges) naming the privilege and the VM's path, and
/// nothing is written; the full token lets it finish.
#[tokio::test]
async fn a_deletion_the_token_may_not_do_stalls_insufficient_privileges_before_any_write() {
    let cp = control_plane();
    cp.install_crds();
    let client = cp.client().await;
    let ns = cp.namespace(&client, "ctl-del-privs").await;
    let (rbac, sa) = controller_client(cp, &ns).await;
    let pve = FakePve::start().await;
    let role =
        sombrero::privileges::table::role_privileges(proxmox::PveVersion { major: 9, minor: 0 });
    let privs: Vec<&str> = role.into_iter().filter(|p| *p != "VM.Allocate").collect();
    let (token_id, token_secret) = pve.add_token(&privs).await;
    put_secret(&client, &ns, "pve", &pve, &token_secret).await;
    let secrets: Api<k8s_openapi::api::core::v1::Secret> = Api::namespaced(client.clone(), &ns);
    secrets
        .patch(
            "pve",
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(json!({"stringData": {"tokenId": token_id}})),
        )
        .await
        .unwrap();
    let gi = create_image_with(
        &client,
        &ns,
        "img",
        &pve,
        "pve",
        json!({"deletionPolicy": "Delete"}),
    )
    .await;
    let uid = gi.uid().unwrap();
    // A template of this image and a build VM a crashed run left (markers naming this object).
    for (vmid, role, template) in [(950, "template", true), (951, "build", false)] {
        let marker: sombrero::image::Marker = serde_json::from_value(json!({
            "schema": 1,
            "owner": {"namespace": ns, "name": "img", "uid": uid},
            "build_id": format!("b-{vmid}"), "role": role, "vmid": vmid,
            "metadata": {
                "name": format!("ubuntu-24.04-minimal-20250118-{:03}", vmid - 900),
                "os": "ubuntu-24.04", "type": "minimal", "builder": "sombrero",
                "builder_version": "0.1.0", "build_date": "2025-01-18",
                "build_number": vmid - 900, "spec_hash": "0123456789abcdef",
                "validation": {"status": "pending"},
            }
        }))
        .unwrap();
        pve.add_vm(json!({
            "vmid": vmid, "name": marker.metadata.name, "template": template,
            "config": {"tags": format!("{OWNER_TAG};sombrero.{ns}.img"),
                       "description": render_description("", &marker).unwrap()},
        }))
        .await;
    }
    let ctl = start(&sa, options(&rbac, "a", false));
    // The build is refused first (it needs VM.Allocate too); the finalizer is on by then.
    wait_for(
        &client,
        &ns,
        "img",
        "the build refused",
        Duration::from_secs(60),
        |gi| {
            condition(gi, "Stalled")
                .is_some_and(|(s, r, _)| s == "True" && r == "InsufficientPrivileges")
                && gi
                    .metadata
                    .finalizers
                    .as_ref()
                    .is_some_and(|f| !f.is_empty())
        },
    )
    .await;
    let api: Api<GoldenImage> = Api::namespaced(client.clone(), &ns);
    api.delete("img", &DeleteParams::default())
        .await
        .expect("delete GoldenImage");
    let gi = wait_for(
        &client,
        &ns,
        "img",
        "the deletion Stalled on the leftover build VM",
        Duration::from_secs(60),
        |gi| {
            condition(gi, "Stalled").is_some_and(|(s, _, m)| s == "True" && m.contains("/vms/951"))
        },
    )
    .await;
    let (_, reason, message) = condition(&gi, "Stalled").unwrap();
    assert_eq!(reason, "InsufficientPrivileges", "{message}");
    assert!(
        message.contains("  VM.Allocate on /vms/951: to destroy leftover build VMs"),
        "{message}"
    );
    assert!(!message.contains(&token_secret));
    let writes: Vec<_> = pve
        .requests()
        .await
        .into_iter()
        .filter(|r| r.token_id.as_deref() == Some(token_id.as_str()) && r.method != "GET")
        .collect();
    assert!(writes.is_empty(), "{writes:?}");
    let c = pve_client(&pve);
    assert!(c.vm_status(&pve.node, 950).await.is_ok());
    assert!(c.vm_status(&pve.node, 951).await.is_ok());
    // The full token: the deletion finishes, both go.
    put_secret(&client, &ns, "pve", &pve, &pve.token_secret).await;
    let start_t = Instant::now();
    while api.get_opt("img").await.expect("get").is_some() {
        assert!(
            start_t.elapsed() < Duration::from_secs(120),
            "not released after the Secret was fixed"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    for vmid in [950, 951] {
        assert!(
            c.vm_status(&pve.node, vmid).await.is_err(),
            "{vmid} is left"
        );
    }
    ctl.abort();
    rbac.assert_nothing_denied();
}

/// Text logs written to a pipe (a pod's stdout) carry no colour codes.
#[test]
fn text_logs_to_a_pipe_have_no_colour_codes() {
    let home = std::env::temp_dir().join(format!("sombrero-ansi-{}", std::process::id()));
    std::fs::create_dir_all(&home).unwrap();
    // No kubeconfig and not in a pod: the controller logs why it cannot start, and exits.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_sombrero"))
        .args(["controller", "--log-format", "text"])
        .env("HOME", &home)
        .env("KUBECONFIG", home.join("missing"))
        .env_remove("KUBERNETES_SERVICE_HOST")
        .env_remove("KUBERNETES_SERVICE_PORT")
        .env_remove("RUST_LOG")
        .output()
        .expect("run sombrero controller");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success());
    assert!(text.contains("cannot reach Kubernetes"), "{text:?}");
    assert!(!text.contains('\x1b'), "colour codes in {text:?}");
    let _ = std::fs::remove_dir_all(&home);
}

/// Peak resident memory (`VmHWM`, KiB) of process `pid`.
fn peak_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM in /proc/<pid>/status")
}

/// Starts `sombrero controller` as the chart's ServiceAccount on `ns`, waits until it reacted to
/// the Secret `pve` being created (so it listed and watched the namespace's Secrets), and
/// answers its peak memory.
async fn start_peak(client: &Client, ns: &str, kubeconfig: &std::path::Path, lease: &str) -> u64 {
    use k8s_openapi::api::core::v1::Secret;
    let secrets: Api<Secret> = Api::namespaced(client.clone(), ns);
    let _ = secrets.delete("pve", &DeleteParams::default()).await;
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_sombrero"))
        .args([
            "controller",
            "--namespace",
            ns,
            "--controller-namespace",
            ns,
            "--leader-election",
            "false",
            "--lease-name",
            lease,
            "--metrics-addr",
            "127.0.0.1:0",
            "--identity",
            "memory",
        ])
        .env("KUBECONFIG", kubeconfig)
        .env_remove("RUST_LOG")
        .env_remove("PROXMOX_URL")
        .stdout(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("start sombrero controller");
    let pid = child.id().unwrap();
    let missing = |gi: &GoldenImage| {
        condition(gi, "Stalled")
            .is_some_and(|c| c.2.contains("Secret") && c.2.contains("does not exist"))
    };
    // This process found the Secret missing (the status of an earlier run said otherwise).
    wait_for(
        client,
        ns,
        "img",
        "Stalled: Secret missing",
        Duration::from_secs(60),
        missing,
    )
    .await;
    let secret = Secret {
        metadata: kube::api::ObjectMeta {
            name: Some("pve".into()),
            ..Default::default()
        },
        string_data: Some(
            [
                ("url", "https://127.0.0.1:1"),
                ("tokenId", "a@pve!t"),
                ("tokenSecret", "s"),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        ),
        ..Default::default()
    };
    secrets
        .create(&Default::default(), &secret)
        .await
        .expect("create Secret");
    // The Secret watch wakes the image: Proxmox (nothing listening) is unreachable now.
    wait_for(
        client,
        ns,
        "img",
        "Reconciling: Proxmox unreachable",
        Duration::from_secs(60),
        |gi| condition(gi, "Reconciling").is_some_and(|c| c.1 == "ProxmoxUnreachable"),
    )
    .await;
    let peak = peak_kib(pid);
    child.kill().await.expect("stop the controller");
    peak
}

#[tokio::test]
async fn many_large_unrelated_secrets_do_not_raise_the_start_peak() {
    use k8s_openapi::ByteString;
    use k8s_openapi::api::core::v1::Secret;
    use kube::api::{ListParams, PostParams};
    let cp = control_plane();
    cp.install_crds();
    let client = cp.client().await;
    let ns = cp.namespace(&client, "ctl-mem").await;
    let (rbac, _sa) = controller_client(cp, &ns).await;
    let kubeconfig = support::controller::kubeconfig_as(cp, &rbac);
    let gi: GoldenImage = serde_json::from_value(json!({
        "apiVersion": "images.sombrero.dev/v1alpha1",
        "kind": "GoldenImage",
        "metadata": {"name": "img"},
        "spec": {
            "proxmox": {"secretRef": {"name": "pve"}},
            "os": "ubuntu-24.04",
            "type": "minimal",
            "source": {"cloudImage": {"url": "https://images.invalid/noble.img", "checksum": format!("sha256:{}", "0".repeat(64))}},
            "placement": {"node": "pve1"},
        }
    }))
    .unwrap();
    Api::<GoldenImage>::namespaced(client.clone(), &ns)
        .create(&PostParams::default(), &gi)
        .await
        .expect("create GoldenImage");

    let baseline = start_peak(&client, &ns, &kubeconfig, &rbac.lease_name).await;

    // 100 Secrets of 1 MB each that no GoldenImage references.
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns);
    let blob = ByteString(vec![b'x'; 1_000_000]);
    for i in 0..100 {
        let s = Secret {
            metadata: kube::api::ObjectMeta {
                name: Some(format!("unrelated-{i}")),
                labels: Some([("test".to_string(), "filler".to_string())].into()),
                ..Default::default()
            },
            data: Some([("blob".to_string(), blob.clone())].into()),
            ..Default::default()
        };
        secrets
            .create(&PostParams::default(), &s)
            .await
            .expect("create filler Secret");
    }
    let loaded = start_peak(&client, &ns, &kubeconfig, &rbac.lease_name).await;
    secrets
        .delete_collection(
            &DeleteParams::default(),
            &ListParams::default().labels("test=filler"),
        )
        .await
        .expect("delete the filler Secrets");
    eprintln!("start peak: {baseline} KiB without, {loaded} KiB with 100 MB of unrelated Secrets");
    // Caching the Secrets' data costs over 100 MB (the list's JSON and the decoded data); the
    // metadata of 100 Secrets a few hundred KB.
    assert!(
        loaded * 2 <= baseline * 3,
        "start peak {loaded} KiB with the Secrets vs {baseline} KiB without: over 1.5x"
    );
}

#[tokio::test]
async fn an_image_with_a_253_character_name_gets_its_events() {
    use kube::api::PostParams;
    let cp = control_plane();
    cp.install_crds();
    let client = cp.client().await;
    let ns = cp.namespace(&client, "ctl-long").await;
    let (rbac, sa) = controller_client(cp, &ns).await;
    // The longest name Kubernetes allows; kube's Recorder would name its Events over 253.
    let name = format!("img-{}", "x".repeat(249));
    assert_eq!(name.len(), 253);
    let gi: GoldenImage = serde_json::from_value(json!({
        "apiVersion": "images.sombrero.dev/v1alpha1",
        "kind": "GoldenImage",
        "metadata": {"name": name},
        "spec": {
            "proxmox": {"secretRef": {"name": "missing"}},
            "os": "ubuntu-24.04",
            "type": "minimal",
            "source": {"cloudImage": {"url": "https://images.invalid/noble.img", "checksum": format!("sha256:{}", "0".repeat(64))}},
            "placement": {"node": "pve1"},
        }
    }))
    .unwrap();
    Api::<GoldenImage>::namespaced(client.clone(), &ns)
        .create(&PostParams::default(), &gi)
        .await
        .expect("create GoldenImage");
    let ctl = start(&sa, options(&rbac, "a", false));
    wait_for(
        &client,
        &ns,
        &name,
        "Stalled=True",
        Duration::from_secs(60),
        |gi| condition(gi, "Stalled").is_some_and(|c| c.0 == "True"),
    )
    .await;
    let ev = wait_event(
        &client,
        &ns,
        &name,
        "ProxmoxConnectionInvalid",
        "does not exist",
    )
    .await;
    assert_eq!(ev.0, "Warning");
    ctl.abort();
    rbac.assert_nothing_denied();
}
