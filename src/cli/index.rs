//! `ggfs index`: verbs about indexes. `push` publishes the index of an
//! image's plain layers as an OCI referrer (crane's image-index verbs may
//! join it here).

use std::sync::Arc;

use anyhow::{Context as _, Result};
use clap::Subcommand;
use futures::TryStreamExt;
use ggfs::image::{fetch, Artifact, Image, Layer, Source};
use ggfs::layerindex::{self, LayerIndexFile};

use super::Ctx;

#[derive(Subcommand)]
pub enum Command {
    /// Build the index of every plain (tar, tar+gzip, tar+zstd) layer of
    /// IMAGE, verifying each layer's digest on the way, and push it as an
    /// OCI artifact referring to the image; prints repo@digest of the
    /// artifact. For an index: every platform's image, or --platform's.
    Push(PushArgs),
}

#[derive(clap::Args)]
pub struct PushArgs {
    /// The image (or index) whose layers to index.
    image: String,
}

pub async fn run(ctx: &Ctx, c: Command) -> Result<()> {
    match c {
        Command::Push(a) => push(ctx, a).await,
    }
}

async fn push(ctx: &Ctx, a: PushArgs) -> Result<()> {
    let r = super::parse_ref(&a.image)?;
    let repo = ctx.repo(&r)?;
    let source: Arc<dyn Source> = Arc::new(repo.clone());
    for image in images(ctx, source, &r.identifier()).await? {
        let mut files = Vec::new();
        for layer in image.layers()? {
            if layerindex::is_plain(&layer.descriptor) {
                let f = index_layer(&layer)
                    .await
                    .with_context(|| format!("indexing layer {}", layer.digest))?;
                files.push(f);
            }
        }
        if files.is_empty() {
            eprintln!(
                "{}@{}: no plain layers, nothing pushed",
                r.repo,
                image.digest()
            );
            continue;
        }
        let raw = layerindex::push(&repo, &image.raw, &files).await?;
        println!("{}@{}", r.repo, raw.digest);
    }
    Ok(())
}

/// The image `reference` names, or an index's images: every one, or the
/// --platform one.
async fn images(ctx: &Ctx, source: Arc<dyn Source>, reference: &str) -> Result<Vec<Image>> {
    let index = match fetch(source, reference).await? {
        Artifact::Image(i) => return Ok(vec![i]),
        Artifact::Index(i) => i,
    };
    if let Some(p) = &ctx.global.platform {
        return Ok(vec![index.image_for(p).await?]);
    }
    let mut out = Vec::new();
    for desc in index.parsed.manifests() {
        if let Artifact::Image(i) = index.child(desc).await? {
            out.push(i);
        }
    }
    Ok(out)
}

/// Stream the layer once through the index builder (which checks its digest).
async fn index_layer(layer: &Layer) -> Result<LayerIndexFile> {
    let stream = layer.source.blob(&layer.digest).await?;
    let reader = tokio_util::io::SyncIoBridge::new(tokio_util::io::StreamReader::new(
        stream.map_err(|e: std::io::Error| e),
    ));
    let (digest, size, c) = (layer.digest.clone(), layer.size(), layer.compression()?);
    let f = tokio::task::spawn_blocking(move || {
        LayerIndexFile::build(reader, c, &digest, size, std::io::sink())
    })
    .await??;
    Ok(f)
}
