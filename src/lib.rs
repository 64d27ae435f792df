//! ggfs: container registries as a filesystem.
//!
//! The library behind the `ggfs` CLI and the `ggfs-mountd` FUSE daemon:
//! references and digests, a registry client with docker-compatible auth,
//! immutable image views over registries, OCI layouts and docker tarballs,
//! and the random-access layer readers the mount is built on.
//!
//! # Examples
//!
//! Each runs against the embedded registry (`ggfs::server`, the default
//! `server` feature) on 127.0.0.1, so `cargo test --doc` checks them.
//!
//! ## Append a layer and push the image
//!
//! ```
//! use std::sync::Arc;
//! use ggfs::registry::auth::Keychain;
//! use ggfs::image::copy::{copy, CopyOptions};
//! use ggfs::image::manifest::Compression;
//! use ggfs::image::{mutate, newlayer};
//! use ggfs::registry::{Client, ClientOptions};
//! use ggfs::server::{Server, Storage};
//! use ggfs::{Platform, Repository};
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//!
//! let server = Server::start(Storage::Memory).await?; // an empty registry
//! let client = Client::builder(ClientOptions::default())
//!     .keychain(Keychain::anonymous())
//!     .build()?;
//! let app = Repository::parse(&format!("{}/app", server.host()))?;
//! let app = Arc::new(client.repo(&app));
//!
//! // A gzip layer holding hello.txt, on top of an empty image.
//! let dir = tempfile::tempdir()?;
//! std::fs::write(dir.path().join("hello.txt"), "hello\n")?;
//! let layer = newlayer::layer_from_dir(dir.path(), Compression::Gzip)?;
//! let image = mutate::append(&mutate::empty(&Platform::host())?, vec![layer])?;
//! assert_eq!(image.layers()?.len(), 1);
//!
//! // The new image's source serves its manifest and blobs: push by copying.
//! let opts = CopyOptions::default();
//! copy(image.source.clone(), image.digest().as_str(), app.clone(), Some("v1"), &opts).await?;
//! assert_eq!(app.get_manifest("v1").await?.digest, *image.digest());
//! # Ok(()) }
//! ```
//!
//! ## Copy an image
//!
//! ```
//! # use std::sync::Arc;
//! # use ggfs::registry::auth::Keychain;
//! # use ggfs::image::copy::{copy, CopyOptions};
//! # use ggfs::image::mutate;
//! # use ggfs::image::newlayer::{self, LayerFormat, LayerOptions, PlainDir};
//! # use ggfs::registry::{Client, ClientOptions};
//! # use ggfs::server::{Server, Storage};
//! # use ggfs::{Platform, Repository};
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! # let server = Server::start(Storage::Memory).await?;
//! # let client = Client::builder(ClientOptions::default()).keychain(Keychain::anonymous()).build()?;
//! # let repo = |name: &str| Repository::parse(&format!("{}/{name}", server.host()));
//! # let app = Arc::new(client.repo(&repo("app")?));
//! # let dir = tempfile::tempdir()?;
//! # std::fs::write(dir.path().join("hello.txt"), "hello\n")?;
//! # let layer = newlayer::layer_from_dir_as(dir.path(), &LayerOptions::new(LayerFormat::Gzip), &PlainDir)?;
//! # let image = mutate::append(&mutate::empty(&Platform::host())?, vec![layer])?;
//! # copy(image.source.clone(), image.digest().as_str(), app.clone(), Some("v1"), &CopyOptions::default()).await?;
//! // `client` as above; `repo(name)` parses `<server>/<name>`; `app:v1` is pushed.
//! let src = Arc::new(client.repo(&repo("app")?));
//! let dst = Arc::new(client.repo(&repo("mirror")?));
//! let report = copy(src, "v1", dst.clone(), Some("latest"), &CopyOptions::default()).await?;
//!
//! // Same registry: config and layer are mounted across repositories, not sent again.
//! assert_eq!((report.blobs_mounted, report.blobs_uploaded), (2, 0));
//! assert_eq!(Some(dst.get_manifest("latest").await?.digest), report.digest);
//! # Ok(()) }
//! ```
//!
//! ## Read one file out of a remote image, lazily
//!
//! An eStargz layer carries a table of contents at its end:
//! [`estargz::open`](formats::estargz::open) fetches it with Range requests (the last 16 KiB or
//! more, so all of a layer as small as this one), and
//! [`Toc::read`](formats::estargz::Toc::read) fetches only the chunks of the file
//! asked for, so a large layer is never downloaded whole.
//! ([`zstd_chunked::open`](formats::zstd_chunked::open) does the same for zstd:chunked.)
//!
//! ```
//! # use std::sync::Arc;
//! # use ggfs::registry::auth::Keychain;
//! # use ggfs::image::copy::{copy, CopyOptions};
//! # use ggfs::image::mutate;
//! # use ggfs::image::newlayer::{self, LayerFormat, LayerOptions, PlainDir};
//! # use ggfs::registry::{Client, ClientOptions};
//! # use ggfs::server::{Server, Storage};
//! # use ggfs::{Platform, Repository};
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! # let server = Server::start(Storage::Memory).await?;
//! # let client = Client::builder(ClientOptions::default()).keychain(Keychain::anonymous()).build()?;
//! # let repo = |name: &str| Repository::parse(&format!("{}/{name}", server.host()));
//! # let app = Arc::new(client.repo(&repo("app")?));
//! # let dir = tempfile::tempdir()?;
//! # std::fs::write(dir.path().join("hello.txt"), "hello\n")?;
//! # let layer = newlayer::layer_from_dir_as(dir.path(), &LayerOptions::new(LayerFormat::Estargz), &PlainDir)?;
//! # let image = mutate::append(&mutate::empty(&Platform::host())?, vec![layer])?;
//! # copy(image.source.clone(), image.digest().as_str(), app.clone(), Some("v1"), &CopyOptions::default()).await?;
//! use ggfs::formats::estargz;
//! use ggfs::{image, Digest};
//!
//! // `app` is the repository pushed to as above; its `v1` holds one
//! // eStargz layer with hello.txt in it.
//! let img = image::fetch_image(app.clone(), "v1", None).await?;
//! let layer = &img.layers()?[0];
//! let annotations = layer.descriptor.annotations().clone().unwrap_or_default();
//! let toc_digest = match annotations.get(estargz::TOC_DIGEST_ANNOTATION) {
//!     Some(d) => Some(Digest::parse(d)?), // the TOC must hash to this
//!     None => None,
//! };
//! let source = layer.source.as_ref();
//! let toc = estargz::open(source, &layer.digest, layer.size(), toc_digest.as_ref()).await?;
//! let file = toc.lookup("hello.txt").ok_or("no hello.txt")?;
//! assert_eq!(toc.read(source, file, 0, 1 << 20).await?, b"hello\n");
//! # Ok(()) }
//! ```

#![warn(missing_docs)]

pub mod digest;
pub mod error;
pub mod formats;
pub mod image;
pub mod reference;
pub mod registry;
#[cfg(feature = "server")]
pub mod server;
// Shared by the two binaries (`ggfs`, `ggfs-mountd`), not library API.
#[doc(hidden)]
pub mod usage;

pub use digest::Digest;
pub use error::{Error, Result};
pub use image::manifest::{Platform, RawManifest};
pub use reference::{Reference, Repository};
