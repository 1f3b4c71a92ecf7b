//! The HTTP core: authentication, encoding, timeouts, retries and error classification. The
//! endpoint modules (`cluster`, `storage`, `qemu`, `agent`, `backup`, `task`) add typed methods.

use std::sync::Arc;
use std::time::{Duration, Instant};

use reqwest::Method;
use reqwest::header::{ACCEPT, AUTHORIZATION, HeaderMap, HeaderValue, USER_AGENT};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use url::Url;

use super::cluster::PveVersion;
use super::config::Config;
use super::error::{Error, Result};
use super::retry::{Attempt, Idempotency, RetryPolicy, may_repeat};
use super::tls;

/// Request parameters, sent as the query string (GET, DELETE) or as a form body (POST, PUT).
/// Booleans are `0`/`1`, because PVE refuses `true` in form encoding. A key may repeat, which
/// PVE reads as an array (`command=a&command=b`).
#[derive(Default, Clone)]
pub struct Params(Vec<(String, String)>);

impl Params {
    pub fn new() -> Self {
        Params(Vec::new())
    }

    pub fn set(mut self, key: &str, value: impl ToString) -> Self {
        self.0.push((key.to_owned(), value.to_string()));
        self
    }

    pub fn opt(self, key: &str, value: Option<impl ToString>) -> Self {
        match value {
            Some(v) => self.set(key, v),
            None => self,
        }
    }

    pub fn flag(self, key: &str, value: bool) -> Self {
        self.set(key, if value { "1" } else { "0" })
    }

    pub fn opt_flag(self, key: &str, value: Option<bool>) -> Self {
        match value {
            Some(v) => self.flag(key, v),
            None => self,
        }
    }

    pub fn push(&mut self, key: &str, value: impl ToString) {
        self.0.push((key.to_owned(), value.to_string()));
    }

    pub fn pairs(&self) -> &[(String, String)] {
        &self.0
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The `application/x-www-form-urlencoded` text of these parameters.
    pub fn encode(&self) -> String {
        url::form_urlencoded::Serializer::new(String::new())
            .extend_pairs(&self.0)
            .finish()
    }
}

/// Shows the keys only: values may be passwords (`cipassword`).
impl std::fmt::Debug for Params {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.0.iter().map(|(k, _)| k))
            .finish()
    }
}

/// Called once per HTTP attempt with the method, the API path (`nodes/pve1/qemu/100/config`)
/// and the HTTP status (0 when no response came). The controller counts requests with it.
pub type RequestObserver = fn(method: &str, path: &str, status: u16);

static REQUEST_OBSERVER: std::sync::OnceLock<RequestObserver> = std::sync::OnceLock::new();

/// Installs the process-wide [`RequestObserver`]; the first call wins.
pub fn set_request_observer(observer: RequestObserver) {
    let _ = REQUEST_OBSERVER.set(observer);
}

fn observe(method: &Method, request: &str, status: u16) {
    if let Some(observer) = REQUEST_OBSERVER.get() {
        let path = request.split_once(" /").map(|(_, p)| p).unwrap_or(request);
        observer(method.as_str(), path, status);
    }
}

#[derive(Deserialize)]
struct Envelope<T> {
    data: T,
}

/// A typed, async Proxmox VE API client. Cheap to clone; clones share connections.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

struct Inner {
    http: reqwest::Client,
    base: Url,
    retry: RetryPolicy,
    timeout: Duration,
    /// `user@realm!tokenid`: the user PVE writes into the UPIDs of the tasks we start.
    token_id: String,
    version: tokio::sync::OnceCell<PveVersion>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("base", &self.inner.base.as_str())
            .finish_non_exhaustive()
    }
}

/// Why one try failed, and whether it is known not to have run on the server.
struct Failure {
    error: Error,
    not_executed: bool,
}

impl Client {
    pub fn new(config: Config) -> Result<Self> {
        let tls = tls::client_config(&config.tls)?;
        let auth = format!(
            "PVEAPIToken={}={}",
            config.token_id,
            config.token_secret.expose()
        );
        let mut auth = HeaderValue::from_str(&auth).map_err(|_| {
            Error::config(
                "the token id or secret contains characters that cannot go into an HTTP header",
            )
        })?;
        // Keeps the value out of hyper's and reqwest's debug output.
        auth.set_sensitive(true);
        let mut headers = HeaderMap::new();
        headers.insert(AUTHORIZATION, auth);
        headers.insert(ACCEPT, HeaderValue::from_static("application/json"));
        headers.insert(
            USER_AGENT,
            HeaderValue::from_static(concat!("sombrero/", env!("CARGO_PKG_VERSION"))),
        );
        let http = reqwest::Client::builder()
            .tls_backend_preconfigured(tls)
            .default_headers(headers)
            .timeout(config.timeout)
            .connect_timeout(config.connect_timeout)
            // The API never redirects; a redirect would be a misconfigured proxy.
            .redirect(reqwest::redirect::Policy::none())
            .http1_only()
            .build()
            .map_err(|e| Error::config(format!("cannot build the HTTP client: {e}")))?;
        Ok(Client {
            inner: Arc::new(Inner {
                http,
                base: config.url,
                retry: config.retry,
                timeout: config.timeout,
                token_id: config.token_id.clone(),
                version: tokio::sync::OnceCell::new(),
            }),
        })
    }

    /// The API address without `/api2/json`.
    pub fn base_url(&self) -> &Url {
        &self.inner.base
    }

    /// The API token id (`user@realm!tokenid`), the user of the tasks this client starts.
    pub fn token_id(&self) -> &str {
        &self.inner.token_id
    }

    /// The per-call timeout.
    pub fn timeout(&self) -> Duration {
        self.inner.timeout
    }

    pub(crate) fn cached_version(&self) -> &tokio::sync::OnceCell<PveVersion> {
        &self.inner.version
    }

    fn url(&self, path: &[&str]) -> Result<Url> {
        let mut url = self.inner.base.clone();
        {
            let mut segs = url
                .path_segments_mut()
                .map_err(|_| Error::config(format!("{} cannot be a base URL", self.inner.base)))?;
            segs.pop_if_empty().extend(["api2", "json"]);
            // Each segment is percent-encoded, so a node name or UPID cannot change the path.
            segs.extend(path);
        }
        Ok(url)
    }

    pub async fn get<T: DeserializeOwned>(&self, path: &[&str], query: &Params) -> Result<T> {
        self.call(Method::GET, path, query, Idempotency::Safe).await
    }

    pub async fn post<T: DeserializeOwned>(
        &self,
        path: &[&str],
        form: &Params,
        idem: Idempotency,
    ) -> Result<T> {
        self.call(Method::POST, path, form, idem).await
    }

    pub async fn put<T: DeserializeOwned>(
        &self,
        path: &[&str],
        form: &Params,
        idem: Idempotency,
    ) -> Result<T> {
        self.call(Method::PUT, path, form, idem).await
    }

    pub async fn delete<T: DeserializeOwned>(
        &self,
        path: &[&str],
        query: &Params,
        idem: Idempotency,
    ) -> Result<T> {
        self.call(Method::DELETE, path, query, idem).await
    }

    /// One API call with retries: GET and other safe calls on any transient failure (a lost
    /// answer too), unsafe calls (creates, starts, deletes) only when the failure proves nothing
    /// ran ([`may_repeat`]). A lost answer to an unsafe call is the caller's to find out about
    /// ([`Error::outcome_unknown`]).
    pub async fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &[&str],
        params: &Params,
        idem: Idempotency,
    ) -> Result<T> {
        let url = self.url(path)?;
        let request = format!("{method} /{}", path.join("/"));
        let policy = &self.inner.retry;
        let mut retry = 0u32;
        loop {
            let started = Instant::now();
            match self.once::<T>(&method, &url, params, &request).await {
                Ok(v) => {
                    tracing::debug!(request = %request, elapsed_ms = started.elapsed().as_millis() as u64, "proxmox call ok");
                    return Ok(v);
                }
                Err(f) => {
                    let attempt = if f.not_executed {
                        Attempt::NotExecuted
                    } else if matches!(f.error, Error::Locked { .. }) {
                        Attempt::Locked
                    } else if f.error.is_retryable() {
                        Attempt::AnswerLost
                    } else {
                        Attempt::Refused
                    };
                    let may = may_repeat(idem, attempt);
                    if !may || retry + 1 >= policy.max_attempts.max(1) {
                        tracing::debug!(request = %request, category = f.error.category(), error = %f.error, "proxmox call failed");
                        return Err(f.error);
                    }
                    let delay = policy.delay(retry);
                    tracing::warn!(
                        request = %request,
                        category = f.error.category(),
                        error = %f.error,
                        retry = retry + 1,
                        delay_ms = delay.as_millis() as u64,
                        "proxmox call failed, retrying"
                    );
                    tokio::time::sleep(delay).await;
                    retry += 1;
                }
            }
        }
    }

    async fn once<T: DeserializeOwned>(
        &self,
        method: &Method,
        url: &Url,
        params: &Params,
        request: &str,
    ) -> std::result::Result<T, Failure> {
        let mut url = url.clone();
        let builder = if *method == Method::GET || *method == Method::DELETE {
            if !params.is_empty() {
                url.query_pairs_mut().extend_pairs(params.pairs());
            }
            self.inner.http.request(method.clone(), url)
        } else {
            self.inner
                .http
                .request(method.clone(), url)
                .header(
                    reqwest::header::CONTENT_TYPE,
                    "application/x-www-form-urlencoded",
                )
                .body(params.encode())
        };
        let response = builder.send().await.map_err(|e| {
            observe(method, request, 0);
            transport_failure(request, &e)
        })?;
        let status = response.status();
        observe(method, request, status.as_u16());
        let reason = response
            .extensions()
            .get::<hyper::ext::ReasonPhrase>()
            .map(|r| String::from_utf8_lossy(r.as_bytes()).into_owned());
        let body = response
            .bytes()
            .await
            .map_err(|e| transport_failure(request, &e))?;
        if !status.is_success() {
            let error = Error::from_response(request, status.as_u16(), reason.as_deref(), &body);
            // 595: pveproxy could not connect to pvedaemon or the target node, so nothing ran.
            // A lock that could not be taken also stops the handler before it changes anything.
            // Not 503: a proxy in front of PVE may answer it after forwarding the request.
            let not_executed = status.as_u16() == 595
                || matches!(&error, Error::Locked { message, .. } if message.contains("got timeout"));
            return Err(Failure {
                error,
                not_executed,
            });
        }
        serde_json::from_slice::<Envelope<T>>(&body)
            .map(|e| e.data)
            .map_err(|e| Failure {
                error: Error::Decode {
                    request: request.to_owned(),
                    message: format!("{e}; body starts with {:?}", snippet(&body)),
                },
                not_executed: false,
            })
    }
}

fn snippet(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    text.chars().take(200).collect()
}

fn transport_failure(request: &str, e: &reqwest::Error) -> Failure {
    let message = error_chain(e);
    if let Some(tls) = tls_error(e) {
        // Nothing ran, but repeating cannot help: a certificate does not fix itself.
        return Failure {
            error: Error::Tls {
                request: request.to_owned(),
                message: tls,
            },
            not_executed: false,
        };
    }
    if e.is_timeout() {
        return Failure {
            error: Error::Timeout {
                request: request.to_owned(),
                message,
            },
            not_executed: false,
        };
    }
    // A connect error means the request never left this process.
    Failure {
        error: Error::Transient {
            request: request.to_owned(),
            message,
        },
        not_executed: e.is_connect(),
    }
}

/// The text of an error and its sources, joined.
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut parts = vec![e.to_string()];
    let mut cur = e.source();
    while let Some(s) = cur {
        let text = s.to_string();
        if !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        cur = s.source();
    }
    parts.join(": ")
}

/// The rustls error behind a failed connection, if that is what it was. tokio-rustls wraps it
/// in an `io::Error`, whose `source()` skips the wrapped error, so look inside explicitly.
fn tls_error(e: &(dyn std::error::Error + 'static)) -> Option<String> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(t) = err.downcast_ref::<rustls::Error>() {
            return Some(t.to_string());
        }
        if let Some(io) = err.downcast_ref::<std::io::Error>()
            && let Some(inner) = io.get_ref()
        {
            if let Some(t) = inner.downcast_ref::<rustls::Error>() {
                return Some(t.to_string());
            }
            if let Some(found) = tls_error(inner) {
                return Some(found);
            }
        }
        cur = err.source();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn booleans_are_zero_or_one_in_forms() {
        let p = Params::new()
            .flag("full", true)
            .flag("purge", false)
            .opt_flag("start", None)
            .opt("name", Some("a b"));
        assert_eq!(p.encode(), "full=1&purge=0&name=a+b");
    }

    #[test]
    fn repeated_keys_make_arrays() {
        let mut p = Params::new();
        for a in ["/bin/sh", "-c", "echo hi"] {
            p.push("command", a);
        }
        assert_eq!(p.encode(), "command=%2Fbin%2Fsh&command=-c&command=echo+hi");
    }

    fn client() -> Client {
        let c = Config::new("https://pve1:8006/", "a@pam!t", "s3cr3t").unwrap();
        Client::new(c).unwrap()
    }

    #[tokio::test]
    async fn path_segments_are_encoded() {
        let c = client();
        let u = c
            .url(&[
                "nodes",
                "pve1",
                "tasks",
                "UPID:pve1:0000:0001:65:qmstart:100:a@pam!t:",
                "status",
            ])
            .unwrap();
        assert_eq!(
            u.as_str(),
            "https://pve1:8006/api2/json/nodes/pve1/tasks/UPID:pve1:0000:0001:65:qmstart:100:a@pam!t:/status"
        );
        let u = c.url(&["nodes", "../x", "qemu"]).unwrap();
        assert!(u.as_str().ends_with("/api2/json/nodes/..%2Fx/qemu"), "{u}");
        assert!(!format!("{c:?}").contains("s3cr3t"));
    }
}
