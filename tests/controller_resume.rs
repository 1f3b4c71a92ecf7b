//! The controller finishes a build whose process died after `Finalize` and whose
//! `status.build` was lost too: it must validate and promote that template, never build a
//! second one. The crash state is made with `sombrero::build::run_build` (what the controller's
//! job runs first) before the controller starts; then the controller runs in-process against a
//! real kube-apiserver and the fake Proxmox, as in tests/controller.rs.

mod support;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Event, Secret};
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use serde_json::json;
use sombrero::api::GoldenImage;
use sombrero::api::common::find_condition;
use sombrero::build::{BuildRequest, NoProgress};
use sombrero::controller::{
    self, Options, builds::Limits, connection::DefaultConnection, context::Settings,
};
use sombrero::image::marker::{Owner, Role, ValidationRecord, ownership, parse_description};
use sombrero::image::tags::{OWNER_TAG, TagSet};
use sombrero::proxmox;
use support::fakepve::{FakePve, Image};
use support::kube::control_plane;
use support::rbac::{ChartRbac, install_chart_rbac};

/// The controller as the chart runs it: its Lease the one the chart's Role names, in the
/// release namespace (here the test's namespace).
fn options(rbac: &ChartRbac) -> Options {
    let ns = &rbac.namespace;
    let mut settings = Settings::new(DefaultConnection::None);
    settings.resync = Duration::from_secs(2);
    settings.requeue = Duration::from_secs(5);
    settings.poll = Duration::from_secs(1);
    Options {
        namespace: Some(ns.to_string()),
        metrics_addr: "127.0.0.1:0".parse().unwrap(),
        leader_election: false,
        lease_name: rbac.lease_name.clone(),
        controller_namespace: rbac.namespace.clone(),
        identity: "resume".into(),
        limits: Limits {
            global: 4,
            per_node: 2,
        },
        settings,
        concurrency: 4,
    }
}

fn pve_client(pve: &FakePve) -> proxmox::Client {
    let config = proxmox::Config::new(&pve.url, &pve.token_id, pve.token_secret.as_str())
        .unwrap()
        .with_ca_pem(pve.ca_pem.clone())
        .unwrap();
    proxmox::Client::new(config).unwrap()
}

async fn put_secret(client: &Client, ns: &str, pve: &FakePve) {
    let data: BTreeMap<String, String> = [
        ("url", pve.url.clone()),
        ("tokenId", pve.token_id.clone()),
        ("tokenSecret", pve.token_secret.clone()),
        ("caCert", pve.ca_pem.clone()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let secret = Secret {
        metadata: kube::api::ObjectMeta {
            name: Some("pve".into()),
            ..Default::default()
        },
        string_data: Some(data),
        ..Default::default()
    };
    let mut v = serde_json::to_value(&secret).unwrap();
    v["apiVersion"] = json!("v1");
    v["kind"] = json!("Secret");
    Api::<Secret>::namespaced(client.clone(), ns)
        .patch(
            "pve",
            &PatchParams::apply("sombrero-tests").force(),
            &Patch::Apply(v),
        )
        .await
        .expect("apply Secret");
}

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
    let rbac = install_chart_rbac(cp, &ns, &ns);
    let sa = rbac.client(cp).await;
    let pve = FakePve::start().await;
    let c = pve_client(&pve);
    put_secret(&client, &ns, &pve).await;
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
    let built = sombrero::build::run_build(
        &c,
        &BuildRequest {
            spec: gi.spec.clone(),
            owner: owner.clone(),
            build_id: "b-before-the-crash".into(),
            today: chrono::Utc::now().date_naive(),
            adopt_unvalidated: true,
        },
        &NoProgress,
    )
    .await
    .unwrap();
    let before = ours(&c, &owner.uid).await;
    assert_eq!(before.len(), 1, "{before:?}");
    assert_eq!(before[0].2, ValidationRecord::Pending);

    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            std::env::var("RUST_LOG").unwrap_or_else(|_| "sombrero=info,kube=warn".into()),
        )
        .with_test_writer()
        .try_init();
    let kube = sa.clone();
    let opts = options(&rbac);
    let ctl = tokio::spawn(async move {
        controller::run(kube, opts, Arc::new(controller::engine::Engine)).await
    });
    let start = Instant::now();
    let gi = loop {
        let gi = api.get("img").await.unwrap();
        let ready = gi
            .status
            .as_ref()
            .and_then(|s| find_condition(&s.conditions, "Ready"))
            .is_some_and(|c| c.status == "True");
        if ready {
            break gi;
        }
        assert!(
            start.elapsed() < Duration::from_secs(300),
            "not Ready: {:#?}",
            gi.status
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
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
    let events = Api::<Event>::namespaced(client.clone(), &ns)
        .list(&ListParams::default().fields("involvedObject.name=img"))
        .await
        .unwrap()
        .items;
    assert!(
        events
            .iter()
            .any(|e| e.reason.as_deref() == Some("BuildStarted")
                && e.message
                    .as_deref()
                    .unwrap_or("")
                    .starts_with("ValidationPending")),
        "{:?}",
        events
            .iter()
            .map(|e| (e.reason.clone(), e.message.clone()))
            .collect::<Vec<_>>()
    );
    rbac.assert_nothing_denied();
}
