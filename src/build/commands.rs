//! The provisioning steps as command lines (pure). Each step is one command so a failure names
//! it; over SSH a non-root user gets `sudo -n` (cloud-init's default user has passwordless sudo).

use crate::api::golden_image::{Provisioning, ProvisioningChannel};

/// Packages and services every image gets, whatever the spec says.
pub const REQUIRED: [&str; 2] = ["qemu-guest-agent", "cloud-init"];

/// The manifest command: one `name=version` per line.
pub const MANIFEST_COMMAND: &str = "dpkg-query -W -f='${Package}=${Version}\\n'";

/// One step: a short name for errors and progress, and the shell line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    pub name: String,
    pub line: String,
    /// Exit codes that count as success (cloud-init's 2 is "degraded", still booted).
    pub ok_codes: &'static [i64],
}

impl Step {
    fn new(name: impl Into<String>, line: impl Into<String>) -> Self {
        Step {
            name: name.into(),
            line: line.into(),
            ok_codes: &[0],
        }
    }
}

/// Whether commands need `sudo` (SSH as a user other than root).
pub fn needs_sudo(p: &Provisioning) -> bool {
    p.via == ProvisioningChannel::Ssh && p.ssh.user != "root"
}

fn root(p: &Provisioning, line: &str) -> String {
    if needs_sudo(p) {
        format!("sudo -n {line}")
    } else {
        line.to_string()
    }
}

/// Single-quotes a string for `sh`.
pub fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

const APT: &str = "DEBIAN_FRONTEND=noninteractive apt-get -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold";

/// The seed's steps, in order, up to (not including) the manifest and the clean-up.
pub fn install_steps(p: &Provisioning) -> Vec<Step> {
    let mut steps = vec![Step {
        ok_codes: &[0, 2],
        ..Step::new(
            "cloud-init status --wait",
            root(p, "cloud-init status --wait"),
        )
    }];
    steps.push(Step::new("apt-get update", root(p, "apt-get update")));
    if p.upgrade {
        steps.push(Step::new(
            "apt-get upgrade -y",
            root(p, &format!("{APT} upgrade -y")),
        ));
    }
    let mut packages: Vec<String> = REQUIRED.iter().map(|s| s.to_string()).collect();
    for pkg in &p.packages {
        if !packages.contains(pkg) {
            packages.push(pkg.clone());
        }
    }
    steps.push(Step::new(
        format!("apt-get install -y {}", packages.join(" ")),
        root(p, &format!("{APT} install -y {}", packages.join(" "))),
    ));
    let mut services: Vec<String> = REQUIRED.iter().map(|s| s.to_string()).collect();
    for s in &p.services {
        if !services.contains(s) {
            services.push(s.clone());
        }
    }
    steps.push(Step::new(
        format!("systemctl enable {}", services.join(" ")),
        root(p, &format!("systemctl enable {}", services.join(" "))),
    ));
    for (i, c) in p.commands.iter().enumerate() {
        let line = if needs_sudo(p) {
            format!("sudo -n sh -c {}", sh_quote(c))
        } else {
            c.clone()
        };
        steps.push(Step::new(format!("commands[{i}]: {}", one_line(c)), line));
    }
    steps.push(Step::new("apt-get clean", root(p, "apt-get clean")));
    steps.push(Step::new(
        "apt-get autoremove -y",
        root(p, &format!("{APT} autoremove -y")),
    ));
    steps
}

/// Makes the disk clean for cloning: cloud-init runs again in every clone, each clone gets its
/// own machine-id and SSH host keys, and the build key is gone.
pub fn clean_steps(p: &Provisioning) -> Vec<Step> {
    let mut steps = vec![
        Step::new("cloud-init clean", root(p, "cloud-init clean --logs")),
        Step::new(
            "truncate machine-id",
            root(p, "truncate -s 0 /etc/machine-id"),
        ),
        Step::new("remove SSH host keys", root(p, "rm -f /etc/ssh/ssh_host_*")),
    ];
    if p.via == ProvisioningChannel::Ssh {
        let home = if p.ssh.user == "root" {
            "/root".to_string()
        } else {
            format!("/home/{}", p.ssh.user)
        };
        steps.push(Step::new(
            "remove the build key",
            root(p, &format!("rm -f {home}/.ssh/authorized_keys")),
        ));
    }
    steps.push(Step::new("sync", "sync"));
    steps
}

fn one_line(s: &str) -> String {
    let first = s.lines().next().unwrap_or("");
    if first.chars().count() > 60 {
        format!("{}…", first.chars().take(60).collect::<String>())
    } else {
        first.to_string()
    }
}

/// Parses the manifest command's output: sorted, de-duplicated `name=version` lines.
pub fn parse_manifest(stdout: &str) -> Vec<String> {
    let mut v: Vec<String> = stdout
        .lines()
        .map(str::trim)
        .filter(|l| l.contains('=') && !l.starts_with('='))
        .map(str::to_string)
        .collect();
    v.sort();
    v.dedup();
    v
}

/// `sha256:<hex>` over the manifest lines joined with newlines.
pub fn manifest_digest(manifest: &[String]) -> String {
    use sha2::{Digest, Sha256};
    format!(
        "sha256:{}",
        hex::encode(Sha256::digest(manifest.join("\n").as_bytes()))
    )
}

/// The last `n` non-empty lines of a command's output.
pub fn tail(text: &str, n: usize) -> Vec<String> {
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(n)..]
        .iter()
        .map(|l| l.to_string())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seed_steps_in_order_with_sudo_for_ssh_users() {
        let mut p = Provisioning {
            commands: vec!["echo it's done".into()],
            packages: vec!["qemu-guest-agent".into(), "htop".into()],
            ..Provisioning::default()
        };
        let lines: Vec<String> = install_steps(&p).into_iter().map(|s| s.line).collect();
        assert!(lines[0].starts_with("sudo -n cloud-init status --wait"));
        assert_eq!(lines[1], "sudo -n apt-get update");
        assert!(lines[2].ends_with("upgrade -y"));
        assert!(
            lines[3].ends_with("install -y qemu-guest-agent cloud-init htop"),
            "{}",
            lines[3]
        );
        assert!(lines[4].ends_with("systemctl enable qemu-guest-agent cloud-init"));
        assert_eq!(lines[5], "sudo -n sh -c 'echo it'\\''s done'");
        assert!(lines[6].ends_with("apt-get clean") && lines[7].ends_with("autoremove -y"));
        p.via = ProvisioningChannel::GuestAgent;
        p.upgrade = false;
        let steps = install_steps(&p);
        assert!(steps.iter().all(|s| !s.line.starts_with("sudo")));
        assert!(!steps.iter().any(|s| s.name.contains("upgrade")));
        assert_eq!(steps[4].line, "echo it's done");
        assert!(!clean_steps(&p).iter().any(|s| s.name.contains("build key")));
        p.via = ProvisioningChannel::Ssh;
        assert!(
            clean_steps(&p)
                .iter()
                .any(|s| s.line == "sudo -n rm -f /home/sombrero/.ssh/authorized_keys")
        );
    }

    #[test]
    fn manifest_and_tail() {
        let m = parse_manifest("b=1\na=2\n\na=2\ngarbage\n");
        assert_eq!(m, vec!["a=2", "b=1"]);
        assert!(manifest_digest(&m).starts_with("sha256:"));
        assert_eq!(tail("1\n2\n\n3\n", 2), vec!["2", "3"]);
    }
}
