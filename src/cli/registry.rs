use std::path::PathBuf;

use anyhow::{Context as _, Result};
use clap::Subcommand;

#[derive(Subcommand)]
pub enum Command {
    /// Serve an OCI distribution registry (in memory, or on disk with --disk).
    Serve {
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:5000")]
        address: String,
        /// Keep blobs and manifests in this directory instead of memory.
        #[arg(long)]
        disk: Option<PathBuf>,
    },
}

pub async fn run(cmd: Command) -> Result<()> {
    let Command::Serve { address, disk } = cmd;
    let listener = tokio::net::TcpListener::bind(&address)
        .await
        .with_context(|| format!("listening on {address}"))?;
    let storage = match disk {
        Some(dir) => ggfs::server::Storage::Disk(dir),
        None => ggfs::server::Storage::Memory,
    };
    eprintln!("serving on {}", listener.local_addr()?);
    ggfs::server::serve(listener, storage).await?;
    Ok(())
}
