//! Faults. A destination registry killed in the middle of a copy: the copy
//! fails naming it, the tag never appears half-pushed, and rerunning the
//! command once the registry is back finishes the job without sending the
//! blobs that already landed; the result is the source's image, whole. A
//! registry killed under a mount: an error for what needs it, the right
//! bytes once it is back. A full cache disk: reads still right.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{CountingProxy, Distribution};

const LAYER: usize = 6 << 20;

/// Three directories, each a layer of incompressible bytes.
fn three_layer_image(reg: &Distribution, image: &str) {
    let work = common::tempdir();
    let mut args = vec!["append".to_string()];
    for i in 0..3 {
        let dir = work.path().join(format!("l{i}"));
        std::fs::create_dir(&dir).unwrap();
        std::fs::write(dir.join("data"), common::pseudo_random(LAYER, 100 + i)).unwrap();
        args.extend(["-f".into(), dir.display().to_string()]);
    }
    args.extend([
        "--layer-format".into(),
        "none".into(),
        "-t".into(),
        reg.reference(image),
    ]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    common::ggfs(&args);
}

#[test]
fn copy_killed_mid_push_resumes_without_resending() {
    let src = Distribution::start();
    three_layer_image(&src, "f/app:v1");
    let mut dst = Distribution::start();
    let proxy = CountingProxy::start(dst.addr());
    let target = format!("{}/f/app:v1", proxy.addr());

    // One blob at a time; kill the registry once the first layer is in.
    let mut copy = Command::new(common::ggfs_bin())
        .args(["copy", "-j", "1", &src.reference("f/app:v1"), &target])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    while proxy.bytes_up() < (LAYER + LAYER / 2) as u64 {
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "copy never got going"
        );
        assert!(
            copy.try_wait().unwrap().is_none(),
            "copy ended before the kill"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    dst.kill();
    let out = copy.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "copy succeeded with the registry killed"
    );
    assert!(err.contains(proxy.addr()), "{err}");

    dst.restart();
    let (code, _) = common::http_get(dst.addr(), "/v2/f/app/manifests/v1").unwrap();
    assert_eq!(code, 404, "the tag moved before all blobs were pushed");
    proxy.reset();
    common::ggfs(&["copy", "-j", "1", &src.reference("f/app:v1"), &target]);
    let up = proxy.bytes_up();
    assert!(
        up < (2 * LAYER) as u64 + (LAYER / 2) as u64,
        "the rerun sent {up} bytes: the layer already pushed went again"
    );
    common::ggfs(&["validate", &target]);
    assert_eq!(
        common::ggfs(&["digest", &target]),
        common::ggfs(&["digest", &src.reference("f/app:v1")])
    );
}

/// An eStargz image of `files` (name, bytes) pushed as `image`.
fn estargz_image(reg: &Distribution, image: &str, files: &[(&str, Vec<u8>)]) {
    let work = common::tempdir();
    for (name, data) in files {
        std::fs::write(work.path().join(name), data).unwrap();
    }
    common::ggfs(&[
        "append",
        "--layer-format",
        "estargz",
        "-f",
        work.path().to_str().unwrap(),
        "-t",
        &reg.reference(image),
    ]);
}

fn read(p: &std::path::Path) -> std::io::Result<Vec<u8>> {
    let p = p.to_path_buf();
    common::mount::within(120, "read", move || std::fs::read(p))
}

/// The registry killed under a mount: a read that needs it fails with an
/// error (not wrong bytes, not a hang), what was already read still reads,
/// and once the registry is back the same read returns the right bytes.
#[test]
fn registry_killed_under_a_mount_then_back() {
    let mut reg = Distribution::start();
    let (a, b) = (
        common::pseudo_random(300_000, 1),
        common::pseudo_random(300_000, 2),
    );
    estargz_image(
        &reg,
        "f/lazy:v1",
        &[("a.bin", a.clone()), ("b.bin", b.clone())],
    );
    let m = common::mount::Mount::start(reg.addr(), &["--fetch-after", "never"]);
    let rootfs = m.path("f/lazy/v1/rootfs");
    assert_eq!(read(&rootfs.join("a.bin")).unwrap(), a);
    reg.kill();
    let e = read(&rootfs.join("b.bin")).expect_err("read with the registry gone");
    assert!(
        matches!(e.raw_os_error(), Some(libc::EIO) | Some(libc::ETIMEDOUT)),
        "{e}"
    );
    assert_eq!(read(&rootfs.join("a.bin")).unwrap(), a, "cached bytes lost");
    reg.restart();
    assert_eq!(read(&rootfs.join("b.bin")).unwrap(), b);
    assert!(m.pid_alive());
}

/// A cache on a full disk (a 1 MiB tmpfs): reads still return the right
/// bytes from the network, and what could not be written whole is never
/// taken from the cache later (a second mount on it reads right too).
#[test]
fn full_cache_disk_still_serves_right_bytes() {
    let reg = Distribution::start();
    let files: Vec<(String, Vec<u8>)> = (0..4)
        .map(|i| (format!("f{i}.bin"), common::pseudo_random(700_000, 10 + i)))
        .collect();
    let refs: Vec<(&str, Vec<u8>)> = files.iter().map(|(n, d)| (n.as_str(), d.clone())).collect();
    estargz_image(&reg, "f/full:v1", &refs);
    let work = common::tempdir();
    let cache = work.path().join("cache");
    std::fs::create_dir(&cache).unwrap();
    common::run(
        Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=1m", "tmpfs"])
            .arg(&cache),
    );
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
    let _guard = Unmount(cache.clone());
    for round in 0..2 {
        let m = common::mount::Mount::start_with_cache(
            reg.addr(),
            &["--fetch-after", "never"],
            Some(&cache),
        );
        for (name, data) in &files {
            let got = read(&m.path(&format!("f/full/v1/rootfs/{name}")))
                .unwrap_or_else(|e| panic!("round {round}: {name}: {e}\n{}", m.log()));
            assert!(got == *data, "round {round}: {name} differs");
        }
        if round == 0 {
            let log = m.log();
            assert!(
                log.contains("No space left on device"),
                "the cache never filled up: {log}"
            );
        }
    }
}
