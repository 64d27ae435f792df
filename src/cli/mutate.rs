use std::collections::BTreeMap;

use anyhow::{bail, Result};
use ggfs::mutate::{self, ConfigEdits};

use super::Ctx;

#[derive(clap::Args)]
pub struct Args {
    /// The image to change.
    image: String,
    /// Where to push the result (default: back to IMAGE's tag).
    #[arg(short = 't', long = "tag")]
    tag: Option<String>,
    /// Set a label, KEY=VALUE (repeatable).
    #[arg(short = 'l', long = "label")]
    labels: Vec<String>,
    /// Set an environment variable, KEY=VALUE (repeatable).
    #[arg(short = 'e', long = "env")]
    env: Vec<String>,
    /// Set a manifest annotation, KEY=VALUE (repeatable).
    #[arg(short = 'a', long = "annotation")]
    annotations: Vec<String>,
    /// The entrypoint, comma-separated.
    #[arg(long)]
    entrypoint: Option<String>,
    /// The command, comma-separated.
    #[arg(long)]
    cmd: Option<String>,
    #[arg(short = 'w', long)]
    workdir: Option<String>,
    #[arg(short = 'u', long)]
    user: Option<String>,
}

/// crane mutate: edit the config (and annotations) and push the new image.
pub async fn run(ctx: &Ctx, a: Args) -> Result<()> {
    let mut image = ctx.image(&a.image).await?;
    let edits = ConfigEdits {
        env: pairs(&a.env)?.into_iter().collect(),
        entrypoint: a.entrypoint.as_deref().map(split_list),
        cmd: a.cmd.as_deref().map(split_list),
        labels: pairs(&a.labels)?,
        workdir: a.workdir.clone(),
        user: a.user.clone(),
    };
    image = mutate::config(&image, &edits)?;
    let annotations = pairs(&a.annotations)?;
    if !annotations.is_empty() {
        image = mutate::annotations(&image, &annotations)?;
    }
    let target = a.tag.as_deref().unwrap_or(&a.image);
    super::append::push(ctx, &image, target).await
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
