//! Reconcile errors. Each step of a reconcile has its own type, naming only what that step can
//! fail at: [`SpecError`] (validate, no client required), [`ConnectionError`] (the Secret),
//! [`ObserveError`] (every read), [`ActError`] (every write). They meet in [`Error`], the
//! verdict: a category (a metrics label) and either `Stalled` (a person must change something:
//! the spec, the Secret, the token's privileges) or transient (`Reconciling`, retried with
//! backoff).

use crate::proxmox;

/// Validation: the spec is wrong in a way only the controller can judge (the CRD's schema and
/// CEL rules catch the rest). No client required.
#[derive(Debug, thiserror::Error)]
#[error("spec.{field}: {message}")]
pub struct SpecError {
    pub field: String,
    pub message: String,
}

impl SpecError {
    pub fn new(field: &str, message: impl Into<String>) -> Self {
        SpecError {
            field: field.to_string(),
            message: message.into(),
        }
    }
}

/// The connection: the Secret named by the object (or the controller's default).
#[derive(Debug, thiserror::Error)]
pub enum ConnectionError {
    /// Missing, or its keys do not make a connection; the text names the Secret and the key,
    /// never a value.
    #[error("{0}")]
    Invalid(String),
    /// Reading the Secret failed.
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
}

/// Observation, every read of a GoldenImage reconcile: the connection, the shared inventory.
/// (The upstream checksum's failure is an observation itself, not an error.)
#[derive(Debug, thiserror::Error)]
pub enum ObserveError {
    #[error(transparent)]
    Connection(#[from] ConnectionError),
    /// The shared inventory could not be listed or read.
    #[error("Proxmox: {0}")]
    Inventory(#[from] proxmox::Error),
}

/// Acting, every write of a GoldenImage reconcile that fails it: the annotation, the output
/// ConfigMap, the status. (Its Proxmox writes, the leftover clean-up, are retried on the next
/// reconcile and do not fail this one; a job's errors are its outcome.)
#[derive(Debug, thiserror::Error)]
pub enum ActError {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("cannot encode the output ConfigMap: {0}")]
    Encode(#[from] serde_json::Error),
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The spec is wrong in a way only the controller can judge.
    #[error("spec.{field}: {message}")]
    InvalidSpec { field: String, message: String },
    /// The Proxmox connection cannot be made from what was given (Secret missing or invalid).
    #[error("{0}")]
    Connection(String),
    #[error("Proxmox: {0}")]
    Proxmox(#[from] proxmox::Error),
    /// A build-side step (the cleanup of build VMs) was refused 401/403; its own text.
    #[error("{0}")]
    ProxmoxAuth(String),
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    /// A build or validation step failed for a reason that retrying may fix.
    #[error("{0}")]
    Transient(String),
    /// The token lacks privileges the next writes need (checked before the first one).
    #[error("{0}")]
    Privileges(Box<crate::privileges::Refusal>),
}

impl From<SpecError> for Error {
    fn from(e: SpecError) -> Self {
        Error::InvalidSpec {
            field: e.field,
            message: e.message,
        }
    }
}

impl From<ConnectionError> for Error {
    fn from(e: ConnectionError) -> Self {
        match e {
            ConnectionError::Invalid(text) => Error::Connection(text),
            ConnectionError::Kube(e) => Error::Kube(e),
        }
    }
}

impl From<ObserveError> for Error {
    fn from(e: ObserveError) -> Self {
        match e {
            ObserveError::Connection(e) => e.into(),
            ObserveError::Inventory(e) => Error::Proxmox(e),
        }
    }
}

impl From<ActError> for Error {
    fn from(e: ActError) -> Self {
        match e {
            ActError::Kube(e) => Error::Kube(e),
            e @ ActError::Encode(_) => Error::Transient(e.to_string()),
        }
    }
}

impl From<crate::privileges::PrivilegeError> for Error {
    fn from(e: crate::privileges::PrivilegeError) -> Self {
        match e {
            crate::privileges::PrivilegeError::Insufficient(r) => Error::Privileges(Box::new(r)),
            crate::privileges::PrivilegeError::Proxmox(e) => Error::Proxmox(e),
        }
    }
}

impl Error {
    pub fn invalid_spec(field: &str, message: impl Into<String>) -> Self {
        SpecError::new(field, message).into()
    }

    /// Short, stable metrics label.
    pub fn category(&self) -> &'static str {
        match self {
            Error::InvalidSpec { .. } => "invalid_spec",
            Error::Connection(_) => "connection_config",
            Error::ProxmoxAuth(_) => "proxmox_auth",
            Error::Proxmox(e) => match e {
                proxmox::Error::Unauthenticated { .. } => "proxmox_unauthenticated",
                proxmox::Error::Forbidden { .. } => "proxmox_forbidden",
                proxmox::Error::Tls { .. } => "proxmox_tls",
                e if e.is_retryable() => "proxmox_transient",
                _ => "proxmox",
            },
            Error::Kube(_) => "kubernetes",
            Error::Transient(_) => "transient",
            Error::Privileges(_) => "insufficient_privileges",
        }
    }

    /// Whether retrying without a change cannot help (kstatus `Stalled=True`).
    pub fn is_stalled(&self) -> bool {
        match self {
            Error::InvalidSpec { .. }
            | Error::Connection(_)
            | Error::ProxmoxAuth(_)
            | Error::Privileges(_) => true,
            Error::Proxmox(e) => matches!(
                e,
                proxmox::Error::Unauthenticated { .. }
                    | proxmox::Error::Forbidden { .. }
                    | proxmox::Error::Tls { .. }
                    | proxmox::Error::Config { .. }
                    | proxmox::Error::Unsupported { .. }
            ),
            Error::Kube(kube::Error::Api(s)) => s.is_forbidden(),
            Error::Kube(_) | Error::Transient(_) => false,
        }
    }

    /// CamelCase condition/Event reason.
    pub fn reason(&self) -> &'static str {
        match self {
            Error::InvalidSpec { .. } => "InvalidSpec",
            Error::Connection(_) => "ProxmoxConnectionInvalid",
            Error::ProxmoxAuth(_) => "ProxmoxAuthFailed",
            Error::Proxmox(e) => match e {
                proxmox::Error::Unauthenticated { .. } => "ProxmoxAuthFailed",
                proxmox::Error::Forbidden { .. } => "ProxmoxForbidden",
                proxmox::Error::Tls { .. } => "ProxmoxTlsFailed",
                e if e.is_retryable() => "ProxmoxUnreachable",
                _ => "ProxmoxError",
            },
            Error::Kube(_) => "KubernetesApiError",
            Error::Transient(_) => "RetryingAfterError",
            Error::Privileges(_) => crate::engine::REASON_INSUFFICIENT_PRIVILEGES,
        }
    }

    /// What a person can do about it, appended to the message of conditions and Events.
    pub fn hint(&self) -> &'static str {
        match self {
            Error::InvalidSpec { .. } => "fix the field named above",
            Error::Connection(_) => {
                "fix the Secret named in spec.proxmox.secretRef (or the controller's default connection)"
            }
            Error::Proxmox(proxmox::Error::Unauthenticated { .. }) => {
                "the API token was refused: update tokenId/tokenSecret in the Secret"
            }
            Error::Proxmox(proxmox::Error::Forbidden { .. }) => {
                "grant the token the privileges listed in the sombrero docs"
            }
            Error::ProxmoxAuth(_) => {
                "check tokenId/tokenSecret in the Secret and grant the token the privileges listed in the sombrero docs"
            }
            Error::Proxmox(proxmox::Error::Tls { .. }) => {
                "set caCert or fingerprint in the Secret to trust the Proxmox certificate"
            }
            Error::Proxmox(_) => "retrying with backoff",
            Error::Kube(_) => "retrying with backoff",
            Error::Transient(_) => "retrying with backoff",
            Error::Privileges(_) => "nothing was changed; grant them as shown",
        }
    }

    /// Message for conditions and Events. Never contains a secret: Proxmox errors never carry
    /// the token, and Secret values are never put into errors.
    pub fn message(&self) -> String {
        format!("{self}; {}", self.hint())
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auth_and_spec_errors_stall_transient_ones_do_not() {
        let auth = Error::Proxmox(proxmox::Error::Unauthenticated {
            request: "GET /version".into(),
            message: "invalid token".into(),
        });
        assert!(auth.is_stalled());
        assert_eq!(auth.reason(), "ProxmoxAuthFailed");
        assert_eq!(auth.category(), "proxmox_unauthenticated");
        let down = Error::Proxmox(proxmox::Error::Transient {
            request: "GET /cluster/resources".into(),
            message: "connection refused".into(),
        });
        assert!(!down.is_stalled());
        assert_eq!(down.reason(), "ProxmoxUnreachable");
        assert_eq!(down.category(), "proxmox_transient");
        let privs = Error::from(crate::privileges::PrivilegeError::Insufficient(
            crate::privileges::Refusal {
                token_id: "ci@pve!t".into(),
                version: proxmox::PveVersion { major: 9, minor: 1 },
                missing: vec![crate::privileges::Missing {
                    privilege: "VM.Allocate".into(),
                    path: "/vms/951".into(),
                    needed_for: vec!["destroy leftover build VMs".into()],
                    alternatives: vec![],
                }],
            },
        ));
        assert!(privs.is_stalled());
        assert_eq!(privs.reason(), "InsufficientPrivileges");
        assert_eq!(privs.category(), "insufficient_privileges");
        assert!(privs.message().contains("VM.Allocate on /vms/951"));
        let spec = Error::invalid_spec("rebuild.schedule", "not a cron expression");
        assert!(spec.is_stalled());
        assert!(spec.message().starts_with("spec.rebuild.schedule: "));
    }

    #[test]
    fn each_step_error_gets_the_verdict_of_what_failed() {
        let transient = || proxmox::Error::Transient {
            request: "GET /cluster/resources".into(),
            message: "connection refused".into(),
        };
        let refused = || proxmox::Error::Unauthenticated {
            request: "GET /cluster/resources".into(),
            message: "invalid token".into(),
        };
        let encode = serde_json::from_str::<u32>("x").unwrap_err();
        // (error, stalled, reason, message starts with)
        let cases: Vec<(Error, bool, &str, &str)> = vec![
            (
                SpecError::new("rebuild.schedule", "not a cron expression").into(),
                true,
                "InvalidSpec",
                "spec.rebuild.schedule: not a cron expression; fix the field",
            ),
            (
                ConnectionError::Invalid("Secret ns/pve: key tokenId is missing".into()).into(),
                true,
                "ProxmoxConnectionInvalid",
                "Secret ns/pve: key tokenId is missing; fix the Secret",
            ),
            (
                ObserveError::Connection(ConnectionError::Invalid("no Proxmox connection".into()))
                    .into(),
                true,
                "ProxmoxConnectionInvalid",
                "no Proxmox connection; fix the Secret",
            ),
            (
                ObserveError::Inventory(transient()).into(),
                false,
                "ProxmoxUnreachable",
                "Proxmox: GET /cluster/resources: transient failure",
            ),
            (
                ObserveError::Inventory(refused()).into(),
                true,
                "ProxmoxAuthFailed",
                "Proxmox: ",
            ),
            (
                ActError::Encode(encode).into(),
                false,
                "RetryingAfterError",
                "cannot encode the output ConfigMap: ",
            ),
        ];
        for (i, (e, stalled, reason, message)) in cases.into_iter().enumerate() {
            assert_eq!(e.is_stalled(), stalled, "case {i}: {e}");
            assert_eq!(e.reason(), reason, "case {i}");
            assert!(
                e.message().starts_with(message),
                "case {i}: {}",
                e.message()
            );
        }
    }
}
