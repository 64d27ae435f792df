//! `optimize`: every layer of an image re-encoded as eStargz or
//! zstd:chunked, as `ctr-remote image optimize` does (without running the
//! image: the files to prefetch are named, not recorded).
//!
//! Each layer is fetched (its digest verified), decompressed into a
//! temporary tar (its DiffID verified against the config) and written by
//! [`crate::formats::toc_writer`]. Layers already in the wanted format are kept as
//! they are unless prefetch files are asked for. Two layers are in flight
//! at once, so one downloads while the other is compressed. The config
//! changes only in `rootfs.diff_ids` (a TOC layer's tar is not the
//! original's); the manifest becomes OCI, the one schema whose layer
//! descriptors carry the TOC annotations.

use std::collections::HashSet;

use futures::{StreamExt, TryStreamExt};
use serde_json::json;

use crate::error::{Error, Result};
use crate::formats::estargz::{normalize_name, TOC_DIGEST_ANNOTATION};
use crate::formats::toc_writer::{TocFormat, TocOptions};
use crate::formats::zstd_chunked::MANIFEST_CHECKSUM_ANNOTATION;
use crate::image::compose::{self, Composed, Part};
use crate::image::manifest::{media, Compression};
use crate::image::newlayer::{self, LocalLayer};
use crate::image::{is_layer_media_type, Image, Layer};

/// Layers converted at once.
const IN_FLIGHT: usize = 2;

/// What [`optimize`] did.
pub struct Optimized {
    /// The converted image, ready to push.
    pub composed: Composed,
    /// Layers rewritten (the others were already in the format).
    pub converted: usize,
}

/// `image` with each filesystem layer in `opts.format`, the files of
/// `opts.prefetch` first in the layers that hold them.
pub async fn optimize(image: &Image, opts: &TocOptions) -> Result<Optimized> {
    let layers = image.layers()?;
    let (mut config, mut manifest) = compose::editable(image)?;
    let diff_ids = config["rootfs"]["diff_ids"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    if diff_ids.len() != layers.len() {
        return Err(Error::invalid(
            format!("image {}", image.digest()),
            format!(
                "{} layers but {} DiffIDs in its config",
                layers.len(),
                diff_ids.len()
            ),
        ));
    }
    let mut o = opts.clone();
    o.prefetch_if_present = true;
    let o = &o;
    let done: Vec<(Part, Option<String>, Vec<String>)> = futures::stream::iter(layers)
        .map(|layer| async move {
            if !is_layer_media_type(&layer.media_type())
                || (o.prefetch.is_empty() && in_format(&layer, o.format))
            {
                return Ok((
                    Part::existing(&layer, media::OCI_MANIFEST)?,
                    None,
                    Vec::new(),
                ));
            }
            let (built, placed) = convert(layer, o.clone()).await?;
            let diff_id = built.diff_id.to_string();
            Ok::<_, Error>((
                Part::local(built, media::OCI_MANIFEST),
                Some(diff_id),
                placed,
            ))
        })
        .buffered(IN_FLIGHT)
        .try_collect()
        .await?;

    let placed: HashSet<&str> = done
        .iter()
        .flat_map(|d| d.2.iter().map(|p| normalize_name(p)))
        .collect();
    if let Some(p) = opts
        .prefetch
        .iter()
        .find(|p| !placed.contains(normalize_name(p)))
    {
        return Err(Error::NotFound(format!(
            "prefetch file {p:?} in any layer of image {}",
            image.digest()
        )));
    }
    let mut converted = 0;
    let mut parts = Vec::with_capacity(done.len());
    for (i, (part, diff_id, _)) in done.into_iter().enumerate() {
        if let Some(d) = diff_id {
            config["rootfs"]["diff_ids"][i] = json!(d);
            converted += 1;
        }
        parts.push(part);
    }
    manifest["mediaType"] = json!(media::OCI_MANIFEST);
    manifest["config"]["mediaType"] = json!(media::OCI_CONFIG);
    let composed = compose::compose(
        media::OCI_MANIFEST,
        manifest,
        compose::config_bytes(&config),
        parts,
    )?;
    Ok(Optimized {
        composed,
        converted,
    })
}

/// Whether `layer` is already written in `format` (its descriptor carries
/// the format's TOC annotation).
fn in_format(layer: &Layer, format: TocFormat) -> bool {
    let (key, compression) = match format {
        TocFormat::Estargz => (TOC_DIGEST_ANNOTATION, Compression::Gzip),
        TocFormat::ZstdChunked => (MANIFEST_CHECKSUM_ANNOTATION, Compression::Zstd),
    };
    let annotated = layer
        .descriptor
        .annotations()
        .as_ref()
        .is_some_and(|a| a.contains_key(key));
    annotated && layer.compression().ok() == Some(compression)
}

/// Fetch `layer`, check its tar against its DiffID and write it as a TOC
/// layer.
async fn convert(layer: Layer, o: TocOptions) -> Result<(LocalLayer, Vec<String>)> {
    let what = format!("converting layer {}", layer.digest);
    tokio::task::spawn_blocking(move || {
        let reader = crate::image::export::layer_reader(&layer)?;
        let tar = newlayer::layer_from_reader(reader, Compression::None)?;
        if let Some(want) = layer.diff_id.as_ref().filter(|d| **d != tar.diff_id) {
            return Err(Error::DigestMismatch {
                expected: want.clone(),
                actual: tar.diff_id,
            });
        }
        newlayer::toc_layer_with(&tar, &o)
    })
    .await
    .map_err(|e| Error::invalid(&what, e.to_string()))?
}
