//! gcrane gc: the manifests of a repository no tag reaches.

use std::collections::BTreeSet;

use anyhow::{bail, Context as _, Result};
use ggfs::image::manifest::media;
use ggfs::registry::RegistryRepo;
use ggfs::{Digest, Repository};

use super::Ctx;

#[derive(clap::Args)]
pub struct Args {
    /// The repository (with -r: a prefix, or a registry alone).
    repository: String,
    /// Every repository at or below REPOSITORY, from the catalog.
    #[arg(short = 'r', long)]
    recursive: bool,
}

/// Prints `repo@digest` for every manifest that neither a tag names nor a
/// tagged index (or an index within one) lists, as gcrane gc prints the
/// untagged ones. The registry must list every manifest of a repository
/// (tags/list's `manifest` map: GCR, Artifact Registry, `ggfs registry
/// serve`); distribution lists only tags, and is refused.
pub async fn run(ctx: &Ctx, a: Args) -> Result<()> {
    let repos = if a.recursive {
        super::ls::repos_below(ctx, &a.repository).await?.0
    } else {
        vec![Repository::parse(&a.repository)?]
    };
    let client = ctx.client()?;
    for repo in repos {
        for digest in unreachable(&client.repo(&repo)).await? {
            println!("{repo}@{digest}");
        }
    }
    Ok(())
}

async fn unreachable(r: &RegistryRepo) -> Result<Vec<Digest>> {
    let repo = r.repository();
    let Some(all) = r.manifest_map().await? else {
        bail!(
            "{} lists only the tags of {repo}, not its manifests (tags/list has no `manifest` map, as GCR's and `ggfs registry serve`'s have): the untagged ones cannot be found",
            repo.registry
        );
    };
    let mut reached: BTreeSet<Digest> = BTreeSet::new();
    let mut todo: Vec<Digest> = all
        .iter()
        .filter(|(_, (_, tags))| !tags.is_empty())
        .map(|(d, _)| d.clone())
        .collect();
    while let Some(d) = todo.pop() {
        if !reached.insert(d.clone()) {
            continue;
        }
        let is_index = all.get(&d).is_some_and(|(mt, _)| media::is_index(mt));
        if !is_index {
            continue;
        }
        let index = r
            .get_manifest(d.as_str())
            .await
            .with_context(|| format!("reading index {repo}@{d}"))?;
        for child in index.index()?.manifests() {
            todo.push(ggfs::image::manifest::digest_of(child)?);
        }
    }
    Ok(all.into_keys().filter(|d| !reached.contains(d)).collect())
}
