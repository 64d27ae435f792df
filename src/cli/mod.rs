//! Command-line verbs, crane-compatible in names and flags. Each verb lives in
//! its own file with an `Args` struct and a `run` function.

use std::sync::{Arc, OnceLock};

use anyhow::{Context as _, Result};
use clap::{Args, Parser, Subcommand};
use ggfs::image::manifest::RawManifest;
use ggfs::image::{fetch_image, Image, Sink, Source};
use ggfs::registry::{Client, ClientOptions, RegistryRepo};
use ggfs::{Platform, Reference};

mod append;
mod attach;
mod auth;
mod blob;
mod catalog;
mod commit;
mod config;
mod copy;
mod delete;
mod digest;
mod edit;
mod export;
mod flatten;
mod gc;
mod index;
mod location;
mod ls;
mod manifest;
mod mount;
mod mutate;
mod optimize;
mod progress;
mod pull;
mod push;
mod rebase;
mod refs;
mod registry;
mod rewrite;
mod tag;
mod validate;
mod version;

pub use location::Location;
pub use mount::unmount_help;

#[derive(Parser)]
#[command(
    name = "ggfs",
    version,
    about = "Container registries as a filesystem, and a crane-style CLI"
)]
pub struct Cli {
    #[command(flatten)]
    pub global: Global,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Args, Clone)]
pub struct Global {
    /// Pick this platform out of an index (os/arch[/variant]); default: the host's,
    /// and for copy: every platform. `index filter` takes several.
    #[arg(long = "platform", global = true, value_name = "PLATFORM")]
    pub platforms: Vec<String>,
    /// The one --platform, parsed (see [`Global::resolve`]).
    #[arg(skip)]
    pub platform: Option<Platform>,
    /// Talk plain HTTP to registries, not only to localhost.
    #[arg(long, global = true)]
    pub insecure: bool,
    /// Also trust the root certificates in this PEM file (repeatable), for
    /// registries and their token realms.
    #[arg(long = "ca-file", global = true, value_name = "PEM")]
    pub ca_files: Vec<std::path::PathBuf>,
    /// Accept any TLS certificate, unverified (test set-ups only: a man in
    /// the middle goes unnoticed).
    #[arg(long, global = true)]
    pub insecure_skip_tls_verify: bool,
    /// A Kubernetes `kubernetes.io/dockerconfigjson` Secret (JSON or YAML,
    /// as `kubectl get secret -o yaml` prints it) whose credentials come
    /// before the docker config's (repeatable).
    #[arg(long = "pull-secret", global = true, value_name = "FILE")]
    pub pull_secrets: Vec<std::path::PathBuf>,
    /// Seconds a registry request may go without a byte (no answer, or a
    /// download that stopped moving) before it fails.
    #[arg(long, global = true, default_value_t = 30)]
    pub timeout: u64,
    /// Blobs up to this many bytes are uploaded in one PUT, larger ones in
    /// PATCH chunks of this size (an interrupted one is resumed by a rerun).
    #[arg(long, global = true, value_name = "BYTES", default_value_t = ggfs::registry::DEFAULT_CHUNK_SIZE)]
    pub upload_chunk_size: usize,
    /// Log HTTP traffic and decisions to stderr (credentials are never logged).
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
}

#[derive(Subcommand)]
pub enum Command {
    /// List the repositories of a registry.
    Catalog(catalog::Args),
    /// List the tags of a repository.
    Ls(ls::Args),
    /// Print an image's manifest, byte for byte as the registry serves it.
    Manifest(manifest::Args),
    /// Print an image's config blob.
    Config(config::Args),
    /// Print an image's digest.
    Digest(digest::Args),
    /// Write a blob (repo@sha256:...) to stdout.
    Blob(blob::Args),
    /// Pull images into a docker-save tarball or an OCI layout.
    Pull(pull::Args),
    /// Push a tarball or OCI layout to a registry.
    Push(push::Args),
    /// Copy images between registries, layouts and tarballs.
    #[command(visible_alias = "cp")]
    Copy(copy::Args),
    /// List the manifests of a repository that no tag reaches (gcrane gc).
    Gc(gc::Args),
    /// Give an image another tag in the same repository.
    Tag(tag::Args),
    /// Delete a manifest from a registry.
    Delete(delete::Args),
    /// Build a new image: a base (or nothing) plus layers from directories or tars.
    Append(append::Args),
    /// Change an image's config (labels, env, entrypoint, ...) and push the result.
    Mutate(Box<mutate::Args>),
    /// Edit an image's config or manifest (in $EDITOR, or from stdin) and push it.
    #[command(subcommand)]
    Edit(edit::Command),
    /// Attach an artifact (signature, SBOM, ...) to an image as a referrer.
    Attach(attach::Args),
    /// List the artifacts that refer to an image.
    Refs(refs::Args),
    /// Image indexes (`index list|filter|append`, as crane's), and
    /// `index push`: publish where each file of an image's plain layers
    /// sits, as a referrer, so mounts read them by Range from the start.
    #[command(subcommand)]
    Index(index::Command),
    /// Write the flattened filesystem of an image as a tar.
    Export(export::Args),
    /// Flatten an image's layers into a single layer.
    Flatten(flatten::Args),
    /// Rebase an image onto a new base image.
    Rebase(rebase::Args),
    /// Convert every layer of an image to eStargz or zstd:chunked (lazily readable).
    Optimize(optimize::Args),
    /// Check that every blob of an image matches its digest (and layers their DiffIDs).
    Validate(validate::Args),
    /// Log in to, log out of, or show credentials for a registry.
    #[command(subcommand)]
    Auth(auth::Command),
    /// Run the embedded OCI registry.
    #[command(subcommand)]
    Registry(registry::Command),
    /// Mount a registry as a filesystem.
    Mount(mount::MountArgs),
    /// Unmount a ggfs mount.
    Unmount(mount::UnmountArgs),
    /// Commit the changes made under an image's rootfs/ in a mount as a new image.
    Commit(commit::CommitArgs),
    /// List a mount's changed images and their commits.
    Status(commit::StatusArgs),
    /// Print the version.
    Version,
}

pub async fn run(cli: Cli) -> Result<()> {
    let several = matches!(cli.command, Command::Index(index::Command::Filter(_)));
    let ctx = Ctx::new(cli.global.resolve(several)?);
    match cli.command {
        Command::Catalog(a) => catalog::run(&ctx, a).await,
        Command::Ls(a) => ls::run(&ctx, a).await,
        Command::Manifest(a) => manifest::run(&ctx, a).await,
        Command::Config(a) => config::run(&ctx, a).await,
        Command::Digest(a) => digest::run(&ctx, a).await,
        Command::Blob(a) => blob::run(&ctx, a).await,
        Command::Pull(a) => pull::run(&ctx, a).await,
        Command::Push(a) => push::run(&ctx, a).await,
        Command::Copy(a) => copy::run(&ctx, a).await,
        Command::Tag(a) => tag::run(&ctx, a).await,
        Command::Gc(a) => gc::run(&ctx, a).await,
        Command::Delete(a) => delete::run(&ctx, a).await,
        Command::Append(a) => append::run(&ctx, a).await,
        Command::Mutate(a) => mutate::run(&ctx, *a).await,
        Command::Edit(c) => edit::run(&ctx, c).await,
        Command::Attach(a) => attach::run(&ctx, a).await,
        Command::Refs(a) => refs::run(&ctx, a).await,
        Command::Index(c) => index::run(&ctx, c).await,
        Command::Export(a) => export::run(&ctx, a).await,
        Command::Flatten(a) => flatten::run(&ctx, a).await,
        Command::Rebase(a) => rebase::run(&ctx, a).await,
        Command::Optimize(a) => optimize::run(&ctx, a).await,
        Command::Validate(a) => validate::run(&ctx, a).await,
        Command::Auth(c) => auth::run(&ctx, c).await,
        Command::Registry(c) => registry::run(c).await,
        Command::Mount(a) => mount::mount(a, &ctx.global),
        Command::Unmount(a) => mount::unmount(a),
        Command::Commit(a) => tokio::task::block_in_place(|| commit::commit(a)),
        Command::Status(a) => commit::status(a),
        Command::Version => version::run(),
    }
}

pub fn init_logging(verbose: u8) {
    let level = match verbose {
        0 => "warn",
        1 => "info,ggfs=debug",
        _ => "debug",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("GGFS_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    use std::io::IsTerminal;
    // Colour only for a person at a terminal, not in a file or a pipe.
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .init();
}

impl Global {
    /// Parse the --platform given once into `platform`; several are an error
    /// unless the verb takes several (`several`: it reads `platforms`).
    fn resolve(mut self, several: bool) -> Result<Self> {
        match self.platforms.as_slice() {
            [] => {}
            [one] if !several => self.platform = Some(one.parse()?),
            [..] if several => {}
            _ => anyhow::bail!(
                "--platform given {} times: this verb takes one",
                self.platforms.len()
            ),
        }
        Ok(self)
    }
}

/// What every verb needs: global flags and one registry client.
pub struct Ctx {
    pub global: Global,
    client: OnceLock<Client>,
}

impl Ctx {
    fn new(global: Global) -> Self {
        Self {
            global,
            client: OnceLock::new(),
        }
    }

    pub fn client(&self) -> Result<Client> {
        if let Some(c) = self.client.get() {
            return Ok(c.clone());
        }
        let opts = ClientOptions {
            insecure_all: self.global.insecure,
            stall_timeout: std::time::Duration::from_secs(self.global.timeout.max(1)),
            ca_files: self.global.ca_files.clone(),
            insecure_skip_tls_verify: self.global.insecure_skip_tls_verify,
            ..ClientOptions::default()
        };
        if self.global.insecure_skip_tls_verify {
            eprintln!(
                "ggfs: warning: --insecure-skip-tls-verify: TLS certificates are not verified"
            );
        }
        let mut keychain = ggfs::registry::auth::Keychain::from_env();
        for file in &self.global.pull_secrets {
            keychain
                .pull_secrets
                .extend(ggfs::registry::auth::pull_secret::read(file)?);
        }
        // Chunked uploads broken off (registry gone, Ctrl-C) are recorded
        // there, so rerunning the command goes on from what the registry holds.
        let client = Client::builder(opts)
            .keychain(keychain)
            .chunk_size(self.global.upload_chunk_size)
            .resume_uploads(ggfs::registry::default_upload_dir())
            .build()
            .context("creating the registry client")?;
        Ok(self.client.get_or_init(|| client).clone())
    }

    pub fn repo(&self, reference: &Reference) -> Result<RegistryRepo> {
        Ok(self.client()?.repo(&reference.repo))
    }

    /// Open a location (registry reference, `oci:DIR[:TAG]`, `docker-archive:FILE`)
    /// as a source, with the tag or digest to read from it.
    pub async fn source(&self, location: &str) -> Result<(Arc<dyn Source>, String)> {
        Location::parse(location)?.open_source(self).await
    }

    /// The image at a location; from an index, the --platform one (default:
    /// the host's).
    pub async fn image(&self, location: &str) -> Result<Image> {
        let (src, reference) = self.source(location).await?;
        Ok(fetch_image(src, &reference, self.global.platform.as_ref()).await?)
    }

    /// The manifest at a location as served, or with --platform on an index
    /// the chosen child's.
    pub async fn manifest(&self, location: &str) -> Result<RawManifest> {
        let (src, reference) = self.source(location).await?;
        let platform = self.global.platform.as_ref();
        Ok(ggfs::image::copy::manifest_for(src.as_ref(), &reference, platform).await?)
    }

    /// Copy options from the global flags, `jobs` blobs at a time, with
    /// progress on a terminal.
    pub fn copy_options(&self, jobs: usize) -> ggfs::image::copy::CopyOptions {
        ggfs::image::copy::CopyOptions {
            platform: self.global.platform.clone(),
            jobs,
            progress: progress::reporter(),
        }
    }

    /// Open a location as a sink, with the tag to write (if any).
    pub async fn sink(&self, location: &str) -> Result<(Arc<dyn Sink>, Option<String>)> {
        Location::parse(location)?.open_sink(self).await
    }
}

/// Parse a registry reference with the argument named in the error.
pub fn parse_ref(s: &str) -> Result<Reference> {
    Reference::parse(s).map_err(Into::into)
}
