//! A real etcd + kube-apiserver for the integration tests: one per test binary, started on first
//! use on a loopback address with random ports, a generated CA, serving certificate and an admin
//! client certificate (`system:masters`). Tests get a fresh `kube::Client` (clients are bound to
//! the tokio runtime of the test that made them) and a namespace of their own.
//!
//! The binaries come from `scripts/test-tools.sh` (built from Go modules, cached in
//! `.cache/tools/bin`); `SOMBRERO_TOOLS_BIN` points elsewhere. A missing binary fails the test
//! with the command that builds it. The servers run under `control-plane.sh`, which holds our
//! stdin: when the test process ends, however it ends, they are stopped and their files removed.

use std::io::Read;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Namespace;
use kube::Client;
use kube::api::{Api, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};

/// The running control plane of this test binary.
pub struct ControlPlane {
    pub kubeconfig: PathBuf,
    pub tools_bin: PathBuf,
    pub dir: PathBuf,
    /// Held open for the life of the process: EOF tells the supervisor to stop.
    _stdin: Mutex<ChildStdin>,
    _child: Mutex<Child>,
}

static PLANE: OnceLock<ControlPlane> = OnceLock::new();
static NS_COUNTER: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

/// Repository root (tests run with the package root as working directory).
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Where the Go-built test tools live.
pub fn tools_bin() -> PathBuf {
    std::env::var_os("SOMBRERO_TOOLS_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join(".cache/tools/bin"))
}

/// Path of a Go-built test tool; panics with the fix when it is missing.
pub fn tool(name: &str) -> PathBuf {
    let path = tools_bin().join(name);
    assert!(
        path.is_file(),
        "test tool `{}` not found at {}.\nBuild the test tools with `scripts/test-tools.sh` \
         (needs Go 1.26; `make test` does it for you), or point SOMBRERO_TOOLS_BIN at a directory \
         holding etcd, kube-apiserver and kubectl.",
        name,
        path.display()
    );
    path
}

/// The shared control plane, started on first use.
pub fn control_plane() -> &'static ControlPlane {
    PLANE.get_or_init(|| start().unwrap_or_else(|e| panic!("cannot start kube-apiserver: {e}")))
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("no free loopback port")
}

fn write(path: &Path, contents: &str) -> Result<(), String> {
    std::fs::write(path, contents).map_err(|e| format!("write {}: {e}", path.display()))
}

fn start() -> Result<ControlPlane, String> {
    let etcd = tool("etcd");
    let apiserver = tool("kube-apiserver");
    let kubectl = tool("kubectl");
    let dir = tempfile::Builder::new()
        .prefix("sombrero-kube-")
        .tempdir()
        .map_err(|e| e.to_string())?
        .keep();
    let pki = dir.join("pki");
    std::fs::create_dir_all(&pki).map_err(|e| e.to_string())?;

    let addr = "127.0.0.1";
    let api_port = free_port();
    write_pki(&pki, addr)?;

    let server = format!("https://{addr}:{api_port}");
    let kubeconfig = dir.join("kubeconfig");
    write(
        &kubeconfig,
        &format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster:\n    server: {server}\n    \
             certificate-authority: {ca}\nusers:\n- name: admin\n  user:\n    client-certificate: {crt}\n    \
             client-key: {key}\ncontexts:\n- name: test\n  context:\n    cluster: test\n    user: admin\n    \
             namespace: default\ncurrent-context: test\n",
            ca = pki.join("ca.crt").display(),
            crt = pki.join("admin.crt").display(),
            key = pki.join("admin.key").display(),
        ),
    )?;

    let mut child = Command::new("bash")
        .arg(repo_root().join("tests/support/control-plane.sh"))
        .env("CP_ETCD", &etcd)
        .env("CP_APISERVER", &apiserver)
        .env("CP_DIR", &dir)
        .env("CP_ADDR", addr)
        .env("CP_ETCD_PORT", free_port().to_string())
        .env("CP_PEER_PORT", free_port().to_string())
        .env("CP_API_PORT", api_port.to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| format!("spawn control-plane.sh: {e}"))?;
    let stdin = child.stdin.take().ok_or("no stdin")?;

    // Ready when /readyz answers ok through the admin kubeconfig (proves TLS and client auth).
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!(
                "control plane exited early ({status}); see the logs above"
            ));
        }
        let out = Command::new(&kubectl)
            .args(["--kubeconfig"])
            .arg(&kubeconfig)
            .args(["get", "--raw", "/readyz", "--request-timeout=2s"])
            .output()
            .map_err(|e| format!("run kubectl: {e}"))?;
        if out.status.success() && String::from_utf8_lossy(&out.stdout).trim() == "ok" {
            break;
        }
        if Instant::now() > deadline {
            let last = String::from_utf8_lossy(&out.stderr);
            let mut log = String::new();
            if let Ok(mut f) = std::fs::File::open(dir.join("apiserver.log")) {
                let _ = f.read_to_string(&mut log);
            }
            let tail: Vec<&str> = log.lines().rev().take(30).collect();
            return Err(format!(
                "kube-apiserver not ready after 90s: {last}\napiserver log tail:\n{}",
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            ));
        }
        std::thread::sleep(Duration::from_millis(250));
    }

    Ok(ControlPlane {
        kubeconfig,
        tools_bin: tools_bin(),
        dir,
        _stdin: Mutex::new(stdin),
        _child: Mutex::new(child),
    })
}

/// CA, apiserver serving certificate, admin client certificate and service-account key.
fn write_pki(pki: &Path, addr: &str) -> Result<(), String> {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
        KeyPair, KeyUsagePurpose,
    };
    let err = |e: rcgen::Error| e.to_string();

    let ca_key = KeyPair::generate().map_err(err)?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).map_err(err)?;
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "sombrero-test-ca");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_cert = ca_params.self_signed(&ca_key).map_err(err)?;
    let issuer = Issuer::new(ca_params, ca_key);
    write(&pki.join("ca.crt"), &ca_cert.pem())?;

    let serving_key = KeyPair::generate().map_err(err)?;
    let mut serving =
        CertificateParams::new(vec!["localhost".to_string(), addr.to_string()]).map_err(err)?;
    serving
        .distinguished_name
        .push(DnType::CommonName, "kube-apiserver");
    serving.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let serving_cert = serving.signed_by(&serving_key, &issuer).map_err(err)?;
    write(&pki.join("serving.crt"), &serving_cert.pem())?;
    write(&pki.join("serving.key"), &serving_key.serialize_pem())?;

    let admin_key = KeyPair::generate().map_err(err)?;
    let mut admin = CertificateParams::new(Vec::<String>::new()).map_err(err)?;
    admin.distinguished_name.push(DnType::CommonName, "admin");
    admin
        .distinguished_name
        .push(DnType::OrganizationName, "system:masters");
    admin.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let admin_cert = admin.signed_by(&admin_key, &issuer).map_err(err)?;
    write(&pki.join("admin.crt"), &admin_cert.pem())?;
    write(&pki.join("admin.key"), &admin_key.serialize_pem())?;

    let sa_key = KeyPair::generate().map_err(err)?;
    write(&pki.join("sa.key"), &sa_key.serialize_pem())?;
    write(&pki.join("sa.pub"), &sa_key.public_key_pem())?;
    Ok(())
}

impl ControlPlane {
    /// A new client for the calling test's runtime.
    pub async fn client(&self) -> Client {
        let kc = Kubeconfig::read_from(&self.kubeconfig).expect("read kubeconfig");
        let config = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
            .await
            .expect("kubeconfig");
        Client::try_from(config).expect("kube client")
    }

    /// `kubectl` against this API server.
    pub fn kubectl(&self) -> Command {
        let mut cmd = Command::new(self.tools_bin.join("kubectl"));
        cmd.arg("--kubeconfig").arg(&self.kubeconfig);
        cmd
    }

    /// A fresh namespace `<prefix>-<n>` for one test.
    pub async fn namespace(&self, client: &Client, prefix: &str) -> String {
        let n = NS_COUNTER.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let name = format!("{prefix}-{}-{n}", std::process::id());
        let ns: Namespace = serde_json::from_value(serde_json::json!({
            "apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}
        }))
        .unwrap();
        Api::<Namespace>::all(client.clone())
            .create(&PostParams::default(), &ns)
            .await
            .expect("create namespace");
        name
    }

    /// Applies the checked-in CRDs (server-side) and waits until both are Established.
    pub fn install_crds(&self) {
        static DONE: OnceLock<()> = OnceLock::new();
        DONE.get_or_init(|| {
            let out = self
                .kubectl()
                .args([
                    "apply",
                    "--server-side",
                    "--field-manager=sombrero-tests",
                    "-f",
                ])
                .arg(repo_root().join("crds"))
                .output()
                .expect("run kubectl");
            assert!(
                out.status.success(),
                "CRDs refused by kube-apiserver:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
            let out = self
                .kubectl()
                .args(["wait", "--for=condition=Established", "--timeout=60s"])
                .args([
                    "crd/goldenimages.images.sombrero.dev",
                    "crd/templateretentions.images.sombrero.dev",
                ])
                .output()
                .expect("run kubectl");
            assert!(
                out.status.success(),
                "CRDs not Established:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        });
    }
}
