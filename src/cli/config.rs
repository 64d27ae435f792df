use std::io::Write;

use anyhow::Result;

use super::Ctx;

#[derive(clap::Args)]
pub struct Args {
    /// Image reference, `oci:DIR:TAG` or a tarball.
    image: String,
}

pub async fn run(ctx: &Ctx, a: Args) -> Result<()> {
    let image = ctx.image(&a.image).await?;
    std::io::stdout().write_all(&image.config)?;
    Ok(())
}
