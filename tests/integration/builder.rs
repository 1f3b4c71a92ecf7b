//! The build pipeline against the fake Proxmox VE: both sources, SSH and guest-agent
//! provisioning, names and build numbers, tags and description, checksum and command failures,
//! interruption at every stage, concurrent builds, and a consumer's clone left alone.

use crate::support;
use crate::support::crash;

use std::sync::Arc;
use std::time::Duration;

use chrono::NaiveDate;
use serde_json::json;
use sombrero::api::admission::admit;
use sombrero::api::golden_image::{ProvisioningChannel, TemplateSource};
use sombrero::api::{GoldenImage, GoldenImageSpec};
use sombrero::builder::{BuildError, BuildOutcome, BuildRequest, NoProgress, Progress, Stage};
use sombrero::image::marker::{
    Marker, Owner, Role, SourceInfo, parse_description, render_description,
};
use sombrero::image::tags::image_tag;
use sombrero::proxmox::{Client, Config, VmConfig};
use support::fakepve::{
    CommandFailure, FakePve, GuestSettings, Image, ImageInfo, Options, TrapAction,
};
use tokio::sync::Notify;

const IMAGE: &str = "noble-server-cloudimg-amd64.img";

fn client(pve: &FakePve) -> Client {
    let config = Config::new(&pve.url, &pve.token_id, pve.token_secret.as_str())
        .unwrap()
        .with_ca_pem(pve.ca_pem.clone())
        .unwrap();
    Client::new(config).unwrap()
}

fn day(d: u32) -> NaiveDate {
    NaiveDate::from_ymd_opt(2025, 1, d).unwrap()
}

fn owner(name: &str) -> Owner {
    Owner {
        namespace: "platform".into(),
        name: name.into(),
        uid: format!("uid-{name}"),
    }
}

/// The repository's Ubuntu example, pointed at the fake: its image URL and checksum, the
/// node, a loopback build IP and the fake's SSH port.
fn example_spec(pve: &FakePve, img: &ImageInfo, ip_n: u8) -> GoldenImageSpec {
    let yaml = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/ubuntu-24.04-minimal.yaml"),
    )
    .unwrap();
    let mut spec = admit::<GoldenImage>(&yaml).unwrap().object.spec;
    let ci = spec.source.cloud_image.as_mut().unwrap();
    ci.url = img.url.clone();
    ci.checksum_url = None;
    ci.checksum = Some(format!("sha256:{}", img.checksums["sha256"]));
    spec.placement.node = pve.node.clone();
    spec.provisioning.ssh.ip_config = format!("ip={}/8", pve.guest_ip(ip_n));
    spec.provisioning.ssh.port = pve.ssh_port.expect("the harness serves SSH");
    spec.provisioning.timeout = "2m".into();
    spec
}

/// A request with a build id of its own (a rebuild is a new build id, a resume the same).
fn request(spec: GoldenImageSpec, owner: Owner, today: NaiveDate) -> BuildRequest {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    BuildRequest {
        spec,
        owner,
        build_id: format!("b-{today}-{n}"),
        today,
        adopt_unvalidated: true,
        fresh_id: false,
    }
}

/// Promotes a template as the controller does with validation disabled: it gets the channel
/// tag and is no longer the unvalidated build in flight, so the next request builds anew.
async fn settle(c: &Client, o: &Owner, vmid: u32) {
    sombrero::promote::promote(c, o, vmid, sombrero::promote::Evidence::ValidationDisabled)
        .await
        .unwrap();
}

async fn build(c: &Client, req: &BuildRequest) -> Result<BuildOutcome, BuildError> {
    sombrero::builder::run_build(c, req, &NoProgress).await
}

async fn config(c: &Client, pve: &FakePve, vmid: u32) -> VmConfig {
    c.vm_config(&pve.node, vmid).await.unwrap()
}

fn marker_of(cfg: &VmConfig) -> Marker {
    parse_description(cfg.description.as_deref().unwrap_or(""))
        .unwrap()
        .expect("a marker")
}

/// (vmid, is template, marker role) of every VM carrying the image's tag.
async fn image_vms(c: &Client, o: &Owner) -> Vec<(u32, bool, Option<Role>, String)> {
    let tag = image_tag(&o.namespace, &o.name);
    let mut out = Vec::new();
    for vm in c.cluster_vms().await.unwrap() {
        if vm.tag_list().contains(&tag) {
            let cfg = c.vm_config(&vm.node, vm.vmid).await.unwrap();
            let role = parse_description(cfg.description.as_deref().unwrap_or(""))
                .ok()
                .flatten()
                .map(|m| m.role);
            out.push((vm.vmid, cfg.template, role, cfg.name.unwrap_or_default()));
        }
    }
    out.sort_by_key(|v| v.0);
    out
}

/// The build does not read the VM it created to learn the disk's size: it asks for
/// `hardware.diskGiB`, and an image already larger (PVE refuses to shrink, in the resize task)
/// keeps its own size.
#[tokio::test]
async fn an_image_larger_than_disk_gib_keeps_its_size() {
    let pve = FakePve::start().await;
    let c = client(&pve);
    let img = pve
        .add_image(Image::new(IMAGE).virtual_size(12 << 30))
        .await;
    let o = owner("ubuntu");
    let spec = example_spec(&pve, &img, 1);
    assert_eq!(spec.hardware.disk_gib, 10);
    let out = build(&c, &request(spec, o.clone(), day(18))).await.unwrap();
    assert_eq!(out.size_bytes, 12 << 30, "the image's own size");
    let disk = config(&c, &pve, out.vmid).await.value("scsi0").unwrap();
    assert!(disk.contains("size=12G"), "{disk}");
}

#[tokio::test]
async fn cloud_image_over_ssh_to_a_clean_tagged_template() {
    let pve = FakePve::start().await;
    let c = client(&pve);
    let img = pve.add_image(Image::new(IMAGE)).await;
    let o = owner("ubuntu");
    let out = build(
        &c,
        &request(example_spec(&pve, &img, 1), o.clone(), day(18)),
    )
    .await
    .unwrap();

    assert_eq!(out.name, "ubuntu-24.04-minimal-20250118-001");
    assert_eq!(out.build_number, 1);
    assert_eq!(out.node, pve.node);
    assert_eq!(out.size_bytes, 10 << 30, "resized to hardware.diskGiB");
    assert_eq!(
        out.source_checksum.as_deref(),
        Some(format!("sha256:{}", img.checksums["sha256"]).as_str())
    );
    assert!(
        out.package_manifest
            .iter()
            .any(|p| p.starts_with("qemu-guest-agent=")),
        "{:?}",
        out.package_manifest
    );
    let stages: Vec<Stage> = out.stages.iter().map(|s| s.stage).collect();
    assert_eq!(stages, Stage::ALL.to_vec());

    let cfg = config(&c, &pve, out.vmid).await;
    assert!(cfg.template);
    assert_eq!(cfg.name.as_deref(), Some(out.name.as_str()));
    assert!(cfg.agent_enabled());
    assert!(cfg.value("serial0").is_some() && cfg.value("ide2").unwrap().contains("cloudinit"));
    assert!(cfg.sshkeys.is_none(), "no build key left in the template");
    assert!(
        cfg.value("ipconfig0").is_none(),
        "no build network left in the template"
    );
    assert!(
        cfg.value("ciuser").is_none() && cfg.value("cipassword").is_none(),
        "no build user left in the template: a clone setting none gets the image's default"
    );
    // Removed on the stopped VM (a delete while it runs is only pending in PVE), in the write
    // that finishes the template.
    let reqs = pve.requests().await;
    let shutdown = reqs
        .iter()
        .position(|r| r.method == "POST" && r.path.ends_with("/status/shutdown"))
        .unwrap();
    let cleaned = reqs
        .iter()
        .position(|r| {
            r.method == "PUT"
                && r.path.ends_with(&format!("/qemu/{}/config", out.vmid))
                && r.params["delete"]
                    .as_str()
                    .is_some_and(|d| d.contains("ciuser"))
        })
        .expect("the build settings were removed");
    assert!(cleaned > shutdown);
    let tags = cfg.tag_list();
    for t in [
        "sombrero",
        &image_tag("platform", "ubuntu"),
        "os.ubuntu-24.04",
        "type.minimal",
    ] {
        assert!(tags.iter().any(|x| x == t), "tag {t} missing: {tags:?}");
    }
    // The description block round-trips with the seed's metadata.
    let m = marker_of(&cfg);
    assert_eq!((m.role, m.vmid), (Role::Template, out.vmid));
    assert_eq!(m.owner, o);
    assert_eq!(m.metadata.name, out.name);
    assert_eq!(
        (m.metadata.build_date, m.metadata.build_number),
        (day(18), 1)
    );
    assert_eq!(m.metadata.builder, "sombrero");
    assert_eq!(m.metadata.spec_hash, out.spec_hash);
    assert!(
        m.metadata
            .package_manifest_digest
            .as_deref()
            .unwrap()
            .starts_with("sha256:")
    );
    assert!(
        matches!(&m.metadata.source, Some(SourceInfo::CloudImage { url, checksum: Some(_) }) if *url == img.url)
    );
    assert_eq!(
        render_description("", &m).unwrap(),
        cfg.description.clone().unwrap()
    );

    // The guest: seed packages and services, clean for cloning.
    let g = pve.guest(out.vmid).await;
    assert!(g.has_package("qemu-guest-agent") && g.has_package("cloud-init"));
    // qemu-guest-agent is a static unit (udev starts it at boot), as on a real Debian 12 guest.
    assert_eq!(g.service_state("qemu-guest-agent"), "static");
    assert_eq!(g.service_state("cloud-init"), "enabled");
    assert_eq!(g.machine_id(), "");
    assert_eq!(g.cloud_init_status(), "not-run");
    assert_eq!(g.contents["ssh_host_keys"], json!(false));
    let cmds = pve.agent_commands(out.vmid).await;
    assert!(cmds.iter().all(|c| c.via == "ssh"));
    let lines: Vec<String> = cmds.iter().map(|c| c.line()).collect();
    let pos = |needle: &str| {
        lines
            .iter()
            .position(|l| l.contains(needle))
            .unwrap_or_else(|| panic!("{needle} not run: {lines:#?}"))
    };
    assert!(pos("apt-get update") < pos("full-upgrade -y"));
    assert!(pos("full-upgrade -y") < pos("install -y qemu-guest-agent cloud-init"));
    assert!(pos("systemctl enable") < pos("apt-get clean"));
    assert!(pos("autoremove -y") < pos("cloud-init clean"));

    // The import file is named .qcow2 and reused by the next build (no second download).
    let vols = c
        .storage_content(&pve.node, "local", Some("import"), None)
        .await
        .unwrap();
    assert_eq!(vols.len(), 1);
    assert!(vols[0].volid.ends_with(".qcow2"), "{}", vols[0].volid);
    settle(&c, &o, out.vmid).await;
    let seq = pve.requests().await.last().unwrap().seq;
    let out2 = build(
        &c,
        &request(example_spec(&pve, &img, 1), o.clone(), day(18)),
    )
    .await
    .unwrap();
    assert_eq!(out2.name, "ubuntu-24.04-minimal-20250118-002");
    let tasks = pve.tasks().await;
    let downloads: Vec<_> = tasks.iter().filter(|t| t["type"] == "download").collect();
    assert_eq!(downloads.len(), 2);
    assert!(
        pve.requests_since(seq)
            .await
            .iter()
            .any(|r| r.path.ends_with("/download-url"))
    );
}

/// Records every percent reported during the `Source` stage.
#[derive(Default)]
struct SourcePercents {
    stage: std::sync::Mutex<Option<Stage>>,
    seen: std::sync::Mutex<Vec<f32>>,
}

impl Progress for SourcePercents {
    fn stage(&self, stage: Stage) {
        *self.stage.lock().unwrap() = Some(stage);
    }
    fn message(&self, _: &str) {}
    fn percent(&self, p: f32) {
        if *self.stage.lock().unwrap() == Some(Stage::Source) {
            self.seen.lock().unwrap().push(p);
        }
    }
}

/// The download task's log carries wget's progress lines; the build reports their percentages
/// as they rise, between its own 0 and 100.
#[tokio::test]
async fn download_percent_rises_from_the_task_log() {
    // 0.4: the fake's download takes 2 s, a progress line every 200 ms; the client polls every
    // second and reads the log while the task runs, from a second in (about 50%).
    let pve = FakePve::start_with(Options {
        time_scale: 0.4,
        ..Default::default()
    })
    .await;
    let c = client(&pve);
    let img = pve.add_image(Image::new(IMAGE)).await;
    let progress = SourcePercents::default();
    let req = request(example_spec(&pve, &img, 8), owner("percent"), day(18));
    sombrero::builder::run_build(&c, &req, &progress)
        .await
        .unwrap();
    let seen = progress.seen.lock().unwrap().clone();
    assert_eq!(seen.first(), Some(&0.0), "{seen:?}");
    assert_eq!(seen.last(), Some(&100.0), "{seen:?}");
    assert!(
        seen.iter().any(|p| *p > 0.0 && *p < 100.0),
        "no percent between 0 and 100: {seen:?}"
    );
    assert!(
        seen.windows(2).all(|w| w[0] <= w[1]),
        "the percent went down: {seen:?}"
    );
}

#[tokio::test]
async fn checksum_url_is_resolved_from_a_sums_file() {
    let pve = FakePve::start().await;
    let c = client(&pve);
    let img = pve.add_image(Image::new(IMAGE)).await;
    let sums = format!(
        "{} *{IMAGE}\n{} *other.img\n",
        img.checksums["sha256"],
        "0".repeat(64)
    );
    let sums_url = serve_once_forever(sums).await;
    let mut spec = example_spec(&pve, &img, 2);
    let ci = spec.source.cloud_image.as_mut().unwrap();
    ci.checksum = None;
    ci.checksum_url = Some(sums_url);
    let out = build(&c, &request(spec, owner("ubuntu"), day(18)))
        .await
        .unwrap();
    assert_eq!(
        out.source_checksum,
        Some(format!("sha256:{}", img.checksums["sha256"]))
    );
}

/// A tiny HTTP server answering every request with `body`.
async fn serve_once_forever(body: String) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            let body = body.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf).await;
                let rsp = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = s.write_all(rsp.as_bytes()).await;
            });
        }
    });
    format!("http://{addr}/SHA256SUMS")
}

#[tokio::test]
async fn template_source_over_the_guest_agent() {
    let pve = FakePve::start().await;
    let c = client(&pve);
    let base = pve
        .add_vm(
            json!({"vmid": 9000, "name": "base-noble", "template": true, "agent": true,
                       "config": {"agent": "1"}}),
        )
        .await;
    assert_eq!(base["vmid"], json!(9000));
    let base_before = config(&c, &pve, 9000).await;
    let img = pve.add_image(Image::new(IMAGE)).await;
    let mut spec = example_spec(&pve, &img, 3);
    spec.source.cloud_image = None;
    spec.source.template = Some(TemplateSource {
        vmid: None,
        name: Some("base-noble".into()),
    });
    spec.provisioning.via = ProvisioningChannel::GuestAgent;
    spec.provisioning.commands = vec!["echo baked > /dev/null".into()];
    let out = build(&c, &request(spec, owner("agent"), day(18)))
        .await
        .unwrap();
    assert_ne!(out.vmid, 9000);
    assert_eq!(out.source_checksum, None);
    let cmds = pve.agent_commands(out.vmid).await;
    assert!(cmds.iter().all(|c| c.via == "agent"), "{cmds:?}");
    assert!(cmds.iter().any(|c| c.line().contains("echo baked")));
    let cfg = config(&c, &pve, out.vmid).await;
    assert!(cfg.template);
    assert!(matches!(
        marker_of(&cfg).metadata.source,
        Some(SourceInfo::Template {
            vmid: Some(9000),
            ..
        })
    ));
    // The base is untouched.
    assert_eq!(config(&c, &pve, 9000).await.digest, base_before.digest);
    assert!(pve.guest(out.vmid).await.has_package("cloud-init"));
}

#[tokio::test]
async fn build_numbers_per_day_and_rebuilds() {
    let pve = FakePve::start().await;
    let c = client(&pve);
    let img = pve.add_image(Image::new(IMAGE)).await;
    let o = owner("seq");
    let mut names = Vec::new();
    for d in [18, 18, 19, 18] {
        let out = build(&c, &request(example_spec(&pve, &img, 4), o.clone(), day(d)))
            .await
            .unwrap();
        settle(&c, &o, out.vmid).await;
        names.push(out.name);
    }
    assert_eq!(
        names,
        [
            "ubuntu-24.04-minimal-20250118-001",
            "ubuntu-24.04-minimal-20250118-002",
            "ubuntu-24.04-minimal-20250119-001",
            "ubuntu-24.04-minimal-20250118-003",
        ]
    );
    // A name template of the spec is honoured.
    let mut spec = example_spec(&pve, &img, 4);
    spec.name_template = Some("golden-{os}-{date}-{build}".into());
    let out = build(&c, &request(spec, o.clone(), day(19))).await.unwrap();
    assert_eq!(out.name, "golden-ubuntu-24.04-20250119-002");
}

#[tokio::test]
async fn checksum_mismatch_is_refused_before_any_vm() {
    let pve = FakePve::start().await;
    let c = client(&pve);
    let img = pve.add_image(Image::new(IMAGE)).await;
    let mut spec = example_spec(&pve, &img, 5);
    spec.source.cloud_image.as_mut().unwrap().checksum = Some(format!("sha256:{}", "0".repeat(64)));
    let err = build(&c, &request(spec, owner("bad"), day(18)))
        .await
        .unwrap_err();
    assert_eq!(err.category(), "checksum", "{err}");
    assert_eq!(err.stage, Some(Stage::Source));
    assert!(!err.is_retryable());
    assert!(err.to_string().contains("checksum"), "{err}");
    assert!(c.cluster_vms().await.unwrap().is_empty());
}

/// A provisioning timeout the schema's pattern admits but no duration holds is refused, naming
/// the field, before anything is written (it used to fall back to 30m silently).
#[tokio::test]
async fn an_oversized_provisioning_timeout_is_refused_before_any_write() {
    let pve = FakePve::start().await;
    let c = client(&pve);
    let img = pve.add_image(Image::new(IMAGE)).await;
    let mut spec = example_spec(&pve, &img, 6);
    spec.provisioning.timeout = "99999999999999999999d".into();
    let seq = pve.requests().await.last().map_or(0, |r| r.seq);
    let err = build(&c, &request(spec, owner("huge"), day(18)))
        .await
        .unwrap_err();
    assert_eq!(err.category(), "invalid_spec", "{err}");
    assert!(!err.is_retryable());
    let text = err.to_string();
    assert!(
        text.contains("provisioning.timeout") && text.contains("too large"),
        "{text}"
    );
    let sent = pve.requests_since(seq).await;
    assert!(sent.is_empty(), "{sent:?}");
}

#[tokio::test]
async fn failed_command_names_the_step_and_the_vm_is_destroyed_or_kept() {
    let pve = FakePve::start().await;
    let c = client(&pve);
    let img = pve.add_image(Image::new(IMAGE)).await;
    pve.set_guest(
        None,
        GuestSettings {
            failures: Some(vec![CommandFailure::new(
                "apt-get.* full-upgrade",
                100,
                "E: Failed to fetch http://archive.ubuntu.com/ubuntu/pool/main/o/openssl.deb  404 Not Found",
            )]),
            ..Default::default()
        },
    )
    .await;
    let o = owner("fail");
    let err = build(
        &c,
        &request(example_spec(&pve, &img, 6), o.clone(), day(18)),
    )
    .await
    .unwrap_err();
    assert_eq!(err.stage, Some(Stage::Provision));
    assert_eq!(err.category(), "guest");
    assert!(err.step.as_deref().unwrap().contains("upgrade"), "{err}");
    let text = err.to_string();
    assert!(
        text.contains("404 Not Found") && text.contains("exited with 100"),
        "{text}"
    );
    assert!(text.contains("hint:"));
    assert!(
        image_vms(&c, &o).await.is_empty(),
        "the failed build VM is destroyed"
    );

    let mut spec = example_spec(&pve, &img, 6);
    spec.provisioning.keep_failed_build = true;
    let err = build(&c, &request(spec.clone(), o.clone(), day(18)))
        .await
        .unwrap_err();
    let kept = err.kept_vmid.expect("kept for debugging");
    assert!(err.to_string().contains(&kept.to_string()));
    let vms = image_vms(&c, &o).await;
    assert_eq!(vms.len(), 1);
    assert_eq!((vms[0].0, vms[0].2), (kept, Some(Role::Build)));
    // Once the command works, the next run resumes that VM (same number) and finishes it.
    pve.set_guest(
        None,
        GuestSettings {
            failures: Some(vec![]),
            ..Default::default()
        },
    )
    .await;
    let out = build(&c, &request(spec, o.clone(), day(18))).await.unwrap();
    assert_eq!(out.vmid, kept);
    assert_eq!(out.build_number, 1);
}

/// Records every progress message.
#[derive(Default)]
struct Messages(std::sync::Mutex<Vec<String>>);

impl Progress for Messages {
    fn stage(&self, _: Stage) {}
    fn message(&self, text: &str) {
        self.0.lock().unwrap().push(text.to_string());
    }
    fn percent(&self, _: f32) {}
}

/// Issue 13's two bugs on the model of the real guest: the new kernel (a NEW package behind its
/// metapackage, which `upgrade`, even `--with-new-pkgs`, keeps back) is installed, and a package that `autoremove`
/// left in dpkg state `rc` is in neither the manifest nor validation's installed list, so the
/// template validates without drift.
#[tokio::test]
async fn the_new_kernel_is_installed_and_rc_packages_do_not_drift() {
    let pve = FakePve::start().await;
    let c = client(&pve);
    let img = pve.add_image(Image::new(IMAGE)).await;
    let o = owner("kernel");
    let messages = Messages::default();
    let out = sombrero::builder::run_build(
        &c,
        &request(example_spec(&pve, &img, 9), o.clone(), day(18)),
        &messages,
    )
    .await
    .unwrap();
    let g = pve.guest(out.vmid).await;
    assert!(
        g.has_package("linux-image-6.8.0-47-generic"),
        "the new kernel"
    );
    assert_eq!(g.contents["packages"]["linux-image-virtual"], "6.8.0-47.47");
    assert!(
        out.package_manifest
            .iter()
            .any(|p| p == "linux-image-6.8.0-47-generic=6.8.0-47.47"),
        "{:?}",
        out.package_manifest
    );
    // `autoremove` removed the old kernel without purge: dpkg still lists it, as `rc`.
    assert_eq!(
        g.contents["residual"]["linux-image-6.8.0-41-generic"],
        "6.8.0-41.41"
    );
    assert!(
        !out.package_manifest
            .iter()
            .any(|p| p.starts_with("linux-image-6.8.0-41-generic=")),
        "an rc package is not installed: {:?}",
        out.package_manifest
    );
    assert!(
        !messages
            .0
            .lock()
            .unwrap()
            .iter()
            .any(|m| m.contains("kept back")),
        "nothing kept back: {:?}",
        messages.0.lock().unwrap()
    );

    let mut req = sombrero::validate::ValidationRequest::new(
        out.vmid,
        pve.node.clone(),
        o.clone(),
        sombrero::api::golden_image::Validation::default(),
    );
    req.ssh_probe = sombrero::validate::SshProbe::ServiceOnly;
    req.ssh.ip_config = format!("ip={}/8", pve.guest_ip(19));
    req.baseline_packages = out.package_manifest.clone();
    req.agent_timeout = Duration::from_secs(20);
    let report = sombrero::validate::validate_template(&c, &req, &sombrero::validate::NoProgress)
        .await
        .unwrap();
    assert!(report.passed, "{:#?}", report.checks);
    assert!(report.drift.as_ref().unwrap().is_clean());
}

/// Over SSH with `ip=dhcp` only the guest agent can tell the build VM's address, and a cloud
/// image without it never answers: the build fails after `Timeouts::agent_address`, not the
/// whole provisioning timeout, and says what to set.
#[tokio::test]
async fn ssh_to_a_dhcp_address_without_an_agent_fails_soon_with_the_fix() {
    let pve = FakePve::start().await;
    let c = client(&pve);
    let img = pve.add_image(Image::new(IMAGE)).await;
    let mut spec = example_spec(&pve, &img, 11);
    spec.provisioning.ssh.ip_config = "ip=dhcp".into();
    spec.provisioning.ssh.host = None;
    spec.provisioning.timeout = "30m".into();
    let timeouts = sombrero::builder::Timeouts {
        agent_address: Duration::from_secs(2),
        ..Default::default()
    };
    let started = std::time::Instant::now();
    let err = sombrero::builder::run_build_with(
        &c,
        &request(spec, owner("dhcp"), day(18)),
        &NoProgress,
        &timeouts,
    )
    .await
    .unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(60), "{err}");
    assert_eq!(err.stage, Some(Stage::Provision));
    let text = err.to_string();
    assert!(
        text.contains("provisioning.ssh.host") && text.contains("ip=dhcp"),
        "{text}"
    );
}

/// Drops the build at the start of a stage, like a controller killed there.
struct Interrupt {
    at: Stage,
    hit: Arc<Notify>,
}

impl Progress for Interrupt {
    fn stage(&self, stage: Stage) {
        if stage == self.at {
            self.hit.notify_one();
        }
    }
    fn message(&self, _: &str) {}
    fn percent(&self, _: f32) {}
}

#[tokio::test]
async fn interrupted_at_every_stage_resumes_to_exactly_one_template() {
    let pve = FakePve::start().await;
    let c = client(&pve);
    let img = pve.add_image(Image::new(IMAGE)).await;
    let o = owner("crash");
    for (i, stage) in Stage::ALL.into_iter().enumerate() {
        let req = request(example_spec(&pve, &img, 7), o.clone(), day(18));
        let hit = Arc::new(Notify::new());
        let progress = Interrupt {
            at: stage,
            hit: hit.clone(),
        };
        tokio::select! {
            r = sombrero::builder::run_build(&c, &req, &progress) => panic!("the build was not interrupted at {stage}: {r:?}"),
            _ = hit.notified() => {}
        }
        // Let requests already sent finish on the fake's side.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let out = build(&c, &req)
            .await
            .unwrap_or_else(|e| panic!("resume after {stage}: {e}"));
        let expected = (i + 1) as u16;
        assert_eq!(
            out.build_number, expected,
            "after an interruption at {stage}"
        );
        settle(&c, &o, out.vmid).await;
        let vms = image_vms(&c, &o).await;
        assert!(
            vms.iter().all(|v| v.1 && v.2 == Some(Role::Template)),
            "a build VM is left after {stage}: {vms:?}"
        );
        assert_eq!(vms.len(), i + 1, "after {stage}: {vms:?}");
        let mut numbers: Vec<String> = vms.iter().map(|v| v.3.clone()).collect();
        numbers.sort();
        let want: Vec<String> = (1..=expected)
            .map(|n| format!("ubuntu-24.04-minimal-20250118-{n:03}"))
            .collect();
        assert_eq!(numbers, want, "after {stage}");
    }
}

/// The process died after Finalize, before validation and promotion were recorded: asked
/// again (same build id, or a new one with status.build lost too) the build answers the
/// template it made, from its marker, and touches nothing; it builds anew only once that
/// template was dealt with.
#[tokio::test]
async fn a_finished_build_is_answered_again_not_built_twice() {
    let pve = FakePve::start().await;
    let c = client(&pve);
    let img = pve.add_image(Image::new(IMAGE)).await;
    let o = owner("twice");
    let spec = example_spec(&pve, &img, 13);
    let req = request(spec.clone(), o.clone(), day(18));
    let first = build(&c, &req).await.unwrap();
    assert!(!first.package_manifest.is_empty());
    let stored = marker_of(&config(&c, &pve, first.vmid).await);
    assert_eq!(
        stored.build.as_ref().map(|b| b.packages.len()),
        Some(0),
        "the manifest is stored compressed, not as a plain list"
    );
    assert_eq!(stored.package_manifest().unwrap(), first.package_manifest);
    let same = |out: &BuildOutcome| {
        assert_eq!(
            BuildOutcome {
                stages: first.stages.clone(),
                ..out.clone()
            },
            first,
            "a different outcome"
        );
        assert!(out.stages.is_empty(), "stages ran again: {:?}", out.stages);
    };
    let digest = config(&c, &pve, first.vmid).await.digest;
    let seq = pve.requests().await.last().unwrap().seq;

    // Same build id (the controller restarted with status.build.id).
    let again = build(&c, &req).await.unwrap();
    same(&again);
    // A new build id (status.build was lost too): the unvalidated template of this spec is
    // the build in flight.
    let lost = build(&c, &request(spec.clone(), o.clone(), day(19)))
        .await
        .unwrap();
    same(&lost);
    let writes: Vec<String> = pve
        .requests_since(seq)
        .await
        .into_iter()
        .filter(|r| r.method != "GET")
        .map(|r| format!("{} {}", r.method, r.path))
        .collect();
    assert!(writes.is_empty(), "Proxmox was changed: {writes:?}");
    assert_eq!(config(&c, &pve, first.vmid).await.digest, digest);
    let vms = image_vms(&c, &o).await;
    assert_eq!(vms.len(), 1, "{vms:?}");

    // The CLI asks for a new template on every run: it does not adopt the pending one.
    let cli = BuildRequest {
        adopt_unvalidated: false,
        ..request(spec.clone(), o.clone(), day(18))
    };
    let fresh = build(&c, &cli).await.unwrap();
    assert_ne!(fresh.vmid, first.vmid);
    assert_eq!(fresh.build_number, 2);
    sombrero::promote::promote(
        &c,
        &o,
        fresh.vmid,
        sombrero::promote::Evidence::ValidationDisabled,
    )
    .await
    .unwrap();

    // Another spec is not the build in flight: it builds.
    let mut other = spec.clone();
    other.hardware.cores += 1;
    let changed = build(&c, &request(other, o.clone(), day(18)))
        .await
        .unwrap();
    assert_ne!(changed.vmid, first.vmid);
    assert_eq!(changed.build_number, 3);

    // Once promoted, the same spec builds anew under a new id; the old id still answers its
    // own template (a crash after promotion, before the status was written).
    settle(&c, &o, first.vmid).await;
    let rebuilt = build(&c, &request(spec.clone(), o.clone(), day(18)))
        .await
        .unwrap();
    assert_eq!(rebuilt.build_number, 4);
    let answered = build(&c, &req).await.unwrap();
    assert_eq!(answered.vmid, first.vmid);
    assert_eq!(answered.package_manifest, first.package_manifest);
    assert_eq!(image_vms(&c, &o).await.len(), 4);
}

#[tokio::test]
async fn two_images_at_once_get_their_own_vmids() {
    let pve = FakePve::start().await;
    let c = client(&pve);
    let img = pve.add_image(Image::new(IMAGE)).await;
    let a = request(example_spec(&pve, &img, 8), owner("one"), day(18));
    let mut spec_b = example_spec(&pve, &img, 9);
    spec_b.os = "debian-12".into();
    let b = request(spec_b, owner("two"), day(18));
    let (ra, rb) = tokio::join!(build(&c, &a), build(&c, &b));
    let (ra, rb) = (ra.unwrap(), rb.unwrap());
    assert_ne!(ra.vmid, rb.vmid);
    assert_eq!(ra.name, "ubuntu-24.04-minimal-20250118-001");
    assert_eq!(rb.name, "debian-12-minimal-20250118-001");
    assert!(config(&c, &pve, ra.vmid).await.template && config(&c, &pve, rb.vmid).await.template);
}

#[tokio::test]
async fn images_of_one_os_and_type_in_two_namespaces_get_distinct_names() {
    let pve = FakePve::start().await;
    let c = client(&pve);
    let img = pve.add_image(Image::new(IMAGE)).await;
    let in_ns = |ns: &str| Owner {
        namespace: ns.into(),
        name: "ubuntu".into(),
        uid: format!("uid-{ns}-ubuntu"),
    };
    let (a, b) = (in_ns("team-a"), in_ns("team-b"));
    // At once: both read the same listing before either VM exists.
    let ra = request(example_spec(&pve, &img, 20), a.clone(), day(18));
    let rb = request(example_spec(&pve, &img, 21), b.clone(), day(18));
    let (oa, ob) = tokio::join!(build(&c, &ra), build(&c, &rb));
    let (oa, ob) = (oa.unwrap(), ob.unwrap());
    let mut first = vec![oa.name.clone(), ob.name.clone()];
    first.sort();
    assert_eq!(
        first,
        [
            "ubuntu-24.04-minimal-20250118-001",
            "ubuntu-24.04-minimal-20250118-002"
        ]
    );
    settle(&c, &a, oa.vmid).await;
    settle(&c, &b, ob.vmid).await;
    // One after the other, each image's next build counts the other namespace's templates.
    let next_b = build(
        &c,
        &request(example_spec(&pve, &img, 21), b.clone(), day(18)),
    )
    .await
    .unwrap();
    assert_eq!(next_b.name, "ubuntu-24.04-minimal-20250118-003");
    settle(&c, &b, next_b.vmid).await;
    let next_a = build(
        &c,
        &request(example_spec(&pve, &img, 20), a.clone(), day(18)),
    )
    .await
    .unwrap();
    assert_eq!(next_a.name, "ubuntu-24.04-minimal-20250118-004");
    // Every name in the cluster is unique.
    let names: Vec<String> = c
        .cluster_vms()
        .await
        .unwrap()
        .into_iter()
        .filter_map(|v| v.name)
        .collect();
    let unique: std::collections::BTreeSet<&String> = names.iter().collect();
    assert_eq!(unique.len(), names.len(), "{names:?}");
}

#[tokio::test]
async fn a_consumers_clone_is_never_adopted_changed_or_deleted() {
    let pve = FakePve::start().await;
    let c = client(&pve);
    let img = pve.add_image(Image::new(IMAGE)).await;
    let o = owner("clones");
    let spec = example_spec(&pve, &img, 10);
    let first = build(&c, &request(spec.clone(), o.clone(), day(18)))
        .await
        .unwrap();
    settle(&c, &o, first.vmid).await;
    // Someone clones a build VM's marker by hand: our tags, a role-build marker of ours naming
    // another VMID, same owner and spec hash (it would be adopted if the VMID were not checked).
    let mut foreign = marker_of(&config(&c, &pve, first.vmid).await);
    foreign.role = Role::Build;
    foreign.vmid = first.vmid;
    let desc = render_description("cloned by hand", &foreign).unwrap();
    let tags = config(&c, &pve, first.vmid).await.tags.unwrap();
    pve.add_vm(
        json!({"vmid": 777, "name": "consumer-vm", "status": "running", "agent": true,
                      "config": {"tags": tags, "description": desc}}),
    )
    .await;
    let before = config(&c, &pve, 777).await;

    let second = build(&c, &request(spec, o.clone(), day(18))).await.unwrap();
    assert_ne!(second.vmid, 777);
    assert_eq!(second.build_number, 2);
    assert_eq!(
        sombrero::builder::cleanup_abandoned_builds(&c, &o, None)
            .await
            .unwrap(),
        Vec::<u32>::new()
    );
    let after = config(&c, &pve, 777).await;
    assert_eq!(after.digest, before.digest, "the consumer's VM was changed");
    assert_eq!(c.vm_status(&pve.node, 777).await.unwrap().status, "running");
}

#[tokio::test]
async fn cleanup_removes_only_build_vms() {
    let pve = FakePve::start().await;
    let c = client(&pve);
    let img = pve.add_image(Image::new(IMAGE)).await;
    let o = owner("cleanup");
    let done = build(
        &c,
        &request(example_spec(&pve, &img, 11), o.clone(), day(18)),
    )
    .await
    .unwrap();
    settle(&c, &o, done.vmid).await;
    let req = request(example_spec(&pve, &img, 11), o.clone(), day(18));
    let hit = Arc::new(Notify::new());
    let progress = Interrupt {
        at: Stage::Shutdown,
        hit: hit.clone(),
    };
    tokio::select! {
        r = sombrero::builder::run_build(&c, &req, &progress) => panic!("not interrupted: {r:?}"),
        _ = hit.notified() => {}
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let removed = sombrero::builder::cleanup_abandoned_builds(&c, &o, None)
        .await
        .unwrap();
    assert_eq!(removed.len(), 1);
    let vms = image_vms(&c, &o).await;
    assert_eq!(vms.len(), 1);
    assert_eq!(vms[0].0, done.vmid);
}

/// A build VM converted to a template but not finalized, as a version without the
/// `sombrero-build` tag left it (a template named like the image's, its marker's role `build`,
/// no build tag): the clean-up on deletion still finds it by its marker and removes it.
#[tokio::test]
async fn cleanup_removes_a_converted_build_vm_without_the_build_tag() {
    let pve = FakePve::start().await;
    let c = client(&pve);
    let img = pve.add_image(Image::new(IMAGE)).await;
    let o = owner("cleanup-converted");
    let done = build(
        &c,
        &request(example_spec(&pve, &img, 11), o.clone(), day(18)),
    )
    .await
    .unwrap();
    settle(&c, &o, done.vmid).await;
    let node = &done.node;
    let cfg = c.vm_config(node, done.vmid).await.unwrap();
    let description = cfg.description.unwrap_or_default();
    let mut marker = parse_description(&description).unwrap().unwrap();
    marker.role = Role::Build;
    let update = sombrero::proxmox::ConfigUpdate::new(
        sombrero::proxmox::QemuConfig::new()
            .description(&render_description(&description, &marker).unwrap()),
    );
    c.update_vm_config(node, done.vmid, &update).await.unwrap();
    let listed = c.cluster_vms().await.unwrap();
    let vm = listed.iter().find(|v| v.vmid == done.vmid).unwrap();
    assert!(vm.template && !vm.tag_list().iter().any(|t| t == "sombrero-build"));

    let removed = sombrero::builder::cleanup_abandoned_builds(&c, &o, None)
        .await
        .unwrap();
    assert_eq!(removed, [done.vmid]);
    assert!(image_vms(&c, &o).await.is_empty());
}

fn sombrero() -> std::process::Command {
    std::process::Command::new(env!("CARGO_BIN_EXE_sombrero"))
}

fn yaml_files(dir: &str) -> Vec<std::path::PathBuf> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(dir);
    let mut out: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    out.sort();
    out
}

#[test]
fn cli_refuses_every_malformed_golden_image_naming_the_field() {
    let files: Vec<_> = yaml_files("tests/malformed")
        .into_iter()
        .filter(|p| p.file_name().unwrap().to_string_lossy().starts_with("gi-"))
        .collect();
    assert!(files.len() >= 20);
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        let field = text
            .lines()
            .find_map(|l| l.strip_prefix("# expect-field:"))
            .unwrap_or_else(|| panic!("{} has no expect-field header", file.display()))
            .trim()
            .trim_start_matches('.')
            .to_string();
        let out = sombrero()
            .args(["build", "--dry-run", "-f"])
            .arg(&file)
            .env_remove("PROXMOX_URL")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{}: {stderr}", file.display());
        assert!(
            stderr.contains(&field),
            "{}: expected the field {field} in:\n{stderr}",
            file.display()
        );
        assert!(out.stdout.is_empty());
    }
}

#[test]
fn cli_accepts_every_example_golden_image() {
    let mut n = 0;
    for file in yaml_files("examples") {
        let text = std::fs::read_to_string(&file).unwrap();
        if !text.lines().any(|l| l.trim() == "kind: GoldenImage") {
            continue;
        }
        n += 1;
        let out = sombrero()
            .args(["build", "--dry-run", "-f"])
            .arg(&file)
            .output()
            .unwrap();
        assert_eq!(
            out.status.code(),
            Some(0),
            "{}: {}",
            file.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert!(n >= 2);
}

#[tokio::test]
async fn cli_builds_against_the_fake_and_prints_the_seed_json() {
    let pve = FakePve::start().await;
    let img = pve.add_image(Image::new(IMAGE)).await;
    let dir = tempfile::tempdir().unwrap();
    let spec = example_spec(&pve, &img, 12);
    let doc = json!({
        "apiVersion": "images.sombrero.dev/v1alpha1", "kind": "GoldenImage",
        "metadata": {"name": "ubuntu-24.04-minimal", "namespace": "ci"},
        "spec": spec,
    });
    let file = dir.path().join("image.yaml");
    std::fs::write(&file, serde_yaml::to_string(&doc).unwrap()).unwrap();
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_sombrero"))
        .args(["build", "-f"])
        .arg(&file)
        .env("PROXMOX_URL", &pve.url)
        .env("PROXMOX_TOKEN_ID", &pve.token_id)
        .env("PROXMOX_TOKEN_SECRET", &pve.token_secret)
        .env("PROXMOX_CA_CERT", pve.ca_path())
        .output()
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        v["template_name"]
            .as_str()
            .unwrap()
            .starts_with("ubuntu-24.04-minimal-")
    );
    assert_eq!(v["node"], json!(pve.node));
    let vmid: u32 = v["template_id"].as_str().unwrap().parse().unwrap();
    assert!(config(&client(&pve), &pve, vmid).await.template);
    assert!(stderr.contains("Provision"), "{stderr}");
    assert!(
        !stderr.contains(&pve.token_secret),
        "the token secret leaked into the output"
    );
}

// ---------------------------------------------------------------- crash safety at every request
//
// The `sombrero build` CLI against the fake, killed (SIGKILL) right after each of its Proxmox
// requests in turn, or losing the answer to each of its writes in turn, then run again to
// completion. After each: one template per build number, consecutive numbers, no VM left that
// is not a template, and the foreign VM and the consumer's clone untouched.

/// A `sombrero build` run of one image file against one fake.
struct CliBuild<'a> {
    pve: &'a FakePve,
    file: std::path::PathBuf,
    /// Built from the base template [`BASE_VMID`].
    base: bool,
    _dir: tempfile::TempDir,
}

impl<'a> CliBuild<'a> {
    const NAME: &'static str = "crash";
    const NAMESPACE: &'static str = "ci";

    fn new(pve: &'a FakePve, img: &ImageInfo) -> Self {
        Self::with_spec(pve, example_spec(pve, img, 20), false)
    }

    /// A full clone of the base template [`BASE_VMID`] (see [`crash_start`]), over the agent.
    fn from_template(pve: &'a FakePve, img: &ImageInfo) -> Self {
        let mut spec = example_spec(pve, img, 20);
        spec.source.cloud_image = None;
        spec.source.template = Some(TemplateSource {
            vmid: Some(BASE_VMID),
            name: None,
        });
        spec.provisioning.via = ProvisioningChannel::GuestAgent;
        Self::with_spec(pve, spec, true)
    }

    fn with_spec(pve: &'a FakePve, spec: GoldenImageSpec, base: bool) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let doc = json!({
            "apiVersion": "images.sombrero.dev/v1alpha1", "kind": "GoldenImage",
            "metadata": {"name": Self::NAME, "namespace": Self::NAMESPACE},
            "spec": spec,
        });
        let file = dir.path().join("image.yaml");
        std::fs::write(&file, serde_yaml::to_string(&doc).unwrap()).unwrap();
        CliBuild {
            pve,
            file,
            base,
            _dir: dir,
        }
    }

    fn owner() -> Owner {
        Owner {
            namespace: Self::NAMESPACE.into(),
            name: Self::NAME.into(),
            uid: sombrero::builder::cli_owner_uid(Self::NAMESPACE, Self::NAME),
        }
    }

    /// The process, held at a `read` in `sh` until [`CliBuild::go`]: its pid is known (and a
    /// trap armed with it) before it sends anything. `exec` keeps the pid.
    fn spawn(&self) -> tokio::process::Child {
        tokio::process::Command::new("sh")
            .args(["-c", "read _ && exec \"$0\" build -f \"$1\""])
            .arg(env!("CARGO_BIN_EXE_sombrero"))
            .arg(&self.file)
            .env("PROXMOX_URL", &self.pve.url)
            .env("PROXMOX_TOKEN_ID", &self.pve.token_id)
            .env("PROXMOX_TOKEN_SECRET", &self.pve.token_secret)
            .env("PROXMOX_CA_CERT", self.pve.ca_path())
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap()
    }

    async fn go(mut child: tokio::process::Child) -> std::process::Output {
        use tokio::io::AsyncWriteExt;
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(b"go\n").await.unwrap();
        drop(stdin);
        tokio::time::timeout(Duration::from_secs(120), child.wait_with_output())
            .await
            .expect("sombrero build did not end within 120 s")
            .unwrap()
    }

    /// One run to its end (or its death).
    async fn run(&self) -> std::process::Output {
        Self::go(self.spawn()).await
    }

    /// One run with a trap armed first (a `Kill` trap gets this run's pid).
    async fn run_with(&self, mut trap: support::fakepve::Trap) -> std::process::Output {
        let child = self.spawn();
        if let TrapAction::Kill { pid } = &mut trap.action {
            *pid = child.id().unwrap();
        }
        self.pve.arm_trap(trap).await;
        Self::go(child).await
    }
}

fn killed(out: &std::process::Output) -> bool {
    use std::os::unix::process::ExitStatusExt;
    out.status.signal() == Some(9)
}

/// The base template of [`CliBuild::from_template`]: a clone copies its tags.
const BASE_VMID: u32 = 9000;

/// The VMs present before a run: a stranger's VM, a consumer's clone of one of our templates
/// (our tags, a copied marker naming another VMID), a look-alike (a name our build could take,
/// a marker naming its own VMID and another owner uid: a second cluster's build VM) and, with
/// `base`, the base template (tagged). Answers (VMID, config, running) of each.
async fn foreign_vms(
    pve: &FakePve,
    c: &Client,
    consumer_marker: &Marker,
    base: bool,
) -> Vec<(u32, VmConfig, bool)> {
    pve.add_vm(json!({"vmid": 100, "name": "someone-elses-db", "status": "running"}))
        .await;
    let desc = render_description("a consumer's clone", consumer_marker).unwrap();
    let tags = format!(
        "sombrero;{}",
        image_tag(CliBuild::NAMESPACE, CliBuild::NAME)
    );
    pve.add_vm(
        json!({"vmid": 101, "name": "consumer-vm", "status": "running", "agent": true,
                      "config": {"tags": tags, "description": desc}}),
    )
    .await;
    let mut other = consumer_marker.clone();
    other.vmid = 102;
    other.role = Role::Build;
    other.owner.uid = "a-second-cluster".into();
    other.metadata.build_number = 50;
    let look_alike = other.metadata.name.rsplit_once('-').unwrap().0.to_string() + "-050";
    other.metadata.name = look_alike.clone();
    let desc = render_description("", &other).unwrap();
    pve.add_vm(json!({"vmid": 102, "name": look_alike, "status": "stopped",
                      "config": {"tags": "base;noble", "description": desc}}))
        .await;
    let mut vmids = vec![100, 101, 102];
    if base {
        pve.add_vm(
            json!({"vmid": BASE_VMID, "name": "base-noble", "template": true,
                          "agent": true, "config": {"agent": "1", "tags": "base;noble"}}),
        )
        .await;
        vmids.push(BASE_VMID);
    }
    let mut out = Vec::new();
    for vmid in vmids {
        let running = c.vm_status(&pve.node, vmid).await.unwrap().status == "running";
        out.push((vmid, config(c, pve, vmid).await, running));
    }
    out
}

/// The invariants after a crash and a run to completion; answers the template names.
async fn assert_no_duplicate_no_leak(
    pve: &FakePve,
    c: &Client,
    foreign: &[(u32, VmConfig, bool)],
    when: &str,
) -> Vec<String> {
    let o = CliBuild::owner();
    let mut names = Vec::new();
    for vm in c.cluster_vms().await.unwrap() {
        let cfg = config(c, pve, vm.vmid).await;
        if crash::is_untouched_foreign(c, &pve.node, vm.vmid, &cfg, foreign, when).await {
            continue;
        }
        assert!(
            cfg.template && cfg.lock.is_none(),
            "{when}: VM {} is left and not a template: {cfg:?}",
            vm.vmid
        );
        let m = marker_of(&cfg);
        assert_eq!(
            (m.role, m.vmid, &m.owner),
            (Role::Template, vm.vmid, &o),
            "{when}"
        );
        assert_eq!(
            cfg.name.as_deref(),
            Some(m.metadata.name.as_str()),
            "{when}"
        );
        names.push(m.metadata.name);
    }
    crash::foreign_still_there(c, &pve.node, foreign, when).await;
    // The consumer's clone carries a copy of template 001's marker, so numbering starts after
    // it: consecutive from the first, each once.
    crash::assert_consecutive(&mut names, when);
    names
}

/// A fresh fake with the image and the foreign VMs; answers their configs and the first
/// request's sequence number.
async fn crash_start(
    pve: &FakePve,
    c: &Client,
    consumer_marker: &Marker,
    base: bool,
) -> (Vec<(u32, VmConfig, bool)>, u64) {
    pve.reset().await;
    pve.add_image(Image::new(IMAGE)).await;
    let foreign = foreign_vms(pve, c, consumer_marker, base).await;
    let seq = pve.requests().await.last().map_or(0, |r| r.seq);
    (foreign, seq)
}

/// The marker a consumer's clone of a CLI-built template carries: a copy of the template's,
/// naming the template's VMID, not the clone's. Made by one real run on a fresh fake.
async fn consumer_marker(pve: &FakePve, c: &Client, img: &ImageInfo) -> Marker {
    pve.reset().await;
    pve.add_image(Image::new(IMAGE)).await;
    let out = CliBuild::new(pve, img).run().await;
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let vmid: u32 = v["template_id"].as_str().unwrap().parse().unwrap();
    let mut m = marker_of(&config(c, pve, vmid).await);
    assert_eq!(m.vmid, vmid);
    m.vmid = 999;
    m
}

/// Counts the requests (and the writes) of one complete run from the crash tests' start.
async fn count_requests(pve: &FakePve, c: &Client, cli: &CliBuild<'_>, m: &Marker) -> (u64, u64) {
    let (foreign, seq) = crash_start(pve, c, m, cli.base).await;
    let out = cli.run().await;
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let reqs = pve.requests_since(seq).await;
    assert_no_duplicate_no_leak(pve, c, &foreign, "the counting run").await;
    let writes = reqs.iter().filter(|r| r.method != "GET").count() as u64;
    (reqs.len() as u64, writes)
}

#[tokio::test]
async fn cli_killed_after_every_request_never_builds_twice_nor_leaks() {
    let pve = FakePve::start().await;
    let c = client(&pve);
    let img = pve.add_image(Image::new(IMAGE)).await;
    let m = consumer_marker(&pve, &c, &img).await;
    killed_after_every_request(&pve, &c, &m, &CliBuild::new(&pve, &img)).await;
}

/// The template source: between the clone and the config write that tags it, the clone
/// carries the base's tags but our name and marker (both in the clone call).
#[tokio::test]
async fn cli_from_a_template_killed_after_every_request_never_builds_twice_nor_leaks() {
    let pve = FakePve::start().await;
    let c = client(&pve);
    let img = pve.add_image(Image::new(IMAGE)).await;
    let m = consumer_marker(&pve, &c, &img).await;
    killed_after_every_request(&pve, &c, &m, &CliBuild::from_template(&pve, &img)).await;
}

async fn killed_after_every_request(pve: &FakePve, c: &Client, m: &Marker, cli: &CliBuild<'_>) {
    let (n, _) = count_requests(pve, c, cli, m).await;
    assert!(n > 20, "a build makes more requests than {n}");
    for k in 1..=n {
        let (foreign, _) = crash_start(pve, c, m, cli.base).await;
        let out = cli
            .run_with(support::fakepve::Trap::new(TrapAction::Kill { pid: 0 }, k))
            .await;
        let fired = pve.trap_state().await.fired;
        assert!(
            killed(&out) || (k == n && out.status.success()),
            "k={k}: not killed (fired: {fired}): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let again = cli.run().await;
        let when = format!("killed after request {k} of {n}, then run again");
        assert_eq!(
            again.status.code(),
            Some(0),
            "{when}: {}",
            String::from_utf8_lossy(&again.stderr)
        );
        let names = assert_no_duplicate_no_leak(pve, c, &foreign, &when).await;
        assert!(names.len() <= 2, "{when}: {names:?}");
    }
}

#[tokio::test]
async fn cli_losing_the_answer_to_every_write_reads_back_and_finishes() {
    let pve = FakePve::start().await;
    let c = client(&pve);
    let img = pve.add_image(Image::new(IMAGE)).await;
    let m = consumer_marker(&pve, &c, &img).await;
    let cli = CliBuild::new(&pve, &img);
    let (_, writes) = count_requests(&pve, &c, &cli, &m).await;
    assert!(writes >= 8, "a build makes at least 8 writes, not {writes}");
    for k in 1..=writes {
        let (foreign, seq) = crash_start(&pve, &c, &m, cli.base).await;
        let out = cli
            .run_with(support::fakepve::Trap::new(TrapAction::Drop, k).writes_only())
            .await;
        let lost = pve
            .requests_since(seq)
            .await
            .into_iter()
            .filter(|r| r.method != "GET")
            .nth((k - 1) as usize)
            .map(|r| format!("{} {}", r.method, r.path))
            .unwrap_or_default();
        let when = format!("the answer to write {k} of {writes} ({lost}) lost");
        assert!(
            pve.trap_state().await.fired,
            "{when}: the trap did not fire"
        );
        // The run finds out what happened and carries on: no failed build, no rerun needed.
        assert_eq!(
            out.status.code(),
            Some(0),
            "{when}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let names = assert_no_duplicate_no_leak(&pve, &c, &foreign, &when).await;
        assert_eq!(names.len(), 1, "{when}: {names:?}");
    }
}

/// A create task of realistic length (50 PVE s: the VM shows `lock: create`, no tags, no
/// description meanwhile): the run killed inside it, the next run waits for it, finds the VM
/// ours and continues it; a node outage of 3 s inside it (longer than the client's own
/// retries) is waited out.
#[tokio::test]
async fn slow_create_survives_a_kill_and_a_node_blip_inside_it() {
    let pve = FakePve::start_with(Options {
        time_scale: 0.02,
        ..Options::default()
    })
    .await;
    let c = client(&pve);
    let img = pve.add_image(Image::new(IMAGE)).await;
    let m = consumer_marker(&pve, &c, &img).await;
    let cli = CliBuild::new(&pve, &img);
    let creates = |reqs: &[support::fakepve::RecordedRequest]| {
        reqs.iter()
            .filter(|r| r.method == "POST" && r.path.ends_with("/qemu"))
            .count()
    };

    // Killed while the create task runs.
    let (foreign, seq) = crash_start(&pve, &c, &m, cli.base).await;
    pve.set_task_secs("qmcreate", 50.0).await;
    let out = cli
        .run_with(support::fakepve::Trap::new(TrapAction::Kill { pid: 0 }, 1).on("POST", "/qemu$"))
        .await;
    assert!(killed(&out), "{}", String::from_utf8_lossy(&out.stderr));
    let locked: Vec<_> = c
        .cluster_vms()
        .await
        .unwrap()
        .into_iter()
        .filter(|v| v.lock.as_deref() == Some("create"))
        .collect();
    assert_eq!(locked.len(), 1, "the create task still runs: {locked:?}");
    assert!(locked[0].tags.is_none(), "no tags before the task ends");
    let again = cli.run().await;
    let stderr = String::from_utf8_lossy(&again.stderr);
    assert_eq!(again.status.code(), Some(0), "{stderr}");
    let names = assert_no_duplicate_no_leak(&pve, &c, &foreign, "killed inside the create").await;
    assert_eq!(names.len(), 1, "{names:?}");
    let reqs = pve.requests_since(seq).await;
    assert_eq!(creates(&reqs), 1, "a second VM was created");

    // The node unreachable for 3 s while the create task runs.
    let (foreign, seq) = crash_start(&pve, &c, &m, cli.base).await;
    pve.set_task_secs("qmcreate", 50.0).await;
    let out = cli
        .run_with(
            support::fakepve::Trap::new(TrapAction::NodeOffline { secs: 3.0 }, 1)
                .on("POST", "/qemu$"),
        )
        .await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    let names =
        assert_no_duplicate_no_leak(&pve, &c, &foreign, "a node blip inside the create").await;
    assert_eq!(names.len(), 1, "{names:?}");
    let reqs = pve.requests_since(seq).await;
    assert_eq!(creates(&reqs), 1);
    assert!(
        reqs.iter().any(|r| r.status == Some(595)),
        "the node was unreachable during the run"
    );
}

/// The GoldenImage file of `spec` as a CI pipeline keeps it.
fn image_file(dir: &std::path::Path, spec: &GoldenImageSpec) -> std::path::PathBuf {
    let doc = json!({
        "apiVersion": "images.sombrero.dev/v1alpha1", "kind": "GoldenImage",
        "metadata": {"name": "ubuntu-24.04-minimal", "namespace": "ci"},
        "spec": spec,
    });
    let file = dir.join("image.yaml");
    std::fs::write(&file, serde_yaml::to_string(&doc).unwrap()).unwrap();
    file
}

/// `sombrero <args>` against the fake with the given token.
async fn cli(
    pve: &FakePve,
    token: (&str, &str),
    args: &[&std::ffi::OsStr],
) -> std::process::Output {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_sombrero"))
        .args(args)
        .env("PROXMOX_URL", &pve.url)
        .env("PROXMOX_TOKEN_ID", token.0)
        .env("PROXMOX_TOKEN_SECRET", token.1)
        .env("PROXMOX_CA_CERT", pve.ca_path())
        .output()
        .await
        .unwrap()
}

/// The privileges of the README's `pveum role add Sombrero -privs "..."` line.
fn documented_role() -> Vec<String> {
    let readme =
        std::fs::read_to_string(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md"))
            .unwrap();
    let start = readme
        .find("pveum role add Sombrero -privs \"")
        .expect("the README documents the role");
    let rest = &readme[start + "pveum role add Sombrero -privs \"".len()..];
    let list = &rest[..rest.find('"').unwrap()];
    list.split_whitespace()
        .filter(|w| *w != "\\")
        .map(str::to_string)
        .collect()
}

/// Tags of the VM.
async fn tags_of(c: &Client, pve: &FakePve, vmid: u32) -> Vec<String> {
    config(c, pve, vmid).await.tag_list()
}

#[tokio::test]
async fn cli_production_build_validates_promotes_and_writes_a_packer_manifest() {
    let pve = FakePve::start().await;
    let img = pve.add_image(Image::new(IMAGE)).await;
    let c = client(&pve);
    let dir = tempfile::tempdir().unwrap();
    let file = image_file(dir.path(), &example_spec(&pve, &img, 13));
    let manifest = dir.path().join("packer-manifest.json");
    // A token with exactly the README's role: the documented privileges are enough.
    let role = documented_role();
    let role: Vec<&str> = role.iter().map(String::as_str).collect();
    let (id, secret) = pve.add_token(&role).await;
    let args = [
        "build".as_ref(),
        "-f".as_ref(),
        file.as_os_str(),
        "--validate".as_ref(),
        "--promote".as_ref(),
        "--manifest".as_ref(),
        manifest.as_os_str(),
    ];

    let mut vmids = Vec::new();
    for run in 1..=2 {
        let out = cli(&pve, (&id, &secret), &args).await;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(0), "run {run}: {stderr}");
        assert!(
            stderr.contains("Validate") && stderr.contains("Promote"),
            "{stderr}"
        );
        assert!(stderr.contains("promoted"), "{stderr}");
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let vmid: u32 = v["template_id"].as_str().unwrap().parse().unwrap();
        vmids.push((vmid, v["template_name"].as_str().unwrap().to_string()));
        // The channel tag Terraform selects by, on the new template only.
        let tags = tags_of(&c, &pve, vmid).await;
        assert!(
            tags.iter().any(|t| t == "sombrero-latest") && tags.iter().any(|t| t == "validated"),
            "{tags:?}"
        );
        let m = marker_of(&config(&c, &pve, vmid).await);
        assert!(m.metadata.validation.validated_at().is_some());
    }
    assert_ne!(vmids[0].0, vmids[1].0);
    assert!(
        !tags_of(&c, &pve, vmids[0].0)
            .await
            .iter()
            .any(|t| t == "sombrero-latest"),
        "the channel tag moved to the new template"
    );

    // Packer's layout, one entry per run, appended as Packer's post-processor does.
    let text = std::fs::read_to_string(&manifest).unwrap();
    assert!(
        text.starts_with("{\n  \"builds\": [\n    {\n      \"name\": "),
        "{text}"
    );
    assert!(!text.ends_with('\n'));
    let m: serde_json::Value = serde_json::from_str(&text).unwrap();
    let builds = m["builds"].as_array().unwrap();
    assert_eq!(builds.len(), 2);
    for (b, (vmid, name)) in builds.iter().zip(&vmids) {
        let keys: Vec<&str> = b.as_object().unwrap().keys().map(String::as_str).collect();
        let mut want = [
            "name",
            "builder_type",
            "build_time",
            "files",
            "artifact_id",
            "packer_run_uuid",
            "custom_data",
        ];
        want.sort();
        let mut keys = keys;
        keys.sort();
        assert_eq!(keys, want);
        assert_eq!(b["name"], "ubuntu-24.04-minimal");
        assert_eq!(b["builder_type"], "sombrero");
        assert_eq!(b["artifact_id"], json!(vmid.to_string()));
        assert!(b["files"].is_null());
        assert!(b["build_time"].as_i64().unwrap() > 1_700_000_000);
        assert_eq!(b["custom_data"]["template_name"], json!(name));
        assert_eq!(b["custom_data"]["node"], json!(pve.node));
        assert!(b["custom_data"]["validated_at"].is_string());
    }
    assert_eq!(m["last_run_uuid"], builds[1]["packer_run_uuid"]);
    assert_ne!(builds[0]["packer_run_uuid"], builds[1]["packer_run_uuid"]);
    assert!(!dir.path().join("packer-manifest.json.lock").exists());
}

#[tokio::test]
async fn cli_failed_validation_exits_5_and_promotes_nothing() {
    let pve = FakePve::start().await;
    let img = pve.add_image(Image::new(IMAGE)).await;
    let c = client(&pve);
    // cloud-init ends `degraded`: the build accepts it, the validation's cloudInit check not.
    pve.set_guest(
        None,
        GuestSettings {
            cloud_init: Some("degraded".into()),
            ..Default::default()
        },
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let file = image_file(dir.path(), &example_spec(&pve, &img, 14));
    let manifest = dir.path().join("m.json");
    let out = cli(
        &pve,
        (&pve.token_id, &pve.token_secret),
        &[
            "build".as_ref(),
            "-f".as_ref(),
            file.as_os_str(),
            "--promote".as_ref(),
            "--manifest".as_ref(),
            manifest.as_os_str(),
        ],
    )
    .await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(5), "{stderr}");
    assert!(
        stderr.contains("failed validation check cloudInit"),
        "{stderr}"
    );
    assert!(out.stdout.is_empty(), "no hand-off for a failed template");
    assert!(!manifest.exists(), "no manifest for a failed run");
    let o = Owner {
        namespace: "ci".into(),
        name: "ubuntu-24.04-minimal".into(),
        uid: sombrero::builder::cli_owner_uid("ci", "ubuntu-24.04-minimal"),
    };
    let vms = image_vms(&c, &o).await;
    let templates: Vec<_> = vms.iter().filter(|v| v.1).collect();
    assert_eq!(templates.len(), 1, "{vms:?}");
    let tags = tags_of(&c, &pve, templates[0].0).await;
    assert!(tags.iter().any(|t| t == "failed-validation"), "{tags:?}");
    assert!(
        !tags
            .iter()
            .any(|t| t == "sombrero-latest" || t == "validated"),
        "{tags:?}"
    );
    // The validation clone is gone; nothing but the template is left.
    assert_eq!(vms.len(), 1, "{vms:?}");
}

#[tokio::test]
async fn a_token_missing_any_privilege_of_the_documented_role_is_refused_before_any_write() {
    let pve = FakePve::start().await;
    let img = pve.add_image(Image::new(IMAGE)).await;
    let dir = tempfile::tempdir().unwrap();
    let file = image_file(dir.path(), &example_spec(&pve, &img, 15));
    let retention = dir.path().join("retention.yaml");
    std::fs::write(
        &retention,
        "apiVersion: images.sombrero.dev/v1alpha1\nkind: TemplateRetention\nmetadata: {name: keep, namespace: ci}\nspec:\n  target: {goldenImageRef: {name: ubuntu-24.04-minimal}}\n  keepLast: 2\n  archive: {mode: backup, backupStorage: local}\n",
    )
    .unwrap();
    let role = documented_role();
    assert_eq!(
        role,
        sombrero::privileges::table::role_privileges(sombrero::proxmox::PveVersion {
            major: 9,
            minor: 0
        }),
        "the README's role is the one the check knows"
    );
    let build_args = [
        "build".as_ref(),
        "-f".as_ref(),
        file.as_os_str(),
        "--promote".as_ref(),
    ];
    for missing in &role {
        let privs: Vec<&str> = role
            .iter()
            .filter(|p| *p != missing)
            .map(String::as_str)
            .collect();
        let (id, secret) = pve.add_token(&privs).await;
        // VM.Backup is for retention's backups; everything else a production build needs.
        let (args, check_file): (&[&std::ffi::OsStr], _) = if missing == "VM.Backup" {
            (
                &["check".as_ref(), "-f".as_ref(), retention.as_os_str()],
                &retention,
            )
        } else {
            (&build_args, &file)
        };
        let out = cli(&pve, (&id, &secret), args).await;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(6), "without {missing}: {stderr}");
        assert!(
            stderr.contains(&format!("  {missing} on /")),
            "without {missing}, the refusal names it and its path:\n{stderr}"
        );
        assert!(stderr.contains("pveum acl modify /"), "{stderr}");
        assert!(!stderr.contains(&secret));
        let writes: Vec<_> = pve
            .requests()
            .await
            .into_iter()
            .filter(|r| r.token_id.as_deref() == Some(id.as_str()) && r.method != "GET")
            .collect();
        assert!(writes.is_empty(), "without {missing}: {writes:?}");
        // `sombrero check` says the same for the same file.
        let out = cli(
            &pve,
            (&id, &secret),
            &["check".as_ref(), "-f".as_ref(), check_file.as_os_str()],
        )
        .await;
        assert_eq!(out.status.code(), Some(6), "check without {missing}");
        assert!(String::from_utf8_lossy(&out.stderr).contains(&format!("  {missing} on /")));
    }
    // The whole role, and the full token, pass both checks.
    let all: Vec<&str> = role.iter().map(String::as_str).collect();
    let (id, secret) = pve.add_token(&all).await;
    for token in [
        (id.as_str(), secret.as_str()),
        (&pve.token_id, &pve.token_secret),
    ] {
        for f in [&file, &retention] {
            let out = cli(
                &pve,
                token,
                &["check".as_ref(), "-f".as_ref(), f.as_os_str()],
            )
            .await;
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(0), "{}: {stderr}", token.0);
            assert!(stderr.contains("holds every privilege"), "{stderr}");
        }
    }
    // Nothing was built by any of it.
    assert!(client(&pve).cluster_vms().await.unwrap().is_empty());
}
