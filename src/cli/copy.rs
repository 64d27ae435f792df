use std::sync::Arc;

use anyhow::{bail, Context as _, Result};
use ggfs::copy::CopyOptions;
use ggfs::image::Source;

use futures::{StreamExt, TryStreamExt};
use ggfs::registry::RegistryRepo;
use ggfs::Repository;

use super::{Ctx, Location};

#[derive(clap::Args)]
pub struct Args {
    /// Source: registry reference, `oci:DIR[:TAG]` or `docker-archive:FILE`.
    src: String,
    /// Destination: registry reference or `oci:DIR[:TAG]`.
    dst: String,
    /// Copy every tag of the source repository (registry to registry).
    #[arg(short = 'a', long)]
    all_tags: bool,
    /// Do not overwrite a tag that already exists at the destination.
    #[arg(short = 'n', long)]
    no_clobber: bool,
    /// gcrane's: copy every repository of SRC's registry catalog at or
    /// below SRC (`HOST/PREFIX`, or `HOST` for all) to the same path below
    /// DST, every tag, skipping tags DST already has at the same digest.
    #[arg(short = 'r', long, conflicts_with_all = ["all_tags", "no_clobber"])]
    recursive: bool,
    /// Blobs transferred at once (with -r: images copied at once).
    #[arg(short = 'j', long, default_value_t = 4)]
    jobs: usize,
}

pub async fn run(ctx: &Ctx, a: Args) -> Result<()> {
    let opts = ctx.copy_options(a.jobs);
    if a.recursive {
        return recursive(ctx, &a, &opts).await;
    }
    if a.all_tags {
        return copy_all_tags(ctx, &a, &opts).await;
    }
    let (src, reference) = ctx.source(&a.src).await?;
    let (dst, tag) = ctx.sink(&a.dst).await?;
    if a.no_clobber && tag_exists(ctx, &a.dst).await? {
        eprintln!("{} exists, not overwritten (--no-clobber)", a.dst);
        return Ok(());
    }
    let report = ggfs::copy::copy(src, &reference, dst, tag.as_deref(), &opts)
        .await
        .with_context(|| format!("copying {} to {}", a.src, a.dst))?;
    tracing::info!(?report, "copied");
    Ok(())
}

async fn copy_all_tags(ctx: &Ctx, a: &Args, opts: &CopyOptions) -> Result<()> {
    let (Location::Registry(src), Location::Registry(dst)) =
        (Location::parse(&a.src)?, Location::parse(&a.dst)?)
    else {
        bail!("--all-tags copies between registry repositories");
    };
    let src_repo = Arc::new(ctx.repo(&src)?);
    let dst_repo = Arc::new(ctx.repo(&dst)?);
    for tag in src_repo.tags().await? {
        if a.no_clobber && dst_repo.head_manifest(&tag).await?.is_some() {
            continue;
        }
        let src: Arc<dyn Source> = src_repo.clone();
        ggfs::copy::copy(src, &tag, dst_repo.clone(), Some(&tag), opts)
            .await
            .with_context(|| format!("copying {}:{tag}", src_repo.repository()))?;
    }
    Ok(())
}

async fn tag_exists(ctx: &Ctx, dst: &str) -> Result<bool> {
    match Location::parse(dst)? {
        Location::Registry(r) => Ok(ctx
            .repo(&r)?
            .head_manifest(&r.identifier())
            .await?
            .is_some()),
        Location::Layout { tag: Some(t), dir } => match ggfs::layout::Layout::open(&dir) {
            Ok(l) => Ok(l.manifest(&t).await.is_ok()),
            Err(_) => Ok(false),
        },
        _ => Ok(false),
    }
}

/// One image to copy: a source digest and the tags the destination lacks.
struct Task {
    src: Arc<RegistryRepo>,
    dst: Arc<RegistryRepo>,
    tags: Vec<String>,
}

/// gcrane cp -r: every repository at or below the source prefix, every tag,
/// `-j` images at a time; a tag already at the same digest is skipped.
async fn recursive(ctx: &Ctx, a: &Args, opts: &CopyOptions) -> Result<()> {
    if opts.platform.is_some() {
        bail!("copy -r copies whole images: --platform is not taken");
    }
    let (src_registry, src_prefix) = super::ls::parse_prefix(&a.src)?;
    let (dst_registry, dst_prefix) = super::ls::parse_prefix(&a.dst)?;
    let (repos, _) = super::ls::repos_below(ctx, &a.src).await?;
    let client = ctx.client()?;
    let mut tasks = Vec::new();
    let mut skipped = 0usize;
    for repo in &repos {
        let rest = repo
            .name
            .strip_prefix(&src_prefix)
            .unwrap_or(&repo.name)
            .trim_start_matches('/');
        let name = match (dst_prefix.as_str(), rest) {
            ("", "") => bail!(
                "{repo} would be copied to {dst_registry} with no name: give DST as HOST/REPO"
            ),
            ("", rest) => rest.to_string(),
            (prefix, "") => prefix.to_string(),
            (prefix, rest) => format!("{prefix}/{rest}"),
        };
        let target = Repository::new(&dst_registry, &name)
            .with_context(|| format!("naming the copy of {repo}"))?;
        let src = Arc::new(client.repo(repo));
        let dst = Arc::new(client.repo(&target));
        // digest → tags missing at the destination, in tag order.
        let mut need: Vec<(ggfs::Digest, Vec<String>)> = Vec::new();
        let tags = src.tags().await?;
        let heads: Vec<_> = futures::stream::iter(tags)
            .map(|t| {
                let (src, dst) = (src.clone(), dst.clone());
                async move {
                    let have = dst.head_manifest(&t).await?;
                    let want = src.head_manifest(&t).await?;
                    Ok::<_, ggfs::Error>((t, want, have))
                }
            })
            .buffered(8)
            .try_collect()
            .await?;
        for (tag, want, have) in heads {
            // A tag deleted since the listing: nothing to copy.
            let Some((want, _, _)) = want else { continue };
            if have.is_some_and(|(have, _, _)| have == want) {
                skipped += 1;
                continue;
            }
            match need.iter_mut().find(|(d, _)| *d == want) {
                Some((_, t)) => t.push(tag),
                None => need.push((want, vec![tag])),
            }
        }
        for (_, tags) in need {
            tasks.push(Task {
                src: src.clone(),
                dst: dst.clone(),
                tags,
            });
        }
    }
    let images = tasks.len();
    let tagged: usize = futures::stream::iter(tasks)
        .map(|t| copy_image(t, opts))
        .buffer_unordered(a.jobs.max(1))
        .try_fold(0, |n, tags| async move { Ok(n + tags) })
        .await?;
    let from = if src_prefix.is_empty() {
        src_registry
    } else {
        format!("{src_registry}/{src_prefix}")
    };
    eprintln!(
        "{}: {} repositories, copied {images} images ({tagged} tags), skipped {skipped} tags already at the destination",
        from,
        repos.len()
    );
    Ok(())
}

/// Copy one image under its first tag, then put the same manifest under
/// the others; the number of tags written.
async fn copy_image(t: Task, opts: &CopyOptions) -> Result<usize> {
    let (first, rest) = t.tags.split_first().expect("a task has a tag");
    let src: Arc<dyn Source> = t.src.clone();
    let report = ggfs::copy::copy(src, first, t.dst.clone(), Some(first), opts)
        .await
        .with_context(|| {
            format!(
                "copying {}:{first} to {}:{first}",
                t.src.repository(),
                t.dst.repository()
            )
        })?;
    eprintln!(
        "{}:{first} -> {}:{first}",
        t.src.repository(),
        t.dst.repository()
    );
    if !rest.is_empty() {
        let digest = report.digest.context("the copy reported no digest")?;
        let manifest = t.src.get_manifest(digest.as_str()).await?;
        for tag in rest {
            t.dst
                .push_manifest(&manifest, Some(tag))
                .await
                .with_context(|| format!("tagging {}:{tag}", t.dst.repository()))?;
            eprintln!(
                "{}:{tag} -> {}:{tag}",
                t.src.repository(),
                t.dst.repository()
            );
        }
    }
    Ok(t.tags.len())
}
