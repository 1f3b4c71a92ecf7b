//! Template names: `{os}-{type}-{YYYYMMDD}-{NNN}` by default, or a user's name template with the
//! same placeholders. Names are rendered, validated as Proxmox VM names, and parsed back into
//! (build date, build number) so the next build number can be derived from what Proxmox holds.

use std::fmt;
use std::str::FromStr;

use chrono::NaiveDate;
use thiserror::Error;

/// Placeholders a name template may use (without braces). The CRD validation reuses this list.
pub const NAME_PLACEHOLDERS: [&str; 4] = ["os", "type", "date", "build"];

/// What a name template may look like, as a pattern the CRD schema can reuse (`{date}` and
/// `{build}` being present is checked by [`NameTemplate::parse`]; a CEL rule can do the same).
pub const NAME_TEMPLATE_PATTERN: &str = r"^([A-Za-z0-9.-]|\{(os|type|date|build)\})+$";

/// The seed's naming scheme, e.g. `ubuntu-24.04-minimal-20250118-001`.
pub const DEFAULT_NAME_TEMPLATE: &str = "{os}-{type}-{date}-{build}";

/// Build numbers are three digits, per image per day.
pub const MIN_BUILD_NUMBER: u16 = 1;
pub const MAX_BUILD_NUMBER: u16 = 999;

/// PVE's `dns-name` format has no length limit of its own; 63 keeps names usable as host names
/// (a DNS label's limit) and readable in the UI.
pub const MAX_VM_NAME_LEN: usize = 63;

/// `{date}` renders as YYYYMMDD.
pub const DATE_FORMAT: &str = "%Y%m%d";

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum NamingError {
    #[error(
        "name template {template:?} uses unknown placeholder {{{placeholder}}}: allowed are {{os}}, {{type}}, {{date}} and {{build}}"
    )]
    UnknownPlaceholder {
        template: String,
        placeholder: String,
    },
    #[error(
        "name template {template:?} has an unmatched {brace:?} at byte {position}: placeholders look like {{os}}"
    )]
    UnbalancedBrace {
        template: String,
        brace: char,
        position: usize,
    },
    #[error(
        "name template {template:?} must contain {{{placeholder}}} exactly once (found {count}), so that every build gets its own name"
    )]
    PlaceholderCount {
        template: String,
        placeholder: &'static str,
        count: usize,
    },
    #[error(
        "name template {template:?} contains {character:?}: outside placeholders only letters, digits, '-' and '.' are allowed in a Proxmox VM name"
    )]
    InvalidTemplateCharacter { template: String, character: char },
    #[error("{name:?} is not a valid Proxmox VM name: {reason}")]
    InvalidVmName { name: String, reason: String },
    #[error(
        "build number {build} is out of range: it must be between {MIN_BUILD_NUMBER} and {MAX_BUILD_NUMBER}"
    )]
    BuildNumberOutOfRange { build: u32 },
    #[error(
        "all {MAX_BUILD_NUMBER} build numbers for {date} are used: wait until the next day (UTC) or remove templates built on {date}"
    )]
    BuildNumbersExhausted { date: NaiveDate },
}

/// One piece of a parsed name template.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    Literal(String),
    Os,
    Type,
    Date,
    Build,
}

/// A validated name template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NameTemplate {
    source: String,
    segments: Vec<Segment>,
}

impl Default for NameTemplate {
    fn default() -> Self {
        Self {
            source: DEFAULT_NAME_TEMPLATE.to_string(),
            segments: vec![
                Segment::Os,
                Segment::Literal("-".into()),
                Segment::Type,
                Segment::Literal("-".into()),
                Segment::Date,
                Segment::Literal("-".into()),
                Segment::Build,
            ],
        }
    }
}

impl fmt::Display for NameTemplate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.source)
    }
}

impl FromStr for NameTemplate {
    type Err = NamingError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl NameTemplate {
    /// Parses and validates a name template. `{date}` and `{build}` are required exactly once:
    /// without them two builds would share a name and names could not be parsed back.
    pub fn parse(template: &str) -> Result<Self, NamingError> {
        let segments = split_segments(template)?;
        for (placeholder, wanted) in [("date", Segment::Date), ("build", Segment::Build)] {
            let count = segments.iter().filter(|s| **s == wanted).count();
            if count != 1 {
                return Err(NamingError::PlaceholderCount {
                    template: template.to_string(),
                    placeholder,
                    count,
                });
            }
        }
        let parsed = Self {
            source: template.to_string(),
            segments,
        };
        // Literal placement errors (leading '-', "..") show up whatever os/type are: catch them now,
        // at apply time, rather than at the first build.
        let sample_date = NaiveDate::from_ymd_opt(2025, 1, 18).unwrap_or_default();
        parsed.render("a", "a", sample_date, MIN_BUILD_NUMBER)?;
        Ok(parsed)
    }

    pub fn as_str(&self) -> &str {
        &self.source
    }

    /// Renders the name of a build and checks it is a valid Proxmox VM name.
    pub fn render(
        &self,
        os: &str,
        image_type: &str,
        date: NaiveDate,
        build: u16,
    ) -> Result<String, NamingError> {
        check_build_number(u32::from(build))?;
        let mut name = String::new();
        for segment in &self.segments {
            match segment {
                Segment::Literal(text) => name.push_str(text),
                Segment::Os => name.push_str(os),
                Segment::Type => name.push_str(image_type),
                Segment::Date => name.push_str(&date.format(DATE_FORMAT).to_string()),
                Segment::Build => name.push_str(&format!("{build:03}")),
            }
        }
        validate_vm_name(&name)?;
        Ok(name)
    }

    /// Parses a name rendered by this template for this os/type back into (date, build number).
    /// Anything else (another image's name, a hand-made VM) gives `None`.
    pub fn parse_name(&self, name: &str, os: &str, image_type: &str) -> Option<(NaiveDate, u16)> {
        let mut rest = name;
        let mut date = None;
        let mut build = None;
        for segment in &self.segments {
            rest = match segment {
                Segment::Literal(text) => rest.strip_prefix(text.as_str())?,
                Segment::Os => rest.strip_prefix(os)?,
                Segment::Type => rest.strip_prefix(image_type)?,
                Segment::Date => {
                    let (digits, tail) = split_digits(rest, 8)?;
                    date = Some(NaiveDate::parse_from_str(digits, DATE_FORMAT).ok()?);
                    tail
                }
                Segment::Build => {
                    let (digits, tail) = split_digits(rest, 3)?;
                    let number: u16 = digits.parse().ok()?;
                    check_build_number(u32::from(number)).ok()?;
                    build = Some(number);
                    tail
                }
            };
        }
        if !rest.is_empty() {
            return None;
        }
        Some((date?, build?))
    }

    /// The next build number for `date`, from the names of this image's existing templates
    /// (names that do not parse are ignored).
    pub fn next_build_number<'a>(
        &self,
        existing_names: impl IntoIterator<Item = &'a str>,
        os: &str,
        image_type: &str,
        date: NaiveDate,
    ) -> Result<u16, NamingError> {
        next_build_number(
            existing_names
                .into_iter()
                .filter_map(|name| self.parse_name(name, os, image_type)),
            date,
        )
    }
}

/// Highest existing build number on `date` + 1 (1 when there is none). Gaps are not reused:
/// numbers only grow within a day, so a name never points at two different builds.
pub fn next_build_number(
    existing: impl IntoIterator<Item = (NaiveDate, u16)>,
    date: NaiveDate,
) -> Result<u16, NamingError> {
    let highest = existing
        .into_iter()
        .filter(|(d, _)| *d == date)
        .map(|(_, n)| n)
        .max()
        .unwrap_or(0);
    if highest >= MAX_BUILD_NUMBER {
        return Err(NamingError::BuildNumbersExhausted { date });
    }
    Ok(highest + 1)
}

/// Names this process handed out and whose VM Proxmox may not list yet, per Proxmox cluster.
/// Two builds started at once (two images with the same os and type, in two namespaces) read
/// the same listing; without this both would take the same number. Kept two days (a name
/// carries its date: older ones are never rendered again).
#[derive(Debug, Default)]
pub struct Claims(std::sync::Mutex<Vec<Claim>>);

#[derive(Debug)]
struct Claim {
    cluster: String,
    date: NaiveDate,
    name: String,
}

/// The claims of this process (the controller's jobs and a CLI run share it).
pub static CLAIMS: Claims = Claims(std::sync::Mutex::new(Vec::new()));

impl Claims {
    /// The next build number and name on `date` of `template` for `os`/`type` in the Proxmox
    /// cluster `cluster` (its URL), after every number in `used` (what Proxmox holds) and every
    /// name claimed there before; claims it.
    pub fn next(
        &self,
        cluster: &str,
        template: &NameTemplate,
        os: &str,
        image_type: &str,
        date: NaiveDate,
        used: impl IntoIterator<Item = (NaiveDate, u16)>,
    ) -> Result<(u16, String), NamingError> {
        let mut claimed = self.0.lock().unwrap_or_else(|e| e.into_inner());
        claimed.retain(|c| (date - c.date).num_days() < 2);
        let mine = claimed
            .iter()
            .filter(|c| c.cluster == cluster)
            .filter_map(|c| template.parse_name(&c.name, os, image_type));
        let number = next_build_number(used.into_iter().chain(mine), date)?;
        let name = template.render(os, image_type, date, number)?;
        claimed.push(Claim {
            cluster: cluster.to_string(),
            date,
            name: name.clone(),
        });
        Ok((number, name))
    }

    /// Gives a claim back once its build run ends: by then Proxmox lists its VM (and so its
    /// number) or the VM is gone and the number is free again.
    pub fn release(&self, cluster: &str, name: &str) {
        let mut claimed = self.0.lock().unwrap_or_else(|e| e.into_inner());
        claimed.retain(|c| !(c.cluster == cluster && c.name == name));
    }
}

/// Checks a name against PVE's `dns-name` format (labels of letters, digits and inner hyphens,
/// joined by dots) and our length limit.
pub fn validate_vm_name(name: &str) -> Result<(), NamingError> {
    let fail = |reason: String| {
        Err(NamingError::InvalidVmName {
            name: name.to_string(),
            reason,
        })
    };
    if name.is_empty() {
        return fail("it is empty".into());
    }
    if name.len() > MAX_VM_NAME_LEN {
        return fail(format!(
            "it is {} characters long, at most {MAX_VM_NAME_LEN} are allowed: use a shorter os, type or name template",
            name.len()
        ));
    }
    if let Some(bad) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || *c == '-' || *c == '.'))
    {
        return fail(format!(
            "it contains {bad:?}: only letters, digits, '-' and '.' are allowed"
        ));
    }
    for label in name.split('.') {
        if label.is_empty() {
            return fail("it has an empty part between dots (or starts/ends with a dot)".into());
        }
        if label.starts_with('-') || label.ends_with('-') {
            return fail(format!(
                "its part {label:?} starts or ends with '-': each dot-separated part must start and end with a letter or digit"
            ));
        }
    }
    Ok(())
}

fn check_build_number(build: u32) -> Result<(), NamingError> {
    if (u32::from(MIN_BUILD_NUMBER)..=u32::from(MAX_BUILD_NUMBER)).contains(&build) {
        Ok(())
    } else {
        Err(NamingError::BuildNumberOutOfRange { build })
    }
}

/// Splits off exactly `len` leading ASCII digits.
fn split_digits(s: &str, len: usize) -> Option<(&str, &str)> {
    let head = s.get(..len)?;
    head.bytes()
        .all(|b| b.is_ascii_digit())
        .then(|| (head, &s[len..]))
}

fn split_segments(template: &str) -> Result<Vec<Segment>, NamingError> {
    let mut segments = Vec::new();
    let mut literal = String::new();
    let mut chars = template.char_indices();
    while let Some((position, c)) = chars.next() {
        match c {
            '{' => {
                let mut placeholder = String::new();
                let mut closed = false;
                for (_, inner) in chars.by_ref() {
                    if inner == '}' {
                        closed = true;
                        break;
                    }
                    if inner == '{' {
                        break;
                    }
                    placeholder.push(inner);
                }
                if !closed {
                    return Err(NamingError::UnbalancedBrace {
                        template: template.to_string(),
                        brace: '{',
                        position,
                    });
                }
                let segment = match placeholder.as_str() {
                    "os" => Segment::Os,
                    "type" => Segment::Type,
                    "date" => Segment::Date,
                    "build" => Segment::Build,
                    _ => {
                        return Err(NamingError::UnknownPlaceholder {
                            template: template.to_string(),
                            placeholder,
                        });
                    }
                };
                if !literal.is_empty() {
                    segments.push(Segment::Literal(std::mem::take(&mut literal)));
                }
                segments.push(segment);
            }
            '}' => {
                return Err(NamingError::UnbalancedBrace {
                    template: template.to_string(),
                    brace: '}',
                    position,
                });
            }
            c if c.is_ascii_alphanumeric() || c == '-' || c == '.' => literal.push(c),
            c => {
                return Err(NamingError::InvalidTemplateCharacter {
                    template: template.to_string(),
                    character: c,
                });
            }
        }
    }
    if !literal.is_empty() {
        segments.push(Segment::Literal(literal));
    }
    Ok(segments)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn day(y: i32, m: u32, d: u32) -> NaiveDate {
        NaiveDate::from_ymd_opt(y, m, d).expect("valid test date")
    }

    #[test]
    fn default_template_renders_the_seed_example() {
        let t = NameTemplate::default();
        assert_eq!(t.as_str(), DEFAULT_NAME_TEMPLATE);
        assert_eq!(NameTemplate::parse(DEFAULT_NAME_TEMPLATE).unwrap(), t);
        let name = t
            .render("ubuntu-24.04", "minimal", day(2025, 1, 18), 1)
            .unwrap();
        assert_eq!(name, "ubuntu-24.04-minimal-20250118-001");
    }

    #[test]
    fn parse_name_round_trips_and_rejects_others() {
        let t = NameTemplate::default();
        assert_eq!(
            t.parse_name(
                "ubuntu-24.04-minimal-20250118-042",
                "ubuntu-24.04",
                "minimal"
            ),
            Some((day(2025, 1, 18), 42))
        );
        for other in [
            "debian-12-minimal-20250118-001",
            "ubuntu-24.04-minimal-20250118-1",
            "ubuntu-24.04-minimal-20250118-0001",
            "ubuntu-24.04-minimal-20250118-000",
            "ubuntu-24.04-minimal-20251318-001",
            "ubuntu-24.04-minimal-20250118-001-copy",
            "ubuntu-24.04-minimal",
            "",
        ] {
            assert_eq!(
                t.parse_name(other, "ubuntu-24.04", "minimal"),
                None,
                "{other}"
            );
        }
    }

    #[test]
    fn custom_template() {
        let t = NameTemplate::parse("golden.{os}.{date}{build}").unwrap();
        let name = t.render("debian-12", "x", day(2024, 12, 31), 7).unwrap();
        assert_eq!(name, "golden.debian-12.20241231007");
        assert_eq!(
            t.parse_name(&name, "debian-12", "x"),
            Some((day(2024, 12, 31), 7))
        );
    }

    #[test]
    fn template_errors_name_the_problem() {
        let err = NameTemplate::parse("{os}-{version}-{date}-{build}").unwrap_err();
        assert!(
            matches!(&err, NamingError::UnknownPlaceholder { placeholder, .. } if placeholder == "version")
        );
        assert!(err.to_string().contains("{version}"), "{err}");
        assert!(matches!(
            NameTemplate::parse("{os}-{date}").unwrap_err(),
            NamingError::PlaceholderCount {
                placeholder: "build",
                count: 0,
                ..
            }
        ));
        assert!(matches!(
            NameTemplate::parse("{date}-{build}-{build}").unwrap_err(),
            NamingError::PlaceholderCount {
                placeholder: "build",
                count: 2,
                ..
            }
        ));
        assert!(matches!(
            NameTemplate::parse("{os-{date}-{build}").unwrap_err(),
            NamingError::UnknownPlaceholder { .. } | NamingError::UnbalancedBrace { .. }
        ));
        assert!(matches!(
            NameTemplate::parse("{os}}-{date}-{build}").unwrap_err(),
            NamingError::UnbalancedBrace { brace: '}', .. }
        ));
        assert!(matches!(
            NameTemplate::parse("{date}-{build}-{os").unwrap_err(),
            NamingError::UnbalancedBrace { brace: '{', .. }
        ));
        assert!(matches!(
            NameTemplate::parse("{os}_{date}-{build}").unwrap_err(),
            NamingError::InvalidTemplateCharacter { character: '_', .. }
        ));
        assert!(matches!(
            NameTemplate::parse("-{date}-{build}").unwrap_err(),
            NamingError::InvalidVmName { .. }
        ));
        assert!(matches!(
            NameTemplate::parse("{date}..{build}").unwrap_err(),
            NamingError::InvalidVmName { .. }
        ));
    }

    #[test]
    fn render_rejects_bad_values() {
        let t = NameTemplate::default();
        let d = day(2025, 1, 18);
        assert!(matches!(
            t.render("Ubuntu 24.04", "minimal", d, 1),
            Err(NamingError::InvalidVmName { .. })
        ));
        assert!(matches!(
            t.render("ubuntu", "minimal", d, 0),
            Err(NamingError::BuildNumberOutOfRange { build: 0 })
        ));
        assert!(matches!(
            t.render("ubuntu", "minimal", d, 1000),
            Err(NamingError::BuildNumberOutOfRange { build: 1000 })
        ));
        let long = "a".repeat(50);
        let err = t.render(&long, "minimal", d, 1).unwrap_err();
        assert!(err.to_string().contains("at most 63"), "{err}");
    }

    #[test]
    fn vm_name_validation() {
        for ok in ["a", "ubuntu-24.04-minimal-20250118-001", "A1.b2", "x-y.z"] {
            assert_eq!(validate_vm_name(ok), Ok(()), "{ok}");
        }
        for bad in [
            "", "-a", "a-", "a.", ".a", "a..b", "a_b", "a b", "a/b", "ü", "a.-b",
        ] {
            assert!(validate_vm_name(bad).is_err(), "{bad}");
        }
        assert!(validate_vm_name(&"a".repeat(63)).is_ok());
        assert!(validate_vm_name(&"a".repeat(64)).is_err());
    }

    #[test]
    fn a_released_claim_frees_its_number() {
        let t = NameTemplate::default();
        let claims = Claims::default();
        let d = day(2026, 12, 1);
        let (n, name) = claims
            .next("pve-a", &t, "debian-12", "minimal", d, [])
            .unwrap();
        assert_eq!(n, 1);
        // Another cluster's release does not free it.
        claims.release("pve-b", &name);
        assert_eq!(
            claims
                .next("pve-a", &t, "debian-12", "minimal", d, [])
                .unwrap()
                .0,
            2
        );
        claims.release("pve-a", &name);
        claims.release("pve-a", "debian-12-minimal-20261201-002");
        assert_eq!(
            claims
                .next("pve-a", &t, "debian-12", "minimal", d, [])
                .unwrap()
                .0,
            1
        );
    }

    #[test]
    fn claims_give_concurrent_builds_distinct_numbers() {
        let t = NameTemplate::default();
        let claims = Claims::default();
        let d = day(2026, 12, 1);
        // Five images with the same os/type read the same listing (one template, 001).
        let listing = [(d, 1)];
        let names: Vec<String> = (0..5)
            .map(|_| {
                claims
                    .next("pve-a", &t, "ubuntu-24.04", "minimal", d, listing)
                    .unwrap()
                    .1
            })
            .collect();
        assert_eq!(
            names,
            [
                "ubuntu-24.04-minimal-20261201-002",
                "ubuntu-24.04-minimal-20261201-003",
                "ubuntu-24.04-minimal-20261201-004",
                "ubuntu-24.04-minimal-20261201-005",
                "ubuntu-24.04-minimal-20261201-006",
            ]
        );
        // Another os/type has its own sequence.
        assert_eq!(
            claims
                .next("pve-a", &t, "debian-12", "minimal", d, [])
                .unwrap(),
            (1, "debian-12-minimal-20261201-001".to_string())
        );
        // Another Proxmox cluster has its own names.
        assert_eq!(
            claims
                .next("pve-b", &t, "ubuntu-24.04", "minimal", d, listing)
                .unwrap()
                .0,
            2
        );
        // A listing that already shows a claimed VM does not count it twice.
        assert_eq!(
            claims
                .next("pve-a", &t, "ubuntu-24.04", "minimal", d, [(d, 1), (d, 6)])
                .unwrap()
                .0,
            7
        );
        // The next day starts over; claims older than two days are dropped.
        let later = day(2026, 12, 4);
        assert_eq!(
            claims
                .next("pve-a", &t, "ubuntu-24.04", "minimal", later, [])
                .unwrap()
                .0,
            1
        );
        assert_eq!(claims.0.lock().unwrap().len(), 1);
    }

    #[test]
    fn next_build_number_counts_per_day() {
        let d = day(2025, 1, 18);
        assert_eq!(next_build_number([], d), Ok(1));
        assert_eq!(
            next_build_number([(d, 1), (d, 3), (day(2025, 1, 17), 20)], d),
            Ok(4)
        );
        assert_eq!(next_build_number([(day(2025, 1, 17), 20)], d), Ok(1));
        assert_eq!(next_build_number([(d, 998)], d), Ok(999));
        assert_eq!(
            next_build_number([(d, 999)], d),
            Err(NamingError::BuildNumbersExhausted { date: d })
        );
        let t = NameTemplate::default();
        let names = [
            "ubuntu-24.04-minimal-20250118-001",
            "ubuntu-24.04-minimal-20250118-002",
            "ubuntu-24.04-full-20250118-005",
            "hand-made",
        ];
        assert_eq!(
            t.next_build_number(names, "ubuntu-24.04", "minimal", d),
            Ok(3)
        );
    }

    proptest! {
        #[test]
        fn any_template_string_never_panics(s in "\\PC{0,40}") {
            let _ = NameTemplate::parse(&s);
        }

        #[test]
        fn render_then_parse_round_trips(
            os in "[a-z][a-z0-9]{0,8}(-[0-9]{1,2}\\.[0-9]{2})?",
            ty in "[a-z]{1,8}",
            days in 0i64..40_000,
            build in MIN_BUILD_NUMBER..=MAX_BUILD_NUMBER,
        ) {
            let date = day(1970, 1, 1) + chrono::Duration::days(days);
            let t = NameTemplate::default();
            let name = t.render(&os, &ty, date, build).unwrap();
            prop_assert_eq!(t.parse_name(&name, &os, &ty), Some((date, build)));
        }

        #[test]
        fn any_name_parse_never_panics(s in "\\PC{0,60}") {
            let _ = NameTemplate::default().parse_name(&s, "ubuntu", "minimal");
            let _ = validate_vm_name(&s);
        }
    }
}
