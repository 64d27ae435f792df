//! Blob endpoints: reads with Range, deletes, and uploads (monolithic,
//! chunked, cross-repository mount).

use axum::body::Body;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use serde_json::json;

use super::error::{ApiError, ApiResult};
use super::store::{Store, Upload};
use super::{header_value, param, DIGEST_HEADER};
use crate::digest::Digest;

const UUID_HEADER: &str = "Docker-Upload-UUID";

fn parse_digest(s: &str) -> ApiResult<Digest> {
    Digest::parse(s).map_err(|e| ApiError::digest_invalid(e.to_string()))
}

/// What a `Range` request header asks of a blob of `size` bytes.
#[derive(Debug, PartialEq, Eq)]
enum Wanted {
    Whole,
    /// Inclusive byte range.
    Part(u64, u64),
    Unsatisfiable,
}

/// Single `bytes=` ranges only; malformed or multi-range headers are
/// ignored (RFC 9110 lets a server serve the whole representation then).
fn wanted_range(header: Option<&str>, size: u64) -> Wanted {
    let Some(spec) = header.and_then(|h| h.trim().strip_prefix("bytes=")) else {
        return Wanted::Whole;
    };
    if spec.contains(',') {
        return Wanted::Whole;
    }
    let Some((a, b)) = spec.split_once('-') else {
        return Wanted::Whole;
    };
    let (a, b) = (a.trim(), b.trim());
    let (start, end) = if a.is_empty() {
        // Suffix range: the last `b` bytes.
        match b.parse::<u64>() {
            Ok(0) => return Wanted::Unsatisfiable,
            Ok(n) => (size.saturating_sub(n), size.saturating_sub(1)),
            Err(_) => return Wanted::Whole,
        }
    } else {
        let Ok(start) = a.parse::<u64>() else {
            return Wanted::Whole;
        };
        let end = match b {
            "" => u64::MAX,
            b => match b.parse::<u64>() {
                Ok(e) if e >= start => e,
                _ => return Wanted::Whole,
            },
        };
        (start, end)
    };
    if size == 0 || start >= size {
        return Wanted::Unsatisfiable;
    }
    Wanted::Part(start, end.min(size - 1))
}

/// GET/HEAD /v2/<name>/blobs/<digest>
pub async fn get(
    store: &Store,
    name: &str,
    digest: &str,
    headers: &HeaderMap,
    head: bool,
) -> ApiResult<Response> {
    let d = parse_digest(digest)?;
    if !store.has_blob(name, &d) {
        return Err(ApiError::blob_unknown(&d));
    }
    let size = store
        .content_size(&d)
        .await?
        .ok_or_else(|| ApiError::blob_unknown(&d))?;
    let range = headers.get(header::RANGE).and_then(|v| v.to_str().ok());
    let (status, start, len) = match wanted_range(range, size) {
        Wanted::Whole => (StatusCode::OK, 0, size),
        Wanted::Part(s, e) => (StatusCode::PARTIAL_CONTENT, s, e - s + 1),
        Wanted::Unsatisfiable => {
            return Err(ApiError::range_invalid(format!(
                "range {range:?} outside blob {d} of {size} bytes"
            ))
            .with_header(
                header::CONTENT_RANGE,
                header_value(&format!("bytes */{size}"))?,
            ))
        }
    };
    let body = if head {
        Body::empty()
    } else {
        store.read_content(&d, start, len).await?
    };
    let mut resp = (status, body).into_response();
    let h = resp.headers_mut();
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    h.insert(DIGEST_HEADER, header_value(d.as_str())?);
    h.insert(header::ETAG, header_value(&format!("\"{d}\""))?);
    if status == StatusCode::PARTIAL_CONTENT {
        let cr = format!("bytes {start}-{}/{size}", start + len - 1);
        h.insert(header::CONTENT_RANGE, header_value(&cr)?);
    }
    Ok(resp)
}

/// DELETE /v2/<name>/blobs/<digest>: unlinks it from this repository only.
pub async fn delete(store: &Store, name: &str, digest: &str) -> ApiResult<Response> {
    let d = parse_digest(digest)?;
    if store.delete_blob(name, &d).await? {
        Ok(StatusCode::ACCEPTED.into_response())
    } else {
        Err(ApiError::blob_unknown(&d))
    }
}

/// 201 for a blob now present in `name`.
fn created(name: &str, d: &Digest) -> ApiResult<Response> {
    super::created(&format!("/v2/{name}/blobs/{d}"), d)
}

/// Location, Range and UUID headers describing an open session.
fn session_headers(h: &mut HeaderMap, name: &str, id: &str, offset: u64) -> ApiResult<()> {
    h.insert(
        header::LOCATION,
        header_value(&format!("/v2/{name}/blobs/uploads/{id}"))?,
    );
    h.insert(
        header::RANGE,
        header_value(&format!("0-{}", offset.saturating_sub(1)))?,
    );
    h.insert(UUID_HEADER, header_value(id)?);
    Ok(())
}

fn session_response(status: StatusCode, name: &str, id: &str, offset: u64) -> ApiResult<Response> {
    let mut resp = status.into_response();
    session_headers(resp.headers_mut(), name, id, offset)?;
    Ok(resp)
}

/// POST /v2/<name>/blobs/uploads/: mount, monolithic upload, or new session.
pub async fn start_upload(
    store: &Store,
    name: &str,
    query: &[(String, String)],
    body: Body,
) -> ApiResult<Response> {
    if let (Some(mount), Some(from)) = (param(query, "mount"), param(query, "from")) {
        let d = parse_digest(mount)?;
        super::check_name(from)?;
        if store.mount(from, name, &d).await? {
            return created(name, &d);
        }
    }
    let digest = param(query, "digest").map(parse_digest).transpose()?;
    let id = store.start_upload(name).await?;
    let Some(d) = digest else {
        return session_response(StatusCode::ACCEPTED, name, &id, 0);
    };
    // Monolithic: nothing of a failed one is kept.
    let result = finish(store, name, &id, &HeaderMap::new(), body, &d).await;
    if result.is_err() {
        abandon(store, &id).await;
    }
    result
}

async fn abandon(store: &Store, id: &str) {
    if let Some(session) = store.upload(id) {
        if let Some(upload) = session.lock().await.take() {
            store.cancel_upload(id, upload).await;
        }
    }
}

type SessionGuard = tokio::sync::OwnedMutexGuard<Option<Upload>>;

/// Upload session `id`, locked, when it is open and belongs to repository
/// `name`; UPLOAD_UNKNOWN otherwise (also to a request that waited on the
/// lock while another ended the session).
async fn open_session(store: &Store, name: &str, id: &str) -> ApiResult<SessionGuard> {
    let session = store
        .upload(id)
        .ok_or_else(|| ApiError::upload_unknown(id))?;
    let guard = session.lock_owned().await;
    match guard.as_ref() {
        Some(u) if u.repo == name => Ok(guard),
        _ => Err(ApiError::upload_unknown(id)),
    }
}

/// The upload in a guard from [`open_session`].
fn upload<'a>(guard: &'a mut SessionGuard, id: &str) -> ApiResult<&'a mut Upload> {
    guard.as_mut().ok_or_else(|| ApiError::upload_unknown(id))
}

/// The `start-end` of a chunk's Content-Range (a `bytes ` prefix and
/// `/total` suffix are tolerated).
fn content_range(headers: &HeaderMap) -> ApiResult<Option<(u64, u64)>> {
    let Some(v) = headers.get(header::CONTENT_RANGE) else {
        return Ok(None);
    };
    let bad = || ApiError::range_invalid(format!("malformed Content-Range {v:?}"));
    let s = v.to_str().map_err(|_| bad())?.trim();
    let s = s.strip_prefix("bytes ").unwrap_or(s);
    let s = s.split('/').next().unwrap_or(s);
    let (a, b) = s.split_once('-').ok_or_else(bad)?;
    let a: u64 = a.trim().parse().map_err(|_| bad())?;
    let b: u64 = b.trim().parse().map_err(|_| bad())?;
    if b < a {
        return Err(bad());
    }
    Ok(Some((a, b)))
}

/// Append a request body to an upload, checking it against Content-Range;
/// a chunk that fails midway or has the wrong length is undone.
async fn append(
    upload: &mut Upload,
    name: &str,
    id: &str,
    headers: &HeaderMap,
    body: Body,
) -> ApiResult<()> {
    let start = upload.offset();
    let range = content_range(headers)?;
    let out_of_order = |msg: String| -> ApiResult<ApiError> {
        let mut h = HeaderMap::new();
        session_headers(&mut h, name, id, start)?;
        let mut e = ApiError::range_invalid(msg);
        e.headers
            .extend(h.into_iter().filter_map(|(k, v)| Some((k?, v))));
        Ok(e)
    };
    if let Some((a, _)) = range.filter(|(a, _)| *a != start) {
        return Err(out_of_order(format!(
            "chunk starts at {a}, upload is at {start}"
        ))?);
    }
    let mark = upload.mark();
    let mut stream = body.into_data_stream();
    while let Some(chunk) = stream.next().await {
        let written = match chunk {
            Ok(bytes) => upload.write(&bytes).await.map_err(ApiError::from),
            Err(e) => Err(ApiError::upload_invalid(format!("reading chunk: {e}"))),
        };
        if let Err(e) = written {
            upload.rollback(mark).await?;
            return Err(e);
        }
    }
    let got = upload.offset() - start;
    if let Some((a, b)) = range.filter(|(a, b)| b - a + 1 != got) {
        upload.rollback(mark).await?;
        return Err(out_of_order(format!(
            "Content-Range {a}-{b} announces {} bytes, body had {got}",
            b - a + 1
        ))?);
    }
    Ok(())
}

/// PATCH /v2/<name>/blobs/uploads/<id>
pub async fn patch(
    store: &Store,
    name: &str,
    id: &str,
    headers: &HeaderMap,
    body: Body,
) -> ApiResult<Response> {
    let mut session = open_session(store, name, id).await?;
    let u = upload(&mut session, id)?;
    append(u, name, id, headers, body).await?;
    session_response(StatusCode::ACCEPTED, name, id, u.offset())
}

/// GET /v2/<name>/blobs/uploads/<id>
pub async fn status(store: &Store, name: &str, id: &str) -> ApiResult<Response> {
    let mut session = open_session(store, name, id).await?;
    let offset = upload(&mut session, id)?.offset();
    session_response(StatusCode::NO_CONTENT, name, id, offset)
}

/// DELETE /v2/<name>/blobs/uploads/<id>
pub async fn cancel(store: &Store, name: &str, id: &str) -> ApiResult<Response> {
    let mut session = open_session(store, name, id).await?;
    if let Some(u) = session.take() {
        store.cancel_upload(id, u).await;
    }
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// PUT /v2/<name>/blobs/uploads/<id>?digest=
pub async fn put(
    store: &Store,
    name: &str,
    id: &str,
    query: &[(String, String)],
    headers: &HeaderMap,
    body: Body,
) -> ApiResult<Response> {
    let digest = param(query, "digest")
        .ok_or_else(|| ApiError::digest_invalid("closing an upload needs ?digest="))?;
    let d = parse_digest(digest)?;
    finish(store, name, id, headers, body, &d).await
}

/// Append the last chunk, verify and commit; the session ends either way
/// unless the chunk itself was refused.
async fn finish(
    store: &Store,
    name: &str,
    id: &str,
    headers: &HeaderMap,
    body: Body,
    d: &Digest,
) -> ApiResult<Response> {
    let mut session = open_session(store, name, id).await?;
    append(upload(&mut session, id)?, name, id, headers, body).await?;
    let upload = session.take().ok_or_else(|| ApiError::upload_unknown(id))?;
    store
        .commit_upload(id, upload, d)
        .await
        .map_err(|e| e.with_detail(json!({ "digest": d, "upload": id })))?;
    created(name, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges() {
        let r = |h: &str, size| wanted_range(Some(h), size);
        assert_eq!(r("bytes=0-9", 100), Wanted::Part(0, 9));
        assert_eq!(r("bytes=90-200", 100), Wanted::Part(90, 99));
        assert_eq!(r("bytes=10-", 100), Wanted::Part(10, 99));
        assert_eq!(r("bytes=-10", 100), Wanted::Part(90, 99));
        assert_eq!(r("bytes=-500", 100), Wanted::Part(0, 99));
        assert_eq!(r("bytes=100-", 100), Wanted::Unsatisfiable);
        assert_eq!(r("bytes=-0", 100), Wanted::Unsatisfiable);
        assert_eq!(r("bytes=0-0", 0), Wanted::Unsatisfiable);
        assert_eq!(r("bytes=5-1", 100), Wanted::Whole);
        assert_eq!(r("bytes=0-1,5-6", 100), Wanted::Whole);
        assert_eq!(r("items=0-1", 100), Wanted::Whole);
        assert_eq!(wanted_range(None, 100), Wanted::Whole);
    }
}
