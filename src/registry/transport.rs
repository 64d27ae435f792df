//! HTTP to one or more registries: scheme choice, auth (Basic, Bearer with a
//! token cache per registry and scope set), retries with backoff, manual
//! redirects that drop credentials off-host, the `jobs` semaphore, and
//! distribution-spec error bodies turned into [`Error`]s.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use reqwest::header::{
    HeaderMap, HeaderValue, AUTHORIZATION, LOCATION, RETRY_AFTER, WWW_AUTHENTICATE,
};
use reqwest::{Method, StatusCode};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use url::Url;

use crate::error::{Error, Result};
use crate::registry::auth::{self, Challenge, Credential, Keychain, TokenCache};

/// How hard to retry transient failures (408, 429, 5xx, connection errors).
#[derive(Clone, Debug)]
pub struct RetryPolicy {
    /// Total tries, the first included.
    pub attempts: u32,
    /// Delay before the first retry; doubles each time.
    pub base_delay: Duration,
    /// Longest wait honoured from a `Retry-After` header (and for backoff).
    pub max_delay: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            attempts: 5,
            base_delay: Duration::from_millis(200),
            max_delay: Duration::from_secs(10),
        }
    }
}

/// One request, replayable: retries and auth refreshes resend it whole.
#[derive(Clone)]
pub(crate) struct Req {
    pub method: Method,
    pub url: Url,
    pub headers: HeaderMap,
    pub body: Option<Bytes>,
    /// Registry (host[:port]) whose credentials may go with the request.
    pub registry: String,
    /// Repository, for keychain lookups of namespaced credentials.
    pub repo: Option<String>,
    /// Token scopes this request needs.
    pub scopes: Vec<String>,
    /// Follow redirects (GET/HEAD of blobs and manifests).
    pub follow_redirects: bool,
}

impl Req {
    pub fn new(method: Method, url: Url, registry: &str) -> Self {
        Req {
            method,
            url,
            headers: HeaderMap::new(),
            body: None,
            registry: registry.to_string(),
            repo: None,
            scopes: Vec::new(),
            follow_redirects: false,
        }
    }

    pub fn header(mut self, name: reqwest::header::HeaderName, value: &str) -> Self {
        if let Ok(v) = HeaderValue::from_str(value) {
            self.headers.insert(name, v);
        }
        self
    }

    pub fn body(mut self, body: Bytes) -> Self {
        self.body = Some(body);
        self
    }

    pub fn repo(mut self, repo: &str, scopes: Vec<String>) -> Self {
        self.repo = Some(repo.to_string());
        self.scopes = scopes;
        self
    }

    pub fn scopes(mut self, scopes: Vec<String>) -> Self {
        self.scopes = scopes;
        self
    }

    pub fn redirects(mut self) -> Self {
        self.follow_redirects = true;
        self
    }

    /// PATCH appends to an upload: resending after the server may have seen
    /// it could duplicate bytes, so only connection failures are retried.
    fn idempotent(&self) -> bool {
        self.method != Method::PATCH
    }
}

/// A response plus the `jobs` slot it occupies until dropped.
pub(crate) struct Resp {
    pub inner: reqwest::Response,
    pub permit: Option<OwnedSemaphorePermit>,
    /// Tries it took (retried 408/429/5xx answers included).
    pub tries: u32,
    /// The stall deadline, to name a body read that hit it.
    stall: Duration,
}

impl Resp {
    pub fn status(&self) -> StatusCode {
        self.inner.status()
    }
    pub fn header(&self, name: &str) -> Option<&str> {
        self.inner.headers().get(name).and_then(|v| v.to_str().ok())
    }
    pub fn url(&self) -> &Url {
        self.inner.url()
    }
    /// Read the whole body, refusing more than `limit` bytes.
    pub async fn bytes_capped(mut self, what: &str, limit: u64) -> Result<Bytes> {
        if let Some(len) = self.inner.content_length().filter(|&l| l > limit) {
            return Err(Error::TooLarge {
                what: what.to_string(),
                size: len,
                limit,
            });
        }
        let mut buf = Vec::new();
        while let Some(chunk) = self
            .chunk(|| format!("{what} at byte {}", buf.len()))
            .await?
        {
            buf.extend_from_slice(&chunk);
            if buf.len() as u64 > limit {
                return Err(Error::TooLarge {
                    what: what.to_string(),
                    size: buf.len() as u64,
                    limit,
                });
            }
        }
        Ok(Bytes::from(buf))
    }

    /// The next piece of the body, `None` at its end; every read of a
    /// response body goes through here. reqwest's read timeout restarts
    /// with each piece (a slow but moving body is not cut), so one that
    /// fires means nothing came for the whole stall period: the error says
    /// the server stalled, naming the read `what()`.
    pub async fn chunk(&mut self, what: impl FnOnce() -> String) -> Result<Option<Bytes>> {
        self.inner.chunk().await.map_err(|e| match e.is_timeout() {
            true => stalled(self.inner.url(), what(), self.stall),
            false => http_err(&what(), e),
        })
    }
}

/// Nothing came from the server at `url` for the stall period `stall`.
fn stalled(url: &Url, what: String, stall: Duration) -> Error {
    Error::Stalled {
        registry: host_port(url),
        what,
        secs: stall.as_secs(),
    }
}

/// `host[:port]` of `url`, as registries are named.
fn host_port(url: &Url) -> String {
    let port = url.port().map(|p| format!(":{p}")).unwrap_or_default();
    url.host_str().unwrap_or("?").to_string() + &port
}

pub(crate) fn http_err(context: &str, source: reqwest::Error) -> Error {
    // reqwest's Display can include the URL; ours never carry secrets.
    Error::Http {
        context: context.to_string(),
        source,
    }
}

/// TLS settings beside the built-in roots.
#[derive(Default)]
pub(crate) struct Tls {
    /// Extra trusted roots.
    pub roots: Vec<reqwest::Certificate>,
    /// Accept any certificate.
    pub skip_verify: bool,
}

/// The certificate problem behind a failed connection (rustls says
/// "invalid peer certificate: …"), if that is what failed: no retry fixes it.
pub(crate) fn certificate_problem(e: &reqwest::Error) -> Option<String> {
    let mut cause: Option<&dyn std::error::Error> = std::error::Error::source(e);
    while let Some(c) = cause {
        let msg = c.to_string();
        if msg.contains("certificate") {
            return Some(msg);
        }
        cause = c.source();
    }
    None
}

/// Keychain answers per (registry, repository).
type CredCache = HashMap<(String, Option<String>), Option<Credential>>;

/// Shared state of a client.
pub(crate) struct Transport {
    pub http: reqwest::Client,
    keychain: Keychain,
    insecure: Vec<String>,
    insecure_all: bool,
    jobs: Arc<Semaphore>,
    retry: RetryPolicy,
    stall: Duration,
    challenges: Mutex<HashMap<String, Challenge>>,
    /// Bearer tokens by registry and scope set.
    tokens: TokenCache,
    creds: Mutex<CredCache>,
    /// Where blob URLs were redirected (object storage, a CDN), and when.
    redirects: Mutex<HashMap<Url, (Url, Instant)>>,
}

const MAX_REDIRECTS: usize = 5;
/// How long a blob's redirect target is used before the registry is
/// asked again (presigned URLs live minutes: S3's, CDNs'); one that fails
/// sooner is dropped at once.
const REDIRECT_TTL: Duration = Duration::from_secs(300);
/// Redirects remembered at most (the oldest go first).
const MAX_REDIRECTS_KEPT: usize = 1024;
const MAX_ERROR_BODY: u64 = 64 * 1024;

impl Transport {
    pub fn new(
        tls: Tls,
        keychain: Keychain,
        insecure: Vec<String>,
        insecure_all: bool,
        jobs: usize,
        retry: RetryPolicy,
        stall: Duration,
    ) -> Result<Self> {
        let mut http = reqwest::Client::builder();
        for root in tls.roots {
            http = http.add_root_certificate(root);
        }
        let http = http
            .danger_accept_invalid_certs(tls.skip_verify)
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("ggfs/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(stall)
            .read_timeout(stall)
            .build()
            .map_err(|e| http_err("building the HTTP client", e))?;
        Ok(Transport {
            http,
            keychain,
            insecure,
            insecure_all,
            jobs: Arc::new(Semaphore::new(jobs.max(1))),
            retry,
            stall,
            challenges: Mutex::new(HashMap::new()),
            tokens: TokenCache::default(),
            creds: Mutex::new(HashMap::new()),
            redirects: Mutex::new(HashMap::new()),
        })
    }

    /// Where `url` was redirected to lately, if it was.
    pub fn redirected(&self, url: &Url) -> Option<Url> {
        let map = lock(&self.redirects);
        let (to, when) = map.get(url)?;
        (when.elapsed() < REDIRECT_TTL).then(|| to.clone())
    }

    /// Remember that `url` was answered from `to`.
    pub fn remember_redirect(&self, url: &Url, to: &Url) {
        if url == to {
            return;
        }
        let mut map = lock(&self.redirects);
        if map.len() >= MAX_REDIRECTS_KEPT {
            let oldest = map
                .iter()
                .min_by_key(|(_, (_, t))| *t)
                .map(|(k, _)| k.clone());
            oldest.map(|k| map.remove(&k));
        }
        map.insert(url.clone(), (to.clone(), Instant::now()));
    }

    pub fn forget_redirect(&self, url: &Url) {
        lock(&self.redirects).remove(url);
    }

    /// `http` for loopback and registries marked insecure, `https` otherwise.
    pub fn scheme(&self, registry: &str) -> &'static str {
        if self.insecure_all || self.insecure.iter().any(|r| r == registry) || is_loopback(registry)
        {
            "http"
        } else {
            "https"
        }
    }

    /// `<scheme>://<registry>/v2/` followed by `path`.
    pub fn url(&self, registry: &str, path: &str) -> Result<Url> {
        let s = format!("{}://{}/v2/{}", self.scheme(registry), registry, path);
        Url::parse(&s).map_err(|e| Error::invalid(format!("URL {s:?}"), e.to_string()))
    }

    /// Send with auth, retries and (when asked) redirects. Answers every
    /// status except 401/403, which become [`Error::Auth`].
    pub async fn send(&self, req: &Req) -> Result<Resp> {
        let mut auth = self.authorization(req, None).await?;
        let mut challenged = false;
        loop {
            let resp = self.send_following(req, auth.as_deref()).await?;
            if !self.same_origin(&req.registry, resp.url()) {
                // A redirect target's own auth is none of our business.
                return Ok(resp);
            }
            match resp.status() {
                StatusCode::UNAUTHORIZED if !challenged => {
                    challenged = true;
                    let challenge = self.learn_challenge(req, &resp)?;
                    self.forget_token(req);
                    auth = self.authorization(req, Some(&challenge)).await?;
                    if auth.is_none() {
                        return Err(self.auth_error(req, resp, "credentials required").await);
                    }
                }
                StatusCode::UNAUTHORIZED => {
                    let header = resp.header(WWW_AUTHENTICATE.as_str()).unwrap_or("");
                    let what = if header.contains("insufficient_scope") {
                        "access denied (insufficient_scope)"
                    } else {
                        "credentials rejected"
                    };
                    return Err(self.auth_error(req, resp, what).await);
                }
                StatusCode::FORBIDDEN => {
                    return Err(self.auth_error(req, resp, "access denied").await)
                }
                _ => return Ok(resp),
            }
        }
    }

    /// Send `req` once with `body` streamed (an upload's bytes as they come
    /// in), with the credentials `send` last used. A streamed body cannot be
    /// replayed, so there is no retry, auth refresh or redirect here: the
    /// caller resends what it kept through [`Transport::send`].
    pub async fn send_streamed(&self, req: &Req, body: reqwest::Body) -> Result<Resp> {
        // An upload URL on another host gets no credentials, as in `send`.
        let auth = match self.same_origin(&req.registry, &req.url) {
            true => self.authorization(req, None).await?,
            false => None,
        };
        // No `jobs` slot: the body may wait on a download that needs one
        // to resume (a copy's), which must not wait on us in turn. Callers
        // bound their uploads themselves (copy: `-j`).
        let mut b = self
            .http
            .request(req.method.clone(), req.url.clone())
            .headers(req.headers.clone())
            .body(body);
        if let Some(a) = auth {
            b = b.header(AUTHORIZATION, a);
        }
        match b.send().await {
            Ok(inner) => {
                tracing::debug!(method = %req.method, url = %redact_url(&req.url), status = %inner.status(), "streamed");
                Ok(Resp {
                    inner,
                    permit: None,
                    tries: 1,
                    stall: self.stall,
                })
            }
            Err(e) => Err(self
                .unretryable(&req.method, &req.url, &e)
                .unwrap_or_else(|| {
                    let what = format!("{} {}", req.method, redact_url(&req.url));
                    http_err(&what, e.without_url())
                })),
        }
    }

    /// Send with exactly the given `Authorization` (credential checks).
    pub async fn send_plain(&self, req: &Req, auth: Option<&str>) -> Result<Resp> {
        self.send_following(req, auth).await
    }

    /// Send, then follow redirects for GET/HEAD: credentials go only to the
    /// registry's own origin, never to a redirect target elsewhere.
    async fn send_following(&self, req: &Req, auth: Option<&str>) -> Result<Resp> {
        let own = self.same_origin(&req.registry, &req.url);
        let mut resp = self
            .send_retrying(req, &req.url, auth.filter(|_| own))
            .await?;
        for _ in 0..MAX_REDIRECTS {
            if !req.follow_redirects || !resp.status().is_redirection() {
                return Ok(resp);
            }
            let Some(loc) = resp.header(LOCATION.as_str()) else {
                return Ok(resp);
            };
            let next = resp
                .url()
                .join(loc)
                .map_err(|e| Error::invalid(format!("redirect Location {loc:?}"), e.to_string()))?;
            tracing::debug!(from = %resp.url().path(), to = %redact_url(&next), "following redirect");
            let same = self.same_origin(&req.registry, &next);
            drop(resp);
            resp = self
                .send_retrying(req, &next, auth.filter(|_| same))
                .await?;
        }
        if resp.status().is_redirection() {
            return Err(Error::Registry {
                registry: req.registry.clone(),
                message: format!("more than {MAX_REDIRECTS} redirects for {}", req.url.path()),
            });
        }
        Ok(resp)
    }

    fn same_origin(&self, registry: &str, url: &Url) -> bool {
        match self.url(registry, "") {
            Ok(base) => base.origin() == url.origin(),
            Err(_) => false,
        }
    }

    /// One logical request with retries on 408/429/5xx and connection errors.
    async fn send_retrying(&self, req: &Req, url: &Url, auth: Option<&str>) -> Result<Resp> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let last = attempt >= self.retry.attempts;
            let permit = self.jobs.clone().acquire_owned().await.ok();
            let mut b = self
                .http
                .request(req.method.clone(), url.clone())
                .headers(req.headers.clone());
            if let Some(a) = auth {
                b = b.header(AUTHORIZATION, a);
            }
            if let Some(body) = &req.body {
                b = b.body(body.clone());
            }
            match b.send().await {
                Ok(inner) => {
                    let status = inner.status();
                    tracing::debug!(method = %req.method, url = %redact_url(url), %status, attempt);
                    if last || !retryable_status(status) || !req.idempotent() {
                        return Ok(Resp {
                            inner,
                            permit,
                            tries: attempt,
                            stall: self.stall,
                        });
                    }
                    let wait = self.delay(attempt, inner.headers().get(RETRY_AFTER));
                    drop((inner, permit));
                    tokio::time::sleep(wait).await;
                }
                Err(e) => {
                    tracing::debug!(method = %req.method, url = %redact_url(url), error = %e, attempt);
                    if let Some(err) = self.unretryable(&req.method, url, &e) {
                        return Err(err);
                    }
                    let transient = e.is_connect() || (req.idempotent() && e.is_request());
                    if last || !transient {
                        let ctx = format!("{} {}{}", req.method, redact_url(url), tried(attempt));
                        return Err(http_err(&ctx, e.without_url()));
                    }
                    drop(permit);
                    tokio::time::sleep(self.delay(attempt, None)).await;
                }
            }
        }
    }

    /// The error for a failed send that no retry would fix: a stall (a
    /// whole stall period waited already) or a refused certificate.
    fn unretryable(&self, method: &Method, url: &Url, e: &reqwest::Error) -> Option<Error> {
        if e.is_timeout() {
            let what = format!("{method} {}", redact_url(url));
            return Some(stalled(url, what, self.stall));
        }
        certificate_problem(e).map(|problem| Error::Tls {
            registry: host_port(url),
            problem,
        })
    }

    /// Exponential backoff, or the server's `Retry-After` (seconds), capped.
    fn delay(&self, attempt: u32, retry_after: Option<&HeaderValue>) -> Duration {
        let backoff = self
            .retry
            .base_delay
            .saturating_mul(1 << (attempt - 1).min(16));
        let asked = retry_after
            .and_then(|v| v.to_str().ok())
            .and_then(|s| s.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        asked.unwrap_or(backoff).min(self.retry.max_delay)
    }

    fn learn_challenge(&self, req: &Req, resp: &Resp) -> Result<Challenge> {
        let header = resp.header(WWW_AUTHENTICATE.as_str()).unwrap_or("");
        let c = challenge_in(&req.registry, header)?;
        lock(&self.challenges).insert(req.registry.clone(), c.clone());
        Ok(c)
    }

    /// The request's scopes plus `extra`, sorted and without repeats, so
    /// one scope set maps to one cached token whatever the order.
    fn scope_set(req: &Req, extra: &[String]) -> Vec<String> {
        let set: BTreeSet<&String> = req.scopes.iter().chain(extra).collect();
        set.into_iter().cloned().collect()
    }

    fn token_key(req: &Req) -> (String, String) {
        (req.registry.clone(), Self::scope_set(req, &[]).join(" "))
    }

    fn forget_token(&self, req: &Req) {
        self.tokens.forget(&Self::token_key(req));
    }

    /// The credential configured for the request's registry (cached).
    /// The keychain reads files and may run a credential helper, a process
    /// that can hang: it runs on a blocking thread, never on the async
    /// workers that answer other requests, and within the stall deadline.
    pub async fn credential(
        &self,
        registry: &str,
        repo: Option<&str>,
    ) -> Result<Option<Credential>> {
        let key = (registry.to_string(), repo.map(str::to_string));
        if let Some(c) = lock(&self.creds).get(&key) {
            return Ok(c.clone());
        }
        let (keychain, job_key) = (self.keychain.clone(), key.clone());
        let job =
            tokio::task::spawn_blocking(move || keychain.resolve(&job_key.0, job_key.1.as_deref()));
        let c = match tokio::time::timeout(self.stall, job).await {
            Ok(Ok(found)) => found?,
            Ok(Err(e)) => return Err(Error::auth(registry, format!("keychain lookup: {e}"))),
            Err(_) => {
                return Err(Error::auth(
                    registry,
                    format!(
                        "the keychain (a credential helper?) gave no answer within {} s",
                        self.stall.as_secs()
                    ),
                ))
            }
        };
        lock(&self.creds).insert(key, c.clone());
        Ok(c)
    }

    /// The `Authorization` value for a request, given the registry's known
    /// challenge (or `fresh`, just received with a 401).
    async fn authorization(&self, req: &Req, fresh: Option<&Challenge>) -> Result<Option<String>> {
        let challenge = match fresh {
            Some(c) => c.clone(),
            None => match lock(&self.challenges).get(&req.registry) {
                Some(c) => c.clone(),
                None => return Ok(None),
            },
        };
        let cred = self.credential(&req.registry, req.repo.as_deref()).await?;
        if challenge.is_basic() {
            return Ok(cred.and_then(|c| c.basic_header()));
        }
        // Bearer: reuse a fresh token for this scope set, else fetch one
        // covering our scopes plus any the challenge names.
        let extra = fresh.map(Challenge::scopes).unwrap_or_default();
        let key = Self::token_key(req);
        if fresh.is_none() {
            if let Some(t) = self.tokens.fresh(&key) {
                return Ok(Some(format!("Bearer {t}")));
            }
        }
        let scopes = Self::scope_set(req, &extra);
        let allow_http = self.scheme(&req.registry) == "http";
        let token = auth::fetch_token(
            &self.http,
            &req.registry,
            &challenge,
            &scopes,
            cred.as_ref(),
            allow_http,
        )
        .await?;
        let header = format!("Bearer {}", token.token);
        self.tokens.insert(key, token);
        Ok(Some(header))
    }

    async fn auth_error(&self, req: &Req, resp: Resp, what: &str) -> Error {
        let status = resp.status();
        let detail = error_detail(resp).await;
        let who = match self.credential(&req.registry, req.repo.as_deref()).await {
            Ok(Some(Credential::Basic { username, .. })) => format!(" for user {username:?}"),
            Ok(Some(Credential::IdentityToken { .. })) => {
                " for the configured identity token".into()
            }
            _ => " (no credentials configured)".into(),
        };
        Error::auth(
            &req.registry,
            format!(
                "{what}{who}: {} {} answered {status}{detail}",
                req.method,
                req.url.path()
            ),
        )
    }
}

/// The challenge to answer from a 401's `WWW-Authenticate` header.
pub(crate) fn challenge_in(registry: &str, header: &str) -> Result<Challenge> {
    let parsed = auth::parse_challenges(header).map_err(|e| {
        Error::auth(
            registry,
            format!("401 with an unusable WWW-Authenticate header: {e}"),
        )
    })?;
    auth::pick_challenge(&parsed).cloned().ok_or_else(|| {
        Error::auth(
            registry,
            format!("no Basic or Bearer challenge in {header:?}"),
        )
    })
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn retryable_status(s: StatusCode) -> bool {
    s == StatusCode::REQUEST_TIMEOUT || s == StatusCode::TOO_MANY_REQUESTS || s.is_server_error()
}

/// Loopback registries speak plain HTTP, as docker allows.
pub fn is_loopback(registry: &str) -> bool {
    let host = match registry.rsplit_once(':') {
        Some((h, p)) if !p.contains(']') && !h.is_empty() => h,
        _ => registry,
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// A URL for logs: no query (upload state, signed redirect targets).
pub fn redact_url(url: &Url) -> String {
    let mut u = url.clone();
    u.set_query(None);
    let _ = u.set_password(None);
    u.to_string()
}

/// `: CODE: message` from a distribution-spec error body, or the start of
/// whatever else the server said.
pub(crate) async fn error_detail(resp: Resp) -> String {
    let body = resp
        .bytes_capped("error body", MAX_ERROR_BODY)
        .await
        .unwrap_or_default();
    format_error_body(&body)
}

pub(crate) fn format_error_body(body: &[u8]) -> String {
    // Not oci-spec's `distribution::ErrorResponse`: its `ErrorCode` is a
    // closed set of 14 codes and `code` is required, so one `UNKNOWN` or
    // `UNAVAILABLE` (distribution's own), a vendor code or none would fail the
    // whole body and lose the registry's messages.
    #[derive(serde::Deserialize)]
    struct Errors {
        errors: Vec<ErrorEntry>,
    }
    #[derive(serde::Deserialize)]
    struct ErrorEntry {
        code: Option<String>,
        message: Option<String>,
    }
    if let Ok(e) = serde_json::from_slice::<Errors>(body) {
        let parts: Vec<String> = e
            .errors
            .iter()
            .map(|x| {
                let code = x.code.as_deref().unwrap_or("UNKNOWN");
                match x.message.as_deref().filter(|m| !m.is_empty()) {
                    Some(m) => format!("{code}: {m}"),
                    None => code.to_string(),
                }
            })
            .collect();
        if !parts.is_empty() {
            return format!(": {}", parts.join("; "));
        }
    }
    let text: String = String::from_utf8_lossy(&body[..body.len().min(200)])
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    let text = text.trim();
    if text.is_empty() {
        String::new()
    } else {
        format!(": {text}")
    }
}

/// Turn an unexpected response into an error: 404 names `what` as not
/// found; anything else carries the registry's code and message.
pub(crate) async fn status_error(registry: &str, what: &str, resp: Resp) -> Error {
    let status = resp.status();
    if status == StatusCode::NOT_FOUND {
        let detail = error_detail(resp).await;
        let known = detail.contains("_UNKNOWN");
        return Error::NotFound(if known {
            format!("{what} ({})", detail.trim_start_matches(": "))
        } else {
            what.to_string()
        });
    }
    let method_path = resp.url().path().to_string();
    let tries = tried(resp.tries);
    let detail = error_detail(resp).await;
    Error::Registry {
        registry: registry.to_string(),
        message: format!("{what}: {method_path} answered {status}{detail}{tries}"),
    }
}

/// ` (tried N times)` after more than one try: retries take seconds, so
/// an error after them says they happened.
fn tried(tries: u32) -> String {
    match tries {
        0 | 1 => String::new(),
        n => format!(" (tried {n} times)"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_hosts() {
        for r in [
            "localhost",
            "localhost:5000",
            "127.0.0.1:5000",
            "127.9.8.7",
            "[::1]:5000",
            "[::1]",
        ] {
            assert!(is_loopback(r), "{r}");
        }
        for r in [
            "ghcr.io",
            "10.0.0.1:5000",
            "localhost.example.com",
            "[::2]:80",
        ] {
            assert!(!is_loopback(r), "{r}");
        }
    }

    #[test]
    fn error_bodies() {
        let b = br#"{"errors":[{"code":"MANIFEST_UNKNOWN","message":"manifest unknown","detail":{}},{"code":"DENIED"}]}"#;
        assert_eq!(
            format_error_body(b),
            ": MANIFEST_UNKNOWN: manifest unknown; DENIED"
        );
        assert_eq!(
            format_error_body(b"<html>\n oops</html>"),
            ": <html>  oops</html>"
        );
        assert_eq!(format_error_body(b""), "");
    }

    #[test]
    fn backoff_is_capped_and_honours_retry_after() {
        let t = Transport::new(
            Tls::default(),
            Keychain::anonymous(),
            vec![],
            false,
            1,
            RetryPolicy::default(),
            Duration::from_secs(30),
        )
        .unwrap();
        assert_eq!(t.delay(1, None), Duration::from_millis(200));
        assert_eq!(t.delay(3, None), Duration::from_millis(800));
        assert_eq!(t.delay(30, None), Duration::from_secs(10));
        assert_eq!(
            t.delay(1, Some(&HeaderValue::from_static("2"))),
            Duration::from_secs(2)
        );
        assert_eq!(
            t.delay(1, Some(&HeaderValue::from_static("3600"))),
            Duration::from_secs(10)
        );
        assert_eq!(t.scheme("localhost:5000"), "http");
        assert_eq!(t.scheme("ghcr.io"), "https");
    }
}
