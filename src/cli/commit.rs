//! `ggfs commit PATH` and `ggfs status MOUNTPOINT`: ask the daemon serving a
//! mount, through its `.ggfs/ctl` and `.ggfs/status` files, to commit the
//! changes made under an image's `rootfs/`, or to list them.

use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _, Result};

#[derive(clap::Args)]
pub struct CommitArgs {
    /// The image directory in the mount (MOUNT/REPO/TAG).
    path: PathBuf,
    /// Push to this tag instead of the image's own (which is then left alone).
    #[arg(short = 't', long)]
    tag: Option<String>,
    /// Compression of the new layer.
    #[arg(long, value_parser = ["gzip", "zstd", "estargz", "zstd:chunked", "none"], default_value = "gzip")]
    layer_format: String,
    /// A comment for the new layer's history entry.
    #[arg(short = 'm', long)]
    message: Option<String>,
    /// Move the tag even if it moved in the registry since the changes began.
    #[arg(long)]
    force: bool,
}

#[derive(clap::Args)]
pub struct StatusArgs {
    /// A ggfs mount point.
    mountpoint: PathBuf,
}

#[derive(serde::Deserialize)]
struct Reply {
    status: String,
    reference: Option<String>,
    message: String,
}

pub fn commit(a: CommitArgs) -> Result<()> {
    let path = std::fs::canonicalize(&a.path).with_context(|| format!("{}", a.path.display()))?;
    let mp = mount_of(&path)?;
    let rel = path.strip_prefix(&mp).unwrap_or(&path);
    let request = serde_json::json!({
        "path": rel.to_string_lossy(),
        "tag": a.tag,
        "layer_format": a.layer_format,
        "message": a.message,
        "force": a.force,
    });
    let ctl = mp.join(".ggfs/ctl");
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&ctl)
        .with_context(|| format!("{} (is the mount's daemon up to date?)", ctl.display()))?;
    f.write_all(request.to_string().as_bytes())
        .with_context(|| format!("sending the commit to {}", ctl.display()))?;
    // The reply is the file's content, from its start.
    f.seek(std::io::SeekFrom::Start(0))
        .with_context(|| format!("reading the reply from {}", ctl.display()))?;
    let mut answer = String::new();
    f.read_to_string(&mut answer)
        .with_context(|| format!("reading the reply from {}", ctl.display()))?;
    let reply: Reply =
        serde_json::from_str(&answer).with_context(|| format!("the daemon's reply {answer:?}"))?;
    match reply.status.as_str() {
        "pushed" => {
            eprintln!("{}", reply.message);
            println!("{}", reply.reference.unwrap_or_default());
            Ok(())
        }
        "no changes" => {
            eprintln!("no changes");
            Ok(())
        }
        _ => bail!("{}", reply.message),
    }
}

pub fn status(a: StatusArgs) -> Result<()> {
    let mp = std::fs::canonicalize(&a.mountpoint)
        .with_context(|| format!("{}", a.mountpoint.display()))?;
    let mp = mount_of(&mp)?;
    let text = std::fs::read_to_string(mp.join(".ggfs/status"))
        .with_context(|| format!("reading {}/.ggfs/status", mp.display()))?;
    print!("{text}");
    Ok(())
}

/// The ggfs mount point `path` is in (the deepest one).
fn mount_of(path: &Path) -> Result<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").context("reading mountinfo")?;
    let best = info
        .lines()
        .filter_map(|l| {
            let (left, right) = l.split_once(" - ")?;
            let mut f = right.split(' ');
            let (fstype, source) = (f.next()?, f.next()?);
            let ours = fstype == "fuse.ggfs" || (fstype.starts_with("fuse") && source == "ggfs");
            let mp = unescape(left.split(' ').nth(4)?);
            (ours && path.starts_with(&mp)).then_some(mp)
        })
        .max_by_key(|mp| mp.as_os_str().len());
    match best {
        Some(mp) => Ok(mp),
        None => bail!("{} is not inside a ggfs mount", path.display()),
    }
}

/// mountinfo escapes space, tab, newline and backslash as octal.
fn unescape(s: &str) -> PathBuf {
    PathBuf::from(
        s.replace("\\040", " ")
            .replace("\\011", "\t")
            .replace("\\012", "\n")
            .replace("\\134", "\\"),
    )
}
