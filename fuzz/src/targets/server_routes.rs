//! The embedded registry's request paths (`server::parse_route`), and the
//! repository-name check every named route goes through. A route names what
//! its path said: the same route, its segments percent-encoded again,
//! parses to the same route.

use ggfs::reference::repository_name_problem;
use ggfs::server::{parse_route, Route};

/// Percent-encode everything but unreserved characters.
fn enc(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn name(n: &str) -> String {
    n.split('/').map(enc).collect::<Vec<_>>().join("/")
}

fn path_of(r: &Route) -> String {
    match r {
        Route::Base => "/v2/".into(),
        Route::Catalog => "/v2/_catalog".into(),
        Route::Tags(n) => format!("/v2/{}/tags/list", name(n)),
        Route::Manifest(n, r) => format!("/v2/{}/manifests/{}", name(n), enc(r)),
        Route::Blob(n, d) => format!("/v2/{}/blobs/{}", name(n), enc(d)),
        Route::UploadStart(n) => format!("/v2/{}/blobs/uploads/", name(n)),
        Route::Upload(n, id) => format!("/v2/{}/blobs/uploads/{}", name(n), enc(id)),
        Route::Referrers(n, d) => format!("/v2/{}/referrers/{}", name(n), enc(d)),
    }
}

/// One input.
pub fn run(data: &[u8]) {
    let Ok(path) = std::str::from_utf8(data) else {
        return;
    };
    let Some(route) = parse_route(path) else {
        return;
    };
    assert!(path.starts_with("/v2"), "{path:?}");
    match &route {
        Route::Tags(n)
        | Route::Manifest(n, _)
        | Route::Blob(n, _)
        | Route::UploadStart(n)
        | Route::Upload(n, _)
        | Route::Referrers(n, _) => {
            let _ = repository_name_problem(n);
        }
        Route::Base | Route::Catalog => {}
    }
    let again = path_of(&route);
    assert_eq!(
        parse_route(&again),
        Some(route),
        "{path:?} re-encoded as {again:?}"
    );
}
