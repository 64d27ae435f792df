use std::path::PathBuf;

use anyhow::{Context as _, Result};
use ggfs::image::copy::CopyOptions;
use ggfs::image::mutate;
use ggfs::image::newlayer::{self, LayerFormat, LayerOptions};
use ggfs::image::Image;

use super::Ctx;

#[derive(Clone, Copy, clap::ValueEnum)]
pub enum LayerCompression {
    Gzip,
    Zstd,
    /// gzip, lazily readable (TOC, chunks of --chunk-size).
    Estargz,
    /// zstd, lazily readable (TOC, chunks of --chunk-size).
    #[value(name = "zstd:chunked", alias = "zstdchunked")]
    ZstdChunked,
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
    /// Format of the new layers.
    #[arg(
        long = "layer-format",
        alias = "compression",
        value_enum,
        default_value = "gzip"
    )]
    layer_format: LayerCompression,
    /// eStargz / zstd:chunked: files (paths in the layer) to put first,
    /// before a `.prefetch.landmark` (repeatable).
    #[arg(long, num_args = 1..)]
    prefetch: Vec<String>,
    /// eStargz / zstd:chunked: largest uncompressed chunk of a file, in bytes.
    #[arg(long, default_value_t = ggfs::formats::toc_writer::DEFAULT_CHUNK_SIZE)]
    chunk_size: u64,
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
    let format = match a.layer_format {
        LayerCompression::Gzip => LayerFormat::Gzip,
        LayerCompression::Zstd => LayerFormat::Zstd,
        LayerCompression::Estargz => LayerFormat::Estargz,
        LayerCompression::ZstdChunked => LayerFormat::ZstdChunked,
        LayerCompression::None => LayerFormat::None,
    };
    if !a.prefetch.is_empty() && !matches!(format, LayerFormat::Estargz | LayerFormat::ZstdChunked)
    {
        anyhow::bail!("--prefetch needs --layer-format estargz or zstd:chunked");
    }
    let opts = LayerOptions {
        format,
        chunk_size: a.chunk_size,
        prefetch: a.prefetch.clone(),
    };
    let layers = build_layers(a.layers.clone(), opts, "building a layer from").await?;
    let image = mutate::append(&base, layers)?;
    push(ctx, &image, &a.tag).await
}

/// Each path as a layer written as `opts` says: a directory's tree, or a
/// tar's entries; an error names `what` and the path.
pub async fn build_layers(
    paths: Vec<PathBuf>,
    opts: LayerOptions,
    what: &'static str,
) -> Result<Vec<newlayer::LocalLayer>> {
    tokio::task::spawn_blocking(move || {
        paths
            .iter()
            .map(|p| {
                let layer = if p.is_dir() {
                    newlayer::layer_from_dir_as(p, &opts, &newlayer::PlainDir)
                } else {
                    newlayer::layer_from_tar_as(p, &opts)
                };
                layer.with_context(|| format!("{what} {}", p.display()))
            })
            .collect()
    })
    .await?
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
    ggfs::image::copy::copy(image.source.clone(), &digest, sink, tag.as_deref(), &opts)
        .await
        .with_context(|| format!("pushing to {target}"))?;
    // A registry's image by digest; for a layout or tarball, the digest.
    match super::parse_ref(target) {
        Ok(r) => println!("{}@{}", r.repo, image.digest()),
        Err(_) => println!("{}", image.digest()),
    }
    Ok(())
}
