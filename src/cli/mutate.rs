use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::{bail, Context as _, Result};
use ggfs::image::mutate::{self, ConfigEdits};
use ggfs::image::newlayer::{LayerFormat, LayerOptions};
use ggfs::Platform;

use super::Ctx;

#[derive(clap::Args)]
pub struct Args {
    /// The image to change.
    image: String,
    /// Where to push the result (default: back to IMAGE's tag).
    #[arg(short = 't', long = "tag")]
    tag: Option<String>,
    /// Push the result by digest to this repository instead (HOST/REPO).
    #[arg(short = 'r', long = "repo", conflicts_with_all = ["tag", "output"])]
    repo: Option<String>,
    /// Write the result instead of pushing it: a docker-save tarball at
    /// PATH (`-`: stdout; tagged as -t or IMAGE), or an OCI layout with
    /// `oci:DIR[:TAG]`.
    #[arg(short = 'o', long = "output", value_name = "PATH")]
    output: Option<String>,
    /// Add a layer built from a directory or a tar (plain, gzip or zstd),
    /// gzip-compressed, as `ggfs append` builds one (repeatable, in order).
    #[arg(long = "append", value_name = "FILE|DIR")]
    append: Vec<PathBuf>,
    /// Set a label, KEY=VALUE (repeatable).
    #[arg(short = 'l', long = "label")]
    labels: Vec<String>,
    /// Set an environment variable, KEY=VALUE (repeatable).
    #[arg(short = 'e', long = "env")]
    env: Vec<String>,
    /// Set a manifest annotation, KEY=VALUE (repeatable).
    #[arg(short = 'a', long = "annotation")]
    annotations: Vec<String>,
    /// The entrypoint, comma-separated; drops the old command (as docker
    /// and crane do) unless `--cmd` gives a new one.
    #[arg(long)]
    entrypoint: Option<String>,
    /// The command, comma-separated.
    #[arg(long)]
    cmd: Option<String>,
    /// The working directory the image's processes start in.
    #[arg(short = 'w', long)]
    workdir: Option<String>,
    /// The user they run as: USER, UID, USER:GROUP or UID:GID.
    #[arg(short = 'u', long)]
    user: Option<String>,
    /// Ports to expose, PORT[/tcp|udp|sctp] (repeatable or comma-separated;
    /// default protocol tcp); those already exposed stay.
    #[arg(long = "exposed-ports", value_delimiter = ',', value_name = "PORT")]
    exposed_ports: Vec<String>,
    /// Set the config's platform, os/arch[/variant].
    #[arg(long = "set-platform", value_name = "PLATFORM")]
    set_platform: Option<String>,
}

/// crane mutate: edit the config (and annotations), optionally add layers,
/// and push (or write) the new image.
pub async fn run(ctx: &Ctx, a: Args) -> Result<()> {
    let edits = ConfigEdits {
        env: pairs(&a.env)?.into_iter().collect(),
        entrypoint: a.entrypoint.as_deref().map(split_list),
        cmd: a.cmd.as_deref().map(split_list),
        labels: pairs(&a.labels)?,
        workdir: a.workdir.clone(),
        user: a.user.clone(),
        exposed_ports: a
            .exposed_ports
            .iter()
            .map(|p| port(p))
            .collect::<Result<_>>()?,
    };
    let platform = match &a.set_platform {
        Some(p) if p.contains(':') => bail!("--set-platform {p:?}: want os/arch[/variant]"),
        Some(p) => Some(p.parse::<Platform>()?),
        None => None,
    };
    let annotations = pairs(&a.annotations)?;
    let mut image = ctx.image(&a.image).await?;
    if !a.append.is_empty() {
        let gzip = LayerOptions::new(LayerFormat::Gzip);
        let layers = super::append::build_layers(a.append.clone(), gzip, "--append").await?;
        image = mutate::append_with_history(&image, layers, "ggfs mutate --append", None)?;
    }
    image = mutate::config(&image, &edits)?;
    if !annotations.is_empty() {
        image = mutate::annotations(&image, &annotations)?;
    }
    if let Some(p) = &platform {
        image = mutate::set_platform(&image, p)?;
    }
    let target = a.tag.as_deref().unwrap_or(&a.image);
    match (&a.output, &a.repo) {
        (Some(out), _) if out.starts_with("oci:") => super::append::push(ctx, &image, out).await,
        (Some(out), _) => write_tarball(&image, out, target).await,
        (None, Some(repo)) => {
            let repo = ggfs::reference::Repository::parse(repo)?;
            let by_digest = format!("{repo}@{}", image.digest());
            super::append::push(ctx, &image, &by_digest).await
        }
        (None, None) => super::append::push(ctx, &image, target).await,
    }
}

/// The image as a docker-save tarball, tagged `tag` when that is a tagged
/// registry reference; prints the image's digest.
async fn write_tarball(image: &ggfs::image::Image, out: &str, tag: &str) -> Result<()> {
    let path = out
        .strip_prefix("docker-archive:")
        .or_else(|| out.strip_prefix("tarball:"))
        .unwrap_or(out);
    let tags: Vec<String> = match super::parse_ref(tag) {
        Ok(r) if r.tag.is_some() && r.digest.is_none() => vec![r.to_string()],
        _ => Vec::new(),
    };
    let dest = match path {
        "-" => ggfs::image::tarball::Dest::Stdout,
        p => ggfs::image::tarball::Dest::Path(p.into()),
    };
    ggfs::image::tarball::write_to(image, dest, &tags)
        .await
        .with_context(|| format!("writing {path}"))?;
    if path != "-" {
        println!("{}", image.digest());
    }
    Ok(())
}

/// `PORT[/PROTO]` as a config's `ExposedPorts` key (`8080` → `8080/tcp`).
fn port(p: &str) -> Result<String> {
    let (num, proto) = p.split_once('/').unwrap_or((p, "tcp"));
    let bad = || anyhow::anyhow!("--exposed-ports {p:?}: want PORT[/tcp|udp|sctp], PORT 1-65535");
    if !num.parse::<u16>().is_ok_and(|n| n > 0) {
        return Err(bad());
    }
    if !matches!(proto, "tcp" | "udp" | "sctp") {
        return Err(bad());
    }
    Ok(format!("{num}/{proto}"))
}

fn pairs(items: &[String]) -> Result<BTreeMap<String, String>> {
    items
        .iter()
        .map(|p| match p.split_once('=') {
            Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
            _ => bail!("{p:?}: want KEY=VALUE"),
        })
        .collect()
}

fn split_list(s: &str) -> Vec<String> {
    s.split(',').map(str::to_string).collect()
}
