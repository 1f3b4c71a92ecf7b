//! End-to-end tests of `sombrero controller`: the controller runs in-process (as a tokio task)
//! against a real kube-apiserver (tests/support/kube.rs) and the fake Proxmox
//! (tests/support/fakepve.rs).

mod support;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::Client;
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::json;
use sombrero::api::GoldenImage;
use sombrero::api::common::find_condition;
use sombrero::controller::{
    self, Options, builds::Limits, connection::DefaultConnection, context::Settings,
};
use support::fakepve::{Failure, FakePve, Image};
use support::kube::control_plane;

fn options(ns: &str, identity: &str, leader_election: bool) -> Options {
    let mut settings = Settings::new(DefaultConnection::None);
    settings.resync = Duration::from_secs(2);
    settings.requeue = Duration::from_secs(5);
    settings.poll = Duration::from_secs(1);
    Options {
        namespace: Some(ns.to_string()),
        metrics_addr: "127.0.0.1:0".parse().unwrap(),
        leader_election,
        lease_name: "sombrero-test".into(),
        controller_namespace: ns.to_string(),
        identity: identity.to_string(),
        limits: Limits {
            global: 4,
            per_node: 2,
        },
        settings,
        concurrency: 4,
    }
}

fn start(client: &Client, opts: Options) -> tokio::task::JoinHandle<Result<(), String>> {
    let client = client.clone();
    tokio::spawn(async move {
        controller::run(client, opts, Arc::new(controller::engine::Engine)).await
    })
}

async fn put_secret(client: &Client, ns: &str, name: &str, pve: &FakePve, token_secret: &str) {
    let mut data = BTreeMap::new();
    data.insert("url".to_string(), pve.url.clone());
    data.insert("tokenId".to_string(), pve.token_id.clone());
    data.insert("tokenSecret".to_string(), token_secret.to_string());
    data.insert("caCert".to_string(), pve.ca_pem.clone());
    let secret = Secret {
        metadata: kube::api::ObjectMeta {
            name: Some(name.into()),
            ..Default::default()
        },
        string_data: Some(data),
        ..Default::default()
    };
    let api: Api<Secret> = Api::namespaced(client.clone(), ns);
    let mut v = serde_json::to_value(&secret).unwrap();
    v["apiVersion"] = json!("v1");
    v["kind"] = json!("Secret");
    api.patch(
        name,
        &PatchParams::apply("sombrero-tests").force(),
        &Patch::Apply(v),
    )
    .await
    .expect("apply Secret");
}

async fn create_image(
    client: &Client,
    ns: &str,
    name: &str,
    pve: &FakePve,
    secret: &str,
) -> GoldenImage {
    let img = pve
        .add_image(Image::new(&format!("{name}.qcow2")).agent())
        .await;
    let gi: GoldenImage = serde_json::from_value(json!({
        "apiVersion": "images.sombrero.dev/v1alpha1",
        "kind": "GoldenImage",
        "metadata": {"name": name},
        "spec": {
            "proxmox": {"secretRef": {"name": secret}},
            "os": "ubuntu-24.04",
            "type": "minimal",
            "source": {"cloudImage": {"url": img.url, "checksum": format!("sha256:{}", img.checksums["sha256"])}},
            "placement": {"node": pve.node},
            "provisioning": {"via": "guestAgent"},
            "validation": {"checks": ["boot", "guestAgent", "cloudInit", "packageDrift"], "timeout": "10m"},
            "output": {"configMapName": format!("{name}-template")},
        }
    }))
    .unwrap();
    Api::<GoldenImage>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &gi)
        .await
        .expect("create GoldenImage")
}

/// Waits until `check` holds for the object's conditions; panics with the last status.
async fn wait_for(
    client: &Client,
    ns: &str,
    name: &str,
    what: &str,
    timeout: Duration,
    check: impl Fn(&GoldenImage) -> bool,
) -> GoldenImage {
    let api: Api<GoldenImage> = Api::namespaced(client.clone(), ns);
    let start = Instant::now();
    loop {
        let gi = api.get(name).await.expect("get GoldenImage");
        if check(&gi) {
            return gi;
        }
        if start.elapsed() > timeout {
            panic!("timed out waiting for {what}; status: {:#?}", gi.status);
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

fn condition(gi: &GoldenImage, type_: &str) -> Option<(String, String, String)> {
    let st = gi.status.as_ref()?;
    find_condition(&st.conditions, type_)
        .map(|c| (c.status.clone(), c.reason.clone(), c.message.clone()))
}

#[tokio::test]
async fn a_wrong_token_stalls_and_a_fixed_secret_recovers() {
    let cp = control_plane();
    cp.install_crds();
    let client = cp.client().await;
    let ns = cp.namespace(&client, "ctl-token").await;
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
    let ctl = start(&client, options(&ns, "a", false));

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
}

#[tokio::test]
async fn proxmox_unreachable_is_reconciling_then_recovers() {
    let cp = control_plane();
    cp.install_crds();
    let client = cp.client().await;
    let ns = cp.namespace(&client, "ctl-down").await;
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
    let ctl = start(&client, options(&ns, "a", false));

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
}

#[tokio::test]
async fn two_replicas_elect_one_leader() {
    let cp = control_plane();
    cp.install_crds();
    let client = cp.client().await;
    let ns = cp.namespace(&client, "ctl-lease").await;
    let a = start(&client, options(&ns, "replica-a", true));
    let leases: Api<Lease> = Api::namespaced(client.clone(), &ns);
    let holder = |l: &Lease| l.spec.as_ref().and_then(|s| s.holder_identity.clone());
    let start_t = Instant::now();
    let first = loop {
        if let Ok(l) = leases.get("sombrero-test").await
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
    let b = start(&client, options(&ns, "replica-b", true));
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        holder(&leases.get("sombrero-test").await.unwrap()).as_deref(),
        Some("replica-a")
    );
    assert!(!b.is_finished(), "the standby waits");

    // The leader goes away: the standby takes over once the Lease expires.
    a.abort();
    let start_t = Instant::now();
    loop {
        if holder(&leases.get("sombrero-test").await.unwrap()).as_deref() == Some("replica-b") {
            break;
        }
        assert!(
            start_t.elapsed() < Duration::from_secs(60),
            "the standby never took over"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    b.abort();
}

#[tokio::test]
async fn apply_builds_validates_and_promotes() {
    let cp = control_plane();
    cp.install_crds();
    let client = cp.client().await;
    let ns = cp.namespace(&client, "ctl-flow").await;
    let pve = FakePve::start().await;
    put_secret(&client, &ns, "pve", &pve, &pve.token_secret).await;
    create_image(&client, &ns, "img", &pve, "pve").await;
    let ctl = start(&client, options(&ns, "a", false));
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
    assert_eq!(cm.data.unwrap()["template_id"], latest.vmid.to_string());
    ctl.abort();
}
