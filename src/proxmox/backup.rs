//! vzdump backups, for archiving retired templates.

use super::client::{Client, Params};
use super::error::{Error, Result};
use super::retry::Idempotency;
use super::task::Upid;

/// `POST /nodes/{node}/vzdump` for one guest. Run it on the node that hosts the VM: other
/// nodes skip it and still report OK.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Vzdump {
    pub vmid: u32,
    /// A storage with `backup` content.
    pub storage: String,
    /// `snapshot`, `suspend` or `stop` (a template is always backed up as if stopped).
    pub mode: Option<String>,
    /// `0`, `1`, `gzip`, `lzo` or `zstd`.
    pub compress: Option<String>,
    /// Mark the archive protected against pruning.
    pub protected: Option<bool>,
    /// e.g. `{{guestname}}`.
    pub notes_template: Option<String>,
}

impl Vzdump {
    pub fn new(vmid: u32, storage: impl Into<String>) -> Self {
        Vzdump {
            vmid,
            storage: storage.into(),
            mode: None,
            compress: None,
            protected: None,
            notes_template: None,
        }
    }

    fn params(&self) -> Result<Params> {
        let bad = |field: &str, message: String| Error::InvalidParameter {
            request: "vzdump".into(),
            message: message.clone(),
            errors: [(field.to_owned(), message)].into(),
        };
        if let Some(m) = &self.mode
            && !matches!(m.as_str(), "snapshot" | "suspend" | "stop")
        {
            return Err(bad(
                "mode",
                format!("mode {m:?} is not one of snapshot, suspend, stop"),
            ));
        }
        if let Some(c) = &self.compress
            && !matches!(c.as_str(), "0" | "1" | "gzip" | "lzo" | "zstd")
        {
            return Err(bad(
                "compress",
                format!("compress {c:?} is not one of 0, 1, gzip, lzo, zstd"),
            ));
        }
        Ok(Params::new()
            .set("vmid", self.vmid)
            .set("storage", &self.storage)
            .opt("mode", self.mode.as_deref())
            .opt("compress", self.compress.as_deref())
            .opt_flag("protected", self.protected)
            .opt("notes-template", self.notes_template.as_deref()))
    }
}

impl Client {
    /// Start a backup (`vzdump` task). Per-guest failures end the task as "job errors".
    pub async fn vzdump(&self, node: &str, request: &Vzdump) -> Result<Upid> {
        let p = request.params()?;
        let upid: String = self
            .post(&["nodes", node, "vzdump"], &p, Idempotency::Unsafe)
            .await?;
        upid.parse()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vzdump_params() {
        let mut v = Vzdump::new(9000, "local");
        v.mode = Some("stop".into());
        v.compress = Some("zstd".into());
        v.protected = Some(true);
        assert_eq!(
            v.params().unwrap().encode(),
            "vmid=9000&storage=local&mode=stop&compress=zstd&protected=1"
        );
        v.mode = Some("fast".into());
        assert_eq!(v.params().unwrap_err().category(), "invalid_parameter");
    }
}
