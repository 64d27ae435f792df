use anyhow::{bail, Result};
use futures::StreamExt;
use tokio::io::AsyncWriteExt;

use super::Ctx;

#[derive(clap::Args)]
pub struct Args {
    /// Blob reference: host/repo@sha256:<hex>.
    blob: String,
}

/// Streams the blob to stdout; the digest is checked as it flows and a
/// mismatch fails the command (the bytes already written are not to be trusted).
pub async fn run(ctx: &Ctx, a: Args) -> Result<()> {
    let r = super::parse_ref(&a.blob)?;
    let Some(digest) = r.digest.clone() else {
        bail!("{}: a blob is named by digest: REPO@sha256:<hex>", a.blob);
    };
    let repo = ctx.repo(&r)?;
    let stream = ggfs::image::Source::blob(&repo, &digest).await?;
    let mut stream = ggfs::image::verify_stream(stream, digest.clone(), None);
    let mut out = tokio::io::stdout();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| ggfs::error::from_io(format!("blob {digest}"), e))?;
        out.write_all(&chunk).await?;
    }
    out.flush().await?;
    Ok(())
}
