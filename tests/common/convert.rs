//! eStargz and zstd:chunked images made by the real converter: a private
//! containerd (own root, state and socket, no CRI) driven by ctr-remote.

use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::{run, skopeo_inspect_raw, Distribution};

const NAMESPACE: &str = "ggfs-test";
pub const TOC_DIGEST: &str = "containerd.io/snapshot/stargz/toc.digest";
const ZSTD_MEDIA: &str = "application/vnd.oci.image.layer.v1.tar+zstd";

/// A containerd daemon under `/tmp/ggfs-ctrd-<pid>-<n>`, stopped on drop.
pub struct Containerd {
    child: Child,
    dir: PathBuf,
    socket: PathBuf,
}

impl Containerd {
    pub fn start() -> Containerd {
        let dir = unique_dir();
        let socket = dir.join("c.sock");
        let config = dir.join("config.toml");
        fs::write(&config, config_toml(&dir, &socket)).expect("write containerd config");
        let log = File::create(dir.join("containerd.log")).expect("containerd log");
        let child = Command::new("containerd")
            .arg("--config")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup log"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn containerd: {e}"));
        let mut c = Containerd { child, dir, socket };
        c.wait_ready();
        c
    }

    /// `ctr-remote` bound to this daemon and the test namespace.
    pub fn ctr(&self) -> Command {
        let mut cmd = Command::new("ctr-remote");
        cmd.arg("--address")
            .arg(&self.socket)
            .args(["--namespace", NAMESPACE]);
        cmd
    }

    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.join("containerd.log")).unwrap_or_default()
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("containerd exited with {status}:\n{}", self.log());
            }
            let ok = self.socket.exists()
                && self
                    .ctr()
                    .arg("version")
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status()
                    .map(|s| s.success())
                    .unwrap_or(false);
            if ok {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("containerd not ready after 30s:\n{}", self.log());
    }

    /// Fetches `src` (plain HTTP), converts it with `flags` and pushes the
    /// result as `dst` (plain HTTP). References are full (`127.0.0.1:P/r:t`).
    pub fn convert(&self, src: &str, dst: &str, flags: &[&str]) {
        // `content fetch` records the image without unpacking it: no
        // snapshotter mounts are needed.
        run(self.ctr().args(["content", "fetch", "--plain-http", src]));
        run(self
            .ctr()
            .args(["image", "convert"])
            .args(flags)
            .args(["--oci", src, dst]));
        run(self.ctr().args(["image", "push", "--plain-http", dst]));
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = fs::remove_dir_all(&self.dir);
    }
}

fn unique_dir() -> PathBuf {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    let n = N.fetch_add(1, Ordering::SeqCst);
    let dir = PathBuf::from(format!("/tmp/ggfs-ctrd-{}-{n}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).expect("create containerd dir");
    dir
}

fn config_toml(dir: &Path, socket: &Path) -> String {
    format!(
        r#"version = 2
root = "{root}"
state = "{state}"
disabled_plugins = [
  "io.containerd.grpc.v1.cri",
  "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.zfs",
  "io.containerd.snapshotter.v1.aufs",
  "io.containerd.snapshotter.v1.devmapper",
]
[grpc]
  address = "{sock}"
[ttrpc]
  address = "{sock}.ttrpc"
[debug]
  address = ""
  level = "warn"
[metrics]
  address = ""
"#,
        root = dir.join("root").display(),
        state = dir.join("state").display(),
        sock = socket.display(),
    )
}

/// Converts `src_repo` (e.g. `fixture:latest`, in `registry`) to eStargz
/// and pushes it as `dst_repo`; returns the pushed manifest after checking
/// that every layer carries the TOC digest annotation.
pub fn estargz_image(registry: &Distribution, src_repo: &str, dst_repo: &str) -> serde_json::Value {
    convert_checked(registry, src_repo, dst_repo, &["--estargz"], |layer| {
        layer["annotations"][TOC_DIGEST].is_string()
    })
}

/// Like [`estargz_image`] for zstd:chunked: layers must be `tar+zstd` and
/// carry the zstd:chunked manifest-position annotation.
pub fn zstdchunked_image(
    registry: &Distribution,
    src_repo: &str,
    dst_repo: &str,
) -> serde_json::Value {
    convert_checked(registry, src_repo, dst_repo, &["--zstdchunked"], |layer| {
        layer["mediaType"] == ZSTD_MEDIA
            && layer["annotations"]["io.containers.zstd-chunked.manifest-position"].is_string()
    })
}

fn convert_checked(
    registry: &Distribution,
    src_repo: &str,
    dst_repo: &str,
    flags: &[&str],
    layer_ok: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let (src, dst) = (registry.reference(src_repo), registry.reference(dst_repo));
    Containerd::start().convert(&src, &dst, flags);
    let manifest = skopeo_inspect_raw(&format!("docker://{dst}"));
    let layers = manifest["layers"].as_array().cloned().unwrap_or_default();
    assert!(
        !layers.is_empty() && layers.iter().all(&layer_ok),
        "{dst} is not the expected {flags:?} conversion: {manifest:#}"
    );
    manifest
}
