//! The library's one error type. Every variant names the thing at fault so the
//! CLI can print a single clear line.

use crate::digest::Digest;

/// What went wrong, with the reference, digest, registry or path concerned.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A string that does not parse as an image reference.
    #[error("invalid reference {input:?}: {reason}")]
    Reference {
        /// The string given.
        input: String,
        /// Why it does not parse.
        reason: String,
    },

    /// A string that does not parse as a digest.
    #[error("invalid digest {input:?}: {reason}")]
    Digest {
        /// The string given.
        input: String,
        /// Why it does not parse.
        reason: String,
    },

    #[error("blob {expected} failed verification: its bytes hash to {actual}")]
    /// A blob whose bytes do not hash to the digest it was asked for by.
    DigestMismatch {
        /// The digest the blob was fetched or stored under.
        expected: Digest,
        /// What its bytes hash to.
        actual: Digest,
    },

    /// Part of a blob (an eStargz chunk, a TOC) whose bytes do not match the
    /// digest that vouches for them; `what` names the part and its blob.
    #[error("{what} failed verification: expected {expected}, its bytes hash to {actual}")]
    ContentMismatch {
        /// The part and its blob.
        what: String,
        /// The digest that vouches for it.
        expected: Digest,
        /// What its bytes hash to.
        actual: Digest,
    },

    /// A blob whose length differs from the size its descriptor gives.
    #[error("blob {digest} failed verification: expected {expected} bytes, got {actual}")]
    SizeMismatch {
        /// The blob.
        digest: Digest,
        /// The size its descriptor gives.
        expected: u64,
        /// The bytes that came.
        actual: u64,
    },

    #[error("{what} is {size} bytes, over the {limit}-byte limit")]
    /// Something over a size limit that keeps memory bounded (a manifest, a TOC, a config).
    TooLarge {
        /// What it is.
        what: String,
        /// Its size in bytes.
        size: u64,
        /// The limit in bytes.
        limit: u64,
    },

    /// Input that is well-formed enough to read but wrong (a manifest, a tar, an argument).
    #[error("invalid {what}: {reason}")]
    Invalid {
        /// What was read.
        what: String,
        /// What is wrong with it.
        reason: String,
    },

    /// A manifest or layer media type this library does not read.
    #[error("unsupported media type {0:?}")]
    MediaType(String),

    /// The named thing (manifest, blob, tag, path) does not exist.
    #[error("{0} not found")]
    NotFound(String),

    #[error("{what}: no platform matches {platform}")]
    /// An index with no manifest for the platform asked for.
    NoPlatform {
        /// The index.
        what: String,
        /// The platform asked for.
        platform: String,
    },

    /// A registry answered with an error other than not-found or an auth failure.
    #[error("registry {registry}: {message}")]
    Registry {
        /// The registry host.
        registry: String,
        /// Its status and error body.
        message: String,
    },

    /// Nothing came from `registry` for `secs` seconds (no answer, or a
    /// download that stopped moving).
    #[error("registry {registry} stalled: {what} got no bytes for {secs}s")]
    Stalled {
        /// The registry host.
        registry: String,
        /// The request.
        what: String,
        /// How long nothing came.
        secs: u64,
    },

    /// The TLS handshake with `registry` failed over its certificate
    /// (untrusted issuer, wrong name, expired, ...).
    #[error("registry {registry}: TLS certificate not accepted: {problem}")]
    Tls {
        /// The registry host.
        registry: String,
        /// What the TLS library said.
        problem: String,
    },

    /// The registry refused our credentials, or no token could be had.
    #[error("authentication to {registry} failed: {message}")]
    Auth {
        /// The registry host.
        registry: String,
        /// Why.
        message: String,
    },

    /// A local I/O failure.
    #[error("{context}: {source}")]
    Io {
        /// The path or operation.
        context: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },

    /// An HTTP transport failure (connect, read, redirect).
    #[error("{context}: {source}")]
    Http {
        /// The request.
        context: String,
        /// The underlying error.
        #[source]
        source: reqwest::Error,
    },
}

/// `Result` with this library's [`Error`].
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

    /// Input that is wrong: `what` was read, `reason` says how.
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
