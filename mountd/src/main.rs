//! `ggfs-mountd`: mount a registry as a filesystem whose tags' rootfs/
//! directories take changes and commit them as new images.
//!
//! `ggfs-mountd mount REGISTRY MOUNTPOINT` returns once the mount is ready and
//! keeps serving in the background (it re-executes itself with
//! `--foreground` and waits on a pipe for the child's "ready" or its error);
//! SIGINT/SIGTERM unmount cleanly. `ggfs-mountd unmount MOUNTPOINT` undoes it.

mod backend;
mod commit;
mod fuse;
mod handles;
mod lower;
mod namespace;
mod stats;
mod supervise;
mod upper;

use lower::{cache, fetch};
use namespace::{self as ns, fs, inolog, prune};

use std::ffi::OsString;
use std::io::{Read, Write};
use std::os::fd::{AsFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "ggfs-mountd",
    // Run as `ggfs mount` / `ggfs unmount`: its help and errors say so.
    bin_name = "ggfs",
    version,
    about = "Mount a container registry as a filesystem"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
// These doc comments are clap's help text, shown as written: `host[:port]` is no link.
#[allow(rustdoc::broken_intra_doc_links)]
#[allow(clippy::large_enum_variant)] // parsed once
enum Cmd {
    /// Mount REGISTRY (host[:port]) at MOUNTPOINT.
    Mount(MountArgs),
    /// Unmount a ggfs mount.
    Unmount {
        /// Where the registry is mounted.
        mountpoint: PathBuf,
    },
}

#[derive(clap::Args, Clone)]
#[allow(rustdoc::broken_intra_doc_links)] // clap's help text, as `Cmd`'s
struct MountArgs {
    /// Registry host[:port] (loopback registries are spoken to over HTTP).
    registry: String,
    /// An existing, empty-of-mounts directory.
    mountpoint: PathBuf,
    /// Stay in the foreground instead of detaching once mounted.
    #[arg(long)]
    foreground: bool,
    /// Disk cache directory [default: $XDG_CACHE_HOME/ggfs or ~/.cache/ggfs].
    #[arg(long)]
    cache_dir: Option<PathBuf>,
    /// Disk cache bound, e.g. 10G, 512M.
    #[arg(long, default_value = "10G", value_parser = cache::parse_size)]
    cache_size: u64,
    /// Seconds before a tag is resolved again (and tag/catalog lists refreshed).
    #[arg(long, default_value_t = 60)]
    tag_ttl: u64,
    /// Show only this platform's directories in indexes (os/arch[/variant]).
    #[arg(long)]
    platform: Option<ggfs::Platform>,
    /// Talk plain HTTP to the registry.
    #[arg(long)]
    insecure: bool,
    /// Also trust the root certificates in this PEM file (repeatable), for
    /// the registry and its token realm.
    #[arg(long = "ca-file", value_name = "PEM")]
    ca_files: Vec<PathBuf>,
    /// Accept any TLS certificate, unverified (test set-ups only).
    #[arg(long)]
    insecure_skip_tls_verify: bool,
    /// Also take credentials from this Kubernetes image pull secret (a
    /// `kubernetes.io/dockerconfigjson` Secret or a List of them, JSON or
    /// YAML; repeatable), read once at mount.
    #[arg(long = "pull-secret", value_name = "FILE")]
    pull_secrets: Vec<PathBuf>,
    /// Mount options: allow_other, allow_root.
    #[arg(short = 'o')]
    options: Vec<String>,
    /// Commit an image's changes after this many seconds without writes
    /// (and at unmount); `manual`: only `ggfs commit` does.
    #[arg(long, default_value = "10", value_parser = parse_delay)]
    commit_delay: CommitDelay,
    /// Seconds a registry request may go without a byte before it fails
    /// (the read gets ETIMEDOUT; the next one tries again).
    #[arg(long, default_value_t = 30)]
    timeout: u64,
    /// `rmdir MOUNT/REPO/TAG` deletes the tag from the registry.
    #[arg(long)]
    allow_delete: bool,
    /// Fetch the rest of an eStargz or zstd:chunked layer in the
    /// background once this many of its files were read (0: as soon as it
    /// is opened; `never`: only what is read).
    #[arg(long, default_value = "4")]
    fetch_after: fetch::When,
    /// After a first pass has verified a plain layer, push its index as an
    /// OCI referrer of the image (as `ggfs index push`), so other machines'
    /// mounts read it by Range from the start. Needs push access; a failed
    /// push is a warning.
    #[arg(long)]
    push_index: bool,
    /// Merged image trees kept in memory; beyond it (or unused for 5
    /// minutes) the least recently used are dropped and rebuilt from the
    /// cache when next used.
    #[arg(long, default_value_t = 16)]
    max_trees: usize,
    /// Seconds a namespace inode (a repository, tag, digest directory…) is
    /// kept once the kernel has forgotten it (tests set it short).
    #[arg(long, default_value_t = 600, hide = true)]
    forget_after: u64,
    /// Serve every read through this daemon, never with FUSE passthrough
    /// (by default, a lower file of 1 MiB or more whose bytes are all in
    /// the cache is read by the kernel straight from its copy there).
    #[arg(long)]
    no_passthrough: bool,
    /// Write the daemon's log here (appending).
    #[arg(long)]
    log: Option<PathBuf>,
    /// Internal: file descriptor to report readiness on.
    #[arg(long, hide = true)]
    ready_fd: Option<i32>,
    /// Internal: serve the mount (started by the supervisor).
    #[arg(long, hide = true)]
    worker: bool,
    /// Internal: socket to hand the /dev/fuse descriptor to the supervisor.
    #[arg(long, hide = true)]
    handoff_fd: Option<i32>,
    /// Internal: serve the connection on this /dev/fuse descriptor.
    #[arg(long, hide = true)]
    resume_fd: Option<i32>,
    /// Internal: the inode log (a memfd the supervisor keeps).
    #[arg(long, hide = true)]
    ino_log_fd: Option<i32>,
    /// Internal: how many workers served the connection before this one.
    #[arg(long, hide = true, default_value_t = 0)]
    generation: u64,
}

#[derive(Clone, Copy, Debug)]
struct CommitDelay(Option<Duration>);

fn parse_delay(s: &str) -> std::result::Result<CommitDelay, String> {
    if s == "manual" {
        return Ok(CommitDelay(None));
    }
    s.parse::<f64>()
        .ok()
        .filter(|v| v.is_finite() && *v >= 0.0)
        .map(|v| CommitDelay(Some(Duration::from_secs_f64(v))))
        .ok_or_else(|| format!("{s:?}: want seconds or `manual`"))
}

fn main() -> ExitCode {
    // glibc gives each thread that allocates an arena of its own: with the
    // runtime's and the blocking pool's threads that was a third of the
    // daemon's RSS (60 MiB against 41 MiB after a whole-tree read).
    #[cfg(target_env = "gnu")]
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => e.exit(), // --help, --version
        Err(e) => {
            eprintln!("ggfs: {}", ggfs::usage::one_line(&e.to_string()));
            return ExitCode::from(2);
        }
    };
    if let Cmd::Mount(a) = &cli.cmd {
        // Once, from the process the user started (not the detached one).
        if a.insecure_skip_tls_verify && a.ready_fd.is_none() {
            eprintln!(
                "ggfs: warning: --insecure-skip-tls-verify: TLS certificates are not verified"
            );
        }
    }
    let res = match cli.cmd {
        Cmd::Mount(args) if args.worker => foreground(args),
        Cmd::Mount(args) if args.foreground => supervised(args),
        Cmd::Mount(args) => daemonize(args),
        Cmd::Unmount { mountpoint } => unmount(&mountpoint),
    };
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ggfs-mountd: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Start the daemon and wait until it says the mount is ready.
fn daemonize(mut args: MountArgs) -> Result<()> {
    preflight(&args)?;
    // The daemon's command line names the mount point absolutely, so
    // `unmount` can find it from anywhere.
    args.mountpoint = std::fs::canonicalize(&args.mountpoint)
        .with_context(|| format!("mount point {}", args.mountpoint.display()))?;
    // The daemon runs from / (so it keeps no directory busy): make paths absolute.
    let cwd = std::env::current_dir().context("current directory")?;
    args.cache_dir = args.cache_dir.map(|d| cwd.join(d));
    args.log = args.log.map(|l| cwd.join(l));
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills two descriptors we then own.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error()).context("creating ready pipe");
    }
    let (rd, wr) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    let wr_raw = fds[1];
    let exe = std::env::current_exe().context("finding own executable")?;
    let mut cmd = Command::new(exe);
    cmd.args(child_args(&args, Some(wr_raw)))
        .current_dir("/")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        use std::os::unix::process::CommandExt;
        cmd.pre_exec(move || {
            libc::setsid();
            // Let the write end survive exec.
            libc::fcntl(wr_raw, libc::F_SETFD, 0);
            Ok(())
        });
    }
    let mut child = cmd.spawn().context("starting the mount daemon")?;
    drop(wr);
    let mut msg = String::new();
    std::fs::File::from(rd)
        .read_to_string(&mut msg)
        .context("waiting for the mount daemon")?;
    if msg.trim() == "ready" {
        return Ok(());
    }
    let status = child.wait().ok();
    let msg = msg.trim();
    if msg.is_empty() {
        bail!("the mount daemon exited before the mount was ready ({status:?})");
    }
    bail!("{msg}")
}

fn child_args(a: &MountArgs, ready: Option<i32>) -> Vec<OsString> {
    let mut v: Vec<OsString> = vec!["mount".into(), a.registry.clone().into()];
    v.push(a.mountpoint.clone().into());
    v.push("--foreground".into());
    if let Some(fd) = ready {
        v.push(format!("--ready-fd={fd}").into());
    }
    if let Some(d) = &a.cache_dir {
        v.push("--cache-dir".into());
        v.push(d.into());
    }
    v.push(format!("--cache-size={}", a.cache_size).into());
    v.push(format!("--tag-ttl={}", a.tag_ttl).into());
    v.push(format!("--timeout={}", a.timeout).into());
    match a.commit_delay.0 {
        Some(d) => v.push(format!("--commit-delay={}", d.as_secs_f64()).into()),
        None => v.push("--commit-delay=manual".into()),
    }
    if let Some(p) = &a.platform {
        v.push(format!("--platform={p}").into());
    }
    if a.insecure {
        v.push("--insecure".into());
    }
    for f in &a.ca_files {
        v.push("--ca-file".into());
        v.push(std::path::absolute(f).unwrap_or_else(|_| f.clone()).into());
    }
    if a.insecure_skip_tls_verify {
        v.push("--insecure-skip-tls-verify".into());
    }
    for f in &a.pull_secrets {
        v.push("--pull-secret".into());
        v.push(std::path::absolute(f).unwrap_or_else(|_| f.clone()).into());
    }
    if a.allow_delete {
        v.push("--allow-delete".into());
    }
    v.push(format!("--fetch-after={}", a.fetch_after).into());
    if a.no_passthrough {
        v.push("--no-passthrough".into());
    }
    v.push(format!("--max-trees={}", a.max_trees).into());
    v.push(format!("--forget-after={}", a.forget_after).into());
    if a.push_index {
        v.push("--push-index".into());
    }
    for o in &a.options {
        v.push("-o".into());
        v.push(o.into());
    }
    if let Some(l) = &a.log {
        v.push("--log".into());
        v.push(l.into());
    }
    v
}

/// Checks that need no network, with messages that say what to do.
fn preflight(a: &MountArgs) -> Result<()> {
    if !Path::new("/dev/fuse").exists() {
        bail!("/dev/fuse does not exist: load the fuse kernel module (modprobe fuse)");
    }
    let root = unsafe { libc::geteuid() } == 0;
    if !root && which("fusermount3").is_none() && which("fusermount").is_none() {
        bail!("fusermount3 not found in PATH: install fuse3");
    }
    let mp = &a.mountpoint;
    let md = match std::fs::metadata(mp) {
        // A ggfs mount whose daemon died (crash, kill -9): clear it and go on.
        Err(e) if gone(&e) && clear_stale(mp)? => std::fs::metadata(mp),
        other => other,
    }
    .with_context(|| format!("mount point {}", mp.display()))?;
    if !md.is_dir() {
        bail!("mount point {} is not a directory", mp.display());
    }
    let dead = || std::fs::read_dir(mp).is_err_and(|e| gone(&e));
    if is_mount_point(mp)? && !(dead() && clear_stale(mp)?) {
        bail!(
            "mount point {} is busy: something is already mounted there",
            mp.display()
        );
    }
    mount_options(&a.options)?;
    Ok(())
}

fn which(bin: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(bin))
        .find(|p| p.is_file())
}

/// How long a signalled daemon waits for a busy session to end.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(3);

/// Set once the daemon is shutting its runtime down.
pub static STOPPING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// An error if `mp` is still a mount point (an unmount left it busy).
fn still_mounted(mp: &Path) -> std::io::Result<()> {
    match is_mount_point(mp) {
        Ok(false) => Ok(()),
        _ => Err(std::io::Error::from_raw_os_error(libc::EBUSY)),
    }
}

/// Lazily unmount `mp`: gone from the namespace now, freed when unused.
fn detach(mp: &Path) {
    let ok = match unsafe { libc::geteuid() } {
        0 => std::ffi::CString::new(mp.as_os_str().as_encoded_bytes())
            .is_ok_and(|c| unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) } == 0),
        _ => Command::new("fusermount3")
            .arg("-uz")
            .arg(mp)
            .status()
            .is_ok_and(|s| s.success()),
    };
    if !ok {
        tracing::error!("could not detach {}", mp.display());
    }
}

/// What a FUSE mount whose daemon died answers.
fn gone(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOTCONN | libc::ECONNABORTED))
}

/// Detach the ggfs mount at `mp`, one whose daemon is gone; false when
/// it is not a ggfs mount.
fn clear_stale(mp: &Path) -> Result<bool> {
    let abs = absolute(mp)?;
    let info = std::fs::read_to_string("/proc/self/mountinfo").context("reading mountinfo")?;
    let ours = info.lines().any(|l| {
        let (fields, fs) = l.split_once(" - ").unwrap_or((l, ""));
        fields
            .split(' ')
            .nth(4)
            .is_some_and(|p| Path::new(&unescape_mount(p)) == abs)
            && matches!(
                fs.split(' ').take(2).collect::<Vec<_>>()[..],
                ["fuse" | "fuse.ggfs", "ggfs"]
            )
    });
    if !ours {
        return Ok(false);
    }
    detach(&abs);
    if is_mount_point(&abs)? {
        bail!(
            "mount point {}: a ggfs mount whose daemon is gone, and it could not be detached \
             (try `ggfs unmount {}`)",
            mp.display(),
            mp.display()
        );
    }
    eprintln!(
        "ggfs: {}: cleared a ggfs mount whose daemon had died",
        mp.display()
    );
    Ok(true)
}

/// `mp` made absolute with its parent's symlinks resolved, not its own:
/// a dead mount point cannot be stat-ed.
fn absolute(mp: &Path) -> Result<PathBuf> {
    let parent = match mp.parent().filter(|p| !p.as_os_str().is_empty()) {
        Some(p) => std::fs::canonicalize(p).with_context(|| format!("{}", p.display()))?,
        None => std::env::current_dir()?,
    };
    Ok(match mp.file_name() {
        Some(name) => parent.join(name),
        None => std::fs::canonicalize(mp)?,
    })
}

/// Is `path` itself a mount point (per /proc/self/mountinfo)?
fn is_mount_point(path: &Path) -> Result<bool> {
    let canon = absolute(path)?;
    let info = std::fs::read_to_string("/proc/self/mountinfo").context("reading mountinfo")?;
    Ok(info.lines().any(|l| {
        l.split(' ')
            .nth(4)
            .is_some_and(|mp| Path::new(&unescape_mount(mp)) == canon)
    }))
}

/// mountinfo escapes space, tab, newline and backslash as octal.
fn unescape_mount(s: &str) -> String {
    s.replace("\\040", " ")
        .replace("\\011", "\t")
        .replace("\\012", "\n")
        .replace("\\134", "\\")
}

fn mount_options(opts: &[String]) -> Result<Vec<fuser::MountOption>> {
    use fuser::MountOption as M;
    let mut out = vec![
        M::FSName("ggfs".into()),
        M::Subtype("ggfs".into()),
        M::DefaultPermissions,
        M::NoDev,
        M::NoSuid,
    ];
    for o in opts
        .iter()
        .flat_map(|o| o.split(','))
        .filter(|o| !o.is_empty())
    {
        out.push(match o {
            "allow_other" => M::AllowOther,
            "allow_root" => M::AllowRoot,
            "ro" => M::RO,
            other => {
                bail!("unsupported mount option {other:?} (supported: allow_other, allow_root)")
            }
        });
    }
    Ok(out)
}

/// Reports the outcome of startup to whoever waits on `--ready-fd`.
struct Ready(Option<std::fs::File>);

impl Ready {
    fn send(&mut self, msg: &str) {
        if let Some(mut f) = self.0.take() {
            let _ = f.write_all(msg.as_bytes());
        }
    }
}

/// The foreground process: the supervisor, which starts the worker that
/// serves the mount and starts another if it dies (supervise.rs).
fn supervised(args: MountArgs) -> Result<()> {
    init_log(&args)?;
    // SAFETY: the fd was handed to us by our parent for this purpose.
    let ready = args.ready_fd.map(|fd| {
        unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
        unsafe { OwnedFd::from_raw_fd(fd) }
    });
    let r = supervise::supervise(child_args(&args, None), ready);
    if let Err(e) = &r {
        tracing::error!("{e:#}");
    }
    r
}

/// The worker: serves the mount until it is unmounted or signalled.
fn foreground(args: MountArgs) -> Result<()> {
    // SAFETY: the fd was handed to us by our parent for this purpose.
    let mut ready = Ready(args.ready_fd.map(|fd| {
        // Not inherited by helpers we start (fusermount3): the parent waits
        // for this pipe to close.
        unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
        unsafe { std::fs::File::from_raw_fd(fd) }
    }));
    match serve(&args, &mut ready) {
        Ok(()) => Ok(()),
        Err(e) => {
            tracing::error!("{e:#}");
            ready.send(&format!("{e:#}\n"));
            Err(e)
        }
    }
}

fn init_log(args: &MountArgs) -> Result<()> {
    // fuser's own unmount at exit finds the mount already gone after a
    // clean unmount and says "Unmount failed: Invalid argument": noise.
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,fuser::mnt=off"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    match &args.log {
        Some(path) => {
            let f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .with_context(|| format!("opening log {}", path.display()))?;
            builder.with_ansi(false).with_writer(Arc::new(f)).init();
        }
        None => {
            use std::io::IsTerminal;
            let ansi = std::io::stderr().is_terminal();
            builder.with_ansi(ansi).with_writer(std::io::stderr).init()
        }
    }
    Ok(())
}

fn serve(args: &MountArgs, ready: &mut Ready) -> Result<()> {
    init_log(args)?;
    let resumed = args.resume_fd.is_some();
    if !resumed {
        preflight(args)?;
    }
    let signals = block_signals()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .context("starting runtime")?;
    let (host, insecure) = match args.registry.strip_prefix("http://") {
        Some(h) => (h.trim_end_matches('/'), true),
        None => (
            args.registry
                .strip_prefix("https://")
                .unwrap_or(&args.registry)
                .trim_end_matches('/'),
            args.insecure,
        ),
    };
    let stall = Duration::from_secs(args.timeout.max(1));
    if args.insecure_skip_tls_verify {
        tracing::warn!("--insecure-skip-tls-verify: TLS certificates are not verified");
    }
    let tls = (args.ca_files.clone(), args.insecure_skip_tls_verify);
    let mut keychain = ggfs::registry::auth::Keychain::from_env();
    for file in &args.pull_secrets {
        keychain
            .pull_secrets
            .extend(ggfs::registry::auth::pull_secret::read(file)?);
    }
    let reg = backend::LibRegistry::new(host, insecure, stall, tls, keychain)?;
    let reg_name = backend::Registry::name(reg.as_ref());
    // The API check goes out first, so its round trips overlap the local
    // set-up below (the cache, the inode log) instead of following it.
    let check = (!resumed).then(|| {
        let (reg, host) = (reg.clone(), host.to_string());
        rt.spawn(async move { ping(reg.as_ref(), &host).await })
    });
    let cache_dir = args.cache_dir.clone().unwrap_or_else(cache::default_dir);
    let cache = Arc::new(cache::Cache::open(&cache_dir, args.cache_size)?);
    let stats = Arc::new(stats::Stats::default());
    let mut ns = ns::Namespace::new(
        reg.clone(),
        stats,
        cache.clone(),
        Duration::from_secs(args.tag_ttl),
    );
    ns.platform = args.platform.clone();
    ns.allow_delete = args.allow_delete;
    ns.fetch_rest = args.fetch_after;
    let filesystem = fuse::Fs::new(ns, cache, takeover(args)?, rt.handle().clone());
    let inner = filesystem.inner();
    // Lookups by name read the catalog: asked for beside the ping, so it
    // is there (or on its way) when the first lookup comes.
    let early = inner.clone();
    rt.spawn(async move { early.ns.catalog().await });
    if resumed {
        tracing::info!(
            "taking over the mount at {} (daemon {} on this connection)",
            args.mountpoint.display(),
            args.generation + 1
        );
    }
    if let Some(check) = check {
        rt.block_on(check).context("the registry check")??;
    }
    inner
        .layers
        .push_index
        .store(args.push_index, std::sync::atomic::Ordering::Relaxed);
    if let Some(delay) = args.commit_delay.0 {
        rt.spawn(commit::auto(inner.clone(), delay));
    }
    let limits = prune::Limits {
        trees: args.max_trees,
        names: Duration::from_secs(args.forget_after),
        ..prune::Limits::default()
    };
    rt.spawn(prune::run(inner.clone(), limits));
    let options = mount_options(&args.options)?;
    let mut session = session(args, filesystem, &options)?;
    if !args.no_passthrough {
        // Taken up in `init` if the kernel offers passthrough.
        if let Ok(dev) = session.as_fd().try_clone_to_owned() {
            let _ = inner.dev.set(dev);
        }
    }
    let mut unmounter = session.unmount_callable();
    let (tx, rx) = std::sync::mpsc::channel::<&'static str>();
    let tx2 = tx.clone();
    let worker = std::thread::spawn(move || {
        let r = session.run();
        let _ = tx2.send("session ended");
        r
    });
    std::thread::spawn(move || {
        if let Some(sig) = wait_signal(&signals) {
            let _ = tx.send(sig);
        }
    });
    tracing::info!("mounted {} at {}", reg_name, args.mountpoint.display());
    ready.send("ready\n");
    let why = rx.recv().unwrap_or("channel closed");
    tracing::info!("{why}: unmounting {}", args.mountpoint.display());
    // A resumed session does not own the mount: unmount it by its path.
    let mut unmount = || match resumed {
        true => unmount_only(&args.mountpoint).map_err(std::io::Error::other),
        false => unmounter.unmount(),
    };
    if why != "session ended" && unmount().and(still_mounted(&args.mountpoint)).is_err() {
        // Busy (a reader stuck in a request, a shell inside): detach it,
        // so nothing new comes in, and stop waiting for it below.
        tracing::warn!("{} is busy: detaching it", args.mountpoint.display());
        detach(&args.mountpoint);
    }
    // A session the kernel still holds open (files open in a detached
    // mount) is left behind: exiting closes /dev/fuse, and its stuck
    // requests fail instead of hanging.
    let ended = why == "session ended" || rx.recv_timeout(SHUTDOWN_GRACE).is_ok();
    match ended {
        true => match worker.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!("session: {e}"),
            Err(_) => tracing::error!("session thread panicked"),
        },
        false => tracing::warn!(
            "session still busy {} s after unmount: exiting, open files there fail",
            SHUTDOWN_GRACE.as_secs()
        ),
    }
    if args.commit_delay.0.is_some() {
        // Whatever is left goes now; what cannot stays journalled.
        rt.block_on(async {
            let all = commit::commit_due(&inner, Duration::ZERO);
            if tokio::time::timeout(Duration::from_secs(120), all)
                .await
                .is_err()
            {
                tracing::warn!("commits at unmount: not done within 120s; they stay pending");
            }
        });
    }
    // What the shutdown cuts short (background fetches) is not a fault.
    STOPPING.store(true, std::sync::atomic::Ordering::SeqCst);
    rt.shutdown_timeout(Duration::from_secs(2));
    Ok(())
}

async fn ping(reg: &dyn backend::Registry, host: &str) -> Result<()> {
    tokio::time::timeout(Duration::from_secs(30), reg.ping())
        .await
        .map_err(|_| anyhow!("registry {host} unreachable: no answer to /v2/ within 30s"))?
        .map_err(|e| match e {
            // Named once, not three times.
            ggfs::Error::Registry { message, .. } => {
                anyhow!("registry {host} unreachable: {message}")
            }
            e => anyhow!("registry {host} unreachable: {e}"),
        })
}

/// What the daemons before this one on the connection gave out.
fn takeover(args: &MountArgs) -> Result<fs::Takeover> {
    let log = match args.ino_log_fd {
        // SAFETY: the supervisor handed us this memfd for this purpose.
        Some(fd) => {
            let file = unsafe { std::fs::File::from_raw_fd(fd) };
            unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
            let (log, replayed) = inolog::InoLog::open(file).context("reading the inode log")?;
            Some((Arc::new(log), replayed))
        }
        None => None,
    };
    Ok(fs::Takeover {
        log,
        generation: args.generation,
    })
}

/// Mount (handing the connection to the supervisor), or take over the
/// connection a dead worker served.
fn session(
    args: &MountArgs,
    filesystem: fuse::Fs,
    options: &[fuser::MountOption],
) -> Result<fuser::Session<fuse::Fs>> {
    if let Some(fd) = args.resume_fd {
        use fuser::{MountOption as M, SessionACL};
        // SAFETY: the supervisor handed us this /dev/fuse descriptor.
        let fuse = unsafe { OwnedFd::from_raw_fd(fd) };
        unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
        let acl = if options.contains(&M::AllowOther) {
            SessionACL::All
        } else if options.contains(&M::AllowRoot) {
            SessionACL::RootAndOwner
        } else {
            SessionACL::Owner
        };
        supervise::resend(fuse.as_fd());
        return Ok(fuser::Session::resume(filesystem, fuse, acl));
    }
    let session = fuser::Session::new(filesystem, &args.mountpoint, options)
        .with_context(|| format!("mounting at {}", args.mountpoint.display()))?;
    if let Some(fd) = args.handoff_fd {
        // SAFETY: the supervisor handed us this socket for this purpose.
        let sock = unsafe { OwnedFd::from_raw_fd(fd) };
        if let Err(e) = supervise::send_fd(sock.as_fd(), session.as_fd()) {
            tracing::warn!(
                "handing the connection to the supervisor: {e} (no restart if this daemon dies)"
            );
        }
    }
    Ok(session)
}

/// Block SIGINT/SIGTERM/SIGHUP in this and all later threads, so one
/// thread can wait for them with sigwait.
fn block_signals() -> Result<libc::sigset_t> {
    // SAFETY: plain signal-mask manipulation on a zeroed set.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
            libc::sigaddset(&mut set, s);
        }
        if libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) != 0 {
            bail!("blocking signals failed");
        }
        Ok(set)
    }
}

fn wait_signal(set: &libc::sigset_t) -> Option<&'static str> {
    let mut sig = 0;
    // SAFETY: `set` is a valid, initialised signal set.
    if unsafe { libc::sigwait(set, &mut sig) } != 0 {
        return None;
    }
    Some(match sig {
        libc::SIGINT => "SIGINT",
        libc::SIGTERM => "SIGTERM",
        _ => "SIGHUP",
    })
}

/// How long `unmount` waits for the daemons to exit: they push pending
/// commits first, for up to 120 s (see `serve`).
const EXIT_WAIT: Duration = Duration::from_secs(150);

/// Unmount, then wait for the daemons serving the mount to exit.
fn unmount(mountpoint: &Path) -> Result<()> {
    if !is_mount_point(mountpoint)? {
        bail!("{} is not mounted", mountpoint.display());
    }
    let pids = daemons_of(mountpoint);
    if let Err(e) = unmount_only(mountpoint) {
        // Busy (a reader stuck in a request, a shell inside): the daemons
        // do what SIGTERM asks, detach the mount and exit within seconds
        // whatever is stuck, still pushing pending commits.
        if !signal(&pids, libc::SIGTERM) {
            return Err(e);
        }
        eprintln!(
            "ggfs: {} is busy: detaching it (what still uses it fails once its daemon exits)",
            mountpoint.display()
        );
    }
    let deadline = std::time::Instant::now() + EXIT_WAIT;
    while pids.iter().any(|p| alive(*p)) {
        if std::time::Instant::now() > deadline {
            bail!(
                "unmounted {}, but its daemon {pids:?} is still running",
                mountpoint.display()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// Send `sig` to each of `pids`: whether any got it.
fn signal(pids: &[u32], sig: i32) -> bool {
    // SAFETY: a plain kill of processes found by their command line.
    let sent = pids
        .iter()
        .filter(|&&p| unsafe { libc::kill(p as i32, sig) } == 0);
    sent.count() > 0
}

/// Pids of ggfs-mountd processes whose command line names `mountpoint`.
fn daemons_of(mountpoint: &Path) -> Vec<u32> {
    let canon = std::fs::canonicalize(mountpoint).unwrap_or_else(|_| mountpoint.to_path_buf());
    let me = std::process::id();
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    rd.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| pid != me)
        .filter(|pid| {
            let Ok(cmd) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
                return false;
            };
            let args: Vec<&[u8]> = cmd.split(|&b| b == 0).collect();
            args.first().is_some_and(|a| a.ends_with(b"ggfs-mountd"))
                && args.get(1) == Some(&&b"mount"[..])
                && args
                    .iter()
                    .any(|a| Path::new(std::ffi::OsStr::from_bytes(a)) == canon)
        })
        .collect()
}

/// Running and not a zombie.
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        !s.rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'))
    })
}

fn unmount_only(mountpoint: &Path) -> Result<()> {
    let bin = which("fusermount3").or_else(|| which("fusermount"));
    if let Some(bin) = bin {
        let out = Command::new(&bin)
            .arg("-u")
            .arg(mountpoint)
            .output()
            .with_context(|| format!("running {}", bin.display()))?;
        if out.status.success() {
            return Ok(());
        }
        let err = String::from_utf8_lossy(&out.stderr).trim().to_string();
        if unsafe { libc::geteuid() } != 0 {
            bail!("unmounting {}: {err}", mountpoint.display());
        }
    }
    // Root without (working) fusermount3: unmount directly.
    let c = std::ffi::CString::new(mountpoint.as_os_str().as_encoded_bytes())?;
    // SAFETY: a valid NUL-terminated path.
    if unsafe { libc::umount2(c.as_ptr(), 0) } != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("unmounting {}", mountpoint.display()));
    }
    Ok(())
}
