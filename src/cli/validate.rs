use anyhow::{bail, Result};
use ggfs::digest::Hasher;

use super::Ctx;

#[derive(clap::Args)]
pub struct Args {
    /// Image reference, `oci:DIR:TAG` or a tarball.
    image: String,
}

/// Reads every layer once: the compressed bytes are checked against the
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
    for layer in layers {
        let l = layer.clone();
        let diff_id = tokio::task::spawn_blocking(move || -> ggfs::Result<_> {
            let reader = ggfs::image::export::layer_reader(&l)?;
            Hasher::read_all(reader)
                .map(Hasher::finish)
                .map_err(|e| ggfs::error::from_io(format!("layer {}", l.digest), e))
        })
        .await??;
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
