//! End-to-end tests of the GoldenImage controller's states that need a person: the output
//! ConfigMap describes the latest template and stays stable while another build runs; a first
//! template that fails validation stalls the object until the spec changes; a guest command
//! that keeps failing is retried a bounded number of times, then stalls. The controller runs
//! in-process against a real kube-apiserver (tests/support/kube.rs) and the fake Proxmox
//! (tests/support/fakepve.rs), set up as in tests/integration/controller.rs: as the chart's ServiceAccount
//! (tests/support/rbac.rs), not cluster-admin, and each test fails if any request was refused.

use crate::support;

use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, Patch, PatchParams};
use kube::{Client, ResourceExt};
use serde_json::json;
use sombrero::api::GoldenImage;
use sombrero::image::marker::{Marker, parse_description};
use sombrero::promote::output::run_uuid;
use support::controller::{
    change_spec, condition, controller_client, create_image_with, events, is_ready, observed,
    options, put_secret, pve_client, start, wait_for,
};
use support::fakepve::{CommandFailure, FakePve, GuestSettings};
use support::kube::control_plane;

async fn get(client: &Client, ns: &str, name: &str) -> GoldenImage {
    Api::<GoldenImage>::namespaced(client.clone(), ns)
        .get(name)
        .await
        .expect("get GoldenImage")
}

async fn count_events(client: &Client, ns: &str, name: &str, reason: &str) -> usize {
    events(client, ns, name)
        .await
        .iter()
        .filter(|e| e.1 == reason)
        .count()
}

/// How often Events of `reason` about `name` happened: the recorder folds a repeat (same
/// reason and related object) into a series of the first Event, so its count counts.
async fn occurrences(client: &Client, ns: &str, name: &str, reason: &str) -> i32 {
    Api::<k8s_openapi::api::core::v1::Event>::namespaced(client.clone(), ns)
        .list(&kube::api::ListParams::default().fields(&format!("involvedObject.name={name}")))
        .await
        .expect("list Events")
        .items
        .iter()
        .filter(|e| e.reason.as_deref() == Some(reason))
        .map(|e| {
            let series = e.series.as_ref().and_then(|s| s.count).unwrap_or(0);
            series.max(e.count.unwrap_or(0)).max(1)
        })
        .sum()
}

/// The marker in the description of VM `vmid`, as Proxmox holds it.
async fn marker(pve: &FakePve, node: &str, vmid: u32) -> Marker {
    let config = pve_client(pve).vm_config(node, vmid).await.unwrap();
    parse_description(config.description.as_deref().unwrap_or(""))
        .unwrap()
        .expect("the template carries our marker")
}

async fn config_map(client: &Client, ns: &str, name: &str) -> ConfigMap {
    Api::<ConfigMap>::namespaced(client.clone(), ns)
        .get(name)
        .await
        .expect("get the output ConfigMap")
}

fn manifest(cm: &ConfigMap) -> serde_json::Value {
    serde_json::from_str(&cm.data.as_ref().unwrap()["manifest.json"]).unwrap()
}

#[tokio::test]
async fn the_config_map_describes_the_latest_and_changes_only_when_a_promotion_lands() {
    let cp = control_plane();
    cp.install_crds();
    let client = cp.client().await;
    let ns = cp.namespace(&client, "st-cm").await;
    let (rbac, sa) = controller_client(cp, &ns).await;
    let pve = FakePve::start().await;
    put_secret(&client, &ns, "pve", &pve, &pve.token_secret).await;
    let uid = create_image_with(&client, &ns, "img", &pve, "pve", json!({}))
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
        |gi| is_ready(gi) && gi.status.as_ref().is_some_and(|s| s.build.is_none()),
    )
    .await;
    let first = gi.status.unwrap().latest.unwrap();
    let first_marker = marker(&pve, &first.node, first.vmid).await;

    // The ConfigMap is the promote module's hand-off for the latest template's marker.
    let cm = config_map(&client, &ns, "img-template").await;
    let data = cm.data.clone().unwrap();
    assert_eq!(
        data,
        sombrero::promote::config_map_data(first.vmid, &first.node, &first_marker)
    );
    let m = manifest(&cm);
    let uuid = run_uuid(&uid, &first_marker.build_id);
    assert_eq!(m["last_run_uuid"], uuid, "{m:#}");
    let b = &m["builds"][0];
    assert_eq!(b["packer_run_uuid"], uuid, "{m:#}");
    assert_eq!(b["artifact_id"], first.vmid.to_string());
    let cd = &b["custom_data"];
    assert_eq!(cd["build_id"], first_marker.build_id.as_str());
    assert_eq!(cd["os"], "ubuntu-24.04");
    assert_eq!(cd["type"], "minimal");
    assert_eq!(cd["build_date"], first.build_date.as_str());
    assert_eq!(cd["build_number"], format!("{:03}", first.build_number));
    assert_eq!(
        cd["spec_hash"],
        first.spec_hash.as_deref().unwrap(),
        "{m:#}"
    );
    assert_eq!(
        cd["source_checksum"],
        first.source_checksum.as_deref().unwrap(),
        "{m:#}"
    );
    assert!(cd["validated_at"].is_string(), "{m:#}");

    // Stable at steady state: several requeues (5 s) and resyncs (2 s) later, not rewritten.
    tokio::time::sleep(Duration::from_secs(7)).await;
    let again = config_map(&client, &ns, "img-template").await;
    assert_eq!(again.data, cm.data);
    assert_eq!(again.resource_version(), cm.resource_version());

    // A new build does not change it while it runs (slowed down to be seen: 1 PVE s = 50 ms).
    pve.set_time_scale(0.05).await;
    change_spec(&client, &ns, "img", 4).await;
    let gi = wait_for(
        &client,
        &ns,
        "img",
        "the new build in flight",
        Duration::from_secs(120),
        |gi| gi.status.as_ref().and_then(|s| s.build.as_ref()).is_some(),
    )
    .await;
    let build_id = gi.status.unwrap().build.unwrap().id;
    assert_ne!(build_id, first_marker.build_id);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let during = config_map(&client, &ns, "img-template").await;
    assert!(
        get(&client, &ns, "img")
            .await
            .status
            .unwrap()
            .build
            .is_some(),
        "the build still runs (else the check above proves nothing)"
    );
    assert_eq!(during.data, cm.data, "unchanged while the build runs");

    // The promotion lands: the ConfigMap names the new template and its build.
    pve.set_time_scale(0.0).await;
    let gi = wait_for(
        &client,
        &ns,
        "img",
        "the new template promoted",
        Duration::from_secs(300),
        |gi| {
            gi.status
                .as_ref()
                .and_then(|s| s.latest.as_ref())
                .is_some_and(|l| l.vmid != first.vmid)
        },
    )
    .await;
    let second = gi.status.unwrap().latest.unwrap();
    let start_t = Instant::now();
    let cm = loop {
        let cm = config_map(&client, &ns, "img-template").await;
        if cm.data.as_ref().unwrap()["template_id"] == second.vmid.to_string() {
            break cm;
        }
        assert!(
            start_t.elapsed() < Duration::from_secs(30),
            "the ConfigMap still names the old template: {:?}",
            cm.data
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    let m = manifest(&cm);
    assert_eq!(m["last_run_uuid"], run_uuid(&uid, &build_id), "{m:#}");
    assert_eq!(m["builds"][0]["custom_data"]["build_id"], build_id.as_str());
    let second_marker = marker(&pve, &second.node, second.vmid).await;
    assert_eq!(
        cm.data.unwrap(),
        sombrero::promote::config_map_data(second.vmid, &second.node, &second_marker)
    );
    ctl.abort();
    rbac.assert_nothing_denied();
}

#[tokio::test]
async fn a_first_template_failing_validation_stalls_until_a_passing_spec_change() {
    let cp = control_plane();
    cp.install_crds();
    let client = cp.client().await;
    let ns = cp.namespace(&client, "st-vfail").await;
    let (rbac, sa) = controller_client(cp, &ns).await;
    let pve = FakePve::start().await;
    put_secret(&client, &ns, "pve", &pve, &pve.token_secret).await;
    // cloud-init ends `degraded` in every guest: the build accepts it, the validation does not.
    pve.set_guest(
        None,
        GuestSettings {
            cloud_init: Some("degraded".into()),
            ..Default::default()
        },
    )
    .await;
    create_image_with(&client, &ns, "img", &pve, "pve", json!({})).await;
    let ctl = start(&sa, options(&rbac, "a", false));

    let gi = wait_for(
        &client,
        &ns,
        "img",
        "Stalled=True",
        Duration::from_secs(300),
        |gi| observed(gi) && condition(gi, "Stalled").is_some_and(|c| c.0 == "True"),
    )
    .await;
    let (_, reason, message) = condition(&gi, "Stalled").unwrap();
    assert_eq!(reason, "ValidationFailed", "{message}");
    let failed = gi.status.as_ref().unwrap().versions[0].clone();
    for part in [
        failed.name.as_str(),
        &failed.vmid.to_string(),
        "cloudInit",
        "degraded",
        "no earlier template serves",
        "change the spec",
        "request a rebuild",
    ] {
        assert!(message.contains(part), "{part:?} in {message}");
    }
    let (ready, ready_reason, ready_message) = condition(&gi, "Ready").unwrap();
    assert_eq!(
        (ready.as_str(), ready_reason.as_str()),
        ("False", "ValidationFailed"),
        "{ready_message}"
    );
    assert!(
        ready_message.contains("no earlier template serves"),
        "{ready_message}"
    );
    assert_eq!(condition(&gi, "Validated").unwrap().0, "False");
    let up_to_date = condition(&gi, "UpToDate").unwrap();
    assert_eq!(
        (up_to_date.0.as_str(), up_to_date.1.as_str()),
        ("False", "ValidationFailed")
    );
    assert!(condition(&gi, "Reconciling").is_none(), "{:#?}", gi.status);
    assert!(gi.status.as_ref().unwrap().latest.is_none());

    // It stays so: nothing rebuilds the same spec.
    tokio::time::sleep(Duration::from_secs(7)).await;
    let gi = get(&client, &ns, "img").await;
    assert_eq!(condition(&gi, "Stalled").unwrap().1, "ValidationFailed");
    assert_eq!(count_events(&client, &ns, "img", "BuildStarted").await, 1);

    // The image is fixed and the spec changed: a new build passes, Stalled goes, Ready.
    pve.set_guest(
        None,
        GuestSettings {
            cloud_init: Some("done".into()),
            ..Default::default()
        },
    )
    .await;
    change_spec(&client, &ns, "img", 4).await;
    let gi = wait_for(
        &client,
        &ns,
        "img",
        "Ready=True after the spec change",
        Duration::from_secs(300),
        |gi| observed(gi) && is_ready(gi),
    )
    .await;
    assert!(condition(&gi, "Stalled").is_none(), "{:#?}", gi.status);
    assert_eq!(condition(&gi, "Validated").unwrap().0, "True");
    let latest = gi.status.as_ref().unwrap().latest.clone().unwrap();
    assert_ne!(latest.vmid, failed.vmid);
    ctl.abort();
    rbac.assert_nothing_denied();
}

#[tokio::test]
async fn a_guest_command_that_keeps_failing_stalls_after_three_attempts() {
    let cp = control_plane();
    cp.install_crds();
    let client = cp.client().await;
    let ns = cp.namespace(&client, "st-retry").await;
    let (rbac, sa) = controller_client(cp, &ns).await;
    let pve = FakePve::start().await;
    put_secret(&client, &ns, "pve", &pve, &pve.token_secret).await;
    pve.set_guest(
        None,
        GuestSettings {
            failures: Some(vec![CommandFailure::new(
                "^echo provision-step",
                1,
                "E: mirror sync in progress",
            )]),
            ..Default::default()
        },
    )
    .await;
    create_image_with(
        &client,
        &ns,
        "img",
        &pve,
        "pve",
        json!({"provisioning": {"commands": ["echo provision-step"]}}),
    )
    .await;
    let ctl = start(&sa, options(&rbac, "a", false));

    // Attempts 1 and 2 are retried with backoff (5 s, 10 s); the third failure stalls.
    let gi = wait_for(
        &client,
        &ns,
        "img",
        "Stalled=True",
        Duration::from_secs(300),
        |gi| condition(gi, "Stalled").is_some_and(|c| c.0 == "True"),
    )
    .await;
    let (_, reason, message) = condition(&gi, "Stalled").unwrap();
    assert_eq!(reason, "ProvisioningFailed", "{message}");
    for part in [
        "Provision",
        "echo provision-step",
        "E: mirror sync in progress",
        "3 failed attempts",
        "fix the spec or request a rebuild",
    ] {
        assert!(message.contains(part), "{part:?} in {message}");
    }
    assert_eq!(condition(&gi, "Ready").unwrap().0, "False");
    assert!(condition(&gi, "Reconciling").is_none(), "{:#?}", gi.status);
    assert_eq!(count_events(&client, &ns, "img", "BuildStarted").await, 3);
    let retried = events(&client, &ns, "img")
        .await
        .into_iter()
        .filter(|e| e.1 == "ProvisioningFailed" && e.2.contains("retrying with backoff"))
        .count();
    assert_eq!(retried, 2, "{:#?}", events(&client, &ns, "img").await);

    // No fourth attempt: well past the next backoff (20 s) still three builds.
    tokio::time::sleep(Duration::from_secs(25)).await;
    let gi = get(&client, &ns, "img").await;
    assert_eq!(condition(&gi, "Stalled").unwrap().1, "ProvisioningFailed");
    assert_eq!(count_events(&client, &ns, "img", "BuildStarted").await, 3);

    // The mirror is fine again and a rebuild is requested: it builds, and the object is Ready.
    pve.set_guest(
        None,
        GuestSettings {
            failures: Some(vec![]),
            ..Default::default()
        },
    )
    .await;
    Api::<GoldenImage>::namespaced(client.clone(), &ns)
        .patch(
            "img",
            &PatchParams::default(),
            &Patch::Merge(
                json!({"metadata": {"annotations": {"images.sombrero.dev/rebuild": "1"}}}),
            ),
        )
        .await
        .expect("request a rebuild");
    let gi = wait_for(
        &client,
        &ns,
        "img",
        "Ready=True after the rebuild request",
        Duration::from_secs(300),
        is_ready,
    )
    .await;
    assert!(condition(&gi, "Stalled").is_none(), "{:#?}", gi.status);
    assert_eq!(count_events(&client, &ns, "img", "BuildStarted").await, 4);
    ctl.abort();
    rbac.assert_nothing_denied();
}

#[tokio::test]
async fn an_unreachable_checksum_url_is_retried_not_stalled() {
    let cp = control_plane();
    cp.install_crds();
    let client = cp.client().await;
    let ns = cp.namespace(&client, "st-sums").await;
    let (rbac, sa) = controller_client(cp, &ns).await;
    let pve = FakePve::start().await;
    put_secret(&client, &ns, "pve", &pve, &pve.token_secret).await;
    // A port nothing listens on: the mirror is down.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let sums = format!("http://127.0.0.1:{port}/SHA256SUMS");
    create_image_with(
        &client,
        &ns,
        "img",
        &pve,
        "pve",
        json!({"source": {"cloudImage": {"checksum": null, "checksumUrl": sums}},
               "rebuild": {"onSourceChange": false}}),
    )
    .await;
    let ctl = start(&sa, options(&rbac, "a", false));
    let gi = wait_for(
        &client,
        &ns,
        "img",
        "Reconciling=True (RetryingBuild)",
        Duration::from_secs(120),
        |gi| condition(gi, "Reconciling").is_some_and(|c| c.1 == "RetryingBuild"),
    )
    .await;
    assert!(condition(&gi, "Stalled").is_none(), "{:#?}", gi.status);
    let (_, _, message) = condition(&gi, "Reconciling").unwrap();
    assert!(
        message.contains("checksumUrl") && message.contains(&sums),
        "{message}"
    );
    // The stage is named once, not "build failed in stage Source: build failed in stage Source".
    assert_eq!(message.matches("failed in stage").count(), 1, "{message}");
    let evs = events(&client, &ns, "img").await;
    let failed: Vec<_> = evs.iter().filter(|e| e.1 == "SourceUnavailable").collect();
    assert!(!failed.is_empty(), "{evs:#?}");
    for e in &failed {
        assert_eq!(e.2.matches("failed in stage").count(), 1, "{}", e.2);
        assert!(e.2.contains("retrying with backoff"), "{}", e.2);
    }
    assert!(
        !evs.iter().any(|e| e.1 == "ChecksumMismatch"),
        "a fetch error is no checksum mismatch: {evs:#?}"
    );
    ctl.abort();
    rbac.assert_nothing_denied();
}

#[tokio::test]
async fn a_promoted_build_is_never_resumed_from_the_cached_status() {
    let cp = control_plane();
    cp.install_crds();
    let client = cp.client().await;
    let ns = cp.namespace(&client, "st-once").await;
    let (rbac, sa) = controller_client(cp, &ns).await;
    let pve = FakePve::start().await;
    put_secret(&client, &ns, "pve", &pve, &pve.token_secret).await;
    // The promotion writes the output ConfigMap, then the status: the ConfigMap's watch event
    // queues a reconcile that may get the object from the cache as it was during the build.
    // Several images make that race likely; each must build and promote exactly once.
    let names = ["one", "two", "three"];
    for name in names {
        create_image_with(&client, &ns, name, &pve, "pve", json!({})).await;
    }
    let ctl = start(&sa, options(&rbac, "a", false));
    for name in names {
        wait_for(
            &client,
            &ns,
            name,
            "Ready=True",
            Duration::from_secs(300),
            is_ready,
        )
        .await;
    }
    // Well past several reconciles (poll 1 s, requeue 5 s) after the last promotion.
    tokio::time::sleep(Duration::from_secs(12)).await;
    for name in names {
        let evs = events(&client, &ns, name).await;
        for reason in ["BuildStarted", "Promoted"] {
            assert_eq!(
                occurrences(&client, &ns, name, reason).await,
                1,
                "{name}: {reason}: {evs:#?}"
            );
        }
        assert!(
            !evs.iter().any(|e| e.2.contains("ResumingBuild")),
            "{name}: {evs:#?}"
        );
        let gi = get(&client, &ns, name).await;
        let st = gi.status.as_ref().unwrap();
        assert!(st.build.is_none(), "{name}: {:#?}", gi.status);
        assert_eq!(st.versions.len(), 1, "{name}: {:#?}", gi.status);
        assert!(is_ready(&gi));
    }
    ctl.abort();
    rbac.assert_nothing_denied();
}
