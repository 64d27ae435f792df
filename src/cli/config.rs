use std::io::Write;

use anyhow::Result;

use super::Ctx;

#[derive(clap::Args)]
pub struct Args {
    /// Image reference, `oci:DIR:TAG` or a tarball.
    image: String,
}

pub async fn run(ctx: &Ctx, a: Args) -> Result<()> {
    let (src, reference) = ctx.source(&a.image).await?;
    let image = ggfs::image::fetch_image(src, &reference, ctx.global.platform.as_ref()).await?;
    std::io::stdout().write_all(&image.config)?;
    Ok(())
}
