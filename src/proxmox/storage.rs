//! Node storage: list, status, content, and downloading a cloud image onto a storage.

use serde::Deserialize;

use super::client::{Client, Params};
use super::error::{Error, Result};
use super::lenient;
use super::retry::Idempotency;
use super::task::Upid;

/// One row of `GET /nodes/{node}/storage`.
#[derive(Debug, Clone, Deserialize, PartialEq, Default)]
pub struct StorageInfo {
    pub storage: String,
    /// `dir`, `lvmthin`, `zfspool`, `nfs`, ...
    #[serde(rename = "type", default)]
    pub kind: String,
    /// Comma-separated content types: `images,iso,import,backup,...`.
    #[serde(default)]
    pub content: String,
    #[serde(default, deserialize_with = "lenient::bool01")]
    pub active: bool,
    #[serde(default, deserialize_with = "lenient::opt_bool")]
    pub enabled: Option<bool>,
    #[serde(default, deserialize_with = "lenient::bool01")]
    pub shared: bool,
    #[serde(default, deserialize_with = "lenient::opt_uint")]
    pub total: Option<u64>,
    #[serde(default, deserialize_with = "lenient::opt_uint")]
    pub used: Option<u64>,
    #[serde(default, deserialize_with = "lenient::opt_uint")]
    pub avail: Option<u64>,
}

impl StorageInfo {
    pub fn supports(&self, content: &str) -> bool {
        self.content.split(',').any(|c| c.trim() == content)
    }
}

/// `GET /nodes/{node}/storage/{storage}/status`.
#[derive(Debug, Clone, Deserialize, PartialEq, Default)]
pub struct StorageStatus {
    #[serde(rename = "type", default)]
    pub kind: String,
    #[serde(default)]
    pub content: String,
    #[serde(default, deserialize_with = "lenient::bool01")]
    pub active: bool,
    #[serde(default, deserialize_with = "lenient::opt_bool")]
    pub enabled: Option<bool>,
    #[serde(default, deserialize_with = "lenient::bool01")]
    pub shared: bool,
    #[serde(default, deserialize_with = "lenient::opt_uint")]
    pub total: Option<u64>,
    #[serde(default, deserialize_with = "lenient::opt_uint")]
    pub used: Option<u64>,
    #[serde(default, deserialize_with = "lenient::opt_uint")]
    pub avail: Option<u64>,
}

/// One volume of `GET /nodes/{node}/storage/{storage}/content`.
#[derive(Debug, Clone, Deserialize, PartialEq, Default)]
pub struct StorageVolume {
    /// `local:import/noble.qcow2`, `local-lvm:base-9000-disk-0`.
    pub volid: String,
    #[serde(default)]
    pub format: String,
    /// Not in the schema but sent by PVE: `images`, `iso`, `import`, `backup`, ...
    #[serde(default)]
    pub content: Option<String>,
    #[serde(default, deserialize_with = "lenient::uint")]
    pub size: u64,
    #[serde(default, deserialize_with = "lenient::opt_int")]
    pub ctime: Option<i64>,
    #[serde(default, deserialize_with = "lenient::opt_u32")]
    pub vmid: Option<u32>,
    /// The base volume of a linked clone.
    #[serde(default)]
    pub parent: Option<String>,
    #[serde(default)]
    pub notes: Option<String>,
    #[serde(default, deserialize_with = "lenient::bool01")]
    pub protected: bool,
}

/// Checksum algorithms PVE accepts for `download-url`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChecksumAlgorithm {
    Md5,
    Sha1,
    Sha224,
    Sha256,
    Sha384,
    Sha512,
}

impl ChecksumAlgorithm {
    pub fn as_str(self) -> &'static str {
        match self {
            ChecksumAlgorithm::Md5 => "md5",
            ChecksumAlgorithm::Sha1 => "sha1",
            ChecksumAlgorithm::Sha224 => "sha224",
            ChecksumAlgorithm::Sha256 => "sha256",
            ChecksumAlgorithm::Sha384 => "sha384",
            ChecksumAlgorithm::Sha512 => "sha512",
        }
    }
}

/// `POST /nodes/{node}/storage/{storage}/download-url`.
///
/// With a checksum the download is idempotent (an existing good file gives "OK, got correct file
/// already"); without one, an existing file fails the task ("refusing to override").
#[derive(Debug, Clone, PartialEq)]
pub struct DownloadUrl {
    pub url: String,
    /// Normalized by PVE; for `import` it must end in `.qcow2`, `.raw`, `.vmdk` or `.ova`.
    pub filename: String,
    /// `import` (PVE 8.4+ for disk images), `iso` or `vztmpl`.
    pub content: String,
    pub checksum: Option<(ChecksumAlgorithm, String)>,
    /// Default (None) is PVE's: verify.
    pub verify_certificates: Option<bool>,
}

impl DownloadUrl {
    /// A cloud image for `import-from`.
    pub fn import(url: impl Into<String>, filename: impl Into<String>) -> Self {
        DownloadUrl {
            url: url.into(),
            filename: filename.into(),
            content: "import".into(),
            checksum: None,
            verify_certificates: None,
        }
    }

    pub fn with_checksum(
        mut self,
        algorithm: ChecksumAlgorithm,
        checksum: impl Into<String>,
    ) -> Self {
        self.checksum = Some((algorithm, checksum.into()));
        self
    }

    fn params(&self) -> Result<Params> {
        if !(self.url.starts_with("http://") || self.url.starts_with("https://")) {
            return Err(Error::InvalidParameter {
                request: "download-url".into(),
                message: format!("url {:?} must start with http:// or https://", self.url),
                errors: Default::default(),
            });
        }
        let mut p = Params::new()
            .set("url", &self.url)
            .set("filename", &self.filename)
            .set("content", &self.content)
            .opt_flag("verify-certificates", self.verify_certificates);
        if let Some((alg, sum)) = &self.checksum {
            p = p
                .set("checksum", sum.trim())
                .set("checksum-algorithm", alg.as_str());
        }
        Ok(p)
    }
}

impl Client {
    /// Storages of a node, optionally only those that accept `content` (`images`, `import`, ...).
    pub async fn storages(&self, node: &str, content: Option<&str>) -> Result<Vec<StorageInfo>> {
        self.get(
            &["nodes", node, "storage"],
            &Params::new().opt("content", content),
        )
        .await
    }

    pub async fn storage_status(&self, node: &str, storage: &str) -> Result<StorageStatus> {
        self.get(
            &["nodes", node, "storage", storage, "status"],
            &Params::new(),
        )
        .await
    }

    /// Volumes on a storage, optionally of one content type and/or one VM.
    pub async fn storage_content(
        &self,
        node: &str,
        storage: &str,
        content: Option<&str>,
        vmid: Option<u32>,
    ) -> Result<Vec<StorageVolume>> {
        let q = Params::new().opt("content", content).opt("vmid", vmid);
        self.get(&["nodes", node, "storage", storage, "content"], &q)
            .await
    }

    /// Start a download onto the storage; wait for the returned task. `content=import` is
    /// checked against the server version first (PVE 8.4+).
    pub async fn download_url(
        &self,
        node: &str,
        storage: &str,
        request: &DownloadUrl,
    ) -> Result<Upid> {
        let params = request.params()?;
        if request.content == "import" {
            self.require_import_content().await?;
        }
        let upid: String = self
            .post(
                &["nodes", node, "storage", storage, "download-url"],
                &params,
                Idempotency::Unsafe,
            )
            .await?;
        upid.parse()
    }

    /// Delete a volume (`DELETE .../content/{volid}`). Returns the task, or `None` when PVE
    /// finished it synchronously.
    pub async fn delete_volume(
        &self,
        node: &str,
        storage: &str,
        volid: &str,
    ) -> Result<Option<Upid>> {
        let upid: Option<String> = self
            .delete(
                &["nodes", node, "storage", storage, "content", volid],
                &Params::new(),
                Idempotency::Unsafe,
            )
            .await?;
        upid.map(|u| u.parse()).transpose()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn download_params() {
        let d = DownloadUrl::import(
            "https://cloud-images.ubuntu.com/noble/current/noble-server-cloudimg-amd64.img",
            "noble.qcow2",
        )
        .with_checksum(ChecksumAlgorithm::Sha256, "ab12 ");
        let mut d2 = d.clone();
        d2.verify_certificates = Some(false);
        assert_eq!(
            d2.params().unwrap().encode(),
            "url=https%3A%2F%2Fcloud-images.ubuntu.com%2Fnoble%2Fcurrent%2Fnoble-server-cloudimg-amd64.img&filename=noble.qcow2&content=import&verify-certificates=0&checksum=ab12&checksum-algorithm=sha256"
        );
        let mut bad = d;
        bad.url = "ftp://x".into();
        assert_eq!(bad.params().unwrap_err().category(), "invalid_parameter");
    }

    #[test]
    fn volumes_decode_with_string_sizes() {
        let v: Vec<StorageVolume> = serde_json::from_str(
            r#"[{"volid":"local:import/noble.qcow2","format":"qcow2","size":"611385344","ctime":1737200000,"content":"import"},
                {"volid":"local-lvm:vm-101-disk-0","format":"raw","size":3221225472,"vmid":"101","parent":"base-9000-disk-0@__base__"}]"#,
        )
        .unwrap();
        assert_eq!(v[0].size, 611385344);
        assert_eq!(v[1].vmid, Some(101));
        assert!(v[1].parent.as_deref().unwrap().starts_with("base-9000"));
        let s: StorageInfo = serde_json::from_str(r#"{"storage":"local","type":"dir","content":"iso,vztmpl,backup,import","active":1,"shared":0}"#).unwrap();
        assert!(s.supports("import") && !s.supports("images"));
    }
}
