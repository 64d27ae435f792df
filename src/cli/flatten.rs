use std::sync::Arc;

use anyhow::{bail, Context as _, Result};
use ggfs::copy::CopyOptions;
use ggfs::image::{Artifact, Image, Index, Sink};
use ggfs::manifest::{Compression, RawManifest};
use serde_json::json;

use super::{Ctx, Location};

const CREATED_BY: &str = "ggfs flatten";

#[derive(clap::Args)]
pub struct Args {
    /// The image to flatten.
    image: String,
    /// New tag to apply to flattened image (default: IMAGE's tag, or by
    /// digest to its repository when IMAGE names a digest).
    #[arg(short = 't', long = "tag")]
    tag: Option<String>,
}

/// crane flatten: one layer holding the merged tree (whiteouts applied),
/// the config's history kept as empty-layer entries plus one for the new
/// layer. An index (without --platform) has each of its images flattened.
/// Without --tag the result goes back to IMAGE: its tag, or by digest when
/// IMAGE names a digest.
pub async fn run(ctx: &Ctx, a: Args) -> Result<()> {
    let target = a.tag.as_deref().unwrap_or(&a.image);
    let (src, reference) = ctx.source(&a.image).await?;
    let artifact = if ctx.global.platform.is_some() {
        Artifact::Image(ctx.image(&a.image).await?)
    } else {
        ggfs::image::fetch(src, &reference).await?
    };
    let (sink, tag) = ctx.sink(target).await?;
    let opts = ctx.copy_options(4);
    let flattening = || format!("flattening {}", a.image);
    let digest = match artifact {
        Artifact::Image(img) => {
            let flat = flatten(&img).await.with_context(flattening)?;
            flat.push(sink, tag.as_deref(), &opts)
                .await
                .with_context(|| format!("pushing to {target}"))?;
            flat.image.digest().clone()
        }
        Artifact::Index(idx) => {
            let raw = flatten_index(&idx, &sink, &opts)
                .await
                .with_context(flattening)?;
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

async fn flatten(img: &Image) -> Result<ggfs::compose::Composed> {
    Ok(ggfs::flatten::flatten(img, Compression::Gzip, CREATED_BY).await?)
}

/// Flatten and push each image of `idx` (by digest); images that are not
/// made of filesystem layers (attestations, signatures) are copied as they
/// are. Returns the new index, not yet pushed.
async fn flatten_index(
    idx: &Index,
    sink: &Arc<dyn Sink>,
    opts: &CopyOptions,
) -> Result<RawManifest> {
    let mut index: serde_json::Value = serde_json::from_slice(&idx.raw.bytes)
        .with_context(|| format!("index {}", idx.digest()))?;
    let Some(entries) = index["manifests"].as_array_mut() else {
        bail!("index {} has no manifests", idx.digest());
    };
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
            ggfs::copy::copy(img.source.clone(), &digest, sink.clone(), None, opts).await?;
            continue;
        }
        let flat = flatten(&img)
            .await
            .with_context(|| format!("image {}", img.digest()))?;
        flat.push(sink.clone(), None, opts).await?;
        entry["digest"] = json!(flat.image.digest());
        entry["size"] = json!(flat.image.raw.bytes.len());
    }
    let bytes = serde_json::to_vec(&index)?;
    Ok(RawManifest::new(bytes.into(), Some(&idx.raw.media_type))?)
}
