//! Manifests: GET (size-capped, verified), HEAD, PUT (maintaining the
//! referrers tag schema when the registry has no referrers API), DELETE,
//! and the referrers API with its fallback.

use bytes::Bytes;
use reqwest::header::{ACCEPT, CONTENT_LENGTH, CONTENT_TYPE};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

use super::{check_reference, RegistryRepo};
use crate::digest::Digest;
use crate::error::{Error, Result};
use crate::image::manifest::{media, ImageIndex, RawManifest, MAX_MANIFEST_SIZE};

impl RegistryRepo {
    fn manifest_what(&self, reference: &str) -> String {
        let sep = if reference.contains(':') { '@' } else { ':' };
        format!("manifest {}{sep}{reference}", self.repository())
    }

    /// `.../manifests/<reference>`, once the reference is known to be a
    /// tag or digest (nothing else may reach the URL path).
    fn manifest_url(&self, reference: &str) -> Result<url::Url> {
        check_reference(reference)?;
        self.url(&format!("manifests/{reference}"))
    }

    fn manifest_req(&self, method: Method, reference: &str) -> Result<super::Req> {
        let url = self.manifest_url(reference)?;
        Ok(self
            .pull(method, url)
            .redirects()
            .header(ACCEPT, &media::MANIFEST_ACCEPT.join(", ")))
    }

    /// A manifest by tag or digest, at most [`MAX_MANIFEST_SIZE`] bytes,
    /// verified against the digest asked for and against the registry's
    /// `Docker-Content-Digest`.
    pub async fn get_manifest(&self, reference: &str) -> Result<RawManifest> {
        let what = self.manifest_what(reference);
        let req = self.manifest_req(Method::GET, reference)?;
        let resp = self.t().send(&req).await?;
        if resp.status() != StatusCode::OK {
            return Err(self.status_error(&what, resp).await);
        }
        let content_type = resp.header(CONTENT_TYPE.as_str()).map(str::to_string);
        let claimed = resp.header("docker-content-digest").map(str::to_string);
        let bytes = resp.bytes_capped(&what, MAX_MANIFEST_SIZE).await?;
        let m = RawManifest::new(bytes, content_type.as_deref()).map_err(|e| rename(e, &what))?;
        if reference.contains(':') {
            Digest::parse(reference)?.verify(&m.bytes)?;
        }
        if let Some(claimed) = claimed.as_deref().and_then(|d| Digest::parse(d).ok()) {
            claimed.verify(&m.bytes)?;
        }
        Ok(m)
    }

    /// Digest, media type and size of a manifest, or `None` when absent.
    /// Falls back to a GET when the registry's HEAD leaves any out.
    pub async fn head_manifest(&self, reference: &str) -> Result<Option<(Digest, String, u64)>> {
        let what = self.manifest_what(reference);
        let req = self.manifest_req(Method::HEAD, reference)?;
        let resp = self.t().send(&req).await?;
        match resp.status() {
            StatusCode::OK => {}
            StatusCode::NOT_FOUND => return Ok(None),
            _ => return Err(self.status_error(&what, resp).await),
        }
        let digest = resp
            .header("docker-content-digest")
            .and_then(|d| Digest::parse(d).ok());
        let mt = resp
            .header(CONTENT_TYPE.as_str())
            .map(|c| c.split(';').next().unwrap_or("").trim().to_string())
            .filter(|c| media::is_index(c) || media::is_manifest(c));
        let size = resp
            .header(CONTENT_LENGTH.as_str())
            .and_then(|v| v.trim().parse::<u64>().ok());
        if let (Some(d), Some(mt), Some(size)) = (digest, mt, size) {
            if size > MAX_MANIFEST_SIZE {
                return Err(Error::TooLarge {
                    what,
                    size,
                    limit: MAX_MANIFEST_SIZE,
                });
            }
            return Ok(Some((d, mt, size)));
        }
        match self.get_manifest(reference).await {
            Ok(m) => Ok(Some((
                m.digest.clone(),
                m.media_type.clone(),
                m.bytes.len() as u64,
            ))),
            Err(e) if e.is_not_found() => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// PUT a manifest under `tag`, or under its digest when `tag` is None.
    /// A manifest with a `subject` is also added to the subject's
    /// `sha256-<hex>` referrers index when the registry did not process the
    /// subject itself (no `OCI-Subject` header). Returns the digest.
    pub async fn push_manifest(&self, m: &RawManifest, tag: Option<&str>) -> Result<Digest> {
        let reference = tag
            .map(str::to_string)
            .unwrap_or_else(|| m.digest.to_string());
        let resp = self
            .put_manifest_bytes(&m.bytes, &m.media_type, &reference)
            .await?;
        if let Some(stored) = resp.as_deref().and_then(|d| Digest::parse(d).ok()) {
            stored.verify(&m.bytes)?;
        }
        Ok(m.digest.clone())
    }

    /// The PUT itself; answers the `Docker-Content-Digest` it got back.
    async fn put_manifest_bytes(
        &self,
        bytes: &Bytes,
        media_type: &str,
        reference: &str,
    ) -> Result<Option<String>> {
        let what = self.manifest_what(reference);
        let req = self
            .push(Method::PUT, self.manifest_url(reference)?)
            .header(CONTENT_TYPE, media_type)
            .body(bytes.clone());
        let resp = self.t().send(&req).await?;
        if !matches!(resp.status(), StatusCode::CREATED | StatusCode::OK) {
            return Err(self.status_error(&what, resp).await);
        }
        let stored = resp.header("docker-content-digest").map(str::to_string);
        if resp.header("oci-subject").is_none() {
            if let Some(subject) = subject_of(bytes) {
                self.add_to_referrers_tag(&subject, bytes, media_type)
                    .await?;
            }
        }
        Ok(stored)
    }

    /// Add a manifest's descriptor to its subject's fallback referrers index.
    async fn add_to_referrers_tag(
        &self,
        subject: &Digest,
        bytes: &Bytes,
        media_type: &str,
    ) -> Result<()> {
        let tag = referrers_tag(subject);
        let mut index = self.fallback_index(&tag).await?;
        let digest = Digest::of(bytes);
        let entries = index["manifests"].as_array_mut().ok_or_else(|| {
            Error::invalid(
                self.manifest_what(&tag),
                "referrers index has no manifests array",
            )
        })?;
        if entries.iter().any(|d| d["digest"] == digest.as_str()) {
            return Ok(());
        }
        entries.push(referrer_descriptor(bytes, media_type, &digest));
        let body = Bytes::from(
            serde_json::to_vec(&index)
                .map_err(|e| Error::invalid("referrers index", e.to_string()))?,
        );
        Box::pin(self.put_manifest_bytes(&body, media::OCI_INDEX, &tag)).await?;
        Ok(())
    }

    /// The index at a referrers tag as JSON, or a new empty one.
    async fn fallback_index(&self, tag: &str) -> Result<Value> {
        match self.get_manifest(tag).await {
            Ok(m) if m.is_index() => serde_json::from_slice(&m.bytes)
                .map_err(|e| rename(Error::invalid("", e.to_string()), &self.manifest_what(tag))),
            Ok(_) => Err(Error::invalid(
                self.manifest_what(tag),
                "referrers tag holds an image manifest, not an index",
            )),
            Err(e) if e.is_not_found() => {
                Ok(json!({"schemaVersion": 2, "mediaType": media::OCI_INDEX, "manifests": []}))
            }
            Err(e) => Err(e),
        }
    }

    /// Delete a manifest by digest (or by tag, where the registry allows).
    pub async fn delete(&self, reference: &str) -> Result<()> {
        let url = self.manifest_url(reference)?;
        self.delete_at(url, &self.manifest_what(reference)).await
    }

    /// Manifests whose `subject` is `subject`, optionally only those of one
    /// artifact type: the referrers API, or the `sha256-<hex>` tag when the
    /// registry answers 404 (no API). No referrers gives an empty index.
    pub async fn referrers(
        &self,
        subject: &Digest,
        artifact_type: Option<&str>,
    ) -> Result<ImageIndex> {
        let what = format!("referrers of {subject} in {}", self.repository());
        let mut url = self.url(&format!("referrers/{subject}"))?;
        if let Some(at) = artifact_type {
            url.query_pairs_mut().append_pair("artifactType", at);
        }
        let req = self
            .pull(Method::GET, url)
            .redirects()
            .header(ACCEPT, media::OCI_INDEX);
        let resp = self.t().send(&req).await?;
        let (mut index, filtered): (Value, bool) = match resp.status() {
            StatusCode::OK => {
                let filtered = resp
                    .header("oci-filters-applied")
                    .is_some_and(|f| f.split(',').any(|x| x.trim() == "artifactType"));
                let body = resp.bytes_capped(&what, MAX_MANIFEST_SIZE).await?;
                let v = serde_json::from_slice(&body)
                    .map_err(|e| Error::invalid(&what, e.to_string()))?;
                (v, filtered)
            }
            StatusCode::NOT_FOUND => (self.fallback_index(&referrers_tag(subject)).await?, false),
            _ => return Err(self.status_error(&what, resp).await),
        };
        if let (Some(at), false) = (artifact_type, filtered) {
            if let Some(list) = index["manifests"].as_array_mut() {
                list.retain(|d| d["artifactType"] == at);
            }
        }
        serde_json::from_value(index).map_err(|e| Error::invalid(what, e.to_string()))
    }
}

/// `sha256-<hex>`, truncated as the distribution spec says (alg to 32,
/// hex to 64 characters) so it stays a valid tag.
pub fn referrers_tag(subject: &Digest) -> String {
    let alg = &subject.algorithm()[..subject.algorithm().len().min(32)];
    let hex = &subject.hex()[..subject.hex().len().min(64)];
    format!("{alg}-{hex}")
}

fn subject_of(bytes: &[u8]) -> Option<Digest> {
    let v: Value = serde_json::from_slice(bytes).ok()?;
    Digest::parse(v.get("subject")?.get("digest")?.as_str()?).ok()
}

/// The descriptor a referrers index lists: artifactType (or the config's
/// media type) and the manifest's annotations.
fn referrer_descriptor(bytes: &[u8], media_type: &str, digest: &Digest) -> Value {
    let v: Value = serde_json::from_slice(bytes).unwrap_or(Value::Null);
    let mut d = json!({"mediaType": media_type, "digest": digest.as_str(), "size": bytes.len()});
    let at = v
        .get("artifactType")
        .or_else(|| v.get("config").and_then(|c| c.get("mediaType")));
    if let Some(at) = at.filter(|a| a.is_string()) {
        d["artifactType"] = at.clone();
    }
    if let Some(a) = v.get("annotations").filter(|a| a.is_object()) {
        d["annotations"] = a.clone();
    }
    d
}

/// Name the manifest in parse errors that only said "manifest".
fn rename(e: Error, what: &str) -> Error {
    match e {
        Error::Invalid { reason, .. } => Error::invalid(what, reason),
        Error::TooLarge { size, limit, .. } => Error::TooLarge {
            what: what.to_string(),
            size,
            limit,
        },
        other => other,
    }
}
