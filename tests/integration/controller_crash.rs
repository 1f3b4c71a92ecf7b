//! `sombrero controller` (a subprocess, as the chart runs it) SIGKILLed right after each of its
//! Proxmox requests in turn during a build + validate + promote, then started again and run to
//! Ready. After each: one template per build number, consecutive numbers, exactly one holder
//! of the channel tag, no VM left that is not a template, the foreign VMs untouched.

use crate::support;
use crate::support::crash;

use std::time::{Duration, Instant};

use kube::api::{Api, DeleteParams, Patch, PatchParams};
use kube::{Client, ResourceExt};
use serde_json::json;
use sombrero::api::GoldenImage;
use sombrero::image::marker::{Marker, Role, parse_description, render_description};
use sombrero::image::tags::{OWNER_TAG, TagSet};
use sombrero::proxmox::{self, VmConfig};
use support::controller::{
    ControllerProcess, controller_client, create_image_with, is_ready, kubeconfig_as, put_secret,
    pve_client, wait_for,
};
use support::fakepve::{FakePve, Trap, TrapAction};
use support::kube::control_plane;

const NAME: &str = "img";
const SOMBRERO: &str = env!("CARGO_BIN_EXE_sombrero");

/// The VMs that are not ours: a stranger's running VM, and a second cluster's build VM of a
/// same-named image (our tags, a name our build could take, a marker naming its own VMID and
/// another owner uid). Answers (VMID, config, running).
async fn foreign_vms(pve: &FakePve, c: &proxmox::Client, ns: &str) -> Vec<(u32, VmConfig, bool)> {
    pve.add_vm(json!({"vmid": 100, "name": "someone-elses-db", "status": "running"}))
        .await;
    let today = chrono::Utc::now().date_naive();
    let name = format!("ubuntu-24.04-minimal-{}-050", today.format("%Y%m%d"));
    let marker: Marker = serde_json::from_value(json!({
        "schema": 1,
        "owner": {"namespace": ns, "name": NAME, "uid": "a-second-cluster"},
        "build_id": "elsewhere", "role": "build", "vmid": 102,
        "metadata": {
            "name": name, "os": "ubuntu-24.04", "type": "minimal", "builder": "sombrero",
            "builder_version": "0.1.0", "build_date": today, "build_number": 50,
            "spec_hash": "0123456789abcdef", "validation": {"status": "pending"},
        }
    }))
    .unwrap();
    pve.add_vm(json!({
        "vmid": 102, "name": name, "status": "stopped",
        "config": {"tags": format!("{OWNER_TAG};sombrero.{ns}.{NAME}"),
                   "description": render_description("", &marker).unwrap()},
    }))
    .await;
    let mut out = Vec::new();
    for vmid in [100, 102] {
        let running = c.vm_status(&pve.node, vmid).await.unwrap().status == "running";
        out.push((vmid, c.vm_config(&pve.node, vmid).await.unwrap(), running));
    }
    out
}

/// A fresh start: the previous GoldenImage gone (its finalizer dropped: no controller runs
/// now, and the fake is reset anyway), a fresh fake with the foreign VMs, a new GoldenImage.
/// Answers its uid, the foreign VMs and the last request's sequence number.
async fn fresh(
    client: &Client,
    ns: &str,
    pve: &FakePve,
    c: &proxmox::Client,
) -> (String, Vec<(u32, VmConfig, bool)>, u64) {
    let api: Api<GoldenImage> = Api::namespaced(client.clone(), ns);
    if api.get_opt(NAME).await.unwrap().is_some() {
        api.patch(
            NAME,
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"finalizers": null}})),
        )
        .await
        .unwrap();
        let _ = api.delete(NAME, &DeleteParams::default()).await;
        while api.get_opt(NAME).await.unwrap().is_some() {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    pve.reset().await;
    let foreign = foreign_vms(pve, c, ns).await;
    let uid = create_image_with(client, ns, NAME, pve, "pve", json!({}))
        .await
        .uid()
        .unwrap();
    let seq = pve.requests().await.last().map_or(0, |r| r.seq);
    (uid, foreign, seq)
}

async fn ready(client: &Client, ns: &str, when: &str) -> GoldenImage {
    wait_for(client, ns, NAME, when, Duration::from_secs(240), |gi| {
        is_ready(gi) && gi.status.as_ref().is_some_and(|s| s.latest.is_some())
    })
    .await
}

/// The invariants after a run to Ready.
async fn assert_no_duplicate_no_leak(
    c: &proxmox::Client,
    pve: &FakePve,
    uid: &str,
    foreign: &[(u32, VmConfig, bool)],
    when: &str,
) {
    let mut names = Vec::new();
    let mut holders = Vec::new();
    for vm in c.cluster_vms().await.unwrap() {
        let cfg = c.vm_config(&vm.node, vm.vmid).await.unwrap();
        if crash::is_untouched_foreign(c, &pve.node, vm.vmid, &cfg, foreign, when).await {
            continue;
        }
        assert!(
            cfg.template && cfg.lock.is_none(),
            "{when}: VM {} is left and not a template: {cfg:?}",
            vm.vmid
        );
        let m = parse_description(cfg.description.as_deref().unwrap_or(""))
            .ok()
            .flatten()
            .unwrap_or_else(|| panic!("{when}: VM {} has no marker", vm.vmid));
        assert_eq!(
            (m.role, m.vmid, m.owner.uid.as_str()),
            (Role::Template, vm.vmid, uid),
            "{when}"
        );
        if TagSet::parse(cfg.tags.as_deref().unwrap_or("")).is_latest() {
            holders.push(vm.vmid);
        }
        names.push(m.metadata.name);
    }
    crash::foreign_still_there(c, &pve.node, foreign, when).await;
    // The look-alike holds 050, so ours follow it: consecutive from the first, each once.
    crash::assert_consecutive(&mut names, when);
    assert!(names.len() <= 2, "{when}: {names:?}");
    assert_eq!(
        holders.len(),
        1,
        "{when}: holders of the channel tag {holders:?}"
    );
}

fn log_tail(log: &std::path::Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

#[tokio::test]
async fn controller_killed_after_every_request_never_builds_twice_nor_leaks() {
    let started = Instant::now();
    let cp = control_plane();
    cp.install_crds();
    let client = cp.client().await;
    let ns = cp.namespace(&client, "ctl-crash").await;
    let (rbac, _sa) = controller_client(cp, &ns).await;
    let kubeconfig = kubeconfig_as(cp, &rbac);
    let pve = FakePve::start().await;
    let c = pve_client(&pve);
    put_secret(&client, &ns, "pve", &pve, &pve.token_secret).await;
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("controller.log");

    // One clean run: its requests up to Ready.
    let (uid, foreign, seq) = fresh(&client, &ns, &pve, &c).await;
    let mut ctl = ControllerProcess::spawn(SOMBRERO, &kubeconfig, &rbac, &log);
    ctl.go().await;
    ready(&client, &ns, "the counting run Ready").await;
    let n = pve.requests_since(seq).await.len() as u64;
    ctl.kill().await;
    assert_no_duplicate_no_leak(&c, &pve, &uid, &foreign, "the counting run").await;
    assert!(
        n > 30,
        "a build, validation and promotion make more requests than {n}"
    );
    eprintln!(
        "controller crash test: {n} requests in a clean run ({:?})",
        started.elapsed()
    );

    // Every request by default (about 3 minutes here); `SOMBRERO_CRASH_STRIDE=n` kills after
    // every n-th only, for a quick look while working on the controller.
    let stride: u64 = std::env::var("SOMBRERO_CRASH_STRIDE")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1);
    let mut k = 1;
    let mut kills = 0;
    while k <= n {
        kills += 1;
        let (uid, foreign, _) = fresh(&client, &ns, &pve, &c).await;
        let mut ctl = ControllerProcess::spawn(SOMBRERO, &kubeconfig, &rbac, &log);
        pve.arm_trap(Trap::new(TrapAction::Kill { pid: ctl.pid }, k))
            .await;
        ctl.go().await;
        // A controller never ends on its own: polls keep its requests coming until the trap.
        assert!(
            ctl.killed_within(Duration::from_secs(240)).await,
            "k={k}: not killed: {}",
            log_tail(&log)
        );
        let when = format!("killed after request {k} of {n}, then run again");
        let mut again = ControllerProcess::spawn(SOMBRERO, &kubeconfig, &rbac, &log);
        again.go().await;
        ready(&client, &ns, &when).await;
        again.kill().await;
        assert_no_duplicate_no_leak(&c, &pve, &uid, &foreign, &when).await;
        k += stride;
    }
    eprintln!(
        "controller crash test: {kills} kills after the {n} requests of a clean run, {:?}",
        started.elapsed()
    );
    rbac.assert_nothing_denied();
}
