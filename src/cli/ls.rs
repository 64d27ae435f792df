use std::collections::BTreeSet;

use anyhow::{bail, Result};
use futures::{StreamExt, TryStreamExt};
use ggfs::registry::RegistryRepo;
use ggfs::Repository;
use serde_json::{json, Map, Value};

use super::Ctx;

#[derive(clap::Args)]
pub struct Args {
    /// Repository, e.g. 127.0.0.1:5000/library/debian; with -r a prefix
    /// (or a registry alone: every repository).
    repository: String,
    /// Print repo:tag instead of tag.
    #[arg(long)]
    full_ref: bool,
    /// Leave out tags that name digests (sha256-<hex>[.sig|.att|...]).
    #[arg(short = 'O', long)]
    omit_digest_tags: bool,
    /// gcrane's: every repository at or below REPOSITORY (from the
    /// catalog), each manifest as repo@digest followed by its repo:tag lines.
    #[arg(short = 'r', long)]
    recursive: bool,
    /// gcrane's: one JSON line per repository: name, tags, and `manifest`
    /// (digest → mediaType and tag list); with -r also `child`.
    #[arg(long)]
    json: bool,
}

pub async fn run(ctx: &Ctx, a: Args) -> Result<()> {
    if a.recursive {
        return recursive(ctx, &a).await;
    }
    let repo = Repository::parse(&a.repository)?;
    let r = ctx.client()?.repo(&repo);
    if a.json {
        let listing = listing(&r, &a).await?;
        println!("{}", listing.json(None));
        return Ok(());
    }
    for tag in r.tags().await? {
        if a.omit_digest_tags && is_digest_tag(&tag) {
            continue;
        }
        if a.full_ref {
            println!("{repo}:{tag}");
        } else {
            println!("{tag}");
        }
    }
    Ok(())
}

/// A repository's tags and the manifests they name, in tag order.
struct Listing {
    repo: Repository,
    tags: Vec<String>,
    /// (digest, media type, its tags), each digest once.
    manifests: Vec<(String, String, Vec<String>)>,
}

impl Listing {
    fn json(&self, children: Option<Vec<String>>) -> Value {
        let mut manifest = Map::new();
        for (digest, media_type, tags) in &self.manifests {
            manifest.insert(
                digest.clone(),
                json!({ "mediaType": media_type, "tag": tags }),
            );
        }
        let mut v = json!({
            "manifest": manifest,
            "name": self.repo.name,
            "tags": self.tags,
        });
        if let Some(c) = children {
            v["child"] = json!(c);
        }
        v
    }
}

async fn listing(r: &RegistryRepo, a: &Args) -> Result<Listing> {
    let tags: Vec<String> = r
        .tags()
        .await?
        .into_iter()
        .filter(|t| !(a.omit_digest_tags && is_digest_tag(t)))
        .collect();
    // HEADs, 8 at a time, answers kept in tag order.
    let heads: Vec<_> = futures::stream::iter(tags.iter())
        .map(|t| async move { r.head_manifest(t).await.map(|h| (t.clone(), h)) })
        .buffered(8)
        .try_collect()
        .await?;
    let mut manifests: Vec<(String, String, Vec<String>)> = Vec::new();
    for (tag, head) in heads {
        // A tag deleted since the listing has no manifest: left out.
        let Some((digest, media_type, _)) = head else {
            continue;
        };
        match manifests.iter_mut().find(|m| m.0 == digest.as_str()) {
            Some(m) => m.2.push(tag),
            None => manifests.push((digest.to_string(), media_type, vec![tag])),
        }
    }
    Ok(Listing {
        repo: r.repository().clone(),
        tags,
        manifests,
    })
}

/// The catalog's repositories at or below `prefix` (`HOST/REPO`, or a
/// registry alone: all of them), and the whole catalog.
pub(super) async fn repos_below(ctx: &Ctx, prefix: &str) -> Result<(Vec<Repository>, Vec<String>)> {
    let (registry, prefix) = parse_prefix(prefix)?;
    let catalog = ctx.client()?.catalog(&registry).await?;
    let below =
        |name: &str| prefix.is_empty() || name == prefix || name.starts_with(&format!("{prefix}/"));
    let repos = catalog
        .iter()
        .filter(|n| below(n))
        .map(|n| Repository::new(&registry, n))
        .collect::<ggfs::Result<Vec<_>>>()?;
    if repos.is_empty() {
        bail!("{registry}'s catalog lists no repository at or below {prefix:?}");
    }
    Ok((repos, catalog))
}

/// A prefix as (registry, repository name): `HOST/REPO`, or `HOST` alone
/// (an empty name: the whole registry).
pub(super) fn parse_prefix(prefix: &str) -> Result<(String, String)> {
    match Repository::parse(prefix) {
        Ok(r) => Ok((r.registry, r.name)),
        Err(_) if !prefix.contains('/') => {
            Ok((ggfs::reference::normalize_registry(prefix), String::new()))
        }
        Err(e) => Err(e.into()),
    }
}

/// gcrane ls -r: the catalog's repositories at or below the prefix.
async fn recursive(ctx: &Ctx, a: &Args) -> Result<()> {
    let (repos, catalog) = repos_below(ctx, &a.repository).await?;
    let client = ctx.client()?;
    for repo in repos {
        let listing = listing(&client.repo(&repo), a).await?;
        if a.json {
            println!("{}", listing.json(Some(children(&catalog, &repo.name))));
            continue;
        }
        for (digest, _, tags) in &listing.manifests {
            println!("{repo}@{digest}");
            for t in tags {
                println!("{repo}:{t}");
            }
        }
    }
    Ok(())
}

/// The next path components below `name` among the catalog's repositories.
fn children(catalog: &[String], name: &str) -> Vec<String> {
    let prefix = format!("{name}/");
    let set: BTreeSet<&str> = catalog
        .iter()
        .filter_map(|n| n.strip_prefix(&prefix))
        .map(|rest| rest.split('/').next().unwrap_or(rest))
        .collect();
    set.into_iter().map(str::to_string).collect()
}

fn is_digest_tag(tag: &str) -> bool {
    tag.strip_prefix("sha256-").is_some_and(|rest| {
        let hex = rest.split('.').next().unwrap_or("");
        hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit())
    })
}
