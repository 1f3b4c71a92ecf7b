//! Connection settings: where Proxmox is, which API token to use and how to trust its TLS
//! certificate.

use std::fmt;
use std::time::Duration;

use url::Url;

use super::error::{Error, Result};
use super::retry::RetryPolicy;
use super::secret::Secret;
use super::tls::{self, TlsMode};

/// Settings for a [`Client`](super::Client). `Debug` never shows the token secret.
#[derive(Clone)]
pub struct Config {
    /// `https://host:8006` (a trailing `/` or `/api2/json` is dropped).
    pub url: Url,
    /// `USER@REALM!TOKENID`, e.g. `sombrero@pve!controller`.
    pub token_id: String,
    pub token_secret: Secret,
    pub tls: TlsMode,
    /// Upper bound of every single HTTP call (pveproxy gives up on proxied calls after 30 s).
    pub timeout: Duration,
    pub connect_timeout: Duration,
    pub retry: RetryPolicy,
}

impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Config")
            .field("url", &self.url.as_str())
            .field("token_id", &self.token_id)
            .field("token_secret", &self.token_secret)
            .field("tls", &self.tls)
            .field("timeout", &self.timeout)
            .field("connect_timeout", &self.connect_timeout)
            .field("retry", &self.retry)
            .finish()
    }
}

pub const ENV_URL: &str = "PROXMOX_URL";
pub const ENV_TOKEN_ID: &str = "PROXMOX_TOKEN_ID";
pub const ENV_TOKEN_SECRET: &str = "PROXMOX_TOKEN_SECRET";
pub const ENV_CA_CERT: &str = "PROXMOX_CA_CERT";
pub const ENV_FINGERPRINT: &str = "PROXMOX_FINGERPRINT";
pub const ENV_INSECURE: &str = "PROXMOX_INSECURE";

impl Config {
    /// Settings with the platform trust store and default timeouts and retries.
    pub fn new(url: &str, token_id: &str, token_secret: impl Into<Secret>) -> Result<Self> {
        Self::checked(
            normalize_url(url, "the url")?,
            token_id.trim().to_owned(),
            token_secret.into(),
            "the token id",
            "the token secret",
        )
    }

    /// The defaults around a checked token; `id_name` and `secret_name` name the settings in
    /// errors (the environment variable or the argument).
    fn checked(
        url: Url,
        token_id: String,
        token_secret: Secret,
        id_name: &str,
        secret_name: &str,
    ) -> Result<Self> {
        validate_token(&token_id, &token_secret, id_name, secret_name)?;
        Ok(Config {
            url,
            token_id,
            token_secret,
            tls: TlsMode::System,
            timeout: Duration::from_secs(60),
            connect_timeout: Duration::from_secs(10),
            retry: RetryPolicy::default(),
        })
    }

    /// Trust only this CA (PEM text).
    pub fn with_ca_pem(mut self, pem: impl Into<String>) -> Result<Self> {
        let pem = pem.into();
        tls::parse_ca_pem(&pem)?;
        self.tls = TlsMode::CaBundle(pem);
        Ok(self)
    }

    /// Accept only the certificate with this SHA-256 fingerprint (`AA:BB:..` or plain hex).
    pub fn with_fingerprint(mut self, fingerprint: &str) -> Result<Self> {
        self.tls = TlsMode::Fingerprint(tls::parse_fingerprint(fingerprint)?);
        Ok(self)
    }

    /// Do not verify the certificate at all.
    pub fn insecure(mut self) -> Self {
        self.tls = TlsMode::Insecure;
        self
    }

    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    pub fn with_retry(mut self, retry: RetryPolicy) -> Self {
        self.retry = retry;
        self
    }

    /// Read PROXMOX_URL, PROXMOX_TOKEN_ID, PROXMOX_TOKEN_SECRET and optionally PROXMOX_CA_CERT
    /// (a file path or PEM text), PROXMOX_FINGERPRINT, PROXMOX_INSECURE.
    pub fn from_env() -> Result<Self> {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    /// [`Config::from_env`] with any source of variables (tests, a Secret's data).
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self> {
        let get = |name: &str| {
            lookup(name)
                .map(|v| v.trim().to_owned())
                .filter(|v| !v.is_empty())
        };
        let url = get(ENV_URL).ok_or_else(|| {
            Error::config(format!("{ENV_URL} is not set; set it to the API address, e.g. https://pve1.example.com:8006"))
        })?;
        let token_id = get(ENV_TOKEN_ID).ok_or_else(|| {
            Error::config(format!("{ENV_TOKEN_ID} is not set; set it to USER@REALM!TOKENID, e.g. sombrero@pve!controller"))
        })?;
        // `get` trims: a trailing newline from a mounted Secret file is never part of the token.
        let token_secret = get(ENV_TOKEN_SECRET).ok_or_else(|| {
            Error::config(format!(
                "{ENV_TOKEN_SECRET} is not set; set it to the token's secret (the UUID `pveum user token add` printed)"
            ))
        })?;
        let mut config = Self::checked(
            normalize_url(&url, ENV_URL)?,
            token_id,
            Secret::new(token_secret),
            ENV_TOKEN_ID,
            ENV_TOKEN_SECRET,
        )?;

        let ca = get(ENV_CA_CERT);
        let fingerprint = get(ENV_FINGERPRINT);
        let insecure = match get(ENV_INSECURE) {
            None => false,
            Some(v) => parse_bool(&v).ok_or_else(|| {
                Error::config(format!(
                    "{ENV_INSECURE}={v:?} is not a boolean; use true or false (or 1 / 0)"
                ))
            })?,
        };
        let chosen = [ca.is_some(), fingerprint.is_some(), insecure]
            .iter()
            .filter(|b| **b)
            .count();
        if chosen > 1 {
            return Err(Error::config(format!(
                "set only one of {ENV_CA_CERT}, {ENV_FINGERPRINT} and {ENV_INSECURE}=true: they are different ways to trust the server"
            )));
        }
        if let Some(ca) = ca {
            let pem = if ca.contains("-----BEGIN") {
                ca
            } else {
                std::fs::read_to_string(&ca).map_err(|e| {
                    Error::config(format!(
                        "{ENV_CA_CERT}: cannot read {ca:?}: {e}; give the path of a PEM file (e.g. a copy of /etc/pve/pve-root-ca.pem) or the PEM text itself"
                    ))
                })?
            };
            tls::parse_ca_pem(&pem).map_err(|e| {
                Error::config(format!(
                    "{ENV_CA_CERT}: {}",
                    e.pve_message().unwrap_or(&e.to_string())
                ))
            })?;
            config.tls = TlsMode::CaBundle(pem);
        } else if let Some(fp) = fingerprint {
            let fp = tls::parse_fingerprint(&fp)
                .map_err(|e| Error::config(format!("{ENV_FINGERPRINT}: {e}")))?;
            config.tls = TlsMode::Fingerprint(fp);
        } else if insecure {
            config.tls = TlsMode::Insecure;
        }
        Ok(config)
    }
}

fn parse_bool(v: &str) -> Option<bool> {
    match v.to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" | "on" => Some(true),
        "0" | "false" | "no" | "off" => Some(false),
        _ => None,
    }
}

fn normalize_url(raw: &str, name: &str) -> Result<Url> {
    let raw = raw.trim();
    let mut url = Url::parse(raw).map_err(|e| {
        Error::config(format!(
            "{name} {raw:?} is not a URL ({e}); expected e.g. https://pve1.example.com:8006"
        ))
    })?;
    if url.scheme() != "https" {
        return Err(Error::config(format!(
            "{name} must use https (the Proxmox API listens on https://HOST:8006), got {raw:?}"
        )));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(Error::config(format!("{name} {raw:?} has no host")));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(Error::config(format!(
            "{name} must not carry credentials; use the token id and secret settings instead"
        )));
    }
    url.set_query(None);
    url.set_fragment(None);
    let path = url.path().trim_end_matches('/').to_owned();
    let path = path.strip_suffix("/api2/json").unwrap_or(&path).to_owned();
    url.set_path(&path);
    Ok(url)
}

fn validate_token(token_id: &str, secret: &Secret, id_name: &str, secret_name: &str) -> Result<()> {
    let ok = token_id
        .split_once('!')
        .is_some_and(|(user, tok)| user.contains('@') && !tok.is_empty() && !user.starts_with('@'));
    if !ok || token_id.contains(char::is_whitespace) {
        return Err(Error::config(format!(
            "{id_name} {token_id:?} is not an API token id; expected USER@REALM!TOKENID, e.g. sombrero@pve!controller"
        )));
    }
    if secret.is_empty() {
        return Err(Error::config(format!("{secret_name} is empty")));
    }
    if secret
        .expose()
        .chars()
        .any(|c| c.is_control() || c.is_whitespace())
    {
        return Err(Error::config(format!(
            "{secret_name} contains whitespace or control characters; copy the secret exactly"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    const SECRET: &str = "5f3c1e2a-9b8d-4c7e-a6f5-0123456789ab";

    fn env(pairs: &[(&str, &str)]) -> Result<Config> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Config::from_lookup(move |k| map.get(k).cloned())
    }

    fn base() -> Vec<(&'static str, &'static str)> {
        vec![
            (ENV_URL, "https://pve1:8006/"),
            (ENV_TOKEN_ID, "sombrero@pve!ctl"),
            (ENV_TOKEN_SECRET, SECRET),
        ]
    }

    #[test]
    fn reads_the_environment() {
        let c = env(&base()).unwrap();
        assert_eq!(c.url.as_str(), "https://pve1:8006/");
        assert_eq!(c.token_id, "sombrero@pve!ctl");
        assert_eq!(c.token_secret.expose(), SECRET);
        assert_eq!(c.tls, TlsMode::System);
    }

    #[test]
    fn debug_never_shows_the_secret() {
        let c = env(&base()).unwrap();
        let dbg = format!("{c:?}");
        assert!(!dbg.contains(SECRET), "{dbg}");
        assert!(dbg.contains("***"));
        let e = env(&[
            (ENV_URL, "https://pve1:8006"),
            (ENV_TOKEN_ID, "nobang"),
            (ENV_TOKEN_SECRET, SECRET),
        ])
        .unwrap_err();
        assert!(!e.to_string().contains(SECRET));
    }

    #[test]
    fn missing_variables_are_named_with_the_fix() {
        let e = env(&[]).unwrap_err();
        assert!(e.to_string().contains("PROXMOX_URL is not set"), "{e}");
        let e = env(&[(ENV_URL, "https://x:8006")]).unwrap_err();
        assert!(e.to_string().contains("PROXMOX_TOKEN_ID is not set"), "{e}");
        let e = env(&[(ENV_URL, "https://x:8006"), (ENV_TOKEN_ID, "a@pam!b")]).unwrap_err();
        assert!(
            e.to_string().contains("PROXMOX_TOKEN_SECRET is not set"),
            "{e}"
        );
        let e = env(&[
            (ENV_URL, "http://x:8006"),
            (ENV_TOKEN_ID, "a@pam!b"),
            (ENV_TOKEN_SECRET, "s"),
        ])
        .unwrap_err();
        assert!(e.to_string().contains("https"), "{e}");
        let e = env(&[
            (ENV_URL, "https://x:8006"),
            (ENV_TOKEN_ID, "root@pam"),
            (ENV_TOKEN_SECRET, "s"),
        ])
        .unwrap_err();
        assert!(e.to_string().contains("USER@REALM!TOKENID"), "{e}");
    }

    #[test]
    fn url_is_normalized() {
        for raw in [
            "https://pve1:8006",
            "https://pve1:8006/",
            "https://pve1:8006/api2/json",
            "https://pve1:8006/api2/json/",
        ] {
            assert_eq!(
                normalize_url(raw, "u").unwrap().as_str(),
                "https://pve1:8006/",
                "{raw}"
            );
        }
        assert_eq!(
            normalize_url("https://gw/pve/", "u").unwrap().as_str(),
            "https://gw/pve"
        );
        assert!(normalize_url("https://user:pw@pve1:8006", "u").is_err());
        assert!(normalize_url("not a url", "u").is_err());
    }

    #[test]
    fn tls_choices() {
        let fp = "ab".repeat(32);
        let mut v: Vec<(&str, &str)> = base();
        v.push((ENV_FINGERPRINT, fp.as_str()));
        assert!(matches!(env(&v).unwrap().tls, TlsMode::Fingerprint(_)));

        let mut v = base();
        v.push((ENV_INSECURE, "true"));
        assert_eq!(env(&v).unwrap().tls, TlsMode::Insecure);

        let mut v = base();
        v.push((ENV_INSECURE, "perhaps"));
        assert!(
            env(&v)
                .unwrap_err()
                .to_string()
                .contains("PROXMOX_INSECURE")
        );

        let mut v = base();
        v.push((ENV_INSECURE, "1"));
        v.push((ENV_FINGERPRINT, "ab"));
        assert!(env(&v).unwrap_err().to_string().contains("only one"));

        let mut v = base();
        v.push((ENV_CA_CERT, "/nonexistent/ca.pem"));
        let e = env(&v).unwrap_err().to_string();
        assert!(
            e.contains("PROXMOX_CA_CERT") && e.contains("/nonexistent/ca.pem"),
            "{e}"
        );

        let mut v = base();
        v.push((ENV_FINGERPRINT, "AB:CD"));
        assert!(
            env(&v)
                .unwrap_err()
                .to_string()
                .contains("PROXMOX_FINGERPRINT")
        );
    }
}
