//! Registry client (OCI distribution API): manifests, blobs with Range,
//! uploads with cross-repo mount, tags, catalog, referrers, delete.
//!
//! One [`Client`] per process: it holds the keychain, the token cache (per
//! registry and scope set), and the `jobs` semaphore bounding concurrent
//! requests. Plain HTTP for loopback registries and those listed insecure,
//! HTTPS otherwise. Transient failures (408, 429, 5xx, connection errors)
//! are retried with backoff honouring `Retry-After`.
//!
//! ```ignore
//! let client = Client::new(ClientOptions::default())?;            // Keychain::from_env
//! let client = Client::builder(opts).keychain(k).retry(p).chunk_size(n).build()?;
//! let repo = client.repo(&Repository::parse("localhost:5000/app")?);
//! // RegistryRepo: image::Source + image::Sink, plus
//! repo.get_manifest("latest").await?;          // size-capped, digest-checked
//! repo.head_manifest("latest").await?;         // Option<(Digest, media type, size)>
//! repo.push_manifest(&raw, Some("v1")).await?; // keeps the referrers tag schema
//! repo.delete(reference).await?; repo.delete_blob(&digest).await?;
//! repo.get_blob(&d).await?; repo.get_blob_range(&d, off, len).await?; repo.head_blob(&d).await?;
//! repo.upload_blob(&d, size, stream).await?;   // monolithic or chunked PATCH
//! repo.mount(&d, "other/repo").await?;         // true = 201 mounted
//! repo.tags().await?; repo.tags_page(n, last).await?;
//! repo.referrers(&subject, Some(artifact_type)).await?;
//! client.catalog(reg).await?; client.catalog_page(reg, n, last).await?;
//! client.ping(reg).await?; client.check_credential(reg, &cred).await?;
//! ```

pub mod auth;
mod blobs;
mod list;
mod manifests;
mod resume;
mod transport;

use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use reqwest::{Method, StatusCode};

use crate::digest::Digest;
use crate::error::{Error, Result};
use crate::image::manifest::RawManifest;
use crate::image::{ByteStream, Sink, Source};
use crate::reference::Repository;
use auth::{Credential, Keychain};

pub use list::Page;
pub use manifests::referrers_tag;
pub(crate) use transport::certificate_problem;
pub use transport::{is_loopback, RetryPolicy};
use transport::{Req, Transport};

/// Uploads at most this large go in one PUT; larger ones are streamed in
/// PATCH chunks of this size.
pub const DEFAULT_CHUNK_SIZE: usize = 16 * 1024 * 1024;

/// How a [`Client`] reaches registries: plain HTTP, TLS roots, parallelism, stall timeout.
#[derive(Clone, Debug)]
pub struct ClientOptions {
    /// Registries (host\[:port\]) spoken to over plain HTTP.
    pub insecure: Vec<String>,
    /// Plain HTTP everywhere.
    pub insecure_all: bool,
    /// Concurrent requests per client (0 counts as 1).
    pub jobs: usize,
    /// How long a request may go without a byte (its answer, or the next
    /// bytes of a body) before it fails as stalled. A slow but moving
    /// download is not cut off.
    pub stall_timeout: std::time::Duration,
    /// PEM files of root certificates trusted beside the built-in ones, for
    /// registries and their token realms (a private CA).
    pub ca_files: Vec<std::path::PathBuf>,
    /// Accept any TLS certificate, unverified (a man in the middle goes
    /// unnoticed): for test set-ups only.
    pub insecure_skip_tls_verify: bool,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            insecure: Vec::new(),
            insecure_all: false,
            jobs: 8,
            stall_timeout: std::time::Duration::from_secs(30),
            ca_files: Vec::new(),
            insecure_skip_tls_verify: false,
        }
    }
}

/// ggfs's cache directory: `$XDG_CACHE_HOME/ggfs`, else `~/.cache/ggfs`
/// (the mount's default `--cache-dir`).
pub fn default_cache_dir() -> std::path::PathBuf {
    if let Some(x) = std::env::var_os("XDG_CACHE_HOME").filter(|x| !x.is_empty()) {
        return std::path::PathBuf::from(x).join("ggfs");
    }
    let home = std::env::var_os("HOME").unwrap_or_else(|| "/tmp".into());
    std::path::PathBuf::from(home).join(".cache").join("ggfs")
}

/// Where the CLI remembers upload sessions: `uploads/` in
/// [`default_cache_dir`].
pub fn default_upload_dir() -> std::path::PathBuf {
    default_cache_dir().join("uploads")
}

/// A registry client; cheap to clone (state is shared).
#[derive(Clone)]
pub struct Client {
    t: Arc<Transport>,
    chunk_size: usize,
    uploads: Option<Arc<resume::Records>>,
}

/// Options beyond [`ClientOptions`]: keychain, retries, chunk size.
pub struct ClientBuilder {
    opts: ClientOptions,
    keychain: Option<Keychain>,
    retry: RetryPolicy,
    chunk_size: usize,
    uploads: Option<std::path::PathBuf>,
}

impl ClientBuilder {
    /// Where credentials come from (default: [`Keychain::from_env`]).
    pub fn keychain(mut self, k: Keychain) -> Self {
        self.keychain = Some(k);
        self
    }
    /// How failed requests are retried.
    pub fn retry(mut self, r: RetryPolicy) -> Self {
        self.retry = r;
        self
    }
    /// Upload chunk size (and the monolithic-upload threshold).
    pub fn chunk_size(mut self, n: usize) -> Self {
        self.chunk_size = n.max(1);
        self
    }
    /// Remember chunked upload sessions in `dir` (made `0700`; see
    /// [`default_upload_dir`]), so that an upload broken off by the
    /// registry (or this process) going away goes on, in a later process,
    /// from the bytes the registry holds. Off by default.
    pub fn resume_uploads(mut self, dir: std::path::PathBuf) -> Self {
        self.uploads = Some(dir);
        self
    }
    /// Read the CA files and make the client.
    pub fn build(self) -> Result<Client> {
        let mut roots = Vec::new();
        for path in &self.opts.ca_files {
            let what = format!("CA file {}", path.display());
            let pem = std::fs::read(path).map_err(|e| Error::io(&what, e))?;
            let certs = reqwest::Certificate::from_pem_bundle(&pem)
                .map_err(|e| Error::invalid(&what, e.to_string()))?;
            if certs.is_empty() {
                return Err(Error::invalid(&what, "holds no PEM certificate"));
            }
            roots.extend(certs);
        }
        let tls = transport::Tls {
            roots,
            skip_verify: self.opts.insecure_skip_tls_verify,
        };
        let t = Transport::new(
            tls,
            self.keychain.unwrap_or_else(Keychain::from_env),
            self.opts
                .insecure
                .iter()
                .map(|r| crate::reference::normalize_registry(r))
                .collect(),
            self.opts.insecure_all,
            self.opts.jobs,
            self.retry,
            self.opts.stall_timeout,
        )?;
        Ok(Client {
            t: Arc::new(t),
            chunk_size: self.chunk_size,
            uploads: self.uploads.map(|d| Arc::new(resume::Records::new(d))),
        })
    }
}

impl Client {
    /// A client with the environment's credentials and default retries.
    pub fn new(opts: ClientOptions) -> Result<Client> {
        Self::builder(opts).build()
    }

    /// Start a client with `opts`, to set credentials, retries or chunk size.
    pub fn builder(opts: ClientOptions) -> ClientBuilder {
        ClientBuilder {
            opts,
            keychain: None,
            retry: RetryPolicy::default(),
            chunk_size: DEFAULT_CHUNK_SIZE,
            uploads: None,
        }
    }

    /// One repository, as a [`Source`] and [`Sink`].
    pub fn repo(&self, repo: &Repository) -> RegistryRepo {
        RegistryRepo {
            inner: Arc::new(RepoInner {
                client: self.clone(),
                repo: repo.clone(),
            }),
        }
    }

    /// `http` or `https`: what this client speaks to `registry`.
    pub fn scheme(&self, registry: &str) -> &'static str {
        self.t.scheme(registry)
    }

    /// Check that `registry` answers the v2 API (authenticating if asked).
    pub async fn ping(&self, registry: &str) -> Result<()> {
        let req = Req::new(Method::GET, self.t.url(registry, "")?, registry);
        let resp = self.t.send(&req).await?;
        if resp.status().is_success() {
            return Ok(());
        }
        Err(transport::status_error(registry, "API check", resp).await)
    }

    /// A bearer token for `scopes` (`repository:NAME:pull`, ...) from
    /// `registry`'s token server, issued to the keychain's credential for
    /// `repo` (or anonymously), as `crane auth token` asks for one. An error
    /// when the registry does not answer `/v2/` with a Bearer challenge.
    pub async fn token(
        &self,
        registry: &str,
        repo: &str,
        scopes: &[String],
    ) -> Result<auth::Token> {
        let req = Req::new(Method::GET, self.t.url(registry, "")?, registry);
        let first = self.t.send_plain(&req, None).await?;
        if first.status() != StatusCode::UNAUTHORIZED {
            return Err(Error::auth(
                registry,
                format!(
                    "GET /v2/ answered {} without asking for credentials: the registry issues no tokens",
                    first.status()
                ),
            ));
        }
        let header = first.header("www-authenticate").unwrap_or("");
        let challenge = transport::challenge_in(registry, header)?;
        drop(first);
        if !challenge.is_bearer() {
            return Err(Error::auth(
                registry,
                "the registry asks for Basic credentials, not for bearer tokens",
            ));
        }
        let cred = self.t.credential(registry, Some(repo)).await?;
        let allow_http = self.t.scheme(registry) == "http";
        auth::fetch_token(
            &self.t.http,
            registry,
            &challenge,
            scopes,
            cred.as_ref(),
            allow_http,
        )
        .await
    }

    /// Verify `cred` against `registry` without using the keychain: Basic
    /// against `/v2/`, or a token request to the realm it names.
    pub async fn check_credential(&self, registry: &str, cred: &Credential) -> Result<()> {
        let url = self.t.url(registry, "")?;
        let req = Req::new(Method::GET, url.clone(), registry);
        let first = self.t.send_plain(&req, None).await?;
        if first.status() != StatusCode::UNAUTHORIZED {
            return Ok(());
        }
        let header = first.header("www-authenticate").unwrap_or("");
        let challenge = transport::challenge_in(registry, header)?;
        drop(first);
        let authorization = if challenge.is_bearer() {
            let t = auth::fetch_token(
                &self.t.http,
                registry,
                &challenge,
                &[],
                Some(cred),
                self.t.scheme(registry) == "http",
            )
            .await?;
            format!("Bearer {}", t.token)
        } else {
            cred.basic_header().ok_or_else(|| {
                Error::auth(
                    registry,
                    "an identity token cannot answer a Basic challenge",
                )
            })?
        };
        let resp = self.t.send_plain(&req, Some(&authorization)).await?;
        match resp.status() {
            s if s.is_success() => Ok(()),
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => Err(Error::auth(
                registry,
                format!("credentials rejected: GET /v2/ answered {}", resp.status()),
            )),
            _ => Err(transport::status_error(registry, "API check", resp).await),
        }
    }
}

/// One repository on a registry. Implements [`Source`] and [`Sink`].
#[derive(Clone)]
pub struct RegistryRepo {
    inner: Arc<RepoInner>,
}

struct RepoInner {
    client: Client,
    repo: Repository,
}

impl RegistryRepo {
    /// Which repository this is.
    pub fn repository(&self) -> &Repository {
        &self.inner.repo
    }

    /// The client it goes through.
    pub fn client(&self) -> &Client {
        &self.inner.client
    }

    fn t(&self) -> &Transport {
        &self.inner.client.t
    }

    fn registry(&self) -> &str {
        &self.inner.repo.registry
    }

    fn name(&self) -> &str {
        &self.inner.repo.name
    }

    /// `https://reg/v2/<name>/<path>`.
    fn url(&self, path: &str) -> Result<url::Url> {
        self.t()
            .url(self.registry(), &format!("{}/{path}", self.name()))
    }

    /// The error for an unexpected answer about `what` (404: not found).
    async fn status_error(&self, what: &str, resp: transport::Resp) -> Error {
        transport::status_error(self.registry(), what, resp).await
    }

    /// An error about something this repository's registry answered.
    fn registry_error(&self, message: String) -> Error {
        Error::Registry {
            registry: self.registry().to_string(),
            message,
        }
    }

    fn req(&self, method: Method, url: url::Url, actions: &str) -> Req {
        let scope = format!("repository:{}:{actions}", self.name());
        Req::new(method, url, self.registry()).repo(self.name(), vec![scope])
    }

    fn pull(&self, method: Method, url: url::Url) -> Req {
        self.req(method, url, "pull")
    }

    fn push(&self, method: Method, url: url::Url) -> Req {
        self.req(method, url, "pull,push")
    }
}

/// A tag or digest, checked before it goes into a URL path.
fn check_reference(reference: &str) -> Result<()> {
    if reference.contains(':') {
        return Digest::parse(reference).map(|_| ());
    }
    if crate::reference::is_valid_tag(reference) {
        Ok(())
    } else {
        Err(Error::Reference {
            input: reference.to_string(),
            reason: "not a tag or digest".into(),
        })
    }
}

#[async_trait]
impl Source for RegistryRepo {
    fn name(&self) -> String {
        self.inner.repo.to_string()
    }

    fn repository(&self) -> Option<&Repository> {
        Some(&self.inner.repo)
    }

    async fn manifest(&self, reference: &str) -> Result<RawManifest> {
        self.get_manifest(reference).await
    }

    async fn blob(&self, digest: &Digest) -> Result<ByteStream> {
        self.get_blob(digest).await
    }

    async fn blob_range(&self, digest: &Digest, offset: u64, len: u64) -> Result<Bytes> {
        self.get_blob_range(digest, offset, len).await
    }

    async fn blob_size(&self, digest: &Digest) -> Result<u64> {
        self.head_blob(digest)
            .await?
            .ok_or_else(|| Error::NotFound(format!("blob {digest} in {}", self.inner.repo)))
    }
}

#[async_trait]
impl Sink for RegistryRepo {
    fn name(&self) -> String {
        self.inner.repo.to_string()
    }

    async fn has_blob(&self, digest: &Digest) -> Result<bool> {
        Ok(self.head_blob(digest).await?.is_some())
    }

    async fn put_blob(&self, digest: &Digest, size: u64, data: ByteStream) -> Result<()> {
        self.upload_blob(digest, size, data).await
    }

    /// Mounts from `from` when it is a repository on this same registry.
    /// `Ok(true)` only when the registry answered 201 (mounted).
    async fn mount_blob(&self, digest: &Digest, from: &dyn Source) -> Result<bool> {
        match from.repository() {
            Some(r) if r.registry == self.inner.repo.registry && r.name != self.inner.repo.name => {
                self.mount(digest, &r.name).await
            }
            _ => Ok(false),
        }
    }

    async fn put_manifest(&self, manifest: &RawManifest, tag: Option<&str>) -> Result<()> {
        self.push_manifest(manifest, tag).await.map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_are_checked_before_they_reach_a_url() {
        let d = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
        for ok in ["latest", "v1.2-rc_3", d, "_x"] {
            assert!(check_reference(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "../x",
            "a/b",
            "-x",
            ".x",
            "sha256:abc",
            "a?b",
            &"a".repeat(129),
        ] {
            assert!(check_reference(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn referrers_tags() {
        let d = Digest::of(b"x");
        assert_eq!(manifests::referrers_tag(&d), format!("sha256-{}", d.hex()));
        assert!(check_reference(&manifests::referrers_tag(&d)).is_ok());
    }
}
