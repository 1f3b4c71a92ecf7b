//! Running `sombrero controller` in-process for the end-to-end tests, the way the chart runs it
//! (tests/support/rbac.rs: as the chart's ServiceAccount, not cluster-admin), and the helpers
//! those tests share to set up and watch GoldenImages.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Event, Secret};
use kube::Client;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use serde_json::json;
use sombrero::api::GoldenImage;
use sombrero::api::common::find_condition;
use sombrero::controller::{
    self, Options, connection::DefaultConnection, context::Settings, jobs::Limits,
};
use sombrero::proxmox;

use super::fakepve::{FakePve, Image};
use super::kube::ControlPlane;
use super::rbac::{ChartRbac, install_chart_rbac};

/// Installs the chart's RBAC for this test (release and controller namespace = the test's
/// namespace; release names are unique, so are the ClusterRole(Binding)s) and returns it with
/// the client the controller runs with: the chart's ServiceAccount, not cluster-admin. The test
/// itself keeps the admin client for setup and assertions.
pub async fn controller_client(cp: &ControlPlane, ns: &str) -> (ChartRbac, Client) {
    let rbac = install_chart_rbac(cp, ns, ns);
    let client = rbac.client(cp).await;
    (rbac, client)
}

/// The controller as the chart runs it: watching the chart's `controller.watchNamespaces` (by
/// default the test's namespace only), its Lease the one the chart's Role names, in the release
/// namespace; short resync and requeue for tests.
pub fn options(rbac: &ChartRbac, identity: &str, leader_election: bool) -> Options {
    let ns = &rbac.namespace;
    let mut settings = Settings::new(DefaultConnection::None);
    settings.resync = Duration::from_secs(2);
    settings.requeue = Duration::from_secs(5);
    settings.poll = Duration::from_secs(1);
    Options {
        namespaces: if rbac.watch_namespaces.is_empty() {
            vec![ns.to_string()]
        } else {
            rbac.watch_namespaces.clone()
        },
        metrics_addr: "127.0.0.1:0".parse().unwrap(),
        leader_election,
        lease_name: rbac.lease_name.clone(),
        controller_namespace: rbac.namespace.clone(),
        identity: identity.to_string(),
        limits: Limits {
            global: 4,
            per_node: 2,
        },
        settings,
        concurrency: 4,
    }
}

/// Starts the controller as a tokio task of the calling test.
pub fn start(client: &Client, opts: Options) -> tokio::task::JoinHandle<Result<(), String>> {
    // The controller's warnings go to the captured test output (shown when a test fails).
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            std::env::var("RUST_LOG").unwrap_or_else(|_| "sombrero=info,kube=warn".into()),
        )
        .with_test_writer()
        .try_init();
    let client = client.clone();
    tokio::spawn(async move {
        controller::run(client, opts, Arc::new(controller::runner::EngineRunner)).await
    })
}

/// The Proxmox credentials Secret `name` for the fake, with `token_secret` (a wrong one in the
/// tests of a refused token). Applied server-side, so it also replaces an earlier one.
pub async fn put_secret(client: &Client, ns: &str, name: &str, pve: &FakePve, token_secret: &str) {
    let mut data = BTreeMap::new();
    data.insert("url".to_string(), pve.url.clone());
    data.insert("tokenId".to_string(), pve.token_id.clone());
    data.insert("tokenSecret".to_string(), token_secret.to_string());
    data.insert("caCert".to_string(), pve.ca_pem.clone());
    let secret = Secret {
        metadata: kube::api::ObjectMeta {
            name: Some(name.into()),
            ..Default::default()
        },
        string_data: Some(data),
        ..Default::default()
    };
    let api: Api<Secret> = Api::namespaced(client.clone(), ns);
    let mut v = serde_json::to_value(&secret).unwrap();
    v["apiVersion"] = json!("v1");
    v["kind"] = json!("Secret");
    api.patch(
        name,
        &PatchParams::apply("sombrero-tests").force(),
        &Patch::Apply(v),
    )
    .await
    .expect("apply Secret");
}

/// Merges `patch` into `base` (objects key by key; anything else replaces).
pub fn merge(base: &mut serde_json::Value, patch: &serde_json::Value) {
    match (base, patch) {
        (serde_json::Value::Object(b), serde_json::Value::Object(p)) => {
            for (k, v) in p {
                merge(b.entry(k.clone()).or_insert(serde_json::Value::Null), v);
            }
        }
        (b, p) => *b = p.clone(),
    }
}

/// A GoldenImage of a fresh cloud image (with the guest agent), validated through the agent;
/// `spec` is merged into the default spec.
pub async fn create_image_with(
    client: &Client,
    ns: &str,
    name: &str,
    pve: &FakePve,
    secret: &str,
    spec: serde_json::Value,
) -> GoldenImage {
    let img = pve
        .add_image(Image::new(&format!("{name}.qcow2")).agent())
        .await;
    let mut value = json!({
        "apiVersion": "images.sombrero.dev/v1alpha1",
        "kind": "GoldenImage",
        "metadata": {"name": name},
        "spec": {
            "proxmox": {"secretRef": {"name": secret}},
            "os": "ubuntu-24.04",
            "type": "minimal",
            "source": {"cloudImage": {"url": img.url, "checksum": format!("sha256:{}", img.checksums["sha256"])}},
            "placement": {"node": pve.node},
            "provisioning": {"via": "guestAgent"},
            "validation": {"checks": ["boot", "guestAgent", "cloudInit", "packageDrift"], "timeout": "10m"},
            "output": {"configMapName": format!("{name}-template")},
        }
    });
    merge(&mut value["spec"], &spec);
    let gi: GoldenImage = serde_json::from_value(value).unwrap();
    Api::<GoldenImage>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &gi)
        .await
        .expect("create GoldenImage")
}

/// Waits until `check` holds for the object; panics with the last status.
pub async fn wait_for(
    client: &Client,
    ns: &str,
    name: &str,
    what: &str,
    timeout: Duration,
    check: impl Fn(&GoldenImage) -> bool,
) -> GoldenImage {
    let api: Api<GoldenImage> = Api::namespaced(client.clone(), ns);
    let start = Instant::now();
    loop {
        let gi = api.get(name).await.expect("get GoldenImage");
        if check(&gi) {
            return gi;
        }
        if start.elapsed() > timeout {
            panic!("timed out waiting for {what}; status: {:#?}", gi.status);
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// (status, reason, message) of a condition.
pub fn condition(gi: &GoldenImage, type_: &str) -> Option<(String, String, String)> {
    let st = gi.status.as_ref()?;
    find_condition(&st.conditions, type_)
        .map(|c| (c.status.clone(), c.reason.clone(), c.message.clone()))
}

pub fn is_ready(gi: &GoldenImage) -> bool {
    condition(gi, "Ready").is_some_and(|c| c.0 == "True")
}

/// The status describes the current generation.
pub fn observed(gi: &GoldenImage) -> bool {
    gi.status
        .as_ref()
        .is_some_and(|s| s.observed_generation == gi.metadata.generation)
}

/// A spec change that needs a new build (the VM's cores).
pub async fn change_spec(client: &Client, ns: &str, name: &str, cores: u32) {
    Api::<GoldenImage>::namespaced(client.clone(), ns)
        .patch(
            name,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"hardware": {"cores": cores}}})),
        )
        .await
        .expect("patch GoldenImage");
}

/// Events about `name`: (type, reason, message).
pub async fn events(client: &Client, ns: &str, name: &str) -> Vec<(String, String, String)> {
    let api: Api<Event> = Api::namespaced(client.clone(), ns);
    api.list(&ListParams::default().fields(&format!("involvedObject.name={name}")))
        .await
        .expect("list Events")
        .items
        .into_iter()
        .map(|e| {
            (
                e.type_.unwrap_or_default(),
                e.reason.unwrap_or_default(),
                e.message.unwrap_or_default(),
            )
        })
        .collect()
}

/// A client of the fake with the full token, built the way the controller builds it from a
/// Secret, to look at what the controller left on Proxmox.
pub fn pve_client(pve: &FakePve) -> proxmox::Client {
    let data: BTreeMap<String, String> = [
        ("url", pve.url.clone()),
        ("tokenId", pve.token_id.clone()),
        ("tokenSecret", pve.token_secret.clone()),
        ("caCert", pve.ca_pem.clone()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let config = controller::connection::config_from_secret(&data, "test", false).unwrap();
    proxmox::Client::new(config).unwrap()
}

/// A kubeconfig for a `sombrero controller` subprocess: the admin one, impersonating the
/// chart's ServiceAccount (`as:`), as [`controller_client`] does in-process. Written into the
/// control plane's directory as `kubeconfig-<release>`.
pub fn kubeconfig_as(cp: &ControlPlane, rbac: &ChartRbac) -> std::path::PathBuf {
    let mut kc = kube::config::Kubeconfig::read_from(&cp.kubeconfig).expect("read kubeconfig");
    for user in &mut kc.auth_infos {
        if let Some(auth) = user.auth_info.as_mut() {
            auth.impersonate = Some(rbac.username());
        }
    }
    let path = cp
        .kubeconfig
        .with_file_name(format!("kubeconfig-{}", rbac.release));
    std::fs::write(
        &path,
        serde_yaml::to_string(&kc).expect("kubeconfig as YAML"),
    )
    .expect("write kubeconfig");
    path
}

/// `sombrero controller` as a subprocess, so it can be SIGKILLed, as the chart runs it
/// ([`kubeconfig_as`]: the chart's ServiceAccount; watching the chart's namespace; no leader
/// election) with short resync, requeue and poll. It is held at a `read` in `sh` until
/// [`ControllerProcess::go`]: its pid is known (and a trap armed with it) before it sends
/// anything; `exec` keeps the pid. Its log goes to `log`.
pub struct ControllerProcess {
    pub child: tokio::process::Child,
    pub pid: u32,
}

impl ControllerProcess {
    /// `bin`: the `sombrero` binary (`env!("CARGO_BIN_EXE_sombrero")` in a test).
    pub fn spawn(
        bin: &str,
        kubeconfig: &std::path::Path,
        rbac: &ChartRbac,
        log: &std::path::Path,
    ) -> Self {
        let ns = &rbac.namespace;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .expect("controller log");
        let child = tokio::process::Command::new("sh")
            .args(["-c", "read _ && exec \"$0\" \"$@\""])
            .arg(bin)
            .args([
                "controller",
                "--namespace",
                ns,
                "--controller-namespace",
                ns,
                "--leader-election",
                "false",
                "--metrics-addr",
                "127.0.0.1:0",
                "--identity",
                "crash-test",
                "--resync-seconds",
                "2",
                "--requeue-seconds",
                "5",
                "--poll-seconds",
                "1",
                "--log-format",
                "text",
            ])
            .env("KUBECONFIG", kubeconfig)
            .env("RUST_LOG", "sombrero=info,kube=warn")
            .env_remove("PROXMOX_URL")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .expect("start sombrero controller");
        let pid = child.id().expect("pid");
        ControllerProcess { child, pid }
    }

    /// Lets it run.
    pub async fn go(&mut self) {
        use tokio::io::AsyncWriteExt;
        let mut stdin = self.child.stdin.take().expect("stdin");
        stdin
            .write_all(b"go\n")
            .await
            .expect("start the controller");
    }

    /// Waits (at most `timeout`) for it to end; whether it was SIGKILLed.
    pub async fn killed_within(&mut self, timeout: Duration) -> bool {
        use std::os::unix::process::ExitStatusExt;
        match tokio::time::timeout(timeout, self.child.wait()).await {
            Ok(status) => status.expect("wait").signal() == Some(9),
            Err(_) => false,
        }
    }

    pub async fn kill(mut self) {
        let _ = self.child.kill().await;
    }
}
