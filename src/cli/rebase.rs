use anyhow::{bail, Context as _, Result};
use ggfs::image::rebase::{BASE_DIGEST, BASE_NAME};

use super::{Ctx, Location};

#[derive(clap::Args)]
pub struct Args {
    /// The image to rebase.
    image: String,
    /// Old base image to remove (default: the image's
    /// org.opencontainers.image.base.name annotation, at its
    /// org.opencontainers.image.base.digest).
    #[arg(long = "old-base", visible_alias = "old_base")]
    old_base: Option<String>,
    /// New base image to insert (default: the image's
    /// org.opencontainers.image.base.name annotation, i.e. the base tag's
    /// current image).
    #[arg(long = "new-base", visible_alias = "new_base")]
    new_base: Option<String>,
    /// Tag to apply to rebased image (default: IMAGE's tag, or by digest to
    /// its repository when IMAGE names a digest).
    #[arg(short = 't', long = "tag")]
    tag: Option<String>,
    /// Blobs transferred at once.
    #[arg(short = 'j', long, default_value_t = 4)]
    jobs: usize,
}

/// crane rebase: the old base's layers must be the image's first; they are
/// replaced by the new base's, the config's DiffIDs and history spliced the
/// same way. Blobs are mounted from the repositories they are in when the
/// target is in the same registry, else copied.
pub async fn run(ctx: &Ctx, a: Args) -> Result<()> {
    if ctx.global.platform.is_none() && ctx.manifest(&a.image).await?.is_index() {
        bail!(
            "{} is an index: rebase one of its images, chosen with --platform",
            a.image
        );
    }
    let image = ctx.image(&a.image).await?;
    let annotations = image.manifest.annotations().clone().unwrap_or_default();
    let annotated = annotations.get(BASE_NAME);
    // The old base as it was when recorded: pinned by its digest.
    let pinned = match (annotated, annotations.get(BASE_DIGEST)) {
        (Some(name), Some(d)) => Some(format!("{}@{d}", super::parse_ref(name)?.repo)),
        (name, _) => name.cloned(),
    };
    let pick = |given: &Option<String>, default: Option<&String>, flag: &str| match (given, default)
    {
        (Some(g), _) => Ok(g.clone()),
        (None, Some(n)) => Ok(n.clone()),
        (None, None) => bail!(
            "{}: --{flag} not given and the image has no {BASE_NAME} annotation",
            a.image
        ),
    };
    let old_name = pick(&a.old_base, pinned.as_ref(), "old-base")?;
    let new_name = pick(&a.new_base, annotated, "new-base")?;
    // Bases that are indexes give the image's platform.
    let cfg = image.config_file()?;
    let platform = match &ctx.global.platform {
        Some(p) => p.clone(),
        None => ggfs::Platform {
            os: cfg.os().to_string(),
            architecture: cfg.architecture().to_string(),
            variant: cfg.variant().clone(),
        },
    };
    let base = |name: String, what: &'static str| {
        let platform = &platform;
        async move {
            let (src, reference) = ctx.source(&name).await?;
            ggfs::image::fetch_image(src, &reference, Some(platform))
                .await
                .with_context(|| format!("{what} {name}"))
        }
    };
    let old = base(old_name.clone(), "old base").await?;
    let new = base(new_name.clone(), "new base").await?;
    let recorded = match Location::parse(&new_name)? {
        Location::Registry(r) => Some(r.to_string()),
        _ => None,
    };
    let rebased = ggfs::image::rebase::rebase(&image, &old, &new, recorded.as_deref())
        .with_context(|| format!("rebasing {} from {old_name} onto {new_name}", a.image))?;
    let target = a.tag.as_deref().unwrap_or(&a.image);
    let (sink, tag) = ctx.sink(target).await?;
    let opts = ctx.copy_options(a.jobs);
    rebased
        .push(sink, tag.as_deref(), &opts)
        .await
        .with_context(|| format!("pushing to {target}"))?;
    let digest = rebased.image.digest();
    match Location::parse(target)? {
        Location::Registry(r) => println!("{}@{digest}", r.repo),
        _ => println!("{digest}"),
    }
    Ok(())
}
