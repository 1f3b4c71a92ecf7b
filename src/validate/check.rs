//! The checks a validation can run, their fixed order and what each needs first.

use std::fmt;

/// One validation check. The spec names them in camelCase (`guestAgent`, `packageDrift`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Check {
    /// The clone starts and Proxmox reports it running.
    Boot,
    /// The QEMU guest agent answers a ping.
    GuestAgent,
    /// `cloud-init status --wait` reports `done`.
    CloudInit,
    /// The SSH service is active; where the request asks, a TCP connect / SSH login succeeds.
    Ssh,
    /// Installed packages = baseline + allowed extras.
    PackageDrift,
}

impl Check {
    /// Every check, in the order they run.
    pub const ALL: [Check; 5] = [
        Check::Boot,
        Check::GuestAgent,
        Check::CloudInit,
        Check::Ssh,
        Check::PackageDrift,
    ];

    /// The name used in the spec and in `status.lastValidation`.
    pub fn as_str(self) -> &'static str {
        match self {
            Check::Boot => "boot",
            Check::GuestAgent => "guestAgent",
            Check::CloudInit => "cloudInit",
            Check::Ssh => "ssh",
            Check::PackageDrift => "packageDrift",
        }
    }

    pub fn parse(name: &str) -> Option<Check> {
        Check::ALL.into_iter().find(|c| c.as_str() == name)
    }

    /// Whether the check talks to the guest through the agent (`exec`), so an agent that never
    /// answered fails it at once instead of waiting out its own timeout.
    pub fn needs_agent(self) -> bool {
        matches!(self, Check::CloudInit | Check::Ssh | Check::PackageDrift)
    }
}

impl fmt::Display for Check {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The checks of `spec.checks` in run order, de-duplicated. An unknown name is an error naming
/// it (the CRD refuses them, but a CLI run reads YAML without the API server's rules).
pub fn plan_checks<S: AsRef<str>>(names: &[S]) -> Result<Vec<Check>, String> {
    let mut wanted = Vec::new();
    for name in names {
        let name = name.as_ref();
        match Check::parse(name) {
            Some(c) => wanted.push(c),
            None => {
                return Err(format!(
                    "unknown check {name:?} in validation.checks: use boot, guestAgent, cloudInit, ssh or packageDrift"
                ));
            }
        }
    }
    if wanted.is_empty() {
        return Err(
            "validation.checks is empty: list at least one of boot, guestAgent, cloudInit, ssh, packageDrift (or set validation.enabled: false)"
                .into(),
        );
    }
    Ok(Check::ALL
        .into_iter()
        .filter(|c| wanted.contains(c))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_match_the_crd() {
        for c in Check::ALL {
            assert_eq!(Check::parse(c.as_str()), Some(c));
        }
        // Same set as the CRD accepts (the CRD lists them in another order).
        let mut names: Vec<&str> = Check::ALL.iter().map(|c| c.as_str()).collect();
        let mut crd = crate::api::golden_image::CHECK_NAMES.to_vec();
        names.sort_unstable();
        crd.sort_unstable();
        assert_eq!(names, crd);
    }

    #[test]
    fn plan_orders_and_dedups() {
        assert_eq!(
            plan_checks(&["packageDrift", "boot", "boot"]).unwrap(),
            vec![Check::Boot, Check::PackageDrift]
        );
        let err = plan_checks(&["boot", "Ping"]).unwrap_err();
        assert!(
            err.contains("\"Ping\"") && err.contains("validation.checks"),
            "{err}"
        );
        assert!(plan_checks::<&str>(&[]).is_err());
    }
}
