//! Where images live, as the CLI names them: a registry reference
//! (`[docker://]host/repo:tag`), an OCI layout (`oci:DIR[:TAG]`) or a
//! docker-save tarball (`docker-archive:FILE`, or a path ending in `.tar`).

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Result};
use ggfs::image::{Sink, Source};
use ggfs::Reference;

use super::Ctx;

pub enum Location {
    Registry(Reference),
    Layout { dir: PathBuf, tag: Option<String> },
    Tarball(PathBuf),
}

impl Location {
    pub fn parse(s: &str) -> Result<Self> {
        if let Some(rest) = s.strip_prefix("oci:") {
            // The tag follows the last ':' unless that is part of the path.
            let (dir, tag) = match rest.rsplit_once(':') {
                Some((d, t)) if !t.contains('/') && !d.is_empty() => (d, Some(t.to_string())),
                _ => (rest, None),
            };
            return Ok(Location::Layout {
                dir: dir.into(),
                tag,
            });
        }
        if let Some(rest) = s
            .strip_prefix("docker-archive:")
            .or_else(|| s.strip_prefix("tarball:"))
        {
            return Ok(Location::Tarball(rest.into()));
        }
        if s.ends_with(".tar") && !s.contains('@') {
            return Ok(Location::Tarball(s.into()));
        }
        let s = s.strip_prefix("docker://").unwrap_or(s);
        Ok(Location::Registry(Reference::parse(s)?))
    }

    pub async fn open_source(&self, ctx: &Ctx) -> Result<(Arc<dyn Source>, String)> {
        match self {
            Location::Registry(r) => Ok((Arc::new(ctx.repo(r)?), r.identifier())),
            Location::Layout { dir, tag } => {
                let layout = ggfs::image::layout::Layout::open(dir)?;
                let reference = match tag {
                    Some(t) => t.clone(),
                    None => only_entry(&layout)?,
                };
                Ok((Arc::new(layout), reference))
            }
            Location::Tarball(path) => {
                // "" names the only image of a one-image tarball.
                Ok((ggfs::image::tarball::open(path)?, String::new()))
            }
        }
    }

    pub async fn open_sink(&self, ctx: &Ctx) -> Result<(Arc<dyn Sink>, Option<String>)> {
        match self {
            Location::Registry(r) => Ok((Arc::new(ctx.repo(r)?), r.tag.clone())),
            Location::Layout { dir, tag } => Ok((
                Arc::new(ggfs::image::layout::Layout::create(dir)?),
                tag.clone(),
            )),
            Location::Tarball(path) => bail!(
                "{}: writing a tarball is done by `ggfs pull --format tarball`",
                path.display()
            ),
        }
    }
}

/// The digest of a layout's only image, for `oci:DIR` without a tag.
fn only_entry(layout: &ggfs::image::layout::Layout) -> Result<String> {
    match layout.entries()?.as_slice() {
        [one] => Ok(one.digest.to_string()),
        [] => bail!("{}: the layout holds no image", layout.label()),
        _ => bail!(
            "{}: the layout holds several images: name one as oci:DIR:TAG",
            layout.label()
        ),
    }
}
