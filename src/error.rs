//! The library's one error type. Every variant names the thing at fault so the
//! CLI can print a single clear line.

use crate::digest::Digest;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid reference {input:?}: {reason}")]
    Reference { input: String, reason: String },

    #[error("invalid digest {input:?}: {reason}")]
    Digest { input: String, reason: String },

    #[error("blob {expected} failed verification: its bytes hash to {actual}")]
    DigestMismatch { expected: Digest, actual: Digest },

    /// Part of a blob (an eStargz chunk, a TOC) whose bytes do not match the
    /// digest that vouches for them; `what` names the part and its blob.
    #[error("{what} failed verification: expected {expected}, its bytes hash to {actual}")]
    ContentMismatch {
        what: String,
        expected: Digest,
        actual: Digest,
    },

    #[error("blob {digest} failed verification: expected {expected} bytes, got {actual}")]
    SizeMismatch {
        digest: Digest,
        expected: u64,
        actual: u64,
    },

    #[error("{what} is {size} bytes, over the {limit}-byte limit")]
    TooLarge { what: String, size: u64, limit: u64 },

    #[error("invalid {what}: {reason}")]
    Invalid { what: String, reason: String },

    #[error("unsupported media type {0:?}")]
    MediaType(String),

    #[error("{0} not found")]
    NotFound(String),

    #[error("{what}: no platform matches {platform}")]
    NoPlatform { what: String, platform: String },

    #[error("registry {registry}: {message}")]
    Registry { registry: String, message: String },

    /// Nothing came from `registry` for `secs` seconds (no answer, or a
    /// download that stopped moving).
    #[error("registry {registry} stalled: {what} got no bytes for {secs}s")]
    Stalled {
        registry: String,
        what: String,
        secs: u64,
    },

    /// The TLS handshake with `registry` failed over its certificate
    /// (untrusted issuer, wrong name, expired, ...).
    #[error("registry {registry}: TLS certificate not accepted: {problem}")]
    Tls { registry: String, problem: String },

    #[error("authentication to {registry} failed: {message}")]
    Auth { registry: String, message: String },

    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },

    #[error("{context}: {source}")]
    Http {
        context: String,
        #[source]
        source: reqwest::Error,
    },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// Wrap an I/O error with the path or operation it concerns.
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }

    /// `registry` refused us, or we cannot authenticate to it.
    pub fn auth(registry: impl Into<String>, message: impl Into<String>) -> Self {
        Error::Auth {
            registry: registry.into(),
            message: message.into(),
        }
    }

    pub fn invalid(what: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::Invalid {
            what: what.into(),
            reason: reason.into(),
        }
    }

    /// True when the failure says the thing does not exist (as opposed to a
    /// transport or verification failure).
    pub fn is_not_found(&self) -> bool {
        matches!(self, Error::NotFound(_))
    }
}

/// Lets verification errors travel through `std::io::Read`/`Write` and come
/// back out intact.
impl From<Error> for std::io::Error {
    fn from(e: Error) -> Self {
        match e {
            Error::Io { source, .. } => source,
            other => std::io::Error::new(std::io::ErrorKind::InvalidData, other),
        }
    }
}

/// Recover a library error carried inside an `io::Error`, or wrap it.
pub fn from_io(context: impl Into<String>, e: std::io::Error) -> Error {
    if e.get_ref().is_some_and(|inner| inner.is::<Error>()) {
        let inner = e.into_inner().expect("checked above");
        return *inner.downcast::<Error>().expect("checked above");
    }
    Error::io(context, e)
}
