//! The package list as dpkg keeps it: the one query the build's manifest and validation's
//! drift check both run, and the one rule for which of its lines count as installed. Pure.
//!
//! `dpkg-query -W` also lists packages that are gone but left something behind: state `rc`
//! (removed, configuration files or a `postrm` kept, e.g. old kernels after `apt-get
//! autoremove`). They are not installed; counting them on one side only made a clean clone
//! "drift" (real Debian 12 guest, issue 13).

/// The `-f` format: dpkg's status abbreviation, name, version, tab-separated. dpkg-query
/// expands the `\t` and `\n` escapes itself, so the same text works with and without a shell.
pub const FORMAT: &str = "${db:Status-Abbrev}\\t${Package}\\t${Version}\\n";

/// The query as a program and its arguments (agent `exec`, no shell).
pub fn query_argv() -> [String; 3] {
    [
        "dpkg-query".to_string(),
        "-W".to_string(),
        format!("-f={FORMAT}"),
    ]
}

/// The query as a shell line (SSH, or `sh -c` through the agent).
pub fn query_line() -> String {
    format!("dpkg-query -W -f='{FORMAT}'")
}

/// One line of the query's output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub name: String,
    pub version: Option<String>,
    /// Files on disk (see [`is_installed`]).
    pub installed: bool,
}

/// Whether a status abbreviation (`ii `, `rc `, `iF `, ...) means the package's files are on
/// disk. The second letter is the state: `n` not installed, `c` config files only; every other
/// state (`i` installed, `U` unpacked, `F` half-configured, `H` half-installed, `W`/`t`
/// awaiting triggers) has files, whatever the first letter (the wanted state) says.
pub fn is_installed(abbrev: &str) -> bool {
    !matches!(abbrev.chars().nth(1), Some('n' | 'c') | None)
}

/// Parses the output of [`query_argv`] / [`query_line`]. A line with only a name (a plain
/// `dpkg-query -W -f='${Package}\n'`) counts as installed; empty lines are skipped.
pub fn parse(output: &str) -> Vec<Entry> {
    output
        .lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split('\t').collect();
            let (status, name, version) = match fields.as_slice() {
                [name] => ("ii", *name, None),
                [status, name] => (*status, *name, None),
                [status, name, version, ..] => (*status, *name, Some(version.trim())),
                [] => return None,
            };
            let name = name.trim();
            if name.is_empty() {
                return None;
            }
            Some(Entry {
                name: name.to_string(),
                version: version.filter(|v| !v.is_empty()).map(str::to_string),
                installed: is_installed(status.trim_end_matches('\r')),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states() {
        for (abbrev, installed) in [
            ("ii ", true),
            ("ii", true),
            ("iiR", true),
            ("ri ", true),
            ("hi ", true),
            ("iU ", true),
            ("iF ", true),
            ("iH ", true),
            ("iW ", true),
            ("it ", true),
            ("rc ", false),
            ("pc ", false),
            ("un ", false),
            ("pn ", false),
            ("i", false),
            ("", false),
        ] {
            assert_eq!(is_installed(abbrev), installed, "{abbrev:?}");
        }
    }

    #[test]
    fn parses_the_query_output_with_rc_lines() {
        // What a Debian 12 guest prints after `apt-get autoremove` of an old kernel.
        let out = "ii \tbash\t5.2.15-2+b7\nrc \tlinux-image-6.1.0-50-cloud-amd64\t6.1.0-50\n\
                   ii \tlinux-image-6.1.0-57-cloud-amd64\t6.1.0-57\nun \tgone\t\n\n\
                   iF \thalf\t1.0\nplain\n";
        let got = parse(out);
        let names: Vec<(&str, Option<&str>, bool)> = got
            .iter()
            .map(|e| (e.name.as_str(), e.version.as_deref(), e.installed))
            .collect();
        assert_eq!(
            names,
            [
                ("bash", Some("5.2.15-2+b7"), true),
                ("linux-image-6.1.0-50-cloud-amd64", Some("6.1.0-50"), false),
                ("linux-image-6.1.0-57-cloud-amd64", Some("6.1.0-57"), true),
                ("gone", None, false),
                ("half", Some("1.0"), true),
                ("plain", None, true),
            ]
        );
    }

    #[test]
    fn the_query_is_the_same_with_and_without_a_shell() {
        let argv = query_argv();
        assert_eq!(argv[..2], ["dpkg-query", "-W"]);
        assert_eq!(
            argv[2],
            "-f=${db:Status-Abbrev}\\t${Package}\\t${Version}\\n"
        );
        assert_eq!(
            query_line(),
            "dpkg-query -W -f='${db:Status-Abbrev}\\t${Package}\\t${Version}\\n'"
        );
    }
}
