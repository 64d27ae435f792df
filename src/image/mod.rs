//! Immutable, lazy image views over any source, after go-containerregistry:
//! a [`Source`] serves manifests and blobs (a registry repository, an OCI
//! layout, a docker-save tarball, local files); a [`Sink`] accepts them.
//! [`Image`], [`Index`] and [`Layer`] are cheap views that fetch on demand.
//!
//! Beside the views, this module holds what an image is made of and what is
//! done with one:
//!
//! - [`manifest`]: manifests, indexes, platforms and media types.
//! - Sources and sinks other than a registry: [`layout`] (OCI image-layout
//!   directories) and [`tarball`] (`docker save` tarballs).
//! - Functional mutations, each giving a new image: [`mutate`] (layers from
//!   directories and tars, append, config and annotation edits), [`flatten`],
//!   [`rebase`], [`optimize`] (re-encode layers as eStargz or zstd:chunked)
//!   and [`attach`] (artifacts referring to an image); [`compose`] serves
//!   the blobs of an image assembled from several sources.
//! - Moving images: [`copy`] (any source to any sink) and [`export`] (the
//!   merged filesystem as one tar).

pub mod ahead;
pub mod attach;
pub mod compose;
pub mod copy;
pub mod export;
pub mod flatten;
pub mod layout;
pub mod manifest;
pub mod mutate;
pub mod newlayer;
pub mod optimize;
pub mod rebase;
pub mod tarball;

use std::io;
use std::pin::Pin;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use futures::{Stream, StreamExt};

use crate::digest::{Digest, Hasher};
use crate::error::{Error, Result};
use crate::reference::Repository;
use manifest::{
    media, Compression, Descriptor, ImageConfiguration, ImageIndex, ImageManifest, Parsed,
    Platform, RawManifest,
};

/// A stream of blob bytes.
pub type ByteStream = Pin<Box<dyn Stream<Item = io::Result<Bytes>> + Send>>;

/// Configs larger than this are refused rather than held in memory.
pub const MAX_CONFIG_SIZE: u64 = 16 * 1024 * 1024;

/// Where manifests and blobs come from.
#[async_trait]
pub trait Source: Send + Sync {
    /// For messages: `127.0.0.1:5000/foo`, `oci:/path`, `tarball:/x.tar`.
    fn name(&self) -> String;

    /// The registry repository behind this source, if it is one; lets a
    /// registry sink mount blobs instead of copying them.
    fn repository(&self) -> Option<&Repository> {
        None
    }

    /// A manifest by tag or digest. When asked by digest the bytes are verified.
    async fn manifest(&self, reference: &str) -> Result<RawManifest>;

    /// A whole blob as a stream. Callers that trust the bytes wrap it in
    /// [`verify_stream`] (the `Layer`/`Image` helpers do).
    async fn blob(&self, digest: &Digest) -> Result<ByteStream>;

    /// `len` bytes at `offset` of a blob. Not verified here: random-access
    /// readers verify what they read (chunk digests, whole-blob caches).
    async fn blob_range(&self, digest: &Digest, offset: u64, len: u64) -> Result<Bytes>;

    /// A blob's size, if the source can tell without fetching it.
    async fn blob_size(&self, digest: &Digest) -> Result<u64>;
}

/// Where images go.
#[async_trait]
pub trait Sink: Send + Sync {
    /// Names the sink in messages and errors.
    fn name(&self) -> String;

    /// True when the sink already holds the blob (the copy skips it).
    async fn has_blob(&self, digest: &Digest) -> Result<bool>;

    /// Store a blob. The sink must verify digest and size before the blob
    /// becomes visible; a failed put leaves nothing behind.
    async fn put_blob(&self, digest: &Digest, size: u64, data: ByteStream) -> Result<()>;

    /// Make a blob present without moving its bytes (cross-repository mount).
    /// `Ok(false)` means "not done, upload it instead".
    async fn mount_blob(&self, _digest: &Digest, _from: &dyn Source) -> Result<bool> {
        Ok(false)
    }

    /// Store a manifest under its digest and, when given, a tag. Callers only
    /// do this after every blob it references is in the sink.
    async fn put_manifest(&self, manifest: &RawManifest, tag: Option<&str>) -> Result<()>;

    /// Flush anything buffered (an index.json, a tarball's manifest.json).
    async fn finish(&self) -> Result<()> {
        Ok(())
    }
}

/// Wrap a stream so that it fails at its end (instead of ending cleanly)
/// when the bytes do not hash to `digest` or are not `size` long.
pub fn verify_stream(stream: ByteStream, digest: Digest, size: Option<u64>) -> ByteStream {
    let state = Some((stream, Hasher::like(&digest)));
    Box::pin(futures::stream::unfold(state, move |state| {
        let digest = digest.clone();
        async move {
            let (mut stream, mut hasher) = state?;
            match stream.next().await {
                Some(Ok(chunk)) => {
                    hasher.update(&chunk);
                    if let Some(s) = size.filter(|&s| hasher.len() > s) {
                        let e = Error::SizeMismatch {
                            digest,
                            expected: s,
                            actual: hasher.len(),
                        };
                        return Some((Err(e.into()), None));
                    }
                    Some((Ok(chunk), Some((stream, hasher))))
                }
                Some(Err(e)) => Some((Err(e), None)),
                None => match hasher.verify(&digest, size) {
                    Ok(()) => None,
                    Err(e) => Some((Err(e.into()), None)),
                },
            }
        }
    }))
}

/// Read a whole (small) blob into memory, verified.
pub async fn read_blob(source: &dyn Source, digest: &Digest, limit: u64) -> Result<Bytes> {
    let mut stream = verify_stream(source.blob(digest).await?, digest.clone(), None);
    let mut buf = Vec::new();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| crate::error::from_io(format!("blob {digest}"), e))?;
        buf.extend_from_slice(&chunk);
        if buf.len() as u64 > limit {
            return Err(Error::TooLarge {
                what: format!("blob {digest}"),
                size: buf.len() as u64,
                limit,
            });
        }
    }
    Ok(Bytes::from(buf))
}

/// Bytes in memory as a one-chunk blob stream.
pub fn bytes_stream(b: Bytes) -> ByteStream {
    Box::pin(futures::stream::iter([Ok(b)]))
}

/// A local file (or part of one) as a blob stream, read 256 KiB at a time.
pub fn file_stream(r: impl tokio::io::AsyncRead + Send + 'static) -> ByteStream {
    Box::pin(tokio_util::io::ReaderStream::with_capacity(r, 256 * 1024))
}

/// `len` bytes at `offset` of a local file: `blob_range` for file-backed
/// sources (layouts, tarballs). `what` names the range in errors; callers
/// check it against the blob's size first.
pub(crate) async fn read_file_range(
    path: &std::path::Path,
    offset: u64,
    len: u64,
    what: &str,
) -> Result<Bytes> {
    use tokio::io::{AsyncReadExt, AsyncSeekExt};
    let io_err = |e| Error::io(what, e);
    let mut file = tokio::fs::File::open(path).await.map_err(io_err)?;
    file.seek(io::SeekFrom::Start(offset))
        .await
        .map_err(io_err)?;
    let mut buf = vec![0; len as usize];
    file.read_exact(&mut buf).await.map_err(io_err)?;
    Ok(Bytes::from(buf))
}

/// A manifest that is either an image or an index.
// Short-lived (one per fetch): boxing the larger variant would only add an
// allocation, and would change every match in other crates.
#[allow(clippy::large_enum_variant)]
#[derive(Clone)]
pub enum Artifact {
    /// A single-platform image.
    Image(Image),
    /// An index of images.
    Index(Index),
}

/// Fetch `reference` (a tag or digest) from `source` as an image or index.
pub async fn fetch(source: Arc<dyn Source>, reference: &str) -> Result<Artifact> {
    let raw = source.manifest(reference).await?;
    Artifact::from_raw(source, raw).await
}

/// Fetch `reference` and, when it is an index, pick `platform` (the host's
/// when `None`).
pub async fn fetch_image(
    source: Arc<dyn Source>,
    reference: &str,
    platform: Option<&Platform>,
) -> Result<Image> {
    match fetch(source, reference).await? {
        Artifact::Image(img) => Ok(img),
        Artifact::Index(idx) => {
            let host = Platform::host();
            idx.image_for(platform.unwrap_or(&host)).await
        }
    }
}

impl Artifact {
    /// Parse `raw` and, for an image, fetch its config from `source`.
    pub async fn from_raw(source: Arc<dyn Source>, raw: RawManifest) -> Result<Self> {
        match raw.parse()? {
            Parsed::Image(m) => Ok(Artifact::Image(Image::load(source, raw, m).await?)),
            Parsed::Index(i) => Ok(Artifact::Index(Index {
                raw,
                parsed: i,
                source,
            })),
        }
    }

    /// The manifest bytes as fetched.
    pub fn raw(&self) -> &RawManifest {
        match self {
            Artifact::Image(i) => &i.raw,
            Artifact::Index(i) => &i.raw,
        }
    }
}

/// An image: its manifest bytes, parsed manifest, config bytes, and the
/// source its layers are read from.
#[derive(Clone)]
pub struct Image {
    /// The manifest as fetched.
    pub raw: RawManifest,
    /// `raw`, parsed.
    pub manifest: ImageManifest,
    /// The config blob, verified against the manifest.
    pub config: Bytes,
    /// Where the layers are read from.
    pub source: Arc<dyn Source>,
}

impl Image {
    /// Build the view, fetching and verifying the config blob.
    pub async fn load(
        source: Arc<dyn Source>,
        raw: RawManifest,
        manifest: ImageManifest,
    ) -> Result<Self> {
        let desc = manifest.config();
        let digest = manifest::digest_of(desc)?;
        if desc.size() > MAX_CONFIG_SIZE {
            return Err(Error::TooLarge {
                what: format!("config {digest}"),
                size: desc.size(),
                limit: MAX_CONFIG_SIZE,
            });
        }
        let config = read_blob(source.as_ref(), &digest, MAX_CONFIG_SIZE).await?;
        if config.len() as u64 != desc.size() {
            return Err(Error::SizeMismatch {
                digest,
                expected: desc.size(),
                actual: config.len() as u64,
            });
        }
        Ok(Image {
            raw,
            manifest,
            config,
            source,
        })
    }

    /// The manifest's digest.
    pub fn digest(&self) -> &Digest {
        &self.raw.digest
    }

    /// The config blob's digest.
    pub fn config_digest(&self) -> Result<Digest> {
        manifest::digest_of(self.manifest.config())
    }

    /// The parsed config (os, architecture, rootfs.diff_ids, history ...).
    pub fn config_file(&self) -> Result<ImageConfiguration> {
        serde_json::from_slice(&self.config).map_err(|e| {
            Error::invalid(
                format!("config of image {}", self.raw.digest),
                e.to_string(),
            )
        })
    }

    /// Layers in application order, with their DiffIDs from the config when present.
    pub fn layers(&self) -> Result<Vec<Layer>> {
        let diff_ids: Vec<Option<Digest>> = match self.config_file() {
            Ok(cfg) => cfg
                .rootfs()
                .diff_ids()
                .iter()
                .map(|d| Digest::parse(d).ok())
                .collect(),
            Err(_) => Vec::new(),
        };
        self.manifest
            .layers()
            .iter()
            .enumerate()
            .map(|(i, desc)| {
                Ok(Layer {
                    digest: manifest::digest_of(desc)?,
                    descriptor: desc.clone(),
                    diff_id: diff_ids.get(i).cloned().flatten(),
                    source: self.source.clone(),
                })
            })
            .collect()
    }
}

/// An index (manifest list): a set of images for different platforms.
#[derive(Clone)]
pub struct Index {
    /// The index as fetched.
    pub raw: RawManifest,
    /// `raw`, parsed.
    pub parsed: ImageIndex,
    /// Where its manifests are read from.
    pub source: Arc<dyn Source>,
}

impl Index {
    /// The index's digest.
    pub fn digest(&self) -> &Digest {
        &self.raw.digest
    }

    /// Fetch (and verify) the child manifest a descriptor points at.
    pub async fn child(&self, desc: &Descriptor) -> Result<Artifact> {
        let raw = fetch_child(self.source.as_ref(), desc).await?;
        Box::pin(Artifact::from_raw(self.source.clone(), raw)).await
    }

    /// The image for a platform, or an error naming the index and platform.
    pub async fn image_for(&self, platform: &Platform) -> Result<Image> {
        let desc = child_for_platform(&self.parsed, &self.raw.digest, platform)?;
        match self.child(desc).await? {
            Artifact::Image(img) => Ok(img),
            Artifact::Index(i) => Err(Error::invalid(
                format!("index {}", i.raw.digest),
                "nested index where an image was expected",
            )),
        }
    }
}

/// The manifest an index entry points at, checked against the entry's digest.
pub async fn fetch_child(source: &dyn Source, desc: &Descriptor) -> Result<RawManifest> {
    let digest = manifest::digest_of(desc)?;
    let raw = source.manifest(digest.as_str()).await?;
    digest.verify(&raw.bytes)?;
    Ok(raw)
}

/// The first entry of `index` (whose digest is `digest`) for `platform`.
pub fn child_for_platform<'a>(
    index: &'a ImageIndex,
    digest: &Digest,
    platform: &Platform,
) -> Result<&'a Descriptor> {
    index
        .manifests()
        .iter()
        .find(|d| d.platform().as_ref().is_some_and(|p| platform.matches(p)))
        .ok_or_else(|| Error::NoPlatform {
            what: format!("index {digest}"),
            platform: platform.to_string(),
        })
}

/// One layer: a blob plus what we know about its uncompressed form.
#[derive(Clone)]
pub struct Layer {
    /// The blob's digest.
    pub digest: Digest,
    /// The manifest's descriptor of the blob.
    pub descriptor: Descriptor,
    /// Digest of the uncompressed tar, from the config.
    pub diff_id: Option<Digest>,
    /// Where the blob is read from.
    pub source: Arc<dyn Source>,
}

impl Layer {
    /// Compressed size, from the descriptor.
    pub fn size(&self) -> u64 {
        self.descriptor.size()
    }

    /// The descriptor's media type.
    pub fn media_type(&self) -> String {
        manifest::media_type_of(&self.descriptor)
    }

    /// The compression its media type says, or an error naming the layer.
    pub fn compression(&self) -> Result<Compression> {
        Compression::of_media_type(&self.media_type()).map_err(|e| match e {
            Error::MediaType(mt) => Error::invalid(
                format!("layer {}", self.digest),
                format!("unsupported media type {mt:?}"),
            ),
            e => e,
        })
    }

    /// The compressed blob, verified against its digest and size.
    pub async fn compressed(&self) -> Result<ByteStream> {
        let s = self.source.blob(&self.digest).await?;
        Ok(verify_stream(s, self.digest.clone(), Some(self.size())))
    }
}

/// Wrap a reader of compressed bytes in the right decoder.
pub fn decompress(
    compression: Compression,
    reader: Box<dyn io::Read + Send>,
) -> Result<Box<dyn io::Read + Send>> {
    Ok(match compression {
        Compression::None => reader,
        // MultiGzDecoder: layers (eStargz in particular) are several gzip members.
        Compression::Gzip => Box::new(flate2::read::MultiGzDecoder::new(reader)),
        Compression::Zstd => Box::new(
            zstd::stream::read::Decoder::new(reader).map_err(|e| Error::io("zstd decoder", e))?,
        ),
    })
}

/// True for media types whose blobs are layers we can read as tar.
pub fn is_layer_media_type(mt: &str) -> bool {
    mt != media::DOCKER_FOREIGN_LAYER && Compression::of_media_type(mt).is_ok()
}

/// Sources for the library's unit tests.
#[cfg(test)]
pub(crate) mod testing {
    use super::*;

    /// One blob held in memory, read by range.
    pub struct Mem(pub Bytes);

    #[async_trait::async_trait]
    impl Source for Mem {
        fn name(&self) -> String {
            "mem".into()
        }
        async fn manifest(&self, r: &str) -> Result<crate::image::manifest::RawManifest> {
            Err(Error::NotFound(r.into()))
        }
        async fn blob(&self, _: &Digest) -> Result<crate::image::ByteStream> {
            Err(Error::NotFound("stream".into()))
        }
        async fn blob_range(&self, _: &Digest, off: u64, len: u64) -> Result<Bytes> {
            let end = (off + len).min(self.0.len() as u64);
            Ok(self.0.slice(off.min(end) as usize..end as usize))
        }
        async fn blob_size(&self, _: &Digest) -> Result<u64> {
            Ok(self.0.len() as u64)
        }
    }
}
