//! ggfs: container registries as a filesystem.
//!
//! The library behind the `ggfs` CLI and the `ggfs-mountd` FUSE daemon:
//! references and digests, a registry client with docker-compatible auth,
//! immutable image views over registries, OCI layouts and docker tarballs,
//! and the random-access layer readers the mount is built on.

#![warn(missing_docs)]

pub mod attach;
pub mod auth;
pub mod compose;
pub mod copy;
pub mod digest;
pub mod error;
pub mod estargz;
pub mod export;
pub mod flatten;
pub mod image;
pub mod layerindex;
pub mod layout;
pub mod manifest;
pub mod mutate;
pub mod optimize;
pub mod rebase;
pub mod reference;
pub mod registry;
#[cfg(feature = "server")]
pub mod server;
pub mod tarball;
pub mod tarindex;
pub mod toc_writer;
pub mod usage;
pub mod zran;
pub mod zstd_chunked;

pub use digest::Digest;
pub use error::{Error, Result};
pub use manifest::{Platform, RawManifest};
pub use reference::{Reference, Repository};
