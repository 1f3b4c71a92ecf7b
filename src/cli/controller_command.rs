//! `sombrero controller`: run the Kubernetes controller.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Args;

use super::exit;
use crate::controller::{
    self, Options, connection::DefaultConnection, context::Settings, jobs::Limits,
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
    /// Watch only these namespaces: repeat the flag or separate with commas (default: all
    /// namespaces). With namespaces given, the controller needs Roles in exactly those.
    #[arg(
        long = "namespace",
        env = "SOMBRERO_WATCH_NAMESPACE",
        value_delimiter = ',',
        value_name = "NAMESPACE"
    )]
    pub namespaces: Vec<String>,
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
        let namespaces = watch_namespaces(&self.namespaces)?;
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
            namespaces,
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

/// The `--namespace` values, trimmed and de-duplicated in order; each must be a namespace name
/// (a DNS label), so a typo fails at start instead of watching nothing.
fn watch_namespaces(given: &[String]) -> Result<Vec<String>, String> {
    let mut out: Vec<String> = Vec::new();
    for ns in given.iter().map(|s| s.trim()) {
        let label = !ns.is_empty()
            && ns.len() <= 63
            && ns
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !ns.starts_with('-')
            && !ns.ends_with('-');
        if !label {
            return Err(format!(
                "--namespace {ns:?} is not a namespace name (lowercase letters, digits and '-', at most 63); list several as --namespace=a,b"
            ));
        }
        if !out.iter().any(|o| o == ns) {
            out.push(ns.to_string());
        }
    }
    Ok(out)
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
    match controller::run(client, opts, Arc::new(controller::runner::EngineRunner)).await {
        Ok(()) => ExitCode::from(exit::OK),
        Err(e) => {
            tracing::error!(error = %e, "controller stopped");
            ExitCode::from(exit::FAILURE)
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: ControllerArgs,
    }

    fn namespaces(argv: &[&str]) -> Result<Vec<String>, String> {
        let cli = Cli::try_parse_from(std::iter::once("sombrero").chain(argv.iter().copied()))
            .map_err(|e| e.to_string())?;
        cli.args.options("default").map(|o| o.namespaces)
    }

    #[test]
    fn watch_namespaces_from_a_list_or_repeated_flags() {
        // (argv, the namespaces or a part of the error)
        type Case<'a> = (&'a [&'a str], Result<Vec<&'a str>, &'a str>);
        let table: &[Case] = &[
            (&[], Ok(vec![])),
            (&["--namespace=images"], Ok(vec!["images"])),
            (&["--namespace=a,b"], Ok(vec!["a", "b"])),
            (
                &["--namespace", "a", "--namespace", "b"],
                Ok(vec!["a", "b"]),
            ),
            (&["--namespace=a,b,a"], Ok(vec!["a", "b"])),
            (
                &["--namespace=Images"],
                Err("\"Images\" is not a namespace name"),
            ),
            (&["--namespace=a,"], Err("\"\" is not a namespace name")),
            (&["--namespace=-a"], Err("\"-a\" is not a namespace name")),
        ];
        for (argv, want) in table {
            match (namespaces(argv), want) {
                (Ok(have), Ok(want)) => assert_eq!(&have, want, "{argv:?}"),
                (Err(e), Err(want)) => assert!(e.contains(want), "{argv:?}: {e}"),
                (have, want) => panic!("{argv:?}: got {have:?}, want {want:?}"),
            }
        }
    }
}
