//! Health of GoldenImage and TemplateRetention as the GitOps tools see it: the Argo CD Lua
//! scripts shipped in examples/gitops/argocd/argocd-cm.yaml, run by gopher-lua (Argo CD's
//! interpreter, with Argo CD's library sandbox), and Flux's kstatus `status.Compute`, both via
//! the Go-built `sombrero-health` (scripts/test-tools.sh), on the samples in tests/health/.
//! Each sample names what both tools must say in its `# argocd:` and `# kstatus:` headers.

use crate::support;

use std::path::{Path, PathBuf};
use std::process::Command;

use serde::Deserialize;
use sombrero::api::GROUP;
use support::kube::{repo_root, tool};

const KINDS: [&str; 2] = ["GoldenImage", "TemplateRetention"];

fn health_key(kind: &str) -> String {
    format!("resource.customizations.health.{GROUP}_{kind}")
}

/// The Lua script of `kind`, from the shipped argocd-cm snippet, written to a temp file.
fn lua_script(kind: &str, dir: &Path) -> PathBuf {
    let cm_path = repo_root().join("examples/gitops/argocd/argocd-cm.yaml");
    let cm: serde_yaml::Value =
        serde_yaml::from_str(&std::fs::read_to_string(&cm_path).unwrap()).unwrap();
    let script = cm["data"][health_key(kind).as_str()]
        .as_str()
        .unwrap_or_else(|| panic!("{} has no key {}", cm_path.display(), health_key(kind)));
    let path = dir.join(format!("{kind}.lua"));
    std::fs::write(&path, script).unwrap();
    path
}

/// Runs sombrero-health; Ok(status) or Err(stderr).
fn health(args: &[&Path]) -> Result<(String, String), String> {
    let out = Command::new(tool("sombrero-health"))
        .args(args.iter().map(|p| p.as_os_str()))
        .output()
        .expect("run sombrero-health");
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    #[derive(Deserialize)]
    struct Res {
        status: String,
        message: String,
    }
    let r: Res = serde_json::from_slice(&out.stdout).expect("sombrero-health prints JSON");
    Ok((r.status, r.message))
}

struct Sample {
    path: PathBuf,
    kind: String,
    argocd: String,
    kstatus: String,
}

fn samples() -> Vec<Sample> {
    let dir = repo_root().join("tests/health");
    let mut out: Vec<Sample> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .map(|path| {
            let text = std::fs::read_to_string(&path).unwrap();
            let header = |key: &str| {
                text.lines()
                    .find_map(|l| l.strip_prefix(&format!("# {key}: ")))
                    .unwrap_or_else(|| panic!("{}: no `# {key}:` header", path.display()))
                    .trim()
                    .to_string()
            };
            let obj: serde_yaml::Value = serde_yaml::from_str(&text).unwrap();
            let kind = obj["kind"].as_str().expect("sample kind").to_string();
            Sample {
                kind,
                argocd: header("argocd"),
                kstatus: header("kstatus"),
                path,
            }
        })
        .collect();
    out.sort_by(|a, b| a.path.cmp(&b.path));
    out
}

#[test]
fn argocd_and_kstatus_agree_with_the_samples() {
    let tmp = tempfile::tempdir().unwrap();
    let samples = samples();
    let mut failures = Vec::new();
    for s in &samples {
        assert!(
            KINDS.contains(&s.kind.as_str()),
            "{}: kind {}",
            s.path.display(),
            s.kind
        );
        let script = lua_script(&s.kind, tmp.path());
        let name = s.path.file_name().unwrap().to_string_lossy();
        match health(&[Path::new("argocd"), &script, &s.path]) {
            Ok((status, message)) if status == s.argocd => {
                assert!(
                    !message.is_empty(),
                    "{name}: Argo CD health without a message"
                );
            }
            Ok((status, message)) => failures.push(format!(
                "{name}: Argo CD says {status} ({message}), expected {}",
                s.argocd
            )),
            Err(e) => failures.push(format!("{name}: the Lua script failed: {e}")),
        }
        match health(&[Path::new("kstatus"), &s.path]) {
            Ok((status, _)) if status == s.kstatus => {}
            Ok((status, message)) => failures.push(format!(
                "{name}: kstatus says {status} ({message}), expected {}",
                s.kstatus
            )),
            Err(e) => failures.push(format!("{name}: kstatus failed: {e}")),
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));

    // The samples cover every state both tools distinguish, for both kinds.
    for want in ["Healthy", "Progressing", "Degraded"] {
        for kind in KINDS {
            assert!(
                samples.iter().any(|s| s.argocd == want && s.kind == kind),
                "no {kind} sample that Argo CD sees as {want}"
            );
        }
    }
    for want in ["Current", "InProgress", "Failed", "Terminating"] {
        assert!(
            samples.iter().any(|s| s.kstatus == want),
            "no sample that kstatus sees as {want}"
        );
    }
    for name in [
        "gi-in-progress",
        "gi-ready",
        "gi-failed-validation",
        "gi-stalled",
        "gi-deleting",
        "gi-generation-not-observed",
    ] {
        assert!(
            samples.iter().any(|s| s.path.file_stem().unwrap() == name),
            "sample {name} missing"
        );
    }
}

#[test]
fn the_lua_sandbox_is_argo_cds() {
    // Argo CD opens only the base, table and package libraries: a script calling string.*
    // works in plain Lua but fails there, and must fail here too.
    let tmp = tempfile::tempdir().unwrap();
    let script = tmp.path().join("s.lua");
    std::fs::write(
        &script,
        "return { status = \"Healthy\", message = string.format(\"%d\", 1) }",
    )
    .unwrap();
    let sample = repo_root().join("tests/health/gi-ready.yaml");
    let err = health(&[Path::new("argocd"), &script, &sample]).unwrap_err();
    assert!(err.contains("string"), "{err}");
    // An unknown health status is refused, as Argo CD does.
    std::fs::write(&script, "return { status = \"Fine\" }").unwrap();
    let err = health(&[Path::new("argocd"), &script, &sample]).unwrap_err();
    assert!(err.contains("Fine"), "{err}");
    // And the shipped scripts use nothing outside the sandbox (covered above) and exist for
    // both kinds under the key Argo CD looks up.
    for kind in KINDS {
        lua_script(kind, tmp.path());
    }
}

/// One recorded sample: the file stem, what it shows, what both tools must say.
struct Recorded {
    stem: &'static str,
    what: &'static str,
    argocd: &'static str,
    kstatus: &'static str,
    object: serde_json::Value,
}

/// What the health checks read of an object: generation, observedGeneration, deletion, and
/// each condition's type, status and reason. A recorded sample must keep it exactly.
fn skeleton(obj: &serde_json::Value) -> String {
    let mut conditions: Vec<String> = obj["status"]["conditions"]
        .as_array()
        .map(|cs| {
            cs.iter()
                .map(|c| format!("{}={}({})", c["type"], c["status"], c["reason"]))
                .collect()
        })
        .unwrap_or_default();
    conditions.sort();
    format!(
        "{} generation={} observed={} deleting={} status={} conditions=[{}]",
        obj["kind"],
        obj["metadata"]["generation"],
        obj["status"]["observedGeneration"],
        !obj["metadata"]["deletionTimestamp"].is_null(),
        !obj["status"].is_null(),
        conditions.join(" ")
    )
}

/// The live object as a stable sample: its kind, name, generation, deletion and finalizers,
/// and its status with the test's namespace, the fakes' addresses and every timestamp replaced.
fn normalise(obj: &serde_json::Value, replace: &[(String, String)]) -> serde_json::Value {
    let meta = &obj["metadata"];
    let mut out = serde_json::json!({
        "apiVersion": obj["apiVersion"],
        "kind": obj["kind"],
        "metadata": {"name": meta["name"], "namespace": "images", "generation": meta["generation"]},
    });
    if !meta["deletionTimestamp"].is_null() {
        out["metadata"]["deletionTimestamp"] = meta["deletionTimestamp"].clone();
    }
    if !meta["finalizers"].is_null() {
        out["metadata"]["finalizers"] = meta["finalizers"].clone();
    }
    if !obj["status"].is_null() {
        out["status"] = obj["status"].clone();
    }
    let mut text = serde_json::to_string(&out).unwrap();
    for (from, to) in replace {
        text = text.replace(from.as_str(), to);
    }
    let time = regex::Regex::new(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?Z").unwrap();
    let text = time.replace_all(&text, "2026-01-01T03:00:00Z");
    serde_json::from_str(&text).unwrap()
}

fn sample_text(r: &Recorded, replace: &[(String, String)]) -> String {
    format!(
        "# {}\n# Recorded from the controller by tests/integration/health.rs (`make health-samples`); do not edit.\n# argocd: {}\n# kstatus: {}\n{}",
        r.what,
        r.argocd,
        r.kstatus,
        serde_yaml::to_string(&normalise(&r.object, replace)).unwrap()
    )
}

async fn get_json(client: &kube::Client, kind: &str, ns: &str, name: &str) -> serde_json::Value {
    use kube::api::Api;
    use sombrero::api::{GoldenImage, TemplateRetention};
    let value = match kind {
        "GoldenImage" => serde_json::to_value(
            Api::<GoldenImage>::namespaced(client.clone(), ns)
                .get(name)
                .await
                .unwrap(),
        ),
        _ => serde_json::to_value(
            Api::<TemplateRetention>::namespaced(client.clone(), ns)
                .get(name)
                .await
                .unwrap(),
        ),
    };
    value.unwrap()
}

/// Polls the object until `check` holds; panics with the last object.
async fn wait_json(
    client: &kube::Client,
    kind: &str,
    ns: &str,
    name: &str,
    what: &str,
    check: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(300);
    loop {
        let obj = get_json(client, kind, ns, name).await;
        if check(&obj) {
            return obj;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{kind} {name}: never {what}; last: {:#}",
            obj["status"]
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

fn cond(obj: &serde_json::Value, type_: &str) -> Option<(String, String)> {
    obj["status"]["conditions"]
        .as_array()?
        .iter()
        .find_map(|c| {
            (c["type"] == type_).then(|| {
                (
                    c["status"].as_str().unwrap_or_default().to_string(),
                    c["reason"].as_str().unwrap_or_default().to_string(),
                )
            })
        })
}

fn observed(obj: &serde_json::Value) -> bool {
    !obj["status"]["observedGeneration"].is_null()
        && obj["status"]["observedGeneration"] == obj["metadata"]["generation"]
}

/// The samples in tests/health/ are objects the controller wrote: a real run (the controller as
/// the chart's ServiceAccount, the real API server, three fake Proxmox clusters: healthy, one
/// whose guests fail validation, one unreachable) brings GoldenImages and TemplateRetentions into
/// each state, and each sample must hold what the live object holds (generation, deletion,
/// condition types, statuses and reasons). `SOMBRERO_RECORD_HEALTH=1` (`make health-samples`)
/// rewrites the samples from the run instead.
#[tokio::test]
async fn the_samples_are_what_the_controller_writes() {
    use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
    use sombrero::api::{GoldenImage, TemplateRetention};
    use support::controller::{controller_client, create_image_with, options, put_secret, start};
    use support::fakepve::{Failure, FakePve, GuestSettings};

    let cp = support::kube::control_plane();
    cp.install_crds();
    let admin = cp.client().await;
    let ns = cp.namespace(&admin, "health").await;
    let (rbac, sa) = controller_client(cp, &ns).await;
    let pve = FakePve::start().await;
    let vfail = FakePve::start().await;
    let down = FakePve::start().await;
    // cloud-init ends `degraded` in every guest: the build accepts it, the validation does not.
    vfail
        .set_guest(
            None,
            GuestSettings {
                cloud_init: Some("degraded".into()),
                ..Default::default()
            },
        )
        .await;
    down.fail(Failure::status(
        "GET",
        "/cluster/resources",
        503,
        "service unavailable",
    ))
    .await;
    put_secret(&admin, &ns, "pve", &pve, &pve.token_secret).await;
    put_secret(&admin, &ns, "vfail", &vfail, &vfail.token_secret).await;
    put_secret(&admin, &ns, "down", &down, &down.token_secret).await;
    put_secret(
        &admin,
        &ns,
        "bad-token",
        &pve,
        "00000000-0000-0000-0000-000000000000",
    )
    .await;
    let none = serde_json::json!({});
    create_image_with(
        &admin,
        &ns,
        "ubuntu-24.04-minimal",
        &pve,
        "pve",
        none.clone(),
    )
    .await;
    create_image_with(
        &admin,
        &ns,
        "debian-12-minimal",
        &vfail,
        "vfail",
        none.clone(),
    )
    .await;
    create_image_with(
        &admin,
        &ns,
        "ubuntu-22.04-minimal",
        &pve,
        "bad-token",
        none.clone(),
    )
    .await;
    create_image_with(&admin, &ns, "rocky-9-minimal", &down, "down", none).await;
    let retention = |name: &str, target: &str| -> TemplateRetention {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "images.sombrero.dev/v1alpha1", "kind": "TemplateRetention",
            "metadata": {"name": name},
            "spec": {"target": {"goldenImageRef": {"name": target}}, "keepLast": 3,
                     "archive": {"mode": "tag"}},
        }))
        .unwrap()
    };
    let trs = Api::<TemplateRetention>::namespaced(admin.clone(), &ns);
    for (name, target) in [
        ("ubuntu-24.04-minimal", "ubuntu-24.04-minimal"),
        ("rocky-9-minimal", "rocky-9-minimal"),
        ("centos-7-minimal", "centos-7-minimal"),
    ] {
        trs.create(&PostParams::default(), &retention(name, target))
            .await
            .unwrap();
    }
    let gi = "GoldenImage";
    let tr = "TemplateRetention";
    let mut recorded = vec![Recorded {
        stem: "gi-new",
        what: "Just created: the controller has not written a status yet. kstatus calls an object without conditions Current (its rule 6), which is why the controller sets Reconciling at once.",
        argocd: "Progressing",
        kstatus: "Current",
        object: get_json(&admin, gi, &ns, "ubuntu-24.04-minimal").await,
    }];

    let ctl = start(&sa, options(&rbac, "health", false));
    let building = |o: &serde_json::Value| {
        observed(o) && cond(o, "Reconciling").is_some_and(|c| c.0 == "True" && c.1 == "Building")
    };
    recorded.push(Recorded {
        stem: "gi-in-progress",
        what: "A build in flight (Reconciling=True).",
        argocd: "Progressing",
        kstatus: "InProgress",
        object: wait_json(
            &admin,
            gi,
            &ns,
            "ubuntu-24.04-minimal",
            "building",
            building,
        )
        .await,
    });
    let stalled =
        |o: &serde_json::Value| observed(o) && cond(o, "Stalled").is_some_and(|c| c.0 == "True");
    recorded.push(Recorded {
        stem: "gi-stalled",
        what: "Proxmox refused the token: a person must fix the Secret (Stalled=True).",
        argocd: "Degraded",
        kstatus: "Failed",
        object: wait_json(&admin, gi, &ns, "ubuntu-22.04-minimal", "Stalled", stalled).await,
    });
    recorded.push(Recorded {
        stem: "gi-proxmox-unreachable",
        what: "Proxmox unreachable: a transient error, retried (Reconciling=True, not Stalled).",
        argocd: "Progressing",
        kstatus: "InProgress",
        object: wait_json(
            &admin,
            gi,
            &ns,
            "rocky-9-minimal",
            "ProxmoxUnreachable",
            |o| {
                observed(o)
                    && cond(o, "Reconciling")
                        .is_some_and(|c| c.0 == "True" && c.1 == "ProxmoxUnreachable")
            },
        )
        .await,
    });
    recorded.push(Recorded {
        stem: "gi-failed-validation",
        what: "The first template failed validation: it is not promoted, and the controller does not retry the same build (Stalled=True).",
        argocd: "Degraded",
        kstatus: "Failed",
        object: wait_json(&admin, gi, &ns, "debian-12-minimal", "Stalled", stalled).await,
    });
    // Ready and settled: right after the promotion a reconcile may still show the finished
    // build as Reconciling for a moment.
    let ready = |o: &serde_json::Value| {
        observed(o)
            && cond(o, "Ready").is_some_and(|c| c.0 == "True")
            && cond(o, "Reconciling").is_none()
    };
    recorded.push(Recorded {
        stem: "gi-ready",
        what: "A template was built, validated and promoted (Ready=True).",
        argocd: "Healthy",
        kstatus: "Current",
        object: wait_json(&admin, gi, &ns, "ubuntu-24.04-minimal", "Ready", ready).await,
    });
    recorded.push(Recorded {
        stem: "tr-ready",
        what: "Retention planned and nothing to do (Ready=True).",
        argocd: "Healthy",
        kstatus: "Current",
        object: wait_json(&admin, tr, &ns, "ubuntu-24.04-minimal", "Ready", ready).await,
    });
    recorded.push(Recorded {
        stem: "tr-in-progress",
        what: "Retention retried: the image's Proxmox is unreachable (Reconciling=True).",
        argocd: "Progressing",
        kstatus: "InProgress",
        object: wait_json(&admin, tr, &ns, "rocky-9-minimal", "Reconciling", |o| {
            observed(o) && cond(o, "Reconciling").is_some_and(|c| c.0 == "True")
        })
        .await,
    });
    recorded.push(Recorded {
        stem: "tr-stalled",
        what: "The retention targets a GoldenImage that does not exist (Stalled=True).",
        argocd: "Degraded",
        kstatus: "Failed",
        object: wait_json(&admin, tr, &ns, "centos-7-minimal", "Stalled", stalled).await,
    });
    // Deleting: the finalizer holds the object while the controller cleans up (here it cannot:
    // its Proxmox is unreachable).
    let gis = Api::<GoldenImage>::namespaced(admin.clone(), &ns);
    let deleting = gis
        .delete("rocky-9-minimal", &DeleteParams::default())
        .await
        .unwrap()
        .left()
        .expect("the finalizer holds the GoldenImage");
    recorded.push(Recorded {
        stem: "gi-deleting",
        what: "Being deleted (the finalizer is still on it).",
        argocd: "Progressing",
        kstatus: "Terminating",
        object: serde_json::to_value(deleting).unwrap(),
    });
    // A spec change the (stopped) controller has not seen: the Ready=True is stale.
    ctl.abort();
    let _ = ctl.await;
    let changed = gis
        .patch(
            "ubuntu-24.04-minimal",
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"spec": {"hardware": {"cores": 4}}})),
        )
        .await
        .unwrap();
    recorded.push(Recorded {
        stem: "gi-generation-not-observed",
        what: "The spec changed and the controller has not seen it yet: the Ready=True is stale.",
        argocd: "Progressing",
        kstatus: "InProgress",
        object: serde_json::to_value(changed).unwrap(),
    });
    rbac.assert_nothing_denied();

    let replace: Vec<(String, String)> = [
        (ns.clone(), "images".to_string()),
        (pve.url.clone(), "https://pve1.example.com:8006".to_string()),
        (
            vfail.url.clone(),
            "https://pve2.example.com:8006".to_string(),
        ),
        (
            down.url.clone(),
            "https://pve3.example.com:8006".to_string(),
        ),
        (pve.host.clone(), "pve1.example.com".to_string()),
        (vfail.host.clone(), "pve2.example.com".to_string()),
        (down.host.clone(), "pve3.example.com".to_string()),
    ]
    .into_iter()
    .collect();
    let dir = repo_root().join("tests/health");
    let record = std::env::var_os("SOMBRERO_RECORD_HEALTH").is_some_and(|v| v == "1");
    let mut stale = Vec::new();
    for r in &recorded {
        let path = dir.join(format!("{}.yaml", r.stem));
        if record {
            std::fs::write(&path, sample_text(r, &replace)).unwrap();
            continue;
        }
        let on_disk = std::fs::read_to_string(&path).unwrap_or_default();
        let on_disk: serde_json::Value = serde_yaml::from_str(&on_disk).unwrap_or_default();
        let live = normalise(&r.object, &replace);
        if skeleton(&on_disk) != skeleton(&live) {
            stale.push(format!(
                "{}:\n  sample: {}\n  live:   {}",
                path.display(),
                skeleton(&on_disk),
                skeleton(&live)
            ));
        }
    }
    // Every sample is one the run records (no hand-written ones).
    let stems: Vec<&str> = recorded.iter().map(|r| r.stem).collect();
    for s in samples() {
        let stem = s.path.file_stem().unwrap().to_string_lossy().into_owned();
        if stems.contains(&stem.as_str()) {
            continue;
        }
        if record {
            std::fs::remove_file(&s.path).unwrap();
        } else {
            stale.push(format!("{}: not recorded by this test", s.path.display()));
        }
    }
    assert!(
        stale.is_empty(),
        "tests/health/ differs from what the controller writes; regenerate with `make health-samples`:\n{}",
        stale.join("\n")
    );
}
