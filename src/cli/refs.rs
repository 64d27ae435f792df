use anyhow::Result;
use ggfs::image::Source;

use super::Ctx;

#[derive(clap::Args)]
pub struct Args {
    /// The image whose referrers to list.
    image: String,
    /// Only artifacts of this type.
    #[arg(long)]
    artifact_type: Option<String>,
}

/// One line per referrer: `<digest> <artifactType>`. Uses the referrers API,
/// or the `sha256-<hex>` tag on registries without it.
pub async fn run(ctx: &Ctx, a: Args) -> Result<()> {
    let r = super::parse_ref(&a.image)?;
    let repo = ctx.repo(&r)?;
    let subject = repo.manifest(&r.identifier()).await?;
    let index = repo
        .referrers(&subject.digest, a.artifact_type.as_deref())
        .await?;
    for d in index.manifests() {
        let at = d
            .artifact_type()
            .as_ref()
            .map(|t| t.to_string())
            .unwrap_or_default();
        println!("{} {at}", d.digest());
    }
    Ok(())
}
