//! The CRDs against a real kube-apiserver: accepted, Established, examples apply, malformed
//! objects are refused naming the field, printer columns show status.

use crate::support;

use std::path::{Path, PathBuf};

use kube::api::{Api, Patch, PatchParams};
use serde_json::json;
use sombrero::api::{GoldenImage, TemplateRetention};
use support::kube::{control_plane, repo_root};

fn yaml_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap_or_else(|e| panic!("read {}: {e}", dir.display())) {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(yaml_files(&path));
        } else if path.extension().is_some_and(|e| e == "yaml" || e == "yml") {
            out.push(path);
        }
    }
    out.sort();
    out
}

fn kubectl_apply(ns: &str, file: &Path) -> std::process::Output {
    control_plane()
        .kubectl()
        .args([
            "apply",
            "--server-side",
            "--field-manager=sombrero-tests",
            "-n",
            ns,
            "-f",
        ])
        .arg(file)
        .output()
        .expect("run kubectl")
}

#[tokio::test]
async fn crds_are_established_with_names_and_subresources() {
    let cp = control_plane();
    cp.install_crds();
    let client = cp.client().await;
    let crds: Api<k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition> =
        Api::all(client);
    for (name, short) in [
        ("goldenimages.images.sombrero.dev", "gi"),
        ("templateretentions.images.sombrero.dev", "tr"),
    ] {
        let crd = crds.get(name).await.unwrap();
        let status = crd.status.expect("CRD status");
        let conds = status.conditions.unwrap_or_default();
        for t in ["Established", "NamesAccepted"] {
            assert!(
                conds.iter().any(|c| c.type_ == t && c.status == "True"),
                "{name}: condition {t} not True: {conds:?}"
            );
        }
        let names = status.accepted_names.expect("accepted names");
        assert_eq!(
            names.short_names.unwrap_or_default(),
            vec![short.to_string()]
        );
        assert_eq!(
            names.categories.unwrap_or_default(),
            vec!["sombrero".to_string()]
        );
        assert!(
            crd.spec.versions[0]
                .subresources
                .as_ref()
                .and_then(|s| s.status.as_ref())
                .is_some()
        );
    }
}

#[tokio::test]
async fn every_example_is_accepted_by_server_side_apply() {
    let cp = control_plane();
    cp.install_crds();
    let client = cp.client().await;
    let ns = cp.namespace(&client, "examples").await;
    // examples/gitops/ holds Argo CD and Flux objects (no CRDs here): tests/integration/gitops.rs checks them.
    let gitops = repo_root().join("examples/gitops");
    let files: Vec<PathBuf> = yaml_files(&repo_root().join("examples"))
        .into_iter()
        .filter(|f| !f.starts_with(&gitops))
        .collect();
    assert!(files.len() >= 4, "expected the examples, found {files:?}");
    for file in files {
        let out = kubectl_apply(&ns, &file);
        assert!(
            out.status.success(),
            "{} refused:\n{}",
            file.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // Defaults from the schema are applied by the server.
    let gi: Api<GoldenImage> = Api::namespaced(client, &ns);
    let debian = gi.get("debian-12-minimal").await.unwrap();
    assert_eq!(debian.spec.hardware.cores, 2);
    assert_eq!(debian.spec.placement.import_storage, "local");
    assert!(debian.spec.validation.enabled);
}

#[tokio::test]
async fn malformed_objects_are_refused_naming_the_field() {
    let cp = control_plane();
    cp.install_crds();
    let client = cp.client().await;
    let ns = cp.namespace(&client, "malformed").await;
    let files = yaml_files(&repo_root().join("tests/malformed"));
    assert!(
        files.len() >= 15,
        "expected at least 15 malformed examples, found {}",
        files.len()
    );
    let mut failures = Vec::new();
    for file in &files {
        let text = std::fs::read_to_string(file).unwrap();
        let expect = |key: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(&format!("# {key}: ")))
                .unwrap_or_else(|| panic!("{}: missing `# {key}:` header", file.display()))
                .to_string()
        };
        let (field, message) = (expect("expect-field"), expect("expect-message"));
        let out = kubectl_apply(&ns, file);
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        if out.status.success() {
            failures.push(format!(
                "{}: ACCEPTED, expected a refusal naming {field}",
                file.display()
            ));
        } else if !stderr.contains(&field) || !stderr.contains(&message) {
            failures.push(format!(
                "{}: refused, but the message does not name `{field}` with `{message}`:\n{stderr}",
                file.display()
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

#[tokio::test]
async fn kubectl_get_shows_the_printer_columns() {
    let cp = control_plane();
    cp.install_crds();
    let client = cp.client().await;
    let ns = cp.namespace(&client, "columns").await;
    let out = kubectl_apply(&ns, &repo_root().join("examples/ubuntu-24.04-minimal.yaml"));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = kubectl_apply(&ns, &repo_root().join("examples/retention.yaml"));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let now = "2025-01-18T10:00:00Z";
    let gi: Api<GoldenImage> = Api::namespaced(client.clone(), &ns);
    let status = json!({
        "apiVersion": "images.sombrero.dev/v1alpha1", "kind": "GoldenImage",
        "status": {
            "observedGeneration": 1,
            "conditions": [
                {"type": "Ready", "status": "True", "reason": "Promoted", "message": "template 8024 is latest", "lastTransitionTime": now},
                {"type": "Validated", "status": "True", "reason": "ChecksPassed", "message": "5/5 checks passed", "lastTransitionTime": now}
            ],
            "latest": {"vmid": 8024, "name": "ubuntu-24.04-minimal-20250118-001", "node": "pve1", "buildDate": "2025-01-18", "buildNumber": 1},
            "build": {"id": "b-20250118100000000", "stage": "Provision"}
        }
    });
    gi.patch_status(
        "ubuntu-24.04-minimal",
        &PatchParams::apply("sombrero-tests"),
        &Patch::Apply(status),
    )
    .await
    .expect("status subresource accepts the status");
    let tr: Api<TemplateRetention> = Api::namespaced(client, &ns);
    let status = json!({
        "apiVersion": "images.sombrero.dev/v1alpha1", "kind": "TemplateRetention",
        "status": {"targetDescription": "goldenimage/ubuntu-24.04-minimal",
                   "conditions": [{"type": "Ready", "status": "True", "reason": "PlanApplied", "message": "ok", "lastTransitionTime": now}]}
    });
    tr.patch_status(
        "ubuntu-24.04-minimal",
        &PatchParams::apply("sombrero-tests"),
        &Patch::Apply(status),
    )
    .await
    .expect("status subresource accepts the status");

    let get = |what: &str| {
        let out = cp
            .kubectl()
            .args(["get", what, "-n", &ns])
            .output()
            .expect("run kubectl");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let table = get("gi");
    let mut lines = table.lines();
    let header: Vec<&str> = lines.next().unwrap().split_whitespace().collect();
    assert_eq!(
        header,
        [
            "NAME",
            "OS",
            "LATEST",
            "VMID",
            "READY",
            "VALIDATED",
            "REASON",
            "STAGE",
            "AGE"
        ],
        "{table}"
    );
    let row: Vec<&str> = lines.next().unwrap().split_whitespace().collect();
    assert_eq!(
        &row[..8],
        [
            "ubuntu-24.04-minimal",
            "ubuntu-24.04",
            "ubuntu-24.04-minimal-20250118-001",
            "8024",
            "True",
            "True",
            "Promoted",
            "Provision"
        ],
        "{table}"
    );

    let table = get("tr");
    let header = table.lines().next().unwrap();
    assert_eq!(
        header
            .split("  ")
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .collect::<Vec<_>>(),
        ["NAME", "TARGET", "KEEP", "ARCHIVE AFTER", "READY", "AGE"],
        "{table}"
    );
    let row: Vec<&str> = table.lines().nth(1).unwrap().split_whitespace().collect();
    assert_eq!(
        &row[..5],
        [
            "ubuntu-24.04-minimal",
            "goldenimage/ubuntu-24.04-minimal",
            "3",
            "90d",
            "True"
        ],
        "{table}"
    );
}
