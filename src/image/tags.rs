//! Proxmox tags: grammar, sanitizing, the `;`-separated list, and sombrero's tag vocabulary.
//!
//! PVE tags are key-only and match `[a-z0-9_][a-z0-9_+.-]*` (case-insensitively; with the default
//! datacenter `tag-style` PVE lower-cases, sorts and de-duplicates them on write). Key/value
//! metadata is encoded as `key.value`; the full metadata lives in the description marker.
//!
//! Selecting "the latest validated template of an image" takes two tags: the image's own tag
//! ([`image_tag`]) and [`LATEST_TAG`]. Exactly one template per image carries both, which is what
//! Cluster API Proxmox (exactly one match) and Terraform's "newest with these tags" need.

use std::collections::BTreeMap;
use std::fmt;

use sha2::{Digest, Sha256};
use thiserror::Error;

/// PVE's tag grammar, lower-case only (what we write). The CRD can reuse it as a `pattern`.
pub const TAG_PATTERN: &str = "^[a-z0-9_][a-z0-9_+.-]*$";

/// PVE's schema gives `pve-tag` no length limit; we cap our tags so they stay readable in the UI
/// tree and in `qm` output. Longer values are shortened with a hash suffix (see [`sanitize_tag`]).
pub const MAX_TAG_LEN: usize = 63;

/// Every VM the controller creates carries it. A hint for people and for selection, never proof
/// of ownership on its own: clones copy tags, so the description marker decides.
pub const OWNER_TAG: &str = "sombrero";
/// A build VM carries it until Finalize, also once converted to a template: the build's
/// inventory reads the marker of a template with it (a build killed between the conversion and
/// Finalize, to resume), while a finished template's name gives its number without a read.
pub const BUILD_TAG: &str = "sombrero-build";
/// Channel tag: the one latest validated template of an image (combine with [`image_tag`]).
pub const LATEST_TAG: &str = "sombrero-latest";
/// The template passed validation.
pub const VALIDATED_TAG: &str = "validated";
/// The template failed validation; it never gets the channel tag.
pub const FAILED_VALIDATION_TAG: &str = "failed-validation";
/// Retired by a `TemplateRetention` in `tag` mode: kept on Proxmox, out of rotation.
pub const ARCHIVED_TAG: &str = "archived";

/// Prefixes of the key.value tags.
pub const IMAGE_TAG_PREFIX: &str = "sombrero.";
pub const OS_TAG_PREFIX: &str = "os.";
pub const TYPE_TAG_PREFIX: &str = "type.";

/// Length of the hash suffix used when a tag must be shortened.
const HASH_SUFFIX_LEN: usize = 12;

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum TagError {
    #[error(
        "{value:?} cannot be made into a Proxmox tag: it has no letters or digits (tags match {TAG_PATTERN})"
    )]
    Empty { value: String },
}

/// Whether `tag` is a tag we may write: PVE's grammar, lower-case, at most [`MAX_TAG_LEN`].
pub fn is_valid_tag(tag: &str) -> bool {
    let mut bytes = tag.bytes();
    let Some(first) = bytes.next() else {
        return false;
    };
    tag.len() <= MAX_TAG_LEN
        && (first.is_ascii_lowercase() || first.is_ascii_digit() || first == b'_')
        && bytes.all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'_' | b'+' | b'.' | b'-')
        })
}

/// Turns an arbitrary value into a tag: lower-cased, runs of other characters become one `-`,
/// leading characters PVE refuses are dropped, and a value too long is cut and given a hash of
/// the whole value so distinct values stay distinct. `Ubuntu 24.04` -> `ubuntu-24.04`.
pub fn sanitize_tag(value: &str) -> Result<String, TagError> {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        let c = c.to_ascii_lowercase();
        if c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '_' | '+' | '.' | '-') {
            out.push(c);
        } else if !out.ends_with('-') {
            out.push('-');
        }
    }
    let start = out
        .find(|c: char| c.is_ascii_alphanumeric() || c == '_')
        .unwrap_or(out.len());
    let trimmed = out[start..].trim_end_matches('-');
    if !trimmed.bytes().any(|b| b.is_ascii_alphanumeric()) {
        return Err(TagError::Empty {
            value: value.to_string(),
        });
    }
    Ok(shorten(trimmed, value))
}

/// Cuts `tag` to [`MAX_TAG_LEN`] with a hash of `original` when needed.
fn shorten(tag: &str, original: &str) -> String {
    if tag.len() <= MAX_TAG_LEN {
        return tag.to_string();
    }
    let hash = hex::encode(Sha256::digest(original.as_bytes()));
    let keep = MAX_TAG_LEN - HASH_SUFFIX_LEN - 1;
    // `tag` is ASCII here, so any byte index is a char boundary.
    format!("{}-{}", &tag[..keep], &hash[..HASH_SUFFIX_LEN])
}

/// The per-image tag: `sombrero.<namespace>.<name>` (a namespace has no dots, so the first dot
/// after the prefix separates the two). Too long, it keeps a readable head plus a hash of
/// `namespace/name`.
pub fn image_tag(namespace: &str, name: &str) -> String {
    let raw = format!("{IMAGE_TAG_PREFIX}{namespace}.{name}");
    // `raw` always holds letters, so sanitizing cannot fail; the fallback only avoids a panic path.
    let readable = sanitize_tag(&raw).unwrap_or_else(|_| OWNER_TAG.to_string());
    if readable.len() <= MAX_TAG_LEN && readable == raw {
        return raw;
    }
    // Sanitizing changed or shortened it: hash the identity so the tag stays unique.
    let hash = hex::encode(Sha256::digest(format!("{namespace}/{name}").as_bytes()));
    let keep = MAX_TAG_LEN - HASH_SUFFIX_LEN - 1;
    let head: String = readable.chars().take(keep).collect();
    format!("{head}-{}", &hash[..HASH_SUFFIX_LEN])
}

/// `os.<os>`, e.g. `os.ubuntu-24.04`.
pub fn os_tag(os: &str) -> Result<String, TagError> {
    sanitize_tag(&format!("{OS_TAG_PREFIX}{}", sanitize_tag(os)?))
}

/// `type.<type>`, e.g. `type.minimal`.
pub fn type_tag(image_type: &str) -> Result<String, TagError> {
    sanitize_tag(&format!("{TYPE_TAG_PREFIX}{}", sanitize_tag(image_type)?))
}

/// The tags every template of an image carries from birth: owner, image, os, type.
/// State tags (validated, latest, ...) are added as the template moves on.
pub fn base_tags(
    namespace: &str,
    name: &str,
    os: &str,
    image_type: &str,
) -> Result<TagSet, TagError> {
    let mut tags = TagSet::new();
    tags.insert(OWNER_TAG);
    tags.insert(&image_tag(namespace, name));
    tags.insert(&os_tag(os)?);
    tags.insert(&type_tag(image_type)?);
    Ok(tags)
}

/// The two tags that select the one latest validated template of an image.
pub fn latest_selector(namespace: &str, name: &str) -> [String; 2] {
    [image_tag(namespace, name), LATEST_TAG.to_string()]
}

/// A template's lifecycle as its tags show it. Proxmox copies tags into clones, so these are
/// hints for consumers; the marker stays authoritative for the controller.
impl TagSet {
    /// Validation passed: `validated`, never `failed-validation`.
    pub fn mark_validated(&mut self) {
        self.remove(FAILED_VALIDATION_TAG);
        self.insert(VALIDATED_TAG);
    }

    /// Validation failed: `failed-validation`; it can never be the latest.
    pub fn mark_failed_validation(&mut self) {
        self.remove(VALIDATED_TAG);
        self.remove(LATEST_TAG);
        self.insert(FAILED_VALIDATION_TAG);
    }

    /// Retired in `tag` mode: out of the channel, `archived`.
    pub fn mark_archived(&mut self) {
        self.remove(LATEST_TAG);
        self.insert(ARCHIVED_TAG);
    }

    pub fn is_latest(&self) -> bool {
        self.contains(LATEST_TAG)
    }

    pub fn is_archived(&self) -> bool {
        self.contains(ARCHIVED_TAG)
    }
}

/// A VM's tag list as PVE treats it by default: a set compared case-insensitively, sorted.
/// The original spelling is kept so rewriting the list does not change users' tags when the
/// datacenter is set to `case-sensitive=1`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TagSet {
    // lower-cased tag -> spelling as first seen
    tags: BTreeMap<String, String>,
}

impl TagSet {
    pub fn new() -> Self {
        Self::default()
    }

    /// Parses a `tags` config value. PVE accepts `;`, `,` and whitespace as separators.
    /// Tokens are not validated: what PVE stored is taken as it is.
    pub fn parse(list: &str) -> Self {
        let mut set = Self::new();
        for token in list
            .split(|c: char| c == ';' || c == ',' || c.is_whitespace())
            .filter(|t| !t.is_empty())
        {
            set.insert(token);
        }
        set
    }

    /// The `tags` value to write: sorted, `;`-separated.
    pub fn to_config_string(&self) -> String {
        self.tags.values().cloned().collect::<Vec<_>>().join(";")
    }

    /// Adds a tag; returns whether it was new.
    pub fn insert(&mut self, tag: &str) -> bool {
        let key = tag.to_ascii_lowercase();
        if self.tags.contains_key(&key) {
            return false;
        }
        self.tags.insert(key, tag.to_string());
        true
    }

    /// Removes a tag (any case); returns whether it was there.
    pub fn remove(&mut self, tag: &str) -> bool {
        self.tags.remove(&tag.to_ascii_lowercase()).is_some()
    }

    pub fn contains(&self, tag: &str) -> bool {
        self.tags.contains_key(&tag.to_ascii_lowercase())
    }

    /// Whether every tag of `selector` is present (how tag selectors match).
    pub fn contains_all<'a>(&self, selector: impl IntoIterator<Item = &'a str>) -> bool {
        selector.into_iter().all(|t| self.contains(t))
    }

    pub fn len(&self) -> usize {
        self.tags.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tags.is_empty()
    }

    /// Tags in PVE order (case-insensitive alphabetical), original spelling.
    pub fn iter(&self) -> impl Iterator<Item = &str> {
        self.tags.values().map(String::as_str)
    }
}

impl fmt::Display for TagSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_config_string())
    }
}

impl<'a> FromIterator<&'a str> for TagSet {
    fn from_iter<I: IntoIterator<Item = &'a str>>(iter: I) -> Self {
        let mut set = Self::new();
        for tag in iter {
            set.insert(tag);
        }
        set
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn vocabulary_is_valid() {
        for tag in [
            OWNER_TAG,
            LATEST_TAG,
            VALIDATED_TAG,
            FAILED_VALIDATION_TAG,
            ARCHIVED_TAG,
        ] {
            assert!(is_valid_tag(tag), "{tag}");
        }
    }

    #[test]
    fn grammar() {
        for ok in ["a", "_x", "0", "ubuntu-24.04", "a+b", "x.y_z-1"] {
            assert!(is_valid_tag(ok), "{ok}");
        }
        for bad in ["", "-a", ".a", "+a", "A", "a b", "a:b", "a/b", "a=b", "ü"] {
            assert!(!is_valid_tag(bad), "{bad}");
        }
        assert!(is_valid_tag(&"a".repeat(63)));
        assert!(!is_valid_tag(&"a".repeat(64)));
    }

    #[test]
    fn sanitize_examples() {
        assert_eq!(sanitize_tag("ubuntu-24.04").unwrap(), "ubuntu-24.04");
        assert_eq!(sanitize_tag("Ubuntu 24.04").unwrap(), "ubuntu-24.04");
        assert_eq!(sanitize_tag("  Debian / 12  ").unwrap(), "debian-12");
        assert_eq!(sanitize_tag("-.leading").unwrap(), "leading");
        assert_eq!(sanitize_tag("a:b=c").unwrap(), "a-b-c");
        assert!(matches!(sanitize_tag(" /:"), Err(TagError::Empty { .. })));
        assert!(matches!(sanitize_tag(""), Err(TagError::Empty { .. })));
        let long_a = sanitize_tag(&format!("{}a", "x".repeat(80))).unwrap();
        let long_b = sanitize_tag(&format!("{}b", "x".repeat(80))).unwrap();
        assert_eq!(long_a.len(), MAX_TAG_LEN);
        assert_ne!(long_a, long_b);
        assert!(is_valid_tag(&long_a));
    }

    #[test]
    fn image_tags() {
        assert_eq!(
            image_tag("platform", "ubuntu-2404"),
            "sombrero.platform.ubuntu-2404"
        );
        let long = image_tag("platform", &"n".repeat(100));
        assert_eq!(long.len(), MAX_TAG_LEN);
        assert!(long.starts_with("sombrero.platform.nnn"));
        assert!(is_valid_tag(&long));
        assert_ne!(long, image_tag("platform", &"n".repeat(101)));
        // Odd input still yields a valid, distinct tag.
        let odd = image_tag("Team A", "x");
        assert!(is_valid_tag(&odd), "{odd}");
        assert_ne!(odd, image_tag("team-a", "x"));
    }

    #[test]
    fn base_tag_set() {
        let tags = base_tags("platform", "ubuntu", "Ubuntu 24.04", "minimal").unwrap();
        assert_eq!(
            tags.to_config_string(),
            "os.ubuntu-24.04;sombrero;sombrero.platform.ubuntu;type.minimal"
        );
        assert!(base_tags("platform", "ubuntu", "???", "minimal").is_err());
    }

    #[test]
    fn tag_list_parse_and_format() {
        let mut set = TagSet::parse("b;a, c  Prod;;a\tB");
        assert_eq!(set.to_config_string(), "a;b;c;Prod");
        assert!(set.contains("prod") && set.contains("PROD"));
        assert!(set.insert("validated"));
        assert!(!set.insert("Validated"));
        assert!(set.remove("PROD"));
        assert_eq!(set.to_string(), "a;b;c;validated");
        assert!(set.contains_all(["a", "validated"]));
        assert!(!set.contains_all(["a", "sombrero-latest"]));
        assert_eq!(set.len(), 4);
        assert!(TagSet::parse("").is_empty());
        assert_eq!(TagSet::parse(" ; , ").len(), 0);
    }

    #[test]
    fn lifecycle_marks() {
        let mut tags = base_tags("platform", "ubuntu", "ubuntu-24.04", "minimal").unwrap();
        tags.mark_validated();
        tags.insert(LATEST_TAG);
        assert!(
            tags.contains_all(
                latest_selector("platform", "ubuntu")
                    .iter()
                    .map(String::as_str)
            )
        );
        assert!(tags.is_latest());
        tags.mark_archived();
        assert!(!tags.is_latest() && tags.is_archived() && tags.contains(VALIDATED_TAG));
        tags.mark_failed_validation();
        assert!(!tags.contains(VALIDATED_TAG) && tags.contains(FAILED_VALIDATION_TAG));
        tags.mark_validated();
        assert!(!tags.contains(FAILED_VALIDATION_TAG));
    }

    proptest! {
        #[test]
        fn sanitize_gives_valid_tags_or_error(s in "\\PC{0,120}") {
            if let Ok(tag) = sanitize_tag(&s) {
                prop_assert!(is_valid_tag(&tag), "{tag:?} from {s:?}");
                // Idempotent: a sanitized tag is left alone.
                prop_assert_eq!(sanitize_tag(&tag), Ok(tag.clone()));
            }
        }

        #[test]
        fn image_tag_always_valid(ns in "\\PC{0,70}", name in "\\PC{0,260}") {
            prop_assert!(is_valid_tag(&image_tag(&ns, &name)));
        }

        #[test]
        fn parse_format_round_trips(tags in proptest::collection::vec("[a-z0-9_][a-z0-9_+.-]{0,10}", 0..8)) {
            let set: TagSet = tags.iter().map(String::as_str).collect();
            prop_assert_eq!(TagSet::parse(&set.to_config_string()), set);
        }
    }
}
