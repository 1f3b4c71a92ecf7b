//! `TemplateVersion`: one template of an image as the controller and retention see it, gathered
//! from the inventory (tags, `protection`, linked clones) and the description marker.

use std::cmp::Ordering;

use chrono::{DateTime, NaiveDate, NaiveTime, Utc};
use serde::{Deserialize, Serialize};

use super::marker::{Marker, Owner, Ownership, Role, ValidationRecord, ownership};
use super::tags::TagSet;

/// Validation state of a template, without the details the marker keeps.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum ValidationStatus {
    /// Not validated yet (validation running or not started).
    #[default]
    Pending,
    Passed,
    Failed,
}

impl From<&ValidationRecord> for ValidationStatus {
    fn from(record: &ValidationRecord) -> Self {
        match record {
            ValidationRecord::Pending => Self::Pending,
            ValidationRecord::Passed { .. } => Self::Passed,
            ValidationRecord::Failed { .. } => Self::Failed,
        }
    }
}

impl From<ValidationStatus> for crate::api::golden_image::TemplateValidation {
    fn from(v: ValidationStatus) -> Self {
        match v {
            ValidationStatus::Pending => Self::Pending,
            ValidationStatus::Passed => Self::Passed,
            ValidationStatus::Failed => Self::Failed,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TemplateVersion {
    pub vmid: u32,
    pub name: String,
    pub node: String,
    pub build_date: NaiveDate,
    pub build_number: u16,
    pub validation: ValidationStatus,
    /// Carries the image's channel tag (the current latest validated template).
    pub latest: bool,
    /// Carries the `archived` tag (retired in `tag` mode, still on Proxmox).
    #[serde(default)]
    pub archived: bool,
    /// `protection=1` in the VM config.
    pub protected: bool,
    /// VMIDs whose disks reference this template's base volumes (linked clones), and running
    /// validation clones.
    #[serde(default)]
    pub in_use_by: Vec<u32>,
    /// Carries our marker written for this VMID as a template's (see `marker::ownership`).
    pub owned: bool,
    /// The owner its marker names (whether or not `owned`); `None`: no readable marker.
    /// Whether that owner is a given policy's is the retention plan's call.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<Owner>,
    /// When the template was made, if known; more precise than `build_date` for age rules.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created: Option<DateTime<Utc>>,
}

/// What the inventory knows about one template VM, to build a [`TemplateVersion`] from.
#[derive(Debug, Clone, Copy)]
pub struct VmFacts<'a> {
    pub vmid: u32,
    pub node: &'a str,
    pub name: &'a str,
    pub tags: &'a TagSet,
    /// The marker parsed from the description, if any.
    pub marker: Option<&'a Marker>,
    pub protected: bool,
    pub in_use_by: &'a [u32],
}

impl TemplateVersion {
    /// Builds the view from inventory facts. Build date, number and validation come from the
    /// marker (tags can be edited by anyone); latest and archived from the tags, as those are
    /// what consumers select on. `None` without a marker: such a VM has no build date to order
    /// by and is not ours anyway. A marker copied from another VMID gives `owned: false`.
    pub fn from_vm(facts: VmFacts<'_>) -> Option<Self> {
        let marker = facts.marker?;
        let owned = ownership(Some(marker), facts.vmid) == Ownership::Ours(Role::Template);
        Some(Self {
            vmid: facts.vmid,
            name: facts.name.to_string(),
            node: facts.node.to_string(),
            build_date: marker.metadata.build_date,
            build_number: marker.metadata.build_number,
            validation: ValidationStatus::from(&marker.metadata.validation),
            latest: facts.tags.is_latest(),
            archived: facts.tags.is_archived(),
            protected: facts.protected,
            in_use_by: facts.in_use_by.to_vec(),
            owned,
            owner: Some(marker.owner.clone()),
            created: marker.metadata.created_at,
        })
    }

    /// A template without a readable marker, as retention lists it ("not ours"): it has no
    /// build date, so it gets the earliest one and sorts after every marked template.
    pub fn unmarked(vmid: u32, node: &str, name: &str, tags: &TagSet, protected: bool) -> Self {
        Self {
            vmid,
            name: name.to_string(),
            node: node.to_string(),
            build_date: NaiveDate::MIN,
            build_number: 0,
            validation: ValidationStatus::Pending,
            latest: tags.is_latest(),
            archived: tags.is_archived(),
            protected,
            in_use_by: Vec::new(),
            owned: false,
            owner: None,
            created: None,
        }
    }

    pub fn validated(&self) -> bool {
        self.validation == ValidationStatus::Passed
    }

    pub fn in_use(&self) -> bool {
        !self.in_use_by.is_empty()
    }

    /// When the template was made: `created`, else the start of its build day (UTC), which
    /// makes it look older by less than a day at most.
    pub fn created_at(&self) -> DateTime<Utc> {
        self.created
            .unwrap_or_else(|| self.build_date.and_time(NaiveTime::MIN).and_utc())
    }

    /// Newest first: by build date, then build number, then VMID (so equal builds, which should
    /// not exist, still order the same way every time).
    pub fn cmp_newest_first(&self, other: &Self) -> Ordering {
        (other.build_date, other.build_number, other.vmid).cmp(&(
            self.build_date,
            self.build_number,
            self.vmid,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn version(vmid: u32, date: (i32, u32, u32), build: u16) -> TemplateVersion {
        TemplateVersion {
            vmid,
            name: format!("t-{vmid}"),
            node: "pve1".into(),
            build_date: NaiveDate::from_ymd_opt(date.0, date.1, date.2).expect("date"),
            build_number: build,
            validation: ValidationStatus::Passed,
            latest: false,
            archived: false,
            protected: false,
            in_use_by: vec![],
            owned: true,
            owner: None,
            created: None,
        }
    }

    #[test]
    fn ordering_newest_first() {
        let mut v = [
            version(3, (2025, 1, 1), 1),
            version(1, (2025, 1, 2), 1),
            version(2, (2025, 1, 1), 2),
            version(4, (2025, 1, 1), 2),
        ];
        v.sort_by(TemplateVersion::cmp_newest_first);
        assert_eq!(v.iter().map(|t| t.vmid).collect::<Vec<_>>(), [1, 4, 2, 3]);
    }

    #[test]
    fn created_at_falls_back_to_build_day() {
        let v = version(1, (2025, 1, 18), 1);
        assert_eq!(v.created_at().to_rfc3339(), "2025-01-18T00:00:00+00:00");
        assert!(v.validated() && !v.in_use());
    }

    #[test]
    fn from_vm_facts() {
        let marker = crate::image::marker::tests::sample_marker();
        let tags = TagSet::parse("sombrero;sombrero-latest;validated");
        let facts = VmFacts {
            vmid: 8024,
            node: "pve1",
            name: "ubuntu-24.04-minimal-20250118-001",
            tags: &tags,
            marker: Some(&marker),
            protected: true,
            in_use_by: &[201],
        };
        let v = TemplateVersion::from_vm(facts).unwrap();
        assert!(v.owned && v.latest && v.validated() && v.protected && v.in_use());
        assert!(!v.archived);
        assert_eq!(
            (v.build_date, v.build_number),
            (marker.metadata.build_date, 1)
        );
        // A consumer's clone carries the same marker: not ours.
        let clone = TemplateVersion::from_vm(VmFacts { vmid: 201, ..facts }).unwrap();
        assert!(!clone.owned);
        // A build VM is not a template version we may retire.
        let build = marker.retarget(Role::Build, 8024);
        assert!(
            !TemplateVersion::from_vm(VmFacts {
                marker: Some(&build),
                ..facts
            })
            .unwrap()
            .owned
        );
        assert!(
            TemplateVersion::from_vm(VmFacts {
                marker: None,
                ..facts
            })
            .is_none()
        );
    }

    #[test]
    fn status_from_record() {
        assert_eq!(
            ValidationStatus::from(&ValidationRecord::Pending),
            ValidationStatus::Pending
        );
        assert_eq!(
            ValidationStatus::from(&ValidationRecord::Failed {
                at: Utc::now(),
                reason: "x".into()
            }),
            ValidationStatus::Failed
        );
    }
}
