//! TemplateRetention against the fake Proxmox VE: gathering versions and what protects them,
//! the plan, and its execution (backup / tag / delete), plus `sombrero prune`.

use crate::support;
use support::fakepve::{Failure, FakePve};

use std::time::Duration;

use chrono::{NaiveDate, Utc};
use serde_json::{Value, json};
use sombrero::image::marker::{
    MARKER_SCHEMA_VERSION, Marker, Owner, Role, TemplateMetadata, ValidationRecord,
    render_description,
};
use sombrero::proxmox::{Client, CloneRequest, Config, RetryPolicy};
use sombrero::retention::{
    self, Action, ArchiveMode, Decision, Plan, Purpose, Reason, RetentionRules, Scope, Target,
};

const NS: &str = "platform";
const IMAGE: &str = "ubuntu";
const WAIT: Duration = Duration::from_secs(30);

fn client(pve: &FakePve) -> Client {
    let config = Config::new(&pve.url, &pve.token_id, pve.token_secret.as_str())
        .unwrap()
        .with_ca_pem(pve.ca_pem.clone())
        .unwrap()
        .with_timeout(Duration::from_secs(20))
        .with_retry(RetryPolicy {
            max_attempts: 2,
            initial_delay: Duration::from_millis(20),
            max_delay: Duration::from_millis(100),
        });
    Client::new(config).unwrap()
}

fn target() -> Target {
    Target::Image {
        namespace: NS.into(),
        name: IMAGE.into(),
    }
}

/// The owner of "our" templates: `platform/ubuntu` with the uid `sombrero build -f` writes,
/// so `sombrero prune -f` of a file naming that image acts on them without `--owner-uid`.
fn ours() -> Owner {
    Owner {
        namespace: NS.into(),
        name: IMAGE.into(),
        uid: sombrero::builder::cli_owner_uid(NS, IMAGE),
    }
}

fn scope() -> Scope {
    target().scope(&ours().uid)
}

fn build_date(days_ago: i64) -> NaiveDate {
    (Utc::now() - chrono::Duration::days(days_ago)).date_naive()
}

fn marker(vmid: u32, days_ago: i64, validation: ValidationRecord, owner: Owner) -> Marker {
    let date = build_date(days_ago);
    Marker {
        schema: MARKER_SCHEMA_VERSION,
        owner,
        build_id: format!("b-{vmid}"),
        role: Role::Template,
        vmid,
        metadata: TemplateMetadata {
            name: name(vmid, days_ago),
            os: "ubuntu-24.04".into(),
            image_type: "minimal".into(),
            builder: "sombrero".into(),
            builder_version: "0.1.0".into(),
            build_date: date,
            build_number: 1,
            source: None,
            spec_hash: "0123456789abcdef".into(),
            package_manifest_digest: None,
            validation,
            created_at: None,
        },
        build: None,
    }
}

fn name(vmid: u32, days_ago: i64) -> String {
    format!(
        "ubuntu-24.04-minimal-{}-{:03}",
        build_date(days_ago).format("%Y%m%d"),
        vmid % 1000
    )
}

fn passed() -> ValidationRecord {
    ValidationRecord::Passed { at: Utc::now() }
}

/// Options for [`add_template`].
#[derive(Default, Clone)]
struct T {
    latest: bool,
    protected: bool,
    pending: bool,
    /// Write the marker for another VMID (a consumer's copy).
    marker_for: Option<u32>,
    no_marker: bool,
    /// The marker's owner; default [`ours`].
    owner: Option<Owner>,
    /// The VM name; default [`name`] of the VMID and age.
    name: Option<String>,
    storage: Option<&'static str>,
    node: Option<&'static str>,
}

/// A template of our image made `days_ago` days ago, with a disk on `local-lvm`.
async fn add_template(pve: &FakePve, vmid: u32, days_ago: i64, t: T) {
    let mut tags = vec![
        "sombrero".to_string(),
        format!("sombrero.{NS}.{IMAGE}"),
        "os.ubuntu-24.04".into(),
    ];
    if !t.pending {
        tags.push("validated".into());
    }
    if t.latest {
        tags.push("sombrero-latest".into());
    }
    let validation = if t.pending {
        ValidationRecord::Pending
    } else {
        passed()
    };
    let mut config = json!({"tags": tags.join(";")});
    if !t.no_marker {
        let m = marker(
            t.marker_for.unwrap_or(vmid),
            days_ago,
            validation,
            t.owner.clone().unwrap_or_else(ours),
        );
        config["description"] = json!(render_description("", &m).unwrap());
    }
    if t.protected {
        config["protection"] = json!(1);
    }
    let vm_name = t.name.clone().unwrap_or_else(|| name(vmid, days_ago));
    let mut spec = json!({
        "vmid": vmid, "name": vm_name, "template": true, "config": config,
    });
    if let Some(s) = t.storage {
        spec["storage"] = json!(s);
    }
    if let Some(n) = t.node {
        spec["node"] = json!(n);
    }
    pve.add_vm(spec).await;
}

async fn exists(c: &Client, pve: &FakePve, vmid: u32) -> bool {
    match c.vm_config(&pve.node, vmid).await {
        Ok(_) => true,
        Err(e) if e.is_not_found() => false,
        Err(e) => panic!("config of {vmid}: {e}"),
    }
}

async fn tags(c: &Client, pve: &FakePve, vmid: u32) -> String {
    c.vm_config(&pve.node, vmid)
        .await
        .unwrap()
        .tags
        .unwrap_or_default()
}

fn quiet(_: &str) {}

/// Gathers, plans and executes, as `sombrero prune` does.
async fn run(
    pve: &FakePve,
    rules: RetentionRules,
    mode: ArchiveMode,
    backup_storage: Option<&str>,
) -> (Plan, Vec<sombrero::api::template_retention::ExecutedAction>) {
    let c = client(pve);
    let inv = retention::gather(&c, &target(), &scope(), Purpose::Rotation)
        .await
        .unwrap();
    let plan = retention::plan(&inv.versions, &scope(), &rules, mode, Utc::now());
    let results = retention::execute(&c, &plan, backup_storage, false, &quiet).await;
    (plan, results)
}

fn action(plan: &Plan, vmid: u32) -> (Action, String) {
    let d = plan
        .get(vmid)
        .unwrap_or_else(|| panic!("{vmid} not in plan {plan:#?}"));
    (d.action, d.message())
}

/// Only GETs after `seq`: nothing changed on Proxmox.
async fn writes_since(pve: &FakePve, seq: u64) -> Vec<String> {
    pve.requests_since(seq)
        .await
        .into_iter()
        .filter(|r| r.method != "GET")
        .map(|r| format!("{} {}", r.method, r.path))
        .collect()
}

async fn last_seq(pve: &FakePve) -> u64 {
    pve.requests().await.last().map_or(0, |r| r.seq)
}

#[tokio::test]
async fn keep_last_3_with_5_versions() {
    let pve = FakePve::start().await;
    for (vmid, days) in [(101, 200), (102, 150), (103, 100), (104, 50)] {
        add_template(&pve, vmid, days, T::default()).await;
    }
    add_template(
        &pve,
        105,
        10,
        T {
            latest: true,
            ..T::default()
        },
    )
    .await;
    let (plan, results) = run(&pve, RetentionRules::default(), ArchiveMode::Delete, None).await;
    assert_eq!(
        action(&plan, 105),
        (Action::Keep, "kept: current latest".into())
    );
    assert_eq!(action(&plan, 104).0, Action::Keep);
    assert_eq!(
        action(&plan, 103),
        (Action::Keep, "kept: among the last 3".into())
    );
    assert_eq!(
        action(&plan, 102),
        (
            Action::Delete,
            "deleted: older than 90d and not among the last 3".into()
        )
    );
    assert_eq!(action(&plan, 101).0, Action::Delete);
    // Oldest first, both succeeded.
    let done: Vec<(u32, bool)> = results.iter().map(|r| (r.vmid, r.succeeded)).collect();
    assert_eq!(done, [(101, true), (102, true)], "{results:#?}");
    let c = client(&pve);
    for vmid in [101, 102] {
        assert!(!exists(&c, &pve, vmid).await, "{vmid} still exists");
    }
    for vmid in [103, 104, 105] {
        assert!(exists(&c, &pve, vmid).await, "{vmid} was deleted");
    }
    // The deletes purged: PVE's delete with purge=1.
    let deletes: Vec<_> = pve
        .requests()
        .await
        .into_iter()
        .filter(|r| r.method == "DELETE")
        .collect();
    assert_eq!(deletes.len(), 2);
    assert!(
        deletes.iter().all(|r| r.params["purge"] == json!("1")),
        "{deletes:?}"
    );
}

#[tokio::test]
async fn age_rule_in_tag_mode() {
    let pve = FakePve::start().await;
    for (vmid, days) in [(201, 1), (202, 2), (203, 3), (204, 89), (205, 91)] {
        add_template(
            &pve,
            vmid,
            days,
            T {
                latest: vmid == 201,
                ..T::default()
            },
        )
        .await;
    }
    let (plan, results) = run(&pve, RetentionRules::default(), ArchiveMode::Tag, None).await;
    assert_eq!(
        action(&plan, 204),
        (Action::Keep, "kept: not older than 90d".into())
    );
    assert_eq!(action(&plan, 205).0, Action::Archive);
    assert_eq!(results.len(), 1);
    assert!(results[0].succeeded, "{results:?}");
    let c = client(&pve);
    let t = tags(&c, &pve, 205).await;
    assert!(t.split(';').any(|x| x == "archived"), "{t}");
    assert!(exists(&c, &pve, 205).await, "tag mode keeps the template");
    assert!(!tags(&c, &pve, 204).await.contains("archived"));
    // A second run keeps the archived one (already archived) and changes nothing.
    let seq = last_seq(&pve).await;
    let (plan, results) = run(&pve, RetentionRules::default(), ArchiveMode::Tag, None).await;
    assert_eq!(
        action(&plan, 205),
        (Action::Keep, "kept: already archived".into())
    );
    assert!(results.is_empty());
    assert!(writes_since(&pve, seq).await.is_empty());
}

#[tokio::test]
async fn tag_mode_drops_the_channel_tag() {
    let pve = FakePve::start().await;
    add_template(&pve, 301, 200, T::default()).await;
    add_template(&pve, 302, 5, T::default()).await;
    let c = client(&pve);
    let rules = RetentionRules {
        keep_last: 1,
        archive_after: chrono::Duration::days(30),
        retain_at_least: 1,
    };
    let (_, results) = run(&pve, rules, ArchiveMode::Tag, None).await;
    assert_eq!(results.len(), 1);
    assert!(
        results[0].message.starts_with("tagged archived"),
        "{results:?}"
    );
    let t = tags(&c, &pve, 301).await;
    assert!(
        t.contains("archived") && !t.contains("sombrero-latest"),
        "{t}"
    );
    // Our other tags stay: consumers still find it by image tag, just never as latest.
    assert!(
        t.contains("sombrero.platform.ubuntu") && t.contains("validated"),
        "{t}"
    );
}

#[tokio::test]
async fn retain_at_least_wins_over_both_rules() {
    let pve = FakePve::start().await;
    // The newest is still pending validation: it fills keepLast=1, but does not count for
    // retainAtLeast, so the newest validated one stays although it is old and beyond keepLast.
    add_template(
        &pve,
        401,
        5,
        T {
            pending: true,
            ..T::default()
        },
    )
    .await;
    add_template(&pve, 402, 200, T::default()).await;
    add_template(&pve, 403, 300, T::default()).await;
    let rules = RetentionRules {
        keep_last: 1,
        archive_after: chrono::Duration::days(30),
        retain_at_least: 1,
    };
    let (plan, results) = run(&pve, rules, ArchiveMode::Delete, None).await;
    assert_eq!(
        action(&plan, 401),
        (Action::Keep, "kept: among the last 1".into())
    );
    assert_eq!(
        action(&plan, 402),
        (
            Action::Keep,
            "kept: retainAtLeast=1 needs a validated template".into()
        )
    );
    assert_eq!(action(&plan, 403).0, Action::Delete);
    assert_eq!(results.len(), 1);
    let c = client(&pve);
    assert!(exists(&c, &pve, 402).await);
    assert!(!exists(&c, &pve, 403).await);
}

/// A plan that says delete, as a stale plan or a bug might: the re-check must still refuse.
fn forced_delete(vmid: u32) -> Plan {
    Plan {
        mode: ArchiveMode::Delete,
        scope: scope(),
        purpose: Purpose::Rotation,
        decisions: vec![Decision {
            vmid,
            name: format!("t{vmid}"),
            node: "pve1".into(),
            action: Action::Delete,
            reason: Reason::Expired {
                archive_after: chrono::Duration::days(1),
                keep_last: 1,
            },
        }],
    }
}

#[tokio::test]
async fn linked_clone_on_lvm_thin_protects_its_template() {
    let pve = FakePve::start().await;
    add_template(&pve, 501, 200, T::default()).await;
    add_template(
        &pve,
        502,
        5,
        T {
            latest: true,
            ..T::default()
        },
    )
    .await;
    // Another VM on the same storage, made after the template: its config is read (it could be
    // a clone), but it carries no copy of the marker.
    pve.add_vm(json!({"vmid": 150, "name": "db"})).await;
    let c = client(&pve);
    // A consumer's linked clone: on LVM-thin PVE names it `vm-600-disk-0`, no trace of the base.
    let upid = c
        .clone_vm(&pve.node, 501, &CloneRequest::new(600))
        .await
        .unwrap();
    c.wait_task(&upid, WAIT).await.unwrap();
    let clone = c.vm_config(&pve.node, 600).await.unwrap();
    let disk = clone.value("scsi0").unwrap();
    assert!(
        disk.starts_with("local-lvm:vm-600-disk-"),
        "LVM-thin clones carry no base reference: {disk}"
    );

    let rules = RetentionRules {
        keep_last: 1,
        archive_after: chrono::Duration::days(30),
        retain_at_least: 1,
    };
    let (plan, results) = run(&pve, rules, ArchiveMode::Delete, None).await;
    assert_eq!(
        action(&plan, 501),
        (Action::Keep, "kept: in use by linked clones 600".into())
    );
    assert!(results.is_empty());

    // Even a plan that says delete is refused by the re-check right before the call.
    let results = retention::execute(&c, &forced_delete(501), None, false, &quiet).await;
    assert_eq!(results.len(), 1);
    assert!(!results[0].succeeded);
    assert!(
        results[0].message.contains("in use by 600"),
        "{}",
        results[0].message
    );
    assert!(exists(&c, &pve, 501).await);

    // The fake storage itself would have let it go (as real LVM-thin does).
    let upid = c
        .delete_vm(&pve.node, 501, Default::default())
        .await
        .unwrap();
    c.wait_task(&upid, WAIT).await.unwrap();
    assert!(!exists(&c, &pve, 501).await);
}

#[tokio::test]
async fn linked_clone_seen_in_volume_ids_without_a_marker() {
    let pve = FakePve::start().await;
    let c = client(&pve);
    // A directory storage for images: linked clones there are named after their base.
    let _: Value = c
        .post(
            &["storage"],
            &sombrero::proxmox::Params::new()
                .set("storage", "dirimg")
                .set("type", "dir")
                .set("path", "/var/lib/dirimg")
                .set("content", "images"),
            sombrero::proxmox::Idempotency::Unsafe,
        )
        .await
        .unwrap();
    add_template(
        &pve,
        701,
        200,
        T {
            storage: Some("dirimg"),
            ..T::default()
        },
    )
    .await;
    add_template(
        &pve,
        702,
        5,
        T {
            latest: true,
            ..T::default()
        },
    )
    .await;
    // The consumer overrides description and tags: only the volume id tells.
    let mut req = CloneRequest::new(610);
    req.description = Some("my app server".into());
    let upid = c.clone_vm(&pve.node, 701, &req).await.unwrap();
    c.wait_task(&upid, WAIT).await.unwrap();
    let disk = c
        .vm_config(&pve.node, 610)
        .await
        .unwrap()
        .value("scsi0")
        .unwrap();
    assert!(disk.contains("base-701-disk-"), "{disk}");
    let rules = RetentionRules {
        keep_last: 1,
        archive_after: chrono::Duration::days(30),
        retain_at_least: 1,
    };
    let (plan, results) = run(&pve, rules, ArchiveMode::Delete, None).await;
    assert_eq!(
        action(&plan, 701),
        (Action::Keep, "kept: in use by linked clones 610".into())
    );
    assert!(results.is_empty());
    assert!(exists(&c, &pve, 701).await);
}

#[tokio::test]
async fn validation_clone_protects_its_template() {
    let pve = FakePve::start().await;
    add_template(&pve, 801, 200, T::default()).await;
    add_template(
        &pve,
        802,
        5,
        T {
            latest: true,
            ..T::default()
        },
    )
    .await;
    // Our running validation clone of 801 (marker role validation, written for its own VMID).
    let m = marker(801, 200, passed(), ours()).retarget(Role::Validation, 820);
    pve.add_vm(json!({
        "vmid": 820, "name": "validate-801", "status": "running",
        "config": {"tags": "sombrero", "description": render_description("", &m).unwrap()},
    }))
    .await;
    let rules = RetentionRules {
        keep_last: 1,
        archive_after: chrono::Duration::days(30),
        retain_at_least: 1,
    };
    let (plan, results) = run(&pve, rules, ArchiveMode::Delete, None).await;
    assert_eq!(
        action(&plan, 801),
        (Action::Keep, "kept: in use by linked clones 820".into())
    );
    assert!(results.is_empty());
}

#[tokio::test]
async fn protected_template_is_kept() {
    let pve = FakePve::start().await;
    add_template(
        &pve,
        901,
        200,
        T {
            protected: true,
            ..T::default()
        },
    )
    .await;
    add_template(
        &pve,
        902,
        5,
        T {
            latest: true,
            ..T::default()
        },
    )
    .await;
    let rules = RetentionRules {
        keep_last: 1,
        archive_after: chrono::Duration::days(30),
        retain_at_least: 1,
    };
    let (plan, results) = run(&pve, rules, ArchiveMode::Delete, None).await;
    assert_eq!(
        action(&plan, 901),
        (Action::Keep, "kept: protected (protection=1)".into())
    );
    assert!(results.is_empty());
    let c = client(&pve);
    let seq = last_seq(&pve).await;
    let results = retention::execute(&c, &forced_delete(901), None, false, &quiet).await;
    assert!(!results[0].succeeded);
    assert!(results[0].message.contains("protected"), "{results:?}");
    assert!(writes_since(&pve, seq).await.is_empty());
    assert!(exists(&c, &pve, 901).await);
}

#[tokio::test]
async fn unowned_lookalikes_are_untouched() {
    let pve = FakePve::start().await;
    // Same tags, no marker: someone's own template.
    add_template(
        &pve,
        1001,
        300,
        T {
            no_marker: true,
            ..T::default()
        },
    )
    .await;
    // A consumer's template made from a clone of ours: tags and marker copied (marker names 1003).
    add_template(
        &pve,
        1002,
        300,
        T {
            marker_for: Some(1003),
            ..T::default()
        },
    )
    .await;
    add_template(
        &pve,
        1003,
        5,
        T {
            latest: true,
            ..T::default()
        },
    )
    .await;
    let rules = RetentionRules {
        keep_last: 1,
        archive_after: chrono::Duration::days(30),
        retain_at_least: 0,
    };
    let (plan, results) = run(&pve, rules, ArchiveMode::Delete, None).await;
    assert_eq!(
        action(&plan, 1001),
        (
            Action::Ignore,
            "ignored: not ours: it has no sombrero marker".into()
        )
    );
    assert_eq!(
        action(&plan, 1002),
        (
            Action::Ignore,
            "ignored: not ours: its marker was not written for this template (a copy in a clone, or an unfinished build)".into()
        )
    );
    assert!(results.is_empty());
    let c = client(&pve);
    // And a forced delete of either is refused.
    for vmid in [1001, 1002] {
        let r = retention::execute(&c, &forced_delete(vmid), None, false, &quiet).await;
        assert!(!r[0].succeeded && r[0].message.contains("marker"), "{r:?}");
        assert!(exists(&c, &pve, vmid).await);
    }
}

#[tokio::test]
async fn backup_failure_deletes_nothing() {
    let pve = FakePve::start().await;
    add_template(&pve, 1101, 200, T::default()).await;
    add_template(
        &pve,
        1102,
        5,
        T {
            latest: true,
            ..T::default()
        },
    )
    .await;
    pve.fail(Failure::status(
        "POST",
        "/nodes/{node}/vzdump",
        500,
        "can't acquire lock '/var/run/vzdump.lock' - got timeout",
    ))
    .await;
    let rules = RetentionRules {
        keep_last: 1,
        archive_after: chrono::Duration::days(30),
        retain_at_least: 1,
    };
    let (plan, results) = run(&pve, rules, ArchiveMode::Backup, Some("local")).await;
    assert_eq!(action(&plan, 1101).0, Action::Archive);
    assert_eq!(results.len(), 1);
    assert!(!results[0].succeeded);
    assert!(
        results[0].message.contains("backup failed")
            && results[0].message.contains("nothing was deleted"),
        "{}",
        results[0].message
    );
    let c = client(&pve);
    assert!(exists(&c, &pve, 1101).await);
    assert!(
        !pve.requests().await.iter().any(|r| r.method == "DELETE"),
        "a DELETE was sent"
    );
    // Without a backup storage, backup mode refuses too.
    pve.clear_failures().await;
    let (_, results) = run(&pve, rules, ArchiveMode::Backup, None).await;
    assert!(!results[0].succeeded && results[0].message.contains("backupStorage"));
    assert!(exists(&c, &pve, 1101).await);
}

#[tokio::test]
async fn backup_mode_checks_the_backup_then_deletes() {
    let pve = FakePve::start().await;
    add_template(&pve, 1201, 200, T::default()).await;
    add_template(
        &pve,
        1202,
        5,
        T {
            latest: true,
            ..T::default()
        },
    )
    .await;
    let rules = RetentionRules {
        keep_last: 1,
        archive_after: chrono::Duration::days(30),
        retain_at_least: 1,
    };
    let (_, results) = run(&pve, rules, ArchiveMode::Backup, Some("local")).await;
    assert_eq!(results.len(), 1);
    assert!(results[0].succeeded, "{results:?}");
    let c = client(&pve);
    assert!(!exists(&c, &pve, 1201).await);
    let backups = c
        .storage_content(&pve.node, "local", Some("backup"), Some(1201))
        .await
        .unwrap();
    assert_eq!(backups.len(), 1, "{backups:?}");
    let notes = backups[0].notes.clone().unwrap_or_default();
    assert!(
        notes.starts_with(&format!("sombrero archive: {}", name(1201, 200))),
        "{notes}"
    );
    assert!(
        results[0].message.contains(&backups[0].volid),
        "{}",
        results[0].message
    );
    // vzdump ran on the template's own node, then the content was listed, then the delete.
    let log = pve.requests().await;
    let pos = |pred: &dyn Fn(&support::fakepve::RecordedRequest) -> bool| {
        log.iter().position(pred).expect("request")
    };
    let vzdump = pos(&|r| r.method == "POST" && r.path.ends_with("/nodes/pve1/vzdump"));
    let delete = pos(&|r| r.method == "DELETE" && r.path.ends_with("/qemu/1201"));
    let listed = log[vzdump..delete]
        .iter()
        .any(|r| r.method == "GET" && r.path.contains("/storage/local/content"));
    assert!(listed && vzdump < delete);
}

#[tokio::test]
async fn backup_runs_on_the_templates_own_node() {
    let pve = FakePve::start().await;
    pve.set_node_online("pve2", true).await;
    add_template(
        &pve,
        1251,
        200,
        T {
            node: Some("pve2"),
            ..T::default()
        },
    )
    .await;
    add_template(
        &pve,
        1252,
        5,
        T {
            latest: true,
            ..T::default()
        },
    )
    .await;
    let rules = RetentionRules {
        keep_last: 1,
        archive_after: chrono::Duration::days(30),
        retain_at_least: 1,
    };
    let (plan, results) = run(&pve, rules, ArchiveMode::Backup, Some("local")).await;
    assert_eq!(plan.get(1251).unwrap().node, "pve2");
    assert!(results[0].succeeded, "{results:?}");
    let log = pve.requests().await;
    let vzdumps: Vec<&str> = log
        .iter()
        .filter(|r| r.path.ends_with("/vzdump"))
        .map(|r| r.path.as_str())
        .collect();
    assert_eq!(vzdumps, ["/api2/json/nodes/pve2/vzdump"]);
    let c = client(&pve);
    assert_eq!(
        c.storage_content("pve2", "local", Some("backup"), Some(1251))
            .await
            .unwrap()
            .len(),
        1
    );
    match c.vm_config("pve2", 1251).await {
        Err(e) if e.is_not_found() => {}
        other => panic!("1251 still there: {other:?}"),
    }
}

#[tokio::test]
async fn resumed_backup_reuses_the_earlier_archive() {
    let pve = FakePve::start().await;
    add_template(&pve, 1301, 200, T::default()).await;
    add_template(
        &pve,
        1302,
        5,
        T {
            latest: true,
            ..T::default()
        },
    )
    .await;
    // An earlier run made the backup and died before deleting.
    let volid = pve
        .add_backup(support::fakepve::Backup {
            vmid: 1301,
            notes: Some(format!(
                "sombrero archive: {} (VMID 1301, node pve1)",
                name(1301, 200)
            )),
            ..Default::default()
        })
        .await;
    let rules = RetentionRules {
        keep_last: 1,
        archive_after: chrono::Duration::days(30),
        retain_at_least: 1,
    };
    let (_, results) = run(&pve, rules, ArchiveMode::Backup, Some("local")).await;
    assert!(results[0].succeeded, "{results:?}");
    assert!(results[0].message.contains(&volid), "{results:?}");
    assert!(
        !pve.requests()
            .await
            .iter()
            .any(|r| r.path.ends_with("/vzdump")),
        "a second vzdump ran"
    );
    assert!(!exists(&client(&pve), &pve, 1301).await);
}

#[tokio::test]
async fn gather_request_count() {
    let pve = FakePve::start().await;
    // 4 templates of ours (latest, 3 young), 20 unrelated VMs, 1 unrelated template.
    for (vmid, days) in [(1401, 1), (1402, 2), (1403, 3), (1404, 4)] {
        add_template(
            &pve,
            vmid,
            days,
            T {
                latest: vmid == 1401,
                ..T::default()
            },
        )
        .await;
    }
    for vmid in 2000..2020 {
        pve.add_vm(json!({"vmid": vmid, "with_disk": false})).await;
    }
    pve.add_vm(
        json!({"vmid": 3000, "template": true, "with_disk": false, "config": {"tags": "debian"}}),
    )
    .await;
    let c = client(&pve);
    let seq = last_seq(&pve).await;
    let inv = retention::gather(&c, &target(), &scope(), Purpose::Rotation)
        .await
        .unwrap();
    let made = pve.requests_since(seq).await.len() as u32;
    assert_eq!(inv.versions.len(), 4);
    // 1 list + 4 configs + (3 candidates on one node) 1 storage list + 1 content listing
    // (local-lvm) + the configs of VMs on local-lvm created after the candidates' base volumes:
    // none here (the 20 VMs have no disks).
    assert_eq!(inv.requests, made, "the counter matches the fake's log");
    assert_eq!(made, 1 + 4 + 1 + 1, "{:#?}", pve.requests_since(seq).await);

    // On the controller's shared inventory (list and our configs at hand): only the in-use
    // check's storage list and content listing remain.
    let vms = c.cluster_vms().await.unwrap();
    let mut configs = std::collections::BTreeMap::new();
    for vmid in 1401..=1404 {
        let config = c.vm_config(&pve.node, vmid).await.unwrap();
        configs.insert(vmid, sombrero::config_reads::ConfigRead::of(config));
    }
    let seq = last_seq(&pve).await;
    let shared = retention::gather_from(&c, &target(), &scope(), Purpose::Rotation, &vms, &configs)
        .await
        .unwrap();
    assert_eq!(shared.requests, 2);
    assert_eq!(pve.requests_since(seq).await.len(), 2);
    assert_eq!(shared.versions, inv.versions);

    // With nothing removable (only the latest), no in-use check at all: 1 + templates.
    let pve2 = FakePve::start().await;
    add_template(
        &pve2,
        1501,
        1,
        T {
            latest: true,
            ..T::default()
        },
    )
    .await;
    let inv = retention::gather(&client(&pve2), &target(), &scope(), Purpose::Rotation)
        .await
        .unwrap();
    assert_eq!(inv.requests, 2);
}

fn write_policy(dir: &std::path::Path, extra: &str) -> std::path::PathBuf {
    let path = dir.join("policy.yaml");
    std::fs::write(
        &path,
        format!(
            "apiVersion: images.sombrero.dev/v1alpha1\nkind: TemplateRetention\nmetadata: {{name: p, namespace: {NS}}}\nspec:\n  target: {{goldenImageRef: {{name: {IMAGE}}}}}\n  keepLast: 1\n  archiveAfter: 30d\n{extra}"
        ),
    )
    .unwrap();
    path
}

fn prune(pve: &FakePve, args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_sombrero"))
        .arg("prune")
        .args(args)
        .env("PROXMOX_URL", &pve.url)
        .env("PROXMOX_TOKEN_ID", &pve.token_id)
        .env("PROXMOX_TOKEN_SECRET", &pve.token_secret)
        .env("PROXMOX_CA_CERT", &pve.ca_cert_path)
        .output()
        .expect("run sombrero")
}

/// Every malformed TemplateRetention fixture is refused by `sombrero prune` (exit 2, before any
/// Proxmox connection), naming the field the API server names.
#[test]
fn prune_cli_refuses_every_malformed_policy_naming_the_field() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/malformed");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.file_name().unwrap().to_string_lossy().starts_with("tr-"))
        .collect();
    files.sort();
    assert!(files.len() >= 7, "only {} fixtures", files.len());
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        let field = text
            .lines()
            .find_map(|l| l.strip_prefix("# expect-field:"))
            .unwrap_or_else(|| panic!("{} has no expect-field header", file.display()))
            .trim()
            .trim_start_matches('.')
            .to_string();
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_sombrero"))
            .args(["prune", "--dry-run", "-f"])
            .arg(&file)
            .env_remove("PROXMOX_URL")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{}: {stderr}", file.display());
        assert!(
            stderr
                .lines()
                .any(|l| l.trim_start().trim_start_matches('.').starts_with(&field)),
            "{}: expected the field {field} in:\n{stderr}",
            file.display()
        );
        assert!(out.stdout.is_empty());
    }
}

#[tokio::test]
async fn prune_cli_dry_run_changes_nothing_then_runs() {
    let pve = FakePve::start().await;
    add_template(&pve, 1601, 200, T::default()).await;
    add_template(&pve, 1602, 100, T::default()).await;
    add_template(
        &pve,
        1603,
        5,
        T {
            latest: true,
            ..T::default()
        },
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let policy = write_policy(dir.path(), "  archive: {mode: delete}\n");
    let seq = last_seq(&pve).await;
    let out = prune(&pve, &["-f", policy.to_str().unwrap(), "--dry-run"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{stderr}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert!(
        lines[0].starts_with("VMID")
            && lines[0].contains("BUILD DATE")
            && lines[0].contains("REASON"),
        "{stdout}"
    );
    assert!(
        lines[1].starts_with("1603")
            && lines[1].contains("keep")
            && lines[1].contains("current latest"),
        "{stdout}"
    );
    assert!(
        lines[3].starts_with("1601")
            && lines[3].contains("delete")
            && lines[3].contains(&build_date(200).to_string()),
        "{stdout}"
    );
    assert!(stdout.contains("dry run: nothing was changed"));
    assert!(writes_since(&pve, seq).await.is_empty(), "dry run wrote");
    assert!(!stderr.contains(&pve.token_secret), "secret in output");
    assert!(!stdout.contains(&pve.token_secret), "secret in output");

    // spec.dryRun: true is a dry run too.
    let seq = last_seq(&pve).await;
    let p = write_policy(dir.path(), "  archive: {mode: delete}\n  dryRun: true\n");
    assert_eq!(
        prune(&pve, &["-f", p.to_str().unwrap()]).status.code(),
        Some(0)
    );
    assert!(writes_since(&pve, seq).await.is_empty());

    // For real.
    let p = write_policy(dir.path(), "  archive: {mode: delete}\n");
    let out = prune(&pve, &["-f", p.to_str().unwrap()]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    assert!(
        stdout.contains("1601 delete ok") && stdout.contains("1602 delete ok"),
        "{stdout}"
    );
    let c = client(&pve);
    assert!(!exists(&c, &pve, 1601).await && exists(&c, &pve, 1603).await);
}

#[tokio::test]
async fn prune_cli_exit_codes() {
    let pve = FakePve::start().await;
    add_template(&pve, 1701, 200, T::default()).await;
    add_template(
        &pve,
        1702,
        5,
        T {
            latest: true,
            ..T::default()
        },
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    // Invalid file: 2, naming the field, nothing asked of Proxmox.
    let seq = last_seq(&pve).await;
    let bad = write_policy(dir.path(), "  retainAtLeast: 5\n");
    let out = prune(&pve, &["-f", bad.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("retainAtLeast must not exceed keepLast")
    );
    assert!(pve.requests_since(seq).await.is_empty());
    // A failing action: 4.
    pve.fail(Failure::status(
        "POST",
        "/nodes/{node}/vzdump",
        500,
        "storage offline",
    ))
    .await;
    let p = write_policy(
        dir.path(),
        "  archive: {mode: backup, backupStorage: local}\n",
    );
    let out = prune(&pve, &["-f", p.to_str().unwrap()]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(4), "{stdout}");
    assert!(stdout.contains("1701 archive FAILED"), "{stdout}");
    // Proxmox unreachable: 3.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_sombrero"))
        .args(["prune", "-f", p.to_str().unwrap()])
        .env("PROXMOX_URL", "https://127.0.0.1:1")
        .env("PROXMOX_TOKEN_ID", &pve.token_id)
        .env("PROXMOX_TOKEN_SECRET", &pve.token_secret)
        .env("PROXMOX_CA_CERT", &pve.ca_cert_path)
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Look-alikes of our image's templates, all old enough to go and carrying its tags: another
/// uid (a second cluster's controller, same namespace and name), another namespace, a copied
/// marker (a consumer's clone turned into a template), the same name without a marker, and a
/// protected one of ours. `sombrero prune` deletes only our unguarded template and says why
/// for each other; `--owner-uid` acts on the other uid's templates instead, and only on those.
#[tokio::test]
async fn prune_cli_touches_only_the_exact_owner() {
    let pve = FakePve::start().await;
    let other_uid = Owner {
        uid: "7d1c0c6e-0000-4000-8000-0000000000aa".into(),
        ..ours()
    };
    let other = |owner: &Owner| T {
        owner: Some(owner.clone()),
        ..T::default()
    };
    add_template(&pve, 2101, 200, T::default()).await;
    add_template(&pve, 2102, 200, other(&other_uid)).await;
    add_template(&pve, 2108, 10, other(&other_uid)).await;
    let team_b = Owner {
        namespace: "team-b".into(),
        ..ours()
    };
    add_template(&pve, 2103, 200, other(&team_b)).await;
    let copied = T {
        marker_for: Some(2106),
        ..T::default()
    };
    add_template(&pve, 2104, 200, copied).await;
    let unmarked = T {
        no_marker: true,
        name: Some(name(2101, 200)),
        ..T::default()
    };
    add_template(&pve, 2105, 200, unmarked).await;
    let protected = T {
        protected: true,
        ..T::default()
    };
    add_template(&pve, 2107, 200, protected).await;
    let latest = T {
        latest: true,
        ..T::default()
    };
    add_template(&pve, 2106, 5, latest).await;
    let all = [2101, 2102, 2103, 2104, 2105, 2106, 2107, 2108];
    let dir = tempfile::tempdir().unwrap();
    let policy = write_policy(
        dir.path(),
        "  retainAtLeast: 0\n  archive: {mode: delete}\n",
    );
    let policy = policy.to_str().unwrap();
    let line_of = |out: &str, vmid: u32| -> String {
        out.lines()
            .find(|l| l.starts_with(&format!("{vmid} ")))
            .unwrap_or_else(|| panic!("no line for {vmid}:\n{out}"))
            .to_string()
    };

    let seq = last_seq(&pve).await;
    let out = prune(&pve, &["-f", policy, "--dry-run"]);
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    for (vmid, action, reason) in [
        (2101, "delete", "older than 30d and not among the last 1"),
        (
            2102,
            "ignore",
            "not ours: owned by another GoldenImage platform/ubuntu (uid 7d1c0c6e-0000-4000-8000-0000000000aa)",
        ),
        (
            2108,
            "ignore",
            "not ours: owned by another GoldenImage platform/ubuntu",
        ),
        (
            2103,
            "ignore",
            "not ours: owned by team-b/ubuntu in another namespace",
        ),
        (
            2104,
            "ignore",
            "not ours: its marker was not written for this template",
        ),
        (2105, "ignore", "not ours: it has no sombrero marker"),
        (2107, "keep", "protected (protection=1)"),
        (2106, "keep", "current latest"),
    ] {
        let line = line_of(&stdout, vmid);
        assert!(
            line.contains(&format!("  {action}  ")) && line.contains(reason),
            "{vmid}: {line}"
        );
    }
    assert!(writes_since(&pve, seq).await.is_empty());

    // For real: one DELETE, of 2101.
    let seq = last_seq(&pve).await;
    let out = prune(&pve, &["-f", policy]);
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    assert!(stdout.contains("2101 delete ok"), "{stdout}");
    let writes = writes_since(&pve, seq).await;
    assert!(
        !writes.is_empty()
            && writes
                .iter()
                .all(|w| w.starts_with("DELETE") && w.contains("/2101")),
        "{writes:?}"
    );
    let c = client(&pve);
    for vmid in all {
        assert_eq!(exists(&c, &pve, vmid).await, vmid != 2101, "{vmid}");
    }

    // `--owner-uid`: the other cluster's image, whose older template goes; nothing else.
    let seq = last_seq(&pve).await;
    let out = prune(&pve, &["-f", policy, "--owner-uid", &other_uid.uid]);
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    assert!(stdout.contains("2102 delete ok"), "{stdout}");
    assert!(
        line_of(&stdout, 2106).contains("not ours: owned by another GoldenImage"),
        "{stdout}"
    );
    let writes = writes_since(&pve, seq).await;
    assert!(
        writes
            .iter()
            .all(|w| w.starts_with("DELETE") && w.contains("/2102")),
        "{writes:?}"
    );
    for vmid in all {
        assert_eq!(
            exists(&c, &pve, vmid).await,
            ![2101, 2102].contains(&vmid),
            "{vmid}"
        );
    }
    // A forced delete of a look-alike is refused by the re-check, whatever the plan says.
    for vmid in [2103, 2108] {
        let r = retention::execute(&c, &forced_delete(vmid), None, false, &quiet).await;
        assert!(
            !r[0].succeeded && r[0].message.contains("not ours: owned by"),
            "{r:?}"
        );
        assert!(exists(&c, &pve, vmid).await);
    }
}

#[tokio::test]
async fn prune_cli_refuses_a_token_missing_a_privilege_its_plan_needs_before_any_change() {
    let pve = FakePve::start().await;
    add_template(&pve, 1701, 200, T::default()).await;
    add_template(
        &pve,
        1702,
        5,
        T {
            latest: true,
            ..T::default()
        },
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let p = write_policy(
        dir.path(),
        "  archive: {mode: backup, backupStorage: local}\n",
    );
    let role = sombrero::privileges::table::role_privileges(sombrero::proxmox::PveVersion {
        major: 9,
        minor: 0,
    });
    let privs: Vec<&str> = role.into_iter().filter(|p| *p != "VM.Backup").collect();
    let (id, secret) = pve.add_token(&privs).await;
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_sombrero"))
        .args(["prune", "-f", p.to_str().unwrap()])
        .env("PROXMOX_URL", &pve.url)
        .env("PROXMOX_TOKEN_ID", &id)
        .env("PROXMOX_TOKEN_SECRET", &secret)
        .env("PROXMOX_CA_CERT", &pve.ca_cert_path)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(6), "{stderr}");
    // The plan archives 1701: that is where the privilege is needed.
    assert!(
        stderr.contains("  VM.Backup on /vms/1701: to back up templates"),
        "{stderr}"
    );
    let writes: Vec<_> = pve
        .requests()
        .await
        .into_iter()
        .filter(|r| r.token_id.as_deref() == Some(id.as_str()) && r.method != "GET")
        .collect();
    assert!(writes.is_empty(), "{writes:?}");
    let c = client(&pve);
    assert!(exists(&c, &pve, 1701).await && exists(&c, &pve, 1702).await);
}

// ------------------------------------------------------------------ the controller

mod controller_e2e {
    use super::*;
    use std::time::Instant;

    use k8s_openapi::api::events::v1::Event as K8sEvent;
    use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
    use sombrero::api::common::find_condition;
    use sombrero::api::template_retention::TemplateRetention;
    use support::controller::{controller_client, options, put_secret, start};
    use support::kube::control_plane;

    async fn wait_for(
        api: &Api<TemplateRetention>,
        name: &str,
        what: &str,
        check: impl Fn(&TemplateRetention) -> bool,
    ) -> TemplateRetention {
        let start = Instant::now();
        loop {
            let tr = api.get(name).await.expect("get TemplateRetention");
            if check(&tr) {
                return tr;
            }
            if start.elapsed() > Duration::from_secs(60) {
                panic!("timed out waiting for {what}; status: {:#?}", tr.status);
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }

    /// A template of the image `ubuntu` of namespace `ns` (the tags stay `sombrero.platform.ubuntu`).
    fn in_ns(ns: &str) -> T {
        T {
            owner: Some(Owner {
                namespace: ns.into(),
                ..ours()
            }),
            ..T::default()
        }
    }

    fn ready_reason(tr: &TemplateRetention) -> Option<(String, String)> {
        let st = tr.status.as_ref()?;
        let c = find_condition(&st.conditions, "Ready")?;
        Some((c.status.clone(), c.reason.clone()))
    }

    #[tokio::test]
    async fn controller_plans_dry_run_then_executes_with_events() {
        let cp = control_plane();
        cp.install_crds();
        let client = cp.client().await;
        let ns = cp.namespace(&client, "retention").await;
        // The controller runs with the chart's ServiceAccount permissions, not cluster-admin.
        let (rbac, sa) = controller_client(cp, &ns).await;
        let pve = FakePve::start().await;
        for (vmid, days) in [(1801, 200), (1802, 150), (1803, 100), (1804, 50)] {
            add_template(&pve, vmid, days, in_ns(&ns)).await;
        }
        add_template(
            &pve,
            1805,
            10,
            T {
                latest: true,
                ..in_ns(&ns)
            },
        )
        .await;
        put_secret(&client, &ns, "pve", &pve, &pve.token_secret).await;
        let seq = last_seq(&pve).await;

        let api: Api<TemplateRetention> = Api::namespaced(client.clone(), &ns);
        let tr: TemplateRetention = serde_json::from_value(json!({
            "apiVersion": "images.sombrero.dev/v1alpha1",
            "kind": "TemplateRetention",
            "metadata": {"name": "ubuntu"},
            "spec": {
                "target": {"tagSelector": [format!("sombrero.{NS}.{IMAGE}")]},
                "proxmox": {"secretRef": {"name": "pve"}},
                "archive": {"mode": "delete"},
                "dryRun": true,
                "interval": "1h",
            }
        }))
        .unwrap();
        api.create(&PostParams::default(), &tr)
            .await
            .expect("create");
        // A policy pointing at a GoldenImage that does not exist: Stalled, with the field.
        let missing: TemplateRetention = serde_json::from_value(json!({
            "apiVersion": "images.sombrero.dev/v1alpha1",
            "kind": "TemplateRetention",
            "metadata": {"name": "missing"},
            "spec": {"target": {"goldenImageRef": {"name": "nope"}}},
        }))
        .unwrap();
        api.create(&PostParams::default(), &missing)
            .await
            .expect("create");

        let handle = start(&sa, options(&rbac, "retention-test", false));

        let tr = wait_for(&api, "ubuntu", "the dry-run plan", |tr| {
            ready_reason(tr).is_some_and(|(_, r)| r == "DryRun")
        })
        .await;
        let st = tr.status.clone().unwrap();
        assert_eq!(
            st.target_description.as_deref(),
            Some("tags: sombrero.platform.ubuntu")
        );
        assert!(st.planned_at.is_some());
        assert_eq!(st.observed_generation, tr.metadata.generation);
        let plan: Vec<(u32, &str, &str)> = st
            .plan
            .iter()
            .map(|p| (p.vmid, p.action.as_str(), p.reason.as_str()))
            .collect();
        assert_eq!(
            plan,
            [
                (1805, "keep", "current latest"),
                (1804, "keep", "among the last 3"),
                (1803, "keep", "among the last 3"),
                (1802, "delete", "older than 90d and not among the last 3"),
                (1801, "delete", "older than 90d and not among the last 3"),
            ]
        );
        assert!(st.executed.is_empty());
        assert!(
            writes_since(&pve, seq).await.is_empty(),
            "dry run wrote to Proxmox"
        );

        let missing = wait_for(&api, "missing", "Stalled", |tr| {
            tr.status
                .as_ref()
                .and_then(|s| find_condition(&s.conditions, "Stalled"))
                .is_some()
        })
        .await;
        let stalled = find_condition(&missing.status.as_ref().unwrap().conditions, "Stalled")
            .unwrap()
            .clone();
        assert_eq!(stalled.reason, "InvalidSpec");
        assert!(
            stalled.message.contains("target.goldenImageRef.name")
                && stalled.message.contains("nope"),
            "{}",
            stalled.message
        );

        // Turn the dry run off: the two old templates go, with an Event each.
        api.patch(
            "ubuntu",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"dryRun": false}})),
        )
        .await
        .expect("patch");
        let tr = wait_for(&api, "ubuntu", "execution", |tr| {
            tr.status.as_ref().is_some_and(|s| !s.executed.is_empty())
                && ready_reason(tr).is_some_and(|(s, r)| s == "True" && r == "Executed")
        })
        .await;
        let st = tr.status.unwrap();
        let executed: Vec<(u32, &str, bool)> = st
            .executed
            .iter()
            .map(|e| (e.vmid, e.action.as_str(), e.succeeded))
            .collect();
        assert_eq!(executed, [(1801, "delete", true), (1802, "delete", true)]);
        assert!(find_condition(&st.conditions, "Reconciling").is_none());
        let c = client_for(&pve);
        for vmid in [1801, 1802] {
            assert!(!exists(&c, &pve, vmid).await);
        }
        for vmid in [1803, 1804, 1805] {
            assert!(exists(&c, &pve, vmid).await);
        }
        let events: Api<K8sEvent> = Api::namespaced(client.clone(), &ns);
        let start = Instant::now();
        loop {
            let deleted: Vec<String> = events
                .list(&ListParams::default())
                .await
                .expect("events")
                .items
                .into_iter()
                .filter(|e| {
                    e.reason.as_deref() == Some("Deleted")
                        && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("ubuntu")
                })
                .filter_map(|e| e.note)
                .collect();
            if deleted.len() >= 2 {
                assert!(
                    deleted
                        .iter()
                        .any(|n| n.starts_with("template 1801: deleted")),
                    "{deleted:?}"
                );
                assert!(
                    deleted
                        .iter()
                        .any(|n| n.starts_with("template 1802: deleted")),
                    "{deleted:?}"
                );
                break;
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "Events: {deleted:?}"
            );
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        handle.abort();
        rbac.assert_nothing_denied();
    }

    #[tokio::test]
    async fn a_retention_replans_when_its_golden_image_gets_a_template() {
        use support::controller::{create_image_with, is_ready, wait_for as wait_for_image};
        let cp = control_plane();
        cp.install_crds();
        let client = cp.client().await;
        let ns = cp.namespace(&client, "retention-watch").await;
        let (rbac, sa) = controller_client(cp, &ns).await;
        let pve = FakePve::start().await;
        put_secret(&client, &ns, "pve", &pve, &pve.token_secret).await;
        let api: Api<TemplateRetention> = Api::namespaced(client.clone(), &ns);
        let tr: TemplateRetention = serde_json::from_value(json!({
            "apiVersion": "images.sombrero.dev/v1alpha1",
            "kind": "TemplateRetention",
            "metadata": {"name": "img"},
            "spec": {"target": {"goldenImageRef": {"name": "img"}}, "dryRun": true, "interval": "1h"},
        }))
        .unwrap();
        api.create(&PostParams::default(), &tr)
            .await
            .expect("create");
        // The build slowed down (1 PVE s = 50 ms) so the first plan surely comes before the
        // template: a build on the instant fake can finish before the retention's first run.
        pve.set_time_scale(0.05).await;
        create_image_with(&client, &ns, "img", &pve, "pve", json!({})).await;
        let handle = start(&sa, options(&rbac, "retention-watch", false));

        // First plan: the image has no template yet.
        let first = wait_for(&api, "img", "the first plan", |tr| {
            tr.status.as_ref().is_some_and(|s| s.planned_at.is_some())
        })
        .await;
        assert!(
            first.status.as_ref().unwrap().plan.is_empty(),
            "planned after the image had a template already: {:#?}",
            first.status
        );
        pve.set_time_scale(0.0).await;
        // The image's first template lands: the retention plans it at once, not after 1h.
        let gi = wait_for_image(
            &client,
            &ns,
            "img",
            "Ready=True",
            Duration::from_secs(300),
            is_ready,
        )
        .await;
        let vmid = gi.status.unwrap().latest.unwrap().vmid;
        let tr = wait_for(&api, "img", "a plan with the new template", |tr| {
            tr.status
                .as_ref()
                .is_some_and(|s| s.plan.iter().any(|p| p.vmid == vmid))
        })
        .await;
        let st = tr.status.unwrap();
        assert_eq!(st.target_versions, vec![vmid]);
        assert_eq!(st.plan[0].action, "keep", "{:#?}", st.plan);
        handle.abort();
        rbac.assert_nothing_denied();
    }

    #[tokio::test]
    async fn controller_reports_failed_archives() {
        let cp = control_plane();
        cp.install_crds();
        let client = cp.client().await;
        let ns = cp.namespace(&client, "retention-fail").await;
        // The controller runs with the chart's ServiceAccount permissions, not cluster-admin.
        let (rbac, sa) = controller_client(cp, &ns).await;
        let pve = FakePve::start().await;
        add_template(&pve, 1901, 200, in_ns(&ns)).await;
        add_template(
            &pve,
            1902,
            5,
            T {
                latest: true,
                ..in_ns(&ns)
            },
        )
        .await;
        put_secret(&client, &ns, "pve", &pve, &pve.token_secret).await;
        pve.fail(Failure::status(
            "POST",
            "/nodes/{node}/vzdump",
            500,
            "storage 'local' is not online",
        ))
        .await;
        let api: Api<TemplateRetention> = Api::namespaced(client.clone(), &ns);
        let tr: TemplateRetention = serde_json::from_value(json!({
            "apiVersion": "images.sombrero.dev/v1alpha1",
            "kind": "TemplateRetention",
            "metadata": {"name": "ubuntu"},
            "spec": {
                "target": {"tagSelector": [format!("sombrero.{NS}.{IMAGE}")]},
                "proxmox": {"secretRef": {"name": "pve"}},
                "keepLast": 1,
                "archiveAfter": "30d",
                "archive": {"mode": "backup", "backupStorage": "local"},
            }
        }))
        .unwrap();
        api.create(&PostParams::default(), &tr)
            .await
            .expect("create");
        let handle = start(&sa, options(&rbac, "retention-test", false));
        let tr = wait_for(&api, "ubuntu", "ActionsFailed", |tr| {
            ready_reason(tr).is_some_and(|(s, r)| s == "False" && r == "ActionsFailed")
        })
        .await;
        let st = tr.status.unwrap();
        assert_eq!(st.executed.len(), 1);
        assert!(!st.executed[0].succeeded);
        assert!(
            st.executed[0].message.contains("nothing was deleted"),
            "{:?}",
            st.executed
        );
        let rec = find_condition(&st.conditions, "Reconciling").expect("Reconciling");
        assert_eq!(rec.reason, "RetryingFailedActions");
        assert!(find_condition(&st.conditions, "Stalled").is_none());
        assert!(exists(&client_for(&pve), &pve, 1901).await);
        let events: Api<K8sEvent> = Api::namespaced(client.clone(), &ns);
        let start = Instant::now();
        loop {
            let failed = events
                .list(&ListParams::default())
                .await
                .expect("events")
                .items
                .into_iter()
                .any(|e| {
                    e.reason.as_deref() == Some("ArchiveFailed")
                        && e.type_.as_deref() == Some("Warning")
                        && e.note
                            .as_deref()
                            .is_some_and(|n| n.contains("template 1901"))
                });
            if failed {
                break;
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "no ArchiveFailed Event"
            );
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        // No secret in the status or the Events.
        let all = format!(
            "{:?}{:?}",
            api.get("ubuntu").await.unwrap().status,
            events.list(&ListParams::default()).await.unwrap().items
        );
        assert!(!all.contains(&pve.token_secret));
        handle.abort();
        rbac.assert_nothing_denied();
    }

    /// A token without `VM.Allocate` (the README's role otherwise): the run that would delete
    /// is Stalled (InsufficientPrivileges) naming the privilege and the template's path, and
    /// makes no write; the full token then lets it finish.
    #[tokio::test]
    async fn a_token_missing_a_privilege_the_plan_needs_stalls_before_any_write() {
        let cp = control_plane();
        cp.install_crds();
        let client = cp.client().await;
        let ns = cp.namespace(&client, "retention-privs").await;
        let (rbac, sa) = controller_client(cp, &ns).await;
        let pve = FakePve::start().await;
        add_template(&pve, 2301, 200, in_ns(&ns)).await;
        add_template(
            &pve,
            2302,
            5,
            T {
                latest: true,
                ..in_ns(&ns)
            },
        )
        .await;
        let role = sombrero::privileges::table::role_privileges(sombrero::proxmox::PveVersion {
            major: 9,
            minor: 0,
        });
        let privs: Vec<&str> = role.into_iter().filter(|p| *p != "VM.Allocate").collect();
        let (token_id, token_secret) = pve.add_token(&privs).await;
        put_secret(&client, &ns, "pve", &pve, &token_secret).await;
        let secrets: Api<k8s_openapi::api::core::v1::Secret> = Api::namespaced(client.clone(), &ns);
        secrets
            .patch(
                "pve",
                &PatchParams::default(),
                &Patch::Merge(json!({"stringData": {"tokenId": token_id}})),
            )
            .await
            .unwrap();
        let api: Api<TemplateRetention> = Api::namespaced(client.clone(), &ns);
        let tr: TemplateRetention = serde_json::from_value(json!({
            "apiVersion": "images.sombrero.dev/v1alpha1",
            "kind": "TemplateRetention",
            "metadata": {"name": "ubuntu"},
            "spec": {
                "target": {"tagSelector": [format!("sombrero.{NS}.{IMAGE}")]},
                "proxmox": {"secretRef": {"name": "pve"}},
                "keepLast": 1,
                "archiveAfter": "30d",
                "archive": {"mode": "delete"},
            }
        }))
        .unwrap();
        api.create(&PostParams::default(), &tr)
            .await
            .expect("create");
        let handle = start(&sa, options(&rbac, "retention-test", false));
        let tr = wait_for(&api, "ubuntu", "Stalled", |tr| {
            tr.status
                .as_ref()
                .and_then(|st| find_condition(&st.conditions, "Stalled"))
                .is_some_and(|c| c.status == "True")
        })
        .await;
        let st = tr.status.unwrap();
        let stalled = find_condition(&st.conditions, "Stalled").unwrap();
        assert_eq!(
            stalled.reason, "InsufficientPrivileges",
            "{}",
            stalled.message
        );
        assert!(
            stalled
                .message
                .contains("  VM.Allocate on /vms/2301: to delete templates"),
            "{}",
            stalled.message
        );
        assert!(!stalled.message.contains(&token_secret));
        let writes: Vec<_> = pve
            .requests()
            .await
            .into_iter()
            .filter(|r| r.token_id.as_deref() == Some(token_id.as_str()) && r.method != "GET")
            .collect();
        assert!(writes.is_empty(), "{writes:?}");
        assert!(exists(&client_for(&pve), &pve, 2301).await);
        // The full token (and a touch, so the stalled policy runs now): the deletion runs.
        put_secret(&client, &ns, "pve", &pve, &pve.token_secret).await;
        api.patch(
            "ubuntu",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {"token": "fixed"}}})),
        )
        .await
        .unwrap();
        wait_for(&api, "ubuntu", "Executed", |tr| {
            ready_reason(tr).is_some_and(|(s, r)| s == "True" && r == "Executed")
        })
        .await;
        assert!(!exists(&client_for(&pve), &pve, 2301).await);
        handle.abort();
        rbac.assert_nothing_denied();
    }

    /// Two namespaces' images carry the same tags; a `tagSelector` policy in each (each
    /// namespace with its own controller, as two teams' namespaced installs run) acts on its own
    /// namespace's templates only and lists the other's as not ours.
    #[tokio::test]
    async fn tag_selectors_act_on_their_own_namespace_only() {
        let cp = control_plane();
        cp.install_crds();
        let client = cp.client().await;
        let pve = FakePve::start().await;
        let mut namespaces = Vec::new();
        for (prefix, old, latest) in [("ret-a", 2201, 2202), ("ret-b", 2211, 2212)] {
            let ns = cp.namespace(&client, prefix).await;
            add_template(&pve, old, 200, in_ns(&ns)).await;
            let t = T {
                latest: true,
                ..in_ns(&ns)
            };
            add_template(&pve, latest, 5, t).await;
            put_secret(&client, &ns, "pve", &pve, &pve.token_secret).await;
            let api: Api<TemplateRetention> = Api::namespaced(client.clone(), &ns);
            let tr: TemplateRetention = serde_json::from_value(json!({
                "apiVersion": "images.sombrero.dev/v1alpha1",
                "kind": "TemplateRetention",
                "metadata": {"name": "all-ubuntu"},
                "spec": {
                    "target": {"tagSelector": ["os.ubuntu-24.04"]},
                    "proxmox": {"secretRef": {"name": "pve"}},
                    "keepLast": 1,
                    "retainAtLeast": 0,
                    "archiveAfter": "30d",
                    "archive": {"mode": "delete"},
                }
            }))
            .unwrap();
            api.create(&PostParams::default(), &tr)
                .await
                .expect("create");
            namespaces.push((ns, api, old, latest));
        }
        let c = client_for(&pve);
        let (ns_a, api_a, old_a, latest_a) = &namespaces[0];
        let (ns_b, api_b, old_b, latest_b) = &namespaces[1];

        // Namespace a's controller: a's old template goes; b's are listed, not touched.
        let (rbac_a, sa_a) = controller_client(cp, ns_a).await;
        let ctl_a = start(&sa_a, options(&rbac_a, "a", false));
        let tr = wait_for(api_a, "all-ubuntu", "a executed", |tr| {
            ready_reason(tr).is_some_and(|(s, r)| s == "True" && r == "Executed")
        })
        .await;
        let plan: Vec<(u32, String, String)> = tr
            .status
            .unwrap()
            .plan
            .into_iter()
            .map(|p| (p.vmid, p.action, p.reason))
            .collect();
        let foreign = format!("not ours: owned by {ns_b}/ubuntu in another namespace");
        assert_eq!(
            plan,
            [
                (*latest_b, "ignore".into(), foreign.clone()),
                (*latest_a, "keep".into(), "current latest".into()),
                (*old_b, "ignore".into(), foreign.clone()),
                (
                    *old_a,
                    "delete".into(),
                    "older than 30d and not among the last 1".into()
                ),
            ]
        );
        assert!(!exists(&c, &pve, *old_a).await);
        for vmid in [latest_a, old_b, latest_b] {
            assert!(exists(&c, &pve, *vmid).await, "{vmid}");
        }

        // Namespace b's: the same for b.
        let (rbac_b, sa_b) = controller_client(cp, ns_b).await;
        let ctl_b = start(&sa_b, options(&rbac_b, "b", false));
        let tr = wait_for(api_b, "all-ubuntu", "b executed", |tr| {
            ready_reason(tr).is_some_and(|(s, r)| s == "True" && r == "Executed")
        })
        .await;
        let st = tr.status.unwrap();
        assert_eq!(
            st.executed
                .iter()
                .map(|e| (e.vmid, e.succeeded))
                .collect::<Vec<_>>(),
            [(*old_b, true)]
        );
        assert!(
            st.plan.iter().any(|p| p.vmid == *latest_a
                && p.action == "ignore"
                && p.reason.contains(ns_a.as_str())),
            "{:?}",
            st.plan
        );
        assert!(!exists(&c, &pve, *old_b).await);
        for vmid in [latest_a, latest_b] {
            assert!(exists(&c, &pve, *vmid).await, "{vmid}");
        }
        ctl_a.abort();
        ctl_b.abort();
        rbac_a.assert_nothing_denied();
        rbac_b.assert_nothing_denied();
    }

    fn client_for(pve: &FakePve) -> Client {
        super::client(pve)
    }
}

/// A fresh fake for one retention run: 1301 and 1302 old, 1303 the latest, and a second
/// cluster's old template of the same image (1304: another owner uid). Answers the look-alike's
/// config digest and the last request's sequence number.
async fn lost_answer_start(pve: &FakePve, c: &Client) -> (Option<String>, u64) {
    pve.reset().await;
    add_template(pve, 1301, 200, T::default()).await;
    add_template(pve, 1302, 150, T::default()).await;
    add_template(
        pve,
        1303,
        5,
        T {
            latest: true,
            ..T::default()
        },
    )
    .await;
    let other = Owner {
        uid: "a-second-cluster".into(),
        ..ours()
    };
    add_template(
        pve,
        1304,
        300,
        T {
            owner: Some(other),
            ..T::default()
        },
    )
    .await;
    let digest = c.vm_config(&pve.node, 1304).await.unwrap().digest;
    (digest, last_seq(pve).await)
}

/// The answer to each write of a retention run lost in turn, in each archive mode (the fake
/// runs the request, then closes the connection): the run reads back what happened and
/// reports the truth: every removal succeeded, one backup per archived template, nothing else
/// touched.
#[tokio::test]
async fn losing_the_answer_to_every_write_of_a_retention_run() {
    let pve = FakePve::start().await;
    let c = client(&pve);
    let rules = RetentionRules {
        keep_last: 1,
        archive_after: chrono::Duration::days(30),
        retain_at_least: 1,
    };
    for mode in [ArchiveMode::Delete, ArchiveMode::Backup, ArchiveMode::Tag] {
        let storage = (mode == ArchiveMode::Backup).then_some("local");
        let (_, seq) = lost_answer_start(&pve, &c).await;
        run(&pve, rules, mode, storage).await;
        let writes = writes_since(&pve, seq).await.len() as u64;
        assert!(writes >= 2, "{mode:?}: {writes} writes");
        for k in 1..=writes {
            let (digest, seq) = lost_answer_start(&pve, &c).await;
            pve.arm_trap(
                support::fakepve::Trap::new(support::fakepve::TrapAction::Drop, k).writes_only(),
            )
            .await;
            let (_, results) = run(&pve, rules, mode, storage).await;
            let made = writes_since(&pve, seq).await;
            let when = format!(
                "{mode:?}: the answer to write {k} of {writes} ({}) lost",
                made.get((k - 1) as usize).cloned().unwrap_or_default()
            );
            assert!(
                pve.trap_state().await.fired,
                "{when}: the trap did not fire"
            );
            let done: Vec<(u32, bool)> = results.iter().map(|r| (r.vmid, r.succeeded)).collect();
            assert_eq!(done, [(1301, true), (1302, true)], "{when}: {results:#?}");
            for vmid in [1301, 1302] {
                let archived = match mode {
                    ArchiveMode::Tag => tags(&c, &pve, vmid).await.contains("archived"),
                    _ => !exists(&c, &pve, vmid).await,
                };
                assert!(archived, "{when}: {vmid} not removed");
                if mode == ArchiveMode::Backup {
                    let backups = c
                        .storage_content(&pve.node, "local", Some("backup"), Some(vmid))
                        .await
                        .unwrap();
                    assert_eq!(backups.len(), 1, "{when}: backups of {vmid}: {backups:?}");
                }
            }
            assert!(exists(&c, &pve, 1303).await, "{when}: the latest is gone");
            assert_eq!(
                c.vm_config(&pve.node, 1304).await.unwrap().digest,
                digest,
                "{when}: the second cluster's template was touched"
            );
        }
    }
}
