//! A real CNCF distribution registry (`docker-registry serve`) on a free
//! loopback port, with its storage in a temp dir.

use std::fs::{self, File};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::{free_port, run, tempdir, TokenServer};

const BIN: &str = "docker-registry";

pub struct Distribution {
    child: Child,
    addr: String,
    dir: tempfile::TempDir,
}

impl Distribution {
    /// An anonymous registry with delete enabled.
    pub fn start() -> Distribution {
        Self::start_with_auth(|_| String::new())
    }

    /// A registry requiring HTTP Basic credentials `user`/`pass` (bcrypt htpasswd).
    pub fn start_htpasswd(user: &str, pass: &str) -> Distribution {
        Self::start_with_auth(|dir| {
            let line = run(Command::new("htpasswd").args(["-Bbn", user, pass]));
            let file = dir.join("htpasswd");
            fs::write(&file, line.trim_end()).expect("write htpasswd");
            format!(
                "auth:\n  htpasswd:\n    realm: ggfs-test\n    path: {}\n",
                file.display()
            )
        })
    }

    /// A registry delegating auth to `tokens` (Bearer tokens, distribution
    /// token-auth spec).
    pub fn start_token(tokens: &TokenServer) -> Distribution {
        let section = format!(
            "auth:\n  token:\n    realm: {}\n    service: {}\n    issuer: {}\n    rootcertbundle: {}\n",
            tokens.realm(),
            tokens.service(),
            tokens.issuer(),
            tokens.cert_path().display()
        );
        Self::start_with_auth(move |_| section.clone())
    }

    /// `auth` returns the config's `auth:` section (may be empty); it is
    /// given the registry's private directory for files it needs.
    fn start_with_auth(auth: impl Fn(&Path) -> String) -> Distribution {
        if which(BIN).is_none() {
            panic!("docker-registry not found: run scripts/test.sh (it installs it)");
        }
        let mut dir = tempdir();
        let auth = auth(dir.path());
        // The port is free when probed but may be taken before the registry
        // binds it: retry with another.
        let mut last_log = String::new();
        for _ in 0..5 {
            let addr = format!("127.0.0.1:{}", free_port());
            let config = dir.path().join("config.yml");
            fs::write(
                &config,
                config_yaml(&addr, &dir.path().join("storage"), &auth),
            )
            .expect("write registry config");
            let log = dir.path().join("registry.log");
            let child = spawn(&config, &log);
            let mut reg = Distribution { child, addr, dir };
            match reg.wait_ready() {
                Ok(()) => return reg,
                Err(log) => {
                    last_log = log;
                    dir = reg.into_dir();
                }
            }
        }
        panic!("docker-registry did not start:\n{last_log}");
    }

    /// `127.0.0.1:PORT`.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// `127.0.0.1:PORT/<repo_and_tag>`.
    pub fn reference(&self, repo_and_tag: &str) -> String {
        format!("{}/{}", self.addr, repo_and_tag)
    }

    /// Root of the filesystem storage driver; blobs live under
    /// `docker/registry/v2/blobs/sha256/<xx>/<hex>/data`.
    pub fn storage(&self) -> PathBuf {
        self.dir.path().join("storage")
    }

    /// Where the registry keeps the blob `sha256:<hex>` (to corrupt it).
    pub fn blob_path(&self, digest: &str) -> PathBuf {
        let hex = digest.strip_prefix("sha256:").unwrap_or(digest);
        self.storage()
            .join("docker/registry/v2/blobs/sha256")
            .join(&hex[..2])
            .join(hex)
            .join("data")
    }

    /// The registry's log so far (warnings and errors only).
    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.path().join("registry.log")).unwrap_or_default()
    }

    /// Stops the registry (storage kept); requests fail until [`Self::restart`].
    pub fn kill(&mut self) {
        self.stop();
    }

    /// Starts the registry again on the same port, config and storage.
    pub fn restart(&mut self) {
        self.stop();
        let dir = self.dir.path();
        self.child = spawn(&dir.join("config.yml"), &dir.join("registry.log"));
        if let Err(log) = self.wait_ready() {
            panic!("docker-registry did not restart on {}: {log}", self.addr);
        }
    }

    /// Freezes the process (SIGSTOP): connections are accepted by the kernel
    /// but never answered, like a hung registry. Undo with [`Self::resume`].
    /// SIGSTOP, returning only once every thread is stopped: kill(1)
    /// returns before the kernel has stopped them all.
    pub fn pause(&self) {
        self.signal("STOP");
        let tasks = format!("/proc/{}/task", self.child.id());
        for _ in 0..200 {
            let stopped = std::fs::read_dir(&tasks).map(|d| {
                d.filter_map(|t| t.ok()).all(|t| {
                    let stat = std::fs::read_to_string(t.path().join("stat")).unwrap_or_default();
                    stat.rsplit_once(')')
                        .is_some_and(|(_, rest)| rest.trim_start().starts_with('T'))
                })
            });
            if stopped.unwrap_or(false) {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        panic!("registry {} did not stop", self.addr);
    }

    pub fn resume(&self) {
        self.signal("CONT");
    }

    fn signal(&self, sig: &str) {
        run(Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.child.id().to_string()));
    }

    fn wait_ready(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(format!("exited with {status}: {}", self.log()));
            }
            if http_get(&self.addr, "/v2/").is_ok() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Err(format!(
            "no answer on {} within 20s: {}",
            self.addr,
            self.log()
        ))
    }

    fn into_dir(mut self) -> tempfile::TempDir {
        self.stop();
        let dir = tempfile::Builder::new().tempdir().expect("temp dir");
        std::mem::replace(&mut self.dir, dir)
    }

    fn stop(&mut self) {
        // A paused process must be continued for SIGKILL to be reaped promptly.
        let _ = Command::new("kill")
            .args(["-CONT", &self.child.id().to_string()])
            .stderr(Stdio::null())
            .status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Distribution {
    fn drop(&mut self) {
        self.stop();
    }
}

fn config_yaml(addr: &str, storage: &Path, auth: &str) -> String {
    format!(
        "version: 0.1\n\
         log:\n  level: warn\n  accesslog:\n    disabled: true\n\
         storage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\n  \
         maintenance:\n    uploadpurging:\n      enabled: false\n\
         http:\n  addr: {addr}\n  secret: ggfs-test-secret\n\
         {auth}",
        storage.display()
    )
}

fn spawn(config: &Path, log: &Path) -> Child {
    let log = File::create(log).expect("create registry log");
    Command::new(BIN)
        .arg("serve")
        .arg(config)
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("dup log"))
        .stderr(log)
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {BIN}: {e}"))
}

/// The first match for `name` on PATH.
pub(crate) fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// A minimal HTTP/1.0 GET: (status, body). For readiness probes and quick
/// assertions without an HTTP client.
pub fn http_get(addr: &str, path: &str) -> std::io::Result<(u16, Vec<u8>)> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf)?;
    let bad = || std::io::Error::other(format!("bad HTTP answer from {addr}"));
    let head_end = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(bad)?;
    let status = std::str::from_utf8(&buf[..head_end])
        .ok()
        .and_then(|h| h.split(' ').nth(1))
        .and_then(|c| c.parse().ok())
        .ok_or_else(bad)?;
    Ok((status, buf[head_end + 4..].to_vec()))
}

/// `ggfs registry serve` (the embedded registry, as a user runs it) on a
/// free loopback port, killed on drop.
pub struct GgfsRegistry {
    child: std::process::Child,
    pub addr: String,
}

impl GgfsRegistry {
    pub fn start() -> Self {
        let addr = format!("127.0.0.1:{}", super::free_port());
        let child = Command::new(super::ggfs_bin())
            .args(["registry", "serve", "--address", &addr])
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let server = GgfsRegistry { child, addr };
        for _ in 0..100 {
            if std::net::TcpStream::connect(&server.addr).is_ok() {
                return server;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        panic!("{} never listened", server.addr);
    }

    /// `HOST:PORT/repo[:tag]` on this registry.
    pub fn reference(&self, repo_and_tag: &str) -> String {
        format!("{}/{repo_and_tag}", self.addr)
    }
}

impl Drop for GgfsRegistry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
