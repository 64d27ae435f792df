//! Images assembled from the blobs of several sources: the layers of one
//! image on top of another's (`rebase`), layers rewritten locally
//! (`flatten`, compressing a tarball's layers on `push`). Each blob keeps
//! the [`Source`] it came from, so [`Composed::push`] can mount it into a
//! registry from its own repository instead of copying its bytes.

use std::collections::HashMap;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use serde_json::{json, Value};

use crate::digest::Digest;
use crate::error::{Error, Result};
use crate::image::copy::{self, BlobOutcome, CopyOptions, CopyReport};
use crate::image::manifest::{self, Compression, RawManifest};
use crate::image::newlayer::LocalLayer;
use crate::image::{bytes_stream, file_stream, read_file_range, ByteStream, Image, Sink, Source};

/// Where a blob of a composed image comes from.
#[derive(Clone)]
pub enum Origin {
    /// Another image's source (a registry repository, a layout, a tarball).
    Source(Arc<dyn Source>),
    /// A layer built locally into a temporary file.
    Local(LocalLayer),
    /// Bytes in memory (the config).
    Memory(Bytes),
}

/// One layer of a composed image: its manifest descriptor and its origin.
#[derive(Clone)]
pub struct Part {
    /// The layer's descriptor, as it goes in the manifest.
    pub descriptor: Value,
    /// Where its bytes come from.
    pub origin: Origin,
}

impl Part {
    /// A layer of an existing image, as it is, re-typed for a manifest of
    /// `manifest_media_type` when its media type has an equivalent there
    /// (Docker ↔ OCI, same compression); descriptor fields (annotations,
    /// urls) are kept.
    pub fn existing(layer: &crate::image::Layer, manifest_media_type: &str) -> Result<Part> {
        let mut descriptor = serde_json::to_value(&layer.descriptor)
            .map_err(|e| Error::invalid(format!("layer {}", layer.digest), e.to_string()))?;
        let docker = manifest_media_type == manifest::media::DOCKER_MANIFEST;
        let mt = layer.media_type();
        if crate::image::is_layer_media_type(&mt) && !mt.contains("nondistributable") {
            if let Ok(c) = Compression::of_media_type(&mt) {
                descriptor["mediaType"] = json!(c.layer_media_type(docker));
            }
        }
        Ok(Part {
            descriptor,
            origin: Origin::Source(layer.source.clone()),
        })
    }

    /// A locally built layer in a manifest of `manifest_media_type`.
    pub fn local(layer: LocalLayer, manifest_media_type: &str) -> Part {
        let mut descriptor = json!({
            "mediaType": layer.media_type(manifest_media_type),
            "digest": layer.digest,
            "size": layer.size,
        });
        if !layer.annotations.is_empty() {
            descriptor["annotations"] = json!(layer.annotations);
        }
        Part {
            descriptor,
            origin: Origin::Local(layer),
        }
    }
}

/// The source of a composed image: its manifest, config and local layers,
/// and the other blobs by the source they come from.
pub struct Composite {
    manifest: RawManifest,
    blobs: HashMap<Digest, Origin>,
}

/// A composed image: the [`Image`] view (its source is the [`Composite`])
/// and the composite itself, for [`Composed::push`].
#[derive(Clone)]
pub struct Composed {
    /// The composed image, read through the composite.
    pub image: Image,
    composite: Arc<Composite>,
}

/// Build an image from `manifest` (a JSON object whose `layers` and
/// `config` descriptor digest and size are replaced), the `config` blob and
/// `layers`.
pub fn compose(
    manifest_media_type: &str,
    mut manifest: Value,
    config: Bytes,
    layers: Vec<Part>,
) -> Result<Composed> {
    let config_digest = Digest::of(&config);
    if !manifest.is_object() {
        return Err(Error::invalid("composed manifest", "not a JSON object"));
    }
    manifest["config"]["digest"] = json!(config_digest);
    manifest["config"]["size"] = json!(config.len());
    let mut blobs = HashMap::new();
    let mut descriptors = Vec::new();
    for part in layers {
        let digest = Digest::parse(part.descriptor["digest"].as_str().unwrap_or_default())?;
        blobs.entry(digest).or_insert(part.origin);
        descriptors.push(part.descriptor);
    }
    manifest["layers"] = Value::Array(descriptors);
    blobs.insert(config_digest, Origin::Memory(config.clone()));
    let bytes = Bytes::from(serde_json::to_vec(&manifest).expect("json"));
    let raw = RawManifest::new(bytes, Some(manifest_media_type))?;
    let parsed = raw.image()?;
    let composite = Arc::new(Composite {
        manifest: raw.clone(),
        blobs,
    });
    let image = Image {
        raw,
        manifest: parsed,
        config,
        source: composite.clone(),
    };
    Ok(Composed { image, composite })
}

impl Composed {
    /// Push the image to `dst` (tagged `tag` when given): every blob from
    /// its own source, so a registry sink mounts what another repository of
    /// it already holds; then the manifest.
    pub async fn push(
        &self,
        dst: Arc<dyn Sink>,
        tag: Option<&str>,
        opts: &CopyOptions,
    ) -> Result<CopyReport> {
        use futures::{StreamExt, TryStreamExt};
        let mut blobs: Vec<(Digest, u64)> = std::iter::once(self.image.manifest.config())
            .chain(self.image.manifest.layers().iter())
            .map(|d| Ok((manifest::digest_of(d)?, d.size())))
            .collect::<Result<_>>()?;
        blobs.sort();
        blobs.dedup();
        let outcomes: Vec<(BlobOutcome, u64)> = futures::stream::iter(blobs)
            .map(|(digest, size)| {
                let dst = dst.clone();
                async move {
                    let src: Arc<dyn Source> = match self.composite.blobs.get(&digest) {
                        Some(Origin::Source(s)) => s.clone(),
                        _ => self.composite.clone(),
                    };
                    let outcome = copy::copy_blob(&src, &dst, &digest, size, opts).await?;
                    opts.progress.finish(&digest, outcome);
                    Ok::<_, Error>((outcome, size))
                }
            })
            .buffer_unordered(opts.jobs.max(1))
            .try_collect()
            .await?;
        let mut report = CopyReport::default();
        for (outcome, size) in outcomes {
            report.count(outcome, size);
        }
        dst.put_manifest(&self.image.raw, tag).await?;
        dst.finish().await?;
        report.digest = Some(self.image.digest().clone());
        Ok(report)
    }
}

impl Composite {
    fn origin(&self, digest: &Digest) -> Result<&Origin> {
        self.blobs
            .get(digest)
            .ok_or_else(|| Error::NotFound(format!("blob {digest} in a composed image")))
    }
}

#[async_trait]
impl Source for Composite {
    fn name(&self) -> String {
        format!("composed image {}", self.manifest.digest)
    }

    async fn manifest(&self, reference: &str) -> Result<RawManifest> {
        if reference == self.manifest.digest.as_str() {
            return Ok(self.manifest.clone());
        }
        Err(Error::NotFound(format!(
            "manifest {reference} in {}",
            self.name()
        )))
    }

    async fn blob(&self, digest: &Digest) -> Result<ByteStream> {
        match self.origin(digest)? {
            Origin::Source(s) => s.blob(digest).await,
            Origin::Memory(b) => Ok(bytes_stream(b.clone())),
            Origin::Local(l) => {
                let f = tokio::fs::File::open(l.path()).await.map_err(|e| {
                    Error::io(format!("layer {digest} at {}", l.path().display()), e)
                })?;
                Ok(file_stream(f))
            }
        }
    }

    async fn blob_range(&self, digest: &Digest, offset: u64, len: u64) -> Result<Bytes> {
        let what = format!("blob {digest} at {offset}+{len}");
        match self.origin(digest)? {
            Origin::Source(s) => s.blob_range(digest, offset, len).await,
            Origin::Memory(b) => {
                let end = offset.checked_add(len).filter(|&e| e <= b.len() as u64);
                let end = end.ok_or_else(|| Error::invalid(what, "range past the blob's end"))?;
                Ok(b.slice(offset as usize..end as usize))
            }
            Origin::Local(l) => {
                if offset.checked_add(len).is_none_or(|e| e > l.size) {
                    return Err(Error::invalid(what, "range past the blob's end"));
                }
                read_file_range(l.path(), offset, len, &what).await
            }
        }
    }

    async fn blob_size(&self, digest: &Digest) -> Result<u64> {
        match self.origin(digest)? {
            Origin::Source(s) => s.blob_size(digest).await,
            Origin::Memory(b) => Ok(b.len() as u64),
            Origin::Local(l) => Ok(l.size),
        }
    }
}

/// The image's config and manifest as editable JSON objects.
pub fn editable(image: &Image) -> Result<(Value, Value)> {
    let parse = |bytes: &[u8], what: String| -> Result<Value> {
        let v: Value =
            serde_json::from_slice(bytes).map_err(|e| Error::invalid(&what, e.to_string()))?;
        if !v.is_object() {
            return Err(Error::invalid(what, "not a JSON object"));
        }
        Ok(v)
    };
    let config = parse(&image.config, format!("config of image {}", image.digest()))?;
    let manifest = parse(&image.raw.bytes, format!("manifest {}", image.digest()))?;
    Ok((config, manifest))
}

/// `image` with each uncompressed layer compressed with `compression`
/// (`jobs` layers at a time, each streamed through a temporary file), as
/// crane does when pushing a docker-save tarball; `None` when no layer is
/// uncompressed. DiffIDs, and so the config, stay the same.
pub async fn compress_plain_layers(
    image: &Image,
    compression: Compression,
    jobs: usize,
) -> Result<Option<Composed>> {
    use futures::{StreamExt, TryStreamExt};
    let layers = image.layers()?;
    let mut plain = false;
    for l in &layers {
        plain |= l.compression()? == Compression::None;
    }
    if !plain || compression == Compression::None {
        return Ok(None);
    }
    let mt = image.raw.media_type.clone();
    let parts: Vec<Part> = futures::stream::iter(layers)
        .map(|layer| {
            let mt = mt.clone();
            async move {
                if layer.compression()? != Compression::None {
                    return Part::existing(&layer, &mt);
                }
                let what = format!("compressing layer {}", layer.digest);
                let l = layer.clone();
                let built = tokio::task::spawn_blocking(move || {
                    let reader = crate::image::export::layer_reader(&l)?;
                    crate::image::newlayer::layer_from_reader(reader, compression)
                })
                .await
                .map_err(|e| Error::invalid(&what, e.to_string()))??;
                // The tar was read whole, so it matched its digest: that is
                // its DiffID.
                if built.diff_id != layer.digest {
                    return Err(Error::DigestMismatch {
                        expected: layer.digest.clone(),
                        actual: built.diff_id,
                    });
                }
                Ok(Part::local(built, &mt))
            }
        })
        .buffered(jobs.max(1))
        .try_collect()
        .await?;
    let (_, manifest) = editable(image)?;
    compose(&mt, manifest, image.config.clone(), parts).map(Some)
}

/// A config edited as JSON, as a blob.
pub fn config_bytes(config: &Value) -> Bytes {
    Bytes::from(serde_json::to_vec(config).expect("json"))
}
