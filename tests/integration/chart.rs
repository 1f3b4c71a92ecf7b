//! The Helm chart (charts/sombrero) with the real `helm` and the real kube-apiserver: lint, the
//! values schema refuses typos and wrong types, the rendered manifests are accepted by the API
//! server, `helm install` creates the objects, CRDs stay in sync with `sombrero crd` (plain and
//! templated with the keep policy), the Deployment is hardened, and the RBAC grants exactly the
//! verbs the controller uses.

use crate::support;

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::authorization::v1::{
    ResourceAttributes, SelfSubjectAccessReview, SelfSubjectAccessReviewSpec,
};
use k8s_openapi::api::core::v1::{Secret, Service, ServiceAccount};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, ListParams, PostParams};
use serde::Deserialize;
use serde_yaml::Value;
use sombrero::api::GoldenImage;
use support::controller::{create_image_with, is_ready, options, put_secret, start, wait_for};
use support::fakepve::FakePve;
use support::kube::{ControlPlane, control_plane, repo_root, tool};
use support::rbac::{
    ChartRbac, helm_template, install_chart_rbac, install_chart_rbac_with, kubectl_apply,
};

const CRD_NAMES: [&str; 2] = [
    "goldenimages.images.sombrero.dev",
    "templateretentions.images.sombrero.dev",
];

fn chart_dir() -> std::path::PathBuf {
    repo_root().join("charts/sombrero")
}

fn helm(cp: Option<&ControlPlane>, args: &[&str]) -> Output {
    let mut cmd = Command::new(tool("helm"));
    if let Some(cp) = cp {
        cmd.arg("--kubeconfig").arg(&cp.kubeconfig);
    }
    // Keep helm's caches and config out of $HOME.
    let home = std::env::temp_dir().join("sombrero-helm-home");
    cmd.env("HELM_CACHE_HOME", home.join("cache"))
        .env("HELM_CONFIG_HOME", home.join("config"))
        .env("HELM_DATA_HOME", home.join("data"));
    cmd.args(args).output().expect("run helm")
}

fn ok(out: &Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "{what} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn docs(yaml: &str) -> Vec<Value> {
    serde_yaml::Deserializer::from_str(yaml)
        .map(|d| Value::deserialize(d).expect("helm output is YAML"))
        .filter(|v| !v.is_null())
        .collect()
}

fn find<'a>(docs: &'a [Value], kind: &str) -> Vec<&'a Value> {
    docs.iter()
        .filter(|d| d["kind"].as_str() == Some(kind))
        .collect()
}

fn read_dir_yaml(dir: &Path) -> Vec<(String, String)> {
    let mut files: Vec<(String, String)> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("read {}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .map(|p| {
            (
                p.file_name().unwrap().to_string_lossy().into_owned(),
                std::fs::read_to_string(&p).unwrap(),
            )
        })
        .collect();
    files.sort();
    files
}

/// Every option switched on, with non-default values, except the ServiceMonitor (its CRD is
/// not in the test API server).
const ALL_OPTIONS: &[&str] = &[
    "--skip-crds",
    "--set",
    "crds.enabled=true",
    "--set",
    "replicaCount=2",
    "--set",
    "image.digest=sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
    "--set",
    "imagePullSecrets[0].name=registry",
    "--set",
    "proxmox.defaultSecret=proxmox-credentials",
    "--set",
    "controller.logLevel=sombrero=debug\\,kube=info",
    "--set",
    "controller.logFormat=text",
    "--set-json",
    "controller.extraArgs=[\"--poll-seconds=5\"]",
    "--set-json",
    "controller.extraEnv=[{\"name\":\"RUST_BACKTRACE\",\"value\":\"1\"}]",
    "--set",
    "networkPolicy.enabled=true",
    "--set-json",
    "networkPolicy.apiServer.cidrs=[\"10.0.0.1/32\"]",
    "--set-json",
    "networkPolicy.proxmox.cidrs=[\"192.168.1.0/24\",\"fd00::/64\"]",
    "--set-json",
    "networkPolicy.metrics.from=[{\"namespaceSelector\":{\"matchLabels\":{\"kubernetes.io/metadata.name\":\"monitoring\"}}}]",
    "--set-json",
    "networkPolicy.extraEgress=[{\"ports\":[{\"port\":443,\"protocol\":\"TCP\"}]}]",
    "--set-json",
    "tolerations=[{\"key\":\"dedicated\",\"operator\":\"Equal\",\"value\":\"infra\",\"effect\":\"NoSchedule\"}]",
    "--set",
    "nodeSelector.kubernetes\\.io/os=linux",
    "--set",
    "podAnnotations.example\\.com/team=platform",
    "--set",
    "priorityClassName=system-cluster-critical",
];

#[test]
fn chart_crds_equal_sombrero_crd_output() {
    let out = tempfile::tempdir().unwrap();
    let status = Command::new(env!("CARGO_BIN_EXE_sombrero"))
        .args(["crd", "--out-dir"])
        .arg(out.path())
        .status()
        .expect("run sombrero crd");
    assert!(status.success(), "sombrero crd failed");
    let generated = read_dir_yaml(out.path());
    let chart = read_dir_yaml(&chart_dir().join("crds"));
    assert_eq!(generated.len(), 2, "sombrero crd wrote {generated:?}");
    let names = |v: &[(String, String)]| v.iter().map(|(n, _)| n.clone()).collect::<Vec<_>>();
    assert_eq!(
        names(&chart),
        names(&generated),
        "charts/sombrero/crds/ holds other files than `sombrero crd` writes; run `make crds`"
    );
    for ((name, want), (_, have)) in generated.iter().zip(&chart) {
        assert!(
            want == have,
            "charts/sombrero/crds/{name} differs from `sombrero crd` output; run `make crds`"
        );
    }
}

fn numbers_as_f64(v: &Value) -> Value {
    match v {
        Value::Number(n) => Value::from(n.as_f64().expect("a YAML number")),
        Value::Sequence(s) => Value::Sequence(s.iter().map(numbers_as_f64).collect()),
        Value::Mapping(m) => Value::Mapping(
            m.iter()
                .map(|(k, v)| (k.clone(), numbers_as_f64(v)))
                .collect(),
        ),
        other => other.clone(),
    }
}

#[test]
fn templated_crds_are_the_same_crds_with_the_keep_policy() {
    let plain = read_dir_yaml(&chart_dir().join("crds"));
    let rendered = docs(&helm_template(
        "t",
        "sombrero-system",
        &["--skip-crds", "--set", "crds.enabled=true"],
    ));
    let crds = find(&rendered, "CustomResourceDefinition");
    assert_eq!(crds.len(), 2);
    for (_, text) in plain {
        let want: Value = serde_yaml::from_str(&text).unwrap();
        let name = want["metadata"]["name"].as_str().unwrap();
        let have = crds
            .iter()
            .find(|c| c["metadata"]["name"].as_str() == Some(name))
            .unwrap_or_else(|| panic!("{name} not rendered"));
        // Helm's fromYaml/toYaml round trip writes `65535.0` as `65535`: compare numbers as f64.
        assert!(
            numbers_as_f64(&have["spec"]) == numbers_as_f64(&want["spec"]),
            "{name}: the templated CRD's spec differs from crds/{name}"
        );
        assert_eq!(
            have["metadata"]["annotations"]["helm.sh/resource-policy"].as_str(),
            Some("keep"),
            "{name}"
        );
    }
    // keep=false drops the annotation; the default renders no CRD template at all.
    let no_keep = docs(&helm_template(
        "t",
        "sombrero-system",
        &[
            "--skip-crds",
            "--set",
            "crds.enabled=true",
            "--set",
            "crds.keep=false",
        ],
    ));
    for crd in find(&no_keep, "CustomResourceDefinition") {
        assert!(crd["metadata"]["annotations"]["helm.sh/resource-policy"].is_null());
    }
    let default = docs(&helm_template("t", "sombrero-system", &["--skip-crds"]));
    assert!(find(&default, "CustomResourceDefinition").is_empty());
}

#[test]
fn helm_lint_passes_with_defaults_and_all_options() {
    let chart = chart_dir();
    let chart = chart.to_str().unwrap();
    ok(
        &helm(None, &["lint", "--strict", chart]),
        "helm lint --strict (defaults)",
    );
    let mut args = vec!["lint", "--strict", chart];
    args.extend(ALL_OPTIONS.iter().filter(|a| **a != "--skip-crds"));
    args.extend(["--set", "metrics.serviceMonitor.enabled=true"]);
    ok(&helm(None, &args), "helm lint --strict (all options)");
}

#[test]
fn values_schema_refuses_typos_and_wrong_types() {
    let chart = chart_dir();
    let chart = chart.to_str().unwrap();
    // (flag, value, what the error must name)
    let cases: &[(&str, &str, &str)] = &[
        ("--set", "replicaCont=2", "replicaCont"),
        ("--set", "controller.loglevel=debug", "loglevel"),
        ("--set", "image.registry=x", "registry"),
        ("--set", "networkPolicy.proxmox.port=8006", "port"),
        (
            "--set",
            "securityContext.readOnlyRootFileSystem=true",
            "readOnlyRootFileSystem",
        ),
        ("--set-json", "replicaCount=\"two\"", "/replicaCount"),
        ("--set", "crds.enabled=yes", "/crds/enabled"),
        ("--set", "controller.logFormat=xml", "/controller/logFormat"),
        ("--set", "image.pullPolicy=Sometimes", "/image/pullPolicy"),
        (
            "--set-json",
            "networkPolicy.proxmox.ports=[\"8006\"]",
            "/networkPolicy/proxmox/ports/0",
        ),
        (
            "--set",
            "proxmox.defaultSecret=Bad_Name",
            "/proxmox/defaultSecret",
        ),
        ("--set", "metrics.port=0", "/metrics/port"),
        // EnvFilter would take `verbose` as a target name and log nothing at all.
        (
            "--set",
            "controller.logLevel=verbose",
            "/controller/logLevel",
        ),
        (
            "--set",
            "controller.logLevel=sombrero=verbose",
            "/controller/logLevel",
        ),
        (
            "--set",
            "controller.logLevel=debug\\,",
            "/controller/logLevel",
        ),
        ("--set", "controller.logLevel=", "/controller/logLevel"),
        ("--set", "rbac.scope=global", "/rbac/scope"),
        (
            "--set-json",
            "controller.watchNamespaces=[\"Images\"]",
            "/controller/watchNamespaces/0",
        ),
    ];
    let mut failures = Vec::new();
    for (flag, value, names) in cases {
        let out = helm(None, &["template", "t", chart, flag, value]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        if out.status.success() {
            failures.push(format!("{flag} {value}: ACCEPTED"));
        } else if !stderr.contains("schema") || !stderr.contains(names) {
            failures.push(format!(
                "{flag} {value}: refused, but not by the schema naming {names}:\n{stderr}"
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn log_levels_the_controller_honours_pass_the_schema() {
    for level in [
        "info",
        "trace",
        "off",
        "sombrero=debug,kube=info",
        "warn,sombrero::controller=trace",
    ] {
        let arg = format!("controller.logLevel={}", level.replace(',', "\\,"));
        let args = deployment_args(&["--set", &arg]);
        assert!(args.contains(&format!("--log-level={level}")), "{args:?}");
    }
}

/// Every name the chart gives stays a 63-character DNS label, the suffixed ones included, with
/// the longest `fullnameOverride` the schema lets through; the API server takes them.
#[tokio::test]
async fn a_long_fullname_override_is_cut_to_63_characters() {
    let long = format!("platform-{}", "x".repeat(70));
    let set = format!("fullnameOverride={long}");
    let args = [
        "--set",
        set.as_str(),
        "--set",
        "networkPolicy.enabled=true",
        "--set",
        "proxmox.defaultSecret=pve",
    ];
    let rendered = docs(&helm_template("rel", "ops", &args));
    let mut names = Vec::new();
    for d in &rendered {
        let name = d["metadata"]["name"].as_str().unwrap().to_string();
        assert!(
            name.len() <= 63 && !name.ends_with('-'),
            "{} {name} ({} characters)",
            d["kind"].as_str().unwrap(),
            name.len()
        );
        names.push((d["kind"].as_str().unwrap().to_string(), name));
    }
    let service = names.iter().find(|(k, _)| k == "Service").unwrap();
    assert!(service.1.ends_with("-metrics"), "{service:?}");
    let deployment = names.iter().find(|(k, _)| k == "Deployment").unwrap();
    assert_eq!(deployment.1, long[..63]);
    // The release's names are still distinct per kind.
    let mut unique = names.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), names.len(), "{names:?}");

    let cp = control_plane();
    let client = cp.client().await;
    let ns = cp.namespace(&client, "chart-long").await;
    let manifests = helm_template("rel", &ns, &args);
    kubectl_apply(cp, &manifests, &["--dry-run=server"]);
}

#[test]
fn notes_say_what_was_installed_and_what_to_do_next() {
    // `helm template` does not render NOTES.txt; `helm install --dry-run` prints it (and asks
    // the API server for its version).
    let cp = control_plane();
    let notes = |extra: &[&str]| {
        let chart = chart_dir();
        let mut args = vec![
            "install",
            "rel",
            chart.to_str().unwrap(),
            "--namespace",
            "ops",
        ];
        args.push("--dry-run=client");
        args.extend_from_slice(extra);
        ok(&helm(Some(cp), &args), "helm install --dry-run=client")
    };
    let default = notes(&[]);
    for want in [
        "release \"rel\" in namespace \"ops\"",
        "ClusterRole rel-sombrero-controller",
        "kubectl -n ops rollout status deployment/rel-sombrero",
        "kubectl get goldenimages,templateretentions -A",
        "in every namespace",
        "spec.proxmox.secretRef",
    ] {
        assert!(default.contains(want), "NOTES lack {want:?}:\n{default}");
    }
    let namespaced = notes(&[
        "--set",
        "rbac.scope=namespaced",
        "--set-json",
        "controller.watchNamespaces=[\"images\",\"apps\"]",
        "--set",
        "proxmox.defaultSecret=pve",
    ]);
    for want in [
        "Roles in images, apps only",
        "in: images, apps",
        "the Secret \"pve\" in namespace ops",
    ] {
        assert!(
            namespaced.contains(want),
            "NOTES lack {want:?}:\n{namespaced}"
        );
    }
}

#[test]
fn deployment_is_hardened_and_runs_the_controller_flags() {
    let rendered = docs(&helm_template("rel", "ops", &[]));
    let dep: Deployment = serde_yaml::from_value(find(&rendered, "Deployment")[0].clone()).unwrap();
    let spec = dep.spec.unwrap();
    assert_eq!(spec.replicas, Some(1));
    let pod = spec.template.spec.unwrap();
    assert_eq!(pod.service_account_name.as_deref(), Some("rel-sombrero"));
    let psc = pod.security_context.unwrap();
    assert_eq!(psc.run_as_non_root, Some(true));
    assert_eq!(psc.run_as_user, Some(65532));
    assert_eq!(psc.seccomp_profile.unwrap().type_, "RuntimeDefault");
    let c = &pod.containers[0];
    let sc = c.security_context.clone().unwrap();
    assert_eq!(sc.allow_privilege_escalation, Some(false));
    assert_eq!(sc.read_only_root_filesystem, Some(true));
    assert_eq!(sc.privileged, Some(false));
    assert_eq!(sc.capabilities.unwrap().drop, Some(vec!["ALL".to_string()]));
    assert_eq!(
        c.image.as_deref(),
        Some("registry.example.com/platform/sombrero:0.1.0")
    );
    assert_eq!(
        c.args.clone().unwrap(),
        [
            "controller",
            "--metrics-addr=0.0.0.0:8080",
            "--log-level=info",
            "--log-format=json",
            "--leader-election=true",
            "--lease-name=sombrero-controller",
            "--max-concurrent-builds=4",
            "--max-builds-per-node=2",
        ]
    );
    let port = &c.ports.as_ref().unwrap()[0];
    assert_eq!(
        (port.name.as_deref(), port.container_port),
        (Some("metrics"), 8080)
    );
    for (probe, path) in [
        (&c.liveness_probe, "/healthz"),
        (&c.readiness_probe, "/readyz"),
    ] {
        let get = probe.clone().unwrap().http_get.unwrap();
        assert_eq!(get.path.as_deref(), Some(path));
        assert_eq!(
            get.port,
            k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::String("metrics".into())
        );
    }
    let res = c.resources.clone().unwrap();
    assert!(res.requests.unwrap().contains_key("memory"));
    assert!(res.limits.unwrap().contains_key("memory"));

    // More than one replica forces leader election on, whatever the value says.
    let rendered = docs(&helm_template(
        "rel",
        "ops",
        &[
            "--set",
            "replicaCount=3",
            "--set",
            "controller.leaderElection.enabled=false",
            "--set",
            "proxmox.defaultSecret=pve",
        ],
    ));
    let args =
        find(&rendered, "Deployment")[0]["spec"]["template"]["spec"]["containers"][0]["args"]
            .clone();
    let args: Vec<String> = serde_yaml::from_value(args).unwrap();
    assert!(
        args.contains(&"--leader-election=true".to_string()),
        "{args:?}"
    );
    assert!(
        args.contains(&"--proxmox-secret=pve".to_string()),
        "{args:?}"
    );
    let single = docs(&helm_template(
        "rel",
        "ops",
        &["--set", "controller.leaderElection.enabled=false"],
    ));
    let args: Vec<String> = serde_yaml::from_value(
        find(&single, "Deployment")[0]["spec"]["template"]["spec"]["containers"][0]["args"].clone(),
    )
    .unwrap();
    assert!(
        args.contains(&"--leader-election=false".to_string()),
        "{args:?}"
    );
}

/// The container args of the rendered Deployment.
fn deployment_args(extra: &[&str]) -> Vec<String> {
    let rendered = docs(&helm_template("rel", "ops", extra));
    serde_yaml::from_value(
        find(&rendered, "Deployment")[0]["spec"]["template"]["spec"]["containers"][0]["args"]
            .clone(),
    )
    .unwrap()
}

#[test]
fn the_sombrero_binary_accepts_the_charts_flags() {
    // clap checks every flag and value as it parses them, before `--help` prints and exits 0:
    // an unknown flag or a bad value in the chart's args fails here.
    for extra in [
        &[][..],
        &[
            "--set",
            "replicaCount=2",
            "--set",
            "controller.logFormat=text",
            "--set-json",
            "controller.watchNamespaces=[\"images\",\"apps\"]",
            "--set",
            "rbac.scope=namespaced",
            "--set",
            "proxmox.defaultSecret=pve",
        ][..],
    ] {
        let mut args = deployment_args(extra);
        args.push("--help".into());
        let out = Command::new(env!("CARGO_BIN_EXE_sombrero"))
            .args(&args)
            .env_remove("SOMBRERO_LOG_LEVEL")
            .output()
            .expect("run sombrero");
        ok(&out, &format!("sombrero {}", args.join(" ")));
    }
    // And a flag it does not know is refused (the check above can fail).
    let out = Command::new(env!("CARGO_BIN_EXE_sombrero"))
        .args(["controller", "--no-such-flag", "--help"])
        .output()
        .unwrap();
    assert!(!out.status.success());
}

#[test]
fn service_monitor_and_network_policy_render_as_documented() {
    let rendered = docs(&helm_template(
        "rel",
        "ops",
        &[
            "--set",
            "metrics.serviceMonitor.enabled=true",
            "--set",
            "metrics.service.enabled=false",
            "--set",
            "networkPolicy.enabled=true",
            "--set-json",
            "networkPolicy.proxmox.cidrs=[\"192.168.1.0/24\"]",
        ],
    ));
    let sm = find(&rendered, "ServiceMonitor");
    assert_eq!(sm.len(), 1);
    // A ServiceMonitor needs the Service even when the Service alone is switched off.
    let svc = find(&rendered, "Service")[0];
    let selector = &sm[0]["spec"]["selector"]["matchLabels"];
    for key in ["app.kubernetes.io/name", "app.kubernetes.io/instance"] {
        assert_eq!(selector[key], svc["metadata"]["labels"][key], "{key}");
    }
    assert_eq!(
        sm[0]["spec"]["endpoints"][0]["port"].as_str(),
        Some("metrics")
    );

    let np: NetworkPolicy =
        serde_yaml::from_value(find(&rendered, "NetworkPolicy")[0].clone()).unwrap();
    let spec = np.spec.unwrap();
    assert_eq!(spec.policy_types.unwrap(), ["Ingress", "Egress"]);
    let egress = spec.egress.unwrap();
    let ports_of = |r: &k8s_openapi::api::networking::v1::NetworkPolicyEgressRule| {
        r.ports
            .clone()
            .unwrap_or_default()
            .into_iter()
            .map(|p| match p.port {
                Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(n)) => n,
                other => panic!("unexpected port {other:?}"),
            })
            .collect::<Vec<_>>()
    };
    let proxmox = egress
        .iter()
        .find(|r| ports_of(r) == [8006])
        .expect("an egress rule for the Proxmox API");
    assert_eq!(
        proxmox.to.as_ref().unwrap()[0]
            .ip_block
            .as_ref()
            .unwrap()
            .cidr,
        "192.168.1.0/24"
    );
    for ports in [vec![53, 53], vec![443, 6443], vec![22]] {
        assert!(
            egress.iter().any(|r| ports_of(r) == ports),
            "no egress rule for ports {ports:?}: {egress:?}"
        );
    }
    let ingress = spec.ingress.unwrap();
    assert_eq!(
        ingress.len(),
        1,
        "only the metrics port is open: {ingress:?}"
    );
}

#[tokio::test]
async fn rendered_chart_passes_server_side_dry_run() {
    let cp = control_plane();
    let client = cp.client().await;
    let ns = cp.namespace(&client, "chart-dry-run").await;
    // The chart as `helm install` would send it, CRDs from crds/ included.
    let plain = helm_template("dry", &ns, &["--include-crds"]);
    kubectl_apply(cp, &plain, &["--dry-run=server", "--force-conflicts"]);
    // Every option on, CRDs as templates.
    let mut args = vec![];
    args.extend_from_slice(ALL_OPTIONS);
    let all = helm_template("dry", &ns, &args);
    assert!(all.contains("kind: NetworkPolicy") && all.contains("kind: CustomResourceDefinition"));
    kubectl_apply(cp, &all, &["--dry-run=server", "--force-conflicts"]);
}

#[tokio::test]
async fn helm_install_creates_the_objects_and_uninstall_keeps_the_crds() {
    let cp = control_plane();
    let client = cp.client().await;
    let ns = cp.namespace(&client, "chart-install").await;
    let chart = chart_dir();
    let installed = helm(
        Some(cp),
        &[
            "install",
            "inst",
            chart.to_str().unwrap(),
            "--namespace",
            &ns,
            "--set",
            "replicaCount=2",
            "--set",
            "networkPolicy.enabled=true",
            "--set",
            "proxmox.defaultSecret=proxmox-credentials",
            "--timeout",
            "60s",
        ],
    );
    ok(&installed, "helm install");
    // The API server warns about every unknown `format` in a CRD schema (schemars writes
    // `uint32`); helm prints those warnings.
    let warnings = String::from_utf8_lossy(&installed.stderr);
    assert!(
        !warnings.contains("unrecognized format") && !warnings.contains("Warning"),
        "helm install printed warnings:\n{warnings}"
    );
    // The Deployment's pods never run here (no nodes): check the objects.
    let dep = Api::<Deployment>::namespaced(client.clone(), &ns)
        .get("inst-sombrero")
        .await
        .unwrap();
    assert_eq!(dep.spec.unwrap().replicas, Some(2));
    Api::<ServiceAccount>::namespaced(client.clone(), &ns)
        .get("inst-sombrero")
        .await
        .unwrap();
    Api::<Service>::namespaced(client.clone(), &ns)
        .get("inst-sombrero-metrics")
        .await
        .unwrap();
    Api::<NetworkPolicy>::namespaced(client.clone(), &ns)
        .get("inst-sombrero")
        .await
        .unwrap();
    Api::<Role>::namespaced(client.clone(), &ns)
        .get("inst-sombrero-leader-election")
        .await
        .unwrap();
    Api::<RoleBinding>::namespaced(client.clone(), &ns)
        .get("inst-sombrero-leader-election")
        .await
        .unwrap();
    Api::<ClusterRole>::all(client.clone())
        .get("inst-sombrero-controller")
        .await
        .unwrap();
    Api::<ClusterRoleBinding>::all(client.clone())
        .get("inst-sombrero-controller")
        .await
        .unwrap();
    let out = cp
        .kubectl()
        .args(["wait", "--for=condition=Established", "--timeout=60s"])
        .args(CRD_NAMES.map(|n| format!("crd/{n}")))
        .output()
        .unwrap();
    ok(&out, "CRDs Established after helm install");
    let status = ok(
        &helm(Some(cp), &["status", "inst", "--namespace", &ns]),
        "helm status",
    );
    assert!(status.contains("STATUS: deployed"), "{status}");

    ok(
        &helm(Some(cp), &["uninstall", "inst", "--namespace", &ns]),
        "helm uninstall",
    );
    let deps = Api::<Deployment>::namespaced(client.clone(), &ns)
        .list(&ListParams::default())
        .await
        .unwrap();
    assert!(deps.items.is_empty(), "uninstall left the Deployment");
    // Helm never deletes CRDs from crds/ (and with them every GoldenImage).
    let crds = Api::<CustomResourceDefinition>::all(client);
    for name in CRD_NAMES {
        crds.get(name).await.unwrap();
    }
}

#[tokio::test]
async fn templated_crds_adopt_existing_ones_and_survive_uninstall() {
    let cp = control_plane();
    cp.install_crds();
    let client = cp.client().await;
    let ns = cp.namespace(&client, "chart-crds").await;
    // docs/install.md's migration: mark the CRDs (installed from crds/) as the release's.
    for name in CRD_NAMES {
        let crd = format!("crd/{name}");
        ok(
            &cp.kubectl()
                .args([
                    "label",
                    "--overwrite",
                    &crd,
                    "app.kubernetes.io/managed-by=Helm",
                ])
                .output()
                .unwrap(),
            "kubectl label",
        );
        ok(
            &cp.kubectl()
                .args([
                    "annotate",
                    "--overwrite",
                    &crd,
                    "meta.helm.sh/release-name=crds",
                    &format!("meta.helm.sh/release-namespace={ns}"),
                ])
                .output()
                .unwrap(),
            "kubectl annotate",
        );
    }
    let chart = chart_dir();
    ok(
        &helm(
            Some(cp),
            &[
                "install",
                "crds",
                chart.to_str().unwrap(),
                "--namespace",
                &ns,
                "--skip-crds",
                "--set",
                "crds.enabled=true",
            ],
        ),
        "helm install with crds.enabled",
    );
    let crds = Api::<CustomResourceDefinition>::all(client.clone());
    for name in CRD_NAMES {
        let crd = crds.get(name).await.unwrap();
        let ann = crd.metadata.annotations.unwrap_or_default();
        assert_eq!(
            ann.get("helm.sh/resource-policy").map(String::as_str),
            Some("keep"),
            "{name}"
        );
        let labels = crd.metadata.labels.unwrap_or_default();
        assert_eq!(
            labels.get("app.kubernetes.io/instance").map(String::as_str),
            Some("crds")
        );
    }
    ok(
        &helm(Some(cp), &["uninstall", "crds", "--namespace", &ns]),
        "helm uninstall",
    );
    for name in CRD_NAMES {
        crds.get(name)
            .await
            .unwrap_or_else(|e| panic!("{name} deleted despite crds.keep: {e}"));
    }
    // Still serving: a GoldenImage can be listed.
    Api::<GoldenImage>::all(client)
        .list(&ListParams::default())
        .await
        .unwrap();
}

/// One access check: verb, API group, resource (with subresource after '/', and an object name
/// after '#'), namespace ("" = cluster-wide).
type Check<'a> = (&'static str, &'static str, &'static str, &'a str);

async fn allowed(client: &kube::Client, (verb, group, resource, ns): Check<'_>) -> bool {
    let (resource, name) = resource.split_once('#').unwrap_or((resource, ""));
    let (resource, sub) = resource.split_once('/').unwrap_or((resource, ""));
    let review = SelfSubjectAccessReview {
        spec: SelfSubjectAccessReviewSpec {
            resource_attributes: Some(ResourceAttributes {
                verb: Some(verb.into()),
                group: Some(group.into()),
                resource: Some(resource.into()),
                subresource: (!sub.is_empty()).then(|| sub.to_string()),
                name: (!name.is_empty()).then(|| name.to_string()),
                namespace: (!ns.is_empty()).then(|| ns.to_string()),
                ..Default::default()
            }),
            ..Default::default()
        },
        ..Default::default()
    };
    let answer = Api::<SelfSubjectAccessReview>::all(client.clone())
        .create(&PostParams::default(), &review)
        .await
        .expect("SelfSubjectAccessReview");
    answer.status.expect("review status").allowed
}

#[tokio::test]
async fn rbac_grants_what_the_controller_uses_and_nothing_more() {
    let cp = control_plane();
    cp.install_crds();
    let admin = cp.client().await;
    let ns = cp.namespace(&admin, "chart-rbac").await;
    let rbac = install_chart_rbac(cp, &ns, "rbac");
    let sa = rbac.client(cp).await;
    // Any namespace where GoldenImages live.
    const IMAGES: &str = "images-anywhere";
    let leases_ns = ns.as_str();
    let g = "images.sombrero.dev";
    let must: Vec<Check> = vec![
        ("get", g, "goldenimages", IMAGES),
        ("list", g, "goldenimages", ""),
        ("watch", g, "goldenimages", ""),
        ("patch", g, "goldenimages", IMAGES),
        ("patch", g, "goldenimages/status", IMAGES),
        ("update", g, "goldenimages/finalizers", IMAGES),
        ("get", g, "templateretentions", IMAGES),
        ("list", g, "templateretentions", ""),
        ("watch", g, "templateretentions", ""),
        ("patch", g, "templateretentions/status", IMAGES),
        ("list", "", "configmaps", ""),
        ("watch", "", "configmaps", ""),
        ("create", "", "configmaps", IMAGES),
        ("patch", "", "configmaps", IMAGES),
        ("get", "", "secrets", IMAGES),
        ("list", "", "secrets", ""),
        ("watch", "", "secrets", ""),
        ("create", "events.k8s.io", "events", IMAGES),
        ("patch", "events.k8s.io", "events", IMAGES),
        // The controller's Lease (`--lease-name`, default sombrero-controller).
        (
            "get",
            "coordination.k8s.io",
            "leases#sombrero-controller",
            leases_ns,
        ),
        ("create", "coordination.k8s.io", "leases", leases_ns),
        (
            "patch",
            "coordination.k8s.io",
            "leases#sombrero-controller",
            leases_ns,
        ),
    ];
    // Not used by the controller (the e2e tests run it with exactly these rules and fail on
    // any 403): TemplateRetentions are never written but through their status, the
    // blockOwnerDeletion check asks `update` (only) on the owner's finalizers, the ConfigMap is
    // written by server-side apply without reading it, and kube-lease-manager patches its Lease.
    let must_not: Vec<Check> = vec![
        ("patch", g, "templateretentions", IMAGES),
        ("update", g, "templateretentions/finalizers", IMAGES),
        ("patch", g, "templateretentions/finalizers", IMAGES),
        ("patch", g, "goldenimages/finalizers", IMAGES),
        ("get", "", "configmaps", IMAGES),
        (
            "update",
            "coordination.k8s.io",
            "leases#sombrero-controller",
            leases_ns,
        ),
        ("create", "", "secrets", IMAGES),
        ("update", "", "secrets", IMAGES),
        ("patch", "", "secrets", IMAGES),
        ("delete", "", "secrets", IMAGES),
        ("create", "", "secrets", ""),
        ("delete", "", "configmaps", IMAGES),
        ("update", "", "configmaps", IMAGES),
        ("create", g, "goldenimages", IMAGES),
        ("update", g, "goldenimages", IMAGES),
        ("delete", g, "goldenimages", IMAGES),
        ("delete", g, "templateretentions", IMAGES),
        ("update", g, "goldenimages/status", IMAGES),
        ("get", "", "pods", IMAGES),
        ("list", "", "pods", ""),
        ("create", "", "pods/exec", IMAGES),
        ("create", "", "serviceaccounts/token", IMAGES),
        ("create", "", "events", IMAGES),
        ("delete", "events.k8s.io", "events", IMAGES),
        (
            "get",
            "coordination.k8s.io",
            "leases#sombrero-controller",
            IMAGES,
        ),
        (
            "patch",
            "coordination.k8s.io",
            "leases#kube-controller-manager",
            leases_ns,
        ),
        ("update", "coordination.k8s.io", "leases#other", leases_ns),
        ("create", "coordination.k8s.io", "leases", "kube-system"),
        ("delete", "coordination.k8s.io", "leases", leases_ns),
        (
            "create",
            "apiextensions.k8s.io",
            "customresourcedefinitions",
            "",
        ),
        (
            "update",
            "apiextensions.k8s.io",
            "customresourcedefinitions",
            "",
        ),
        (
            "create",
            "rbac.authorization.k8s.io",
            "clusterrolebindings",
            "",
        ),
        ("escalate", "rbac.authorization.k8s.io", "clusterroles", ""),
        ("create", "apps", "deployments", IMAGES),
        ("list", "", "nodes", ""),
    ];
    let mut wrong = Vec::new();
    for check in &must {
        if !allowed(&sa, *check).await {
            wrong.push(format!("DENIED but the controller needs it: {check:?}"));
        }
    }
    for check in &must_not {
        if allowed(&sa, *check).await {
            wrong.push(format!("ALLOWED but not needed: {check:?}"));
        }
    }
    // The admin is allowed everything: proves the reviews are evaluated, not just answered.
    assert!(allowed(&admin, ("delete", "", "secrets", IMAGES)).await);
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));

    // Real requests as the ServiceAccount: reading works, writing a Secret is forbidden.
    Api::<GoldenImage>::all(sa.clone())
        .list(&ListParams::default())
        .await
        .expect("the ServiceAccount lists GoldenImages");
    let secret: Secret = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1", "kind": "Secret", "metadata": {"name": "stolen"},
        "stringData": {"x": "y"}
    }))
    .unwrap();
    match Api::<Secret>::namespaced(sa, &ns)
        .create(&PostParams::default(), &secret)
        .await
    {
        Err(kube::Error::Api(e)) if e.code == 403 => {}
        other => panic!("creating a Secret as the ServiceAccount: expected 403, got {other:?}"),
    }
    // The client records the refusal: what the e2e tests' `assert_nothing_denied` relies on.
    let denied = rbac.denied();
    assert!(
        denied.len() == 1
            && denied[0].starts_with(&format!("POST /api/v1/namespaces/{ns}/secrets")),
        "{denied:?}"
    );
}

#[test]
fn dockerfile_chart_and_crate_agree() {
    // No Docker engine here: the image cannot be built in tests. Check what must stay in step.
    let dockerfile = std::fs::read_to_string(repo_root().join("Dockerfile")).unwrap();
    let cargo = std::fs::read_to_string(repo_root().join("Cargo.toml")).unwrap();
    let field = |key: &str| {
        cargo
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{key} = \"")))
            .and_then(|v| v.strip_suffix('"'))
            .unwrap_or_else(|| panic!("Cargo.toml has no {key}"))
            .to_string()
    };
    let rust = field("rust-version");
    assert!(
        dockerfile.contains(&format!("rust:{rust}-")),
        "the Dockerfile's builder must be Rust {rust} (Cargo.toml rust-version)"
    );
    assert!(dockerfile.contains("USER 65532:65532"));
    assert!(dockerfile.contains("ENTRYPOINT [\"/usr/local/bin/sombrero\"]"));
    assert!(dockerfile.contains("cargo build --release --locked"));

    let chart: Value =
        serde_yaml::from_str(&std::fs::read_to_string(chart_dir().join("Chart.yaml")).unwrap())
            .unwrap();
    assert_eq!(
        chart["appVersion"].as_str(),
        Some(field("version").as_str()),
        "Chart.yaml appVersion must be the crate version (the default image tag)"
    );
    let values: Value =
        serde_yaml::from_str(&std::fs::read_to_string(chart_dir().join("values.yaml")).unwrap())
            .unwrap();
    assert_eq!(
        values["podSecurityContext"]["runAsUser"].as_u64(),
        Some(65532)
    );
}

/// `kubectl auth can-i VERB RESOURCE[/NAME]` as the chart's ServiceAccount, in `ns` ("" = across
/// all namespaces): the API server's own answer. `resource:sub` asks about a subresource.
fn can_i(cp: &ControlPlane, rbac: &ChartRbac, verb: &str, resource: &str, ns: &str) -> bool {
    let mut cmd = rbac.kubectl(cp);
    let (resource, sub) = resource.split_once(':').unwrap_or((resource, ""));
    cmd.args(["auth", "can-i", verb, resource]);
    if !sub.is_empty() {
        cmd.arg(format!("--subresource={sub}"));
    }
    if ns.is_empty() {
        cmd.arg("--all-namespaces");
    } else {
        cmd.args(["--namespace", ns]);
    }
    let out = cmd.output().expect("run kubectl auth can-i");
    match (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).trim(),
    ) {
        (Some(0), "yes") => true,
        (Some(1), "no") => false,
        _ => panic!(
            "kubectl auth can-i {verb} {resource} -n {ns:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    }
}

/// Every (verb, resource, namespace) of `checks` answered as `want`; the mismatches.
fn can_i_all(
    cp: &ControlPlane,
    rbac: &ChartRbac,
    want: bool,
    checks: &[(&str, &str, &str)],
) -> Vec<String> {
    checks
        .iter()
        .filter(|(verb, res, ns)| can_i(cp, rbac, verb, res, ns) != want)
        .map(|c| {
            format!(
                "{} but expected {}: {c:?}",
                if want { "DENIED" } else { "ALLOWED" },
                if want { "allowed" } else { "denied" }
            )
        })
        .collect()
}

const GI: &str = "goldenimages.images.sombrero.dev";
const TR: &str = "templateretentions.images.sombrero.dev";
const GI_STATUS: &str = "goldenimages.images.sombrero.dev:status";
const EVENTS: &str = "events.events.k8s.io";

#[tokio::test]
async fn rbac_modes_grant_and_deny_per_kubectl_auth_can_i() {
    let cp = control_plane();
    cp.install_crds();
    let admin = cp.client().await;

    // Namespaced mode: Roles in the two watched namespaces, the default Proxmox Secret's
    // namespace (the release's, not watched) readable for Secrets only, nothing cluster-wide.
    let release_ns = cp.namespace(&admin, "rbac-ns").await;
    let (a, b) = (format!("{release_ns}-a"), format!("{release_ns}-b"));
    let other = cp.namespace(&admin, "rbac-other").await;
    let values = [
        "--set",
        "rbac.scope=namespaced",
        "--set",
        "proxmox.defaultSecret=pve",
    ];
    let rendered = docs(&helm_template(
        "nsd",
        &release_ns,
        &[
            "--set-json",
            &format!("controller.watchNamespaces=[\"{a}\",\"{b}\"]"),
            values[0],
            values[1],
            values[2],
            values[3],
        ],
    ));
    for kind in ["ClusterRole", "ClusterRoleBinding"] {
        assert!(
            find(&rendered, kind).is_empty(),
            "namespaced mode renders a {kind}"
        );
    }
    let roles: Vec<(String, String)> = find(&rendered, "Role")
        .iter()
        .map(|r| {
            (
                r["metadata"]["namespace"].as_str().unwrap().to_string(),
                r["metadata"]["name"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(
        roles,
        [
            (a.clone(), "nsd-sombrero-controller".to_string()),
            (b.clone(), "nsd-sombrero-controller".to_string()),
            (
                release_ns.clone(),
                "nsd-sombrero-default-secret".to_string()
            ),
            (
                release_ns.clone(),
                "nsd-sombrero-leader-election".to_string()
            ),
        ]
    );
    let rbac = install_chart_rbac_with(cp, &release_ns, "nsd", &[&a, &b], &values);
    rbac.client(cp).await; // waits until the bindings are in force
    let mut wrong = Vec::new();
    let mut must: Vec<(&str, &str, &str)> = Vec::new();
    for ns in [a.as_str(), b.as_str()] {
        must.extend([
            ("list", GI, ns),
            ("watch", GI, ns),
            ("patch", GI, ns),
            ("patch", GI_STATUS, ns),
            ("update", "goldenimages.images.sombrero.dev:finalizers", ns),
            ("list", TR, ns),
            ("patch", "templateretentions.images.sombrero.dev:status", ns),
            ("list", "configmaps", ns),
            ("create", "configmaps", ns),
            ("patch", "configmaps", ns),
            ("get", "secrets", ns),
            ("watch", "secrets", ns),
            ("create", EVENTS, ns),
        ]);
    }
    must.extend([
        ("get", "secrets", release_ns.as_str()),
        ("list", "secrets", release_ns.as_str()),
        (
            "get",
            "leases.coordination.k8s.io/sombrero-controller",
            release_ns.as_str(),
        ),
        ("create", "leases.coordination.k8s.io", release_ns.as_str()),
    ]);
    wrong.extend(can_i_all(cp, &rbac, true, &must));
    let must_not = [
        // Nothing outside the watched namespaces: not kube-system's ConfigMaps (coredns,
        // aws-auth), not another namespace's Secrets, nothing across all namespaces.
        ("patch", "configmaps", "kube-system"),
        ("create", "configmaps", "kube-system"),
        ("get", "secrets", "kube-system"),
        ("list", "secrets", "kube-system"),
        ("get", "secrets", other.as_str()),
        ("list", "secrets", ""),
        ("list", "configmaps", ""),
        ("list", GI, ""),
        ("list", TR, ""),
        ("get", GI, other.as_str()),
        ("patch", "configmaps", other.as_str()),
        ("create", EVENTS, other.as_str()),
        // The release namespace is not watched: only the default Secret may be read there.
        ("patch", "configmaps", release_ns.as_str()),
        ("list", GI, release_ns.as_str()),
        ("create", EVENTS, release_ns.as_str()),
        // Never written, anywhere.
        ("create", "secrets", a.as_str()),
        ("delete", "configmaps", a.as_str()),
        ("delete", GI, a.as_str()),
        (
            "create",
            "customresourcedefinitions.apiextensions.k8s.io",
            "",
        ),
        ("list", "namespaces", ""),
    ];
    wrong.extend(can_i_all(cp, &rbac, false, &must_not));

    // Without proxmox.defaultSecret, no Secret of the release namespace is readable.
    let bare_ns = cp.namespace(&admin, "rbac-bare").await;
    let c = format!("{bare_ns}-c");
    let bare = install_chart_rbac_with(cp, &bare_ns, "bare", &[&c], &values[..2]);
    bare.client(cp).await;
    wrong.extend(can_i_all(
        cp,
        &bare,
        true,
        &[("get", "secrets", c.as_str())],
    ));
    wrong.extend(can_i_all(
        cp,
        &bare,
        false,
        &[
            ("get", "secrets", bare_ns.as_str()),
            ("get", "secrets", a.as_str()),
        ],
    ));

    // Cluster mode (the default): the same rules in every namespace, kube-system included;
    // still no Secret written, no CRD touched.
    let cluster_ns = cp.namespace(&admin, "rbac-cluster").await;
    let cluster = install_chart_rbac(cp, &cluster_ns, "clu");
    cluster.client(cp).await;
    wrong.extend(can_i_all(
        cp,
        &cluster,
        true,
        &[
            ("list", GI, ""),
            ("list", "secrets", ""),
            ("patch", "configmaps", other.as_str()),
            ("patch", "configmaps", "kube-system"),
            ("get", "secrets", "kube-system"),
        ],
    ));
    wrong.extend(can_i_all(
        cp,
        &cluster,
        false,
        &[
            ("create", "secrets", other.as_str()),
            ("delete", "configmaps", "kube-system"),
            (
                "create",
                "customresourcedefinitions.apiextensions.k8s.io",
                "",
            ),
        ],
    ));
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));

    // Namespaced mode needs the namespaces: refused with the value to set.
    let out = helm(
        None,
        &[
            "template",
            "x",
            chart_dir().to_str().unwrap(),
            "--set",
            "rbac.scope=namespaced",
        ],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("controller.watchNamespaces"),
        "{err}"
    );
    // The old single-namespace value names its replacement.
    let out = helm(
        None,
        &[
            "template",
            "x",
            chart_dir().to_str().unwrap(),
            "--set",
            "controller.watchNamespace=images",
        ],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("controller.watchNamespaces"),
        "{err}"
    );
}

/// The controller as the chart's ServiceAccount with namespaced RBAC (Roles only): the images
/// of both watched namespaces reach Ready against the fake Proxmox with no request refused, an
/// image in a namespace outside the list is left alone; the same image then reaches Ready
/// under cluster RBAC.
#[tokio::test]
async fn the_controller_keeps_images_with_namespaced_and_cluster_rbac() {
    let cp = control_plane();
    cp.install_crds();
    let admin = cp.client().await;
    let release_ns = cp.namespace(&admin, "mode-ns").await;
    let (a, b) = (format!("{release_ns}-a"), format!("{release_ns}-b"));
    let outside = cp.namespace(&admin, "mode-outside").await;
    let rbac = install_chart_rbac_with(
        cp,
        &release_ns,
        "mode-ns",
        &[&a, &b],
        &["--set", "rbac.scope=namespaced"],
    );
    let sa = rbac.client(cp).await;
    let pve = FakePve::start().await;
    for ns in [&a, &b, &outside] {
        put_secret(&admin, ns, "pve", &pve, &pve.token_secret).await;
        create_image_with(&admin, ns, "img", &pve, "pve", serde_json::json!({})).await;
    }
    let ctl = start(&sa, options(&rbac, "ns-mode", true));
    for ns in [&a, &b] {
        wait_for(
            &admin,
            ns,
            "img",
            "Ready=True",
            Duration::from_secs(300),
            is_ready,
        )
        .await;
    }
    let untouched = Api::<GoldenImage>::namespaced(admin.clone(), &outside)
        .get("img")
        .await
        .unwrap();
    assert!(
        untouched.status.is_none() && untouched.metadata.finalizers.is_none(),
        "the controller touched an image outside its namespaces: {:?}",
        untouched.metadata
    );
    ctl.abort();
    let _ = ctl.await;
    rbac.assert_nothing_denied();

    // Cluster mode, watching the namespace the first controller left alone.
    let cluster_ns = cp.namespace(&admin, "mode-cluster").await;
    let cluster = install_chart_rbac_with(cp, &cluster_ns, "mode-cluster", &[&outside], &[]);
    let sa = cluster.client(cp).await;
    let ctl = start(&sa, options(&cluster, "cluster-mode", true));
    wait_for(
        &admin,
        &outside,
        "img",
        "Ready=True",
        Duration::from_secs(300),
        is_ready,
    )
    .await;
    ctl.abort();
    let _ = ctl.await;
    cluster.assert_nothing_denied();
}

/// A tool the image test needs; panics with the command that installs it.
fn image_tool(name: &str) -> std::path::PathBuf {
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!("`{name}` not found on PATH: install it with `scripts/image-tools.sh` (Debian's runc and umoci; `make tools` runs it)")
        })
}

/// The image's config from an OCI layout (index -> manifest -> config).
fn image_config(layout: &Path) -> serde_json::Value {
    let read = |digest: &str| -> serde_json::Value {
        let hex = digest.strip_prefix("sha256:").expect("a sha256 digest");
        serde_json::from_slice(&std::fs::read(layout.join("blobs/sha256").join(hex)).unwrap())
            .unwrap()
    };
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(layout.join("index.json")).unwrap()).unwrap();
    let manifest = read(index["manifests"][0]["digest"].as_str().unwrap());
    read(manifest["config"]["digest"].as_str().unwrap())
}

/// `runc` state of the container, and its removal when the test ends however it ends.
struct Container {
    runc: std::path::PathBuf,
    root: std::path::PathBuf,
    id: String,
}

impl Container {
    fn runc(&self) -> Command {
        let mut cmd = Command::new(&self.runc);
        cmd.arg("--root").arg(&self.root);
        cmd
    }

    /// The container's init process as the host sees it (once it runs).
    fn pid(&self) -> Option<u32> {
        let out = self.runc().args(["state", &self.id]).output().ok()?;
        let state: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        if state["status"] != "running" {
            return None;
        }
        state["pid"].as_u64().and_then(|p| u32::try_from(p).ok())
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        let _ = self.runc().args(["kill", &self.id, "KILL"]).output();
        let _ = self.runc().args(["delete", "--force", &self.id]).output();
    }
}

/// The image as scripts/image.sh builds it from the binary cargo built for these tests, run by
/// runc the way the chart runs it: uid 65532, read-only root filesystem, no capabilities, a
/// tmpfs on /tmp, the ServiceAccount token mounted where kube-rs finds it in a pod. Its
/// `sombrero controller` reaches the test API server (as the chart's ServiceAccount) and the
/// fake Proxmox, and brings a GoldenImage to Ready.
#[tokio::test]
async fn the_image_runs_the_controller_as_65532_on_a_read_only_root() {
    let runc = image_tool("runc");
    let umoci = image_tool("umoci");
    assert!(
        std::fs::read_to_string("/proc/self/status")
            .unwrap()
            .lines()
            .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0")),
        "runc needs root here (rootless runc cannot map uid 65532 without /etc/subuid ranges): run the tests as root, as CI does"
    );
    let tmp = tempfile::tempdir().unwrap();
    let layout = tmp.path().join("oci");
    let built = Command::new(repo_root().join("scripts/image.sh"))
        .args([
            "--binary",
            env!("CARGO_BIN_EXE_sombrero"),
            "--tag",
            "test",
            "--out",
        ])
        .arg(&layout)
        .output()
        .unwrap();
    ok(&built, "scripts/image.sh");

    // What the script builds is what the Dockerfile declares.
    let config = image_config(&layout);
    let dockerfile = std::fs::read_to_string(repo_root().join("Dockerfile")).unwrap();
    let c = &config["config"];
    for (line, have) in [
        (format!("USER {}", c["User"].as_str().unwrap()), "User"),
        (format!("ENTRYPOINT {}", c["Entrypoint"]), "Entrypoint"),
        (format!("CMD {}", c["Cmd"]), "Cmd"),
        (
            format!(
                "EXPOSE {}",
                c["ExposedPorts"]
                    .as_object()
                    .unwrap()
                    .keys()
                    .next()
                    .unwrap()
                    .trim_end_matches("/tcp")
            ),
            "ExposedPorts",
        ),
    ] {
        assert!(
            dockerfile.lines().any(|l| l.trim() == line),
            "the image's {have} is `{line}`, the Dockerfile does not say so"
        );
    }

    let bundle = tmp.path().join("bundle");
    ok(
        &Command::new(&umoci)
            .args(["unpack", "--image"])
            .arg(format!("{}:test", layout.display()))
            .arg(&bundle)
            .output()
            .unwrap(),
        "umoci unpack",
    );

    // The cluster side: CRDs, the chart's RBAC, a token of its ServiceAccount (TokenRequest).
    let cp = control_plane();
    cp.install_crds();
    let admin = cp.client().await;
    let ns = cp.namespace(&admin, "image").await;
    let rbac = install_chart_rbac(cp, &ns, &ns);
    rbac.client(cp).await;
    let token = ok(
        &cp.kubectl()
            .args(["create", "token", &rbac.service_account, "--namespace", &ns])
            .args(["--duration=1h"])
            .output()
            .unwrap(),
        "kubectl create token",
    );
    let sa_dir = tmp.path().join("serviceaccount");
    std::fs::create_dir_all(&sa_dir).unwrap();
    std::fs::write(sa_dir.join("token"), token.trim()).unwrap();
    std::fs::write(sa_dir.join("namespace"), &ns).unwrap();
    std::fs::copy(cp.dir.join("pki/ca.crt"), sa_dir.join("ca.crt")).unwrap();
    let kubeconfig = std::fs::read_to_string(&cp.kubeconfig).unwrap();
    let server = kubeconfig
        .lines()
        .find_map(|l| l.trim().strip_prefix("server: https://"))
        .expect("the kubeconfig's server");
    let (api_host, api_port) = server.rsplit_once(':').unwrap();

    let pve = FakePve::start().await;
    put_secret(&admin, &ns, "pve", &pve, &pve.token_secret).await;
    create_image_with(&admin, &ns, "img", &pve, "pve", serde_json::json!({})).await;

    // The runtime config umoci derived from the image, hardened as the chart's pod spec.
    let metrics_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let spec_path = bundle.join("config.json");
    let mut spec: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&spec_path).unwrap()).unwrap();
    let process = &mut spec["process"];
    assert_eq!(process["user"]["uid"], 65532, "the image's USER");
    assert_eq!(
        process["args"],
        serde_json::json!(["/usr/local/bin/sombrero", "controller"])
    );
    process["terminal"] = false.into();
    let mut args: Vec<String> = serde_json::from_value(process["args"].clone()).unwrap();
    args.extend([
        format!("--metrics-addr=127.0.0.1:{metrics_port}"),
        "--leader-election=true".into(),
        format!("--lease-name={}", rbac.lease_name),
        format!("--namespace={ns}"),
        "--log-format=json".into(),
        "--resync-seconds=2".into(),
        "--requeue-seconds=5".into(),
        "--poll-seconds=1".into(),
    ]);
    process["args"] = serde_json::json!(args);
    for env in [
        format!("KUBERNETES_SERVICE_HOST={api_host}"),
        format!("KUBERNETES_SERVICE_PORT={api_port}"),
        format!("POD_NAMESPACE={ns}"),
        "POD_NAME=image-test".to_string(),
    ] {
        process["env"].as_array_mut().unwrap().push(env.into());
    }
    // capabilities.drop: [ALL], allowPrivilegeEscalation: false.
    process["capabilities"] = serde_json::json!({});
    process["noNewPrivileges"] = true.into();
    spec["root"]["readonly"] = true.into();
    // The host's network (the API server and the fake listen on loopback); pid, mount, ipc
    // and uts namespaces of its own.
    let namespaces = spec["linux"]["namespaces"].as_array_mut().unwrap();
    namespaces.retain(|n| n["type"] != "network");
    let mounts = spec["mounts"].as_array_mut().unwrap();
    mounts.retain(|m| m["destination"] != "/sys/fs/cgroup");
    mounts.push(serde_json::json!({
        "destination": "/tmp", "type": "tmpfs", "source": "tmpfs",
        "options": ["nosuid", "nodev", "mode=1777", "size=65536k"]
    }));
    mounts.push(serde_json::json!({
        "destination": "/var/run/secrets/kubernetes.io/serviceaccount", "type": "bind",
        "source": sa_dir, "options": ["rbind", "ro"]
    }));
    std::fs::write(&spec_path, serde_json::to_vec_pretty(&spec).unwrap()).unwrap();

    let container = Container {
        runc,
        root: tmp.path().join("runc"),
        id: format!("sombrero-image-{}", std::process::id()),
    };
    let log = std::fs::File::create(tmp.path().join("controller.log")).unwrap();
    let mut run = container.runc();
    run.args(["run", "--bundle"])
        .arg(&bundle)
        .arg(&container.id)
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log);
    let mut child = run.spawn().expect("run runc");
    let logs = || std::fs::read_to_string(tmp.path().join("controller.log")).unwrap_or_default();

    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let pid = loop {
        if let Some(pid) = container.pid() {
            break pid;
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!("the container exited ({status}):\n{}", logs());
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the container never ran:\n{}",
            logs()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    // As the host sees the process: uid and gid 65532 (real, effective, saved, fs), no
    // capabilities, and its root mounted read-only.
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    for key in ["Uid:", "Gid:"] {
        let ids: Vec<&str> = status
            .lines()
            .find(|l| l.starts_with(key))
            .unwrap()
            .split_whitespace()
            .skip(1)
            .collect();
        assert_eq!(ids, ["65532"; 4], "{key} of the controller process");
    }
    let cap_eff = status.lines().find(|l| l.starts_with("CapEff:")).unwrap();
    assert!(cap_eff.ends_with("0000000000000000"), "{cap_eff}");
    let mountinfo = std::fs::read_to_string(format!("/proc/{pid}/mountinfo")).unwrap();
    let root = mountinfo
        .lines()
        .find(|l| l.split_whitespace().nth(4) == Some("/"))
        .expect("the container's root mount");
    let options = root.split_whitespace().nth(5).unwrap();
    assert!(options.split(',').any(|o| o == "ro"), "root mount: {root}");
    // The binary itself, inside the container: writing to / fails, /tmp is writable.
    let exec = |dir: &str| {
        container
            .runc()
            .args([
                "exec",
                &container.id,
                "/usr/local/bin/sombrero",
                "crd",
                "--out-dir",
                dir,
            ])
            .output()
            .unwrap()
    };
    let refused = exec("/crds");
    assert!(
        !refused.status.success()
            && String::from_utf8_lossy(&refused.stderr).contains("Read-only file system"),
        "writing to the root filesystem: {refused:?}"
    );
    ok(
        &exec("/tmp/crds"),
        "sombrero crd --out-dir /tmp/crds in the container",
    );

    // The controller in the image reaches both ends.
    let api = Api::<GoldenImage>::namespaced(admin.clone(), &ns);
    let deadline = std::time::Instant::now() + Duration::from_secs(300);
    loop {
        let gi = api.get("img").await.unwrap();
        if is_ready(&gi) {
            assert!(gi.status.unwrap().latest.is_some());
            break;
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!("the container exited ({status}):\n{}", logs());
        }
        assert!(
            std::time::Instant::now() < deadline,
            "not Ready: {:#?}\ncontroller log:\n{}",
            gi.status,
            logs()
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let metrics = reqwest::get(format!("http://127.0.0.1:{metrics_port}/metrics"))
        .await
        .expect("GET /metrics of the container")
        .text()
        .await
        .unwrap();
    assert!(metrics.contains("sombrero_"), "{metrics}");
    let text = logs();
    assert!(
        // Not a bare "403": build ids carry timestamps (b-20261202002940307).
        !text.to_lowercase().contains("forbidden") && !text.contains("\"status\":403"),
        "the chart's RBAC refused the containerised controller:\n{text}"
    );
    drop(container);
    let _ = child.wait();
}

/// The API server warns about each `format` it does not know in a CRD schema, and `helm install`
/// prints those warnings (`unrecognized format "uint32"`): the CRDs must draw none.
#[tokio::test]
async fn the_crds_apply_without_warnings() {
    let cp = control_plane();
    for dir in [repo_root().join("crds"), chart_dir().join("crds")] {
        let out = cp
            .kubectl()
            .args(["apply", "--server-side", "--dry-run=server"])
            .args([
                "--field-manager=sombrero-warnings",
                "--force-conflicts",
                "-f",
            ])
            .arg(&dir)
            .output()
            .unwrap();
        ok(&out, "kubectl apply --dry-run=server the CRDs");
        let warnings = String::from_utf8_lossy(&out.stderr);
        assert!(
            !warnings.contains("Warning"),
            "{}: the API server warns:\n{warnings}",
            dir.display()
        );
    }
}
