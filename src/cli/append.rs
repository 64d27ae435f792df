use std::path::PathBuf;

use anyhow::{Context as _, Result};
use ggfs::copy::CopyOptions;
use ggfs::image::Image;
use ggfs::manifest::Compression;
use ggfs::mutate;

use super::Ctx;

#[derive(Clone, Copy, clap::ValueEnum)]
pub enum LayerCompression {
    Gzip,
    Zstd,
    None,
}

#[derive(clap::Args)]
pub struct Args {
    /// Base image; without it the layers go on an empty image (for --platform, default the host's).
    #[arg(short = 'b', long)]
    base: Option<String>,
    /// A directory or a tar file to add as a layer (repeatable, applied in order).
    #[arg(short = 'f', long = "new-layer", required = true)]
    layers: Vec<PathBuf>,
    /// Where to push the new image.
    #[arg(short = 't', long = "new-tag")]
    tag: String,
    #[arg(long, value_enum, default_value = "gzip")]
    compression: LayerCompression,
}

/// Builds each layer into a temporary file (digest and DiffID computed as it
/// is written), appends them, and pushes blobs before the manifest.
pub async fn run(ctx: &Ctx, a: Args) -> Result<()> {
    let base = match &a.base {
        Some(b) => ctx.image(b).await?,
        None => mutate::empty(
            &ctx.global
                .platform
                .clone()
                .unwrap_or_else(ggfs::Platform::host),
        )?,
    };
    let compression = match a.compression {
        LayerCompression::Gzip => Compression::Gzip,
        LayerCompression::Zstd => Compression::Zstd,
        LayerCompression::None => Compression::None,
    };
    let paths = a.layers.clone();
    let layers = tokio::task::spawn_blocking(move || {
        paths
            .iter()
            .map(|p| {
                let layer = if p.is_dir() {
                    mutate::layer_from_dir(p, compression)
                } else {
                    mutate::layer_from_tar(p, compression)
                };
                layer.with_context(|| format!("building a layer from {}", p.display()))
            })
            .collect::<Result<Vec<_>>>()
    })
    .await??;
    let image = mutate::append(&base, layers)?;
    push(ctx, &image, &a.tag).await
}

/// Push an image built in memory to a location.
pub async fn push(ctx: &Ctx, image: &Image, target: &str) -> Result<()> {
    let (sink, tag) = ctx.sink(target).await?;
    let opts = CopyOptions {
        progress: super::progress::reporter(),
        ..CopyOptions::default()
    };
    // The mutated image's source serves its own manifest by digest.
    let digest = image.digest().to_string();
    ggfs::copy::copy(image.source.clone(), &digest, sink, tag.as_deref(), &opts)
        .await
        .with_context(|| format!("pushing to {target}"))?;
    let r = super::parse_ref(target)?;
    println!("{}@{}", r.repo, image.digest());
    Ok(())
}
