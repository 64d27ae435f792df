//! The shape `flatten` and `optimize` share: rewrite an image, or each image
//! of an index, and push the result to a target.

use std::future::Future;
use std::sync::Arc;

use anyhow::{bail, Context as _, Result};
use ggfs::image::compose::Composed;
use ggfs::image::copy::CopyOptions;
use ggfs::image::manifest::{media, RawManifest};
use ggfs::image::{Artifact, Image, Index, Sink};
use serde_json::json;

use super::{Ctx, Location};

/// Rewrite IMAGE (`what` names the work in errors: "flattening") with `f`
/// and push it to `target`; an index (without --platform) has each of its
/// images rewritten. Prints the pushed digest.
pub async fn run<F, Fut>(ctx: &Ctx, image: &str, target: &str, what: &str, f: F) -> Result<()>
where
    F: Fn(Image) -> Fut,
    Fut: Future<Output = ggfs::error::Result<Composed>>,
{
    let (src, reference) = ctx.source(image).await?;
    let artifact = if ctx.global.platform.is_some() {
        Artifact::Image(ctx.image(image).await?)
    } else {
        ggfs::image::fetch(src, &reference).await?
    };
    let (sink, tag) = ctx.sink(target).await?;
    let opts = ctx.copy_options(4);
    let doing = || format!("{what} {image}");
    let digest = match artifact {
        Artifact::Image(img) => {
            let new = f(img).await.with_context(doing)?;
            new.push(sink, tag.as_deref(), &opts)
                .await
                .with_context(|| format!("pushing to {target}"))?;
            new.image.digest().clone()
        }
        Artifact::Index(idx) => {
            let raw = each_image(&idx, &sink, &opts, &f)
                .await
                .with_context(doing)?;
            sink.put_manifest(&raw, tag.as_deref())
                .await
                .and(sink.finish().await)
                .with_context(|| format!("pushing to {target}"))?;
            raw.digest
        }
    };
    match Location::parse(target)? {
        Location::Registry(r) => println!("{}@{digest}", r.repo),
        _ => println!("{digest}"),
    }
    Ok(())
}

/// Rewrite and push each image of `idx` (by digest); images that are not
/// made of filesystem layers (attestations, signatures) are copied as they
/// are. Returns the new index, not yet pushed: an OCI index once any of its
/// images became OCI.
async fn each_image<F, Fut>(
    idx: &Index,
    sink: &Arc<dyn Sink>,
    opts: &CopyOptions,
    f: &F,
) -> Result<RawManifest>
where
    F: Fn(Image) -> Fut,
    Fut: Future<Output = ggfs::error::Result<Composed>>,
{
    let mut index: serde_json::Value = serde_json::from_slice(&idx.raw.bytes)
        .with_context(|| format!("index {}", idx.digest()))?;
    let Some(entries) = index["manifests"].as_array_mut() else {
        bail!("index {} has no manifests", idx.digest());
    };
    let mut oci = false;
    for (desc, entry) in idx.parsed.manifests().iter().zip(entries.iter_mut()) {
        let img = match idx.child(desc).await? {
            Artifact::Image(img) => img,
            Artifact::Index(i) => bail!("index {} holds an index, {}", idx.digest(), i.digest()),
        };
        let layers = img.layers()?;
        if !layers
            .iter()
            .all(|l| ggfs::image::is_layer_media_type(&l.media_type()))
        {
            let digest = img.digest().to_string();
            ggfs::image::copy::copy(img.source.clone(), &digest, sink.clone(), None, opts).await?;
            continue;
        }
        let new = f(img.clone())
            .await
            .with_context(|| format!("image {}", img.digest()))?;
        new.push(sink.clone(), None, opts).await?;
        let mt = &new.image.raw.media_type;
        oci |= mt == media::OCI_MANIFEST;
        entry["mediaType"] = json!(mt);
        entry["digest"] = json!(new.image.digest());
        entry["size"] = json!(new.image.raw.bytes.len());
    }
    let mut mt = idx.raw.media_type.clone();
    if oci && mt == media::DOCKER_LIST {
        mt = media::OCI_INDEX.to_string();
        index["mediaType"] = json!(mt);
    }
    let bytes = serde_json::to_vec(&index)?;
    Ok(RawManifest::new(bytes.into(), Some(&mt))?)
}
