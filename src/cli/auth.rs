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
    /// Print a bearer token for REPO from its registry's token server, as
    /// crane does: `{"token":…,"refresh_token":…,"expires_in":…}`, or with
    /// -H an `Authorization: Bearer …` header (for `curl -H "$(…)"`).
    Token {
        /// The repository the token is for (HOST/REPO).
        repo: String,
        /// Ask for pull and push, not only pull.
        #[arg(long)]
        push: bool,
        /// Also pull access to this repository, to mount blobs from it (repeatable).
        #[arg(short = 'm', long = "mount", value_delimiter = ',')]
        mounts: Vec<String>,
        /// Print an `Authorization: Bearer TOKEN` header instead of JSON.
        #[arg(short = 'H', long)]
        header: bool,
    },
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
                ggfs::registry::auth::login_with(&ctx.client()?, &registry, &username, &password)
                    .await?;
            eprintln!("logged in to {registry} (credentials stored in {stored})");
        }
        Command::Logout { registry } => {
            let registry = ggfs::reference::normalize_registry(&registry);
            if ggfs::registry::auth::logout(&registry)? {
                eprintln!("logged out of {registry}");
            } else {
                eprintln!("not logged in to {registry}");
            }
        }
        Command::Token {
            repo,
            push,
            mounts,
            header,
        } => token(ctx, &repo, push, &mounts, header).await?,
        Command::Get { registry } => {
            let registry = ggfs::reference::normalize_registry(&registry);
            println!(
                "{}",
                serde_json::to_string(&ggfs::registry::auth::get(&registry)?)?
            );
        }
    }
    Ok(())
}

/// crane auth token: the token server's answer for REPO's scopes.
async fn token(ctx: &Ctx, repo: &str, push: bool, mounts: &[String], header: bool) -> Result<()> {
    let repo = ggfs::reference::Repository::parse(repo)?;
    let actions = if push { "pull,push" } else { "pull" };
    let mut scopes = vec![format!("repository:{}:{actions}", repo.name)];
    for m in mounts {
        let m = ggfs::reference::Repository::parse(m)?;
        if m.registry != repo.registry {
            bail!(
                "--mount {m}: not on {}, the registry of the token",
                repo.registry
            );
        }
        scopes.push(format!("repository:{}:pull", m.name));
    }
    let t = ctx
        .client()?
        .token(&repo.registry, &repo.name, &scopes)
        .await?;
    if header {
        print!("Authorization: Bearer {}", t.token);
        return Ok(());
    }
    // crane's fields, in crane's order.
    #[derive(serde::Serialize)]
    struct Answer {
        token: String,
        refresh_token: String,
        expires_in: u64,
    }
    let answer = Answer {
        token: t.token,
        refresh_token: t.refresh_token.unwrap_or_default(),
        expires_in: t.expires_in.unwrap_or(0),
    };
    println!("{}", serde_json::to_string(&answer)?);
    Ok(())
}
