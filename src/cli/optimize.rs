use anyhow::Result;
use ggfs::formats::toc_writer::{TocFormat, TocOptions, DEFAULT_CHUNK_SIZE};

use super::Ctx;

#[derive(Clone, Copy, clap::ValueEnum)]
pub enum Format {
    /// gzip members with a TOC (stargz-snapshotter, containerd).
    Estargz,
    /// zstd frames with a TOC (podman, CRI-O, containers/storage).
    #[value(name = "zstd:chunked", alias = "zstdchunked")]
    ZstdChunked,
}

#[derive(clap::Args)]
pub struct Args {
    /// The image to convert.
    image: String,
    /// Where to push the result (default: IMAGE's tag, or by digest to its
    /// repository when IMAGE names a digest).
    #[arg(short = 't', long = "tag")]
    tag: Option<String>,
    /// The layer format to convert to.
    #[arg(long, value_enum, default_value = "estargz")]
    format: Format,
    /// Files (paths in the image) to put first in the layers that hold
    /// them, before a `.prefetch.landmark` (repeatable).
    #[arg(long, num_args = 1..)]
    prefetch: Vec<String>,
    /// Largest uncompressed chunk of a file, in bytes.
    #[arg(long, default_value_t = DEFAULT_CHUNK_SIZE)]
    chunk_size: u64,
}

/// ctr-remote image optimize, without running the image: every layer
/// re-encoded as eStargz or zstd:chunked (layers already in the format
/// kept), the manifest made OCI, pushed to --tag. An index (without
/// --platform) has each of its images converted.
pub async fn run(ctx: &Ctx, a: Args) -> Result<()> {
    let target = a.tag.as_deref().unwrap_or(&a.image);
    let mut opts = TocOptions::new(match a.format {
        Format::Estargz => TocFormat::Estargz,
        Format::ZstdChunked => TocFormat::ZstdChunked,
    });
    opts.chunk_size = a.chunk_size;
    opts.prefetch = a.prefetch.clone();
    let opts = &opts;
    super::rewrite::run(ctx, &a.image, target, "optimizing", |img| async move {
        let done = ggfs::image::optimize::optimize(&img, opts).await?;
        tracing::info!(
            "image {}: {} of {} layers converted",
            img.digest(),
            done.converted,
            img.manifest.layers().len()
        );
        Ok(done.composed)
    })
    .await
}
