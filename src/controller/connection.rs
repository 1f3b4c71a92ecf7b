//! The Proxmox connection of a GoldenImage: from the Secret its `spec.proxmox.secretRef` names
//! (keys `url`, `tokenId`, `tokenSecret`, optional `caCert` or `fingerprint`), else the
//! controller's default (a Secret in the controller's namespace, or the `PROXMOX_*`
//! environment). Secret values go into the client's config only: never into a log, an error,
//! an Event or the status.
//!
//! A Secret is read (`GET`) once per version: the parsed [`Connection`] is kept in memory
//! ([`ConnectionCache`]) and reused while the controller's metadata-only Secret watch shows the
//! resourceVersion it was parsed at ([`cached`]); a changed, deleted or re-created Secret has
//! another resourceVersion, so the reconcile its watch event triggers reads it again.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

use k8s_openapi::api::core::v1::Secret;
use kube::Api;
use kube::api::ObjectMeta;
use kube::core::PartialObjectMeta;
use kube::runtime::reflector::{ObjectRef, Store};
use sha2::{Digest, Sha256};

use super::error::ConnectionError;

type Result<T, E = ConnectionError> = std::result::Result<T, E>;
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
        ConnectionError::Invalid(format!("Secret {secret}: {text}"))
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

/// The metadata-only Secret watch's objects as the cache keeps them: name, namespace and
/// resourceVersion (labels, annotations and managed fields are dropped before the store, so
/// unrelated Secrets cost next to nothing).
pub fn strip_secret_meta(s: &mut PartialObjectMeta<Secret>) {
    let m = &mut s.metadata;
    *m = ObjectMeta {
        name: m.name.take(),
        namespace: m.namespace.take(),
        resource_version: m.resource_version.take(),
        ..Default::default()
    };
}

/// Which parsed connection: the Secret, and `spec.proxmox.insecureSkipTlsVerify` (part of the
/// config).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct CacheKey {
    pub namespace: String,
    pub name: String,
    pub insecure: bool,
}

/// A connection parsed from a Secret as it was at `resource_version`.
#[derive(Clone, Debug)]
pub struct Parsed {
    pub resource_version: String,
    pub conn: Connection,
}

/// The cached connection, when it was parsed from the very version the Secret watch showed
/// last (pure). A Secret the watch has not shown (yet), or one parsed at another version (the
/// Secret changed since; or the read returned another version than the watch had seen), is
/// read again.
pub fn cached<'a>(watched: Option<&str>, parsed: Option<&'a Parsed>) -> Option<&'a Connection> {
    let p = parsed?;
    (watched? == p.resource_version).then_some(&p.conn)
}

/// Connections parsed from Secrets, reused while the Secret watch shows the same
/// resourceVersion. The Secret values are in the parsed configs only, in memory: never logged.
#[derive(Default)]
pub struct ConnectionCache {
    /// The Secret watches' stores (one per watched scope, and the default Secret's namespace).
    watched: Mutex<Vec<Store<PartialObjectMeta<Secret>>>>,
    parsed: Mutex<HashMap<CacheKey, Parsed>>,
}

impl ConnectionCache {
    /// Adds a Secret watch's store (the controller does, once per scope).
    pub fn watch(&self, store: Store<PartialObjectMeta<Secret>>) {
        self.watched
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(store);
    }

    /// The resourceVersion the watch showed last for the Secret (None: not shown).
    fn watched_version(&self, namespace: &str, name: &str) -> Option<String> {
        let key = ObjectRef::new(name).within(namespace);
        self.watched
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .find_map(|s| {
                s.get(&key)
                    .and_then(|m| m.metadata.resource_version.clone())
            })
    }

    fn lookup(&self, key: &CacheKey, watched: Option<&str>) -> Option<Connection> {
        let parsed = self.parsed.lock().unwrap_or_else(|e| e.into_inner());
        cached(watched, parsed.get(key)).cloned()
    }

    fn store(&self, key: CacheKey, parsed: Option<Parsed>) {
        let mut map = self.parsed.lock().unwrap_or_else(|e| e.into_inner());
        match parsed {
            Some(p) => map.insert(key, p),
            None => map.remove(&key),
        };
    }

    /// The connection from Secret `namespace/name`: the cached one while the watch shows the
    /// version it was parsed at, else the Secret read and parsed (and kept, under the version
    /// the read returned).
    async fn secret_connection(
        &self,
        client: &kube::Client,
        namespace: &str,
        name: &str,
        insecure: bool,
    ) -> Result<Connection> {
        let key = CacheKey {
            namespace: namespace.to_string(),
            name: name.to_string(),
            insecure,
        };
        // The watched version is taken before the read: a read answering a newer version is
        // kept under that version and used once the watch shows it too.
        let watched = self.watched_version(namespace, name);
        if let Some(conn) = self.lookup(&key, watched.as_deref()) {
            return Ok(conn);
        }
        let api: Api<Secret> = Api::namespaced(client.clone(), namespace);
        let Some(secret) = api.get_opt(name).await? else {
            self.store(key, None);
            return Err(ConnectionError::Invalid(format!(
                "Secret {namespace}/{name} does not exist; create it with keys url, tokenId, tokenSecret (and caCert or fingerprint)"
            )));
        };
        let parsed = config_from_secret(
            &secret_strings(&secret),
            &format!("{namespace}/{name}"),
            insecure,
        )
        .map(Connection::new);
        let keep = match (&parsed, secret.metadata.resource_version) {
            (Ok(conn), Some(rv)) => Some(Parsed {
                resource_version: rv,
                conn: conn.clone(),
            }),
            _ => None,
        };
        self.store(key, keep);
        parsed
    }
}

/// The connection for `gi`.
pub async fn resolve(
    client: &kube::Client,
    cache: &ConnectionCache,
    default: &DefaultConnection,
    gi: &GoldenImage,
) -> Result<Connection> {
    let namespace = gi.metadata.namespace.as_deref().unwrap_or("default");
    resolve_for(client, cache, default, namespace, gi.spec.proxmox.as_ref()).await
}

/// The connection of an object in `namespace` with `spec.proxmox` = `proxmox`: its Secret, else
/// the controller's default. Shared by the GoldenImage and TemplateRetention reconcilers.
pub async fn resolve_for(
    client: &kube::Client,
    cache: &ConnectionCache,
    default: &DefaultConnection,
    namespace: &str,
    proxmox: Option<&ProxmoxConnection>,
) -> Result<Connection> {
    if let Some(p) = proxmox {
        return cache
            .secret_connection(
                client,
                namespace,
                &p.secret_ref.name,
                p.insecure_skip_tls_verify,
            )
            .await;
    }
    match default {
        DefaultConnection::Secret { namespace, name } => {
            cache.secret_connection(client, namespace, name, false).await
        }
        DefaultConnection::Env(config) => Ok(Connection::new(config.clone())),
        DefaultConnection::None => Err(ConnectionError::Invalid(
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

    fn parsed_at(rv: &str, secret: &str) -> Parsed {
        Parsed {
            resource_version: rv.into(),
            conn: Connection::new(pc::Config::new("https://pve1:8006", "a@pve!t", secret).unwrap()),
        }
    }

    #[test]
    fn a_parsed_connection_serves_only_while_the_watch_shows_its_version() {
        let p = parsed_at("41", "one");
        let cases: [(&str, Option<&str>, Option<&Parsed>, bool); 5] = [
            ("same version as watched", Some("41"), Some(&p), true),
            // Changed (or deleted: a delete event has its own version) since it was parsed.
            ("the watch moved on", Some("42"), Some(&p), false),
            // The read answered another version than the watch shows: not current.
            ("read older than watched", Some("40"), Some(&p), false),
            ("not watched (yet)", None, Some(&p), false),
            ("never parsed", Some("41"), None, false),
        ];
        for (what, watched, parsed, hit) in cases {
            assert_eq!(cached(watched, parsed).is_some(), hit, "{what}");
        }
        assert_eq!(
            cached(Some("41"), Some(&p)).unwrap().digest,
            p.conn.digest,
            "the parsed connection itself"
        );
    }

    #[test]
    fn the_watch_keeps_only_name_namespace_and_version_of_a_secret() {
        let mut s: PartialObjectMeta<Secret> = serde_json::from_value(serde_json::json!({
            "apiVersion": "meta.k8s.io/v1", "kind": "PartialObjectMetadata",
            "metadata": {"name": "pve", "namespace": "ns", "resourceVersion": "7",
                "annotations": {"kubectl.kubernetes.io/last-applied-configuration": "{\"data\":\"x\"}"},
                "labels": {"a": "b"}, "uid": "u"}
        }))
        .unwrap();
        strip_secret_meta(&mut s);
        assert_eq!(
            s.metadata,
            ObjectMeta {
                name: Some("pve".into()),
                namespace: Some("ns".into()),
                resource_version: Some("7".into()),
                ..Default::default()
            }
        );
    }

    #[test]
    fn a_changed_secret_changes_the_digest_not_the_cluster() {
        let a = Connection::new(pc::Config::new("https://pve1:8006", "a@pve!t", "one").unwrap());
        let b = Connection::new(pc::Config::new("https://pve1:8006", "a@pve!t", "two").unwrap());
        assert_eq!(a.cluster_key, b.cluster_key);
        assert_ne!(a.digest, b.digest);
    }
}
