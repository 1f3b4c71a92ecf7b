//! The build pipeline against the fake Proxmox VE: both sources, SSH and guest-agent
//! provisioning, names and build numbers, tags and description, checksum and command failures,
//! interruption at every stage, concurrent builds, and a consumer's clone left alone.

mod support;

use std::sync::Arc;
use std::time::Duration;

use chrono::NaiveDate;
use serde_json::json;
use sombrero::api::admission::admit;
use sombrero::api::golden_image::{ProvisioningChannel, TemplateSource};
use sombrero::api::{GoldenImage, GoldenImageSpec};
use sombrero::build::{BuildError, BuildOutcome, BuildRequest, NoProgress, Progress, Stage};
use sombrero::image::marker::{
    Marker, Owner, Role, SourceInfo, parse_description, render_description,
};
use sombrero::image::tags::image_tag;
use sombrero::proxmox::{Client, Config, VmConfig};
use support::fakepve::{CommandFailure, FakePve, GuestSettings, Image, ImageInfo, Options};
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
    sombrero::build::run_build(c, req, &NoProgress).await
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
    assert!(g.service_enabled("qemu-guest-agent") && g.service_enabled("cloud-init"));
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
    assert!(pos("apt-get update") < pos("upgrade -y"));
    assert!(pos("upgrade -y") < pos("install -y qemu-guest-agent cloud-init"));
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
    // 0.2: the fake's download takes 1 s, a progress line every 100 ms, and the client polls
    // about five times meanwhile (50 ms growing by 1.5x): room for a loaded CI machine.
    let pve = FakePve::start_with(Options { time_scale: 0.2, ..Default::default() }).await;
    let c = client(&pve);
    let img = pve.add_image(Image::new(IMAGE)).await;
    let progress = SourcePercents::default();
    let req = request(example_spec(&pve, &img, 8), owner("percent"), day(18));
    sombrero::build::run_build(&c, &req, &progress)
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

#[tokio::test]
async fn failed_command_names_the_step_and_the_vm_is_destroyed_or_kept() {
    let pve = FakePve::start().await;
    let c = client(&pve);
    let img = pve.add_image(Image::new(IMAGE)).await;
    pve.set_guest(
        None,
        GuestSettings {
            failures: Some(vec![CommandFailure::new(
                "apt-get.* upgrade",
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
            r = sombrero::build::run_build(&c, &req, &progress) => panic!("the build was not interrupted at {stage}: {r:?}"),
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
        sombrero::build::cleanup_abandoned_builds(&c, &o)
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
        r = sombrero::build::run_build(&c, &req, &progress) => panic!("not interrupted: {r:?}"),
        _ = hit.notified() => {}
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let removed = sombrero::build::cleanup_abandoned_builds(&c, &o)
        .await
        .unwrap();
    assert_eq!(removed.len(), 1);
    let vms = image_vms(&c, &o).await;
    assert_eq!(vms.len(), 1);
    assert_eq!(vms[0].0, done.vmid);
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
