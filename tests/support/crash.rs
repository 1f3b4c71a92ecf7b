//! The invariants of the crash tests (a build killed or its answers lost, then run to the end),
//! shared by tests/integration/builder.rs and controller_crash.rs.

use sombrero::proxmox::{Client, VmConfig};

/// A VM that was there before the run, with its config and whether it ran.
pub type Foreign = (u32, VmConfig, bool);

/// Whether `vmid` is one of `foreign`; if so, asserts that its config and power state are as
/// before (nothing foreign touched).
pub async fn is_untouched_foreign(
    c: &Client,
    node: &str,
    vmid: u32,
    cfg: &VmConfig,
    foreign: &[Foreign],
    when: &str,
) -> bool {
    let Some((_, before, running)) = foreign.iter().find(|f| f.0 == vmid) else {
        return false;
    };
    assert_eq!(cfg.digest, before.digest, "{when}: VM {vmid} was changed");
    assert_eq!(
        c.vm_status(node, vmid).await.unwrap().status == "running",
        *running,
        "{when}: VM {vmid} was started or stopped"
    );
    true
}

/// Every foreign VM is still there.
pub async fn foreign_still_there(c: &Client, node: &str, foreign: &[Foreign], when: &str) {
    for (vmid, ..) in foreign {
        assert!(
            c.vm_status(node, *vmid).await.is_ok(),
            "{when}: VM {vmid} is gone"
        );
    }
}

/// Sorts `names` and asserts one template per build number, consecutive from the first.
pub fn assert_consecutive(names: &mut [String], when: &str) {
    names.sort();
    assert!(!names.is_empty(), "{when}: no template");
    let (stem, first) = names[0].rsplit_once('-').unwrap();
    let first: usize = first.parse().unwrap();
    let want: Vec<String> = (first..first + names.len())
        .map(|n| format!("{stem}-{n:03}"))
        .collect();
    assert_eq!(names, want, "{when}: one template per number, consecutive");
}
