use std::io::Write;

use anyhow::Result;

use super::Ctx;

#[derive(clap::Args)]
pub struct Args {
    /// Image reference, `oci:DIR:TAG` or a tarball.
    image: String,
}

/// Prints the bytes exactly as served (no re-serialization), or, with
/// --platform on an index, the chosen child's bytes.
pub async fn run(ctx: &Ctx, a: Args) -> Result<()> {
    let raw = ctx.manifest(&a.image).await?;
    std::io::stdout().write_all(&raw.bytes)?;
    Ok(())
}
