use std::io::Read;

use anyhow::{bail, Result};
use clap::Subcommand;

use super::Ctx;

#[derive(Subcommand)]
pub enum Command {
    /// Check credentials against a registry and store them in the docker config.
    Login {
        registry: String,
        #[arg(short, long)]
        username: String,
        #[arg(short, long, conflicts_with = "password_stdin")]
        password: Option<String>,
        /// Read the password from stdin.
        #[arg(long)]
        password_stdin: bool,
    },
    /// Remove stored credentials for a registry.
    Logout { registry: String },
    /// Print the credentials for a registry as a credential helper would (JSON).
    Get { registry: String },
}

pub async fn run(ctx: &Ctx, cmd: Command) -> Result<()> {
    match cmd {
        Command::Login {
            registry,
            username,
            password,
            password_stdin,
        } => {
            let password = match (password, password_stdin) {
                (Some(p), _) => {
                    eprintln!("ggfs: warning: a password given with -p is visible to other users in the process list; prefer --password-stdin");
                    p
                }
                (None, true) => {
                    let mut p = String::new();
                    std::io::stdin().read_to_string(&mut p)?;
                    p.trim_end_matches(['\n', '\r']).to_string()
                }
                (None, false) => bail!("give --password or --password-stdin"),
            };
            let registry = ggfs::reference::normalize_registry(&registry);
            let stored =
                ggfs::auth::login_with(&ctx.client()?, &registry, &username, &password).await?;
            eprintln!("logged in to {registry} (credentials stored in {stored})");
        }
        Command::Logout { registry } => {
            let registry = ggfs::reference::normalize_registry(&registry);
            if ggfs::auth::logout(&registry)? {
                eprintln!("logged out of {registry}");
            } else {
                eprintln!("not logged in to {registry}");
            }
        }
        Command::Get { registry } => {
            let registry = ggfs::reference::normalize_registry(&registry);
            println!("{}", serde_json::to_string(&ggfs::auth::get(&registry)?)?);
        }
    }
    Ok(())
}
