//! The Proxmox connection of a GoldenImage: from the Secret its `spec.proxmox.secretRef` names
//! (keys `url`, `tokenId`, `tokenSecret`, optional `caCert` or `fingerprint`), else the
//! controller's default (a Secret in the controller's namespace, or the `PROXMOX_*`
//! environment). Secret values go into the client's config only: never into a log, an error,
//! an Event or the status.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Secret;
use kube::Api;
use sha2::{Digest, Sha256};

use super::error::{Error, Result};
use crate::api::GoldenImage;
use crate::api::common::ProxmoxConnection;
use crate::proxmox::{self, config as pc};

/// Secret keys and the environment variables of `proxmox::Config::from_lookup` they stand for.
const KEYS: [(&str, &str); 5] = [
    ("url", pc::ENV_URL),
    ("tokenId", pc::ENV_TOKEN_ID),
    ("tokenSecret", pc::ENV_TOKEN_SECRET),
    ("caCert", pc::ENV_CA_CERT),
    ("fingerprint", pc::ENV_FINGERPRINT),
];

/// Where the controller's default connection comes from.
#[derive(Clone, Debug)]
pub enum DefaultConnection {
    /// A Secret (same keys) in the controller's namespace.
    Secret {
        namespace: String,
        name: String,
    },
    /// Read once from `PROXMOX_*` at start.
    Env(proxmox::Config),
    None,
}

/// A resolved connection: the config, the cluster key (URL + token id) that groups objects
/// sharing one inventory, and a digest of everything (secret included) that tells a changed
/// credential apart without keeping it in clear anywhere else.
#[derive(Clone, Debug)]
pub struct Connection {
    pub config: proxmox::Config,
    pub cluster_key: String,
    pub digest: String,
}

impl Connection {
    pub fn new(config: proxmox::Config) -> Self {
        let cluster_key = format!("{}|{}", config.url, config.token_id);
        let mut h = Sha256::new();
        h.update(cluster_key.as_bytes());
        h.update([0]);
        h.update(config.token_secret.expose().as_bytes());
        h.update([0]);
        h.update(format!("{:?}", config.tls).as_bytes());
        Connection {
            config,
            cluster_key,
            digest: hex::encode(h.finalize()),
        }
    }
}

/// Builds a config from a Secret's data. Errors name the Secret and the key, never a value.
pub fn config_from_secret(
    data: &BTreeMap<String, String>,
    secret: &str,
    insecure: bool,
) -> Result<proxmox::Config> {
    let lookup = |env: &str| {
        if env == pc::ENV_INSECURE {
            return insecure.then(|| "true".to_string());
        }
        KEYS.iter()
            .find(|(_, e)| *e == env)
            .and_then(|(key, _)| data.get(*key).cloned())
    };
    let config = pc::Config::from_lookup(lookup).map_err(|e| {
        let mut text = e.to_string();
        for (key, env) in KEYS {
            text = text.replace(env, &format!("key {key}"));
        }
        text = text.replace(pc::ENV_INSECURE, "spec.proxmox.insecureSkipTlsVerify");
        Error::Connection(format!("Secret {secret}: {text}"))
    })?;
    Ok(config)
}

fn secret_strings(secret: &Secret) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    if let Some(data) = &secret.data {
        for (k, v) in data {
            if let Ok(s) = String::from_utf8(v.0.clone()) {
                out.insert(k.clone(), s);
            }
        }
    }
    if let Some(data) = &secret.string_data {
        for (k, v) in data {
            out.insert(k.clone(), v.clone());
        }
    }
    out
}

async fn read_secret(
    client: &kube::Client,
    namespace: &str,
    name: &str,
) -> Result<BTreeMap<String, String>> {
    let api: Api<Secret> = Api::namespaced(client.clone(), namespace);
    match api.get_opt(name).await? {
        Some(s) => Ok(secret_strings(&s)),
        None => Err(Error::Connection(format!(
            "Secret {namespace}/{name} does not exist; create it with keys url, tokenId, tokenSecret (and caCert or fingerprint)"
        ))),
    }
}

/// The connection for `gi`.
pub async fn resolve(
    client: &kube::Client,
    default: &DefaultConnection,
    gi: &GoldenImage,
) -> Result<Connection> {
    let namespace = gi.metadata.namespace.as_deref().unwrap_or("default");
    resolve_for(client, default, namespace, gi.spec.proxmox.as_ref()).await
}

/// The connection of an object in `namespace` with `spec.proxmox` = `proxmox`: its Secret, else
/// the controller's default. Shared by the GoldenImage and TemplateRetention reconcilers.
pub async fn resolve_for(
    client: &kube::Client,
    default: &DefaultConnection,
    namespace: &str,
    proxmox: Option<&ProxmoxConnection>,
) -> Result<Connection> {
    if let Some(p) = proxmox {
        let name = &p.secret_ref.name;
        let data = read_secret(client, namespace, name).await?;
        let config = config_from_secret(
            &data,
            &format!("{namespace}/{name}"),
            p.insecure_skip_tls_verify,
        )?;
        return Ok(Connection::new(config));
    }
    match default {
        DefaultConnection::Secret { namespace, name } => {
            let data = read_secret(client, namespace, name).await?;
            let config = config_from_secret(&data, &format!("{namespace}/{name}"), false)?;
            Ok(Connection::new(config))
        }
        DefaultConnection::Env(config) => Ok(Connection::new(config.clone())),
        DefaultConnection::None => Err(Error::Connection(
            "no Proxmox connection: set spec.proxmox.secretRef, or start the controller with --proxmox-secret or the PROXMOX_* environment".into(),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn secret_keys_map_to_the_config() {
        let c = config_from_secret(
            &data(&[
                ("url", "https://pve1:8006"),
                ("tokenId", "sombrero@pve!ctl"),
                ("tokenSecret", "s3cr3t-value\n"),
            ]),
            "ns/pve",
            true,
        )
        .unwrap();
        assert_eq!(c.token_id, "sombrero@pve!ctl");
        assert_eq!(c.token_secret.expose(), "s3cr3t-value");
        assert!(matches!(c.tls, proxmox::TlsMode::Insecure));
        let conn = Connection::new(c);
        assert_eq!(conn.cluster_key, "https://pve1:8006/|sombrero@pve!ctl");
        assert!(!format!("{conn:?}").contains("s3cr3t-value"));
    }

    #[test]
    fn a_missing_key_is_named_without_values() {
        let err = config_from_secret(
            &data(&[("url", "https://pve1:8006"), ("tokenSecret", "s3cr3t")]),
            "ns/pve",
            false,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("Secret ns/pve"), "{err}");
        assert!(err.contains("key tokenId"), "{err}");
        assert!(!err.contains("s3cr3t"), "{err}");
        assert!(!err.contains("PROXMOX_"), "{err}");
    }

    #[test]
    fn a_changed_secret_changes_the_digest_not_the_cluster() {
        let a = Connection::new(pc::Config::new("https://pve1:8006", "a@pve!t", "one").unwrap());
        let b = Connection::new(pc::Config::new("https://pve1:8006", "a@pve!t", "two").unwrap());
        assert_eq!(a.cluster_key, b.cluster_key);
        assert_ne!(a.digest, b.digest);
    }
}
