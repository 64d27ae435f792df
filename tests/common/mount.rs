//! Real FUSE mounts by the `ggfs-mountd` binary, for the test files that
//! need one (tests/mount.rs, tests/write.rs).
//!
//! Every wait has a timeout, and every mount is unmounted (and its daemon
//! killed if need be) on drop, so a broken daemon fails a test instead of
//! hanging it.

use std::cell::Cell;
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// `target/debug/ggfs-mountd`, built once per test process when it is
/// missing or older than the sources: cargo does not hand the root
/// package's tests the binaries of other workspace members. (Building it
/// when it is fresh is not free: `cargo build -p ggfs-mountd` resolves
/// features apart from the workspace build, so it recompiles both crates,
/// minutes on a loaded machine.)
pub fn mountd() -> PathBuf {
    static BUILT: OnceLock<()> = OnceLock::new();
    BUILT.get_or_init(|| {
        if is_fresh(&super::bin_path("ggfs-mountd")) {
            return;
        }
        let status = Command::new(env!("CARGO"))
            .args(["build", "--quiet", "-p", "ggfs-mountd"])
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .status()
            .expect("run cargo build");
        assert!(status.success(), "cargo build -p ggfs-mountd failed");
    });
    super::mountd_bin()
}

/// Whether `bin` exists and is newer than every source file it is built from.
fn is_fresh(bin: &Path) -> bool {
    let Ok(built) = std::fs::metadata(bin).and_then(|m| m.modified()) else {
        return false;
    };
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut stack = vec![root.join("src"), root.join("mountd/src")];
    let mut newest = [
        root.join("Cargo.toml"),
        root.join("mountd/Cargo.toml"),
        root.join("Cargo.lock"),
    ]
    .iter()
    .filter_map(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok())
    .max();
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let Ok(md) = e.metadata() else { continue };
            if md.is_dir() {
                stack.push(e.path());
            } else if let Ok(t) = md.modified() {
                newest = newest.max(Some(t));
            }
        }
    }
    newest.is_some_and(|n| n <= built)
}

/// Run `f` on another thread, failing if it takes longer than `secs`.
pub fn within<T: Send + 'static>(
    secs: u64,
    what: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    match rx.recv_timeout(Duration::from_secs(secs)) {
        Ok(v) => v,
        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
            panic!("{what}: no result within {secs}s")
        }
        Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => panic!("{what} failed (above)"),
    }
}

pub fn is_mounted(mp: &Path) -> bool {
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    let mp = mp.to_string_lossy().replace(' ', "\\040");
    mounts.lines().any(|l| l.split(' ').nth(1) == Some(&mp))
}

/// Pids of ggfs-mountd processes serving `mp`: the supervisor and the
/// worker it started.
pub fn daemon_pids(mp: &Path) -> Vec<u32> {
    daemons(mp).into_iter().map(|(pid, _)| pid).collect()
}

/// The pid of the worker serving `mp` (the process that answers the
/// kernel; its supervisor restarts it if it dies).
pub fn worker_pid(mp: &Path) -> Option<u32> {
    daemons(mp)
        .into_iter()
        .find(|(_, w)| *w)
        .map(|(pid, _)| pid)
}

/// ggfs-mountd processes naming `mp`: (pid, whether it is a worker).
fn daemons(mp: &Path) -> Vec<(u32, bool)> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in rd.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(cmd) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<&[u8]> = cmd.split(|&b| b == 0).collect();
        let is_mountd = args.first().is_some_and(|a| a.ends_with(b"ggfs-mountd"));
        if is_mountd && args.contains(&mp.as_os_str().as_encoded_bytes()) {
            out.push((pid, args.contains(&&b"--worker"[..])));
        }
    }
    out
}

/// A running mount; unmounted (and its daemon gone) when dropped.
pub struct Mount {
    /// Holds the log, the default cache and (unless given) the mount point.
    /// `None` once leaked (see `Drop`).
    dir: Option<tempfile::TempDir>,
    mp: PathBuf,
    log: PathBuf,
    pid: u32,
    /// Set by [`Mount::kill9`]: the daemon is gone and the mount point
    /// detached (and maybe mounted again by another `Mount`).
    killed: Cell<bool>,
}

impl Mount {
    /// A mount of `registry` on a fresh mount point with a fresh cache dir;
    /// `extra` are further daemon options.
    pub fn start(registry: &str, extra: &[&str]) -> Mount {
        Self::start_with_cache(registry, extra, None)
    }

    /// Like [`Mount::start`], on the cache dir `cache` when given.
    pub fn start_with_cache(registry: &str, extra: &[&str], cache: Option<&Path>) -> Mount {
        Self::start_in(registry, extra, None, cache)
    }

    /// A mount on the existing directory `mp`, e.g. the mount point of a
    /// [`Mount`] after [`Mount::kill9`]. Dropping the returned mount
    /// unmounts `mp` but leaves the directory to its owner, which must
    /// outlive this mount.
    pub fn start_at(registry: &str, extra: &[&str], mp: &Path, cache: Option<&Path>) -> Mount {
        Self::start_in(registry, extra, Some(mp), cache)
    }

    fn start_in(registry: &str, extra: &[&str], mp: Option<&Path>, cache: Option<&Path>) -> Mount {
        let dir = super::tempdir();
        let mp = match mp {
            Some(p) => p.to_path_buf(),
            None => {
                let p = dir.path().join("mnt");
                std::fs::create_dir(&p).unwrap();
                p
            }
        };
        let log = dir.path().join("mountd.log");
        let cache = cache.map_or_else(|| dir.path().join("cache"), Path::to_path_buf);
        let out = run_mountd(
            &[
                "mount".as_ref(),
                registry.as_ref(),
                mp.as_os_str(),
                "--insecure".as_ref(),
                "--cache-dir".as_ref(),
                cache.as_os_str(),
                "--log".as_ref(),
                log.as_os_str(),
            ],
            extra,
        );
        assert!(
            out.status.success(),
            "mount failed: {}\nlog: {}",
            String::from_utf8_lossy(&out.stderr),
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        assert!(is_mounted(&mp), "{} not in /proc/mounts", mp.display());
        let ds = daemons(&mp);
        let sup: Vec<u32> = ds.iter().filter(|d| !d.1).map(|d| d.0).collect();
        assert!(
            ds.len() == 2 && sup.len() == 1,
            "expected a supervisor and a worker for {}: {ds:?}",
            mp.display()
        );
        Mount {
            dir: Some(dir),
            mp,
            log,
            pid: sup[0],
            killed: Cell::new(false),
        }
    }

    /// The mount point.
    pub fn mp(&self) -> &Path {
        &self.mp
    }

    /// The pid of the daemon serving the mount now (the worker; 0 if none).
    pub fn pid(&self) -> u32 {
        worker_pid(&self.mp).unwrap_or(0)
    }

    /// The pid of the supervisor, which outlives the workers it starts.
    pub fn supervisor(&self) -> u32 {
        self.pid
    }

    /// Kill the daemon serving the mount with SIGKILL, and wait (10 s) for
    /// the supervisor to start another: its pid.
    pub fn kill_worker(&self) -> u32 {
        let old = self.pid();
        assert_ne!(old, 0, "no worker for {}", self.mp.display());
        kill(old, "KILL");
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match worker_pid(&self.mp) {
                Some(p) if p != old => return p,
                _ => assert!(
                    Instant::now() < deadline,
                    "no new daemon 10 s after killing {old}:\n{}",
                    self.log()
                ),
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `rel` below the mount point.
    pub fn path(&self, rel: &str) -> PathBuf {
        self.mp.join(rel)
    }

    /// The daemon's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Whether the supervisor or a worker of the mount is still running.
    pub fn pid_alive(&self) -> bool {
        alive(self.pid) || worker_pid(&self.mp).is_some_and(alive)
    }

    /// `ggfs-mountd unmount`, then wait (10 s) for the daemon to exit.
    pub fn unmount(&self) -> Result<(), String> {
        self.unmount_within(10)
    }

    /// `ggfs-mountd unmount`, then wait up to `secs` for the daemon to exit
    /// (a daemon may have work to finish at unmount).
    pub fn unmount_within(&self, secs: u64) -> Result<(), String> {
        if self.killed.get() {
            return Err(format!("daemon {} was killed", self.pid));
        }
        let out = run_mountd(&["unmount".as_ref(), self.mp.as_os_str()], &[]);
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).into_owned());
        }
        let deadline = Instant::now() + Duration::from_secs(secs);
        while self.pid_alive() {
            if Instant::now() > deadline {
                return Err(format!("daemon {} still running after unmount", self.pid));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    /// Kills the daemon with SIGKILL (no chance to clean up or flush), waits
    /// for it to be gone, and lazily unmounts the dead mount, so the same
    /// mount point and cache dir can be mounted again ([`Mount::start_at`],
    /// [`Mount::start_with_cache`]). Dropping `self` afterwards does not touch
    /// the mount point.
    pub fn kill9(&self) {
        assert!(!self.killed.get(), "daemon {} killed twice", self.pid);
        self.kill_all();
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.pid_alive() {
            assert!(
                Instant::now() < deadline,
                "daemon {} alive 10 s after SIGKILL",
                self.pid
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        self.killed.set(true);
        lazy_unmount(&self.mp);
        let deadline = Instant::now() + Duration::from_secs(10);
        while is_mounted(&self.mp) {
            assert!(
                Instant::now() < deadline,
                "{} still mounted after its daemon was killed",
                self.mp.display()
            );
            lazy_unmount(&self.mp);
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Mount {
    /// SIGKILL to the supervisor first (so it starts no other worker), then
    /// to the workers.
    pub fn kill_all(&self) {
        let workers: Vec<u32> = daemons(&self.mp)
            .iter()
            .filter(|d| d.1)
            .map(|d| d.0)
            .collect();
        kill(self.pid, "KILL");
        for w in workers {
            kill(w, "KILL");
        }
    }
}

fn alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .unwrap_or_default()
            .contains(") Z ")
}

impl Drop for Mount {
    fn drop(&mut self) {
        // Already unmounted (and the daemon gone), or killed: nothing to do.
        let done = self.killed.get() || (!is_mounted(&self.mp) && !self.pid_alive());
        if !done && (self.unmount().is_err() || is_mounted(&self.mp)) {
            self.kill_all();
            lazy_unmount(&self.mp);
        }
        // Never delete the temp dir through a live mount (after kill9 the
        // mount point may carry another mount): leak it instead.
        if is_mounted(&self.mp) && self.mp.starts_with(self.dir.as_ref().unwrap().path()) {
            std::mem::forget(self.dir.take());
        }
    }
}

/// `fusermount3 -u -z`, falling back to `umount -l`: detach the mount at
/// `mp` even when its daemon is dead or the mount busy.
pub fn lazy_unmount(mp: &Path) {
    let _ = Command::new("fusermount3")
        .args(["-u", "-z"])
        .arg(mp)
        .stderr(Stdio::null())
        .status();
    if is_mounted(mp) {
        let _ = Command::new("umount")
            .arg("-l")
            .arg(mp)
            .stderr(Stdio::null())
            .status();
    }
}

/// `kill -SIG pid`, ignoring failure.
pub fn kill(pid: u32, sig: &str) {
    let _ = Command::new("kill")
        .args([format!("-{sig}"), pid.to_string()])
        .stderr(Stdio::null())
        .status();
}

/// Run ggfs-mountd with a 120 s limit.
pub fn run_mountd(args: &[&OsStr], extra: &[&str]) -> Output {
    let mut cmd = Command::new(mountd());
    cmd.args(args).args(extra).stdin(Stdio::null());
    let child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn ggfs-mountd");
    within(120, "ggfs-mountd", move || {
        child.wait_with_output().expect("wait ggfs-mountd")
    })
}

/// Assert that a mounted tree equals an unpacked one, every mtime included
/// (bounded: a broken mount fails the test instead of hanging it).
pub fn assert_same_tree(mounted: &Path, expected: &Path) {
    let (m, e) = (mounted.to_path_buf(), expected.to_path_buf());
    within(300, "comparing the mount", move || {
        super::tree::assert_same(&m, &e, super::tree::Mtimes::All)
    });
}
