//! The controller finishes a build whose process died after `Finalize` and whose
//! `status.build` was lost too: it must validate and promote that template, never build a
//! second one. The crash state is made with `sombrero::builder::run_build` (what the controller's
//! job runs first) before the controller starts; then the controller runs in-process against a
//! real kube-apiserver and the fake Proxmox, as in tests/integration/controller.rs.

use crate::support;

use std::time::Duration;

use kube::ResourceExt;
use kube::api::{Api, PostParams};
use serde_json::json;
use sombrero::api::GoldenImage;
use sombrero::builder::{BuildRequest, NoProgress};
use sombrero::image::marker::{Owner, Role, ValidationRecord, ownership, parse_description};
use sombrero::image::tags::{OWNER_TAG, TagSet};
use sombrero::proxmox;
use support::controller::{
    controller_client, events, is_ready, options, put_secret, pve_client, start, wait_for,
};
use support::fakepve::{FakePve, Image};
use support::kube::control_plane;

/// (vmid, role, validation, tags) of the image's VMs written for their own VMID.
async fn ours(c: &proxmox::Client, uid: &str) -> Vec<(u32, Role, ValidationRecord, TagSet)> {
    let mut out = Vec::new();
    for vm in c.cluster_vms().await.unwrap() {
        let tags = TagSet::parse(vm.tags.as_deref().unwrap_or(""));
        if !vm.is_qemu() || !tags.contains(OWNER_TAG) {
            continue;
        }
        let config = c.vm_config(&vm.node, vm.vmid).await.unwrap();
        let Some(m) = parse_description(config.description.as_deref().unwrap_or(""))
            .ok()
            .flatten()
        else {
            continue;
        };
        if ownership(Some(&m), vm.vmid).is_ours() && m.owner.uid == uid {
            out.push((vm.vmid, m.role, m.metadata.validation.clone(), tags));
        }
    }
    out.sort_by_key(|v| v.0);
    out
}

#[tokio::test]
async fn a_template_finished_before_a_crash_is_validated_and_promoted_not_rebuilt() {
    let cp = control_plane();
    cp.install_crds();
    let client = cp.client().await;
    let ns = cp.namespace(&client, "ctl-resume").await;
    // The controller runs with the chart's ServiceAccount permissions, not cluster-admin.
    let (rbac, sa) = controller_client(cp, &ns).await;
    let pve = FakePve::start().await;
    let c = pve_client(&pve);
    put_secret(&client, &ns, "pve", &pve, &pve.token_secret).await;
    let img = pve.add_image(Image::new("resume.qcow2").agent()).await;
    let gi: GoldenImage = serde_json::from_value(json!({
        "apiVersion": "images.sombrero.dev/v1alpha1",
        "kind": "GoldenImage",
        "metadata": {"name": "img"},
        "spec": {
            "proxmox": {"secretRef": {"name": "pve"}},
            "os": "ubuntu-24.04",
            "type": "minimal",
            "source": {"cloudImage": {"url": img.url, "checksum": format!("sha256:{}", img.checksums["sha256"])}},
            "placement": {"node": pve.node},
            "provisioning": {"via": "guestAgent"},
            "validation": {"checks": ["boot", "guestAgent", "cloudInit", "packageDrift"], "timeout": "10m"},
        }
    }))
    .unwrap();
    let api: Api<GoldenImage> = Api::namespaced(client.clone(), &ns);
    let gi = api.create(&PostParams::default(), &gi).await.unwrap();
    let owner = Owner {
        namespace: ns.clone(),
        name: gi.name_any(),
        uid: gi.uid().unwrap(),
    };

    // The job of a controller that then died: the build ran to the end (Finalize), nothing
    // after it (no validation, no promotion, no status).
    let built = sombrero::builder::run_build(
        &c,
        &BuildRequest {
            spec: gi.spec.clone(),
            owner: owner.clone(),
            build_id: "b-before-the-crash".into(),
            today: chrono::Utc::now().date_naive(),
            adopt_unvalidated: true,
            fresh_id: false,
        },
        &NoProgress,
    )
    .await
    .unwrap();
    let before = ours(&c, &owner.uid).await;
    assert_eq!(before.len(), 1, "{before:?}");
    assert_eq!(before[0].2, ValidationRecord::Pending);

    let ctl = start(&sa, options(&rbac, "resume", false));
    let gi = wait_for(
        &client,
        &ns,
        "img",
        "Ready",
        Duration::from_secs(300),
        is_ready,
    )
    .await;
    ctl.abort();

    let st = gi.status.unwrap();
    assert_eq!(st.latest.as_ref().map(|l| l.vmid), Some(built.vmid));
    // Validated with the baseline read back from the marker (packageDrift passed).
    let report = st.last_validation.expect("a validation report");
    assert!(report.passed, "{report:?}");
    let after = ours(&c, &owner.uid).await;
    assert_eq!(
        after.len(),
        1,
        "a second template or a leftover VM: {after:?}"
    );
    let (vmid, role, validation, tags) = &after[0];
    assert_eq!((*vmid, *role), (built.vmid, Role::Template));
    assert!(validation.validated_at().is_some(), "{validation:?}");
    assert!(tags.is_latest(), "{tags:?}");
    let events = events(&client, &ns, "img").await;
    assert!(
        events
            .iter()
            .any(|(_, reason, message)| reason == "BuildStarted"
                && message.starts_with("ValidationPending")),
        "{events:?}"
    );
    rbac.assert_nothing_denied();
}
