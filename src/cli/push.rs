use std::path::PathBuf;

use anyhow::{Context as _, Result};
use ggfs::image::manifest::Compression;

use super::Ctx;

#[derive(clap::Args)]
pub struct Args {
    /// A docker-save tarball or an OCI layout directory.
    path: PathBuf,
    /// Where to push it.
    image: String,
    /// Blobs transferred (and a tarball's layers compressed) at once.
    #[arg(short = 'j', long, default_value_t = 4)]
    jobs: usize,
}

/// crane push: a layout is pushed as it is; a tarball's uncompressed layers
/// (`docker save` writes them so) are gzip-compressed on the way, their
/// digests and sizes in the pushed manifest, the config (DiffIDs) unchanged.
pub async fn run(ctx: &Ctx, a: Args) -> Result<()> {
    if a.path.is_dir() {
        let src = format!("oci:{}", a.path.display());
        let (source, reference) = ctx.source(&src).await?;
        let (sink, tag) = ctx.sink(&a.image).await?;
        let opts = ctx.copy_options(a.jobs);
        let report = ggfs::image::copy::copy(source, &reference, sink, tag.as_deref(), &opts)
            .await
            .with_context(|| format!("pushing {} to {}", a.path.display(), a.image))?;
        let r = super::parse_ref(&a.image)?;
        if let Some(d) = report.digest {
            println!("{}@{d}", r.repo);
        }
        return Ok(());
    }
    let src = format!("docker-archive:{}", a.path.display());
    let image = ctx.image(&src).await?;
    let pushing = || format!("pushing {} to {}", a.path.display(), a.image);
    let composed = ggfs::image::compose::compress_plain_layers(&image, Compression::Gzip, a.jobs)
        .await
        .with_context(pushing)?;
    let (sink, tag) = ctx.sink(&a.image).await?;
    let opts = ctx.copy_options(a.jobs);
    let report = match composed {
        Some(c) => c.push(sink, tag.as_deref(), &opts).await,
        None => {
            let digest = image.digest().to_string();
            ggfs::image::copy::copy(image.source.clone(), &digest, sink, tag.as_deref(), &opts)
                .await
        }
    }
    .with_context(pushing)?;
    let r = super::parse_ref(&a.image)?;
    if let Some(d) = report.digest {
        println!("{}@{d}", r.repo);
    }
    Ok(())
}
