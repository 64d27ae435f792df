use anyhow::Result;
use ggfs::Repository;

use super::Ctx;

#[derive(clap::Args)]
pub struct Args {
    /// Repository, e.g. 127.0.0.1:5000/library/debian.
    repository: String,
    /// Print repo:tag instead of tag.
    #[arg(long)]
    full_ref: bool,
    /// Leave out tags that name digests (sha256-<hex>[.sig|.att|...]).
    #[arg(short = 'O', long)]
    omit_digest_tags: bool,
}

pub async fn run(ctx: &Ctx, a: Args) -> Result<()> {
    let repo = Repository::parse(&a.repository)?;
    for tag in ctx.client()?.repo(&repo).tags().await? {
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

fn is_digest_tag(tag: &str) -> bool {
    tag.strip_prefix("sha256-").is_some_and(|rest| {
        let hex = rest.split('.').next().unwrap_or("");
        hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit())
    })
}
