use anyhow::Result;

use super::Ctx;

#[derive(clap::Args)]
pub struct Args {
    /// Image reference (tag or digest).
    image: String,
}

pub async fn run(ctx: &Ctx, a: Args) -> Result<()> {
    let r = super::parse_ref(&a.image)?;
    ctx.repo(&r)?.delete(&r.identifier()).await?;
    Ok(())
}
