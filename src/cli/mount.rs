//! `ggfs mount` and `ggfs unmount` hand over to the `ggfs-mountd` daemon
//! binary installed beside this one.

use std::ffi::OsString;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;

use anyhow::{Context as _, Result};

#[derive(clap::Args)]
#[command(disable_help_flag = true)]
pub struct MountArgs {
    /// REGISTRY MOUNTPOINT [options]; see `ggfs mount --help`.
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    args: Vec<OsString>,
}

#[derive(clap::Args)]
pub struct UnmountArgs {
    /// The directory a registry is mounted on (by `ggfs mount REGISTRY
    /// MOUNTPOINT`). Returns once its daemon has exited, having pushed the
    /// pending commits (none with `--commit-delay manual`).
    mountpoint: PathBuf,
}

/// `ggfs unmount --help` and `ggfs help unmount`: the verb's own argument,
/// without the registry flags (`--platform`, `--insecure`, ...) that every
/// other verb takes and unmount does not.
pub fn unmount_help() -> String {
    use clap::Args as _;
    let cmd = clap::Command::new("unmount")
        .bin_name("ggfs unmount")
        .about("Unmount a ggfs mount");
    UnmountArgs::augment_args(cmd).render_help().to_string()
}

/// The daemon's `mount`, with the global flags it also takes that were
/// given before the verb (`ggfs --ca-file CA mount ...`) passed on.
pub fn mount(a: MountArgs, global: &super::Global) -> Result<()> {
    let mut args: Vec<OsString> = std::iter::once(OsString::from("mount"))
        .chain(a.args)
        .collect();
    if global.insecure {
        args.push("--insecure".into());
    }
    for f in &global.ca_files {
        args.push("--ca-file".into());
        args.push(f.into());
    }
    if global.insecure_skip_tls_verify {
        args.push("--insecure-skip-tls-verify".into());
    }
    for f in &global.pull_secrets {
        args.push("--pull-secret".into());
        args.push(f.into());
    }
    if let Some(p) = &global.platform {
        args.push(format!("--platform={p}").into());
    }
    exec(args)
}

pub fn unmount(a: UnmountArgs) -> Result<()> {
    exec([OsString::from("unmount"), a.mountpoint.into_os_string()])
}

fn exec(args: impl IntoIterator<Item = OsString>) -> Result<()> {
    let daemon = daemon_path()?;
    let err = std::process::Command::new(&daemon).args(args).exec();
    Err(err).with_context(|| format!("running {}", daemon.display()))
}

/// `ggfs-mountd` next to this executable, else on $PATH.
fn daemon_path() -> Result<PathBuf> {
    let exe = std::env::current_exe().context("locating the ggfs executable")?;
    let beside = exe.with_file_name("ggfs-mountd");
    if beside.exists() {
        return Ok(beside);
    }
    Ok(PathBuf::from("ggfs-mountd"))
}
