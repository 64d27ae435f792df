use std::path::PathBuf;

use anyhow::{Context as _, Result};

use super::Ctx;

#[derive(clap::Args)]
pub struct Args {
    /// A docker-save tarball or an OCI layout directory.
    path: PathBuf,
    /// Where to push it.
    image: String,
    /// Blobs transferred at once.
    #[arg(short = 'j', long, default_value_t = 4)]
    jobs: usize,
}

pub async fn run(ctx: &Ctx, a: Args) -> Result<()> {
    let src = if a.path.is_dir() {
        format!("oci:{}", a.path.display())
    } else {
        format!("docker-archive:{}", a.path.display())
    };
    let (source, reference) = ctx.source(&src).await?;
    let (sink, tag) = ctx.sink(&a.image).await?;
    let opts = ctx.copy_options(a.jobs);
    let report = ggfs::copy::copy(source, &reference, sink, tag.as_deref(), &opts)
        .await
        .with_context(|| format!("pushing {} to {}", a.path.display(), a.image))?;
    let r = super::parse_ref(&a.image)?;
    if let Some(d) = report.digest {
        println!("{}@{d}", r.repo);
    }
    Ok(())
}
