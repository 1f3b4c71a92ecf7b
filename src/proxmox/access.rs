//! `GET /access/permissions`: the token's effective privileges on a path, as Proxmox computes
//! them (ACLs on the path and its parents, pools, and for a privilege-separated token the
//! intersection with its user's privileges). Every token may read its own.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::Value;

use super::client::{Client, Params};
use super::error::Result;

impl Client {
    /// The privileges this token holds on `path` (`/vms`, `/storage/local`, ...). PVE answers
    /// `{path: {privilege: propagate}}`; only the entry for `path` itself counts (the propagate
    /// flag matters for children, not for the path asked about).
    pub async fn effective_privileges(&self, path: &str) -> Result<BTreeSet<String>> {
        let answer: BTreeMap<String, Value> = self
            .get(&["access", "permissions"], &Params::new().set("path", path))
            .await?;
        Ok(privileges_on(&answer, path))
    }
}

/// The privilege names of `answer[path]` (an object of privilege -> 0/1).
fn privileges_on(answer: &BTreeMap<String, Value>, path: &str) -> BTreeSet<String> {
    answer
        .get(path)
        .and_then(Value::as_object)
        .map(|privs| privs.keys().cloned().collect())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn reads_the_entry_of_the_path_asked_about() {
        let answer: BTreeMap<String, Value> = serde_json::from_value(json!({
            "/vms": {"VM.Audit": 1, "VM.Allocate": 0},
            "/": {"Sys.Audit": 1}
        }))
        .unwrap();
        assert_eq!(
            privileges_on(&answer, "/vms"),
            BTreeSet::from(["VM.Allocate".to_string(), "VM.Audit".to_string()])
        );
        assert!(privileges_on(&answer, "/storage/local").is_empty());
        let empty: BTreeMap<String, Value> = serde_json::from_value(json!({"/vms": {}})).unwrap();
        assert!(privileges_on(&empty, "/vms").is_empty());
    }
}
