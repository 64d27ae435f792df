//! What the filesystem needs from a registry, as a small trait so the
//! namespace and merge logic do not depend on how the registry is reached.

use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use futures::TryStreamExt;
use ggfs::image::{ByteStream, Source};
use ggfs::{Digest, Error, RawManifest, Result};

#[async_trait]
pub trait Registry: Send + Sync {
    /// `host:port`, for messages.
    fn name(&self) -> String;

    /// Check that the registry answers `/v2/`.
    async fn ping(&self) -> Result<()>;

    /// Every repository, or `None` when the registry does not list them.
    async fn catalog(&self) -> Result<Option<Vec<String>>>;

    /// The tags of `repo`; `Error::NotFound` when there is no such repository.
    async fn tags(&self, repo: &str) -> Result<Vec<String>>;

    /// Manifests and blobs of one repository.
    fn source(&self, repo: &str) -> Arc<dyn Source>;
}

/// A plain-HTTP(S) distribution client without authentication: enough for
/// the registries the daemon is tested against.
pub struct HttpRegistry {
    base: String,
    host: String,
    http: reqwest::Client,
}

impl HttpRegistry {
    pub fn new(host: &str, insecure: bool) -> Result<Arc<Self>> {
        let scheme = if insecure || is_local(host) {
            "http"
        } else {
            "https"
        };
        let http = reqwest::Client::builder()
            .connect_timeout(std::time::Duration::from_secs(10))
            .build()
            .map_err(|e| http_err(host, "building HTTP client", e))?;
        Ok(Arc::new(Self {
            base: format!("{scheme}://{host}/v2/"),
            host: host.to_string(),
            http,
        }))
    }

    async fn get(&self, path: &str, what: &str) -> Result<reqwest::Response> {
        let url = format!("{}{}", self.base, path);
        let resp = self
            .http
            .get(&url)
            .send()
            .await
            .map_err(|e| http_err(&self.host, what, e))?;
        check(&self.host, what, resp).await
    }
}

fn is_local(host: &str) -> bool {
    let h = host.rsplit_once(':').map_or(host, |(h, _)| h);
    h == "localhost" || h.starts_with("127.") || h == "[::1]"
}

fn http_err(host: &str, what: &str, e: reqwest::Error) -> Error {
    Error::Http {
        context: format!("registry {host}: {what}"),
        source: e,
    }
}

async fn check(host: &str, what: &str, resp: reqwest::Response) -> Result<reqwest::Response> {
    let status = resp.status();
    if status.is_success() {
        return Ok(resp);
    }
    if status == reqwest::StatusCode::NOT_FOUND {
        return Err(Error::NotFound(what.to_string()));
    }
    let body = resp.text().await.unwrap_or_default();
    Err(Error::Registry {
        registry: host.to_string(),
        message: format!("{what}: HTTP {status}: {}", body.trim()),
    })
}

async fn json<T: serde::de::DeserializeOwned>(
    host: &str,
    what: &str,
    resp: reqwest::Response,
) -> Result<T> {
    let body = resp.bytes().await.map_err(|e| http_err(host, what, e))?;
    serde_json::from_slice(&body)
        .map_err(|e| Error::invalid(format!("{what} from {host}"), e.to_string()))
}

#[derive(serde::Deserialize)]
struct Catalog {
    repositories: Option<Vec<String>>,
}

#[derive(serde::Deserialize)]
struct Tags {
    tags: Option<Vec<String>>,
}

#[async_trait]
impl Registry for HttpRegistry {
    fn name(&self) -> String {
        self.host.clone()
    }

    async fn ping(&self) -> Result<()> {
        let what = "ping /v2/";
        let resp = self
            .http
            .get(&self.base)
            .send()
            .await
            .map_err(|e| http_err(&self.host, what, e))?;
        // 401 still proves a registry answers.
        if resp.status().is_success() || resp.status() == reqwest::StatusCode::UNAUTHORIZED {
            return Ok(());
        }
        check(&self.host, what, resp).await.map(|_| ())
    }

    async fn catalog(&self) -> Result<Option<Vec<String>>> {
        let mut all = Vec::new();
        let mut last: Option<String> = None;
        loop {
            let path = match &last {
                Some(l) => format!("_catalog?n=1000&last={l}"),
                None => "_catalog?n=1000".to_string(),
            };
            let resp = match self.get(&path, "catalog").await {
                Ok(r) => r,
                Err(Error::NotFound(_)) => return Ok(None),
                Err(Error::Registry { .. }) => return Ok(None),
                Err(e) => return Err(e),
            };
            let more = resp.headers().contains_key(reqwest::header::LINK);
            let page: Catalog = json(&self.host, "catalog", resp).await?;
            let page = page.repositories.unwrap_or_default();
            if !more || page.is_empty() {
                all.extend(page);
                return Ok(Some(all));
            }
            last = page.last().cloned();
            all.extend(page);
        }
    }

    async fn tags(&self, repo: &str) -> Result<Vec<String>> {
        let what = format!("repository {}/{repo}", self.host);
        let mut all = Vec::new();
        let mut last: Option<String> = None;
        loop {
            let path = match &last {
                Some(l) => format!("{repo}/tags/list?n=1000&last={l}"),
                None => format!("{repo}/tags/list?n=1000"),
            };
            let resp = self.get(&path, &what).await?;
            let more = resp.headers().contains_key(reqwest::header::LINK);
            let page: Tags = json(&self.host, &what, resp).await?;
            let page = page.tags.unwrap_or_default();
            if !more || page.is_empty() {
                all.extend(page);
                return Ok(all);
            }
            last = page.last().cloned();
            all.extend(page);
        }
    }

    fn source(&self, repo: &str) -> Arc<dyn Source> {
        Arc::new(HttpRepo {
            base: format!("{}{}/", self.base, repo),
            name: format!("{}/{repo}", self.host),
            host: self.host.clone(),
            http: self.http.clone(),
        })
    }
}

struct HttpRepo {
    base: String,
    name: String,
    host: String,
    http: reqwest::Client,
}

impl HttpRepo {
    async fn send(&self, req: reqwest::RequestBuilder, what: &str) -> Result<reqwest::Response> {
        let resp = req
            .send()
            .await
            .map_err(|e| http_err(&self.host, what, e))?;
        check(&self.host, what, resp).await
    }
}

#[async_trait]
impl Source for HttpRepo {
    fn name(&self) -> String {
        self.name.clone()
    }

    async fn manifest(&self, reference: &str) -> Result<RawManifest> {
        let what = format!("manifest {}:{reference}", self.name);
        let accept = ggfs::manifest::media::MANIFEST_ACCEPT.join(", ");
        let req = self
            .http
            .get(format!("{}manifests/{reference}", self.base))
            .header(reqwest::header::ACCEPT, accept);
        let resp = self.send(req, &what).await?;
        let ct = resp
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let bytes = resp
            .bytes()
            .await
            .map_err(|e| http_err(&self.host, &what, e))?;
        match Digest::parse(reference) {
            Ok(d) => RawManifest::verified(bytes, ct.as_deref(), &d),
            Err(_) => RawManifest::new(bytes, ct.as_deref()),
        }
    }

    async fn blob(&self, digest: &Digest) -> Result<ByteStream> {
        let what = format!("blob {digest} in {}", self.name);
        let req = self.http.get(format!("{}blobs/{digest}", self.base));
        let resp = self.send(req, &what).await?;
        Ok(Box::pin(resp.bytes_stream().map_err(std::io::Error::other)))
    }

    async fn blob_range(&self, digest: &Digest, offset: u64, len: u64) -> Result<Bytes> {
        let what = format!("blob {digest} in {}", self.name);
        if len == 0 {
            return Ok(Bytes::new());
        }
        let range = format!("bytes={}-{}", offset, offset + len - 1);
        let req = self
            .http
            .get(format!("{}blobs/{digest}", self.base))
            .header(reqwest::header::RANGE, range);
        let resp = self.send(req, &what).await?;
        let partial = resp.status() == reqwest::StatusCode::PARTIAL_CONTENT;
        let body = resp
            .bytes()
            .await
            .map_err(|e| http_err(&self.host, &what, e))?;
        let body = if partial {
            body
        } else {
            // A 200 carries the whole blob: cut out the range.
            let end = (offset + len).min(body.len() as u64) as usize;
            body.slice((offset as usize).min(end)..end)
        };
        Ok(body)
    }

    async fn blob_size(&self, digest: &Digest) -> Result<u64> {
        let what = format!("blob {digest} in {}", self.name);
        let req = self.http.head(format!("{}blobs/{digest}", self.base));
        let resp = self.send(req, &what).await?;
        resp.content_length()
            .ok_or_else(|| Error::invalid(what, "no Content-Length"))
    }
}
