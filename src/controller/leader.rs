//! Leader election with a Lease (kube-lease-manager): with several replicas exactly one acts.
//! The others wait; the leader that loses its Lease stops and exits, so it can never act next
//! to a new leader.

use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::Options;

type LeaseTask = JoinHandle<kube_lease_manager::Result<kube_lease_manager::LeaseManager>>;

/// Waits until this replica holds the Lease.
pub async fn acquire(
    client: &kube::Client,
    opts: &Options,
) -> Result<(watch::Receiver<bool>, LeaseTask), String> {
    let manager = kube_lease_manager::LeaseManagerBuilder::new(client.clone(), &opts.lease_name)
        .with_namespace(&opts.controller_namespace)
        .with_identity(&opts.identity)
        .with_duration(15)
        .with_grace(5)
        .build()
        .await
        .map_err(|e| {
            format!(
                "cannot set up the leader Lease {}/{}: {e}",
                opts.controller_namespace, opts.lease_name
            )
        })?;
    let (mut rx, task) = manager.watch().await;
    tracing::info!(lease = %opts.lease_name, identity = %opts.identity, "waiting for leadership");
    while !*rx.borrow_and_update() {
        rx.changed().await.map_err(|_| {
            "the Lease manager stopped before this replica became leader".to_string()
        })?;
    }
    tracing::info!(identity = %opts.identity, "became leader");
    Ok((rx, task))
}

/// Resolves when leadership is lost (or the Lease manager stopped).
pub async fn lost(mut rx: watch::Receiver<bool>) {
    loop {
        if rx.changed().await.is_err() || !*rx.borrow_and_update() {
            tracing::warn!("leadership lost");
            return;
        }
    }
}
