use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::{bail, Context as _, Result};
use bytes::Bytes;
use ggfs::digest::Hasher;
use ggfs::image::Sink;
use ggfs::manifest::media;
use ggfs::{Digest, RawManifest};
use serde_json::json;

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
    let subject = ggfs::copy::manifest_for(&repo, &r.identifier(), platform).await?;
    let empty = Bytes::from_static(b"{}");
    let empty_digest = Digest::of(&empty);
    put_if_missing(&repo, &empty_digest, empty.clone()).await?;
    let mut layers = Vec::new();
    for file in &a.files {
        let (digest, size) = push_file(&repo, file).await?;
        let title = file.file_name().map(|n| n.to_string_lossy().into_owned());
        layers.push(json!({
            "mediaType": a.media_type, "digest": digest, "size": size,
            "annotations": {"org.opencontainers.image.title": title},
        }));
    }
    let empty_desc = json!({"mediaType": media::OCI_EMPTY, "digest": empty_digest, "size": 2});
    if layers.is_empty() {
        layers.push(empty_desc.clone());
    }
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": media::OCI_MANIFEST,
        "artifactType": a.artifact_type,
        "config": empty_desc,
        "layers": layers,
        "subject": {"mediaType": subject.media_type, "digest": subject.digest, "size": subject.bytes.len()},
        "annotations": annotations(&a.annotations)?,
    });
    let raw = RawManifest::new(Bytes::from(serde_json::to_vec(&manifest)?), None)?;
    repo.put_manifest(&raw, None).await?;
    println!("{}@{}", r.repo, raw.digest);
    Ok(())
}

fn annotations(pairs: &[String]) -> Result<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    out.insert(
        "org.opencontainers.image.created".to_string(),
        chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
    );
    for p in pairs {
        let Some((k, v)) = p.split_once('=') else {
            bail!("annotation {p:?}: want KEY=VALUE");
        };
        out.insert(k.to_string(), v.to_string());
    }
    Ok(out)
}

async fn put_if_missing(sink: &dyn Sink, digest: &Digest, bytes: Bytes) -> Result<()> {
    if !sink.has_blob(digest).await? {
        let size = bytes.len() as u64;
        sink.put_blob(digest, size, ggfs::image::bytes_stream(bytes))
            .await?;
    }
    Ok(())
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
