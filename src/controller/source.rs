//! The upstream checksum of a cloud image (`onSourceChange`): read the checksum list at
//! `checksumUrl` and find the line of the image's file.

use std::time::Duration;

/// `sha256:<hex>` (or `sha512:`) of `image_url`'s file in the list at `list_url`.
pub async fn upstream_checksum(list_url: &str, image_url: &str) -> Result<String, String> {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .map_err(|e| e.to_string())?;
    let text = http
        .get(list_url)
        .send()
        .await
        .and_then(|r| r.error_for_status())
        .map_err(|e| e.to_string())?
        .text()
        .await
        .map_err(|e| e.to_string())?;
    let file = image_url.rsplit('/').next().unwrap_or(image_url);
    find_checksum(&text, file).ok_or_else(|| format!("no line for {file:?} in the checksum list"))
}

/// Parses `SHA256SUMS`-style lines (`<hex>  <file>` or `<hex> *<file>`).
pub fn find_checksum(list: &str, file: &str) -> Option<String> {
    list.lines().find_map(|line| {
        let (hex, name) = line.trim().split_once(char::is_whitespace)?;
        let name = name.trim().trim_start_matches('*');
        if name != file || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
            return None;
        }
        let algo = match hex.len() {
            64 => "sha256",
            128 => "sha512",
            _ => return None,
        };
        Some(format!("{algo}:{}", hex.to_ascii_lowercase()))
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn finds_the_file_line() {
        let a = "a".repeat(64);
        let list = format!("{} *other.img\n{a}  noble.img\n", "b".repeat(64));
        assert_eq!(
            super::find_checksum(&list, "noble.img"),
            Some(format!("sha256:{a}"))
        );
        assert_eq!(super::find_checksum(&list, "x.img"), None);
    }
}
