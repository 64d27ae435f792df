use std::sync::Arc;

use anyhow::{bail, Context as _, Result};
use ggfs::copy::CopyOptions;
use ggfs::image::Source;

use super::{Ctx, Location};

#[derive(clap::Args)]
pub struct Args {
    /// Source: registry reference, `oci:DIR[:TAG]` or `docker-archive:FILE`.
    src: String,
    /// Destination: registry reference or `oci:DIR[:TAG]`.
    dst: String,
    /// Copy every tag of the source repository (registry to registry).
    #[arg(short = 'a', long)]
    all_tags: bool,
    /// Do not overwrite a tag that already exists at the destination.
    #[arg(short = 'n', long)]
    no_clobber: bool,
    /// Blobs transferred at once.
    #[arg(short = 'j', long, default_value_t = 4)]
    jobs: usize,
}

pub async fn run(ctx: &Ctx, a: Args) -> Result<()> {
    let opts = ctx.copy_options(a.jobs);
    if a.all_tags {
        return copy_all_tags(ctx, &a, &opts).await;
    }
    let (src, reference) = ctx.source(&a.src).await?;
    let (dst, tag) = ctx.sink(&a.dst).await?;
    if a.no_clobber && tag_exists(ctx, &a.dst).await? {
        eprintln!("{} exists, not overwritten (--no-clobber)", a.dst);
        return Ok(());
    }
    let report = ggfs::copy::copy(src, &reference, dst, tag.as_deref(), &opts)
        .await
        .with_context(|| format!("copying {} to {}", a.src, a.dst))?;
    tracing::info!(?report, "copied");
    Ok(())
}

async fn copy_all_tags(ctx: &Ctx, a: &Args, opts: &CopyOptions) -> Result<()> {
    let (Location::Registry(src), Location::Registry(dst)) =
        (Location::parse(&a.src)?, Location::parse(&a.dst)?)
    else {
        bail!("--all-tags copies between registry repositories");
    };
    let src_repo = Arc::new(ctx.repo(&src)?);
    let dst_repo = Arc::new(ctx.repo(&dst)?);
    for tag in src_repo.tags().await? {
        if a.no_clobber && dst_repo.head_manifest(&tag).await?.is_some() {
            continue;
        }
        let src: Arc<dyn Source> = src_repo.clone();
        ggfs::copy::copy(src, &tag, dst_repo.clone(), Some(&tag), opts)
            .await
            .with_context(|| format!("copying {}:{tag}", src_repo.repository()))?;
    }
    Ok(())
}

async fn tag_exists(ctx: &Ctx, dst: &str) -> Result<bool> {
    match Location::parse(dst)? {
        Location::Registry(r) => Ok(ctx
            .repo(&r)?
            .head_manifest(&r.identifier())
            .await?
            .is_some()),
        Location::Layout { tag: Some(t), dir } => match ggfs::layout::Layout::open(&dir) {
            Ok(l) => Ok(l.manifest(&t).await.is_ok()),
            Err(_) => Ok(false),
        },
        _ => Ok(false),
    }
}
