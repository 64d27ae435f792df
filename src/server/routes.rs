//! Request routing. Repository names may hold any number of slashes, so the
//! path is parsed from its end (`.../manifests/<ref>`, `.../blobs/<digest>`,
//! ...) in one fallback handler rather than by axum's router.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, Method};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use super::error::{ApiError, ApiResult};
use super::store::Store;
use super::{blobs, check_name, header_value, manifests, param};

/// What a request path asks for. Public (hidden) for the fuzz targets.
#[doc(hidden)]
#[derive(Debug, PartialEq, Eq)]
pub enum Route {
    Base,
    Catalog,
    Tags(String),
    Manifest(String, String),
    Blob(String, String),
    UploadStart(String),
    Upload(String, String),
    Referrers(String, String),
}

/// Percent-decode one path segment (clients may send `sha256%3A...`). A
/// `%` not followed by two hex digits makes the path no route, where
/// `percent_decode_str` alone would keep it as a literal `%`.
fn decode(seg: &str) -> Option<String> {
    let hex2 = |s: &str| {
        s.get(..2)
            .is_some_and(|h| h.bytes().all(|b| b.is_ascii_hexdigit()))
    };
    if !seg.split('%').skip(1).all(hex2) {
        return None;
    }
    let decoded = percent_encoding::percent_decode_str(seg)
        .decode_utf8()
        .ok()?;
    Some(decoded.into_owned())
}

/// Split `/v2/<rest>` into a route; None for paths outside the API.
/// Public (hidden) for the fuzz targets.
#[doc(hidden)]
pub fn parse_route(path: &str) -> Option<Route> {
    let rest = path.strip_prefix("/v2")?;
    if rest.is_empty() || rest == "/" {
        return Some(Route::Base);
    }
    let rest = rest.strip_prefix('/')?;
    if rest == "_catalog" {
        return Some(Route::Catalog);
    }
    let segs: Vec<String> = rest.split('/').map(decode).collect::<Option<_>>()?;
    let n = segs.len();
    let name = |k: usize| (n > k).then(|| segs[..n - k].join("/"));
    let at = |i: usize| segs.get(n.checked_sub(i)?).map(String::as_str);
    let last = segs[n - 1].clone();
    match (at(3), at(2), at(1)) {
        (_, Some("tags"), Some("list")) => Some(Route::Tags(name(2)?)),
        (_, Some("manifests"), _) => Some(Route::Manifest(name(2)?, last)),
        (Some("blobs"), Some("uploads"), Some("")) => Some(Route::UploadStart(name(3)?)),
        (Some("blobs"), Some("uploads"), _) => Some(Route::Upload(name(3)?, last)),
        (_, Some("blobs"), Some("uploads")) => Some(Route::UploadStart(name(2)?)),
        (_, Some("blobs"), _) => Some(Route::Blob(name(2)?, last)),
        (_, Some("referrers"), _) => Some(Route::Referrers(name(2)?, last)),
        _ => None,
    }
}

/// The one handler behind every path.
pub async fn handle(State(store): State<Arc<Store>>, req: Request) -> Response {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let mut resp = dispatch(&store, req)
        .await
        .unwrap_or_else(IntoResponse::into_response);
    tracing::debug!("{method} {path} -> {}", resp.status());
    resp.headers_mut().insert(
        "Docker-Distribution-API-Version",
        HeaderValue::from_static("registry/2.0"),
    );
    resp
}

async fn dispatch(store: &Store, req: Request) -> ApiResult<Response> {
    let (parts, body) = req.into_parts();
    let path = parts.uri.path();
    let route = parse_route(path).ok_or_else(|| ApiError::not_found(path))?;
    let query: Vec<(String, String)> =
        url::form_urlencoded::parse(parts.uri.query().unwrap_or("").as_bytes())
            .into_owned()
            .collect();
    let m = &parts.method;
    let head = m == Method::HEAD;
    let h = &parts.headers;
    if let Route::Tags(n)
    | Route::Manifest(n, _)
    | Route::Blob(n, _)
    | Route::UploadStart(n)
    | Route::Upload(n, _)
    | Route::Referrers(n, _) = &route
    {
        check_name(n)?;
    }
    let get = m == Method::GET || head;
    match route {
        Route::Base if get => Ok(axum::Json(json!({})).into_response()),
        Route::Catalog if get => catalog(store, &query),
        Route::Tags(n) if get => tags(store, &n, &query),
        Route::Manifest(n, r) if get => manifests::get(store, &n, &r, head).await,
        Route::Manifest(n, r) if m == Method::PUT => manifests::put(store, &n, &r, h, body).await,
        Route::Manifest(n, r) if m == Method::DELETE => manifests::delete(store, &n, &r).await,
        Route::Blob(n, d) if get => blobs::get(store, &n, &d, h, head).await,
        Route::Blob(n, d) if m == Method::DELETE => blobs::delete(store, &n, &d).await,
        Route::UploadStart(n) if m == Method::POST => {
            blobs::start_upload(store, &n, &query, body).await
        }
        Route::Upload(n, id) if m == Method::PATCH => blobs::patch(store, &n, &id, h, body).await,
        Route::Upload(n, id) if m == Method::PUT => {
            blobs::put(store, &n, &id, &query, h, body).await
        }
        Route::Upload(n, id) if get => blobs::status(store, &n, &id).await,
        Route::Upload(n, id) if m == Method::DELETE => blobs::cancel(store, &n, &id).await,
        Route::Referrers(n, d) if get => manifests::referrers(store, &n, &d, &query),
        _ => Err(ApiError::unsupported(format!(
            "{m} {path} is not supported"
        ))),
    }
}

/// A page of names and, when more remain, (n, last) for the next page.
type Page = (Vec<String>, Option<(usize, String)>);

/// Apply `?n=&last=` to a sorted list.
fn paginate(items: Vec<String>, query: &[(String, String)]) -> ApiResult<Page> {
    let n = match param(query, "n") {
        Some(v) => Some(
            v.parse::<usize>()
                .map_err(|_| ApiError::pagination_invalid(v))?,
        ),
        None => None,
    };
    let last = param(query, "last");
    let mut page: Vec<String> = items
        .into_iter()
        .filter(|i| last.is_none_or(|l| i.as_str() > l))
        .collect();
    let Some(n) = n else {
        return Ok((page, None));
    };
    if page.len() <= n {
        return Ok((page, None));
    }
    page.truncate(n);
    let next = page.last().map(|l| (n, l.clone()));
    Ok((page, next))
}

fn link(resp: &mut Response, base: &str, next: Option<(usize, String)>) -> ApiResult<()> {
    if let Some((n, last)) = next {
        let q: String = url::form_urlencoded::Serializer::new(String::new())
            .append_pair("n", &n.to_string())
            .append_pair("last", &last)
            .finish();
        let v = header_value(&format!("<{base}?{q}>; rel=\"next\""))?;
        resp.headers_mut().insert(header::LINK, v);
    }
    Ok(())
}

fn tags(store: &Store, name: &str, query: &[(String, String)]) -> ApiResult<Response> {
    let all = store
        .tags(name)
        .ok_or_else(|| ApiError::name_unknown(name))?;
    let (page, next) = paginate(all, query)?;
    // As GCR and Artifact Registry do: every manifest of the repository,
    // tagged or not, so `ggfs gc` (and gcrane) can tell the untagged ones.
    let manifest: serde_json::Map<String, serde_json::Value> = store
        .manifest_tags(name)
        .unwrap_or_default()
        .into_iter()
        .map(|(d, (mt, tags))| (d.to_string(), json!({ "mediaType": mt, "tag": tags })))
        .collect();
    // Not oci-spec's `distribution::TagList`, which has no room for `manifest`.
    let body = json!({ "name": name, "tags": page, "manifest": manifest });
    let mut resp = axum::Json(body).into_response();
    link(&mut resp, &format!("/v2/{name}/tags/list"), next)?;
    Ok(resp)
}

fn catalog(store: &Store, query: &[(String, String)]) -> ApiResult<Response> {
    let (page, next) = paginate(store.repositories(), query)?;
    let mut resp = axum::Json(json!({ "repositories": page })).into_response();
    link(&mut resp, "/v2/_catalog", next)?;
    Ok(resp)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(p: &str) -> Option<Route> {
        parse_route(p)
    }

    #[test]
    fn routes_with_slashes() {
        let s = String::from;
        assert_eq!(r("/v2/"), Some(Route::Base));
        assert_eq!(r("/v2"), Some(Route::Base));
        assert_eq!(r("/v2/_catalog"), Some(Route::Catalog));
        assert_eq!(r("/v2/a/b/c/tags/list"), Some(Route::Tags(s("a/b/c"))));
        assert_eq!(
            r("/v2/a/b/c/manifests/latest"),
            Some(Route::Manifest(s("a/b/c"), s("latest")))
        );
        assert_eq!(
            r("/v2/a/blobs/sha256%3Aab"),
            Some(Route::Blob(s("a"), s("sha256:ab")))
        );
        assert_eq!(
            r("/v2/a/b/blobs/uploads/"),
            Some(Route::UploadStart(s("a/b")))
        );
        assert_eq!(
            r("/v2/a/b/blobs/uploads"),
            Some(Route::UploadStart(s("a/b")))
        );
        assert_eq!(
            r("/v2/a/b/blobs/uploads/xyz"),
            Some(Route::Upload(s("a/b"), s("xyz")))
        );
        assert_eq!(
            r("/v2/x/referrers/sha256:00"),
            Some(Route::Referrers(s("x"), s("sha256:00")))
        );
        // A repository may itself be called "blobs" or "manifests".
        assert_eq!(
            r("/v2/blobs/manifests/v1"),
            Some(Route::Manifest(s("blobs"), s("v1")))
        );
        assert_eq!(r("/v2/manifests/x"), None);
        assert_eq!(r("/v2/a"), None);
        assert_eq!(r("/v3/a/tags/list"), None);
        assert_eq!(r("/v2/a/blobs/%zz"), None);
        assert_eq!(r("/v2/a/blobs/%+f"), None);
        assert_eq!(r("/v2/a/blobs/%4"), None);
        assert_eq!(r("/v2/a/blobs/%ff"), None); // not UTF-8
        assert_eq!(
            r("/v2/a%2Fb/manifests/%76%31"),
            Some(Route::Manifest(s("a/b"), s("v1")))
        );
    }

    #[test]
    fn pagination() {
        let items: Vec<String> = ["a", "b", "c", "d"].map(String::from).to_vec();
        let q = |n: &str, last: Option<&str>| {
            let mut q = vec![("n".to_string(), n.to_string())];
            q.extend(last.map(|l| ("last".to_string(), l.to_string())));
            q
        };
        let (p, next) = paginate(items.clone(), &q("2", None)).unwrap();
        assert_eq!(p, ["a", "b"]);
        assert_eq!(next, Some((2, "b".into())));
        let (p, next) = paginate(items.clone(), &q("2", Some("b"))).unwrap();
        assert_eq!(p, ["c", "d"]);
        assert_eq!(next, None);
        let (p, _) = paginate(items.clone(), &[]).unwrap();
        assert_eq!(p.len(), 4);
        assert!(paginate(items, &q("x", None)).is_err());
    }
}
