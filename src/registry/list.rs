//! Tag and catalog listing with `?n=&last=` pagination and `Link` headers.

use std::collections::BTreeMap;

use reqwest::{Method, StatusCode};
use url::Url;

use super::transport::{status_error, Req, Transport};
use super::{Client, RegistryRepo};
use crate::digest::Digest;
use crate::error::{Error, Result};

/// One page of a listing. `next` is the `last` to pass for the next page;
/// `None` on the last page.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Page {
    /// Tags or repository names, in the registry's order.
    pub items: Vec<String>,
    /// Where the next page starts.
    pub next: Option<String>,
}

const MAX_LIST_BODY: u64 = 64 * 1024 * 1024;
const MAX_PAGES: usize = 100_000;

/// Which listing: the JSON field holding the names.
#[derive(Clone, Copy)]
enum Kind {
    Tags,
    Catalog,
}

impl Kind {
    fn field(self) -> &'static str {
        match self {
            Kind::Tags => "tags",
            Kind::Catalog => "repositories",
        }
    }
}

/// Fetch one page: its names and the URL of the next page, if any.
async fn fetch(
    t: &Transport,
    req: &Req,
    kind: Kind,
    what: &str,
) -> Result<(Vec<String>, Option<Url>)> {
    let resp = t.send(req).await?;
    if resp.status() != StatusCode::OK {
        return Err(status_error(&req.registry, what, resp).await);
    }
    let next = match resp.header("link").and_then(next_link) {
        Some(link) => Some(
            resp.url()
                .join(&link)
                .map_err(|e| Error::invalid(format!("{what}: Link {link:?}"), e.to_string()))?,
        ),
        None => None,
    };
    let body = resp.bytes_capped(what, MAX_LIST_BODY).await?;
    // Read by hand, not as oci-spec's `distribution::TagList`: that needs
    // `name` and a `tags` array, where registries send `"tags": null` for a
    // repository with none, and the catalog's field is `repositories`.
    let v: serde_json::Value = serde_json::from_slice(&body)
        .map_err(|e| Error::invalid(what, format!("not JSON: {e}")))?;
    let items = match v.get(kind.field()) {
        None | Some(serde_json::Value::Null) => Vec::new(),
        Some(serde_json::Value::Array(a)) => a
            .iter()
            .map(|x| x.as_str().map(str::to_string))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| {
                Error::invalid(what, format!("`{}` holds a non-string", kind.field()))
            })?,
        Some(_) => {
            return Err(Error::invalid(
                what,
                format!("`{}` is not an array", kind.field()),
            ))
        }
    };
    Ok((items, next))
}

/// The target of `rel="next"` in a Link header: `</v2/x/tags/list?n=2&last=b>; rel="next"`.
pub(crate) fn next_link(header: &str) -> Option<String> {
    header.split(',').find_map(|part| {
        let (target, params) = part.trim().split_once(';')?;
        let is_next = params.split(';').any(|p| {
            let p = p.trim().to_ascii_lowercase().replace(' ', "");
            p == "rel=\"next\"" || p == "rel=next"
        });
        let target = target.trim().strip_prefix('<')?.strip_suffix('>')?;
        is_next.then(|| target.to_string())
    })
}

/// One page as a [`Page`]. Registries that ignore `n` are cut to `n` here.
async fn page(
    t: &Transport,
    mut req: Req,
    kind: Kind,
    what: &str,
    n: usize,
    last: Option<&str>,
) -> Result<Page> {
    {
        let mut q = req.url.query_pairs_mut();
        q.append_pair("n", &n.to_string());
        if let Some(l) = last {
            q.append_pair("last", l);
        }
    }
    let (mut items, link) = fetch(t, &req, kind, what).await?;
    // A registry that ignores `n`, or returns `last` itself after `last`
    // (distribution 2.8 for tags), gets paged here: lexical order, as the
    // spec orders pages.
    if items.len() > n || last.is_some_and(|l| items.iter().any(|i| i == l)) {
        items.sort();
        items.retain(|i| last.is_none_or(|l| i.as_str() > l));
        let more = items.len() > n;
        items.truncate(n);
        let next = if more { items.last().cloned() } else { None };
        return Ok(Page { items, next });
    }
    let next = link.and_then(|u| {
        u.query_pairs()
            .find(|(k, _)| k == "last")
            .map(|(_, v)| v.into_owned())
            .or_else(|| items.last().cloned())
    });
    Ok(Page { items, next })
}

/// Every page, following Link headers.
async fn all(t: &Transport, mut req: Req, kind: Kind, what: &str) -> Result<Vec<String>> {
    let mut out = Vec::new();
    for _ in 0..MAX_PAGES {
        let (items, next) = fetch(t, &req, kind, what).await?;
        out.extend(items);
        match next {
            Some(u) if u != req.url => req.url = u,
            _ => return Ok(out),
        }
    }
    Err(Error::invalid(what, format!("more than {MAX_PAGES} pages")))
}

impl RegistryRepo {
    fn tags_req(&self) -> Result<Req> {
        Ok(self.pull(Method::GET, self.url("tags/list")?))
    }

    /// Every tag, all pages.
    pub async fn tags(&self) -> Result<Vec<String>> {
        let what = format!("tags of {}", self.repository());
        all(self.t(), self.tags_req()?, Kind::Tags, &what).await
    }

    /// Every manifest of the repository with its media type and tags, from
    /// the `manifest` map that GCR, Artifact Registry and `ggfs registry
    /// serve` add to tags/list (all pages merged); `None` when the registry
    /// lists only tags, as distribution does.
    pub async fn manifest_map(&self) -> Result<Option<BTreeMap<Digest, (String, Vec<String>)>>> {
        let what = format!("tags of {}", self.repository());
        let mut req = self.tags_req()?;
        let mut out: Option<BTreeMap<Digest, (String, Vec<String>)>> = None;
        for _ in 0..MAX_PAGES {
            let resp = self.t().send(&req).await?;
            if resp.status() != StatusCode::OK {
                return Err(status_error(&req.registry, &what, resp).await);
            }
            let next = resp
                .header("link")
                .and_then(next_link)
                .and_then(|l| resp.url().join(&l).ok());
            let body = resp.bytes_capped(&what, MAX_LIST_BODY).await?;
            let v: serde_json::Value = serde_json::from_slice(&body)
                .map_err(|e| Error::invalid(&what, format!("not JSON: {e}")))?;
            if let Some(map) = v.get("manifest").and_then(|m| m.as_object()) {
                let out = out.get_or_insert_with(BTreeMap::new);
                for (digest, info) in map {
                    let digest = Digest::parse(digest)?;
                    let mt = info["mediaType"].as_str().unwrap_or_default().to_string();
                    let tags = info["tag"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter_map(|t| t.as_str().map(str::to_string))
                        .collect();
                    out.insert(digest, (mt, tags));
                }
            }
            match next {
                Some(u) if u != req.url => req.url = u,
                _ => return Ok(out),
            }
        }
        Err(Error::invalid(
            &what,
            format!("more than {MAX_PAGES} pages"),
        ))
    }

    /// At most `n` tags after `last`.
    pub async fn tags_page(&self, n: usize, last: Option<&str>) -> Result<Page> {
        let what = format!("tags of {}", self.repository());
        page(self.t(), self.tags_req()?, Kind::Tags, &what, n, last).await
    }
}

impl Client {
    fn catalog_req(&self, registry: &str) -> Result<Req> {
        let url = self.t.url(registry, "_catalog")?;
        Ok(Req::new(Method::GET, url, registry).scopes(vec!["registry:catalog:*".into()]))
    }

    /// Every repository on `registry`, all pages.
    pub async fn catalog(&self, registry: &str) -> Result<Vec<String>> {
        let what = format!("catalog of {registry}");
        all(&self.t, self.catalog_req(registry)?, Kind::Catalog, &what).await
    }

    /// At most `n` repositories after `last`.
    pub async fn catalog_page(&self, registry: &str, n: usize, last: Option<&str>) -> Result<Page> {
        let what = format!("catalog of {registry}");
        page(
            &self.t,
            self.catalog_req(registry)?,
            Kind::Catalog,
            &what,
            n,
            last,
        )
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::next_link;

    #[test]
    fn link_headers() {
        assert_eq!(
            next_link(r#"</v2/x/tags/list?n=2&last=b>; rel="next""#).as_deref(),
            Some("/v2/x/tags/list?n=2&last=b")
        );
        assert_eq!(
            next_link(r#"<https://r/v2/_catalog?last=a%2Fb&n=2>;rel=next"#).as_deref(),
            Some("https://r/v2/_catalog?last=a%2Fb&n=2")
        );
        assert_eq!(
            next_link(r#"</a>; rel="prev", </b>; rel="next""#).as_deref(),
            Some("/b")
        );
        assert_eq!(next_link(r#"</a>; rel="prev""#), None);
        assert_eq!(next_link("garbage"), None);
    }
}
