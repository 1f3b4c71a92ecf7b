//! After a lost answer: find out what Proxmox did before deciding.
//!
//! A task-starting call (`create`, `start`, `stop`, `template`, `delete`, `download-url`) whose
//! answer was lost may have started its task. It is never simply repeated: the node's task list
//! is asked for a task of that type on that object started by our token since just before the
//! call. Found, it is waited for like the answer's UPID would have been; not found, the call did
//! not run and is made again (once). Config writes whose repetition is harmless are repeated by
//! the client itself (`proxmox::retry::config_write`).

use std::future::Future;
use std::ops::ControlFlow;
use std::time::{Duration, Instant};

use crate::poll::poll_until;
use crate::proxmox::{self, Client, DeleteVm, PollSchedule, TaskOutcome, Upid, VmConfig};

/// Seconds before the call that a task found in the node's list may have started at: the
/// node's clock and ours differ a little.
const CLOCK_SLACK_SECS: i64 = 30;

/// What a task-starting call is about, to find its task after a lost answer.
pub struct TaskCall<'a> {
    pub node: &'a str,
    /// The VMID to list the node's tasks by (`None`: storage tasks such as `download`).
    pub vmid: Option<u32>,
    /// The task type: `qmcreate`, `qmstart`, `qmstop`, `qmshutdown`, `qmtemplate`, `qmdestroy`,
    /// `download`, ...
    pub task_type: &'a str,
    /// The UPID's id field: the VMID, the file name of a download.
    pub id: String,
}

/// Makes `call` (which starts a task, or answers `None` when PVE finished synchronously) and
/// waits for its task, at most `timeout`. A lost answer is followed by a look at the node's
/// tasks: the task found is waited for; none found, `call` is made once more.
pub async fn run_task<F, Fut>(
    client: &Client,
    what: &TaskCall<'_>,
    timeout: Duration,
    call: F,
) -> proxmox::Result<Option<TaskOutcome>>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = proxmox::Result<Option<Upid>>>,
{
    run_task_traced(client, what, timeout, call)
        .await
        .map(|(outcome, _)| outcome)
}

/// Where the task [`run_task_traced`] waited for came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TaskOrigin {
    /// The UPID came in the answer to our own call: the task is ours.
    Answered,
    /// Found in the node's task list after a lost answer: by type, object, token and time,
    /// so in theory another client's with the same token.
    FoundAfterLostAnswer,
}

/// [`run_task`], also saying where the task came from.
pub async fn run_task_traced<F, Fut>(
    client: &Client,
    what: &TaskCall<'_>,
    timeout: Duration,
    mut call: F,
) -> proxmox::Result<(Option<TaskOutcome>, TaskOrigin)>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = proxmox::Result<Option<Upid>>>,
{
    let since = call_time();
    let (upid, origin) = match call().await {
        Ok(u) => (u, TaskOrigin::Answered),
        Err(e) if e.outcome_unknown() => {
            tracing::warn!(task = what.task_type, id = %what.id, error = %e, "answer lost; looking for the task");
            match find_task(client, what, since, timeout).await? {
                Some(u) => (Some(u), TaskOrigin::FoundAfterLostAnswer),
                None => (call().await?, TaskOrigin::Answered),
            }
        }
        Err(e) => return Err(e),
    };
    let outcome = match upid {
        Some(u) => Some(client.wait_task(&u, timeout).await?),
        None => None,
    };
    Ok((outcome, origin))
}

/// Hard-stops `vmid` and waits for the task. `Ok(false)`: the VM is gone.
pub async fn stop_vm(
    client: &Client,
    node: &str,
    vmid: u32,
    timeout: Duration,
) -> proxmox::Result<bool> {
    let what = TaskCall {
        node,
        vmid: Some(vmid),
        task_type: "qmstop",
        id: vmid.to_string(),
    };
    let stop = run_task(client, &what, timeout, move || async move {
        client.stop_vm(node, vmid).await.map(Some)
    });
    match stop.await {
        Ok(_) => Ok(true),
        Err(e) if e.is_not_found() => Ok(false),
        Err(e) => Err(e),
    }
}

/// What [`destroy_vm`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Destroyed {
    /// Destroyed now; the task's warnings.
    Now { warnings: u32 },
    /// It did not exist (any more): after a lost answer, what the first call did.
    AlreadyGone,
}

/// Destroys `vmid` with `opts` and waits for the task. The one destroy of build VMs,
/// validation clones and retired templates; each caller checks ownership right before.
pub async fn destroy_vm(
    client: &Client,
    node: &str,
    vmid: u32,
    opts: DeleteVm,
    timeout: Duration,
) -> proxmox::Result<Destroyed> {
    let what = TaskCall {
        node,
        vmid: Some(vmid),
        task_type: "qmdestroy",
        id: vmid.to_string(),
    };
    let delete = run_task(client, &what, timeout, move || async move {
        client.delete_vm(node, vmid, opts).await.map(Some)
    });
    match delete.await {
        Ok(outcome) => Ok(Destroyed::Now {
            warnings: outcome.map_or(0, |o| o.warnings),
        }),
        Err(e) if e.is_not_found() => Ok(Destroyed::AlreadyGone),
        Err(e) => Err(e),
    }
}

/// The earliest start time (Unix seconds, node clock) of a task started by a call made now.
pub fn call_time() -> i64 {
    chrono::Utc::now().timestamp() - CLOCK_SLACK_SECS
}

/// The task this client started as `what` at `since` or later, from the node's task list,
/// read until it answers (the node may be briefly unreachable).
pub async fn find_task(
    client: &Client,
    what: &TaskCall<'_>,
    since: i64,
    timeout: Duration,
) -> proxmox::Result<Option<Upid>> {
    let deadline = Instant::now() + timeout;
    poll_until(deadline.into(), PollSchedule::default(), || async {
        match client
            .find_my_task(what.node, what.vmid, what.task_type, &what.id, since)
            .await
        {
            Ok(found) => ControlFlow::Break(Ok(found)),
            Err(e) if e.is_retryable() => ControlFlow::Continue(e),
            Err(e) => ControlFlow::Break(Err(e)),
        }
    })
    .await
    .unwrap_or_else(Err)
}

/// Locks held while a VM is being created: its tags and description are written only when
/// the task ends.
pub fn is_creation_lock(lock: Option<&str>) -> bool {
    matches!(lock, Some("create" | "clone"))
}

/// The VM's config once it is no longer being created (`None`: it does not exist), read
/// until then at most `timeout`; a node briefly unreachable is waited out too.
pub async fn settled_config(
    client: &Client,
    node: &str,
    vmid: u32,
    timeout: Duration,
) -> proxmox::Result<Option<VmConfig>> {
    let deadline = Instant::now() + timeout;
    poll_until(deadline.into(), PollSchedule::default(), || async {
        match client.vm_config(node, vmid).await {
            Ok(c) if !is_creation_lock(c.lock.as_deref()) => ControlFlow::Break(Ok(Some(c))),
            Ok(_) => ControlFlow::Continue(None),
            Err(e) if e.is_not_found() => ControlFlow::Break(Ok(None)),
            Err(e) if e.is_retryable() => ControlFlow::Continue(Some(e)),
            Err(e) => ControlFlow::Break(Err(e)),
        }
    })
    .await
    .unwrap_or_else(|retry| {
        Err(retry.unwrap_or_else(|| proxmox::Error::Timeout {
            request: format!("wait for VM {vmid} to be created"),
            message: format!("still locked after {}s", timeout.as_secs()),
        }))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn creation_locks() {
        assert!(is_creation_lock(Some("create")));
        assert!(is_creation_lock(Some("clone")));
        assert!(!is_creation_lock(Some("backup")));
        assert!(!is_creation_lock(None));
    }
}
