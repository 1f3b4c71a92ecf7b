//! End to end on a real Debian 12 guest: QEMU (TCG) behind the fake Proxmox VE
//! (`tests/fakepve/qemu_backend.py`, harness flag `--real-guest`), the image and its signed apt
//! repository from `scripts/real-guest-image.sh` (`.cache/real-guest/`).
//!
//! One test, so the guests boot once per test run; its scenarios run in two lanes (each scenario
//! with its own fake, at most two guests at a time) unless `SOMBRERO_REAL_GUEST_SERIAL=1` (what
//! `make bench-real-guest` sets, so the figures are not shared CPU):
//! - `cli`: `sombrero build -f` of a Debian 12 GoldenImage from the cloud image over SSH (real
//!   apt-get update / upgrade / install, systemctl enable, clean-up): the template is named,
//!   tagged and marked; then `validate::validate_template` through a real linked clone (boot,
//!   agent, `cloud-init status --wait`, SSH login with the validation key, package drift against
//!   the build's manifest), the clone destroyed, and the clone booted the NEWEST kernel the
//!   repository offers (the upgrade must install a kernel that comes as a new package); then the
//!   next month's rebuild from that template (a `template` source) whose clean-up removes the
//!   old kernel without purging it (dpkg state `rc`), validated without drift;
//! - `controller`: the same GoldenImage applied on the real kube-apiserver: Ready, ConfigMap;
//! - `missing-package`: a spec package that does not exist fails the build naming the step and
//!   apt's own error, and leaves no VM.
//!
//! Each scenario prints its figures (stage and step wall times, disk sizes, Proxmox requests);
//! run with `--nocapture` to see them. A missing prerequisite (QEMU, the image cache) fails with
//! the command that installs it.

mod support;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, PostParams};
use serde_json::{Value, json};
use sombrero::api::GoldenImage;
use sombrero::api::golden_image::{SshBuild, Validation};
use sombrero::image::marker::{Marker, Owner, Role, parse_description};
use sombrero::image::tags::image_tag;
use sombrero::proxmox::{Client, Config, RetryPolicy};
use sombrero::validate::{self, Check, ProgressEvent, SshProbe, ValidationRequest};
use support::controller::{controller_client, is_ready, options, put_secret, start, wait_for};
use support::fakepve::{FakePve, ImageInfo, Options};
use support::kube::control_plane;
use tokio::io::{AsyncBufReadExt, BufReader};

/// The name the cloud image is served under (the file name of Debian's published one).
const IMAGE_FILE: &str = "debian-12-genericcloud-amd64.qcow2";
/// A package of the spec besides the seed's two (its closure is in the repository).
const EXTRA_PACKAGE: &str = "jq";
const MISSING_PACKAGE: &str = "sombrero-no-such-package";

/// What `scripts/real-guest-image.sh` built.
#[derive(Clone, Debug)]
struct Cache {
    dir: PathBuf,
    /// `uname -r` of the image as published.
    image_kernel: String,
    /// The newest kernel of the repository (a NEW package: only a full upgrade installs it).
    repo_kernel: String,
}

/// Runs the image script (instant when its stamp matches); a failure names the command.
fn cache() -> Cache {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let script = root.join("scripts/real-guest-image.sh");
    let out = std::process::Command::new("bash")
        .arg(&script)
        .current_dir(root)
        .stderr(Stdio::inherit())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
    assert!(
        out.status.success(),
        "the real-guest tests need QEMU and the Debian 12 image: run `scripts/real-guest-image.sh` \
         (or `make real-guest-image`) as root; it failed ({}), its output is above",
        out.status
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let dir = PathBuf::from(stdout.lines().last().expect("the cache dir").trim());
    let env = std::fs::read_to_string(dir.join("image.env")).expect("image.env");
    let field = |k: &str| {
        env.lines()
            .find_map(|l| l.strip_prefix(&format!("{k}=")))
            .unwrap_or_else(|| panic!("{k} missing in image.env"))
            .to_string()
    };
    Cache {
        image_kernel: field("IMAGE_KERNEL"),
        repo_kernel: field("REPO_KERNEL"),
        dir,
    }
}

/// A fake with real guests: tasks at time scale 0.01 (they run in the background, as on PVE).
async fn real_pve(cache: &Cache) -> (FakePve, ImageInfo) {
    let pve = FakePve::start_with(Options {
        time_scale: 0.01,
        real_guest: Some(cache.dir.clone()),
    })
    .await;
    let img = pve
        .add_image_file(IMAGE_FILE, &cache.dir.join("debian-12.qcow2"))
        .await;
    (pve, img)
}

fn pve_api(pve: &FakePve) -> Client {
    let config = Config::new(&pve.url, &pve.token_id, pve.token_secret.as_str())
        .unwrap()
        .with_ca_pem(pve.ca_pem.clone())
        .unwrap()
        .with_timeout(Duration::from_secs(60))
        .with_retry(RetryPolicy {
            max_attempts: 3,
            initial_delay: Duration::from_millis(200),
            max_delay: Duration::from_secs(2),
        });
    Client::new(config).unwrap()
}

/// The repository's Debian example pointed at the fake: the served image, SSH to the build VM's
/// loopback address as the `debian` user, generous timeouts for TCG.
fn debian_spec(pve: &FakePve, img: &ImageInfo, ip_n: u8, packages: &[&str]) -> Value {
    let yaml = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/debian-12-minimal.yaml"),
    )
    .unwrap();
    let example =
        sombrero::api::admission::admit::<GoldenImage>(&yaml).expect("the example admits");
    let mut spec = serde_json::to_value(example.object.spec).unwrap();
    spec["source"] = json!({"cloudImage": {
        "url": img.url, "checksum": format!("sha256:{}", img.checksums["sha256"])}});
    spec["placement"]["node"] = json!(pve.node);
    spec["provisioning"]["ssh"]["ipConfig"] = json!(format!("ip={}/8", pve.guest_ip(ip_n)));
    spec["provisioning"]["ssh"]["port"] = json!(pve.ssh_port.expect("the harness serves SSH"));
    spec["provisioning"]["packages"] = json!(packages);
    spec["provisioning"]["timeout"] = json!("45m");
    spec["validation"] = json!({"timeout": "30m"});
    spec
}

/// A GoldenImage file for `sombrero build -f` (JSON is YAML).
fn spec_file(dir: &Path, name: &str, spec: &Value) -> PathBuf {
    let path = dir.join(format!("{name}.yaml"));
    let doc = json!({
        "apiVersion": "images.sombrero.dev/v1alpha1", "kind": "GoldenImage",
        "metadata": {"name": name}, "spec": spec,
    });
    std::fs::write(&path, serde_json::to_string_pretty(&doc).unwrap()).unwrap();
    path
}

/// A `sombrero build -f` run: exit code, stdout, stderr lines with the second they arrived.
struct CliRun {
    code: Option<i32>,
    stdout: String,
    lines: Vec<(f64, String)>,
    seconds: f64,
}

impl CliRun {
    fn stderr(&self) -> String {
        self.lines
            .iter()
            .map(|l| l.1.as_str())
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Wall time of each progress line until the next (recipe steps are one line each).
    fn steps(&self) -> Vec<(String, f64)> {
        let mut out = Vec::new();
        for (i, (t, line)) in self.lines.iter().enumerate() {
            let next = self.lines.get(i + 1).map_or(self.seconds, |l| l.0);
            out.push((line.clone(), next - t));
        }
        out
    }
}

async fn cli_build(pve: &FakePve, file: &Path) -> CliRun {
    let started = Instant::now();
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_sombrero"))
        .args(["build", "-f"])
        .arg(file)
        .env("PROXMOX_URL", &pve.url)
        .env("PROXMOX_TOKEN_ID", &pve.token_id)
        .env("PROXMOX_TOKEN_SECRET", &pve.token_secret)
        .env("PROXMOX_CA_CERT", &pve.ca_cert_path)
        .env_remove("PROXMOX_INSECURE")
        .env_remove("PROXMOX_FINGERPRINT")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("run sombrero");
    let stderr = child.stderr.take().unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let out_task = tokio::spawn(async move {
        let mut s = String::new();
        tokio::io::AsyncReadExt::read_to_string(&mut stdout, &mut s)
            .await
            .ok();
        s
    });
    let mut lines = Vec::new();
    let mut reader = BufReader::new(stderr).lines();
    while let Ok(Some(line)) = reader.next_line().await {
        lines.push((started.elapsed().as_secs_f64(), line));
    }
    let status = child.wait().await.expect("wait for sombrero");
    CliRun {
        code: status.code(),
        stdout: out_task.await.unwrap(),
        lines,
        seconds: started.elapsed().as_secs_f64(),
    }
}

/// Figures of one scenario: each printed when measured (a later failed assertion keeps them),
/// and again as a table when the scenario ends.
struct Figures {
    scenario: &'static str,
    rows: Vec<(String, String)>,
}

impl Figures {
    fn new(scenario: &'static str) -> Self {
        Figures {
            scenario,
            rows: Vec::new(),
        }
    }
    fn secs(&mut self, what: impl Into<String>, s: f64) {
        self.note(what, format!("{s:.1} s"));
    }
    fn note(&mut self, what: impl Into<String>, v: impl Into<String>) {
        let (what, v) = (what.into(), v.into());
        println!("[real guest: {}] {what}: {v}", self.scenario);
        self.rows.push((what, v));
    }
    fn print(&self, title: &str) {
        println!("\n== real guest: {title} ==");
        for (k, v) in &self.rows {
            println!("{k:<72} {v}");
        }
    }
}

fn mib(bytes: u64) -> String {
    format!("{:.0} MiB", bytes as f64 / (1 << 20) as f64)
}

/// Boots the harness saw for `vmid`: (kernel banner, seconds the QEMU process ran).
fn boots_of(status: &Value, vmid: u32) -> Vec<(Option<String>, Option<f64>)> {
    status["boots"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|b| b["vmid"] == json!(vmid))
        .map(|b| {
            (
                b["kernel"].as_str().map(str::to_string),
                b["stopped"]
                    .as_f64()
                    .map(|s| s - b["started"].as_f64().unwrap()),
            )
        })
        .collect()
}

/// Stage and step times from the CLI's progress lines (`[  12.3s] Provision: apt-get update`,
/// consecutive lines of one step merged) and its closing "built ... in" line.
fn cli_figures(f: &mut Figures, run: &CliRun) {
    let mut merged: Vec<(String, f64)> = Vec::new();
    for (line, secs) in run.steps() {
        let line = line.trim();
        if let Some(stages) = line
            .strip_prefix("built ")
            .and_then(|l| l.split_once(" in "))
        {
            for part in stages.1.split(", ") {
                if let Some((stage, s)) = part.rsplit_once(' ') {
                    f.note(format!("stage {stage}"), s.to_string());
                }
            }
            continue;
        }
        let Some((_, rest)) = line.split_once("] ") else {
            continue;
        };
        // "Source 40%: downloading" and "Source: downloading" are one step.
        let key = match rest.split_once(": ") {
            Some((stage, msg)) => format!("{}: {msg}", stage.split(' ').next().unwrap_or(stage)),
            None => rest.to_string(),
        };
        match merged.last_mut() {
            Some(last) if last.0 == key => last.1 += secs,
            _ => merged.push((key, secs)),
        }
    }
    for (key, secs) in merged {
        f.secs(format!("  step {}", shorten(&key, 64)), secs);
    }
    f.secs("build wall time (sombrero build -f)", run.seconds);
}

fn shorten(s: &str, n: usize) -> String {
    if s.chars().count() > n {
        format!("{}…", s.chars().take(n).collect::<String>())
    } else {
        s.to_string()
    }
}

/// Validation of `vmid` through a real linked clone with `manifest` as the baseline: all five
/// checks pass, SSH logs in, no drift. Returns the report (its clone is destroyed).
async fn validate_through_clone(
    pve: &FakePve,
    vmid: u32,
    owner: &Owner,
    manifest: &[String],
    ip_n: u8,
    label: &str,
    f: &mut Figures,
) -> validate::ValidationReport {
    let mut req = ValidationRequest::new(
        vmid,
        pve.node.clone(),
        owner.clone(),
        Validation {
            timeout: "30m".into(),
            ..Validation::default()
        },
    );
    req.ssh = SshBuild {
        ip_config: format!("ip={}/8", pve.guest_ip(ip_n)),
        host: None,
        port: pve.ssh_port.unwrap(),
        user: "sombrero".into(),
    };
    req.ssh_probe = SshProbe::Login;
    req.baseline_packages = manifest.to_vec();
    req.agent_timeout = Duration::from_secs(20 * 60);
    let started = Instant::now();
    let seq = pve.requests().await.last().map_or(0, |r| r.seq);
    let events = std::sync::Mutex::new(Vec::new());
    let progress = |e: &ProgressEvent| {
        events
            .lock()
            .unwrap()
            .push((started.elapsed().as_secs_f64(), format!("{e:?}")))
    };
    let c = pve_api(pve);
    let report = validate::validate_template(&c, &req, &progress)
        .await
        .expect("validation runs");
    f.secs(
        format!("{label}validation wall time"),
        started.elapsed().as_secs_f64(),
    );
    f.note(
        format!("{label}Proxmox requests per validation"),
        pve.requests_since(seq).await.len().to_string(),
    );
    for check in &report.checks {
        f.secs(
            format!("  {label}check {}", check.check),
            check.duration.as_secs_f64(),
        );
    }
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
    assert!(
        report.drift.as_ref().unwrap().is_clean(),
        "{:#?}",
        report.drift
    );
    report
}

/// `sombrero build -f`, then validation of its template through a real linked clone.
async fn cli_build_and_validate(cache: Cache) -> Figures {
    let mut f = Figures::new("cli");
    let (pve, img) = real_pve(&cache).await;
    let c = pve_api(&pve);
    let dir = tempfile::tempdir().unwrap();
    let spec = debian_spec(&pve, &img, 10, &[EXTRA_PACKAGE]);
    let file = spec_file(dir.path(), "debian-12-minimal", &spec);

    let run = cli_build(&pve, &file).await;
    assert_eq!(
        run.code,
        Some(0),
        "sombrero build -f failed:\n{}\n{}",
        run.stderr(),
        run.stdout
    );
    let requests = pve.requests().await.len();
    cli_figures(&mut f, &run);
    f.note("Proxmox requests per build", requests.to_string());
    let hand_off: Value = serde_json::from_str(run.stdout.trim()).expect("the seed's JSON");
    // The seed's JSON: template_id is a string (Terraform's external data source wants strings).
    let vmid: u32 = hand_off["template_id"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("template_id in {hand_off}"));
    let name = hand_off["template_name"].as_str().unwrap().to_string();
    assert_eq!(hand_off["node"], json!(pve.node));

    // Named, tagged and marked as with the model.
    let today = chrono::Utc::now().date_naive();
    assert_eq!(
        name,
        format!("debian-12-minimal-{}-001", today.format("%Y%m%d"))
    );
    let cfg = c.vm_config(&pve.node, vmid).await.unwrap();
    assert!(cfg.template);
    assert_eq!(cfg.name.as_deref(), Some(name.as_str()));
    assert!(cfg.agent_enabled());
    assert!(cfg.sshkeys.is_none(), "no build key left in the template");
    assert!(cfg.value("ipconfig0").is_none(), "no build network left");
    let tags = cfg.tag_list();
    for t in [
        "sombrero",
        &image_tag("default", "debian-12-minimal"),
        "os.debian-12",
        "type.minimal",
    ] {
        assert!(tags.iter().any(|x| x == t), "tag {t} missing: {tags:?}");
    }
    let marker: Marker = parse_description(cfg.description.as_deref().unwrap_or(""))
        .unwrap()
        .expect("our marker");
    let owner = Owner {
        namespace: "default".into(),
        name: "debian-12-minimal".into(),
        uid: sombrero::builder::cli_owner_uid("default", "debian-12-minimal"),
    };
    assert_eq!((marker.role, marker.vmid), (Role::Template, vmid));
    assert_eq!(marker.owner, owner);
    let manifest = marker.package_manifest().unwrap();
    for p in ["qemu-guest-agent=", "cloud-init=", "jq=", "openssh-server="] {
        assert!(
            manifest.iter().any(|m| m.starts_with(p)),
            "{p} missing from the manifest: {manifest:?}"
        );
    }

    // The real disk: what the template costs on storage.
    let status = pve.real_guest_status().await;
    let disk = status["disks"]
        .as_object()
        .unwrap()
        .iter()
        .find(|(volid, _)| volid.contains(&format!("base-{vmid}-disk")))
        .unwrap_or_else(|| panic!("no base disk of {vmid}: {status:#}"))
        .1
        .clone();
    let (actual, virt) = (
        disk["actual"].as_u64().unwrap(),
        disk["virtual"].as_u64().unwrap(),
    );
    assert_eq!(virt, 10 << 30, "resized to hardware.diskGiB");
    f.note("template disk, actual (qcow2 on storage)", mib(actual));
    f.note("template disk, virtual", mib(virt));
    // The build VM ran the image's kernel; what the template boots is the validation's to show.
    let build_boots = boots_of(&status, vmid);
    assert_eq!(build_boots.len(), 1, "{status:#}");
    assert_eq!(
        build_boots[0].0.as_deref(),
        Some(cache.image_kernel.as_str())
    );
    for s in status["stats"].as_array().unwrap() {
        f.secs(
            format!("  harness: {}", s["what"].as_str().unwrap()),
            s["secs"].as_f64().unwrap(),
        );
    }

    // Validation through a real linked clone, with the build's manifest as the baseline.
    let report = validate_through_clone(&pve, vmid, &owner, &manifest, 20, "", &mut f).await;
    let clone = report.clone_vmid.expect("a clone was made");
    let left: Vec<u32> = c
        .cluster_vms()
        .await
        .unwrap()
        .iter()
        .map(|v| v.vmid)
        .collect();
    assert_eq!(left, [vmid], "the clone is destroyed");

    // The template boots the newest kernel the repository offers.
    let status = pve.real_guest_status().await;
    let clone_boots = boots_of(&status, clone);
    assert_eq!(clone_boots.len(), 1, "{status:#}");
    assert_eq!(
        clone_boots[0].0.as_deref(),
        Some(cache.repo_kernel.as_str()),
        "the validation clone booted {:?}, the repository's newest kernel is {} (the image had {}): \
         the build's upgrade did not install the kernel that comes as a new package",
        clone_boots[0].0,
        cache.repo_kernel,
        cache.image_kernel
    );
    f.note(
        "kernel: image / template",
        format!("{} / {}", cache.image_kernel, cache.repo_kernel),
    );
    assert!(
        status["running"].as_array().unwrap().is_empty(),
        "no guest left running"
    );
    rebuild_from_template(&pve, &c, &img, &cache, vmid, &manifest, &mut f).await;
    f
}

/// Next month's rebuild from the template just made (a `template` source: a full clone), whose
/// clean-up command removes the image's old kernel without purging it, as an `autoremove` of
/// old kernels does: dpkg keeps it in state `rc` (config-files). The manifest and validation
/// count only installed packages, so the drift check passes; a manifest of every `dpkg-query -W`
/// line listed the `rc` kernel, which validation then reported as removed.
async fn rebuild_from_template(
    pve: &FakePve,
    c: &Client,
    img: &ImageInfo,
    cache: &Cache,
    base: u32,
    first_manifest: &[String],
    f: &mut Figures,
) {
    let old_kernel = format!("linux-image-{}=", cache.image_kernel);
    let new_kernel = format!("linux-image-{}=", cache.repo_kernel);
    assert!(
        first_manifest.iter().any(|m| m.starts_with(&old_kernel)),
        "the first build ran on the image's kernel, which stays installed: {first_manifest:?}"
    );
    let dir = tempfile::tempdir().unwrap();
    let mut spec = debian_spec(pve, img, 50, &[]);
    spec["source"] = json!({"template": {"vmid": base}});
    spec["provisioning"]["commands"] = json!([format!(
        "DEBIAN_FRONTEND=noninteractive apt-get remove -y linux-image-{}",
        cache.image_kernel
    )]);
    let file = spec_file(dir.path(), "debian-12-rebuild", &spec);
    let seq = pve.requests().await.last().map_or(0, |r| r.seq);
    let run = cli_build(pve, &file).await;
    assert_eq!(
        run.code,
        Some(0),
        "the rebuild from the template failed:\n{}\n{}",
        run.stderr(),
        run.stdout
    );
    f.secs("rebuild from the template (sombrero build -f)", run.seconds);
    f.note(
        "rebuild: Proxmox requests per build",
        pve.requests_since(seq).await.len().to_string(),
    );
    let hand_off: Value = serde_json::from_str(run.stdout.trim()).expect("the seed's JSON");
    let vmid: u32 = hand_off["template_id"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("template_id in {hand_off}"));
    let cfg = c.vm_config(&pve.node, vmid).await.unwrap();
    let marker: Marker = parse_description(cfg.description.as_deref().unwrap_or(""))
        .unwrap()
        .expect("our marker");
    let manifest = marker.package_manifest().unwrap();
    assert!(
        !manifest.iter().any(|m| m.starts_with(&old_kernel)),
        "the removed (not purged) kernel is not installed, so not in the manifest: {manifest:?}"
    );
    assert!(
        manifest.iter().any(|m| m.starts_with(&new_kernel)),
        "{new_kernel} missing from the manifest: {manifest:?}"
    );
    // The rebuild's build VM booted the template's (new) kernel.
    let status = pve.real_guest_status().await;
    let boots = boots_of(&status, vmid);
    assert_eq!(
        boots.first().and_then(|b| b.0.as_deref()),
        Some(cache.repo_kernel.as_str()),
        "{status:#}"
    );
    let owner = Owner {
        namespace: "default".into(),
        name: "debian-12-rebuild".into(),
        uid: sombrero::builder::cli_owner_uid("default", "debian-12-rebuild"),
    };
    validate_through_clone(pve, vmid, &owner, &manifest, 60, "rebuild: ", f).await;
    let mut left: Vec<u32> = c
        .cluster_vms()
        .await
        .unwrap()
        .iter()
        .map(|v| v.vmid)
        .collect();
    left.sort();
    assert_eq!(
        left,
        [base, vmid],
        "two templates, no build VM or clone left"
    );
}

/// The same image through the controller: GoldenImage → Ready, ConfigMap written.
async fn controller_build_and_validate(cache: Cache) -> Figures {
    let mut f = Figures::new("controller");
    let started = Instant::now();
    let cp = control_plane();
    cp.install_crds();
    let client = cp.client().await;
    let ns = cp.namespace(&client, "real-guest").await;
    let (rbac, sa) = controller_client(cp, &ns).await;
    let (pve, img) = real_pve(&cache).await;
    put_secret(&client, &ns, "pve", &pve, &pve.token_secret).await;
    let mut spec = debian_spec(&pve, &img, 30, &[]);
    spec["proxmox"] = json!({"secretRef": {"name": "pve"}});
    spec["output"] = json!({"configMapName": "debian-template"});
    spec["rebuild"] = json!({});
    let gi: GoldenImage = serde_json::from_value(json!({
        "apiVersion": "images.sombrero.dev/v1alpha1", "kind": "GoldenImage",
        "metadata": {"name": "debian"}, "spec": spec,
    }))
    .unwrap();
    Api::<GoldenImage>::namespaced(client.clone(), &ns)
        .create(&PostParams::default(), &gi)
        .await
        .expect("create GoldenImage");
    let ctl = start(&sa, options(&rbac, "real", false));
    let gi = wait_for(
        &client,
        &ns,
        "debian",
        "Ready=True",
        Duration::from_secs(60 * 60),
        |gi| is_ready(gi) && gi.status.as_ref().is_some_and(|s| s.build.is_none()),
    )
    .await;
    f.secs(
        "GoldenImage applied → Ready",
        started.elapsed().as_secs_f64(),
    );
    let latest = gi.status.unwrap().latest.expect("status.latest");
    let c = pve_api(&pve);
    let cfg = c.vm_config(&latest.node, latest.vmid).await.unwrap();
    let marker = parse_description(cfg.description.as_deref().unwrap_or(""))
        .unwrap()
        .expect("our marker");
    assert!(
        marker.metadata.validation.validated_at().is_some(),
        "{marker:?}"
    );
    let cm = Api::<ConfigMap>::namespaced(client.clone(), &ns)
        .get("debian-template")
        .await
        .expect("the output ConfigMap");
    assert_eq!(
        cm.data.unwrap(),
        sombrero::promote::config_map_data(latest.vmid, &latest.node, &marker)
    );
    let status = pve.real_guest_status().await;
    let kernels: BTreeMap<u64, Option<String>> = status["boots"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| {
            (
                b["vmid"].as_u64().unwrap(),
                b["kernel"].as_str().map(str::to_string),
            )
        })
        .collect();
    f.note("boots (vmid → kernel)", format!("{kernels:?}"));
    f.note(
        "Proxmox requests (build + validation + promotion + resyncs)",
        pve.requests().await.len().to_string(),
    );
    ctl.abort();
    f
}

/// A package the repository does not have: the build fails at the install step with apt's words.
async fn missing_package_fails_the_build(cache: Cache) -> Figures {
    let mut f = Figures::new("missing-package");
    let (pve, img) = real_pve(&cache).await;
    let dir = tempfile::tempdir().unwrap();
    let mut spec = debian_spec(&pve, &img, 40, &[MISSING_PACKAGE]);
    // Nothing to learn from the upgrade here; the failure comes sooner without it.
    spec["provisioning"]["upgrade"] = json!(false);
    let file = spec_file(dir.path(), "debian-12-broken", &spec);
    let run = cli_build(&pve, &file).await;
    f.secs("failed build wall time", run.seconds);
    let stderr = run.stderr();
    assert_eq!(
        run.code,
        Some(4),
        "exit code of a failed guest step:\n{stderr}"
    );
    let step = format!("apt-get install -y qemu-guest-agent cloud-init {MISSING_PACKAGE}");
    assert!(
        stderr.contains(&step),
        "the error names the step `{step}`:\n{stderr}"
    );
    assert!(
        stderr.contains(&format!("E: Unable to locate package {MISSING_PACKAGE}")),
        "the error carries apt's message:\n{stderr}"
    );
    let c = pve_api(&pve);
    assert!(
        c.cluster_vms().await.unwrap().is_empty(),
        "the failed build VM is destroyed"
    );
    let status = pve.real_guest_status().await;
    assert!(
        status["running"].as_array().unwrap().is_empty(),
        "{status:#}"
    );
    f
}

/// What a scenario's panic said (a JoinError alone says only "task panicked").
fn panic_message(e: tokio::task::JoinError) -> String {
    match e.try_into_panic() {
        Ok(p) => p
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "panicked".into()),
        Err(e) => e.to_string(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_real_debian_12_guest_builds_validates_and_fails_as_it_should() {
    let cache = cache();
    let serial = std::env::var("SOMBRERO_REAL_GUEST_SERIAL").is_ok_and(|v| v == "1");
    // SOMBRERO_REAL_GUEST_ONLY=cli,controller,missing-package: a subset, one after another
    // (for working on one scenario; the test run runs them all).
    let only = std::env::var("SOMBRERO_REAL_GUEST_ONLY").unwrap_or_default();
    let started = Instant::now();
    let mut results = Vec::new();
    if !only.is_empty() {
        for name in only.split(',').map(str::trim) {
            let r = match name {
                "cli" => tokio::spawn(cli_build_and_validate(cache.clone())).await,
                "controller" => tokio::spawn(controller_build_and_validate(cache.clone())).await,
                "missing-package" => {
                    tokio::spawn(missing_package_fails_the_build(cache.clone())).await
                }
                other => panic!("SOMBRERO_REAL_GUEST_ONLY: no scenario {other:?}"),
            };
            results.push((name.to_string(), r));
        }
    } else if serial {
        let r = tokio::spawn(cli_build_and_validate(cache.clone())).await;
        results.push(("cli".to_string(), r));
        let r = tokio::spawn(controller_build_and_validate(cache.clone())).await;
        results.push(("controller".to_string(), r));
        let r = tokio::spawn(missing_package_fails_the_build(cache.clone())).await;
        results.push(("missing-package".to_string(), r));
    } else {
        // Two lanes, at most two guests at a time on a 2-core machine: the CLI build and its
        // validation; the short failing build, then the controller's build and validation.
        let a = tokio::spawn(cli_build_and_validate(cache.clone()));
        let lane = {
            let cache = cache.clone();
            tokio::spawn(async move {
                let d = tokio::spawn(missing_package_fails_the_build(cache.clone())).await;
                let b = tokio::spawn(controller_build_and_validate(cache)).await;
                (d, b)
            })
        };
        results.push(("cli".to_string(), a.await));
        let (d, b) = lane.await.expect("the second lane");
        results.push(("missing-package".to_string(), d));
        results.push(("controller".to_string(), b));
    }
    let mut failed = Vec::new();
    for (name, r) in results {
        match r {
            Ok(f) => f.print(&name),
            Err(e) => failed.push(format!("{name}: {}", panic_message(e))),
        }
    }
    println!(
        "\nreal-guest tests: {:.0} s wall ({})",
        started.elapsed().as_secs_f64(),
        if serial { "serial" } else { "concurrent" }
    );
    assert!(
        failed.is_empty(),
        "real-guest scenarios failed:\n{}",
        failed.join("\n")
    );
}
