//! The GitOps examples (examples/gitops/): the Argo CD and Flux objects are well-formed, point
//! at files and objects that exist, and the chart values they carry pass the chart's schema
//! (rendered by the real `helm`). tests/integration/kube_api.rs applies the other examples; these kinds
//! have no CRDs in the test API server.

use crate::support;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde::Deserialize;
use serde_yaml::Value;
use support::kube::{repo_root, tool};

fn gitops() -> PathBuf {
    repo_root().join("examples/gitops")
}

fn docs(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_yaml::Deserializer::from_str(&text)
        .map(|d| Value::deserialize(d).unwrap_or_else(|e| panic!("{}: {e}", path.display())))
        .filter(|v| !v.is_null())
        .collect()
}

fn all_docs() -> Vec<(PathBuf, Value)> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                walk(&p, out);
            } else if p.extension().is_some_and(|e| e == "yaml") {
                out.push(p);
            }
        }
    }
    let mut files = Vec::new();
    walk(&gitops(), &mut files);
    files.sort();
    files
        .into_iter()
        .flat_map(|f| docs(&f).into_iter().map(move |d| (f.clone(), d)))
        .collect()
}

fn of_kind<'a>(docs: &'a [(PathBuf, Value)], api: &str, kind: &str) -> Vec<&'a Value> {
    docs.iter()
        .filter(|(_, d)| d["apiVersion"].as_str() == Some(api) && d["kind"].as_str() == Some(kind))
        .map(|(_, d)| d)
        .collect()
}

/// `helm template` of the chart with `values` (YAML) as a values file: the schema must accept it.
fn render_with_values(values: &Value, what: &str) -> String {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("values.yaml");
    std::fs::write(&file, serde_yaml::to_string(values).unwrap()).unwrap();
    let out = Command::new(tool("helm"))
        .args(["template", "sombrero"])
        .arg(repo_root().join("charts/sombrero"))
        .arg("-f")
        .arg(&file)
        .output()
        .expect("run helm");
    assert!(
        out.status.success(),
        "{what}: the chart refuses these values:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// The GoldenImages/TemplateRetentions of examples/, by (kind, name).
fn example_objects() -> BTreeSet<(String, String)> {
    let mut out = BTreeSet::new();
    for e in std::fs::read_dir(repo_root().join("examples")).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|e| e == "yaml") {
            for d in docs(&p) {
                if d["apiVersion"].as_str() == Some("images.sombrero.dev/v1alpha1") {
                    out.insert((
                        d["kind"].as_str().unwrap().to_string(),
                        d["metadata"]["name"].as_str().unwrap().to_string(),
                    ));
                }
            }
        }
    }
    out
}

#[test]
fn every_gitops_manifest_has_a_known_kind() {
    let known = [
        ("argoproj.io/v1alpha1", "Application"),
        ("v1", "ConfigMap"),
        ("v1", "Namespace"),
        ("source.toolkit.fluxcd.io/v1", "GitRepository"),
        ("helm.toolkit.fluxcd.io/v2", "HelmRelease"),
        ("kustomize.toolkit.fluxcd.io/v1", "Kustomization"),
        ("kustomize.config.k8s.io/v1beta1", "Kustomization"),
    ];
    let all = all_docs();
    assert!(
        all.len() >= 8,
        "expected the GitOps examples, found {}",
        all.len()
    );
    for (file, d) in &all {
        let key = (
            d["apiVersion"].as_str().unwrap_or_default(),
            d["kind"].as_str().unwrap_or_default(),
        );
        assert!(
            known.contains(&key),
            "{}: unexpected {key:?}",
            file.display()
        );
        if key.0 != "kustomize.config.k8s.io/v1beta1" {
            assert!(
                d["metadata"]["name"].as_str().is_some(),
                "{}: {key:?} without a name",
                file.display()
            );
        }
    }
}

#[test]
fn argo_cd_applications_point_at_the_chart_and_the_examples() {
    let all = all_docs();
    let apps = of_kind(&all, "argoproj.io/v1alpha1", "Application");
    assert_eq!(apps.len(), 2);
    let controller = apps
        .iter()
        .find(|a| a["spec"]["source"]["path"].as_str() == Some("charts/sombrero"))
        .expect("an Application for charts/sombrero");
    let rendered = render_with_values(
        &controller["spec"]["source"]["helm"]["valuesObject"],
        "Argo CD valuesObject",
    );
    assert!(rendered.contains("--leader-election=true"));
    assert!(rendered.contains("--proxmox-secret=proxmox-credentials"));
    assert!(rendered.contains("kind: NetworkPolicy"));

    let images = apps
        .iter()
        .find(|a| a["spec"]["source"]["path"].as_str() == Some("examples"))
        .expect("an Application for the examples");
    let include = images["spec"]["source"]["directory"]["include"]
        .as_str()
        .expect("directory.include");
    let files: Vec<&str> = include
        .trim_matches(|c| c == '{' || c == '}')
        .split(',')
        .collect();
    let examples = example_objects();
    for f in &files {
        let path = repo_root().join("examples").join(f);
        assert!(path.is_file(), "include names {f}, which does not exist");
        for d in docs(&path) {
            assert_ne!(
                d["kind"].as_str(),
                Some("Secret"),
                "{f}: never sync a Secret from Git"
            );
        }
    }
    assert!(
        examples
            .iter()
            .all(|(_, name)| files.iter().any(|f| f.contains(name.as_str())))
    );
    // The health checks exist for both kinds (tests/integration/health.rs runs them).
    let cm = of_kind(&all, "v1", "ConfigMap")[0];
    for kind in ["GoldenImage", "TemplateRetention"] {
        let key = format!("resource.customizations.health.images.sombrero.dev_{kind}");
        assert!(
            cm["data"][key.as_str()].as_str().is_some(),
            "argocd-cm lacks {key}"
        );
    }
}

#[test]
fn flux_objects_reference_each_other_and_the_examples() {
    let all = all_docs();
    let repos = of_kind(&all, "source.toolkit.fluxcd.io/v1", "GitRepository");
    let repo_names: BTreeSet<&str> = repos
        .iter()
        .map(|r| r["metadata"]["name"].as_str().unwrap())
        .collect();

    let releases = of_kind(&all, "helm.toolkit.fluxcd.io/v2", "HelmRelease");
    assert_eq!(releases.len(), 1);
    let hr = releases[0];
    assert_eq!(
        hr["spec"]["chart"]["spec"]["chart"].as_str(),
        Some("charts/sombrero")
    );
    assert!(
        repo_names.contains(
            hr["spec"]["chart"]["spec"]["sourceRef"]["name"]
                .as_str()
                .unwrap()
        )
    );
    assert_eq!(
        hr["spec"]["upgrade"]["crds"].as_str(),
        Some("CreateReplace")
    );
    render_with_values(&hr["spec"]["values"], "Flux HelmRelease values");

    let ks = of_kind(&all, "kustomize.toolkit.fluxcd.io/v1", "Kustomization");
    assert_eq!(ks.len(), 2);
    let names: BTreeSet<&str> = ks
        .iter()
        .map(|k| k["metadata"]["name"].as_str().unwrap())
        .collect();
    let examples = example_objects();
    let mut checked = 0;
    for k in &ks {
        assert!(repo_names.contains(k["spec"]["sourceRef"]["name"].as_str().unwrap()));
        // Paths are relative to the repository root and must exist.
        let path = k["spec"]["path"].as_str().unwrap();
        assert!(
            repo_root().join(path).is_dir(),
            "Kustomization path {path} does not exist"
        );
        for dep in k["spec"]["dependsOn"].as_sequence().into_iter().flatten() {
            assert!(
                names.contains(dep["name"].as_str().unwrap()),
                "dependsOn {dep:?}"
            );
        }
        for hc in k["spec"]["healthChecks"]
            .as_sequence()
            .into_iter()
            .flatten()
        {
            let key = (
                hc["kind"].as_str().unwrap().to_string(),
                hc["name"].as_str().unwrap().to_string(),
            );
            assert_eq!(
                hc["apiVersion"].as_str(),
                Some("images.sombrero.dev/v1alpha1")
            );
            assert!(examples.contains(&key), "health check for unknown {key:?}");
            assert_eq!(hc["namespace"], k["spec"]["targetNamespace"]);
            checked += 1;
        }
    }
    assert_eq!(
        checked,
        examples.len(),
        "every example object is health-checked"
    );

    // The images kustomization lists exactly the example objects' files, and they exist.
    let kfile = gitops().join("flux/images/kustomization.yaml");
    let kust = &docs(&kfile)[0];
    let mut found = BTreeSet::new();
    for r in kust["resources"].as_sequence().unwrap() {
        let p = kfile.parent().unwrap().join(r.as_str().unwrap());
        assert!(
            p.is_file(),
            "{} lists {r:?}, which does not exist",
            kfile.display()
        );
        for d in docs(&p) {
            found.insert((
                d["kind"].as_str().unwrap().to_string(),
                d["metadata"]["name"].as_str().unwrap().to_string(),
            ));
        }
    }
    assert_eq!(found, examples);
}
