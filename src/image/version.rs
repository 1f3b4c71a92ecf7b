//! `TemplateVersion`: one template of an image as the controller and retention see it, gathered
//! from the inventory (tags, `protection`, linked clones) and the description marker.

use std::cmp::Ordering;

use chrono::{DateTime, NaiveDate, NaiveTime, Utc};
use serde::{Deserialize, Serialize};

use super::marker::ValidationRecord;

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
    /// Carries our marker written for this VMID (see `marker::ownership`).
    pub owned: bool,
    /// When the template was made, if known; more precise than `build_date` for age rules.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created: Option<DateTime<Utc>>,
}

impl TemplateVersion {
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
