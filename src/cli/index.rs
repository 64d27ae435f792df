//! `ggfs index`: two kinds of index. `list`, `filter` and `append` read and
//! build image indexes (manifest lists), as crane's verbs of those names do;
//! `push` publishes the index of an image's plain layers (where each file
//! sits) as an OCI referrer.

use std::sync::Arc;

use anyhow::{bail, Context as _, Result};
use clap::Subcommand;
use futures::TryStreamExt;
use ggfs::digest::Digest;
use ggfs::formats::layerindex::{self, LayerIndexFile};
use ggfs::image::manifest::{media, RawManifest};
use ggfs::image::{fetch, Artifact, Image, Layer, Source};
use serde_json::{json, Value};

use super::{Ctx, Location};

#[derive(Subcommand)]
pub enum Command {
    /// List the manifests of an image index, one `DIGEST PLATFORM` line
    /// each (`-` for a child without a platform).
    List(ListArgs),
    /// Push a copy of an image index keeping only the children of the
    /// given platforms (--platform, repeatable or comma-separated;
    /// `linux` alone keeps every linux child); prints repo@digest.
    Filter(FilterArgs),
    /// Push an image index: BASE's children (or none) plus the manifests
    /// given with -m, each image's platform read from its config; an
    /// index given with -m adds its children (--flatten=false: itself).
    /// Prints repo@digest.
    Append(AppendArgs),
    /// Build the index of every plain (tar, tar+gzip, tar+zstd) layer of
    /// IMAGE, verifying each layer's digest on the way, and push it as an
    /// OCI artifact referring to the image; prints repo@digest of the
    /// artifact. For an index: every platform's image, or --platform's.
    Push(PushArgs),
}

#[derive(clap::Args)]
pub struct PushArgs {
    /// The image (or index) whose layers to index.
    image: String,
}

pub async fn run(ctx: &Ctx, c: Command) -> Result<()> {
    match c {
        Command::List(a) => list(ctx, a).await,
        Command::Filter(a) => filter(ctx, a).await,
        Command::Append(a) => append(ctx, a).await,
        Command::Push(a) => push(ctx, a).await,
    }
}

async fn push(ctx: &Ctx, a: PushArgs) -> Result<()> {
    let r = super::parse_ref(&a.image)?;
    let repo = ctx.repo(&r)?;
    let source: Arc<dyn Source> = Arc::new(repo.clone());
    for image in images(ctx, source, &r.identifier()).await? {
        let mut files = Vec::new();
        for layer in image.layers()? {
            if layerindex::is_plain(&layer.descriptor) {
                let f = index_layer(&layer)
                    .await
                    .with_context(|| format!("indexing layer {}", layer.digest))?;
                files.push(f);
            }
        }
        if files.is_empty() {
            eprintln!(
                "{}@{}: no plain layers, nothing pushed",
                r.repo,
                image.digest()
            );
            continue;
        }
        let raw = layerindex::push(&repo, &image.raw, &files).await?;
        println!("{}@{}", r.repo, raw.digest);
    }
    Ok(())
}

/// The image `reference` names, or an index's images: every one, or the
/// --platform one.
async fn images(ctx: &Ctx, source: Arc<dyn Source>, reference: &str) -> Result<Vec<Image>> {
    let index = match fetch(source, reference).await? {
        Artifact::Image(i) => return Ok(vec![i]),
        Artifact::Index(i) => i,
    };
    if let Some(p) = &ctx.global.platform {
        return Ok(vec![index.image_for(p).await?]);
    }
    let mut out = Vec::new();
    for desc in index.parsed.manifests() {
        if let Artifact::Image(i) = index.child(desc).await? {
            out.push(i);
        }
    }
    Ok(out)
}

/// Stream the layer once through the index builder (which checks its digest).
async fn index_layer(layer: &Layer) -> Result<LayerIndexFile> {
    let stream = layer.source.blob(&layer.digest).await?;
    let reader = tokio_util::io::SyncIoBridge::new(tokio_util::io::StreamReader::new(
        stream.map_err(|e: std::io::Error| e),
    ));
    let (digest, size, c) = (layer.digest.clone(), layer.size(), layer.compression()?);
    let f = tokio::task::spawn_blocking(move || {
        LayerIndexFile::build(reader, c, &digest, size, std::io::sink())
    })
    .await??;
    Ok(f)
}

#[derive(clap::Args)]
pub struct ListArgs {
    /// The index: a registry reference or `oci:DIR[:TAG]`.
    image: String,
}

#[derive(clap::Args)]
pub struct FilterArgs {
    /// The index to filter.
    image: String,
    /// Where to push the result (default: back to IMAGE).
    #[arg(short = 't', long = "tag")]
    tag: Option<String>,
}

#[derive(clap::Args)]
pub struct AppendArgs {
    /// The index to add to (default: an empty one; then -t is needed).
    base: Option<String>,
    /// A manifest or index to add (repeatable, or comma-separated).
    #[arg(short = 'm', long = "manifest", value_delimiter = ',', required = true)]
    manifests: Vec<String>,
    /// Where to push the result (default: back to BASE).
    #[arg(short = 't', long = "tag")]
    tag: Option<String>,
    /// Without BASE: start from a Docker manifest list, not an OCI index.
    #[arg(long)]
    docker_empty_base: bool,
    /// An index given with -m adds each of its children (the default), or
    /// with --flatten=false the index itself.
    #[arg(long, default_value_t = true, num_args = 0..=1, require_equals = true,
          default_missing_value = "true", action = clap::ArgAction::Set)]
    flatten: bool,
}

/// One entry of an index being built: its descriptor as JSON and where its
/// manifest and blobs can be read from.
struct Child {
    desc: Value,
    source: Arc<dyn Source>,
}

impl Child {
    fn digest(&self) -> Result<Digest> {
        let d = self.desc["digest"].as_str().unwrap_or_default();
        Ok(Digest::parse(d)?)
    }
}

/// The index at `location`, as raw bytes and editable JSON, with its source.
async fn open_index(ctx: &Ctx, location: &str) -> Result<(Arc<dyn Source>, RawManifest, Value)> {
    let (source, reference) = ctx.source(location).await?;
    let raw = source.manifest(&reference).await?;
    if !raw.is_index() {
        bail!("{location} is an image ({}), not an index", raw.media_type);
    }
    let json: Value = serde_json::from_slice(&raw.bytes)
        .with_context(|| format!("index {location}: not JSON"))?;
    Ok((source, raw, json))
}

async fn list(ctx: &Ctx, a: ListArgs) -> Result<()> {
    let (_, _, json) = open_index(ctx, &a.image).await?;
    for desc in json["manifests"].as_array().into_iter().flatten() {
        let digest = desc["digest"].as_str().unwrap_or("?");
        let platform = platform_string(&desc["platform"]).unwrap_or_else(|| "-".into());
        println!("{digest} {platform}");
    }
    Ok(())
}

/// `os/arch[/variant][:os.version]`, as crane prints a platform.
fn platform_string(p: &Value) -> Option<String> {
    let os = p["os"].as_str()?;
    let mut s = os.to_string();
    if let Some(arch) = p["architecture"].as_str() {
        s = format!("{s}/{arch}");
    }
    if let Some(v) = p["variant"].as_str().filter(|v| !v.is_empty()) {
        s = format!("{s}/{v}");
    }
    if let Some(v) = p["os.version"].as_str().filter(|v| !v.is_empty()) {
        s = format!("{s}:{v}");
    }
    Some(s)
}

/// A platform to keep: `os[/arch[/variant]][:os.version]`; what is left out
/// matches anything.
struct Wanted {
    os: String,
    arch: Option<String>,
    variant: Option<String>,
    os_version: Option<String>,
}

impl Wanted {
    fn parse(s: &str) -> Result<Self> {
        let (main, os_version) = match s.split_once(':') {
            Some((m, v)) => (m, Some(v.to_string())),
            None => (s, None),
        };
        let parts: Vec<&str> = main.split('/').collect();
        if parts.len() > 3 || parts.iter().any(|p| p.is_empty()) {
            bail!("--platform {s:?}: want os[/arch[/variant]][:os.version]");
        }
        Ok(Wanted {
            os: parts[0].to_string(),
            arch: parts.get(1).map(|s| s.to_string()),
            variant: parts.get(2).map(|s| s.to_string()),
            os_version,
        })
    }

    fn matches(&self, p: &Value) -> bool {
        let field = |k: &str| p[k].as_str().unwrap_or_default();
        if p.is_null() || field("os") != self.os {
            return false;
        }
        if self
            .arch
            .as_deref()
            .is_some_and(|a| a != field("architecture"))
        {
            return false;
        }
        if let Some(w) = &self.variant {
            let v = field("variant");
            let implicit_v8 = v.is_empty() && field("architecture") == "arm64" && w == "v8";
            if v != w && !implicit_v8 {
                return false;
            }
        }
        self.os_version
            .as_deref()
            .is_none_or(|w| w == field("os.version"))
    }
}

async fn filter(ctx: &Ctx, a: FilterArgs) -> Result<()> {
    let wanted = ctx
        .global
        .platforms
        .iter()
        .flat_map(|p| p.split(','))
        .map(Wanted::parse)
        .collect::<Result<Vec<_>>>()?;
    if wanted.is_empty() {
        bail!("index filter: give the platforms to keep with --platform");
    }
    let (source, raw, mut json) = open_index(ctx, &a.image).await?;
    let kept: Vec<Child> = json["manifests"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|d| wanted.iter().any(|w| w.matches(&d["platform"])))
        .map(|d| Child {
            desc: d.clone(),
            source: source.clone(),
        })
        .collect();
    let target = a.tag.as_deref().unwrap_or(&a.image);
    json["manifests"] = Value::Array(kept.iter().map(|c| c.desc.clone()).collect());
    push_index(ctx, &json, &raw.media_type, &kept, target).await
}

async fn append(ctx: &Ctx, a: AppendArgs) -> Result<()> {
    let Some(target) = a.tag.as_deref().or(a.base.as_deref()) else {
        bail!("index append: give a BASE index or a target with -t");
    };
    let (mut children, mut json, media_type) = match &a.base {
        Some(base) => {
            let (source, raw, json) = open_index(ctx, base).await?;
            let children = json["manifests"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|d| Child {
                    desc: d.clone(),
                    source: source.clone(),
                })
                .collect();
            (children, json, raw.media_type)
        }
        None => {
            let mt = if a.docker_empty_base {
                media::DOCKER_LIST
            } else {
                media::OCI_INDEX
            };
            let json = json!({ "schemaVersion": 2, "mediaType": mt, "manifests": [] });
            (Vec::new(), json, mt.to_string())
        }
    };
    for m in &a.manifests {
        let (source, reference) = ctx.source(m).await?;
        let raw = source.manifest(&reference).await?;
        match Artifact::from_raw(source.clone(), raw.clone())
            .await
            .with_context(|| format!("reading {m}"))?
        {
            Artifact::Image(image) => {
                let mut desc = json!({
                    "mediaType": raw.media_type,
                    "digest": raw.digest,
                    "size": raw.bytes.len(),
                });
                let config: Value = serde_json::from_slice(&image.config).unwrap_or_default();
                if let Some(p) = config_platform(&config) {
                    desc["platform"] = p;
                }
                children.push(Child { desc, source });
            }
            Artifact::Index(_) if a.flatten => {
                let inner: Value = serde_json::from_slice(&raw.bytes)
                    .with_context(|| format!("index {m}: not JSON"))?;
                for d in inner["manifests"].as_array().into_iter().flatten() {
                    children.push(Child {
                        desc: d.clone(),
                        source: source.clone(),
                    });
                }
            }
            Artifact::Index(_) => children.push(Child {
                desc: json!({
                    "mediaType": raw.media_type,
                    "digest": raw.digest,
                    "size": raw.bytes.len(),
                }),
                source,
            }),
        }
    }
    json["manifests"] = Value::Array(children.iter().map(|c| c.desc.clone()).collect());
    push_index(ctx, &json, &media_type, &children, target).await
}

/// The platform an image's config names, as an index descriptor holds it;
/// `None` when the config names none (an artifact's).
fn config_platform(config: &Value) -> Option<Value> {
    let mut p = serde_json::Map::new();
    for key in ["architecture", "os", "variant", "os.version", "os.features"] {
        match &config[key] {
            Value::String(s) if !s.is_empty() => {
                p.insert(key.into(), json!(s));
            }
            Value::Array(a) if !a.is_empty() => {
                p.insert(key.into(), json!(a));
            }
            _ => {}
        }
    }
    (p.contains_key("os") || p.contains_key("architecture")).then_some(Value::Object(p))
}

/// Copy every child (manifest and blobs) to `target` where it is not
/// already, then push the index; prints repo@digest (a layout: the digest).
async fn push_index(
    ctx: &Ctx,
    json: &Value,
    media_type: &str,
    children: &[Child],
    target: &str,
) -> Result<()> {
    let bytes = serde_json::to_vec(json)?;
    let raw = RawManifest::new(bytes.into(), Some(media_type))?;
    raw.index().context("the new index")?;
    let (sink, tag) = ctx.sink(target).await?;
    let target_repo = match Location::parse(target)? {
        Location::Registry(r) => Some(r.repo),
        _ => None,
    };
    let mut opts = ctx.copy_options(4);
    opts.platform = None; // children are copied whole
    for child in children {
        let digest = child.digest()?;
        if target_repo.is_some() && child.source.repository() == target_repo.as_ref() {
            continue; // an index of this repository: its children are here
        }
        ggfs::image::copy::copy(
            child.source.clone(),
            digest.as_str(),
            sink.clone(),
            None,
            &opts,
        )
        .await
        .with_context(|| format!("copying {digest} from {}", child.source.name()))?;
    }
    sink.put_manifest(&raw, tag.as_deref())
        .await
        .with_context(|| format!("pushing the index to {target}"))?;
    sink.finish().await?;
    match target_repo {
        Some(r) => println!("{r}@{}", raw.digest),
        None => println!("{}", raw.digest),
    }
    Ok(())
}
