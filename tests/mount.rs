//! Real FUSE mounts of a real registry by the `ggfs-mountd` binary, checked
//! against `umoci unpack` of the same images.
//!
//! Every wait has a timeout, and every mount is unmounted (and its daemon
//! killed if need be) on drop, so a broken daemon fails a test instead of
//! hanging it.

mod common;

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::mount::{assert_same_tree, is_mounted, kill, mountd, run_mountd, within, Mount};
use common::{CountingProxy, Distribution};

/// `umoci unpack` of `layout:tag` into a temp dir; returns (dir, rootfs).
fn unpack(layout: &Path, tag: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = common::tempdir();
    let bundle = dir.path().join("bundle");
    common::run(
        Command::new("umoci")
            .args(["unpack", "--image"])
            .arg(format!("{}:{tag}", layout.display()))
            .arg(&bundle),
    );
    (dir, bundle.join("rootfs"))
}

/// An OCI layout holding the every-file-type fixture as `latest`.
fn fixture_layout() -> tempfile::TempDir {
    let dir = common::tempdir();
    common::umoci_image(&dir.path().join("layout"), "latest");
    dir
}

fn read_string(p: &Path) -> String {
    let p = p.to_path_buf();
    within(60, "read", move || {
        std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
    })
}

#[test]
fn every_file_type_matches_umoci_unpack() {
    let reg = Distribution::start();
    let layouts = fixture_layout();
    let layout = layouts.path().join("layout");
    common::push_oci_layout(&layout, "latest", &reg.reference("fixture/all:latest"));
    let (_u, expected) = unpack(&layout, "latest");
    let m = Mount::start(reg.addr(), &[]);
    assert_same_tree(&m.path("fixture/all/latest/rootfs"), &expected);

    // The image's own files.
    let manifest =
        common::skopeo_inspect_raw(&format!("docker://{}", reg.reference("fixture/all:latest")));
    let raw = std::fs::read(m.path("fixture/all/latest/manifest.json")).unwrap();
    let parsed: serde_json::Value = serde_json::from_slice(&raw).unwrap();
    assert_eq!(parsed, manifest);
    let digest = common::sha256_digest(&raw);
    assert_eq!(
        read_string(&m.path("fixture/all/latest/digest")).trim(),
        digest
    );
    let config = std::fs::read(m.path("fixture/all/latest/config.json")).unwrap();
    assert_eq!(
        common::sha256_digest(&config),
        manifest["config"]["digest"].as_str().unwrap()
    );
    let layer = manifest["layers"][0]["digest"].as_str().unwrap();
    let blob = std::fs::read(m.path(&format!("fixture/all/latest/blobs/{layer}"))).unwrap();
    assert_eq!(common::sha256_digest(&blob), layer);
    // The same image by digest, and the namespace listings.
    let by_digest = m.path(&format!("fixture/all/{digest}/rootfs/small.txt"));
    assert_eq!(read_string(&by_digest), "hello ggfs\n");
    let names = |p: &str| -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(m.path(p))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    };
    assert_eq!(names(""), [".ggfs", "fixture"]);
    assert_eq!(names("fixture"), ["all"]);
    assert_eq!(names("fixture/all"), ["latest"]);
    assert_eq!(
        names("fixture/all/latest"),
        [
            "blobs",
            "config.json",
            "digest",
            "manifest.json",
            "referrers",
            "rootfs"
        ]
    );
    // Probes for names that do not exist fail cleanly.
    assert!(!m.path("fixture/all/.git").exists());
    assert!(!m.path("nosuchrepo").exists());
    assert!(!m.path("fixture/all/nosuchtag").exists());

    // An image by digest is read-only (a tag's rootfs is not: tests/write.rs).
    let err =
        std::fs::write(m.path(&format!("fixture/all/{digest}/rootfs/new")), b"x").unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc_erofs()), "{err}");
    // statfs reports the cache: 10 GiB by default.
    let st = common::run(Command::new("stat").args(["-f", "-c", "%b %S"]).arg(m.mp()));
    let v: Vec<u64> = st.split_whitespace().map(|x| x.parse().unwrap()).collect();
    assert_eq!(v[0] * v[1], 10 << 30, "{st}");
    let stats = read_string(&m.path(".ggfs/stats"));
    assert!(stats.contains(&format!("blob {layer}")), "{stats}");
    assert!(stats.contains("cache_misses"), "{stats}");
}

fn libc_erofs() -> i32 {
    30
}

#[test]
fn multilayer_whiteouts_match_umoci_unpack() {
    let reg = Distribution::start();
    let layout = common::multilayer_image();
    let tag = common::MULTILAYER_TAG;
    common::push_oci_layout(layout, tag, &reg.reference(&format!("multi:{tag}")));
    let (_u, expected) = unpack(layout, tag);
    let m = Mount::start(reg.addr(), &[]);
    let root = m.path(&format!("multi/{tag}/rootfs"));
    assert_same_tree(&root, &expected);
    assert_eq!(read_string(&root.join("base/keep.txt")), "v3\n");
    assert!(!root.join("opq/old1").exists());
    assert!(!root.join("gone_dir").exists());
}

#[test]
fn docker_media_types_match_umoci_unpack() {
    let reg = Distribution::start();
    let layouts = fixture_layout();
    let layout = layouts.path().join("layout");
    common::push_oci_layout_v2s2(&layout, "latest", &reg.reference("docker/img:v1"));
    let manifest =
        common::skopeo_inspect_raw(&format!("docker://{}", reg.reference("docker/img:v1")));
    assert_eq!(
        manifest["mediaType"],
        "application/vnd.docker.distribution.manifest.v2+json"
    );
    let (_u, expected) = unpack(&layout, "latest");
    let m = Mount::start(reg.addr(), &[]);
    assert_same_tree(&m.path("docker/img/v1/rootfs"), &expected);
}

#[test]
fn index_shows_one_directory_per_platform() {
    let reg = Distribution::start();
    let dir = common::tempdir();
    let layout = dir.path().join("layout");
    common::index_two_platforms(&layout, "multi");
    common::push_oci_layout(&layout, "multi", &reg.reference("plat:multi"));
    let m = Mount::start(reg.addr(), &[]);
    let mut names: Vec<String> = std::fs::read_dir(m.path("plat/multi"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            "digest",
            "linux-amd64",
            "linux-arm64",
            "manifest.json",
            "referrers"
        ]
    );
    for arch in ["amd64", "arm64"] {
        let got = read_string(&m.path(&format!("plat/multi/linux-{arch}/rootfs/arch")));
        assert_eq!(got, format!("{arch}\n"));
        let (_u, expected) = unpack(&layout, &format!("multi-{arch}"));
        assert_same_tree(
            &m.path(&format!("plat/multi/linux-{arch}/rootfs")),
            &expected,
        );
    }
    let index = std::fs::read(m.path("plat/multi/manifest.json")).unwrap();
    let parsed: serde_json::Value = serde_json::from_slice(&index).unwrap();
    assert_eq!(parsed["manifests"].as_array().unwrap().len(), 2);
    // --platform keeps one platform's directory.
    let arm = Mount::start(reg.addr(), &["--platform", "linux/arm64"]);
    assert_eq!(
        names_in(&arm.path("plat/multi")),
        ["digest", "linux-arm64", "manifest.json", "referrers"]
    );
}

/// A tiny image with a dynamically linked /bin/sh taken from this machine.
fn shell_tree() -> tempfile::TempDir {
    let dir = common::tempdir();
    let root = dir.path();
    let sh = std::fs::canonicalize("/bin/sh").unwrap();
    let ldd = common::run(Command::new("ldd").arg(&sh));
    let mut files = vec![sh.clone()];
    for line in ldd.lines() {
        let path = line.split_whitespace().find(|w| w.starts_with('/'));
        if let Some(p) = path {
            files.push(PathBuf::from(p));
        }
    }
    for f in &files {
        let dest = root.join(f.strip_prefix("/").unwrap());
        std::fs::create_dir_all(dest.parent().unwrap()).unwrap();
        std::fs::copy(f, &dest).unwrap();
    }
    std::fs::create_dir_all(root.join("bin")).unwrap();
    let rel = sh.strip_prefix("/").unwrap();
    if root.join("bin/sh") != root.join(rel) {
        std::os::unix::fs::symlink(Path::new("/").join(rel), root.join("bin/sh")).unwrap();
    }
    dir
}

#[test]
fn chroot_runs_a_shell_from_the_mount() {
    let reg = Distribution::start();
    let tree = shell_tree();
    let dir = common::tempdir();
    let layout = dir.path().join("layout");
    common::umoci_image_from(&layout, "sh", tree.path());
    common::push_oci_layout(&layout, "sh", &reg.reference("shell:sh"));
    let m = Mount::start(reg.addr(), &[]);
    let root = m.path("shell/sh/rootfs");
    let out = within(60, "chroot", move || {
        Command::new("chroot")
            .arg(&root)
            .args(["/bin/sh", "-c", "echo hello from $0"])
            .output()
            .unwrap()
    });
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "hello from /bin/sh\n");
}

#[test]
fn corrupted_blob_gives_eio() {
    let reg = Distribution::start();
    let layouts = fixture_layout();
    let layout = layouts.path().join("layout");
    common::push_oci_layout(&layout, "latest", &reg.reference("bad:latest"));
    let manifest = common::skopeo_inspect_raw(&format!("docker://{}", reg.reference("bad:latest")));
    let layer = manifest["layers"][0]["digest"]
        .as_str()
        .unwrap()
        .to_string();
    let path = reg.blob_path(&layer);
    let mut bytes = std::fs::read(&path).unwrap();
    let n = bytes.len();
    bytes[n / 2] ^= 0xff;
    std::fs::write(&path, &bytes).unwrap();
    let m = Mount::start(reg.addr(), &[]);
    let p = m.path("bad/latest/rootfs/small.txt");
    let err = within(60, "read", move || std::fs::read(&p)).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(5), "want EIO, got {err}");
    let b = m.path(&format!("bad/latest/blobs/{layer}"));
    let err = within(60, "read", move || std::fs::read(&b)).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(5), "want EIO, got {err}");
    assert!(
        m.log().contains(&layer),
        "log does not name the blob:\n{}",
        m.log()
    );
}

#[test]
fn unmount_leaves_no_process_and_no_mount() {
    let reg = Distribution::start();
    let m = Mount::start(reg.addr(), &[]);
    assert!(m.pid_alive());
    m.unmount().unwrap();
    assert!(!is_mounted(m.mp()));
    assert!(!m.pid_alive());

    // SIGTERM unmounts too.
    let m2 = Mount::start(reg.addr(), &[]);
    kill(m2.pid(), "TERM");
    let deadline = Instant::now() + Duration::from_secs(10);
    while m2.pid_alive() || is_mounted(m2.mp()) {
        assert!(Instant::now() < deadline, "daemon did not exit on SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn mount_on_the_mount_point_of_a_killed_daemon_clears_it_and_serves() {
    let reg = Distribution::start();
    common::push_oci_layout(
        &fixture_layout().path().join("layout"),
        "latest",
        &reg.reference("stale/app:v1"),
    );
    let dir = common::tempdir();
    let mp = dir.path().join("mnt");
    std::fs::create_dir(&mp).unwrap();
    let dead = Mount::start_at(reg.addr(), &[], &mp, None);
    assert!(mp.join("stale/app/v1/digest").exists());
    // Both: a supervisor alone would start another daemon.
    dead.kill_all();
    let deadline = Instant::now() + Duration::from_secs(10);
    while dead.pid_alive() {
        assert!(Instant::now() < deadline, "daemon alive after SIGKILL");
        std::thread::sleep(Duration::from_millis(20));
    }
    // Left as a crash leaves it; its Drop must not touch the next mount.
    std::mem::forget(dead);
    let e = std::fs::read_dir(&mp).unwrap_err();
    assert!(
        matches!(e.raw_os_error(), Some(libc::ENOTCONN | libc::ECONNABORTED)),
        "{e}"
    );
    let m = Mount::start_at(reg.addr(), &[], &mp, None);
    assert!(m.path("stale/app/v1/digest").exists());
    m.unmount().unwrap();
    assert!(!is_mounted(&mp));
}

#[test]
fn clear_errors_for_bad_mount_points_and_registries() {
    let reg = Distribution::start();
    let dir = common::tempdir();
    let file = dir.path().join("file");
    std::fs::write(&file, b"").unwrap();
    let err = |args: &[&std::ffi::OsStr]| {
        let out = run_mountd(args, &[]);
        assert!(!out.status.success());
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let e = err(&["mount".as_ref(), reg.addr().as_ref(), file.as_os_str()]);
    assert!(e.contains("not a directory"), "{e}");
    let missing = dir.path().join("missing");
    let e = err(&["mount".as_ref(), reg.addr().as_ref(), missing.as_os_str()]);
    assert!(e.contains("mount point"), "{e}");
    let mp = dir.path().join("mp");
    std::fs::create_dir(&mp).unwrap();
    let dead = format!("127.0.0.1:{}", common::free_port());
    let e = err(&[
        "mount".as_ref(),
        dead.as_ref(),
        mp.as_os_str(),
        "--insecure".as_ref(),
    ]);
    assert!(e.contains("unreachable"), "{e}");
    assert!(!is_mounted(&mp));
    // No /dev/fuse: hide it in a private mount namespace.
    let bin = mountd();
    let out = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c"])
        .arg(r#"mount -t tmpfs tmpfs /dev && exec "$0" mount "$1" "$2""#)
        .arg(&bin)
        .arg(reg.addr())
        .arg(&mp)
        .output()
        .unwrap();
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && e.contains("/dev/fuse"), "{e}");
    // No fusermount3 for an unprivileged user.
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .args(["env", "PATH=/nonexistent"])
        .arg(&bin)
        .args(["mount", reg.addr()])
        .arg(&mp)
        .output()
        .unwrap();
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && e.contains("fusermount3"), "{e}");
    // Busy: already mounted.
    let m = Mount::start(reg.addr(), &[]);
    let e = err(&["mount".as_ref(), reg.addr().as_ref(), m.mp().as_os_str()]);
    assert!(e.contains("busy"), "{e}");
}

/// A TCP proxy that hands upstream's bytes to clients at about `rate`
/// bytes per second per connection: a slow registry.
fn slow_proxy(upstream: &str, rate: u64) -> String {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let upstream = upstream.to_string();
    std::thread::spawn(move || {
        for client in listener.incoming().flatten() {
            let Ok(server) = std::net::TcpStream::connect(&upstream) else {
                continue;
            };
            let (mut c_in, mut s_out) = (client.try_clone().unwrap(), server.try_clone().unwrap());
            std::thread::spawn(move || std::io::copy(&mut c_in, &mut s_out));
            let (mut s_in, mut c_out) = (server, client);
            std::thread::spawn(move || {
                let mut buf = [0u8; 16 * 1024];
                while let Ok(n) = s_in.read(&mut buf) {
                    if n == 0 || c_out.write_all(&buf[..n]).is_err() {
                        break;
                    }
                    std::thread::sleep(Duration::from_nanos(n as u64 * 1_000_000_000 / rate));
                }
                let _ = c_out.shutdown(std::net::Shutdown::Both);
            });
        }
    });
    addr
}

#[test]
fn readers_are_not_blocked_behind_a_slow_fetch() {
    let reg = Distribution::start();
    let layouts = fixture_layout();
    let layout = layouts.path().join("layout");
    common::push_oci_layout(&layout, "latest", &reg.reference("slow:latest"));
    // ~6 MiB layer at 256 KiB/s: the first read of the rootfs takes ~25 s.
    let proxy = slow_proxy(reg.addr(), 256 << 10);
    let m = Mount::start(&proxy, &[]);
    assert!(m.path("slow/latest/manifest.json").exists());
    let file = m.path("slow/latest/rootfs/small.txt");
    let reader = std::thread::spawn(move || std::fs::read_to_string(file));
    std::thread::sleep(Duration::from_millis(500));
    let t = Instant::now();
    for _ in 0..5 {
        read_string(&m.path(".ggfs/stats"));
        std::fs::read(m.path("slow/latest/manifest.json")).unwrap();
        names_in(&m.path("slow/latest"));
    }
    let took = t.elapsed();
    assert!(
        !reader.is_finished(),
        "the layer fetch was too fast to test anything"
    );
    // Generous for loaded CI machines, far below the fetch's duration.
    assert!(
        took < Duration::from_secs(8),
        "other requests waited {took:?} on the fetch"
    );
    let got = within(120, "slow read", move || reader.join().unwrap()).unwrap();
    assert_eq!(got, "hello ggfs\n");
}

/// Push the fixture as `src:latest`, convert it with ctr-remote (`convert`
/// is estargz_image or zstdchunked_image) and check the mount: one small
/// file costs under 1% of the layer, the whole tree equals umoci's unpack
/// of the original, and a corrupted blob gives EIO, never wrong bytes.
fn check_lazy_conversion(convert: fn(&Distribution, &str, &str) -> serde_json::Value, repo: &str) {
    let reg = Distribution::start();
    let layouts = fixture_layout();
    let layout = layouts.path().join("layout");
    common::push_oci_layout(&layout, "latest", &reg.reference("src:latest"));
    let manifest = convert(&reg, "src:latest", &format!("{repo}:latest"));
    let layer = manifest["layers"][0]["digest"]
        .as_str()
        .unwrap()
        .to_string();
    let layer_size = manifest["layers"][0]["size"].as_u64().unwrap();
    let (_u, expected) = unpack(&layout, "latest");
    let proxy = CountingProxy::start(reg.addr());
    let cache = common::tempdir();
    {
        let m = Mount::start_with_cache(proxy.addr(), &[], Some(cache.path()));
        proxy.reset();
        let small = read_string(&m.path(&format!("{repo}/latest/rootfs/small.txt")));
        assert_eq!(small, "hello ggfs\n");
        let down = proxy.bytes_down();
        assert!(
            down * 100 < layer_size,
            "reading one small file fetched {down} bytes of a {layer_size}-byte layer: {:#?}",
            proxy.requests()
        );
        assert_same_tree(&m.path(&format!("{repo}/latest/rootfs")), &expected);
    }
    {
        // The next mount finds TOC and chunks in the cache: no blob ranges.
        let m = Mount::start_with_cache(proxy.addr(), &[], Some(cache.path()));
        proxy.reset();
        assert_same_tree(&m.path(&format!("{repo}/latest/rootfs")), &expected);
        let ranged: Vec<_> = proxy
            .requests()
            .into_iter()
            .filter(|r| r.range.is_some())
            .collect();
        assert!(ranged.is_empty(), "cached layer fetched again: {ranged:#?}");
    }
    let path = reg.blob_path(&layer);
    let mut bytes = std::fs::read(&path).unwrap();
    // Inside big-5m's data, the bulk of the blob.
    let at = bytes.len() / 2;
    bytes[at] ^= 0xff;
    std::fs::write(&path, &bytes).unwrap();
    let m = Mount::start(reg.addr(), &[]);
    let mut eio = 0;
    for f in ["data/big-5m", "data/random-1m"] {
        let p = m.path(&format!("{repo}/latest/rootfs/{f}"));
        match within(60, "read", move || std::fs::read(&p)) {
            Ok(got) => assert_eq!(
                got,
                std::fs::read(expected.join(f)).unwrap(),
                "{f}: wrong bytes"
            ),
            Err(e) => {
                assert_eq!(e.raw_os_error(), Some(5), "{f}: want EIO, got {e}");
                eio += 1;
            }
        }
    }
    assert!(eio > 0, "corruption at byte {at} of {layer} went unnoticed");
    assert!(
        m.log().contains(&layer),
        "log does not name the blob:\n{}",
        m.log()
    );
}

#[test]
fn estargz_is_read_lazily_and_verified() {
    check_lazy_conversion(common::estargz_image, "esgz");
}

#[test]
fn zstdchunked_is_read_lazily_and_verified() {
    check_lazy_conversion(common::zstdchunked_image, "zchunked");
}

#[test]
fn evicted_plain_layer_is_read_by_verified_ranges() {
    let reg = Distribution::start();
    let layouts = fixture_layout();
    let layout = layouts.path().join("layout");
    common::push_oci_layout(&layout, "latest", &reg.reference("ranges:latest"));
    let manifest =
        common::skopeo_inspect_raw(&format!("docker://{}", reg.reference("ranges:latest")));
    let layer_size = manifest["layers"][0]["size"].as_u64().unwrap();
    let (_u, expected) = unpack(&layout, "latest");
    let cache = common::tempdir();
    {
        // First pass: the layer streams once; tar and index go to the cache.
        let m = Mount::start_with_cache(reg.addr(), &[], Some(cache.path()));
        assert_eq!(
            read_string(&m.path("ranges/latest/rootfs/small.txt")),
            "hello ggfs\n"
        );
    }
    assert!(cache
        .path()
        .join("index/sha256")
        .read_dir()
        .unwrap()
        .next()
        .is_some());
    // Evict the uncompressed tars: only the index (and block digests) remain.
    std::fs::remove_dir_all(cache.path().join("tar")).unwrap();
    let proxy = CountingProxy::start(reg.addr());
    let m = Mount::start_with_cache(proxy.addr(), &[], Some(cache.path()));
    // By digest, manifest and config come from the cache too.
    let manifest = std::fs::read(m.path("ranges/latest/manifest.json")).unwrap();
    let by_digest = m.path(&format!("ranges/{}", common::sha256_digest(&manifest)));
    proxy.reset();
    assert_eq!(
        read_string(&by_digest.join("rootfs/small.txt")),
        "hello ggfs\n"
    );
    assert!(std::fs::read(by_digest.join("config.json")).is_ok());
    let whole: Vec<_> = proxy
        .requests()
        .into_iter()
        .filter(|r| {
            r.path.contains("/manifests/") || (r.path.contains("/blobs/") && r.range.is_none())
        })
        .collect();
    assert!(whole.is_empty(), "fetched again: {whole:#?}");
    let down = proxy.bytes_down();
    assert!(
        down * 2 < layer_size,
        "one small file fetched {down} of {layer_size} bytes: {:#?}",
        proxy.requests()
    );
    assert!(
        proxy.requests().iter().any(|r| r.range.is_some()),
        "{:#?}",
        proxy.requests()
    );
    assert_same_tree(&m.path("ranges/latest/rootfs"), &expected);
}

fn names_in(p: &Path) -> Vec<String> {
    let p = p.to_path_buf();
    let mut v: Vec<String> = within(60, "readdir", move || {
        std::fs::read_dir(&p)
            .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect()
    });
    v.sort();
    v
}

#[test]
fn tags_move_after_ttl_tags_shadow_repos_and_misses_are_cached() {
    let reg = Distribution::start();
    let multi = common::multilayer_image();
    let tag = common::MULTILAYER_TAG;
    let layouts = fixture_layout();
    let fixture = layouts.path().join("layout");
    common::push_oci_layout(multi, tag, &reg.reference("ns/app:v1"));
    common::push_oci_layout(multi, tag, &reg.reference("ns/app:child"));
    common::push_oci_layout(multi, tag, &reg.reference("ns/app/child:c1"));
    let proxy = CountingProxy::start(reg.addr());
    let m = Mount::start(proxy.addr(), &["--tag-ttl", "1"]);

    // A tag follows the registry once --tag-ttl has passed, and so does a
    // listing the kernel keeps (no OPENDIR: the directory's mtime moves).
    assert_eq!(names_in(&m.path("ns/app")), ["child", "v1"]);
    let before = read_string(&m.path("ns/app/v1/digest"));
    common::push_oci_layout(&fixture, "latest", &reg.reference("ns/app:v1"));
    common::push_oci_layout(&fixture, "latest", &reg.reference("ns/app:v2"));
    let now = common::skopeo_inspect_raw(&format!("docker://{}", reg.reference("ns/app:v1")));
    std::thread::sleep(Duration::from_millis(2500));
    let after = read_string(&m.path("ns/app/v1/digest"));
    assert_ne!(before, after);
    let raw = std::fs::read(m.path("ns/app/v1/manifest.json")).unwrap();
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&raw).unwrap(),
        now
    );
    assert_eq!(after.trim(), common::sha256_digest(&raw));
    assert_eq!(
        read_string(&m.path("ns/app/v1/rootfs/small.txt")),
        "hello ggfs\n"
    );

    // `child` is a tag of ns/app and the repository ns/app/child: the
    // image's entries come first, the repository's tags follow.
    assert_eq!(names_in(&m.path("ns/app")), ["child", "v1", "v2"]);
    assert_eq!(
        names_in(&m.path("ns/app/child")),
        [
            "blobs",
            "c1",
            "config.json",
            "digest",
            "manifest.json",
            "referrers",
            "rootfs"
        ]
    );
    assert_eq!(
        read_string(&m.path("ns/app/child/c1/rootfs/base/keep.txt")),
        "v3\n"
    );

    // Shell-style probes of missing names do not flood the registry (a
    // mount with the default TTL, so nothing expires during the loop).
    drop(m);
    let m = Mount::start(proxy.addr(), &[]);
    assert!(m.path("ns/app/v1/digest").exists());
    proxy.reset();
    for _ in 0..20 {
        assert!(!m.path("ns/app/.git").exists());
        assert!(!m.path("nosuchrepo").exists());
        assert!(!m.path("ns/app/v1/nosuchfile").exists());
    }
    // At most: the tags of `nosuchrepo` (404), once.
    assert!(proxy.request_count() <= 2, "{:#?}", proxy.requests());
}

#[test]
fn small_cache_stays_bounded_and_serves_correct_bytes() {
    let reg = Distribution::start();
    let layouts = fixture_layout();
    let layout = layouts.path().join("layout");
    common::push_oci_layout(&layout, "latest", &reg.reference("small/cache:latest"));
    let (_u, expected) = unpack(&layout, "latest");
    let cache = common::tempdir();
    let limit = 3u64 << 20;
    let m = Mount::start_with_cache(reg.addr(), &["--cache-size", "3M"], Some(cache.path()));
    // The layer's tar (~7 MiB) is not kept: reads go by verified ranges.
    assert_same_tree(&m.path("small/cache/latest/rootfs"), &expected);
    let used: u64 = common::dir_size(cache.path());
    assert!(
        used <= limit + (1 << 20),
        "cache holds {used} bytes, limit {limit}"
    );
}
// ---------------------------------------------------------------------------
// A file over 4 GiB served by a real FUSE mount of a real registry: its
// size and the bytes at offsets on both sides of 2^32 (where a 32-bit
// offset or size would wrap) must be exact. The mount's cache is too small
// to keep the layer's tar, so every read goes by verified Range requests
// to the gzip blob, from checkpoints past 4 GiB of uncompressed data.
// ---------------------------------------------------------------------------

const GIB4: u64 = 1 << 32;
/// 4 GiB + 4 KiB: mostly a hole, so the source costs no disk.
const SIZE: u64 = GIB4 + 4096;

/// Distinct marker strings and where they sit in the big file: at 0, ending
/// at byte 2^32 - 1, starting at 2^32, and ending at the last byte.
fn markers() -> Vec<(u64, &'static [u8])> {
    vec![
        (0, b"<start of big file>"),
        (GIB4 - 13, b"<below 4 GiB>"),
        (GIB4, b"<at 4 GiB>"),
        (SIZE - 12, b"<end marker>"),
    ]
}

/// What the big file holds at `[off, off + len)`: zeros and the markers
/// (short at its end).
fn expected(off: u64, len: usize) -> Vec<u8> {
    let len = (len as u64).min(SIZE.saturating_sub(off)) as usize;
    let mut out = vec![0u8; len];
    for (at, m) in markers() {
        for (i, &b) in m.iter().enumerate() {
            let pos = at + i as u64;
            if pos >= off && pos < off + len as u64 {
                out[(pos - off) as usize] = b;
            }
        }
    }
    out
}

/// A sparse source tree: `big` (SIZE bytes, markers written) and a small
/// file after it in the tar, so its data sits past 4 GiB in the layer too.
fn write_tree(dir: &Path) {
    let big = std::fs::File::create(dir.join("big")).unwrap();
    big.set_len(SIZE).unwrap();
    for (at, m) in markers() {
        big.write_all_at(m, at).unwrap();
    }
    std::fs::write(dir.join("small.txt"), b"after the big one\n").unwrap();
    let used = big.metadata().map(|m| {
        use std::os::unix::fs::MetadataExt;
        m.blocks() * 512
    });
    assert!(used.unwrap() < 1 << 20, "source file is not sparse");
}

/// Up to `len` bytes of `file` at `off` by pread (repeated while it
/// returns short counts, as it may on FUSE), failing after `secs`.
fn pread(file: &Path, off: u64, len: usize, secs: u64) -> Vec<u8> {
    let (tx, rx) = std::sync::mpsc::channel();
    let path = file.to_path_buf();
    std::thread::spawn(move || {
        let f = std::fs::File::open(&path).unwrap();
        let mut buf = vec![0u8; len];
        let mut got = 0;
        while got < len {
            match f.read_at(&mut buf[got..], off + got as u64).unwrap() {
                0 => break,
                n => got += n,
            }
        }
        buf.truncate(got);
        let _ = tx.send(buf);
    });
    rx.recv_timeout(Duration::from_secs(secs))
        .unwrap_or_else(|e| panic!("pread {len} at {off}: {e}"))
}

/// Assert `got` (read at `off`) is what the file holds there, naming the
/// first differing offset instead of printing megabytes of zeros.
fn assert_bytes(got: &[u8], off: u64, want_len: usize) {
    let want = expected(off, want_len);
    assert_eq!(
        got.len(),
        want.len(),
        "length of the read at {off} (+{want_len})"
    );
    if let Some(i) = got.iter().zip(&want).position(|(a, b)| a != b) {
        let end = (i + 32).min(got.len());
        panic!(
            "read at {off} differs from offset {}: got {:?}, want {:?}",
            off + i as u64,
            String::from_utf8_lossy(&got[i..end]),
            String::from_utf8_lossy(&want[i..end]),
        );
    }
}

#[test]
fn file_over_4gib_reads_right_on_both_sides_of_2_pow_32() {
    let t0 = Instant::now();
    let reg = Distribution::start();
    let work = common::tempdir();
    let src = work.path().join("src");
    std::fs::create_dir(&src).unwrap();
    write_tree(&src);
    let image = reg.reference("large/file:v1");
    // TMPDIR: the CLI's layer temp file stays inside the test's dir.
    common::run(
        Command::new(common::ggfs_bin())
            .args(["append", "-f"])
            .arg(&src)
            .args(["-t", &image])
            .env("TMPDIR", work.path()),
    );
    std::fs::remove_dir_all(&src).unwrap();
    eprintln!("pushed in {:?}", t0.elapsed());
    let manifest = common::skopeo_inspect_raw(&format!("docker://{image}"));
    let layer_size = manifest["layers"][0]["size"].as_u64().unwrap();
    assert!(
        layer_size < 64 << 20,
        "layer of zeros is {layer_size} bytes"
    );

    // Cache of 64 MiB: the 4 GiB tar is over half of it, so it is not kept.
    let proxy = CountingProxy::start(reg.addr());
    let cache = work.path().join("cache");
    let m = Mount::start_with_cache(proxy.addr(), &["--cache-size", "64M"], Some(&cache));
    let root = m.path("large/file/v1/rootfs");
    let big = root.join("big");
    let md = std::fs::metadata(&big).unwrap_or_else(|e| panic!("{e}\n{}", m.log()));
    assert_eq!(md.len(), SIZE);
    eprintln!("indexed in {:?}", t0.elapsed());
    assert!(
        m.log().contains("reads will use ranges"),
        "tar was kept: {}",
        m.log()
    );
    proxy.reset();
    let small = std::fs::read(root.join("small.txt")).unwrap();
    assert_eq!(small, b"after the big one\n");

    for (at, marker) in markers() {
        assert_bytes(&pread(&big, at, marker.len(), 120), at, marker.len());
    }
    // Reads spanning 2^32 with the surrounding zeros, of sizes FUSE splits.
    for (off, len) in [
        (GIB4 - 7, 20),
        (GIB4 - 64, 128),
        (GIB4 - 70_000, 200_000),
        (GIB4 - 1, 2),
    ] {
        assert_bytes(&pread(&big, off, len, 120), off, len);
    }
    // Reads running past the end are short, ones at or past it empty.
    assert_bytes(&pread(&big, SIZE - 4096, 8192, 120), SIZE - 4096, 8192);
    assert!(pread(&big, SIZE, 10, 120).is_empty());
    assert!(pread(&big, SIZE + GIB4, 10, 120).is_empty());
    eprintln!("checked in {:?}", t0.elapsed());
    // Every byte above came from verified Range reads of the blob.
    let blob_gets: Vec<_> = proxy
        .requests()
        .into_iter()
        .filter(|r| r.path.contains("/blobs/"))
        .collect();
    assert!(!blob_gets.is_empty(), "no blob reads at all");
    assert!(
        blob_gets.iter().all(|r| r.range.is_some()),
        "whole-blob fetches: {blob_gets:#?}"
    );
    drop(m);
    let used = common::dir_size(&cache);
    assert!(used < 80 << 20, "cache holds {used} bytes");
}

/// The `listings N` counter of `.ggfs/stats`.
fn listings(m: &Mount) -> u64 {
    let stats = read_string(&m.path(".ggfs/stats"));
    let line = stats.lines().find_map(|l| l.strip_prefix("listings "));
    line.unwrap_or_else(|| panic!("no listings in {stats}"))
        .parse()
        .unwrap()
}

/// The names `ls -f` prints for `dir`, sorted, less `.` and `..`.
fn ls_f(dir: &Path) -> Vec<String> {
    let d = dir.to_path_buf();
    let out = within(120, "ls -f", move || {
        common::run(Command::new("ls").arg("-f").arg(&d))
    });
    let mut names: Vec<String> = out
        .lines()
        .filter(|n| *n != "." && *n != "..")
        .map(String::from)
        .collect();
    names.sort();
    names
}

/// A directory of 10,000 entries takes hundreds of READDIR pages; its
/// listing is built once per `ls` (not once per page) and every name comes
/// back exactly once, read-only and once the tree is writable.
#[test]
fn a_big_directory_is_listed_once_per_open() {
    let reg = Distribution::start();
    let work = common::tempdir();
    let tree = work.path().join("tree");
    let big = tree.join("big");
    std::fs::create_dir_all(&big).unwrap();
    let mut want: Vec<String> = (0..10_000)
        .map(|i| format!("{i:05}-{}", "x".repeat(90)))
        .collect();
    for n in &want {
        std::fs::write(big.join(n), b"").unwrap();
    }
    want.sort();
    let image = reg.reference("big/dir:t");
    common::run(
        Command::new(common::ggfs_bin())
            .args(["append", "-f"])
            .arg(&tree)
            .args(["-t", &image]),
    );
    let m = Mount::start(reg.addr(), &[]);
    let dir = m.path("big/dir/t/rootfs/big");
    let before = listings(&m);
    assert_eq!(ls_f(&dir), want);
    assert_eq!(listings(&m) - before, 1, "listing rebuilt per READDIR page");
    // Again: the kernel kept the listing.
    assert_eq!(ls_f(&dir), want);
    assert_eq!(listings(&m) - before, 1);

    // Writable: a new name shows up, and the listing is still built once.
    let added = dir.join("zz-new");
    within(60, "create", {
        let a = added.clone();
        move || std::fs::write(&a, b"new").unwrap()
    });
    want.push("zz-new".into());
    let before = listings(&m);
    assert_eq!(ls_f(&dir), want);
    assert_eq!(listings(&m) - before, 1, "listing rebuilt per READDIR page");
}

/// Load: 16 readers at once over 2,000 files of an eStargz image (each
/// reader in its own order, whole files and a middle slice), cold: every
/// byte is the source's, and the daemon's peak RSS stays under 64 MiB.
#[test]
fn sixteen_parallel_readers_get_the_right_bytes() {
    let reg = Distribution::start();
    let work = common::tempdir();
    let tree = work.path().join("tree");
    let mut files = Vec::new();
    for i in 0..2000usize {
        let rel = format!("d{}/f{i}", i % 40);
        let p = tree.join(&rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        let len = 1 + (i * 7919) % (48 << 10);
        std::fs::write(&p, common::pseudo_random(len, i as u64)).unwrap();
        files.push(rel);
    }
    let image = reg.reference("load/read:t");
    common::run(
        Command::new(common::ggfs_bin())
            .args([
                "append",
                "--layer-format",
                "estargz",
                "--chunk-size",
                "16384",
                "-f",
            ])
            .arg(&tree)
            .args(["-t", &image]),
    );
    let m = Mount::start(reg.addr(), &[]);
    let rootfs = m.path("load/read/t/rootfs");
    let files = std::sync::Arc::new(files);
    let readers: Vec<_> = (0..16usize)
        .map(|r| {
            let (files, rootfs, tree) = (files.clone(), rootfs.clone(), tree.clone());
            std::thread::spawn(move || {
                let n = files.len();
                for k in 0..n {
                    let rel = &files[(k * 37 + r * 131) % n];
                    let want = std::fs::read(tree.join(rel)).unwrap();
                    let got = std::fs::read(rootfs.join(rel)).unwrap();
                    assert!(got == want, "reader {r}: {rel} differs");
                    if want.len() > 3000 {
                        let f = std::fs::File::open(rootfs.join(rel)).unwrap();
                        let mut mid = vec![0u8; 1000];
                        f.read_exact_at(&mut mid, 2000).unwrap();
                        assert!(mid[..] == want[2000..3000], "reader {r}: slice of {rel}");
                    }
                }
            })
        })
        .collect();
    within(600, "16 readers", move || {
        for r in readers {
            r.join().unwrap();
        }
    });
    let status = std::fs::read_to_string(format!("/proc/{}/status", m.pid())).unwrap();
    let hwm: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap();
    assert!(hwm < 64 << 10, "daemon peak RSS {} MiB", hwm >> 10);
}

// ---------------------------------------------------------------------------
// `blobs/<digest>` of a plain layer whose rootfs is in use is read by Range
// from the blob's verified 1 MiB blocks: a read in its middle fetches a
// block or two, not the whole blob first; read whole, it is the blob.
// ---------------------------------------------------------------------------

fn blob_fetched(m: &Mount, digest: &str) -> u64 {
    let stats = std::fs::read_to_string(m.path(".ggfs/stats")).unwrap();
    stats
        .lines()
        .find_map(|l| {
            let rest = l.strip_prefix(&format!("blob {digest} "))?;
            let f = rest.split(' ').skip_while(|w| *w != "fetched").nth(1)?;
            f.parse().ok()
        })
        .unwrap_or(0)
}

#[test]
fn a_plain_layers_blob_in_use_is_read_by_range() {
    let reg = Distribution::start();
    let dir = common::tempdir();
    let tree = dir.path().join("tree");
    std::fs::create_dir_all(&tree).unwrap();
    std::fs::write(tree.join("big"), common::pseudo_random(6 << 20, 7)).unwrap();
    let dst = reg.reference("range/blob:v1");
    common::ggfs(&[
        "append",
        "--insecure",
        "-f",
        tree.to_str().unwrap(),
        "-t",
        &dst,
    ]);
    let m = Mount::start(reg.addr(), &[]);
    // The first read of the layer streams it once (its index and blocks).
    let _ = std::fs::read(m.path("range/blob/v1/rootfs/big")).unwrap();
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(m.path("range/blob/v1/manifest.json")).unwrap())
            .unwrap();
    let layer = manifest["layers"][0]["digest"]
        .as_str()
        .unwrap()
        .to_string();
    let size = manifest["layers"][0]["size"].as_u64().unwrap();
    let blob = std::fs::read(reg.blob_path(&layer)).unwrap();
    assert!(
        size > 5 << 20,
        "the layer is {size} bytes: too small to tell"
    );
    let before = blob_fetched(&m, &layer);
    let f = std::fs::File::open(m.path(&format!("range/blob/v1/blobs/{layer}"))).unwrap();
    let mut buf = vec![0u8; 100];
    f.read_exact_at(&mut buf, 3 << 20).unwrap();
    assert_eq!(buf, blob[3 << 20..(3 << 20) + 100]);
    let fetched = blob_fetched(&m, &layer) - before;
    assert!(
        fetched > 0 && fetched <= 2 << 20,
        "a 100-byte read of the blob fetched {fetched} of its {size} bytes"
    );
    let whole = std::fs::read(m.path(&format!("range/blob/v1/blobs/{layer}"))).unwrap();
    assert!(
        whole == blob,
        "blobs/{layer} read whole differs from the registry's blob"
    );
}

/// `ls -la` of a repository: its tags come from one listing, and a tag
/// directory's attributes need no manifest (they were a request each, one
/// after another: over a WAN, 24 ms per tag). The first look inside a tag
/// fetches its manifest, once.
#[test]
fn listing_a_repository_stats_its_tags_without_a_request_each() {
    let reg = Distribution::start();
    let work = common::tempdir();
    std::fs::write(work.path().join("f"), "x").unwrap();
    let first = reg.reference("many/app:t1");
    common::ggfs(&[
        "append",
        "-f",
        &work.path().display().to_string(),
        "-t",
        &first,
    ]);
    for i in 2..=6 {
        common::ggfs(&["tag", &first, &format!("t{i}")]);
    }
    let proxy = CountingProxy::start(reg.addr());
    let m = Mount::start(proxy.addr(), &[]);
    proxy.reset();
    let dir = m.path("many/app");
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["t1", "t2", "t3", "t4", "t5", "t6"]);
    for n in &names {
        assert!(
            std::fs::symlink_metadata(dir.join(n)).unwrap().is_dir(),
            "{n}"
        );
    }
    let count = |what: &str| {
        let reqs = proxy.requests();
        (reqs.iter().filter(|r| r.path.contains(what)).count(), reqs)
    };
    let (manifests, reqs) = count("/manifests/");
    assert_eq!(manifests, 0, "{reqs:#?}");
    assert_eq!(count("/tags/list").0, 1, "{reqs:#?}");
    let digest = read_string(&m.path("many/app/t3/digest"));
    assert!(digest.starts_with("sha256:"), "{digest}");
    read_string(&m.path("many/app/t3/manifest.json"));
    let (manifests, reqs) = count("/manifests/");
    assert_eq!(manifests, 1, "{reqs:#?}");
}
