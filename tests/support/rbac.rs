//! The Helm chart's RBAC in the test API server, and a client that acts as the chart's
//! ServiceAccount (impersonation), so tests run the controller with exactly the permissions a
//! real install grants, instead of cluster-admin.
//!
//! ```ignore
//! let cp = support::kube::control_plane();
//! cp.install_crds();
//! let rbac = support::rbac::install_chart_rbac(cp, "sombrero-system-1", "e2e");
//! let client = rbac.client(cp).await;   // every request is made as the ServiceAccount
//! // start the controller with `client`, `--lease-namespace` = rbac.namespace
//! ```
//!
//! The chart is rendered by the real `helm` (built by `scripts/test-tools.sh`) with the given
//! release name and namespace, so its ClusterRole and ClusterRoleBinding are named after the
//! release: use one release name per test to keep tests independent.

use std::io::Write;
use std::process::{Command, Stdio};

use kube::Client;
use kube::config::{KubeConfigOptions, Kubeconfig};
use serde::Deserialize;

use super::kube::{ControlPlane, repo_root, tool};

/// The chart's RBAC as installed for one release.
#[derive(Clone, Debug)]
pub struct ChartRbac {
    /// Release namespace: the ServiceAccount's, and where the leader-election Lease may live.
    pub namespace: String,
    pub release: String,
    pub service_account: String,
}

impl ChartRbac {
    /// `system:serviceaccount:<namespace>:<name>`, the user the API server sees.
    pub fn username(&self) -> String {
        format!(
            "system:serviceaccount:{}:{}",
            self.namespace, self.service_account
        )
    }

    /// A client whose every request is made as the chart's ServiceAccount. The API server adds
    /// the ServiceAccount groups (`system:serviceaccounts[:<ns>]`, `system:authenticated`) when
    /// the impersonated user is a ServiceAccount, as for a real token.
    pub async fn client(&self, cp: &ControlPlane) -> Client {
        let kc = Kubeconfig::read_from(&cp.kubeconfig).expect("read kubeconfig");
        let mut config = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
            .await
            .expect("kubeconfig");
        config.auth_info.impersonate = Some(self.username());
        config.default_namespace = self.namespace.clone();
        Client::try_from(config).expect("impersonating kube client")
    }

    /// `kubectl --as=<ServiceAccount>` against the test API server.
    pub fn kubectl(&self, cp: &ControlPlane) -> Command {
        let mut cmd = cp.kubectl();
        cmd.arg(format!("--as={}", self.username()));
        cmd
    }
}

/// `helm template` of the chart for `release` in `namespace` with `args` (e.g. `--set x=y`,
/// `--show-only templates/rbac.yaml`); panics with helm's message when it fails.
pub fn helm_template(release: &str, namespace: &str, args: &[&str]) -> String {
    let out = Command::new(tool("helm"))
        .args(["template", release])
        .arg(repo_root().join("charts/sombrero"))
        .args(["--namespace", namespace])
        .args(args)
        .output()
        .expect("run helm");
    assert!(
        out.status.success(),
        "helm template {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("helm output is UTF-8")
}

/// Server-side applies `manifests` (YAML documents) with kubectl; panics with the refusal.
pub fn kubectl_apply(cp: &ControlPlane, manifests: &str, extra: &[&str]) {
    let mut child = cp
        .kubectl()
        .args([
            "apply",
            "--server-side",
            "--field-manager=sombrero-tests",
            "-f",
            "-",
        ])
        .args(extra)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run kubectl");
    child
        .stdin
        .take()
        .expect("kubectl stdin")
        .write_all(manifests.as_bytes())
        .expect("write manifests to kubectl");
    let out = child.wait_with_output().expect("wait for kubectl");
    assert!(
        out.status.success(),
        "kubectl apply {extra:?} refused the manifests:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Creates `namespace` if needed, renders the chart's ServiceAccount, ClusterRole(Binding) and
/// leader-election Role(Binding) for `release` and applies them to the test API server.
pub fn install_chart_rbac(cp: &ControlPlane, namespace: &str, release: &str) -> ChartRbac {
    kubectl_apply(
        cp,
        &format!("apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {namespace}\n"),
        &[],
    );
    let manifests = helm_template(
        release,
        namespace,
        &[
            "--show-only",
            "templates/serviceaccount.yaml",
            "--show-only",
            "templates/rbac.yaml",
        ],
    );
    kubectl_apply(cp, &manifests, &[]);
    let service_account = serde_yaml::Deserializer::from_str(&manifests)
        .filter_map(|doc| serde_yaml::Value::deserialize(doc).ok())
        .find(|doc| doc["kind"].as_str() == Some("ServiceAccount"))
        .and_then(|sa| sa["metadata"]["name"].as_str().map(str::to_string))
        .expect("the chart renders a ServiceAccount");
    ChartRbac {
        namespace: namespace.to_string(),
        release: release.to_string(),
        service_account,
    }
}
