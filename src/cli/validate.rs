use anyhow::{bail, Result};
use futures::StreamExt;
use ggfs::digest::Hasher;

use super::Ctx;

#[derive(clap::Args)]
pub struct Args {
    /// Image reference, `oci:DIR:TAG` or a tarball.
    image: String,
}

/// Reads every layer once, four at a time: the compressed bytes are checked against the
/// layer digest and the uncompressed tar against the config's DiffID.
pub async fn run(ctx: &Ctx, a: Args) -> Result<()> {
    let image = ctx.image(&a.image).await?;
    let layers = image.layers()?;
    let cfg = image.config_file()?;
    if cfg.rootfs().diff_ids().len() != layers.len() {
        bail!(
            "image {}: {} layers but {} diff_ids in the config",
            image.digest(),
            layers.len(),
            cfg.rootfs().diff_ids().len()
        );
    }
    // Four layers at a time (each on a blocking thread), reported in order.
    let mut checked = futures::stream::iter(layers)
        .map(|layer| async move {
            let l = layer.clone();
            let diff_id = tokio::task::spawn_blocking(move || -> ggfs::Result<_> {
                let reader = ggfs::image::export::layer_reader(&l)?;
                Hasher::read_all(reader)
                    .map(Hasher::finish)
                    .map_err(|e| ggfs::error::from_io(format!("layer {}", l.digest), e))
            })
            .await??;
            Ok::<_, anyhow::Error>((layer, diff_id))
        })
        .buffered(4);
    while let Some(done) = checked.next().await {
        let (layer, diff_id) = done?;
        match &layer.diff_id {
            Some(want) if want != &diff_id => {
                bail!(
                    "layer {}: uncompressed digest {diff_id} is not the config's DiffID {want}",
                    layer.digest
                )
            }
            _ => println!("{} ok", layer.digest),
        }
    }
    println!("{} valid", image.digest());
    Ok(())
}
