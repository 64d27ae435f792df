use anyhow::Result;

use super::Ctx;

#[derive(clap::Args)]
pub struct Args {
    /// Image reference, `oci:DIR:TAG` or a tarball.
    image: String,
    /// Print repo@digest instead of the digest.
    #[arg(long)]
    full_ref: bool,
}

/// The top manifest's digest, or with --platform the chosen image's.
pub async fn run(ctx: &Ctx, a: Args) -> Result<()> {
    let raw = ctx.manifest(&a.image).await?;
    if a.full_ref {
        let r = super::parse_ref(&a.image)?;
        println!("{}@{}", r.repo, raw.digest);
    } else {
        println!("{}", raw.digest);
    }
    Ok(())
}
