//! Package drift: what a validation clone has installed against the build's baseline manifest
//! plus the spec's allowed extras. Pure.

use std::collections::BTreeSet;

use crate::image::dpkg;

/// The guest command that lists packages ([`crate::image::dpkg`], the same query as the
/// build's manifest). Run without a shell.
pub fn dpkg_query() -> [String; 3] {
    dpkg::query_argv()
}

/// Packages added and removed, by name, sorted.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PackageDrift {
    /// Installed, but neither in the baseline nor allowed.
    pub added: Vec<String>,
    /// In the baseline, but not installed.
    pub removed: Vec<String>,
}

impl PackageDrift {
    pub fn is_clean(&self) -> bool {
        self.added.is_empty() && self.removed.is_empty()
    }

    /// A message for the report, short enough for a status field: at most `limit` names per
    /// side, then a count.
    pub fn message(&self, limit: usize) -> String {
        if self.is_clean() {
            return "installed packages match the baseline".into();
        }
        let list = |names: &[String]| {
            let shown: Vec<&str> = names.iter().take(limit).map(String::as_str).collect();
            let more = names.len().saturating_sub(limit);
            if more > 0 {
                format!("{} (+{more} more)", shown.join(", "))
            } else {
                shown.join(", ")
            }
        };
        let mut parts = Vec::new();
        if !self.added.is_empty() {
            parts.push(format!("{} added: {}", self.added.len(), list(&self.added)));
        }
        if !self.removed.is_empty() {
            parts.push(format!(
                "{} removed: {}",
                self.removed.len(),
                list(&self.removed)
            ));
        }
        format!(
            "packages drifted from the baseline: {} (allow extras with validation.allowedExtraPackages)",
            parts.join("; ")
        )
    }
}

/// A package name as compared: lower-case, without `:arch` or `=version`.
pub fn normalize_package(name: &str) -> String {
    let name = name.trim();
    let name = name.split_once('=').map_or(name, |(n, _)| n);
    let name = name.split_once(':').map_or(name, |(n, _)| n);
    name.to_ascii_lowercase()
}

/// Installed packages from [`dpkg_query`] output, by name. Lines whose state says not
/// installed (`un`, config files only `rc`) are skipped, as the build's manifest skips them.
pub fn parse_installed(output: &str) -> BTreeSet<String> {
    dpkg::parse(output)
        .into_iter()
        .filter(|e| e.installed)
        .map(|e| normalize_package(&e.name))
        .collect()
}

/// Compares installed packages with baseline + allowed extras. An allowed package that is
/// missing is fine (it is allowed, not required).
pub fn compute_drift<I, B, A>(installed: I, baseline: B, allowed: A) -> PackageDrift
where
    I: IntoIterator,
    I::Item: AsRef<str>,
    B: IntoIterator,
    B::Item: AsRef<str>,
    A: IntoIterator,
    A::Item: AsRef<str>,
{
    let set = |it: &mut dyn Iterator<Item = String>| -> BTreeSet<String> { it.collect() };
    let installed = set(&mut installed.into_iter().map(|p| normalize_package(p.as_ref())));
    let baseline = set(&mut baseline.into_iter().map(|p| normalize_package(p.as_ref())));
    let allowed = set(&mut allowed.into_iter().map(|p| normalize_package(p.as_ref())));
    PackageDrift {
        added: installed
            .iter()
            .filter(|p| !baseline.contains(*p) && !allowed.contains(*p))
            .cloned()
            .collect(),
        removed: baseline.difference(&installed).cloned().collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parses_dpkg_output() {
        let out = "ii \tbash\t5.2\nii \tcloud-init\t22.4\nrc \told-kernel\t6.1.0-50\nun \tgone\t\n\
                   ii \tlibc6:amd64\t2.36\niF \thalf\t1\n\n";
        let got: Vec<String> = parse_installed(out).into_iter().collect();
        assert_eq!(got, ["bash", "cloud-init", "half", "libc6"]);
        let plain: Vec<String> = parse_installed("a\nb\n").into_iter().collect();
        assert_eq!(plain, ["a", "b"]);
    }

    #[test]
    fn drift_by_name() {
        let d = compute_drift(
            ["bash", "cloud-init", "htop", "curl", "qemu-guest-agent"],
            ["bash", "cloud-init", "qemu-guest-agent", "vim"],
            ["curl", "jq=1.7"],
        );
        assert_eq!(d.added, ["htop"]);
        assert_eq!(d.removed, ["vim"]);
        assert!(!d.is_clean());
        let m = d.message(10);
        assert!(
            m.contains("1 added: htop") && m.contains("1 removed: vim"),
            "{m}"
        );
        let clean = compute_drift(["a", "b"], ["a", "B"], Vec::<String>::new());
        assert!(clean.is_clean());
        assert_eq!(clean.message(3), "installed packages match the baseline");
    }

    #[test]
    fn long_lists_are_cut() {
        let installed: Vec<String> = (0..30).map(|i| format!("p{i:02}")).collect();
        let d = compute_drift(&installed, Vec::<String>::new(), Vec::<String>::new());
        let m = d.message(3);
        assert!(m.contains("30 added: p00, p01, p02 (+27 more)"), "{m}");
    }

    #[test]
    fn normalizes_names() {
        assert_eq!(normalize_package(" LibC6:amd64 "), "libc6");
        assert_eq!(normalize_package("jq=1.7.1-3"), "jq");
    }

    proptest! {
        #[test]
        fn installed_equal_to_baseline_never_drifts(pkgs in proptest::collection::btree_set("[a-z0-9][a-z0-9+.-]{0,12}", 0..20)) {
            prop_assert!(compute_drift(&pkgs, &pkgs, Vec::<String>::new()).is_clean());
        }

        #[test]
        fn added_and_removed_are_disjoint_and_explain_the_difference(
            installed in proptest::collection::btree_set("[a-e]", 0..5),
            baseline in proptest::collection::btree_set("[a-e]", 0..5),
            allowed in proptest::collection::btree_set("[a-e]", 0..3),
        ) {
            let d = compute_drift(&installed, &baseline, &allowed);
            for p in &d.added {
                prop_assert!(installed.contains(p) && !baseline.contains(p) && !allowed.contains(p));
            }
            for p in &d.removed {
                prop_assert!(baseline.contains(p) && !installed.contains(p));
            }
        }
    }
}
