//! Classified errors of the Proxmox client.
//!
//! PVE answers nearly every handler failure with HTTP 500, so the class comes from the status
//! *and* the message: "does not exist" is a not-found, "VM is locked (...)" and "can't lock file
//! ... got timeout" are lock conflicts, "already exists" is a VMID collision. The message is the
//! JSON `message` field (pve-http-server >= 5.2), else the HTTP reason phrase, which is the only
//! place older versions put it.

use std::collections::BTreeMap;

/// Result of a Proxmox call.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything a Proxmox call can fail with. `request` is `"METHOD /path"` (never a secret).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// 400 "Parameter verification failed." with PVE's per-parameter messages.
    #[error("{request}: invalid parameter: {message}{}", fmt_errors(.errors))]
    InvalidParameter {
        request: String,
        message: String,
        errors: BTreeMap<String, String>,
    },
    /// 401: the token is unknown, expired, disabled or its secret is wrong.
    #[error("{request}: authentication failed: {message} (check the API token id and secret)")]
    Unauthenticated { request: String, message: String },
    /// 403: the token lacks a privilege (PVE names the path and the privilege).
    #[error("{request}: permission denied: {message}")]
    Forbidden { request: String, message: String },
    /// The VM, storage, volume or task does not exist (PVE mostly says so with a 500).
    #[error("{request}: not found: {message}")]
    NotFound { request: String, message: String },
    /// The VM config or a storage is locked by another operation; worth retrying later.
    #[error("{request}: locked: {message}")]
    Locked { request: String, message: String },
    /// The VMID (or another unique name) is taken: `nextid` does not reserve IDs.
    #[error("{request}: already exists: {message}")]
    AlreadyExists { request: String, message: String },
    /// A worker task ended with an error. `exitstatus` is PVE's error text.
    #[error("task {upid} failed: {exitstatus}")]
    TaskFailed {
        upid: String,
        exitstatus: String,
        log_tail: Vec<String>,
    },
    /// The network or a proxy in between failed (connection errors, HTTP 502-504 and 59x).
    #[error("{request}: transient failure: {message}")]
    Transient { request: String, message: String },
    /// A call or a task wait ran past its deadline.
    #[error("{request}: timed out: {message}")]
    Timeout { request: String, message: String },
    /// The TLS handshake failed: an unknown CA, a wrong pinned fingerprint, a bad certificate.
    #[error("{request}: TLS: {message}")]
    Tls { request: String, message: String },
    /// The reply could not be decoded into the expected type.
    #[error("{request}: unexpected reply: {message}")]
    Decode { request: String, message: String },
    /// The client's settings are wrong or incomplete.
    #[error("Proxmox configuration: {message}")]
    Config { message: String },
    /// The Proxmox VE version lacks a feature the call needs.
    #[error("unsupported by this Proxmox VE: {message}")]
    Unsupported { message: String },
    /// Any other reply with an error status.
    #[error("{request}: HTTP {status}: {message}")]
    Api {
        request: String,
        status: u16,
        message: String,
    },
}

fn fmt_errors(errors: &BTreeMap<String, String>) -> String {
    if errors.is_empty() {
        return String::new();
    }
    let parts: Vec<String> = errors.iter().map(|(k, v)| format!("{k}: {v}")).collect();
    format!(" ({})", parts.join("; "))
}

impl Error {
    /// The guest's agent answered, through PVE (qemu-ga's "Agent error: ...": a missing program,
    /// an unknown pid), or is not there to answer: about the guest, not the Proxmox side.
    pub fn is_guest_side(&self) -> bool {
        match self {
            Error::Api { message, .. } => {
                let m = message.to_ascii_lowercase();
                m.starts_with("agent error:")
                    || m.contains("guest agent")
                    || m.contains("qmp command")
                    || m.contains("not running")
            }
            _ => false,
        }
    }

    /// Whether the same call may succeed later without any change on our side. The client
    /// itself repeats only calls that cannot do harm twice; see `client.rs`.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            Error::Transient { .. } | Error::Locked { .. } | Error::Timeout { .. }
        )
    }

    /// The call may have been carried out although it failed: the answer was lost (connection
    /// reset or timeout after sending, a proxy's 502-504). A write failing so must be followed by
    /// a read of what happened, not taken as "not done".
    pub fn outcome_unknown(&self) -> bool {
        matches!(self, Error::Transient { .. } | Error::Timeout { .. })
    }

    /// A short, stable label for metrics and logs.
    pub fn category(&self) -> &'static str {
        match self {
            Error::InvalidParameter { .. } => "invalid_parameter",
            Error::Unauthenticated { .. } => "unauthenticated",
            Error::Forbidden { .. } => "forbidden",
            Error::NotFound { .. } => "not_found",
            Error::Locked { .. } => "locked",
            Error::AlreadyExists { .. } => "already_exists",
            Error::TaskFailed { .. } => "task_failed",
            Error::Transient { .. } => "transient",
            Error::Timeout { .. } => "timeout",
            Error::Tls { .. } => "tls",
            Error::Decode { .. } => "decode",
            Error::Config { .. } => "config",
            Error::Unsupported { .. } => "unsupported",
            Error::Api { .. } => "api",
        }
    }

    pub fn is_not_found(&self) -> bool {
        matches!(self, Error::NotFound { .. })
    }

    pub fn is_already_exists(&self) -> bool {
        matches!(self, Error::AlreadyExists { .. })
    }

    /// PVE refused to make a disk smaller: a task's exit status since qemu-server 8.0.1 (the
    /// resize runs in a worker), an API error before.
    pub fn is_shrink_refused(&self) -> bool {
        self.pve_message()
            .is_some_and(|m| m.contains("shrinking disks is not supported"))
    }

    /// PVE's own text: the message of an API error, the exit status of a failed task.
    pub fn pve_message(&self) -> Option<&str> {
        match self {
            Error::InvalidParameter { message, .. }
            | Error::Unauthenticated { message, .. }
            | Error::Forbidden { message, .. }
            | Error::NotFound { message, .. }
            | Error::Locked { message, .. }
            | Error::AlreadyExists { message, .. }
            | Error::Api { message, .. } => Some(message),
            Error::TaskFailed { exitstatus, .. } => Some(exitstatus),
            _ => None,
        }
    }

    pub(crate) fn config(message: impl Into<String>) -> Self {
        Error::Config {
            message: message.into(),
        }
    }

    /// Classify an HTTP error reply. `reason` is the reply's reason phrase when it is not the
    /// canonical one for the status (hyper keeps only those), `body` the raw body.
    pub fn from_response(request: &str, status: u16, reason: Option<&str>, body: &[u8]) -> Self {
        let parsed: Option<serde_json::Value> = serde_json::from_slice(body).ok();
        let body_message = parsed
            .as_ref()
            .and_then(|v| v.get("message"))
            .and_then(|m| m.as_str())
            .map(|m| m.trim().to_owned())
            .filter(|m| !m.is_empty());
        let errors: BTreeMap<String, String> = parsed
            .as_ref()
            .and_then(|v| v.get("errors"))
            .and_then(|e| e.as_object())
            .map(|o| {
                o.iter()
                    .map(|(k, v)| {
                        (
                            k.clone(),
                            crate::proxmox::lenient::scalar_to_string(v)
                                .trim()
                                .to_owned(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        let message = body_message
            .or_else(|| {
                reason
                    .map(|r| r.trim().to_owned())
                    .filter(|r| !r.is_empty())
            })
            // A proxy's page or a plain-text error: its text is better than a bare status.
            .or_else(|| {
                if parsed.is_none() {
                    body_text(body)
                } else {
                    None
                }
            })
            .or_else(|| {
                reqwest::StatusCode::from_u16(status)
                    .ok()
                    .and_then(|s| s.canonical_reason())
                    .map(str::to_owned)
            })
            .unwrap_or_else(|| format!("HTTP status {status}"));
        classify(request.to_owned(), status, message, errors)
    }
}

/// The readable text of a non-JSON body: tags dropped, whitespace collapsed, at most 300 chars.
fn body_text(body: &[u8]) -> Option<String> {
    let raw = String::from_utf8_lossy(body);
    let mut text = String::new();
    let mut in_tag = false;
    for ch in raw.chars() {
        match ch {
            '<' => {
                in_tag = true;
                text.push(' ');
            }
            '>' if in_tag => in_tag = false,
            _ if !in_tag => text.push(ch),
            _ => {}
        }
    }
    let text: String = text.split_whitespace().collect::<Vec<_>>().join(" ");
    let text: String = text.chars().take(300).collect();
    (!text.is_empty()).then_some(text)
}

fn classify(
    request: String,
    status: u16,
    message: String,
    errors: BTreeMap<String, String>,
) -> Error {
    let lower = message.to_ascii_lowercase();
    let any_error_says = |needle: &str| {
        errors
            .values()
            .any(|v| v.to_ascii_lowercase().contains(needle))
    };
    match status {
        400 if any_error_says("already exists") || lower.contains("already exists") => {
            let message = if errors.is_empty() {
                message
            } else {
                format!("{message}{}", fmt_errors(&errors))
            };
            Error::AlreadyExists { request, message }
        }
        400 => Error::InvalidParameter {
            request,
            message,
            errors,
        },
        401 => Error::Unauthenticated { request, message },
        403 => Error::Forbidden { request, message },
        404 => Error::NotFound { request, message },
        408 => Error::Timeout { request, message },
        // Proxies and pveproxy's own pseudo-statuses (AnyEvent::HTTP 595-599) mean the request
        // did not get a proper answer; whether it ran is decided by the caller (client.rs).
        429 | 502 | 503 | 504 | 595..=599 => Error::Transient { request, message },
        // The guest agent's own answer, forwarded by PVE as a 500 (`check_agent_error`), e.g.
        // an exec of a missing program: "... (No such file or directory)" is the guest's, not
        // a Proxmox object that is missing.
        _ if lower.starts_with("agent error:") => Error::Api {
            request,
            status,
            message,
        },
        _ if is_lock_message(&lower) => Error::Locked { request, message },
        _ if lower.contains("does not exist")
            || lower.contains("no such ")
            || lower.contains("not found") =>
        {
            Error::NotFound { request, message }
        }
        _ if lower.contains("already exists") => Error::AlreadyExists { request, message },
        // fork_worker failed before the task started (pve-common RESTEnvironment.pm).
        _ if lower.contains("got no worker upid") => Error::Transient { request, message },
        _ => Error::Api {
            request,
            status,
            message,
        },
    }
}

pub(crate) fn is_lock_message(lower: &str) -> bool {
    lower.contains("vm is locked")
        || lower.contains("ct is locked")
        || (lower.contains("can't lock file") && lower.contains("got timeout"))
        || lower.contains("unable to lock")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(status: u16, reason: Option<&str>, body: &str) -> Error {
        Error::from_response("GET /x", status, reason, body.as_bytes())
    }

    #[test]
    fn parameter_errors_keep_the_field_messages() {
        let e = err(
            400,
            Some("Parameter verification failed."),
            r#"{"data":null,"errors":{"sshkeys":"invalid format - invalid urlencoded string: ssh-rsa+AAAA\n"},"message":"Parameter verification failed.\n"}"#,
        );
        match &e {
            Error::InvalidParameter {
                message, errors, ..
            } => {
                assert_eq!(message, "Parameter verification failed.");
                assert_eq!(
                    errors["sshkeys"],
                    "invalid format - invalid urlencoded string: ssh-rsa+AAAA"
                );
            }
            other => panic!("{other:?}"),
        }
        assert!(e.to_string().contains("sshkeys: invalid format"));
        assert_eq!(e.category(), "invalid_parameter");
        assert!(!e.is_retryable());
    }

    #[test]
    fn nextid_collision_is_already_exists() {
        let e = err(
            400,
            None,
            r#"{"errors":{"vmid":"VM 218 already exists"},"data":null}"#,
        );
        assert!(e.is_already_exists(), "{e:?}");
        assert!(e.to_string().contains("VM 218 already exists"));
    }

    #[test]
    fn not_found_is_a_500_with_does_not_exist() {
        let e = err(
            500,
            None,
            r#"{"data":null,"message":"Configuration file 'nodes/pve1/qemu-server/9000.conf' does not exist\n"}"#,
        );
        assert!(e.is_not_found(), "{e:?}");
        assert_eq!(
            e.pve_message(),
            Some("Configuration file 'nodes/pve1/qemu-server/9000.conf' does not exist")
        );
        assert_eq!(err(404, None, "").category(), "not_found");
    }

    #[test]
    fn message_falls_back_to_the_reason_phrase() {
        // PVE < 8.4: empty JSON body, the text only in the status line.
        let e = err(
            500,
            Some("can't lock file '/var/lock/qemu-server/lock-203.conf' - got timeout"),
            r#"{"data":null}"#,
        );
        assert_eq!(e.category(), "locked");
        assert!(e.is_retryable());
        assert!(e.to_string().contains("lock-203.conf"));
        let e = err(
            502,
            None,
            "<html><head><title>502</title></head><body><h1>Bad Gateway</h1>\n upstream down</body></html>",
        );
        assert!(
            e.to_string().contains("502 Bad Gateway upstream down"),
            "{e}"
        );
        assert_eq!(err(500, None, "VM is locked (clone)").category(), "locked");
        let e = err(500, None, "");
        assert_eq!(
            e,
            Error::Api {
                request: "GET /x".into(),
                status: 500,
                message: "Internal Server Error".into()
            }
        );
        let e = err(599, None, "");
        assert_eq!(e.pve_message(), None);
        assert!(e.to_string().contains("HTTP status 599") || e.to_string().contains("599"));
    }

    #[test]
    fn classification_table() {
        let cases = [
            (401, "", "unauthenticated"),
            (
                403,
                r#"{"message":"Permission check failed (/vms/100, VM.Allocate)\n"}"#,
                "forbidden",
            ),
            (500, r#"{"message":"VM is locked (clone)\n"}"#, "locked"),
            (
                500,
                r#"{"message":"unable to create VM 102 - VM 102 already exists on node 'x'\n"}"#,
                "already_exists",
            ),
            (
                500,
                r#"{"message":"got no worker upid - start worker failed\n"}"#,
                "transient",
            ),
            (500, r#"{"message":"no such task\n"}"#, "not_found"),
            // qemu-ga's GenericError for an exec of a missing program, as PVE forwards it.
            (
                500,
                r#"{"message":"Agent error: Guest agent command failed, error was 'Failed to execute child process \u201cfrobnicate\u201d (No such file or directory)'\n"}"#,
                "api",
            ),
            (
                500,
                r#"{"message":"Agent error: Invalid parameter 'pid'\n"}"#,
                "api",
            ),
            (
                500,
                r#"{"message":"you can't convert a VM to template if VM is running\n"}"#,
                "api",
            ),
            (595, "", "transient"),
            (596, "", "transient"),
            (502, "", "transient"),
            (503, "", "transient"),
            (
                501,
                r#"{"message":"Method 'GET /foo' not implemented\n"}"#,
                "api",
            ),
        ];
        for (status, body, want) in cases {
            assert_eq!(err(status, None, body).category(), want, "{status} {body}");
        }
    }

    #[test]
    fn task_failed_shows_the_exit_status() {
        let e = Error::TaskFailed {
            upid: "UPID:pve:1:2:3:qmstart:100:u@pam!t:".into(),
            exitstatus: "VM 100 already running".into(),
            log_tail: vec!["TASK ERROR: VM 100 already running".into()],
        };
        assert_eq!(
            e.to_string(),
            "task UPID:pve:1:2:3:qmstart:100:u@pam!t: failed: VM 100 already running"
        );
        assert_eq!(e.category(), "task_failed");
        assert_eq!(e.pve_message(), Some("VM 100 already running"));
    }

    #[test]
    fn a_refused_shrink_is_told_apart_as_a_task_and_as_an_api_error() {
        let task = Error::TaskFailed {
            upid: "UPID:pve1:1:2:3:resize:100:root@pam:".into(),
            exitstatus: "shrinking disks is not supported".into(),
            log_tail: vec![],
        };
        assert!(task.is_shrink_refused());
        let api = err(
            500,
            None,
            r#"{"data":null,"message":"shrinking disks is not supported\n"}"#,
        );
        assert!(api.is_shrink_refused());
        let other = Error::TaskFailed {
            upid: "UPID:pve1:1:2:3:resize:100:root@pam:".into(),
            exitstatus: "disk 'scsi0' does not exist".into(),
            log_tail: vec![],
        };
        assert!(!other.is_shrink_refused());
    }
}
