//! Checksum lists as distributions publish them, and the one line for an image's file. Pure; the
//! build (`checksumUrl`) and the controller's upstream-change check both read lists through
//! [`find_in_list`], so an image whose list one of them understands is understood by both.
//!
//! Formats (each seen on the real mirrors):
//! - GNU `sha256sum`/`sha512sum`: `<hex> *<file>` (binary mode, Ubuntu's `SHA256SUMS`) and
//!   `<hex>  <file>` (text mode, Debian's `SHA512SUMS`); a leading `\` marks an escaped name
//!   (`\\` and `\n` inside it).
//! - BSD / `sha256sum --tag`: `SHA256 (<file>) = <hex>` (Fedora's `CHECKSUM`, FreeBSD).
//! - Either with a `./` path (`<hex>  ./<file>`, `find . | xargs sha256sum`), blank lines and
//!   `#` comments (Fedora writes `# <file>: <size> bytes`), inside a PGP clear-signed wrapper
//!   (the signature block is skipped, dash-escaped lines `- ...` are unescaped).
//!
//! The algorithm follows from the digest length (64 hex: sha256, 128: sha512); a BSD line naming
//! an algorithm whose length does not match, or any other algorithm (MD5, SHA1), is not used.

use std::fmt;

/// Why a list gave no checksum for the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListError {
    /// No sha256/sha512 line names the file; `listed` holds the first names the list has (for
    /// the message: usually the URL points at another file or another release).
    NotListed { file: String, listed: Vec<String> },
    /// Two lines name the file with different digests of the same algorithm.
    Conflicting { file: String },
}

impl fmt::Display for ListError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NotListed { file, listed } if listed.is_empty() => write!(
                f,
                "no sha256/sha512 line for {file:?}: the list has no checksum line this parser understands (GNU `<hex>  file`, `<hex> *file` or BSD `SHA256 (file) = <hex>`)"
            ),
            Self::NotListed { file, listed } => write!(
                f,
                "no sha256/sha512 line for {file:?}; the list names {}",
                listed
                    .iter()
                    .map(|n| format!("{n:?}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            Self::Conflicting { file } => write!(
                f,
                "the list names {file:?} twice with different digests; it cannot be trusted"
            ),
        }
    }
}

impl std::error::Error for ListError {}

/// How many file names a [`ListError::NotListed`] shows.
const SHOWN_NAMES: usize = 5;

/// One usable line: the file it names and `sha256:<hex>` / `sha512:<hex>` (lowercase).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub file: String,
    pub checksum: String,
}

/// The file name an image URL downloads: its last path segment, query and fragment removed.
pub fn file_of_url(url: &str) -> &str {
    let path = url.split(['?', '#']).next().unwrap_or(url);
    path.rsplit('/').next().unwrap_or(path)
}

/// The checksum of `file` in `list`: `sha256:<hex>` or `sha512:<hex>`. When the list has both
/// for the file, sha512 wins (the stronger one; Proxmox verifies either).
pub fn find_in_list(list: &str, file: &str) -> Result<String, ListError> {
    let entries = entries(list);
    let named: Vec<&str> = entries
        .iter()
        .filter(|e| e.file == file)
        .map(|e| e.checksum.as_str())
        .collect();
    let mut found = None;
    for alg in ["sha256", "sha512"] {
        let mut of_alg = named.iter().filter(|c| algorithm(c) == alg);
        if let Some(first) = of_alg.next() {
            if of_alg.any(|c| c != first) {
                return Err(ListError::Conflicting { file: file.into() });
            }
            found = Some(*first);
        }
    }
    found.map(str::to_string).ok_or_else(|| {
        let mut listed: Vec<String> = Vec::new();
        for e in &entries {
            if listed.len() < SHOWN_NAMES && !listed.contains(&e.file) {
                listed.push(e.file.clone());
            }
        }
        ListError::NotListed {
            file: file.into(),
            listed,
        }
    })
}

fn algorithm(checksum: &str) -> &str {
    checksum.split_once(':').map_or("", |(a, _)| a)
}

/// Every usable line of a list, in order. Lines this parser does not understand are skipped.
pub fn entries(list: &str) -> Vec<Entry> {
    let mut out = Vec::new();
    let mut in_signature = false;
    for raw in list.lines() {
        let line = raw.trim();
        if line == "-----BEGIN PGP SIGNATURE-----" {
            in_signature = true;
            continue;
        }
        if line == "-----END PGP SIGNATURE-----" {
            in_signature = false;
            continue;
        }
        // The armor header and its `Hash:` lines stop at the first blank line; neither has a
        // checksum line's shape, so they need no state of their own.
        if in_signature || line.is_empty() || line.starts_with('#') || line.starts_with("-----") {
            continue;
        }
        // RFC 4880 dash-escaping inside a clear-signed message.
        let line = line.strip_prefix("- ").unwrap_or(line);
        if let Some(e) = bsd_line(line).or_else(|| gnu_line(line)) {
            out.push(e);
        }
    }
    out
}

/// `SHA256 (file) = hex`.
fn bsd_line(line: &str) -> Option<Entry> {
    let (head, hex) = line.rsplit_once(") = ")?;
    let (alg, file) = head.split_once(" (")?;
    let expected = match alg.trim() {
        "SHA256" | "sha256" => 64,
        "SHA512" | "sha512" => 128,
        _ => return None,
    };
    let checksum = digest(hex.trim()).filter(|c| c.len() - 7 == expected)?;
    Some(Entry {
        file: clean_name(file)?,
        checksum,
    })
}

/// `hex *file`, `hex  file`, `\hex  escaped\nname`.
fn gnu_line(line: &str) -> Option<Entry> {
    let (escaped, line) = match line.strip_prefix('\\') {
        Some(rest) => (true, rest),
        None => (false, line),
    };
    let (hex, rest) = line.split_once([' ', '\t'])?;
    let checksum = digest(hex)?;
    // One separator, then ` ` (text) or `*` (binary) mode; tolerate extra blanks.
    let name = rest.trim_start();
    let name = name.strip_prefix('*').unwrap_or(name);
    let name = if escaped {
        unescape(name)?
    } else {
        name.to_string()
    };
    Some(Entry {
        file: clean_name(&name)?,
        checksum,
    })
}

/// `\\` -> `\`, `\n` -> newline (GNU coreutils); anything else after `\` is not a valid line.
fn unescape(name: &str) -> Option<String> {
    let mut out = String::with_capacity(name.len());
    let mut chars = name.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            match chars.next()? {
                '\\' => out.push('\\'),
                'n' => out.push('\n'),
                _ => return None,
            }
        } else {
            out.push(c);
        }
    }
    Some(out)
}

/// The name as the image URL would end: `./` prefixes dropped; empty names are no line.
fn clean_name(name: &str) -> Option<String> {
    let mut name = name.trim_end();
    while let Some(rest) = name.strip_prefix("./") {
        name = rest;
    }
    (!name.is_empty()).then(|| name.to_string())
}

/// `sha256:<hex>` / `sha512:<hex>` from a bare hex digest of one of those lengths.
fn digest(hex: &str) -> Option<String> {
    if !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let alg = match hex.len() {
        64 => "sha256",
        128 => "sha512",
        _ => return None,
    };
    Some(format!("{alg}:{}", hex.to_ascii_lowercase()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "a1e3c2b4d5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8f90";
    const B: &str = "0f1e2d3c4b5a69788796a5b4c3d2e1f00f1e2d3c4b5a69788796a5b4c3d2e1f0";

    fn s256(h: &str) -> String {
        format!("sha256:{h}")
    }

    /// Ubuntu's `SHA256SUMS` (cloud-images.ubuntu.com/noble/current/): binary mode.
    fn ubuntu() -> String {
        format!(
            "{B} *noble-server-cloudimg-amd64-azure.vhd.tar.gz\n{A} *noble-server-cloudimg-amd64.img\n{B} *noble-server-cloudimg-arm64.img\n"
        )
    }

    /// Debian's `SHA512SUMS` (cloud.debian.org/images/cloud/bookworm/latest/): text mode.
    fn debian() -> (String, String) {
        let long = format!("{A}{B}");
        (
            format!(
                "{}  debian-12-generic-amd64.json\n{long}  debian-12-generic-amd64.qcow2\n{}  debian-12-generic-amd64.raw\n",
                "c".repeat(128),
                "d".repeat(128)
            ),
            long,
        )
    }

    /// Fedora's `Fedora-Cloud-41-1.4-x86_64-CHECKSUM`: clear-signed, comments, BSD lines.
    fn fedora() -> String {
        format!(
            "-----BEGIN PGP SIGNED MESSAGE-----\nHash: SHA256\n\n# Fedora-Cloud-Base-AmazonEC2-41-1.4.x86_64.raw.xz: 398315764 bytes\nSHA256 (Fedora-Cloud-Base-AmazonEC2-41-1.4.x86_64.raw.xz) = {B}\n# Fedora-Cloud-Base-Generic-41-1.4.x86_64.qcow2: 491716608 bytes\nSHA256 (Fedora-Cloud-Base-Generic-41-1.4.x86_64.qcow2) = {A}\n-----BEGIN PGP SIGNATURE-----\n\niQIzBAEBCAAdFiEEliQCCdEgFHiAGdjvBjJvQz2nPuMFAmcXbSAACgkQBjJvQz2n\nPuPDQg//WYoHH0QFNNr4y6qzJ8m2V8R4X1Zl2w6M1pr+kcU6Q=\n=abcd\n-----END PGP SIGNATURE-----\n"
        )
    }

    #[test]
    fn real_formats_give_the_files_checksum() {
        let (debian, long) = debian();
        let tag = format!("SHA256 (alpine-virt-3.20.3-x86_64.iso) = {A}\n");
        let tag512 = format!("SHA512 (x.qcow2) = {long}\n");
        let dotted = format!("{B}  ./other.img\n{A}  ./noble.img\n");
        let cases: Vec<(&str, String, &str, String)> = vec![
            (
                "ubuntu",
                ubuntu(),
                "noble-server-cloudimg-amd64.img",
                s256(A),
            ),
            (
                "debian",
                debian,
                "debian-12-generic-amd64.qcow2",
                format!("sha512:{long}"),
            ),
            (
                "fedora",
                fedora(),
                "Fedora-Cloud-Base-Generic-41-1.4.x86_64.qcow2",
                s256(A),
            ),
            (
                "sha256sum --tag",
                tag,
                "alpine-virt-3.20.3-x86_64.iso",
                s256(A),
            ),
            (
                "sha512sum --tag",
                tag512,
                "x.qcow2",
                format!("sha512:{long}"),
            ),
            ("./ prefix", dotted, "noble.img", s256(A)),
            (
                "uppercase hex, CRLF",
                format!("{}  noble.img\r\n", A.to_ascii_uppercase()),
                "noble.img",
                s256(A),
            ),
            (
                "escaped name",
                format!("\\{A}  odd\\\\name.img\n"),
                "odd\\name.img",
                s256(A),
            ),
            (
                "dash-escaped in a signed message",
                format!("-----BEGIN PGP SIGNED MESSAGE-----\nHash: SHA512\n\n- {A}  -dash.img\n"),
                "-dash.img",
                s256(A),
            ),
            (
                "both algorithms: sha512 wins",
                format!(
                    "{A}  x.img\n{long}  x.img\n{A}  x.img\n",
                    long = "e".repeat(128)
                ),
                "x.img",
                format!("sha512:{}", "e".repeat(128)),
            ),
        ];
        for (what, list, file, want) in cases {
            assert_eq!(find_in_list(&list, file), Ok(want), "{what}:\n{list}");
        }
    }

    #[test]
    fn near_misses_are_not_matches() {
        let cases: Vec<(&str, String, &str)> = vec![
            (
                "another file",
                ubuntu(),
                "noble-server-cloudimg-amd64.qcow2",
            ),
            (
                "a prefix of the name",
                format!("{A}  noble.img.bak\n"),
                "noble.img",
            ),
            (
                "md5",
                format!("MD5 (x.img) = {}\n", "a".repeat(32)),
                "x.img",
            ),
            ("sha1", format!("{}  x.img\n", "a".repeat(40)), "x.img"),
            (
                "length and algorithm disagree",
                format!("SHA512 (x.img) = {A}\n"),
                "x.img",
            ),
            ("not hex", format!("{}  x.img\n", "g".repeat(64)), "x.img"),
            ("commented out", format!("# {A}  x.img\n"), "x.img"),
            (
                "signature only",
                "-----BEGIN PGP SIGNATURE-----\n\n{A}  x.img\n-----END PGP SIGNATURE-----\n"
                    .replace("{A}", A),
                "x.img",
            ),
            ("empty", String::new(), "x.img"),
            (
                "an HTML error page",
                "<html><body>404 Not Found</body></html>".into(),
                "x.img",
            ),
        ];
        for (what, list, file) in cases {
            assert!(
                matches!(find_in_list(&list, file), Err(ListError::NotListed { .. })),
                "{what}: {:?}",
                find_in_list(&list, file)
            );
        }
    }

    #[test]
    fn errors_say_what_the_list_has() {
        let e = find_in_list(&ubuntu(), "noble.qcow2").unwrap_err();
        let text = e.to_string();
        assert!(
            text.contains("\"noble.qcow2\"")
                && text.contains("\"noble-server-cloudimg-amd64.img\""),
            "{text}"
        );
        let e = find_in_list("<html>", "x.img").unwrap_err().to_string();
        assert!(e.contains("no checksum line"), "{e}");
        let e = find_in_list(&format!("{A}  x.img\n{B} *x.img\n"), "x.img").unwrap_err();
        assert_eq!(
            e,
            ListError::Conflicting {
                file: "x.img".into()
            }
        );
        assert!(e.to_string().contains("twice"));
    }

    #[test]
    fn file_names_from_urls() {
        assert_eq!(
            file_of_url(
                "https://cloud-images.ubuntu.com/noble/current/noble-server-cloudimg-amd64.img"
            ),
            "noble-server-cloudimg-amd64.img"
        );
        assert_eq!(file_of_url("https://x/a/b.qcow2?sig=1#frag"), "b.qcow2");
        assert_eq!(file_of_url("b.img"), "b.img");
    }

    proptest::proptest! {
        #[test]
        fn never_panics(list in "\\PC{0,300}", file in "[a-z./*]{0,12}") {
            let _ = find_in_list(&list, &file);
        }
    }
}
