use anyhow::Result;

use super::Ctx;

#[derive(clap::Args)]
pub struct Args {
    /// Registry host, e.g. 127.0.0.1:5000.
    registry: String,
    /// Print host/repo instead of repo.
    #[arg(long)]
    full_ref: bool,
}

pub async fn run(ctx: &Ctx, a: Args) -> Result<()> {
    let registry = ggfs::reference::normalize_registry(&a.registry);
    for repo in ctx.client()?.catalog(&registry).await? {
        if a.full_ref {
            println!("{registry}/{repo}");
        } else {
            println!("{repo}");
        }
    }
    Ok(())
}
