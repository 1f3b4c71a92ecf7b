//! The upstream checksum of a cloud image (`onSourceChange`): read the checksum list at
//! `checksumUrl` and find the line of the image's file, with the parser the build uses
//! ([`crate::image::checksum`]), so a list the build accepts never fails here.

use std::time::Duration;

use crate::image::checksum;

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
    checksum::find_in_list(&text, checksum::file_of_url(image_url)).map_err(|e| e.to_string())
}
