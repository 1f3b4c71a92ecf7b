//! The provisioning steps as command lines (pure). Each step is one command so a failure names
//! it; over SSH a non-root user gets `sudo -n` (cloud-init's default user has passwordless sudo).

use crate::api::golden_image::{Provisioning, ProvisioningChannel};
use crate::image::dpkg;

/// Packages and services every image gets, whatever the spec says.
pub const REQUIRED: [&str; 2] = ["qemu-guest-agent", "cloud-init"];

/// The manifest command: dpkg's state, name and version per package ([`dpkg`]: the same query
/// validation's drift check runs, so both sides count the same packages as installed).
pub fn manifest_command() -> String {
    dpkg::query_line()
}

/// One step: a short name for errors and progress, and the shell line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    pub name: String,
    pub line: String,
    /// Exit codes that count as success (cloud-init's 2 is "degraded", still booted).
    pub ok_codes: &'static [i64],
    /// An upgrade or install: packages apt kept back or removed are reported.
    pub apt_report: bool,
}

impl Step {
    fn new(name: impl Into<String>, line: impl Into<String>) -> Self {
        Step {
            name: name.into(),
            line: line.into(),
            ok_codes: &[0],
            apt_report: false,
        }
    }

    fn apt_report(self) -> Self {
        Step {
            apt_report: true,
            ..self
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

/// apt without questions, as an unattended security rebuild must run it: no debconf prompts;
/// a config file edited in the image (by cloud-init, a spec command) keeps the local version
/// when the package ships a new one (`--force-confdef` takes dpkg's default, `--force-confold`
/// decides where there is none), and so do files managed by ucf (`sshd_config` on Debian) with
/// `UCF_FORCE_CONFFOLD`; untouched config files get the package's new version as always.
const APT: &str = "DEBIAN_FRONTEND=noninteractive UCF_FORCE_CONFFOLD=1 apt-get -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold";

/// The upgrade. Plain `upgrade` keeps back an upgrade that needs a package not yet installed:
/// a new kernel is a new package (`linux-image-6.1.0-57-cloud-amd64` behind the metapackage
/// `linux-image-cloud-amd64`), so a monthly security rebuild shipped the old kernel (seen on a
/// real Debian 12 guest, issue 13). `upgrade --with-new-pkgs` kept it back as well there (apt
/// 2.6, recorded in `tests/transcripts/debian-12/build.json`); `full-upgrade`, whose resolver
/// may add new packages, installs it (measured by the probe). It may also
/// remove an installed package to resolve a conflict: the build reports every removal
/// ([`removed`]), and the install step that follows puts back anything the spec requires.
pub const UPGRADE: &str = "full-upgrade -y";

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
        steps.push(
            Step::new(
                format!("apt-get {UPGRADE}"),
                root(p, &format!("{APT} {UPGRADE}")),
            )
            .apt_report(),
        );
    }
    let mut packages: Vec<String> = REQUIRED.iter().map(|s| s.to_string()).collect();
    for pkg in &p.packages {
        if !packages.contains(pkg) {
            packages.push(pkg.clone());
        }
    }
    steps.push(
        Step::new(
            format!("apt-get install -y {}", packages.join(" ")),
            root(p, &format!("{APT} install -y {}", packages.join(" "))),
        )
        .apt_report(),
    );
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

/// Parses the manifest command's output: sorted, de-duplicated `name=version` lines of the
/// installed packages only (not `rc`: removed with config files left, see [`dpkg`]).
pub fn parse_manifest(stdout: &str) -> Vec<String> {
    let mut v: Vec<String> = dpkg::parse(stdout)
        .into_iter()
        .filter(|e| e.installed)
        .filter_map(|e| Some(format!("{}={}", e.name, e.version?)))
        .collect();
    v.sort();
    v.dedup();
    v
}

/// The names of an apt output block: `header` on a line, then the names indented on the
/// lines after it (apt wraps long lists).
fn apt_block(stdout: &str, header: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut inside = false;
    for line in stdout.lines() {
        if line.trim_start().starts_with(header) {
            inside = true;
        } else if inside && line.starts_with(' ') {
            names.extend(
                line.split_whitespace()
                    .map(|n| n.trim_end_matches('*').to_string()),
            );
        } else {
            inside = false;
        }
    }
    names
}

/// The packages apt kept back (`The following packages have been kept back:`).
pub fn kept_back(stdout: &str) -> Vec<String> {
    apt_block(stdout, "The following packages have been kept back")
}

/// The packages apt removed (`The following packages will be REMOVED:`).
pub fn removed(stdout: &str) -> Vec<String> {
    apt_block(stdout, "The following packages will be REMOVED")
}

/// `sha256:<hex>` over the manifest lines joined with newlines.
pub fn manifest_digest(manifest: &[String]) -> String {
    use sha2::{Digest, Sha256};
    format!(
        "sha256:{}",
        hex::encode(Sha256::digest(manifest.join("\n").as_bytes()))
    )
}

/// The last `n` lines of a command's output that say something (not empty, not only the dots
/// `cloud-init status --wait` prints while it waits).
pub fn tail(text: &str, n: usize) -> Vec<String> {
    let lines: Vec<&str> = text
        .lines()
        .filter(|l| !l.trim().trim_matches('.').is_empty())
        .collect();
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
        assert_eq!(
            lines[2],
            "sudo -n DEBIAN_FRONTEND=noninteractive UCF_FORCE_CONFFOLD=1 apt-get \
             -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold \
             full-upgrade -y"
        );
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
        // A Debian 12 guest after `autoremove` of an old kernel: its `rc` line is not installed.
        let out = "ii \tb\t1\nii \ta\t2\n\nii \ta\t2\nrc \tlinux-image-6.1.0-50-cloud-amd64\t6.1.0-50\n\
                   un \tnever\t\nii \tnoversion\t\n";
        let m = parse_manifest(out);
        assert_eq!(m, vec!["a=2", "b=1"]);
        assert!(manifest_digest(&m).starts_with("sha256:"));
        assert_eq!(
            manifest_command(),
            "dpkg-query -W -f='${db:Status-Abbrev}\\t${Package}\\t${Version}\\n'"
        );
        assert_eq!(tail("1\n2\n\n3\n", 2), vec!["2", "3"]);
        assert_eq!(tail("....\nstatus: error\n", 2), vec!["status: error"]);
    }

    #[test]
    fn kept_back_packages() {
        let out = "Reading package lists...\nCalculating upgrade...\n\
                   The following packages have been kept back:\n  linux-image-cloud-amd64 foo\n  bar\n\
                   The following packages will be upgraded:\n  libc6\n\
                   1 upgraded, 0 newly installed, 0 to remove and 3 not upgraded.\n";
        assert_eq!(kept_back(out), ["linux-image-cloud-amd64", "foo", "bar"]);
        assert!(
            kept_back("0 upgraded, 0 newly installed, 0 to remove and 0 not upgraded.\n")
                .is_empty()
        );
        let out = "The following packages will be REMOVED:\n  linux-image-6.1.0-50-cloud-amd64* old\n\
                   The following NEW packages will be installed:\n  linux-image-6.1.0-57-cloud-amd64\n";
        assert_eq!(removed(out), ["linux-image-6.1.0-50-cloud-amd64", "old"]);
        assert!(kept_back(out).is_empty());
    }
}
