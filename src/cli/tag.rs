use anyhow::Result;
use ggfs::image::{Sink, Source};

use super::Ctx;

#[derive(clap::Args)]
pub struct Args {
    /// Existing image reference.
    image: String,
    /// The new tag (in the same repository).
    tag: String,
}

pub async fn run(ctx: &Ctx, a: Args) -> Result<()> {
    let r = super::parse_ref(&a.image)?;
    let target = r.with_tag(&a.tag)?;
    let repo = ctx.repo(&r)?;
    let raw = repo.manifest(&r.identifier()).await?;
    repo.put_manifest(&raw, Some(&a.tag)).await?;
    println!("{target}@{}", raw.digest);
    Ok(())
}
