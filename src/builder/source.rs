//! Stage `Source`: the cloud image on the import storage (checksum verified by Proxmox), or the
//! base template to clone.

use std::time::Duration;

use super::error::BuildError;
use super::plan::{normalize_file_name, parse_checksum};
use super::{Progress, Stage, Timeouts};
use crate::api::GoldenImageSpec;
use crate::image::checksum;
use crate::image::marker::SourceInfo;
use crate::proxmox::readback::{self, TaskCall};
use crate::proxmox::{Client, ClusterVm, DownloadUrl};

/// What the `Source` stage found or fetched.
#[derive(Debug, Clone, PartialEq)]
pub enum Prepared {
    /// `import-from` this volume (`local:import/<file>`).
    Image { volid: String, checksum: String },
    /// Full-clone this template.
    Template { node: String, vmid: u32 },
}

impl Prepared {
    pub fn checksum(&self) -> Option<String> {
        match self {
            Prepared::Image { checksum, .. } => Some(checksum.clone()),
            Prepared::Template { .. } => None,
        }
    }
}

/// The marker's record of the source.
pub fn source_info(spec: &GoldenImageSpec, prepared: &Prepared) -> SourceInfo {
    match (prepared, &spec.source.cloud_image) {
        (Prepared::Image { checksum, .. }, Some(ci)) => SourceInfo::CloudImage {
            url: ci.url.clone(),
            checksum: Some(checksum.clone()),
        },
        (Prepared::Image { checksum, .. }, None) => SourceInfo::CloudImage {
            url: String::new(),
            checksum: Some(checksum.clone()),
        },
        (Prepared::Template { vmid, .. }, _) => SourceInfo::Template {
            vmid: Some(*vmid),
            name: spec.source.template.as_ref().and_then(|t| t.name.clone()),
        },
    }
}

/// The import file name: `fileName` when given, else the URL's name normalized, with the first
/// 12 hex digits of the checksum before the extension, so an upstream update under the same URL
/// becomes a new file (PVE refuses to overwrite a file whose checksum differs) and a file with
/// the same checksum is reused.
pub fn import_file_name(url: &str, file_name: Option<&str>, checksum: &str) -> String {
    if let Some(f) = file_name {
        return f.to_string();
    }
    let base = normalize_file_name(url);
    let hex = checksum.split_once(':').map_or(checksum, |(_, h)| h);
    let short: String = hex.chars().take(12).collect();
    match base.rsplit_once('.') {
        Some((stem, ext)) => format!("{stem}-{short}.{ext}"),
        None => format!("{base}-{short}"),
    }
}

/// The source of a build; `listing` is a `cluster/resources` list taken right before, where a
/// template source's base is looked up.
pub async fn prepare(
    client: &Client,
    spec: &GoldenImageSpec,
    listing: &[ClusterVm],
    timeouts: &Timeouts,
    progress: &dyn Progress,
) -> Result<Prepared, BuildError> {
    let at = |e: BuildError| e.at(Stage::Source);
    if let Some(t) = &spec.source.template {
        return find_base_template(listing, t.vmid, t.name.as_deref()).map_err(at);
    }
    let Some(ci) = &spec.source.cloud_image else {
        return Err(at(BuildError::invalid_spec(
            "spec.source has neither cloudImage nor template",
            "set exactly one of spec.source.cloudImage or spec.source.template",
        )));
    };
    let checksum = match (&ci.checksum, &ci.checksum_url) {
        (Some(c), _) => c.clone(),
        (None, Some(list_url)) => {
            progress.message(&format!("resolving the checksum from {list_url}"));
            resolve_checksum_url(list_url, &ci.url).await.map_err(at)?
        }
        (None, None) => {
            return Err(at(BuildError::invalid_spec(
                "spec.source.cloudImage has neither checksum nor checksumUrl",
                "set cloudImage.checksum (sha256:<hex>) or cloudImage.checksumUrl (a SHA256SUMS file)",
            )));
        }
    };
    let Some((alg, hex)) = parse_checksum(&checksum) else {
        return Err(at(BuildError::invalid_spec(
            format!("checksum {checksum:?} is not sha256:<64 hex> or sha512:<128 hex>"),
            "fix spec.source.cloudImage.checksum",
        )));
    };
    let node = &spec.placement.node;
    let storage = &spec.placement.import_storage;
    let file = import_file_name(&ci.url, ci.file_name.as_deref(), &checksum);
    progress.message(&format!("download {} -> {storage}:import/{file}", ci.url));
    progress.percent(0.0);
    let request = DownloadUrl::import(&ci.url, &file).with_checksum(alg, hex);
    let since = readback::call_time();
    // With a checksum PVE answers "got correct file already" for a good existing file: that is
    // the reuse, verified by Proxmox itself.
    let upid = match client.download_url(node, storage, &request).await {
        Ok(u) => u,
        // The answer was lost: the download may be running. Wait for that task rather than
        // start a second download of the same file; none found, it did not run.
        Err(e) if e.outcome_unknown() => {
            let what = TaskCall {
                node,
                vmid: None,
                task_type: "download",
                id: file.clone(),
            };
            match readback::find_task(client, &what, since, timeouts.task).await {
                Ok(Some(u)) => u,
                Ok(None) => client
                    .download_url(node, storage, &request)
                    .await
                    .map_err(|e| at(BuildError::proxmox("download-url", &e)))?,
                Err(e) => return Err(at(BuildError::proxmox("download-url", &e))),
            }
        }
        Err(e) => return Err(at(BuildError::proxmox("download-url", &e))),
    };
    // The task log carries wget's progress lines: report the highest percentage as it rises.
    let mut shown = 0u8;
    client
        .wait_task_observing(&upid, timeouts.download, |lines| {
            let best = lines
                .iter()
                .flat_map(|l| l.lines())
                .filter_map(wget_percent)
                .max();
            if let Some(p) = best.filter(|p| *p > shown) {
                shown = p;
                progress.percent(f32::from(p));
            }
        })
        .await
        .map_err(|e| at(BuildError::proxmox("download-url", &e)))?;
    if shown < 100 {
        progress.percent(100.0);
    }
    Ok(Prepared::Image {
        volid: format!("{storage}:import/{file}"),
        checksum,
    })
}

/// The percentage of a `wget` progress line as PVE's download task logs it
/// (`  3072K ........ ........  2% 10.5M 9s`, `--progress=bar` style `45%[===>  ]` too): the
/// last `NN%` token, 0..=100; `None` for any other line.
pub fn wget_percent(line: &str) -> Option<u8> {
    line.split_whitespace()
        .filter_map(|word| {
            let (digits, _) = word.split_once('%')?;
            if digits.is_empty() || digits.len() > 3 || !digits.bytes().all(|b| b.is_ascii_digit())
            {
                return None;
            }
            digits.parse::<u8>().ok().filter(|p| *p <= 100)
        })
        .next_back()
}

fn find_base_template(
    vms: &[ClusterVm],
    vmid: Option<u32>,
    name: Option<&str>,
) -> Result<Prepared, BuildError> {
    let found: Vec<_> = vms
        .iter()
        .filter(|v| v.is_qemu())
        .filter(|v| match (vmid, name) {
            (Some(id), _) => v.vmid == id,
            (None, Some(n)) => v.name.as_deref() == Some(n),
            (None, None) => false,
        })
        .collect();
    let what = match (vmid, name) {
        (Some(id), _) => format!("VMID {id}"),
        (None, Some(n)) => format!("name {n:?}"),
        (None, None) => "nothing".into(),
    };
    match found.as_slice() {
        [one] if one.template => Ok(Prepared::Template {
            node: one.node.clone(),
            vmid: one.vmid,
        }),
        [one] => Err(BuildError::invalid_spec(
            format!("the base {what} (VM {}) is not a template", one.vmid),
            "spec.source.template must name a template (convert the VM, or pick another)",
        )),
        [] => Err(BuildError::invalid_spec(
            format!("no VM with {what} exists"),
            "check spec.source.template (the token needs VM.Audit to see it)",
        )),
        many => Err(BuildError::invalid_spec(
            format!(
                "{} VMs have {what}: {:?}",
                many.len(),
                many.iter().map(|v| v.vmid).collect::<Vec<_>>()
            ),
            "template names are not unique in Proxmox: use spec.source.template.vmid",
        )),
    }
}

/// Fetches a checksum list and finds the image's file in it.
async fn resolve_checksum_url(list_url: &str, image_url: &str) -> Result<String, BuildError> {
    let file = checksum::file_of_url(image_url);
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()
        .map_err(|e| {
            BuildError::new(
                super::ErrorCategory::Checksum,
                format!("HTTP client: {e}"),
                "internal error",
            )
        })?;
    let fail = |category: super::ErrorCategory, msg: String| {
        let hint = if category == super::ErrorCategory::SourceUnavailable {
            "the checksum list could not be fetched; retried with backoff (check that spec.source.cloudImage.checksumUrl is reachable from the controller)"
        } else {
            "check spec.source.cloudImage.checksumUrl, or set cloudImage.checksum instead"
        };
        let mut e = BuildError::new(category, msg, hint);
        e.step = Some("checksumUrl".into());
        e
    };
    let unavailable = super::ErrorCategory::SourceUnavailable;
    let rsp = http
        .get(list_url)
        .send()
        .await
        .map_err(|e| fail(unavailable, format!("cannot fetch {list_url}: {e}")))?;
    let status = rsp.status();
    if !status.is_success() {
        return Err(fail(
            checksum_list_failure(status.as_u16()),
            format!("{list_url} answered HTTP {status}"),
        ));
    }
    let text = rsp
        .text()
        .await
        .map_err(|e| fail(unavailable, format!("cannot read {list_url}: {e}")))?;
    checksum::find_in_list(&text, file)
        .map_err(|e| fail(super::ErrorCategory::Checksum, format!("{list_url}: {e}")))
}

/// The category of a checksum list answered with HTTP `status`: a server error, a timeout or
/// rate limiting passes; any other refusal (404, 403) needs the URL fixed.
fn checksum_list_failure(status: u16) -> super::ErrorCategory {
    match status {
        408 | 429 | 500..=599 => super::ErrorCategory::SourceUnavailable,
        _ => super::ErrorCategory::Checksum,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unreachable_checksum_list_is_transient_a_missing_one_is_not() {
        use crate::builder::ErrorCategory::{Checksum, SourceUnavailable};
        assert_eq!(checksum_list_failure(503), SourceUnavailable);
        assert_eq!(checksum_list_failure(502), SourceUnavailable);
        assert_eq!(checksum_list_failure(429), SourceUnavailable);
        assert_eq!(checksum_list_failure(404), Checksum);
        assert_eq!(checksum_list_failure(403), Checksum);
    }

    #[tokio::test]
    async fn a_refused_connection_to_the_checksum_list_is_retryable() {
        // A port nothing listens on.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let err = resolve_checksum_url(
            &format!("http://127.0.0.1:{port}/SHA256SUMS"),
            "https://x/noble.img",
        )
        .await
        .unwrap_err();
        assert_eq!(err.category(), "source_unavailable", "{err}");
        assert!(err.is_retryable());
        assert_eq!(err.step.as_deref(), Some("checksumUrl"));
    }

    #[test]
    fn import_names_carry_the_checksum() {
        let sum = format!("sha256:{}", "ab".repeat(32));
        assert_eq!(
            import_file_name("https://x/noble-server-cloudimg-amd64.img", None, &sum),
            "noble-server-cloudimg-amd64-abababababab.qcow2"
        );
        assert_eq!(
            import_file_name("https://x/a.img", Some("mine.raw"), &sum),
            "mine.raw"
        );
    }

    #[test]
    fn wget_progress_lines_give_their_percent() {
        let cases = [
            (
                "      0K ........ ........ ........ ........ ........ ........  5% 10.2M 9s",
                Some(5),
            ),
            (
                "  61440K ........ ........ ........ ........ ........ ........ 98% 11.0M 0s",
                Some(98),
            ),
            (
                "  62976K ........ ........ ....                             100% 10.9M=5.8s",
                Some(100),
            ),
            ("  1024K ........ ........ 50%  2.00M 1s", Some(50)),
            (
                "noble.qcow2          45%[=====>      ] 270.5M  10.1MB/s",
                Some(45),
            ),
        ];
        for (line, want) in cases {
            assert_eq!(wget_percent(line), want, "{line}");
        }
    }

    #[test]
    fn other_lines_have_no_percent() {
        for line in [
            "",
            "downloading https://cloud-images.ubuntu.com/noble.img to /var/lib/vz/import/x.qcow2",
            "Length: 612368384 (584M) [application/octet-stream]",
            "calculating checksum...OK, checksum verified",
            "TASK OK",
            "garbage %% x% %5 5 %",
            "-3% 1e2%",
            "  1024K ........ 101% 2.00M 1s",
            "  1024K ........ 250% 2.00M 1s",
            "  1024K ........ 99999999999999999999% 2.00M 1s",
        ] {
            assert_eq!(wget_percent(line), None, "{line:?}");
        }
    }
}
