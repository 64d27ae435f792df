use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context as _, Result};

use super::Ctx;

#[derive(Clone, Copy, clap::ValueEnum)]
pub enum Format {
    /// A docker-save tarball (`docker load` reads it).
    Tarball,
    /// An OCI image layout directory.
    Oci,
}

#[derive(clap::Args)]
pub struct Args {
    /// Image reference(s) to pull.
    #[arg(required = true, num_args = 1..)]
    images: Vec<String>,
    /// Where to write: a .tar file or a layout directory.
    path: PathBuf,
    #[arg(long, value_enum, default_value = "tarball")]
    format: Format,
    /// Blobs transferred at once.
    #[arg(short = 'j', long, default_value_t = 4)]
    jobs: usize,
}

pub async fn run(ctx: &Ctx, a: Args) -> Result<()> {
    match a.format {
        Format::Oci => pull_oci(ctx, &a).await,
        Format::Tarball => pull_tarball(ctx, &a).await,
    }
}

async fn pull_oci(ctx: &Ctx, a: &Args) -> Result<()> {
    let layout = Arc::new(ggfs::image::layout::Layout::create(&a.path)?);
    let opts = ctx.copy_options(a.jobs);
    for image in &a.images {
        let r = super::parse_ref(image)?;
        let src = Arc::new(ctx.repo(&r)?);
        ggfs::image::copy::copy(
            src,
            &r.identifier(),
            layout.clone(),
            r.tag.as_deref(),
            &opts,
        )
        .await
        .with_context(|| format!("pulling {image}"))?;
    }
    Ok(())
}

/// Every image into one docker-save tarball (manifest.json lists each image
/// once with the tags it was pulled by; blobs they share are stored once).
async fn pull_tarball(ctx: &Ctx, a: &Args) -> Result<()> {
    let platform = ctx.global.platform.clone();
    let mut images: Vec<(ggfs::image::Image, Vec<String>)> = Vec::new();
    for image in &a.images {
        let r = super::parse_ref(image)?;
        let src = Arc::new(ctx.repo(&r)?);
        let img = ggfs::image::fetch_image(src, &r.identifier(), platform.as_ref())
            .await
            .with_context(|| format!("pulling {image}"))?;
        let tags: Vec<String> = r.tag.iter().map(|_| r.to_string()).collect();
        // One entry per image, with all the tags it was pulled by, as
        // docker save writes it.
        match images.iter_mut().find(|(i, _)| i.digest() == img.digest()) {
            Some((_, known)) => {
                for t in tags {
                    if !known.contains(&t) {
                        known.push(t);
                    }
                }
            }
            None => images.push((img, tags)),
        }
    }
    let dest = if a.path.as_os_str() == "-" {
        ggfs::image::tarball::Dest::Stdout
    } else {
        ggfs::image::tarball::Dest::Path(a.path.clone())
    };
    ggfs::image::tarball::write_all_to(&images, dest)
        .await
        .with_context(|| format!("writing {}", a.path.display()))?;
    Ok(())
}
