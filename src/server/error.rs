//! Distribution-spec error responses: `{"errors":[{"code","message","detail"}]}`.

use axum::http::{HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};

use crate::digest::Digest;
use crate::error::Error;

/// One error as the distribution spec shapes it, plus the HTTP status and any
/// headers (416 answers carry the upload's current Range).
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    pub detail: Value,
    pub headers: Vec<(HeaderName, HeaderValue)>,
}

pub type ApiResult<T> = std::result::Result<T, ApiError>;

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
            detail: Value::Null,
            headers: Vec::new(),
        }
    }

    pub fn with_detail(mut self, detail: Value) -> Self {
        self.detail = detail;
        self
    }

    pub fn with_header(mut self, name: HeaderName, value: HeaderValue) -> Self {
        self.headers.push((name, value));
        self
    }

    pub fn blob_unknown(digest: &Digest) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "BLOB_UNKNOWN",
            format!("blob {digest} unknown to registry"),
        )
        .with_detail(json!({ "digest": digest }))
    }

    pub fn upload_unknown(id: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "BLOB_UPLOAD_UNKNOWN",
            format!("blob upload {id:?} unknown to registry"),
        )
    }

    pub fn upload_invalid(reason: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "BLOB_UPLOAD_INVALID", reason)
    }

    pub fn digest_invalid(reason: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "DIGEST_INVALID", reason)
    }

    pub fn manifest_unknown(reference: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "MANIFEST_UNKNOWN",
            format!("manifest {reference} unknown to registry"),
        )
        .with_detail(json!({ "reference": reference }))
    }

    pub fn manifest_invalid(reason: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "MANIFEST_INVALID", reason)
    }

    pub fn manifest_blob_unknown(digest: &Digest, what: &str) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "MANIFEST_BLOB_UNKNOWN",
            format!("manifest references {what} {digest} unknown to this repository"),
        )
        .with_detail(json!({ "digest": digest }))
    }

    pub fn name_unknown(name: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "NAME_UNKNOWN",
            format!("repository {name:?} not known to registry"),
        )
        .with_detail(json!({ "name": name }))
    }

    pub fn name_invalid(name: &str, reason: &str) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "NAME_INVALID",
            format!("invalid repository name {name:?}: {reason}"),
        )
        .with_detail(json!({ "name": name }))
    }

    pub fn tag_invalid(tag: &str) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "TAG_INVALID",
            format!("invalid tag {tag:?}: want [a-zA-Z0-9_][a-zA-Z0-9._-]{{0,127}}"),
        )
    }

    pub fn range_invalid(reason: impl Into<String>) -> Self {
        Self::new(StatusCode::RANGE_NOT_SATISFIABLE, "RANGE_INVALID", reason)
    }

    pub fn pagination_invalid(value: &str) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "PAGINATION_NUMBER_INVALID",
            format!("invalid page size n={value:?}"),
        )
    }

    pub fn unsupported(what: impl Into<String>) -> Self {
        Self::new(StatusCode::METHOD_NOT_ALLOWED, "UNSUPPORTED", what)
    }

    pub fn not_found(path: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "NOT_FOUND",
            format!("no registry endpoint at {path:?}"),
        )
    }

    /// A failure on our side (disk, a corrupt store). Logged, reported as 500.
    pub fn internal(e: Error) -> Self {
        tracing::error!("registry server: {e}");
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "UNKNOWN", e.to_string())
    }
}

impl From<Error> for ApiError {
    fn from(e: Error) -> Self {
        ApiError::internal(e)
    }
}

// The body is built here rather than as oci-spec's
// `distribution::ErrorResponse`: its `ErrorCode` enum has no `UNKNOWN`,
// `RANGE_INVALID`, `TAG_INVALID`, `PAGINATION_NUMBER_INVALID` or
// `NOT_FOUND`, which this registry answers with.
impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({
            "errors": [{ "code": self.code, "message": self.message, "detail": self.detail }]
        });
        let mut resp = (self.status, axum::Json(body)).into_response();
        for (name, value) in self.headers {
            resp.headers_mut().insert(name, value);
        }
        resp
    }
}
