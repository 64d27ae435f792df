use anyhow::Result;
use ggfs::image::manifest::Compression;

use super::Ctx;

const CREATED_BY: &str = "ggfs flatten";

#[derive(clap::Args)]
pub struct Args {
    /// The image to flatten.
    image: String,
    /// New tag to apply to flattened image (default: IMAGE's tag, or by
    /// digest to its repository when IMAGE names a digest).
    #[arg(short = 't', long = "tag")]
    tag: Option<String>,
}

/// crane flatten: one layer holding the merged tree (whiteouts applied),
/// the config's history kept as empty-layer entries plus one for the new
/// layer. An index (without --platform) has each of its images flattened.
/// Without --tag the result goes back to IMAGE: its tag, or by digest when
/// IMAGE names a digest.
pub async fn run(ctx: &Ctx, a: Args) -> Result<()> {
    let target = a.tag.as_deref().unwrap_or(&a.image);
    super::rewrite::run(ctx, &a.image, target, "flattening", |img| async move {
        ggfs::image::flatten::flatten(&img, Compression::Gzip, CREATED_BY).await
    })
    .await
}
