//! Health of GoldenImage and TemplateRetention as the GitOps tools see it: the Argo CD Lua
//! scripts shipped in examples/gitops/argocd/argocd-cm.yaml, run by gopher-lua (Argo CD's
//! interpreter, with Argo CD's library sandbox), and Flux's kstatus `status.Compute`, both via
//! the Go-built `sombrero-health` (scripts/test-tools.sh), on the samples in tests/health/.
//! Each sample names what both tools must say in its `# argocd:` and `# kstatus:` headers.

mod support;

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
