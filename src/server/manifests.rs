//! Manifest endpoints and the referrers API.

use axum::body::Body;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use serde::Deserialize;
use serde_json::{json, Map, Value};

use super::error::{ApiError, ApiResult};
use super::store::{ManifestRecord, Store};
use super::{header_value, DIGEST_HEADER};
use crate::digest::Digest;
use crate::image::manifest::{media, MAX_MANIFEST_SIZE};

/// A manifest reference from a URL: a tag or a digest.
pub enum Ref {
    Tag(String),
    Digest(Digest),
}

impl Ref {
    /// Anything with a ':' is meant as a digest (tags cannot hold one).
    pub fn parse(s: &str) -> ApiResult<Ref> {
        if s.contains(':') {
            return Digest::parse(s)
                .map(Ref::Digest)
                .map_err(|e| ApiError::digest_invalid(e.to_string()));
        }
        if crate::reference::is_valid_tag(s) {
            Ok(Ref::Tag(s.to_string()))
        } else {
            Err(ApiError::tag_invalid(s))
        }
    }
}

/// The fields of a manifest or index the registry acts on.
#[derive(Deserialize)]
struct Probe {
    #[serde(rename = "schemaVersion")]
    schema_version: Option<u64>,
    #[serde(rename = "mediaType")]
    media_type: Option<String>,
    #[serde(rename = "artifactType")]
    artifact_type: Option<String>,
    config: Option<Desc>,
    layers: Option<Vec<Desc>>,
    manifests: Option<Vec<Desc>>,
    subject: Option<Desc>,
    annotations: Option<Map<String, Value>>,
}

#[derive(Deserialize)]
struct Desc {
    #[serde(rename = "mediaType")]
    media_type: Option<String>,
    digest: String,
    #[serde(default)]
    urls: Vec<String>,
}

fn bare(media_type: &str) -> &str {
    media_type.split(';').next().unwrap_or("").trim()
}

fn desc_digest(d: &Desc, field: &str) -> ApiResult<Digest> {
    Digest::parse(&d.digest)
        .map_err(|e| ApiError::manifest_invalid(format!("{field} descriptor: {e}")))
}

/// The descriptor the referrers API lists for a manifest with a `subject`,
/// and that subject; None when the manifest has no (valid) subject.
pub fn referrer_of(bytes: &[u8], media_type: &str, digest: &Digest) -> Option<(Digest, Value)> {
    let probe: Probe = serde_json::from_slice(bytes).ok()?;
    let subject = Digest::parse(&probe.subject.as_ref()?.digest).ok()?;
    Some((
        subject,
        referrer_descriptor(&probe, media_type, digest, bytes.len()),
    ))
}

fn referrer_descriptor(probe: &Probe, media_type: &str, digest: &Digest, size: usize) -> Value {
    let mut desc = json!({ "mediaType": bare(media_type), "digest": digest, "size": size });
    // artifactType, else (image manifests) the config's media type.
    let artifact_type = probe.artifact_type.clone().or_else(|| {
        (probe.manifests.is_none())
            .then(|| probe.config.as_ref()?.media_type.clone())
            .flatten()
    });
    if let Some(at) = artifact_type {
        desc["artifactType"] = Value::String(at);
    }
    if let Some(a) = &probe.annotations {
        desc["annotations"] = Value::Object(a.clone());
    }
    desc
}

/// Check a pushed manifest and work out what it references.
fn examine(
    bytes: &Bytes,
    content_type: Option<&str>,
    digest: &Digest,
) -> ApiResult<ManifestRecord> {
    let probe: Probe = serde_json::from_slice(bytes)
        .map_err(|e| ApiError::manifest_invalid(format!("manifest is not valid JSON: {e}")))?;
    if probe.schema_version != Some(2) {
        return Err(ApiError::manifest_invalid(format!(
            "schemaVersion {:?} unsupported (want 2)",
            probe.schema_version
        )));
    }
    let sent = content_type.map(bare).filter(|c| !c.is_empty());
    if let (Some(ct), Some(mt)) = (sent, probe.media_type.as_deref()) {
        if ct != mt {
            return Err(ApiError::manifest_invalid(format!(
                "Content-Type {ct:?} does not match the manifest's mediaType {mt:?}"
            )));
        }
    }
    let is_index = probe.manifests.is_some();
    let media_type = match (content_type, &probe.media_type) {
        (Some(ct), _) if !bare(ct).is_empty() => ct.to_string(),
        (_, Some(mt)) => mt.clone(),
        _ if is_index => media::OCI_INDEX.to_string(),
        _ => media::OCI_MANIFEST.to_string(),
    };
    if HeaderValue::from_str(&media_type).is_err() {
        return Err(ApiError::manifest_invalid(format!(
            "media type {media_type:?} is not a valid header value"
        )));
    }
    let (blobs, children) = references(&probe, &media_type)?;
    let subject = match &probe.subject {
        Some(s) => Some((
            desc_digest(s, "subject")?,
            referrer_descriptor(&probe, &media_type, digest, bytes.len()),
        )),
        None => None,
    };
    Ok(ManifestRecord {
        digest: digest.clone(),
        media_type,
        blobs,
        children,
        subject,
    })
}

/// (blobs, child manifests) a manifest needs present in its repository.
/// Foreign layers (with `urls`) live elsewhere and are not checked.
fn references(probe: &Probe, media_type: &str) -> ApiResult<(Vec<Digest>, Vec<Digest>)> {
    let mt = bare(media_type);
    if let Some(children) = &probe.manifests {
        if media::is_manifest(mt) {
            return Err(ApiError::manifest_invalid(format!(
                "{mt} cannot list manifests"
            )));
        }
        let children = children
            .iter()
            .map(|d| desc_digest(d, "manifests[]"))
            .collect::<ApiResult<_>>()?;
        return Ok((Vec::new(), children));
    }
    let Some(config) = &probe.config else {
        return Err(ApiError::manifest_invalid(
            "neither an index (manifests) nor an image manifest (config)",
        ));
    };
    if media::is_index(mt) {
        return Err(ApiError::manifest_invalid(format!(
            "{mt} needs a manifests list"
        )));
    }
    let mut blobs = vec![desc_digest(config, "config")?];
    for layer in probe.layers.iter().flatten() {
        if layer.urls.is_empty() {
            blobs.push(desc_digest(layer, "layers[]")?);
        }
    }
    Ok((blobs, Vec::new()))
}

/// Read a request body of at most `limit` bytes.
async fn read_limited(headers: &HeaderMap, body: Body, limit: u64) -> ApiResult<Bytes> {
    let too_large = |size: u64| {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "MANIFEST_INVALID",
            format!("manifest is {size} bytes, over the {limit}-byte limit"),
        )
        .with_detail(json!({ "size": size, "limit": limit }))
    };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if let Some(n) = declared.filter(|&n| n > limit) {
        return Err(too_large(n));
    }
    let mut buf = BytesMut::new();
    let mut stream = body.into_data_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| ApiError::manifest_invalid(format!("reading body: {e}")))?;
        buf.extend_from_slice(&chunk);
        if buf.len() as u64 > limit {
            return Err(too_large(buf.len() as u64));
        }
    }
    Ok(buf.freeze())
}

pub async fn put(
    store: &Store,
    name: &str,
    reference: &str,
    headers: &HeaderMap,
    body: Body,
) -> ApiResult<Response> {
    let r = Ref::parse(reference)?;
    let bytes = read_limited(headers, body, MAX_MANIFEST_SIZE).await?;
    // Stored under the URL's digest when it names one (sha512 included),
    // else under the sha256 the registry computes.
    let digest = match &r {
        Ref::Digest(want) => want.of_like(&bytes),
        Ref::Tag(_) => Digest::of(&bytes),
    };
    if let Ref::Digest(want) = &r {
        if want != &digest {
            return Err(ApiError::digest_invalid(format!(
                "manifest hashes to {digest}, not the {want} in the URL"
            ))
            .with_detail(json!({ "expected": want, "actual": digest })));
        }
    }
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok());
    let record = examine(&bytes, content_type, &digest)?;
    let subject = record.subject.as_ref().map(|(s, _)| s.clone());
    let tag = match &r {
        Ref::Tag(t) => Some(t.as_str()),
        Ref::Digest(_) => None,
    };
    store.add_manifest(name, &bytes, record, tag).await?;
    let mut resp = super::created(&format!("/v2/{name}/manifests/{digest}"), &digest)?;
    if let Some(s) = subject {
        resp.headers_mut()
            .insert("OCI-Subject", header_value(s.as_str())?);
    }
    Ok(resp)
}

pub async fn get(store: &Store, name: &str, reference: &str, head: bool) -> ApiResult<Response> {
    // A malformed reference names no manifest: 404, as the distribution
    // spec's conformance suite wants (`.INVALID_MANIFEST_NAME`), not 400.
    let known = Ref::parse(reference)
        .ok()
        .and(store.resolve(name, reference));
    let Some((digest, media_type)) = known else {
        if !store.repo_exists(name) {
            return Err(ApiError::name_unknown(name));
        }
        return Err(ApiError::manifest_unknown(reference));
    };
    let bytes = match store.read_small(&digest).await {
        Ok(b) => b,
        // Deleted (and its bytes removed) since it was resolved.
        Err(_) if store.resolve(name, reference).is_none() => {
            return Err(ApiError::manifest_unknown(reference))
        }
        Err(e) => return Err(e.into()),
    };
    let len = bytes.len();
    let body = if head {
        Body::empty()
    } else {
        Body::from(bytes)
    };
    let mut resp = body.into_response();
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, header_value(&media_type)?);
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    h.insert(DIGEST_HEADER, header_value(digest.as_str())?);
    h.insert(header::ETAG, header_value(&format!("\"{digest}\""))?);
    Ok(resp)
}

pub async fn delete(store: &Store, name: &str, reference: &str) -> ApiResult<Response> {
    Ref::parse(reference)?;
    if store.delete_manifest(name, reference).await? {
        Ok(StatusCode::ACCEPTED.into_response())
    } else if !store.repo_exists(name) {
        Err(ApiError::name_unknown(name))
    } else {
        Err(ApiError::manifest_unknown(reference))
    }
}

/// GET /v2/<name>/referrers/<digest>[?artifactType=...]: always an index,
/// empty when nothing refers to the digest.
pub fn referrers(
    store: &Store,
    name: &str,
    digest: &str,
    query: &[(String, String)],
) -> ApiResult<Response> {
    let subject = Digest::parse(digest).map_err(|e| ApiError::digest_invalid(e.to_string()))?;
    let filter = query
        .iter()
        .find(|(k, _)| k == "artifactType")
        .map(|(_, v)| v.as_str());
    let manifests: Vec<Value> = store
        .referrers(name, &subject)
        .into_iter()
        .filter(|d| filter.is_none_or(|f| d["artifactType"].as_str() == Some(f)))
        .collect();
    let index = json!({
        "schemaVersion": 2,
        "mediaType": media::OCI_INDEX,
        "manifests": manifests,
    });
    let mut resp = axum::Json(index).into_response();
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(media::OCI_INDEX),
    );
    if filter.is_some() {
        h.insert(
            "OCI-Filters-Applied",
            HeaderValue::from_static("artifactType"),
        );
    }
    Ok(resp)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_and_digests() {
        assert!(matches!(Ref::parse("latest"), Ok(Ref::Tag(_))));
        assert!(matches!(Ref::parse("_v1.2-rc"), Ok(Ref::Tag(_))));
        assert!(Ref::parse("-bad").is_err());
        assert!(Ref::parse(&"a".repeat(129)).is_err());
        assert!(Ref::parse("sha256:abc").is_err());
        let d = Digest::of(b"x");
        assert!(matches!(Ref::parse(d.as_str()), Ok(Ref::Digest(_))));
    }

    #[test]
    fn examine_finds_references_and_subject() {
        let cfg = Digest::of(b"c");
        let layer = Digest::of(b"l");
        let subject = Digest::of(b"s");
        let m = json!({
            "schemaVersion": 2,
            "mediaType": media::OCI_MANIFEST,
            "config": {"mediaType": "application/x-sig", "digest": cfg, "size": 1},
            "layers": [
                {"mediaType": media::OCI_LAYER, "digest": layer, "size": 1},
                {"mediaType": media::OCI_LAYER, "digest": Digest::of(b"f"), "size": 1, "urls": ["http://x"]}
            ],
            "subject": {"mediaType": media::OCI_MANIFEST, "digest": subject, "size": 1},
            "annotations": {"k": "v"}
        });
        let bytes = Bytes::from(serde_json::to_vec(&m).unwrap());
        let d = Digest::of(&bytes);
        let r = examine(&bytes, Some(media::OCI_MANIFEST), &d).unwrap();
        assert_eq!(r.blobs, vec![cfg, layer]);
        let (s, desc) = r.subject.unwrap();
        assert_eq!(s, subject);
        assert_eq!(desc["artifactType"], "application/x-sig");
        assert_eq!(desc["annotations"]["k"], "v");
        assert_eq!(desc["size"], bytes.len());

        let err = examine(&bytes, Some(media::OCI_INDEX), &d).unwrap_err();
        assert_eq!(err.code, "MANIFEST_INVALID");
        let err = examine(&Bytes::from_static(b"{"), None, &d).unwrap_err();
        assert_eq!(err.code, "MANIFEST_INVALID");
    }
}
