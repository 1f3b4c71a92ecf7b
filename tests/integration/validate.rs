//! Validation and promotion against the fake Proxmox VE (tests/support/fakepve.rs).

use crate::support;

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use sombrero::api::golden_image::{SshBuild, Validation};
use sombrero::image::marker::{
    Marker, Owner, ValidationRecord, parse_description, render_description,
};
use sombrero::image::tags::{FAILED_VALIDATION_TAG, LATEST_TAG, VALIDATED_TAG, image_tag};
use sombrero::promote::{self, Evidence};
use sombrero::proxmox::{Client, Config, RetryPolicy};
use sombrero::validate::{
    self, Check, NoProgress, ProgressEvent, SshProbe, VALIDATION_TAG, ValidationRequest,
};
use support::fakepve::{FakePve, GuestSettings};

fn client(pve: &FakePve) -> Client {
    let config = Config::new(&pve.url, &pve.token_id, pve.token_secret.as_str())
        .unwrap()
        .with_ca_pem(pve.ca_pem.clone())
        .unwrap()
        .with_timeout(Duration::from_secs(20))
        .with_retry(RetryPolicy {
            max_attempts: 3,
            initial_delay: Duration::from_millis(20),
            max_delay: Duration::from_millis(200),
        });
    Client::new(config).unwrap()
}

fn owner(name: &str) -> Owner {
    Owner {
        namespace: "platform".into(),
        name: name.into(),
        uid: format!("uid-{name}"),
    }
}

/// A marker as the build writes it on a template (JSON, so fields added later default).
fn marker(owner: &Owner, role: &str, vmid: u32, build_number: u16, validation: Value) -> Marker {
    serde_json::from_value(json!({
        "schema": 1,
        "owner": owner,
        "build_id": format!("b-{build_number}"),
        "role": role,
        "vmid": vmid,
        "metadata": {
            "name": format!("ubuntu-24.04-minimal-20250118-{build_number:03}"),
            "os": "ubuntu-24.04", "type": "minimal", "builder": "sombrero",
            "builder_version": "0.1.0", "build_date": "2025-01-18", "build_number": build_number,
            "spec_hash": "0123456789abcdef", "validation": validation,
        }
    }))
    .unwrap()
}

fn description(m: &Marker) -> String {
    render_description("Notes by the platform team.", m).unwrap()
}

fn image_tags(owner: &Owner, extra: &[&str]) -> String {
    let mut t = vec![
        "sombrero".to_string(),
        image_tag(&owner.namespace, &owner.name),
        "os.ubuntu-24.04".into(),
        "type.minimal".into(),
    ];
    t.extend(extra.iter().map(|s| s.to_string()));
    t.join(";")
}

/// A template of ours in the fake: the default Ubuntu contents (with or without the agent).
async fn add_template(
    pve: &FakePve,
    owner: &Owner,
    vmid: u32,
    agent: bool,
    extra_tags: &[&str],
    validation: Value,
) {
    let m = marker(owner, "template", vmid, (vmid % 1000) as u16, validation);
    pve.add_vm(json!({
        "vmid": vmid, "name": m.metadata.name, "template": true, "agent": agent,
        "config": {
            "agent": "1", "description": description(&m), "tags": image_tags(owner, extra_tags),
            "net0": "virtio=BC:24:11:00:00:01,bridge=vmbr0", "memory": 2048, "cores": 2,
        },
    }))
    .await;
}

fn request(
    pve: &FakePve,
    owner: &Owner,
    template: u32,
    baseline: Vec<String>,
) -> ValidationRequest {
    let mut req = ValidationRequest::new(
        template,
        pve.node.clone(),
        owner.clone(),
        Validation::default(),
    );
    req.ssh = SshBuild {
        ip_config: format!("ip={}/8", pve.guest_ip(20)),
        host: None,
        port: pve.ssh_port.expect("the harness serves SSH"),
        user: "sombrero".into(),
    };
    req.ssh_probe = SshProbe::Login;
    req.baseline_packages = baseline;
    req.agent_timeout = Duration::from_secs(20);
    req
}

async fn vmids(client: &Client) -> Vec<u32> {
    let mut v: Vec<u32> = client
        .cluster_vms()
        .await
        .unwrap()
        .iter()
        .map(|vm| vm.vmid)
        .collect();
    v.sort_unstable();
    v
}

async fn tags_of(client: &Client, node: &str, vmid: u32) -> Vec<String> {
    client.vm_config(node, vmid).await.unwrap().tag_list()
}

async fn marker_of(client: &Client, node: &str, vmid: u32) -> Marker {
    let c = client.vm_config(node, vmid).await.unwrap();
    parse_description(c.description.as_deref().unwrap_or(""))
        .unwrap()
        .unwrap()
}

/// Templates of the image carrying the channel tag.
async fn holders(client: &Client, owner: &Owner) -> Vec<u32> {
    let tag = image_tag(&owner.namespace, &owner.name);
    let mut v: Vec<u32> = client
        .cluster_vms()
        .await
        .unwrap()
        .into_iter()
        .filter(|vm| {
            vm.template
                && vm.tag_list().contains(&tag)
                && vm.tag_list().iter().any(|t| t == LATEST_TAG)
        })
        .map(|vm| vm.vmid)
        .collect();
    v.sort_unstable();
    v
}

#[tokio::test]
async fn all_checks_pass_on_a_good_template_and_the_clone_is_destroyed() {
    let pve = FakePve::start().await;
    let c = client(&pve);
    let o = owner("ubuntu");
    add_template(&pve, &o, 9000, true, &[], json!({"status": "pending"})).await;
    let baseline = pve.guest(9000).await.packages();
    let req = request(&pve, &o, 9000, baseline);
    let events = std::sync::Mutex::new(Vec::new());
    let progress = |e: &ProgressEvent| events.lock().unwrap().push(e.clone());
    let report = validate::validate_template(&c, &req, &progress)
        .await
        .expect("validation runs");

    let names: Vec<&str> = report.checks.iter().map(|c| c.check.as_str()).collect();
    assert_eq!(
        names,
        ["boot", "guestAgent", "cloudInit", "ssh", "packageDrift"]
    );
    assert!(report.passed, "{:#?}", report.checks);
    assert!(
        report
            .check(Check::Ssh)
            .unwrap()
            .message
            .contains("logged in"),
        "{:?}",
        report.check(Check::Ssh)
    );
    assert!(report.drift.as_ref().unwrap().is_clean());
    let clone = report.clone_vmid.expect("a clone was made");
    assert_ne!(clone, 9000);
    assert_eq!(vmids(&c).await, [9000], "the clone is destroyed");

    // The guest ran what the checks say, and the SSH login really happened.
    let cmds = pve.agent_commands(clone).await;
    assert!(
        cmds.iter()
            .any(|c| c.line() == "cloud-init status --wait" && c.via == "agent"),
        "{cmds:#?}"
    );
    assert!(cmds.iter().any(|c| c.line().starts_with("dpkg-query -W")));
    assert!(
        cmds.iter()
            .any(|c| c.via == "ssh" && c.command.last().map(String::as_str) == Some("true")),
        "{cmds:#?}"
    );
    // The clone was born with our marker and got the validation tag, and not the channel tags.
    let reqs = pve.requests().await;
    let clone_req = reqs
        .iter()
        .find(|r| r.method == "POST" && r.path.ends_with("/qemu/9000/clone"))
        .unwrap();
    let d = clone_req.params["description"].as_str().unwrap();
    let m = parse_description(d).unwrap().unwrap();
    assert_eq!((m.vmid, m.role), (clone, sombrero::image::Role::Validation));
    let cfg_req = reqs
        .iter()
        .find(|r| r.method == "PUT" && r.path.ends_with(&format!("/qemu/{clone}/config")))
        .unwrap();
    let tags = cfg_req.params["tags"].as_str().unwrap();
    assert!(
        tags.contains(VALIDATION_TAG) && !tags.contains(LATEST_TAG),
        "{tags}"
    );
    assert!(
        cfg_req.params["sshkeys"]
            .as_str()
            .unwrap()
            .contains("sombrero-validation")
    );

    let status: sombrero::api::golden_image::ValidationReport = (&report).into();
    assert!(status.passed && status.checks.len() == 5 && status.vmid == 9000);
    let ev = events.lock().unwrap();
    assert!(
        matches!(
            ev.first(),
            Some(ProgressEvent::CloneCreated { linked: true, .. })
        ),
        "{ev:?}"
    );
    assert!(matches!(
        ev.last(),
        Some(ProgressEvent::CloneDestroyed { .. })
    ));
    assert_eq!(
        ev.iter()
            .filter(|e| matches!(e, ProgressEvent::CheckFinished(_)))
            .count(),
        5
    );
}

#[tokio::test]
async fn cloud_init_error_fails_cloud_init_and_the_clone_still_goes() {
    let pve = FakePve::start().await;
    let c = client(&pve);
    let o = owner("ubuntu");
    add_template(&pve, &o, 9000, true, &[], json!({"status": "pending"})).await;
    pve.set_guest(
        None,
        GuestSettings {
            cloud_init: Some("error".into()),
            ..Default::default()
        },
    )
    .await;
    let baseline = pve.guest(9000).await.packages();
    let report = validate::validate_template(&c, &request(&pve, &o, 9000, baseline), &NoProgress)
        .await
        .unwrap();
    assert!(!report.passed);
    let ci = report.check(Check::CloudInit).unwrap();
    assert!(!ci.passed);
    assert!(
        ci.message.contains("cloud-init status: error"),
        "{}",
        ci.message
    );
    assert_eq!(report.first_failure().unwrap().check, Check::CloudInit);
    assert!(
        report.summary().starts_with("cloudInit failed"),
        "{}",
        report.summary()
    );
    assert!(
        report.check(Check::Boot).unwrap().passed
            && report.check(Check::GuestAgent).unwrap().passed
    );
    assert_eq!(vmids(&c).await, [9000]);
}

#[tokio::test]
async fn an_extra_package_fails_drift_unless_allowed() {
    let pve = FakePve::start().await;
    let c = client(&pve);
    let o = owner("ubuntu");
    add_template(&pve, &o, 9000, true, &[], json!({"status": "pending"})).await;
    let installed = pve.guest(9000).await.packages();
    assert!(installed.contains(&"curl".to_string()));
    // The baseline lacks curl (an extra in the image) and names vim (missing from it).
    let mut baseline: Vec<String> = installed.iter().filter(|p| *p != "curl").cloned().collect();
    baseline.push("vim".into());
    let mut req = request(&pve, &o, 9000, baseline.clone());
    req.spec.checks = vec!["packageDrift".into()];
    let report = validate::validate_template(&c, &req, &NoProgress)
        .await
        .unwrap();
    assert!(!report.passed);
    let d = report.drift.as_ref().unwrap();
    assert_eq!(
        (d.added.as_slice(), d.removed.as_slice()),
        (&["curl".to_string()][..], &["vim".to_string()][..])
    );
    let msg = &report.check(Check::PackageDrift).unwrap().message;
    assert!(
        msg.contains("1 added: curl") && msg.contains("1 removed: vim"),
        "{msg}"
    );
    assert_eq!(report.checks.len(), 1, "only the listed checks run");

    baseline.retain(|p| p != "vim");
    let mut req = request(&pve, &o, 9000, baseline);
    req.spec.checks = vec!["packageDrift".into()];
    req.spec.allowed_extra_packages = vec!["curl".into()];
    let report = validate::validate_template(&c, &req, &NoProgress)
        .await
        .unwrap();
    assert!(report.passed, "{:?}", report.checks);
    assert_eq!(vmids(&c).await, [9000]);
}

#[tokio::test]
async fn no_agent_in_the_image_fails_guest_agent_fast_and_the_dependants_say_why() {
    let pve = FakePve::start().await;
    let c = client(&pve);
    let o = owner("ubuntu");
    add_template(&pve, &o, 9000, false, &[], json!({"status": "pending"})).await;
    let mut req = request(&pve, &o, 9000, vec!["bash".into()]);
    req.agent_timeout = Duration::from_secs(2);
    let started = Instant::now();
    let report = validate::validate_template(&c, &req, &NoProgress)
        .await
        .unwrap();
    let took = started.elapsed();
    assert!(took < Duration::from_secs(15), "took {took:?}");
    assert!(!report.passed);
    assert!(report.check(Check::Boot).unwrap().passed);
    let ga = report.check(Check::GuestAgent).unwrap();
    assert!(
        !ga.passed && ga.message.contains("did not answer within 2s"),
        "{}",
        ga.message
    );
    for check in [Check::CloudInit, Check::Ssh, Check::PackageDrift] {
        let o = report.check(check).unwrap();
        assert!(
            !o.passed && o.message.starts_with("not run: needs the guest agent"),
            "{check}: {}",
            o.message
        );
        assert!(
            o.duration < Duration::from_millis(500),
            "{check} waited {:?}",
            o.duration
        );
    }
    assert_eq!(vmids(&c).await, [9000]);
}

#[tokio::test]
async fn leftover_validation_clones_are_cleaned_and_consumer_clones_untouched() {
    let pve = FakePve::start().await;
    let c = client(&pve);
    let o = owner("ubuntu");
    add_template(
        &pve,
        &o,
        9000,
        true,
        &[],
        json!({"status": "passed", "at": "2025-01-18T10:00:00Z"}),
    )
    .await;
    let tags = format!("{};{VALIDATION_TAG}", image_tags(&o, &[]));
    // A validation clone of a run that crashed: our marker written for its own VMID.
    let leftover = marker(&o, "validation", 9500, 1, json!({"status": "pending"}));
    pve.add_vm(
        json!({"vmid": 9500, "name": "sombrero-validate-9000", "status": "running",
        "config": {"description": description(&leftover), "tags": tags}}),
    )
    .await;
    // A consumer's clone of the template: the marker was copied, it names VM 9000.
    let copied = marker(&o, "template", 9000, 0, json!({"status": "pending"}));
    pve.add_vm(
        json!({"vmid": 9501, "name": "sombrero-validate-9000", "status": "running",
        "config": {"description": description(&copied), "tags": tags}}),
    )
    .await;
    // A validation clone of another image, and a VM without any marker.
    let other = marker(
        &owner("debian"),
        "validation",
        9502,
        1,
        json!({"status": "pending"}),
    );
    pve.add_vm(json!({"vmid": 9502, "name": "sombrero-validate-7000",
        "config": {"description": description(&other), "tags": tags}}))
        .await;
    pve.add_vm(json!({"vmid": 9503, "name": "sombrero-validate-1", "config": {"tags": tags}}))
        .await;
    // A second cluster's clone of a same-named image: namespace and name equal, another uid.
    let twin = Owner {
        uid: "uid-of-another-cluster".into(),
        ..o.clone()
    };
    let theirs = marker(&twin, "validation", 9505, 1, json!({"status": "pending"}));
    pve.add_vm(
        json!({"vmid": 9505, "name": "sombrero-validate-9000", "status": "running",
        "config": {"description": description(&theirs), "tags": tags}}),
    )
    .await;

    let destroyed = validate::cleanup_stale_validation_vms(&c, &o)
        .await
        .unwrap();
    assert_eq!(destroyed, [9500]);
    assert_eq!(vmids(&c).await, [9000, 9501, 9502, 9503, 9505]);
    // Idempotent.
    assert!(
        validate::cleanup_stale_validation_vms(&c, &o)
            .await
            .unwrap()
            .is_empty()
    );
    // destroy_validation_vm refuses a VM whose marker names another VMID.
    assert!(
        !validate::destroy_validation_vm(&c, &pve.node, 9501)
            .await
            .unwrap()
    );
    assert_eq!(vmids(&c).await, [9000, 9501, 9502, 9503, 9505]);

    // A validation run also clears leftovers first.
    let again = marker(&o, "validation", 9504, 1, json!({"status": "pending"}));
    pve.add_vm(json!({"vmid": 9504, "name": "sombrero-validate-9000",
        "config": {"description": description(&again), "tags": tags}}))
        .await;
    let mut req = request(&pve, &o, 9000, vec![]);
    req.spec.checks = vec!["boot".into()];
    let report = validate::validate_template(&c, &req, &NoProgress)
        .await
        .unwrap();
    assert!(report.passed);
    assert_eq!(vmids(&c).await, [9000, 9501, 9502, 9503, 9505]);
}

#[tokio::test]
async fn validating_a_vm_that_is_not_ours_is_refused() {
    let pve = FakePve::start().await;
    let c = client(&pve);
    let o = owner("ubuntu");
    let copied = marker(&o, "template", 9000, 1, json!({"status": "pending"}));
    pve.add_vm(
        json!({"vmid": 9100, "template": true, "config": {"description": description(&copied)}}),
    )
    .await;
    let err = validate::validate_template(&c, &request(&pve, &o, 9100, vec![]), &NoProgress)
        .await
        .unwrap_err();
    assert_eq!(err.category(), "not_ours", "{err}");
    assert!(!err.is_retryable());
    assert_eq!(vmids(&c).await, [9100], "nothing was cloned");
    let mut req = request(&pve, &o, 9100, vec![]);
    req.spec.timeout = "soon".into();
    let err = validate::validate_template(&c, &req, &NoProgress)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("validation.timeout"), "{err}");
}

/// A template of `o` holding the channel: validated and tagged latest.
async fn add_latest(pve: &FakePve, o: &Owner, vmid: u32) {
    add_template(
        pve,
        o,
        vmid,
        true,
        &[LATEST_TAG, VALIDATED_TAG],
        json!({"status": "passed", "at": "2025-01-17T10:00:00Z"}),
    )
    .await;
}

#[tokio::test]
async fn promotion_moves_the_channel_tag_to_exactly_one_template() {
    let pve = FakePve::start().await;
    let c = client(&pve);
    let node = pve.node.clone();
    let o = owner("ubuntu");
    add_latest(&pve, &o, 9001).await;
    add_template(&pve, &o, 9002, true, &[], json!({"status": "pending"})).await;
    // Another image's latest, and a consumer's clone with copied tags: never touched.
    let d = owner("debian");
    add_template(
        &pve,
        &d,
        9003,
        true,
        &[LATEST_TAG, VALIDATED_TAG],
        json!({"status": "passed", "at": "2025-01-17T10:00:00Z"}),
    )
    .await;
    let copied = marker(
        &o,
        "template",
        9001,
        1,
        json!({"status": "passed", "at": "2025-01-17T10:00:00Z"}),
    );
    pve.add_vm(
        json!({"vmid": 9600, "config": {"description": description(&copied),
        "tags": image_tags(&o, &[LATEST_TAG])}}),
    )
    .await;
    assert_eq!(holders(&c, &o).await, [9001]);

    // Only a validated template is promoted.
    let baseline = pve.guest(9002).await.packages();
    let mut req = request(&pve, &o, 9002, baseline);
    req.spec.checks = vec!["boot".into(), "packageDrift".into()];
    req.spec.allowed_extra_packages = vec![];
    let mut failed = validate::validate_template(&c, &req, &NoProgress)
        .await
        .unwrap();
    failed.checks[1].passed = false;
    failed.passed = false;
    let err = promote::promote(&c, &o, 9002, Evidence::Report(&failed))
        .await
        .unwrap_err();
    assert_eq!(err.category(), "not_validated", "{err}");
    let err = promote::promote(&c, &o, 9002, Evidence::Recorded)
        .await
        .unwrap_err();
    assert_eq!(err.category(), "not_validated", "{err}");
    assert_eq!(holders(&c, &o).await, [9001]);

    let report = validate::validate_template(&c, &req, &NoProgress)
        .await
        .unwrap();
    assert!(report.passed);
    let out = promote::promote(&c, &o, 9002, Evidence::Report(&report))
        .await
        .unwrap();
    assert_eq!(
        (out.vmid, out.previous.as_slice(), out.changed),
        (9002, &[9001][..], true)
    );
    assert_eq!(holders(&c, &o).await, [9002]);
    let t = tags_of(&c, &node, 9002).await;
    assert!(
        t.contains(&VALIDATED_TAG.to_string()) && t.contains(&LATEST_TAG.to_string()),
        "{t:?}"
    );
    assert!(
        tags_of(&c, &node, 9001)
            .await
            .contains(&VALIDATED_TAG.to_string())
    );
    let m = marker_of(&c, &node, 9002).await;
    assert!(matches!(
        m.metadata.validation,
        ValidationRecord::Passed { .. }
    ));
    assert!(
        c.vm_config(&node, 9002)
            .await
            .unwrap()
            .description
            .unwrap()
            .starts_with("Notes by the platform team.")
    );
    // Untouched: the other image and the consumer's clone.
    assert!(
        tags_of(&c, &node, 9003)
            .await
            .contains(&LATEST_TAG.to_string())
    );
    assert!(
        tags_of(&c, &node, 9600)
            .await
            .contains(&LATEST_TAG.to_string())
    );

    // Idempotent: nothing to write the second time.
    let seq = pve.requests().await.last().unwrap().seq;
    let again = promote::promote(&c, &o, 9002, Evidence::Recorded)
        .await
        .unwrap();
    assert!(!again.changed && again.previous.is_empty());
    assert!(
        !pve.requests_since(seq)
            .await
            .iter()
            .any(|r| r.method == "PUT")
    );
    assert_eq!(holders(&c, &o).await, [9002]);

    // The ConfigMap data for the new latest.
    let data = promote::config_map_data(out.vmid, &out.node, &out.marker);
    assert_eq!(data["template_id"], "9002");
    assert_eq!(data["template_name"], out.name);
    let manifest: Value = serde_json::from_str(&data["manifest.json"]).unwrap();
    assert_eq!(manifest["builds"][0]["artifact_id"], "9002");
}

#[tokio::test]
async fn promotion_converges_after_a_crash_between_the_two_writes() {
    let pve = FakePve::start().await;
    let c = client(&pve);
    let o = owner("ubuntu");
    add_latest(&pve, &o, 9001).await;
    // Write 1 done (new template tagged and recorded), write 2 (old holder) not: a crash.
    add_template(
        &pve,
        &o,
        9002,
        true,
        &[LATEST_TAG, VALIDATED_TAG],
        json!({"status": "passed", "at": "2025-01-18T10:00:00Z"}),
    )
    .await;
    assert_eq!(holders(&c, &o).await, [9001, 9002]);
    // Re-running the promotion finishes it.
    let out = promote::promote(&c, &o, 9002, Evidence::Recorded)
        .await
        .unwrap();
    assert_eq!(out.previous, [9001]);
    assert_eq!(holders(&c, &o).await, [9002]);

    // Without knowing which promotion was in flight: keep the most recently validated.
    let node = pve.node.clone();
    let mut update = sombrero::proxmox::ConfigUpdate::new(
        sombrero::proxmox::QemuConfig::new()
            .set("tags", image_tags(&o, &[LATEST_TAG, VALIDATED_TAG])),
    );
    update.digest = None;
    c.update_vm_config(&node, 9001, &update).await.unwrap();
    assert_eq!(holders(&c, &o).await, [9001, 9002]);
    assert_eq!(promote::converge_channel(&c, &o).await.unwrap(), Some(9002));
    assert_eq!(holders(&c, &o).await, [9002]);
    assert_eq!(promote::converge_channel(&c, &o).await.unwrap(), Some(9002));
}

#[tokio::test]
async fn mark_failed_keeps_the_previous_latest() {
    let pve = FakePve::start().await;
    let c = client(&pve);
    let node = pve.node.clone();
    let o = owner("ubuntu");
    add_latest(&pve, &o, 9001).await;
    add_template(&pve, &o, 9002, true, &[], json!({"status": "pending"})).await;
    pve.set_guest(
        None,
        GuestSettings {
            cloud_init: Some("error".into()),
            ..Default::default()
        },
    )
    .await;
    let report = validate::validate_template(&c, &request(&pve, &o, 9002, vec![]), &NoProgress)
        .await
        .unwrap();
    assert!(!report.passed);
    promote::mark_failed(&c, 9002, &report.failure_reason().unwrap())
        .await
        .unwrap();
    promote::mark_failed(&c, 9002, "again").await.unwrap();
    let t = tags_of(&c, &node, 9002).await;
    assert!(
        t.contains(&FAILED_VALIDATION_TAG.to_string()) && !t.contains(&LATEST_TAG.to_string()),
        "{t:?}"
    );
    match marker_of(&c, &node, 9002).await.metadata.validation {
        ValidationRecord::Failed { reason, .. } => {
            assert!(reason.starts_with("cloudInit failed"), "{reason}")
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(holders(&c, &o).await, [9001]);
    // A failed template cannot be promoted with its record.
    assert!(
        promote::promote(&c, &o, 9002, Evidence::Recorded)
            .await
            .is_err()
    );
    assert_eq!(holders(&c, &o).await, [9001]);
    // mark_failed refuses a VM that is not ours.
    pve.add_vm(json!({"vmid": 9700, "template": true})).await;
    assert_eq!(
        promote::mark_failed(&c, 9700, "x")
            .await
            .unwrap_err()
            .category(),
        "not_ours"
    );
}

/// A fresh fake for one validate + promote run: the previous latest 9001, the new template
/// 9002, a stranger's running VM 100. Answers the stranger's config digest, the baseline and
/// the last request's sequence number.
async fn validate_start(
    pve: &FakePve,
    c: &Client,
    o: &Owner,
) -> (Option<String>, Vec<String>, u64) {
    pve.reset().await;
    add_template(
        pve,
        o,
        9001,
        true,
        &[LATEST_TAG, VALIDATED_TAG],
        json!({"status": "passed", "at": "2025-01-17T10:00:00Z"}),
    )
    .await;
    add_template(pve, o, 9002, true, &[], json!({"status": "pending"})).await;
    pve.add_vm(json!({"vmid": 100, "name": "someone-elses-db", "status": "running"}))
        .await;
    let digest = c.vm_config(&pve.node, 100).await.unwrap().digest;
    let baseline = pve.guest(9002).await.packages();
    let seq = pve.requests().await.last().map_or(0, |r| r.seq);
    (digest, baseline, seq)
}

/// One validation of 9002 and its promotion; answers the writes it made.
async fn validate_and_promote(
    pve: &FakePve,
    c: &Client,
    o: &Owner,
    baseline: Vec<String>,
    seq: u64,
    when: &str,
) -> Vec<support::fakepve::RecordedRequest> {
    let req = request(pve, o, 9002, baseline);
    let report = validate::validate_template(c, &req, &NoProgress)
        .await
        .unwrap_or_else(|e| panic!("{when}: validation: {e}"));
    assert!(report.passed, "{when}: {:#?}", report.checks);
    promote::promote(c, o, 9002, Evidence::Report(&report))
        .await
        .unwrap_or_else(|e| panic!("{when}: promotion: {e}"));
    pve.requests_since(seq)
        .await
        .into_iter()
        .filter(|r| r.method != "GET")
        .collect()
}

/// The answer to each write of a validate + promote run lost in turn (the fake runs the
/// request, then closes the connection): the run looks at what happened and finishes: one
/// clone made and destroyed, the new template validated and the only holder of the channel
/// tag, the stranger untouched.
#[tokio::test]
async fn losing_the_answer_to_every_write_of_a_validate_and_promote_run() {
    let pve = FakePve::start().await;
    let c = client(&pve);
    let o = owner("ubuntu");
    let (_, baseline, seq) = validate_start(&pve, &c, &o).await;
    let writes = validate_and_promote(&pve, &c, &o, baseline, seq, "the counting run")
        .await
        .len() as u64;
    assert!(
        writes >= 5,
        "clone, configure, start, stop, destroy, tags: {writes}"
    );
    for k in 1..=writes {
        let (digest, baseline, seq) = validate_start(&pve, &c, &o).await;
        pve.arm_trap(
            support::fakepve::Trap::new(support::fakepve::TrapAction::Drop, k).writes_only(),
        )
        .await;
        let when = format!("the answer to write {k} of {writes} lost");
        let made = validate_and_promote(&pve, &c, &o, baseline, seq, &when).await;
        let lost = made
            .get((k - 1) as usize)
            .map(|r| format!("{} {}", r.method, r.path))
            .unwrap_or_default();
        let when = format!("{when} ({lost})");
        assert!(
            pve.trap_state().await.fired,
            "{when}: the trap did not fire"
        );
        let clones = made
            .iter()
            .filter(|r| r.method == "POST" && r.path.ends_with("/clone"))
            .count();
        assert_eq!(clones, 1, "{when}: a second clone was made");
        assert_eq!(
            vmids(&c).await,
            [100, 9001, 9002],
            "{when}: a clone is left"
        );
        assert_eq!(holders(&c, &o).await, [9002], "{when}");
        assert!(
            tags_of(&c, &pve.node, 9002)
                .await
                .contains(&VALIDATED_TAG.to_string()),
            "{when}"
        );
        assert_eq!(
            c.vm_config(&pve.node, 100).await.unwrap().digest,
            digest,
            "{when}: the stranger was changed"
        );
    }
}

#[tokio::test]
async fn a_promotion_costs_the_same_however_many_templates_the_image_has() {
    let pve = FakePve::start().await;
    let c = client(&pve);
    let o = owner("ubuntu");
    add_latest(&pve, &o, 9001).await;
    // The requests of promoting a new template `vmid` (recorded as passed) over the holder.
    let cost = |vmid: u32| {
        let (pve, c, o) = (&pve, &c, &o);
        async move {
            add_template(
                pve,
                o,
                vmid,
                true,
                &[VALIDATED_TAG],
                json!({"status": "passed", "at": "2025-01-18T10:00:00Z"}),
            )
            .await;
            let seq = pve.requests().await.last().map_or(0, |r| r.seq);
            let out = promote::promote(c, o, vmid, Evidence::Recorded)
                .await
                .unwrap();
            assert_eq!(out.previous.len(), 1, "{out:?}");
            let made = pve.requests_since(seq).await;
            made.iter()
                .map(|r| format!("{} {}", r.method, r.path))
                .collect::<Vec<_>>()
        }
    };
    let first = cost(9002).await;
    for vmid in 9003..9010 {
        add_template(&pve, &o, vmid, true, &[], json!({"status": "pending"})).await;
    }
    let with_nine = cost(9010).await;
    assert_eq!(holders(&c, &o).await, [9010]);
    // A list, the new holder's read and write, the old holder's read and write.
    assert_eq!(first.len(), 5, "{first:#?}");
    assert_eq!(with_nine.len(), first.len(), "{with_nine:#?}");
}
