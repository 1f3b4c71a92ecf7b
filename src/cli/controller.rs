//! `sombrero controller`: run the Kubernetes controller.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Args;

use super::exit;
use crate::controller::{
    self, Options, builds::Limits, connection::DefaultConnection, context::Settings,
};
use crate::telemetry::{self, LogFormat};

#[derive(Args, Debug, Clone)]
pub struct ControllerArgs {
    /// Address of /metrics, /healthz and /readyz.
    #[arg(long, env = "SOMBRERO_METRICS_ADDR", default_value = "0.0.0.0:8080")]
    pub metrics_addr: SocketAddr,
    /// Only one replica acts; the others wait (a Lease in the controller's namespace).
    #[arg(long, env = "SOMBRERO_LEADER_ELECTION", default_value_t = true, action = clap::ArgAction::Set)]
    pub leader_election: bool,
    /// Name of the leader Lease.
    #[arg(long, default_value = "sombrero-controller")]
    pub lease_name: String,
    /// Watch only this namespace (default: all namespaces).
    #[arg(long, env = "SOMBRERO_WATCH_NAMESPACE")]
    pub namespace: Option<String>,
    /// The controller's own namespace (Lease, default Secret). Default: POD_NAMESPACE, else the
    /// kubeconfig's namespace.
    #[arg(long, env = "POD_NAMESPACE")]
    pub controller_namespace: Option<String>,
    /// This replica's identity in the Lease. Default: POD_NAME, else the host name.
    #[arg(long, env = "POD_NAME")]
    pub identity: Option<String>,
    /// Secret (in the controller's namespace) with the default Proxmox connection, for
    /// GoldenImages without spec.proxmox. Without it, PROXMOX_* from the environment is used.
    #[arg(long, env = "SOMBRERO_PROXMOX_SECRET")]
    pub proxmox_secret: Option<String>,
    /// Builds running at once, over all images.
    #[arg(long, default_value_t = 4)]
    pub max_concurrent_builds: usize,
    /// Builds running at once on one Proxmox node.
    #[arg(long, default_value_t = 2)]
    pub max_builds_per_node: usize,
    /// Seconds between Proxmox inventory lists (one per cluster, shared by all objects).
    #[arg(long, default_value_t = 60)]
    pub resync_seconds: u64,
    /// Seconds between reconciles of an object at steady state.
    #[arg(long, default_value_t = 300)]
    pub requeue_seconds: u64,
    /// Seconds between progress updates while a build runs.
    #[arg(long, default_value_t = 3)]
    pub poll_seconds: u64,
    /// Reconciles running at once.
    #[arg(long, default_value_t = 8)]
    pub concurrency: u16,
    /// Log filter (RUST_LOG wins when set), e.g. info or sombrero=debug,kube=warn.
    #[arg(long, env = "SOMBRERO_LOG_LEVEL", default_value = "info")]
    pub log_level: String,
    #[arg(long, value_enum, default_value_t = LogFormat::Json)]
    pub log_format: LogFormat,
}

impl ControllerArgs {
    /// Options for [`controller::run`], given the kube client's default namespace.
    pub fn options(&self, kube_namespace: &str) -> Result<Options, String> {
        let controller_namespace = self
            .controller_namespace
            .clone()
            .unwrap_or_else(|| kube_namespace.to_string());
        let default_connection = match &self.proxmox_secret {
            Some(name) => DefaultConnection::Secret {
                namespace: controller_namespace.clone(),
                name: name.clone(),
            },
            None if std::env::var_os(crate::proxmox::config::ENV_URL).is_some() => {
                DefaultConnection::Env(
                    crate::proxmox::Config::from_env()
                        .map_err(|e| format!("default Proxmox connection: {e}"))?,
                )
            }
            None => DefaultConnection::None,
        };
        if self.max_concurrent_builds == 0 || self.max_builds_per_node == 0 {
            return Err(
                "--max-concurrent-builds and --max-builds-per-node must be at least 1".into(),
            );
        }
        let mut settings = Settings::new(default_connection);
        settings.resync = Duration::from_secs(self.resync_seconds.max(1));
        settings.requeue = Duration::from_secs(self.requeue_seconds.max(1));
        settings.poll = Duration::from_secs(self.poll_seconds.max(1));
        Ok(Options {
            namespace: self.namespace.clone(),
            metrics_addr: self.metrics_addr,
            leader_election: self.leader_election,
            lease_name: self.lease_name.clone(),
            controller_namespace,
            identity: self.identity.clone().unwrap_or_else(hostname),
            limits: Limits {
                global: self.max_concurrent_builds,
                per_node: self.max_builds_per_node,
            },
            settings,
            concurrency: self.concurrency.max(1),
        })
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| format!("sombrero-{}", std::process::id()))
}

pub async fn run(args: &ControllerArgs) -> ExitCode {
    if let Err(e) = telemetry::init(&args.log_level, args.log_format) {
        eprintln!("error: {e}");
        return ExitCode::from(exit::INVALID_INPUT);
    }
    let client = match kube::Client::try_default().await {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "cannot reach Kubernetes: set KUBECONFIG or run in a pod");
            return ExitCode::from(exit::FAILURE);
        }
    };
    let opts = match args.options(client.default_namespace()) {
        Ok(o) => o,
        Err(e) => {
            tracing::error!(error = %e, "invalid flags");
            return ExitCode::from(exit::INVALID_INPUT);
        }
    };
    match controller::run(client, opts, Arc::new(controller::engine::Engine)).await {
        Ok(()) => ExitCode::from(exit::OK),
        Err(e) => {
            tracing::error!(error = %e, "controller stopped");
            ExitCode::from(exit::FAILURE)
        }
    }
}
