//! The hand-off for Terraform and CI: the seed's JSON,
//! `{"template_id": "8024", "template_name": "ubuntu-24.04-minimal-20250118-001"}`, plus the node.

use serde::{Deserialize, Serialize};

/// `template_id` is a string, as in the seed, so Terraform can pass it on without conversion.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TerraformOutput {
    pub template_id: String,
    pub template_name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
}

impl TerraformOutput {
    pub fn new(vmid: u32, name: impl Into<String>, node: Option<String>) -> Self {
        Self {
            template_id: vmid.to_string(),
            template_name: name.into(),
            node,
        }
    }

    /// The VMID as a number, when `template_id` holds one.
    pub fn vmid(&self) -> Option<u32> {
        self.template_id.parse().ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_the_seed_json() {
        let out = TerraformOutput::new(8024, "ubuntu-24.04-minimal-20250118-001", None);
        assert_eq!(
            serde_json::to_string(&out).unwrap(),
            r#"{"template_id":"8024","template_name":"ubuntu-24.04-minimal-20250118-001"}"#
        );
        let with_node = TerraformOutput::new(8024, "x", Some("pve1".into()));
        let json = serde_json::to_string(&with_node).unwrap();
        assert_eq!(
            json,
            r#"{"template_id":"8024","template_name":"x","node":"pve1"}"#
        );
        let back: TerraformOutput = serde_json::from_str(&json).unwrap();
        assert_eq!(back, with_node);
        assert_eq!(back.vmid(), Some(8024));
    }
}
