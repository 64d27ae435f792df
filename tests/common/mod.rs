//! Shared integration-test harness: real registries (CNCF distribution),
//! a token server, a byte-counting proxy, containerd-based eStargz /
//! zstd:chunked conversion and generated image fixtures.
//!
//! Use from a test file with `mod common;`. Every helper talks to real
//! binaries (docker-registry, skopeo, umoci, containerd, ctr-remote);
//! `scripts/setup.sh` installs them.
#![allow(dead_code, unused_imports)]

pub mod client;
mod convert;
mod fixtures;
pub mod mount;
mod proxy;
mod registry;
mod token;
pub mod tree;

pub use convert::{estargz_image, zstdchunked_image, Containerd};
pub use fixtures::{
    fixture_rootfs, fixtures_dir, index_two_platforms, multilayer_image, pseudo_random,
    push_oci_layout, push_oci_layout_v2s2, umoci_image, umoci_image_from, MULTILAYER_TAG,
};
pub use proxy::{CountingProxy, ProxyRequest, Unavailable, Wan, UNAVAILABLE_BODY};
pub use registry::{http_get, Distribution, GgfsRegistry};
pub use token::{TokenOptions, TokenRequest, TokenServer};

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// Path of the `ggfs` CLI built for this test run. Resolved at run time so
/// test crates without that binary (e.g. mountd's) still compile.
pub fn ggfs_bin() -> PathBuf {
    match option_env!("CARGO_BIN_EXE_ggfs") {
        Some(p) => PathBuf::from(p),
        None => sibling_bin("ggfs"),
    }
}

/// Path of the `ggfs-mountd` daemon: cargo only exports `CARGO_BIN_EXE_*` for
/// the test's own package, so look next to the test executable's target dir.
pub fn mountd_bin() -> PathBuf {
    match option_env!("CARGO_BIN_EXE_ggfs-mountd") {
        Some(p) => PathBuf::from(p),
        None => sibling_bin("ggfs-mountd"),
    }
}

/// `target/<profile>/<name>`, found from the running test binary
/// (`target/<profile>/deps/<test>-<hash>`), whether or not it exists.
pub fn bin_path(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let profile_dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("test binary lives in target/<profile>/deps");
    profile_dir.join(name)
}

/// [`bin_path`], which must exist.
fn sibling_bin(name: &str) -> PathBuf {
    let bin = bin_path(name);
    assert!(
        bin.exists(),
        "{} not built: run `cargo build --workspace` first",
        bin.display()
    );
    bin
}

/// Runs a command, panicking with its stderr when it fails; returns stdout.
pub fn run(cmd: &mut Command) -> String {
    let out = output(cmd);
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs a command, panicking with its stdout and stderr when it fails.
pub fn output(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot spawn {cmd:?}: {e}"));
    if !out.status.success() {
        panic!(
            "{cmd:?} failed ({}):\nstdout: {}\nstderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    out
}

/// `skopeo copy` without TLS verification on either side (the test
/// registries speak plain HTTP on loopback).
pub fn skopeo_copy(src: &str, dst: &str) {
    skopeo_copy_with(&[], src, dst);
}

/// `skopeo copy` with extra flags, e.g. `&["--all"]` or `&["--format", "v2s2"]`.
pub fn skopeo_copy_with(extra: &[&str], src: &str, dst: &str) {
    run(Command::new("skopeo")
        .args(["copy", "--quiet"])
        .args(["--src-tls-verify=false", "--dest-tls-verify=false"])
        .args(extra)
        .args([src, dst]));
}

/// `umoci unpack` of `layout:tag` into `bundle`; returns the bundle's rootfs.
pub fn umoci_unpack(layout: &Path, tag: &str, bundle: &Path) -> PathBuf {
    run(Command::new("umoci")
        .args(["unpack", "--image"])
        .arg(format!("{}:{tag}", layout.display()))
        .arg(bundle));
    bundle.join("rootfs")
}

/// podman with its own storage under `root` (vfs: a layer is a plain
/// directory), so tests neither share nor need the host's.
fn podman(root: &Path) -> Command {
    let mut c = Command::new("podman");
    c.arg("--root")
        .arg(root.join("storage"))
        .arg("--runroot")
        .arg(root.join("run"))
        .args(["--storage-driver", "vfs"]);
    c
}

/// podman pulls `reference` (plain HTTP) into storage under `root`: its
/// merged tree, as `podman image mount` shows it, copied to `root/rootfs`.
pub fn podman_rootfs(reference: &str, root: &Path) -> PathBuf {
    run(podman(root).args(["pull", "-q", "--tls-verify=false", reference]));
    let mounted = run(podman(root).args(["image", "mount", reference]));
    let rootfs = root.join("rootfs");
    run(Command::new("cp")
        .arg("-a")
        .arg(mounted.trim())
        .arg(&rootfs));
    run(podman(root).args(["image", "umount", "-a"]));
    rootfs
}

/// Extracts `tar` into `dest` as root would, keeping numeric owners, modes
/// and xattrs; returns `dest`.
pub fn untar(tar: &Path, dest: &Path) -> PathBuf {
    std::fs::create_dir_all(dest).unwrap();
    run(Command::new("tar")
        .args([
            "--numeric-owner",
            "--same-owner",
            "--xattrs",
            "--xattrs-include=*",
            "-xpf",
        ])
        .arg(tar)
        .arg("-C")
        .arg(dest));
    dest.to_path_buf()
}

/// The raw manifest (or index) of `image` (a skopeo transport reference such
/// as `docker://127.0.0.1:5000/foo:tag` or `oci:/path:tag`), parsed.
pub fn skopeo_inspect_raw(image: &str) -> serde_json::Value {
    let out = skopeo_raw(image);
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("manifest of {image}: {e}: {out}"))
}

/// The raw manifest (or index) of `image` exactly as skopeo prints it.
pub fn skopeo_raw(image: &str) -> String {
    run(Command::new("skopeo").args(["inspect", "--raw", "--tls-verify=false", image]))
}

/// A fresh temporary directory under /tmp named `ggfs-test-*` (scripts/test.sh
/// unmounts leftover FUSE mounts below such directories).
pub fn tempdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("ggfs-test-")
        .tempdir()
        .expect("create temp dir")
}

/// A loopback port that was free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind 127.0.0.1:0")
        .port()
}

/// sha256 of `data` as `sha256:<hex>`.
pub fn sha256_digest(data: &[u8]) -> String {
    use sha2::Digest as _;
    format!("sha256:{}", hex::encode(sha2::Sha256::digest(data)))
}

/// Bytes of the files below `dir`, recursively (0 where unreadable).
pub fn dir_size(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| match e.metadata() {
                    Ok(md) if md.is_dir() => dir_size(&e.path()),
                    Ok(md) => md.len(),
                    Err(_) => 0,
                })
                .sum()
        })
        .unwrap_or(0)
}

/// Runs `ggfs args…` expecting success; returns its stdout.
pub fn ggfs(args: &[&str]) -> String {
    run(Command::new(ggfs_bin()).args(args))
}

/// Runs `ggfs args…` expecting failure; returns its stderr, which must be
/// one line and no panic.
pub fn ggfs_fails(args: &[&str]) -> String {
    let out = Command::new(ggfs_bin()).args(args).output().unwrap();
    assert!(!out.status.success(), "ggfs {args:?} succeeded");
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(err.trim_end().lines().count(), 1, "not one line: {err}");
    assert!(!err.contains("panicked"), "{err}");
    err
}
