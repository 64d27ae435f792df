use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::{bail, Context as _, Result};
use bytes::Bytes;
use ggfs::digest::Hasher;
use ggfs::image::attach;
use ggfs::image::Sink;
use ggfs::Digest;

use super::Ctx;

#[derive(clap::Args)]
pub struct Args {
    /// The image the artifact refers to (its `subject`).
    image: String,
    /// The artifact's type, e.g. application/vnd.example.sbom+json.
    #[arg(long)]
    artifact_type: String,
    /// Files to attach as the artifact's blobs (none: an empty artifact).
    #[arg(short = 'f', long = "file")]
    files: Vec<PathBuf>,
    /// Media type of the attached files.
    #[arg(long, default_value = "application/octet-stream")]
    media_type: String,
    /// Annotations on the artifact manifest, KEY=VALUE (repeatable).
    #[arg(short = 'a', long = "annotation")]
    annotations: Vec<String>,
}

/// Pushes an OCI artifact manifest whose `subject` is IMAGE. The registry
/// client keeps the `sha256-<hex>` fallback index up to date on registries
/// without the referrers API.
pub async fn run(ctx: &Ctx, a: Args) -> Result<()> {
    let r = super::parse_ref(&a.image)?;
    let repo = ctx.repo(&r)?;
    let platform = ctx.global.platform.as_ref();
    let subject = ggfs::image::copy::manifest_for(&repo, &r.identifier(), platform).await?;
    let empty = Bytes::from_static(attach::EMPTY);
    attach::put_if_missing(&repo, &Digest::of(&empty), empty).await?;
    let mut layers = Vec::new();
    for file in &a.files {
        let (digest, size) = push_file(&repo, file).await?;
        let title = file.file_name().map(|n| n.to_string_lossy().into_owned());
        layers.push(attach::file_layer(
            &a.media_type,
            &digest,
            size,
            title.as_deref(),
        ));
    }
    let raw = attach::manifest(
        &subject,
        &a.artifact_type,
        layers,
        annotations(&a.annotations)?,
    )?;
    repo.put_manifest(&raw, None).await?;
    println!("{}@{}", r.repo, raw.digest);
    Ok(())
}

fn annotations(pairs: &[String]) -> Result<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    for p in pairs {
        let Some((k, v)) = p.split_once('=') else {
            bail!("annotation {p:?}: want KEY=VALUE");
        };
        out.insert(k.to_string(), v.to_string());
    }
    Ok(out)
}

/// Hash the file in one pass, then stream it up in a second: a large file
/// never sits in memory.
async fn push_file(sink: &dyn Sink, path: &PathBuf) -> Result<(Digest, u64)> {
    let p = path.clone();
    let (digest, size) = tokio::task::spawn_blocking(move || -> std::io::Result<_> {
        let h = Hasher::read_all(std::fs::File::open(&p)?)?;
        let len = h.len();
        Ok((h.finish(), len))
    })
    .await?
    .with_context(|| format!("reading {}", path.display()))?;
    if !sink.has_blob(&digest).await? {
        let file = tokio::fs::File::open(path)
            .await
            .with_context(|| format!("opening {}", path.display()))?;
        let stream = ggfs::image::file_stream(file);
        sink.put_blob(&digest, size, stream).await?;
    }
    Ok((digest, size))
}
