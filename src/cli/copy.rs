use std::sync::Arc;

use anyhow::{bail, Context as _, Result};
use futures::{StreamExt, TryStreamExt};
use ggfs::image::copy::CopyOptions;
use ggfs::image::Source;
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
    let report = ggfs::image::copy::copy(src, &reference, dst, tag.as_deref(), &opts)
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
        ggfs::image::copy::copy(src, &tag, dst_repo.clone(), Some(&tag), opts)
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
        Location::Layout { tag: Some(t), dir } => match ggfs::image::layout::Layout::open(&dir) {
            Ok(l) => Ok(l.manifest(&t).await.is_ok()),
            Err(_) => Ok(false),
        },
        _ => Ok(false),
    }
}

/// One image to copy: a source digest and the tags the destination lacks
/// (none: an untagged manifest, copied by digest).
struct Task {
    src: Arc<RegistryRepo>,
    dst: Arc<RegistryRepo>,
    digest: ggfs::Digest,
    tags: Vec<String>,
}

/// gcrane cp -r: every repository at or below the source prefix, every tag,
/// `-j` images at a time; a tag already at the same digest is skipped.
/// Where the source lists every manifest (tags/list's `manifest` map), the
/// untagged ones the destination lacks are copied too, by digest.
async fn recursive(ctx: &Ctx, a: &Args, opts: &CopyOptions) -> Result<()> {
    if opts.platform.is_some() {
        bail!("copy -r copies whole images: --platform is not taken");
    }
    let (src_registry, src_prefix) = super::ls::parse_prefix(&a.src)?;
    let (dst_registry, dst_prefix) = super::ls::parse_prefix(&a.dst)?;
    let (repos, _) = super::ls::repos_below(ctx, &a.src).await?;
    let client = ctx.client()?;
    let mut tasks = Vec::new();
    let mut untagged = Vec::new();
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
        // digest → tags missing at the destination, in tag order.
        let mut need: Vec<Task> = Vec::new();
        for (tag, want, have) in heads {
            // A tag deleted since the listing: nothing to copy.
            let Some((want, _, _)) = want else { continue };
            if have.is_some_and(|(have, _, _)| have == want) {
                skipped += 1;
                continue;
            }
            match need.iter_mut().find(|t| t.digest == want) {
                Some(t) => t.tags.push(tag),
                None => need.push(Task {
                    src: src.clone(),
                    dst: dst.clone(),
                    digest: want,
                    tags: vec![tag],
                }),
            }
        }
        tasks.extend(need);
        if let Some(map) = src.manifest_map().await? {
            for (digest, (_, tags)) in map {
                if tags.is_empty() {
                    untagged.push(Task {
                        src: src.clone(),
                        dst: dst.clone(),
                        digest,
                        tags: Vec::new(),
                    });
                }
            }
        }
    }
    let images = tasks.len();
    let tagged = copy_all(tasks, a.jobs, opts).await?;
    // After the tagged ones, whose indexes may have brought some along.
    let mut missing = Vec::new();
    for t in untagged {
        if t.dst.head_manifest(t.digest.as_str()).await?.is_none() {
            missing.push(t);
        }
    }
    let by_digest = missing.len();
    copy_all(missing, a.jobs, opts).await?;
    let from = if src_prefix.is_empty() {
        src_registry
    } else {
        format!("{src_registry}/{src_prefix}")
    };
    eprintln!(
        "{from}: {} repositories, copied {images} images ({tagged} tags) and {by_digest} untagged, \
         skipped {skipped} tags already at the destination",
        repos.len()
    );
    Ok(())
}

/// Copy `tasks`, `jobs` at a time; the number of tags written.
async fn copy_all(tasks: Vec<Task>, jobs: usize, opts: &CopyOptions) -> Result<usize> {
    futures::stream::iter(tasks)
        .map(|t| copy_image(t, opts))
        .buffer_unordered(jobs.max(1))
        .try_fold(0, |n, tags| async move { Ok(n + tags) })
        .await
}

/// Copy one image under its first tag (or by digest when it has none), then
/// put the same manifest under the others; the number of tags written.
async fn copy_image(t: Task, opts: &CopyOptions) -> Result<usize> {
    let (src_name, dst_name) = (t.src.repository(), t.dst.repository());
    // By digest, what the listing saw, even if the tag moves meanwhile.
    let first = t.tags.first().map(String::as_str);
    let (reference, sep) = match first {
        Some(tag) => (tag, ':'),
        None => (t.digest.as_str(), '@'),
    };
    let src: Arc<dyn Source> = t.src.clone();
    ggfs::image::copy::copy(src, t.digest.as_str(), t.dst.clone(), first, opts)
        .await
        .with_context(|| {
            format!("copying {src_name}{sep}{reference} to {dst_name}{sep}{reference}")
        })?;
    eprintln!("{src_name}{sep}{reference} -> {dst_name}{sep}{reference}");
    if t.tags.len() > 1 {
        let manifest = t.src.get_manifest(t.digest.as_str()).await?;
        for tag in &t.tags[1..] {
            t.dst
                .push_manifest(&manifest, Some(tag))
                .await
                .with_context(|| format!("tagging {dst_name}:{tag}"))?;
            eprintln!("{src_name}:{tag} -> {dst_name}:{tag}");
        }
    }
    Ok(t.tags.len())
}
