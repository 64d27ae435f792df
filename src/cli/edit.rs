//! `ggfs edit config|manifest IMAGE`: crane's edit. The new document comes
//! from `$EDITOR` (on a temporary file holding the current one) when stdin
//! is a terminal, else from stdin; it is checked before anything is pushed.

use std::io::{IsTerminal, Read, Write};

use anyhow::{bail, Context as _, Result};
use bytes::Bytes;
use clap::Subcommand;
use ggfs::image::manifest::{Parsed, RawManifest};
use ggfs::image::mutate;
use serde_json::Value;

use super::Ctx;

#[derive(Subcommand)]
pub enum Command {
    /// Replace an image's config (its rootfs must stay as it is) and push
    /// the image; prints repo@digest.
    Config(Args),
    /// Replace a manifest or index, once it parses and every blob (or child
    /// manifest) it names is in the target repository; prints repo@digest.
    Manifest(Args),
}

#[derive(clap::Args)]
pub struct Args {
    /// The image (for `config`, --platform picks one out of an index).
    image: String,
    /// Where to push the result (default: back to IMAGE; by digest when
    /// IMAGE names one).
    #[arg(short = 't', long = "tag")]
    tag: Option<String>,
}

pub async fn run(ctx: &Ctx, c: Command) -> Result<()> {
    match c {
        Command::Config(a) => config(ctx, a).await,
        Command::Manifest(a) => manifest(ctx, a).await,
    }
}

async fn config(ctx: &Ctx, a: Args) -> Result<()> {
    let image = ctx.image(&a.image).await?;
    let edited = new_document(&image.config, "config")?;
    serde_json::from_slice::<ggfs::image::manifest::ImageConfiguration>(&edited)
        .map_err(|e| anyhow::anyhow!("the new config is not an image config: {e}"))?;
    let image = mutate::replace_config(&image, edited)?;
    super::append::push(ctx, &image, &target(&a, image.digest())?).await
}

async fn manifest(ctx: &Ctx, a: Args) -> Result<()> {
    let old = ctx.manifest(&a.image).await?;
    let edited = new_document(&old.bytes, "manifest")?;
    let json: Value = serde_json::from_slice(&edited).expect("checked JSON");
    // The media type the document names, else the one it had.
    let media_type = match json.get("mediaType") {
        Some(_) => None,
        None => Some(old.media_type.as_str()),
    };
    let raw = RawManifest::new(edited, media_type).context("the new manifest")?;
    let parsed = raw.parse().context("the new manifest")?;
    let dst = super::parse_ref(&target(&a, &raw.digest)?)?;
    let repo = ctx.repo(&dst)?;
    match parsed {
        Parsed::Image(m) => {
            let blobs = std::iter::once(("config", m.config()))
                .chain(m.layers().iter().map(|l| ("layer", l)));
            for (what, desc) in blobs {
                let digest = ggfs::image::manifest::digest_of(desc)?;
                if repo.head_blob(&digest).await?.is_none() {
                    bail!(
                        "the new manifest names {what} {digest}, which {} does not have",
                        dst.repo
                    );
                }
            }
        }
        Parsed::Index(i) => {
            for desc in i.manifests() {
                let digest = ggfs::image::manifest::digest_of(desc)?;
                if repo.head_manifest(digest.as_str()).await?.is_none() {
                    bail!(
                        "the new index names manifest {digest}, which {} does not have",
                        dst.repo
                    );
                }
            }
        }
    }
    repo.push_manifest(&raw, dst.tag.as_deref())
        .await
        .with_context(|| format!("pushing the manifest to {dst}"))?;
    println!("{}@{}", dst.repo, raw.digest);
    Ok(())
}

/// -t, or IMAGE itself; by digest (the new one) when IMAGE names a digest.
fn target(a: &Args, digest: &ggfs::Digest) -> Result<String> {
    if let Some(t) = &a.tag {
        return Ok(t.clone());
    }
    match super::parse_ref(&a.image) {
        Ok(r) if r.digest.is_some() => Ok(r.with_digest(digest.clone()).to_string()),
        _ => Ok(a.image.clone()),
    }
}

/// The edited document: from $EDITOR when stdin is a terminal (started on
/// the current one, pretty-printed; left as it was, the current bytes), else
/// all of stdin. It must be a JSON object.
fn new_document(current: &[u8], what: &str) -> Result<Bytes> {
    let edited = if std::io::stdin().is_terminal() {
        edit_in_editor(current, what)?
    } else {
        let mut buf = Vec::new();
        std::io::stdin()
            .read_to_end(&mut buf)
            .with_context(|| format!("reading the new {what} from stdin"))?;
        Bytes::from(buf)
    };
    match serde_json::from_slice::<Value>(&edited) {
        Ok(v) if v.is_object() => Ok(edited),
        Ok(_) => bail!("the new {what} is not a JSON object"),
        Err(e) if edited.iter().all(u8::is_ascii_whitespace) => {
            bail!("the new {what} is empty ({e}); nothing pushed")
        }
        Err(e) => bail!("the new {what} is not JSON: {e}"),
    }
}

fn edit_in_editor(current: &[u8], what: &str) -> Result<Bytes> {
    let original: Value = serde_json::from_slice(current)
        .with_context(|| format!("the current {what} is not JSON"))?;
    let mut file = tempfile::Builder::new()
        .prefix(&format!("ggfs-{what}-"))
        .suffix(".json")
        .tempfile()?;
    let mut pretty = serde_json::to_vec_pretty(&original)?;
    pretty.push(b'\n');
    file.write_all(&pretty)?;
    file.flush()?;
    let editor = std::env::var("VISUAL")
        .or_else(|_| std::env::var("EDITOR"))
        .unwrap_or_else(|_| "vi".into());
    // Through the shell, so that EDITOR may carry arguments ("code --wait").
    let status = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!("{editor} \"$1\""))
        .arg("sh")
        .arg(file.path())
        .status()
        .with_context(|| format!("running the editor {editor:?}"))?;
    if !status.success() {
        bail!("the editor {editor:?} exited with {status}; nothing pushed");
    }
    let edited = std::fs::read(file.path())?;
    match serde_json::from_slice::<Value>(&edited) {
        Ok(v) if v == original => Ok(Bytes::copy_from_slice(current)),
        _ => Ok(Bytes::from(edited)),
    }
}
