use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context as _, Result};

use super::Ctx;

#[derive(clap::Args)]
pub struct Args {
    /// Image reference, `oci:DIR:TAG` or a tarball.
    image: String,
    /// Output tar file, or `-` for stdout.
    output: PathBuf,
}

/// The flattened filesystem (whiteouts applied) as one tar. A file output is
/// written beside its final name and renamed only when complete.
pub async fn run(ctx: &Ctx, a: Args) -> Result<()> {
    let image = ctx.image(&a.image).await?;
    if a.output.as_os_str() == "-" {
        let out = super::progress::writer(std::io::BufWriter::new(std::io::stdout()), "export");
        return flatten(&image, out).await;
    }
    let dir = match a.output.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let tmp = tempfile::Builder::new()
        .prefix(".ggfs-export-")
        .tempfile_in(&dir)
        .with_context(|| format!("creating a file in {}", dir.display()))?;
    let out = super::progress::writer(std::io::BufWriter::new(tmp.reopen()?), "export");
    flatten(&image, out).await?;
    tmp.persist(&a.output)
        .with_context(|| format!("writing {}", a.output.display()))?;
    Ok(())
}

async fn flatten(image: &ggfs::image::Image, out: impl Write + Send + 'static) -> Result<()> {
    let mut out = ggfs::image::export::flatten(image, out).await?;
    out.flush()?;
    Ok(())
}
