//! Privileges checked before acting: before the first write of a build, validation, promotion
//! or prune, the token's effective privileges (`GET /access/permissions?path=...`, one call per
//! path the run needs) are compared with what the run needs ([`table`]); a run missing any is
//! refused with each missing privilege, the path it is needed on, what for, and the `pveum`
//! commands that fix it. Nothing is written before, so a token without (say) `VM.Audit` no
//! longer creates a build VM it then cannot see.
//!
//! - [`table::image_needs`] / [`table::retention_needs`]: pure, from the spec and the version.
//! - [`missing`]: pure, needs against the privileges held.
//! - [`check`]: reads the version-independent needs' paths and returns [`Refusal`] or `Ok`.

pub mod table;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use crate::proxmox::{self, Client};
pub use table::{Grant, ImageRun, Need, cleanup_needs, image_needs, retention_needs, role_command};

/// Privileges held, by path.
pub type Held = BTreeMap<String, BTreeSet<String>>;

/// One privilege the token lacks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Missing {
    pub privilege: String,
    pub path: String,
    /// What the run needs it for (several needs may share one privilege).
    pub needed_for: Vec<String>,
    /// What PVE would also accept instead (`Sys.Audit, Sys.Modify on /`).
    pub alternatives: Vec<String>,
}

/// The privileges of `needs` not in `held`: for each need none of whose options is held in
/// full, the privileges of its first option that are missing. Merged by (path, privilege).
pub fn missing(needs: &[Need], held: &Held) -> Vec<Missing> {
    let has = |g: &Grant| {
        let on = held.get(&g.path);
        g.privileges
            .iter()
            .all(|p| on.is_some_and(|s| s.contains(*p)))
    };
    let mut out: Vec<Missing> = Vec::new();
    for need in needs {
        if need.options.iter().any(has) {
            continue;
        }
        let Some(first) = need.options.first() else {
            continue;
        };
        let alternatives: Vec<String> = need.options[1..]
            .iter()
            .map(|g| format!("{} on {}", g.privileges.join(" and "), g.path))
            .collect();
        for p in &first.privileges {
            if held.get(&first.path).is_some_and(|s| s.contains(*p)) {
                continue;
            }
            match out
                .iter_mut()
                .find(|m| m.privilege == *p && m.path == first.path)
            {
                Some(m) => {
                    if !m.needed_for.contains(&need.why) {
                        m.needed_for.push(need.why.clone());
                    }
                }
                None => out.push(Missing {
                    privilege: p.to_string(),
                    path: first.path.clone(),
                    needed_for: vec![need.why.clone()],
                    alternatives: alternatives.clone(),
                }),
            }
        }
    }
    out
}

/// Why a run was refused before it touched anything.
#[derive(Debug, Clone, thiserror::Error)]
pub enum PrivilegeError {
    #[error("{0}")]
    Insufficient(Refusal),
    /// The privileges could not be read.
    #[error("reading the token's privileges (GET /access/permissions): {0}")]
    Proxmox(#[source] proxmox::Error),
}

impl PrivilegeError {
    pub fn is_retryable(&self) -> bool {
        match self {
            PrivilegeError::Insufficient(_) => false,
            PrivilegeError::Proxmox(e) => e.is_retryable(),
        }
    }
}

/// The missing privileges of a token, with the fix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub token_id: String,
    pub version: proxmox::PveVersion,
    pub missing: Vec<Missing>,
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "the API token {} lacks {} privilege(s) this run needs; nothing was changed:",
            self.token_id,
            self.missing.len()
        )?;
        for m in &self.missing {
            write!(
                f,
                "  {} on {}: to {}",
                m.privilege,
                m.path,
                m.needed_for.join("; ")
            )?;
            if !m.alternatives.is_empty() {
                write!(f, " (or instead: {})", m.alternatives.join(", "))?;
            }
            writeln!(f)?;
        }
        let paths: BTreeSet<&str> = self.missing.iter().map(|m| m.path.as_str()).collect();
        writeln!(
            f,
            "fix (as root on a Proxmox node): create the role once with `{}`, then grant it{}:",
            role_command(self.version),
            if paths.len() > 1 { " on each path" } else { "" }
        )?;
        for p in &paths {
            writeln!(
                f,
                "  pveum acl modify {p} -token '{}' -role Sombrero",
                self.token_id
            )?;
        }
        write!(
            f,
            "(or once on / for everything; a privilege-separated token gets at most its user's privileges, so the user {} needs them too)",
            self.token_id.split('!').next().unwrap_or(&self.token_id)
        )
    }
}

/// Reads the token's privileges on every path `needs` mention and refuses when any is missing.
pub async fn check(client: &Client, needs: &[Need]) -> Result<(), PrivilegeError> {
    let held = held_on(client, needs).await?;
    let missing = missing(needs, &held);
    if missing.is_empty() {
        return Ok(());
    }
    let version = client
        .pve_version()
        .await
        .map_err(PrivilegeError::Proxmox)?;
    Err(PrivilegeError::Insufficient(Refusal {
        token_id: client.token_id().to_string(),
        version,
        missing,
    }))
}

/// The privileges held on the paths of `needs`, one `GET /access/permissions` per path: the
/// first option's path of each need, and an alternative's only when the paths read so far do
/// not meet the need ([`paths_to_read`]).
pub async fn held_on(client: &Client, needs: &[Need]) -> Result<Held, PrivilegeError> {
    let mut held = Held::new();
    loop {
        let paths = paths_to_read(needs, &held);
        if paths.is_empty() {
            return Ok(held);
        }
        for path in paths {
            let privs = client
                .effective_privileges(path)
                .await
                .map_err(PrivilegeError::Proxmox)?;
            held.insert(path.to_string(), privs);
        }
    }
}

/// The paths to read next: per need, its first option whose path is not read yet, unless an
/// option read already meets it (e.g. `Sys.AccessNetwork` on the node: `Sys.Audit` and
/// `Sys.Modify` on `/` need no read). Empty when every need is met or all its paths are read.
pub fn paths_to_read<'a>(needs: &'a [Need], held: &Held) -> BTreeSet<&'a str> {
    let meets = |g: &Grant| {
        held.get(&g.path)
            .is_some_and(|on| g.privileges.iter().all(|p| on.contains(*p)))
    };
    let mut out = BTreeSet::new();
    for need in needs {
        if need.options.iter().any(meets) {
            continue;
        }
        if let Some(g) = need.options.iter().find(|g| !held.contains_key(&g.path)) {
            out.insert(g.path.as_str());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn held(entries: &[(&str, &[&str])]) -> Held {
        entries
            .iter()
            .map(|(p, privs)| (p.to_string(), privs.iter().map(|s| s.to_string()).collect()))
            .collect()
    }

    fn need(options: &[(&str, &[&'static str])], why: &str) -> Need {
        Need {
            options: options
                .iter()
                .map(|(p, privs)| Grant {
                    path: p.to_string(),
                    privileges: privs.to_vec(),
                })
                .collect(),
            why: why.into(),
        }
    }

    #[test]
    fn an_alternative_path_is_read_only_when_the_first_does_not_meet_the_need() {
        let needs = [
            need(&[("/vms", &["VM.Audit"])], "list"),
            need(
                &[
                    ("/nodes/pve1", &["Sys.AccessNetwork"]),
                    ("/", &["Sys.Audit", "Sys.Modify"]),
                ],
                "download",
            ),
        ];
        let first: Vec<&str> = paths_to_read(&needs, &Held::new()).into_iter().collect();
        assert_eq!(first, ["/nodes/pve1", "/vms"]);
        // (held after the first reads, paths read next)
        let cases: [(Held, Vec<&str>); 3] = [
            (
                held(&[
                    ("/vms", &["VM.Audit"]),
                    ("/nodes/pve1", &["Sys.AccessNetwork"]),
                ]),
                vec![],
            ),
            (
                held(&[("/vms", &["VM.Audit"]), ("/nodes/pve1", &[])]),
                vec!["/"],
            ),
            (
                held(&[("/vms", &[]), ("/nodes/pve1", &[]), ("/", &["Sys.Audit"])]),
                vec![],
            ),
        ];
        for (i, (h, next)) in cases.into_iter().enumerate() {
            let got: Vec<&str> = paths_to_read(&needs, &h).into_iter().collect();
            assert_eq!(got, next, "case {i}");
        }
    }

    #[test]
    fn missing_privileges_are_named_with_path_and_purpose_and_merged() {
        let needs = [
            need(&[("/vms", &["VM.Allocate"])], "create"),
            need(&[("/vms", &["VM.Allocate"])], "delete"),
            need(&[("/vms", &["VM.Audit"])], "list"),
            need(
                &[
                    ("/nodes/pve1", &["Sys.AccessNetwork"]),
                    ("/", &["Sys.Audit", "Sys.Modify"]),
                ],
                "download",
            ),
        ];
        let m = missing(
            &needs,
            &held(&[("/vms", &["VM.Audit"]), ("/", &["Sys.Audit"])]),
        );
        assert_eq!(
            m,
            [
                Missing {
                    privilege: "VM.Allocate".into(),
                    path: "/vms".into(),
                    needed_for: vec!["create".into(), "delete".into()],
                    alternatives: vec![],
                },
                Missing {
                    privilege: "Sys.AccessNetwork".into(),
                    path: "/nodes/pve1".into(),
                    needed_for: vec!["download".into()],
                    alternatives: vec!["Sys.Audit and Sys.Modify on /".into()],
                },
            ]
        );
        // Any option held in full meets the need.
        let ok = held(&[
            ("/vms", &["VM.Audit", "VM.Allocate"]),
            ("/", &["Sys.Audit", "Sys.Modify"]),
        ]);
        assert!(missing(&needs, &ok).is_empty());
    }

    #[test]
    fn the_refusal_names_each_privilege_and_the_pveum_fix() {
        let r = Refusal {
            token_id: "ci@pve!build".into(),
            version: proxmox::PveVersion { major: 9, minor: 1 },
            missing: vec![
                Missing {
                    privilege: "VM.Audit".into(),
                    path: "/vms".into(),
                    needed_for: vec!["list VMs".into()],
                    alternatives: vec![],
                },
                Missing {
                    privilege: "SDN.Use".into(),
                    path: "/sdn/zones/localnetwork/vmbr0".into(),
                    needed_for: vec!["attach net0".into()],
                    alternatives: vec![],
                },
            ],
        };
        let text = r.to_string();
        assert!(text.contains("VM.Audit on /vms: to list VMs"), "{text}");
        assert!(
            text.contains("SDN.Use on /sdn/zones/localnetwork/vmbr0"),
            "{text}"
        );
        assert!(text.contains("pveum acl modify /vms -token 'ci@pve!build' -role Sombrero"));
        assert!(text.contains("pveum role add Sombrero -privs \"VM.Allocate"));
        assert!(text.contains("the user ci@pve needs them too"));
    }
}
