//! An embedded OCI distribution-spec registry (`ggfs registry serve`), on
//! axum. Storage is in memory or on disk; blobs are shared across
//! repositories by digest, but a repository sees a blob only once it was
//! pushed or mounted there.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> ggfs::Result<()> {
//! use ggfs::server::{Server, Storage};
//! let server = Server::start(Storage::Memory).await?; // 127.0.0.1:<free port>
//! assert!(server.host().starts_with("127.0.0.1:"));
//! // Serves until `server` is dropped.
//! # Ok(()) }
//! ```

mod blobs;
mod error;
mod manifests;
mod routes;
mod store;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use axum::http::HeaderValue;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::error::{Error, Result};
use error::{ApiError, ApiResult};
use store::Store;

// For the fuzz targets (`fuzz/`): the route parser behind every request.
#[doc(hidden)]
pub use routes::{parse_route, Route};

/// Where the registry keeps what is pushed to it.
#[derive(Clone, Debug)]
pub enum Storage {
    /// Gone when the process exits.
    Memory,
    /// Under this directory (created if missing); survives restarts.
    Disk(PathBuf),
}

const DIGEST_HEADER: &str = "Docker-Content-Digest";

/// The registry as an axum router, for embedding in another server.
pub fn router(storage: Storage) -> Result<axum::Router> {
    let store = match storage {
        Storage::Memory => Store::memory(),
        Storage::Disk(dir) => Store::disk(&dir)?,
    };
    Ok(axum::Router::new()
        .fallback(routes::handle)
        .with_state(Arc::new(store)))
}

/// Serve the registry on `listener` until the task is dropped or fails.
pub async fn serve(listener: TcpListener, storage: Storage) -> Result<()> {
    let app = router(storage)?;
    let addr = listener
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_else(|_| "listener".into());
    axum::serve(listener, app)
        .await
        .map_err(|e| Error::io(format!("registry server on {addr}"), e))
}

/// A registry running in a background task; stopped when dropped.
pub struct Server {
    addr: SocketAddr,
    task: JoinHandle<Result<()>>,
}

impl Server {
    /// Start on 127.0.0.1 with a free port.
    pub async fn start(storage: Storage) -> Result<Server> {
        Self::bind(SocketAddr::from(([127, 0, 0, 1], 0)), storage).await
    }

    /// Start on `addr` (port 0 picks a free one).
    pub async fn bind(addr: SocketAddr, storage: Storage) -> Result<Server> {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|e| Error::io(format!("binding registry to {addr}"), e))?;
        let addr = listener
            .local_addr()
            .map_err(|e| Error::io("registry listener address", e))?;
        let app = router(storage)?;
        let task = tokio::spawn(async move {
            axum::serve(listener, app)
                .await
                .map_err(|e| Error::io(format!("registry server on {addr}"), e))
        });
        Ok(Server { addr, task })
    }

    /// Where it listens (the port chosen, for `127.0.0.1:0`).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `127.0.0.1:PORT`, the registry part of image references.
    pub fn host(&self) -> String {
        self.addr.to_string()
    }

    /// `http://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn header_value(s: &str) -> ApiResult<HeaderValue> {
    HeaderValue::from_str(s)
        .map_err(|_| ApiError::internal(Error::invalid("response header", format!("{s:?}"))))
}

/// 201 Created for something now at `location` (a blob or manifest path),
/// naming its digest.
fn created(location: &str, d: &crate::digest::Digest) -> ApiResult<axum::response::Response> {
    use axum::response::IntoResponse;
    let mut resp = axum::http::StatusCode::CREATED.into_response();
    let h = resp.headers_mut();
    h.insert(axum::http::header::LOCATION, header_value(location)?);
    h.insert(DIGEST_HEADER, header_value(d.as_str())?);
    Ok(resp)
}

/// The first value of a query parameter.
fn param<'a>(query: &'a [(String, String)], key: &str) -> Option<&'a str> {
    query
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}

/// Repository names per the distribution spec: slash-separated components
/// of `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*`.
fn check_name(name: &str) -> ApiResult<()> {
    match crate::reference::repository_name_problem(name) {
        Some(reason) => Err(ApiError::name_invalid(name, &reason)),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for ok in ["a", "a/b/c", "foo_bar", "a__b", "a---b", "a.b-c/d0"] {
            assert!(check_name(ok).is_ok(), "{ok}");
        }
        for bad in [
            "", "A", "a/", "/a", "a//b", "a..b", "a___b", "-a", "a-", "a._b", "a b",
        ] {
            assert!(check_name(bad).is_err(), "{bad}");
        }
    }
}
