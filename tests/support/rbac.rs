//! The Helm chart's RBAC in the test API server, and a client that acts as the chart's
//! ServiceAccount (impersonation), so tests run the controller with exactly the permissions a
//! real install grants, instead of cluster-admin.
//!
//! ```ignore
//! let cp = support::kube::control_plane();
//! cp.install_crds();
//! let rbac = support::rbac::install_chart_rbac(cp, "sombrero-system-1", "e2e");
//! let client = rbac.client(cp).await;   // every request is made as the ServiceAccount
//! // start the controller with `client`, controller namespace = rbac.namespace,
//! // lease name = rbac.lease_name; at the end:
//! rbac.assert_nothing_denied();
//! ```
//!
//! The chart is rendered by the real `helm` (built by `scripts/test-tools.sh`) with the given
//! release name and namespace, so its ClusterRole and ClusterRoleBinding are named after the
//! release: use one release name per test to keep tests independent.
//!
//! A controller tolerates some refusals (a failed Event is only logged, a refused watch is
//! retried), so a missing permission would not always fail a test by itself: the client records
//! every request the API server answers with 403, and `assert_nothing_denied` fails the test
//! with the list.

use std::future::Future;
use std::io::Write;
use std::pin::Pin;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use k8s_openapi::api::authorization::v1::{
    ResourceAttributes, SelfSubjectAccessReview, SelfSubjectAccessReviewSpec,
};
use kube::Client;
use kube::api::{Api, PostParams};
use kube::client::ClientBuilder;
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
    /// The one Lease the chart's Role lets the controller touch (`--lease-name`).
    pub lease_name: String,
    /// `controller.watchNamespaces` as rendered (empty: the default, cluster mode watching all;
    /// the tests then watch only [`Self::namespace`]).
    pub watch_namespaces: Vec<String>,
    /// `METHOD path` of every request of [`ChartRbac::client`]s the API server refused (403).
    denied: Arc<Mutex<Vec<String>>>,
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
    ///
    /// Waits until the API server's RBAC cache has the new bindings (they take effect a moment
    /// after they are written), and records every refused request (see [`Self::denied`]).
    pub async fn client(&self, cp: &ControlPlane) -> Client {
        let config = self.config(cp).await;
        let plain = Client::try_from(config.clone()).expect("impersonating kube client");
        self.wait_effective(&plain).await;
        ClientBuilder::try_from(config)
            .expect("impersonating kube client")
            .with_layer(&RecordDenied(self.denied.clone()))
            .build()
    }

    async fn config(&self, cp: &ControlPlane) -> kube::Config {
        let kc = Kubeconfig::read_from(&cp.kubeconfig).expect("read kubeconfig");
        let mut config = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
            .await
            .expect("kubeconfig");
        config.auth_info.impersonate = Some(self.username());
        config.default_namespace = self.namespace.clone();
        config
    }

    /// Until the ServiceAccount may list GoldenImages (everywhere, or in the first watched
    /// namespace in namespaced mode) and get its Lease (RoleBinding), as the API server itself
    /// answers.
    async fn wait_effective(&self, client: &Client) {
        let images_ns = self.watch_namespaces.first().map_or("", String::as_str);
        let checks = [
            ("list", "images.sombrero.dev", "goldenimages", "", images_ns),
            (
                "get",
                "coordination.k8s.io",
                "leases",
                self.lease_name.as_str(),
                self.namespace.as_str(),
            ),
        ];
        let deadline = Instant::now() + Duration::from_secs(30);
        for (verb, group, resource, name, namespace) in checks {
            let review = SelfSubjectAccessReview {
                spec: SelfSubjectAccessReviewSpec {
                    resource_attributes: Some(ResourceAttributes {
                        verb: Some(verb.into()),
                        group: Some(group.into()),
                        resource: Some(resource.into()),
                        name: (!name.is_empty()).then(|| name.to_string()),
                        namespace: (!namespace.is_empty()).then(|| namespace.to_string()),
                        ..Default::default()
                    }),
                    ..Default::default()
                },
                ..Default::default()
            };
            loop {
                let answer = Api::<SelfSubjectAccessReview>::all(client.clone())
                    .create(&PostParams::default(), &review)
                    .await
                    .expect("SelfSubjectAccessReview");
                if answer.status.is_some_and(|s| s.allowed) {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "the chart's RBAC for {} never allowed {verb} {resource}",
                    self.username()
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        // Proves the client is really the ServiceAccount (not the admin it impersonates from).
        let review = SelfSubjectAccessReview {
            spec: SelfSubjectAccessReviewSpec {
                resource_attributes: Some(ResourceAttributes {
                    verb: Some("delete".into()),
                    resource: Some("secrets".into()),
                    namespace: Some(self.namespace.clone()),
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
        assert!(
            !answer.status.is_some_and(|s| s.allowed),
            "{} may delete Secrets: the client is not restricted to the chart's RBAC",
            self.username()
        );
    }

    /// `METHOD path` of every request the API server refused (403) to this release's clients.
    pub fn denied(&self) -> Vec<String> {
        self.denied.lock().expect("denied list").clone()
    }

    /// Fails the test when the API server refused any request of this release's clients: the
    /// chart lacks a permission the controller uses (or the controller makes a call it should
    /// not).
    pub fn assert_nothing_denied(&self) {
        let denied = self.denied();
        assert!(
            denied.is_empty(),
            "the API server refused {} requests to {} (chart RBAC):\n{}",
            denied.len(),
            self.username(),
            denied.join("\n")
        );
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
    install_chart_rbac_with(cp, namespace, release, &[], &[])
}

/// [`install_chart_rbac`] with chart values (`--set rbac.scope=namespaced`, ...) and the
/// namespaces the controller watches (`controller.watchNamespaces`, created here first).
pub fn install_chart_rbac_with(
    cp: &ControlPlane,
    namespace: &str,
    release: &str,
    watch_namespaces: &[&str],
    values: &[&str],
) -> ChartRbac {
    for ns in std::iter::once(namespace).chain(watch_namespaces.iter().copied()) {
        kubectl_apply(
            cp,
            &format!("apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {ns}\n"),
            &[],
        );
    }
    let watch = serde_json::to_string(watch_namespaces).expect("namespaces as JSON");
    let watch = format!("controller.watchNamespaces={watch}");
    let mut args = vec![
        "--show-only",
        "templates/serviceaccount.yaml",
        "--show-only",
        "templates/rbac.yaml",
        "--set-json",
        watch.as_str(),
    ];
    args.extend_from_slice(values);
    let manifests = helm_template(release, namespace, &args);
    kubectl_apply(cp, &manifests, &[]);
    let service_account = serde_yaml::Deserializer::from_str(&manifests)
        .filter_map(|doc| serde_yaml::Value::deserialize(doc).ok())
        .find(|doc| doc["kind"].as_str() == Some("ServiceAccount"))
        .and_then(|sa| sa["metadata"]["name"].as_str().map(str::to_string))
        .expect("the chart renders a ServiceAccount");
    let lease_name = serde_yaml::Deserializer::from_str(&manifests)
        .filter_map(|doc| serde_yaml::Value::deserialize(doc).ok())
        .filter(|doc| doc["kind"].as_str() == Some("Role"))
        .flat_map(|role| role["rules"].as_sequence().cloned().unwrap_or_default())
        .filter(|rule| {
            rule["resources"]
                .as_sequence()
                .is_some_and(|r| r.iter().any(|r| r.as_str() == Some("leases")))
        })
        .find_map(|rule| rule["resourceNames"][0].as_str().map(str::to_string))
        .expect("the chart's Role names the leader Lease");
    ChartRbac {
        namespace: namespace.to_string(),
        release: release.to_string(),
        service_account,
        lease_name,
        watch_namespaces: watch_namespaces.iter().map(|s| s.to_string()).collect(),
        denied: Arc::default(),
    }
}

/// Tower layer of [`ChartRbac::client`]: notes each request the API server answers with 403.
#[derive(Clone)]
struct RecordDenied(Arc<Mutex<Vec<String>>>);

impl<S> tower::Layer<S> for RecordDenied {
    type Service = RecordDeniedService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RecordDeniedService {
            inner,
            denied: self.0.clone(),
        }
    }
}

#[derive(Clone)]
struct RecordDeniedService<S> {
    inner: S,
    denied: Arc<Mutex<Vec<String>>>,
}

impl<S, B> tower::Service<http::Request<kube::client::Body>> for RecordDeniedService<S>
where
    S: tower::Service<http::Request<kube::client::Body>, Response = http::Response<B>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<kube::client::Body>) -> Self::Future {
        let what = format!("{} {}", req.method(), req.uri());
        let denied = self.denied.clone();
        let response = self.inner.call(req);
        Box::pin(async move {
            let response = response.await?;
            if response.status() == http::StatusCode::FORBIDDEN {
                // Shown in the test's output next to the controller's own warning.
                eprintln!("FORBIDDEN (chart RBAC): {what}");
                denied.lock().expect("denied list").push(what);
            }
            Ok(response)
        })
    }
}
